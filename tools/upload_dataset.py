"""Upload a folder of images and its metadata CSV to the data bucket's ``incoming/`` prefix.

Each object created under ``incoming/`` triggers validation. The CSV goes first so that labels are known when
the images are checked; objects already present with the same size are skipped, so an interrupted upload can be
run again.

Example
-------
``python -m tools.upload_dataset --bucket my-data-bucket --folder ./ham10000/images
--metadata ./ham10000/HAM10000_metadata.csv``
"""

from __future__ import annotations

import argparse
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from tools.progress import Progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# Multipart above 16 MB, in 16 MB parts: dermoscopy originals are a few MB, so most uploads are one request.
TRANSFER = TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024)


@dataclass
class UploadReport:
    """What an upload did."""

    uploaded: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0


def _already_there(s3: Any, bucket: str, key: str, size: int) -> bool:
    try:
        return int(s3.head_object(Bucket=bucket, Key=key)["ContentLength"]) == size
    except ClientError as err:
        if err.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def upload_dataset(s3: Any, bucket: str, folder: Path, metadata: Path | None = None, *, dataset: str = "upload",
                   workers: int = 8, progress: bool | None = None) -> UploadReport:
    """Upload ``metadata`` then every image under ``folder`` to ``incoming/<dataset>/``.

    Parameters
    ----------
    s3 : botocore S3 client
    bucket : str
        The stack's data bucket.
    folder : Path
        Images (``.jpg``, ``.jpeg``, ``.png``), searched recursively.
    metadata : Path, optional
        HAM10000 or ISIC 2019 ground-truth CSV giving the labels.
    dataset : str
        Sub-prefix naming the source, recorded with each image.
    workers : int
        Parallel uploads.
    progress : bool, optional
        Show a progress bar; by default when stderr is a terminal.
    """
    prefix = f"incoming/{dataset}/"
    report = UploadReport()
    if metadata is not None:
        s3.upload_file(str(metadata), bucket, prefix + metadata.name, Config=TRANSFER)
        report.uploaded += 1
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    bar = Progress(len(files), progress)
    lock = threading.Lock()

    def one(path: Path) -> None:
        key = prefix + path.relative_to(folder).as_posix()
        size = path.stat().st_size
        try:
            if _already_there(s3, bucket, key, size):
                outcome = "skipped"
            else:
                s3.upload_file(str(path), bucket, key, Config=TRANSFER)
                outcome = "uploaded"
        except (ClientError, OSError) as err:
            sys.stderr.write(f"\n  failed: {path}: {err}\n")
            outcome = "failed"
        with lock:
            setattr(report, outcome, getattr(report, outcome) + 1)
            if outcome == "uploaded":
                report.bytes += size
        bar.step()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, files))
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--folder", required=True, type=Path)
    parser.add_argument("--metadata", type=Path)
    parser.add_argument("--dataset", default="upload")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    report = upload_dataset(boto3.client("s3"), args.bucket, args.folder, args.metadata, dataset=args.dataset,
                            workers=args.workers)
    print(f"uploaded {report.uploaded}, skipped {report.skipped}, failed {report.failed}, {report.bytes} bytes")
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
