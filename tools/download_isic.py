"""Download a public dermoscopy dataset (HAM10000, ISIC 2019, BCN20000) from the ISIC Archive API v2.

Images go to ``OUT/images/<isic_id>.jpg``; ``OUT/metadata.csv`` holds one row per complete image with the
diagnosis as the archive gives it and its code in each of the project's label sets (``ham7``, ``isic8``);
``OUT/metadata.jsonl`` keeps the archive's full metadata record. ``OUT/manifest.json`` records each file's size
and sha256, so running the command again skips complete, verified files and fetches missing or corrupt ones.

Example
-------
``python -m tools.download_isic --dataset ham10000 --out ./ham10000 --workers 8``
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from lesion_common.labels import archive_code, to_label_set
from tools.cli import ToolError, run_main
from tools.progress import Progress

DEFAULT_BASE_URL = "https://api.isic-archive.com/api/v2"
PAGE_SIZE = 100
RETRIES = 4
BACKOFF_S = 1.0
TIMEOUT_S = 60
CHUNK = 1024 * 1024
# Rewrite the manifest this often while downloading, so that an interrupted run loses little work.
MANIFEST_EVERY = 50


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset lives in the archive: collection names to look up, and ids to use if the lookup fails."""

    names: tuple[str, ...]
    collection_ids: tuple[int, ...]


# The collection names are looked up in ``/collections/`` first; the ids are the fallback (BCN20000 = 249 is
# confirmed from the archive's listing, the other two are believed current). ``--collection`` overrides both.
DATASETS: dict[str, DatasetSource] = {
    "ham10000": DatasetSource(("HAM10000",), (212,)),
    "isic2019": DatasetSource(("Challenge 2019: Training",), (65,)),
    "bcn20000": DatasetSource(("BCN20000",), (249,)),
}

# image_id and dx repeat isic_id and the dataset's label-set code so the data bucket's validator reads this file
# as a HAM10000-format label CSV (tools.upload_dataset --metadata DIR/metadata.csv).
CSV_FIELDS = ("image_id", "lesion_id", "dx", "isic_id", "diagnosis", "benign_malignant", "ham7", "isic8")


class DownloadError(RuntimeError):
    """A request that still failed after its retries, or a file that never verified."""


class _Retryable(Exception):
    """A failure worth another try: 5xx, 429, a dropped connection or a short file."""


@dataclass
class DownloadReport:
    """What a download did."""

    listed: int = 0
    downloaded: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)


def map_label(diagnoses: list[str]) -> tuple[str, str]:
    """Map archive diagnoses to ``(ham7, isic8)`` codes; ``""`` where none maps (``lesion_common.labels``'s rules).

    Parameters
    ----------
    diagnoses : list of str
        Candidate diagnosis strings, most specific first (old-style ``diagnosis``, then ``diagnosis_5`` ..
        ``diagnosis_1`` of the newer hierarchical schema).
    """
    for text in diagnoses:
        code = archive_code(text)
        if code is not None:
            return to_label_set(code, "ham7") or "", to_label_set(code, "isic8") or ""
    return "", ""


def metadata_row(image: dict[str, Any]) -> dict[str, str]:
    """The ``metadata.csv`` row of one archive image record."""
    meta = image.get("metadata") or {}
    clinical = meta.get("clinical") or {}
    # Older records carry a flat ``diagnosis``; newer ones a hierarchy diagnosis_1 (benign/malignant) ..
    # diagnosis_5 (most specific). Keep the most specific one as the given diagnosis.
    candidates = [str(clinical[k]) for k in ("diagnosis", *(f"diagnosis_{n}" for n in range(5, 0, -1)))
                  if clinical.get(k)]
    ham7, isic8 = map_label(candidates)
    lesion_id = clinical.get("lesion_id") or meta.get("lesion_id") or image.get("lesion_id") or ""
    return {"isic_id": image["isic_id"], "lesion_id": str(lesion_id),
            "diagnosis": candidates[0] if candidates else "",
            "benign_malignant": str(clinical.get("benign_malignant") or ""), "ham7": ham7, "isic8": isic8}


def _sleep_backoff(attempt: int, backoff: float) -> None:
    time.sleep(backoff * (2 ** attempt))


def _with_retries(what: str, fn: Callable[[], Any], retries: int, backoff: float) -> Any:
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            return fn()
        except (_Retryable, requests.RequestException) as err:
            last = err
            if attempt < retries:
                _sleep_backoff(attempt, backoff)
    raise DownloadError(f"{what}: {last} (after {retries + 1} attempts)")


def _check_status(resp: requests.Response, url: str) -> None:
    if resp.status_code >= 500 or resp.status_code == 429:
        raise _Retryable(f"HTTP {resp.status_code}")
    if resp.status_code >= 400:
        # A 4xx will not get better by asking again.
        raise DownloadError(f"HTTP {resp.status_code} for {url}: {resp.text[:200]}")


def _get_json(session: requests.Session, url: str, params: dict[str, Any] | None, retries: int,
              backoff: float) -> dict[str, Any]:
    def once() -> dict[str, Any]:
        resp = session.get(url, params=params, timeout=TIMEOUT_S)
        _check_status(resp, url)
        return resp.json()

    return _with_retries(f"GET {url}", once, retries, backoff)


def _pages(session: requests.Session, url: str, params: dict[str, Any] | None, retries: int,
           backoff: float) -> Iterator[dict[str, Any]]:
    """Every result of a paginated endpoint, following ``next`` (an absolute URL carrying its own query)."""
    next_url: str | None = url
    while next_url:
        page = _get_json(session, next_url, params, retries, backoff)
        yield from page.get("results") or []
        next_url, params = page.get("next"), None


def resolve_collections(session: requests.Session, base_url: str, dataset: str, *, retries: int = RETRIES,
                        backoff: float = BACKOFF_S) -> list[int]:
    """Collection ids of ``dataset``: looked up by name in ``/collections/``, else the built-in defaults."""
    source = DATASETS[dataset]
    wanted = {n.lower() for n in source.names}
    try:
        found = [int(c["id"]) for c in _pages(session, f"{base_url}/collections/", {"limit": PAGE_SIZE}, retries,
                                               backoff) if str(c.get("name", "")).lower() in wanted]
    except (DownloadError, ValueError, KeyError) as err:
        sys.stderr.write(f"warning: could not list collections ({err}); using default ids\n")
        found = []
    if not found:
        sys.stderr.write(f"warning: no collection named {list(source.names)}; using default ids "
                         f"{list(source.collection_ids)}\n")
        return list(source.collection_ids)
    return found


def list_images(session: requests.Session, base_url: str, collections: list[int], *, limit: int = 0,
                page_size: int = PAGE_SIZE, retries: int = RETRIES, backoff: float = BACKOFF_S) -> list[dict]:
    """Image records of ``collections`` from ``/images/search/`` (all pages, at most ``limit`` if > 0)."""
    params = {"collections": ",".join(str(c) for c in collections), "limit": page_size}
    images = []
    for image in _pages(session, f"{base_url}/images/search/", params, retries, backoff):
        images.append(image)
        if 0 < limit <= len(images):
            break
    return images


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected(image: dict[str, Any]) -> tuple[str, int | None, dict[str, str]]:
    """URL, stated size and any stated checksums (``sha256``/``md5``) of an image's full-resolution file."""
    full = (image.get("files") or {}).get("full") or {}
    url = full.get("url")
    if not url:
        raise DownloadError(f"{image.get('isic_id')}: the record has no files.full.url")
    size = full.get("size")
    sums = {k: str(full[k]).lower() for k in ("sha256", "md5") if full.get(k)}
    return url, int(size) if size is not None else None, sums


def _fetch(session: requests.Session, url: str, part: Path, size: int | None, sums: dict[str, str]) -> tuple[int, str]:
    """Stream ``url`` into ``part`` and verify it; returns ``(size, sha256)``."""
    resp = session.get(url, stream=True, timeout=TIMEOUT_S)
    try:
        _check_status(resp, url)
        sha, md5, got = hashlib.sha256(), hashlib.md5(), 0
        with part.open("wb") as fh:
            for chunk in resp.iter_content(CHUNK):
                fh.write(chunk)
                sha.update(chunk)
                md5.update(chunk)
                got += len(chunk)
    finally:
        resp.close()
    if size is not None and got != size:
        raise _Retryable(f"got {got} bytes, the archive states {size}")
    for name, digest in (("sha256", sha), ("md5", md5)):
        if name in sums and digest.hexdigest() != sums[name]:
            raise _Retryable(f"{name} mismatch")
    return got, sha.hexdigest()


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
        if isinstance(manifest.get("files"), dict):
            return manifest
    except (OSError, ValueError):
        pass
    return {"files": {}}


def _complete_file_sha256(path: Path, size: int | None, sums: dict[str, str],
                          entry: dict[str, Any] | None) -> str | None:
    """The SHA-256 of ``path`` when it is already the expected file: the size the archive states, the digests it
    gives (``sums``) and the manifest's ``entry``; None when it is not, or when nothing can confirm it."""
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return None
    if entry is None and size is None:
        return None  # nothing to check it against
    sha = _sha256(path)
    if entry is not None and (entry.get("sha256") != sha or entry.get("size") != path.stat().st_size):
        return None
    if "sha256" in sums and sums["sha256"] != sha:
        return None
    if "md5" in sums and hashlib.md5(path.read_bytes()).hexdigest() != sums["md5"]:
        return None
    return sha


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def download_dataset(out: Path, *, dataset: str = "ham10000", collections: list[int] | None = None,
                     base_url: str = DEFAULT_BASE_URL, workers: int = 8, limit: int = 0, page_size: int = PAGE_SIZE,
                     retries: int = RETRIES, backoff: float | None = None, progress: bool | None = None,
                     session_factory: Callable[[], requests.Session] = requests.Session) -> DownloadReport:
    """Download ``dataset`` (or explicit ``collections``) into ``out``, resuming what a previous run left.

    Parameters
    ----------
    out : Path
        Destination folder; ``images/``, ``metadata.csv``, ``metadata.jsonl`` and ``manifest.json`` go there.
    dataset : str
        Key of ``DATASETS``; names the run and picks the collections unless ``collections`` is given.
    collections : list of int, optional
        Archive collection ids, overriding the dataset's.
    base_url : str
        API root, up to and including ``/api/v2``.
    workers : int
        Parallel file downloads.
    limit : int
        Download at most this many images; 0 for all.
    page_size : int
        Records per listing request.
    retries, backoff : int, float
        Extra attempts for 5xx, 429, connection errors and short or mismatching files, waiting
        ``backoff * 2**attempt`` seconds between them.
    progress : bool, optional
        Show a progress bar; by default when stderr is a terminal.

    Raises
    ------
    DownloadError
        If listing the images fails after its retries. Failed files are counted in the report instead.
    """
    backoff = BACKOFF_S if backoff is None else backoff
    base_url = base_url.rstrip("/")
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    local = threading.local()

    def session() -> requests.Session:
        # One session per thread: requests does not promise a shared Session is thread-safe.
        if not hasattr(local, "session"):
            local.session = session_factory()
        return local.session

    if collections is None:
        collections = resolve_collections(session(), base_url, dataset, retries=retries, backoff=backoff)
    images = list_images(session(), base_url, collections, limit=limit, page_size=page_size, retries=retries,
                         backoff=backoff)
    report = DownloadReport(listed=len(images))
    manifest_path = out / "manifest.json"
    manifest = _load_manifest(manifest_path)
    manifest.update(dataset=dataset, base_url=base_url, collections=collections)
    files: dict[str, Any] = manifest["files"]
    lock = threading.Lock()
    stated = [int(((i.get("files") or {}).get("full") or {}).get("size") or 0) for i in images]
    bar = Progress(len(images), progress, total_bytes=sum(stated) or None)
    complete: set[str] = set()

    def save_manifest() -> None:
        _write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))

    def verified(isic_id: str, path: Path, size: int | None, sums: dict[str, str]) -> bool:
        entry = files.get(isic_id)
        sha = _complete_file_sha256(path, size, sums, entry)
        if sha is None:
            return False
        if entry is None:
            # Complete by size (a rename only follows verification) but missing from a manifest that was
            # not saved before an interruption: adopt it.
            with lock:
                files[isic_id] = {"file": f"images/{isic_id}.jpg", "size": path.stat().st_size, "sha256": sha}
        return True

    def one(image: dict[str, Any]) -> None:
        isic_id = str(image.get("isic_id"))
        path = images_dir / f"{isic_id}.jpg"
        part = path.with_name(path.name + ".part")
        outcome, got, size = "failed", 0, None
        try:
            url, size, sums = _expected(image)
            if verified(isic_id, path, size, sums):
                outcome = "skipped"
            else:
                with lock:
                    files.pop(isic_id, None)
                got, sha = _with_retries(f"{isic_id}: GET {url}", lambda: _fetch(session(), url, part, size, sums),
                                         retries, backoff)
                os.replace(part, path)
                with lock:
                    files[isic_id] = {"file": f"images/{isic_id}.jpg", "size": got, "sha256": sha}
                outcome = "downloaded"
        except (DownloadError, OSError) as err:
            part.unlink(missing_ok=True)
            with lock:
                report.errors.append(str(err))
            sys.stderr.write(f"\n  failed: {err}\n")
        with lock:
            setattr(report, outcome, getattr(report, outcome) + 1)
            report.bytes += got
            if outcome != "failed":
                complete.add(isic_id)
            if (report.downloaded + report.skipped + report.failed) % MANIFEST_EVERY == 0:
                save_manifest()
        # A skipped file's bytes are not fetched: they leave the total rather than inflate the rate.
        if outcome == "skipped":
            bar.skip(size or 0)
        else:
            bar.step(got)

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(one, images))
    finally:
        with lock:
            save_manifest()

    kept = [image for image in images if str(image.get("isic_id")) in complete]
    with (out / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        label_set = "ham7" if dataset == "ham10000" else "isic8"
        for image in kept:
            row = metadata_row(image)
            writer.writerow({**row, "image_id": row["isic_id"], "dx": row[label_set]})
    # The full records minus their file URLs, which are short-lived signed links.
    _write_atomic(out / "metadata.jsonl", "".join(json.dumps({k: v for k, v in image.items() if k != "files"},
                                                             sort_keys=True) + "\n" for image in kept))
    return report


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m tools.download_isic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="ham10000",
                        help="which public dataset (default: ham10000)")
    parser.add_argument("--out", required=True, type=Path,
                        help="destination folder (images/, metadata.csv, manifest.json); a re-run resumes")
    parser.add_argument("--collection", type=int, action="append",
                        help="archive collection id (repeatable); overrides the dataset's collections")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help=f"ISIC Archive API root (default: {DEFAULT_BASE_URL})")
    parser.add_argument("--workers", type=_positive, default=8, help="parallel downloads (default: 8)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    parser.add_argument("--page-size", type=_positive, default=PAGE_SIZE,
                        help=f"records per listing request (default: {PAGE_SIZE})")
    parser.add_argument("--retries", type=int, default=RETRIES,
                        help=f"extra attempts per request after a 5xx, 429 or dropped connection (default: {RETRIES})")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise ToolError(f"--out {args.out} is a file, not a folder")
    try:
        report = download_dataset(args.out, dataset=args.dataset, collections=args.collection,
                                  base_url=args.base_url, workers=args.workers, limit=args.limit,
                                  page_size=args.page_size, retries=args.retries)
    except DownloadError as err:
        raise ToolError(str(err)) from err
    except OSError as err:
        raise ToolError(f"cannot write under {args.out}: {err.strerror or err}") from err
    print(f"listed {report.listed}, downloaded {report.downloaded}, skipped {report.skipped}, "
          f"failed {report.failed}, {report.bytes} bytes")
    if not report.listed:
        what = f"collections {args.collection}" if args.collection else f"dataset {args.dataset}"
        raise ToolError(f"the archive listed no images for {what}: check --collection / --dataset and --base-url")
    if report.failed:
        raise ToolError(f"{report.failed} file(s) failed; run the command again to resume")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
