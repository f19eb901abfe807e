"""Upload a folder of images and its label CSV to the stack's data bucket, under ``incoming/<dataset>/``.

Each object created under ``incoming/`` triggers validation. The CSV goes first so that labels are known when
the images are checked; objects already present with the same size are skipped, so an interrupted upload can be
run again. Before anything is sent, the folder, the label file and the bucket are checked: a missing or empty
folder, a label file of neither the HAM10000 nor the ISIC 2019 format, missing credentials or a bucket that is not
a stack's data bucket end the command with one ``error:`` line and exit status 1.

Example
-------
``python -m tools.upload_dataset --stack skin-lesion --folder ./ham10000/images
--metadata ./ham10000/metadata.csv --dataset ham10000``
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

# The label-CSV reader is the validation handler's own (the common layer), so the check here agrees with it.
from lesion_common.labels import ALL_CODES, MetadataFormatError, parse_metadata_csv
from lesion_common.uploads import INCOMING
from tools.cli import ToolError, aws_message, check_data_bucket, data_bucket_of_stack, region, run_main
from tools.progress import Progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# Multipart above 16 MB, in 16 MB parts: dermoscopy originals are a few MB, so most uploads are one request.
TRANSFER = TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024)
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# S3 errors after which no other file can succeed either: stop instead of failing each file alike.
_FATAL_S3_CODES = {"NoSuchBucket", "AccessDenied", "403", "AllAccessDisabled", "KMS.AccessDeniedException"}


@dataclass
class UploadReport:
    """What an upload did."""

    uploaded: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0


def find_images(folder: Path) -> list[Path]:
    """The images under ``folder`` (recursive), sorted.

    Raises
    ------
    ToolError
        The folder is missing, is not a folder, or holds no ``.jpg``/``.jpeg``/``.png`` file.
    """
    if not folder.exists():
        raise ToolError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise ToolError(f"{folder} is not a folder: --folder takes the folder that holds the images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ToolError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return files


def check_labels(images: list[Path], folder: Path, metadata: Path | None, *, unlabelled: bool = False) -> str:
    """Check that the images will get labels; return a short description of where they come from.

    Labels come from a label CSV (``metadata``: HAM10000, ISIC 2019, BCN20000, ISIC Archive metadata; see
    ``lesion_common.labels.detect_format``), or from the name of the folder an image is in (``mel/``, ``nv/``,
    ...), as the validation handler reads them.

    Raises
    ------
    ToolError
        The label file is missing, unreadable, of neither format, has no usable row, or names none of the images;
        or there is no label file and no class folders (unless ``unlabelled``).
    """
    if metadata is None:
        foldered = sum(1 for p in images if p.parent != folder and p.parent.name.lower() in ALL_CODES)
        if foldered:
            return f"labels from class folders ({foldered} of {len(images)} images)"
        if unlabelled:
            return "no labels (--unlabelled)"
        raise ToolError("no label file: pass --metadata CSV (HAM10000, ISIC 2019, BCN20000 or ISIC Archive "
                        "metadata), put the images in folders named by class (mel/, nv/, ...), or pass --unlabelled")
    if not metadata.is_file():
        raise ToolError(f"label file {metadata} does not exist")
    try:
        rows = parse_metadata_csv(metadata.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ToolError(f"label file {metadata} is not UTF-8 text: {err.reason}") from err
    except MetadataFormatError as err:
        raise ToolError(f"label file {metadata} is not a label CSV of a known format: {err}") from err
    labelled = {row.image_id for row in rows if row.ok and row.label is not None}
    if not labelled and any(row.ok for row in rows):
        raise ToolError(f"label file {metadata} holds lesion ids only (ISIC 2019 training metadata): pass the "
                        "ground truth as --metadata, then upload this file to incoming/ too (it sets the lesions)")
    if not labelled:
        raise ToolError(f"label file {metadata} has no usable row ({len(rows)} rows, none with a known class)")
    matched = sum(1 for p in images if p.stem in labelled)
    if not matched:
        raise ToolError(f"label file {metadata} names none of the {len(images)} images under {folder} "
                        "(image ids are the file names without extension)")
    return f"labels for {matched} of {len(images)} images from {metadata.name}"


def _already_there(s3: Any, bucket: str, key: str, size: int) -> bool:
    try:
        return int(s3.head_object(Bucket=bucket, Key=key)["ContentLength"]) == size
    except ClientError as err:
        if err.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def _fatal(err: Exception) -> bool:
    if isinstance(err, BotoCoreError):
        return True
    if isinstance(err, ClientError):
        return aws_message(err) is not None or err.response.get("Error", {}).get("Code") in _FATAL_S3_CODES
    return False


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

    Raises
    ------
    botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError
        An error after which no upload can succeed (credentials, a missing bucket, access denied): the first one,
        once the uploads in flight have ended. Other failures are counted in the report.
    """
    prefix = f"{INCOMING}{dataset}/"
    report = UploadReport()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    sizes = {p: p.stat().st_size for p in files}
    bar = Progress(len(files), progress, total_bytes=sum(sizes.values()))
    if metadata is not None:
        s3.upload_file(str(metadata), bucket, prefix + metadata.name, Config=TRANSFER)
        report.uploaded += 1
    lock = threading.Lock()
    stop = threading.Event()
    fatal: list[Exception] = []

    def one(path: Path) -> None:
        if stop.is_set():
            return
        key = prefix + path.relative_to(folder).as_posix()
        size = sizes[path]
        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            sent += n
            bar.add_bytes(n)

        try:
            if _already_there(s3, bucket, key, size):
                outcome = "skipped"
            else:
                s3.upload_file(str(path), bucket, key, Config=TRANSFER, Callback=count)
                outcome = "uploaded"
        except (ClientError, BotoCoreError, OSError) as err:
            if _fatal(err):
                with lock:
                    fatal.append(err)
                stop.set()
                return
            sys.stderr.write(f"\n  failed: {path}: {err}\n")
            outcome = "failed"
        with lock:
            setattr(report, outcome, getattr(report, outcome) + 1)
            if outcome == "uploaded":
                report.bytes += size
        # A skipped file's bytes are not moved: they leave the total rather than inflate the rate.
        if outcome == "skipped":
            bar.skip(size)
        else:
            bar.step(size - sent if outcome == "uploaded" else 0)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, files))
    if fatal:
        raise fatal[0]
    return report


def _dataset_name(text: str) -> str:
    if not DATASET_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '_', '.', '-' (at most 64)")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m tools.upload_dataset", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--stack", help="name of the deployed stack; its DataBucketName output is the bucket")
    where.add_argument("--bucket", help="the data bucket by name; refused unless CloudFormation created it as a "
                                        "stack's DataBucket (see --skip-bucket-check)")
    parser.add_argument("--folder", required=True, type=Path,
                        help="folder holding the images (.jpg, .jpeg, .png), searched recursively")
    parser.add_argument("--metadata", type=Path,
                        help="label file: HAM10000 metadata CSV or ISIC 2019 ground-truth CSV (uploaded first)")
    parser.add_argument("--unlabelled", action="store_true",
                        help="upload without a label file or class folders (the images wait for labels)")
    parser.add_argument("--dataset", default="upload", type=_dataset_name,
                        help="name of the source, the prefix under incoming/ (default: upload)")
    parser.add_argument("--workers", type=int, default=8, help="parallel uploads (default: 8)")
    parser.add_argument("--skip-bucket-check", action="store_true",
                        help="upload to --bucket even if it is not tagged as a stack's data bucket")
    parser.add_argument("--region", help="AWS region (default: AWS_REGION or the profile's region)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    images = find_images(args.folder)
    labels = check_labels(images, args.folder, args.metadata, unlabelled=args.unlabelled)
    s3 = boto3.client("s3", region_name=region(args.region))
    if args.stack:
        bucket = data_bucket_of_stack(boto3.client("cloudformation", region_name=region(args.region)), args.stack)
        check_data_bucket(s3, bucket, require_tag=False)  # credentials and access, before the first file
    else:
        bucket = args.bucket
        check_data_bucket(s3, bucket, require_tag=not args.skip_bucket_check)
    sys.stderr.write(f"uploading {len(images)} images to s3://{bucket}/incoming/{args.dataset}/ ({labels})\n")
    report = upload_dataset(s3, bucket, args.folder, args.metadata, dataset=args.dataset, workers=args.workers)
    print(f"uploaded {report.uploaded}, skipped {report.skipped}, failed {report.failed}, {report.bytes} bytes")
    if report.failed:
        raise ToolError(f"{report.failed} of {len(images)} files failed to upload: run the same command again to "
                        "send them (files already there are skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
