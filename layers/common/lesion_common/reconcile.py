"""Which uploads under ``incoming/`` have not ended in VALIDATED, DUPLICATE or QUARANTINED, and re-driving them.

Validation runs once per S3 "Object Created" event; an event can still be lost for good (Lambda throttled past
EventBridge's 24 hours of retries, a failed event left in the failed-events queue past its 14 days, a bug). This
module compares the bucket with the manifest table, so that such an upload is found instead of silently missing
from training (the check_uploads function every hour, ``python -m tools.reconcile`` on demand).

An image object (:func:`lesion_common.uploads.route` ``image``) is *reconciled* when:

- the manifest item of its file name (:func:`lesion_common.uploads.image_id_for`) records it: ``source_key`` is the
  object's key, or the item holds the same bytes (``source_sha256``: the same picture uploaded under the same name in
  another folder, which the item stands for, see :func:`lesion_common.manifest.holds_other_upload`), and its status
  is final (:data:`lesion_common.manifest.FINAL_STATUSES`);
- or that name belongs to another upload and the item of its alternate id
  (:func:`lesion_common.uploads.alternate_id_for` of the name and the sha256 of the object's bytes) records it so;
- or it was quarantined without an item by design: a file name that is no usable image id, or a file over the size
  limit whose name another upload holds (no bytes were read to tell them apart). Its
  ``quarantine/<path>.reason.json`` says so (``reason_code`` in :data:`QUARANTINED_WITHOUT_ITEM`).

Anything else is unreconciled, with why (:data:`NO_ITEM`, :data:`NOT_FINAL`, :data:`OTHER_UPLOAD`). Validation writes
the item once, at the end, so an upload "stuck in progress" shows as no item, or as a ``LABEL_ONLY`` item (a label
file named it, its picture's event was lost). Objects newer than the grace period are still in flight and skipped.
Label files (``.csv``) are not tracked per file in the manifest (their rows are): they are counted, not checked.

The check is per key: an object replaced under the same key counts as its earlier record (uploads under
``incoming/`` are never replaced by the pipeline; a replacement has its own event).

Cost of one run, whatever the archive size: ``incoming/`` keeps uploads for ``UploadRetentionDays`` (a lifecycle
rule), so for ``N`` uploads of that window a run makes ``ceil(N / 1000)`` ListObjectsV2 requests and
``ceil(N / 100)`` BatchGetItem requests (N eventually consistent item reads, 0.5 read unit each for items under
4 KB); only an object whose file name another upload holds is read (one GetObject, to hash it, plus its share of a
BatchGetItem for its alternate id), and a quarantine reason file only for an object no item records.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from botocore.exceptions import ClientError

from lesion_common.aws_errors import error_code
from lesion_common.labels import is_valid_image_id
from lesion_common.manifest import FINAL_STATUSES, KEY_ATTRIBUTE, holds_other_upload
from lesion_common.uploads import INCOMING, REASON_SUFFIX, alternate_id_for, image_id_for, quarantine_key_for, route

GRACE: Final = timedelta(minutes=15)
# BatchGetItem's limit of keys a request.
BATCH_KEYS: Final = 100
# Objects hashed at once (those whose name another upload holds); within botocore's 10 pooled connections.
READ_WORKERS: Final = 8
# Unprocessed keys (throttling) are asked again after 50 ms, 100 ms, ... (AWS: retry with exponential backoff).
_BACKOFF_S: Final = 0.05
_BACKOFF_TRIES: Final = 10
# What validate_image quarantines without writing an item (lesion_imaging.intake): there is no id to write it under.
QUARANTINED_WITHOUT_ITEM: Final = frozenset({"invalid_image_id", "file_too_large"})
# CopyObject's limit: a larger object cannot be re-driven by a copy onto itself.
MAX_COPY_BYTES: Final = 5 * 1024**3

Reason = Literal["no_item", "not_final", "other_upload"]
NO_ITEM: Final = "no_item"
NOT_FINAL: Final = "not_final"
OTHER_UPLOAD: Final = "other_upload"
REASONS: Final = (NO_ITEM, NOT_FINAL, OTHER_UPLOAD)


class ManifestThrottledError(RuntimeError):
    """BatchGetItem kept returning unprocessed keys after every backoff (the table is throttled)."""


def _quoted(etag: str) -> str:
    """An ETag as an If-Match condition: quoted, the entity-tag form (RFC 9110) S3 returns it in."""
    return f'"{etag}"'


@dataclass(frozen=True)
class Listed:
    """An object under ``incoming/`` as ListObjectsV2 returns it (``etag`` without its quotes)."""

    key: str
    size: int
    etag: str
    last_modified: datetime


@dataclass(frozen=True)
class Unreconciled:
    """An upload no final manifest item records: ``image_id`` is the id looked up last, ``status`` its item's."""

    key: str
    size: int
    etag: str
    image_id: str
    reason: Reason
    status: str | None = None
    detail: str = ""


@dataclass
class Report:
    """What a run found, and the requests it made."""

    images: int = 0  # image objects checked
    recent: int = 0  # image objects newer than the grace period: in flight, not checked
    label_files: int = 0  # .csv objects: not tracked per file in the manifest
    reconciled: int = 0
    unreconciled: list[Unreconciled] = field(default_factory=list)
    list_requests: int = 0
    batch_requests: int = 0
    objects_read: int = 0  # objects hashed for their alternate id
    reason_files_read: int = 0

    def by_reason(self) -> dict[str, int]:
        """The number of unreconciled objects of each reason (every reason, 0 included)."""
        counts = dict.fromkeys(REASONS, 0)
        for u in self.unreconciled:
            counts[u.reason] += 1
        return counts


def list_incoming(s3: Any, bucket: str, report: Report) -> Iterator[Listed]:
    """Every object under ``incoming/``, a ListObjectsV2 page (1,000 keys) at a time."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": INCOMING}
    while True:
        page = s3.list_objects_v2(**kwargs)
        report.list_requests += 1
        for obj in page.get("Contents", []):
            yield Listed(obj["Key"], int(obj.get("Size", 0)), str(obj.get("ETag", "")).strip('"'),
                         obj["LastModified"])
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def get_items(ddb: Any, table: str, image_ids: Iterable[str], report: Report,
              sleep: Callable[[float], None] = time.sleep) -> dict[str, dict[str, str]]:
    """The manifest items of ``image_ids`` that exist (what reconciling reads of them), BatchGetItem 100 keys at a time.

    Keys DynamoDB leaves unprocessed (throttling) are asked again with exponential backoff.

    Raises
    ------
    ManifestThrottledError
        Keys were still unprocessed after every backoff.
    """
    ids = sorted(set(image_ids))  # a request may not name a key twice
    found: dict[str, dict[str, str]] = {}
    for start in range(0, len(ids), BATCH_KEYS):
        request: dict[str, Any] = {table: {
            "Keys": [{KEY_ATTRIBUTE: {"S": i}} for i in ids[start : start + BATCH_KEYS]],
            "ProjectionExpression": "#id, #st, #src, #sha",
            "ExpressionAttributeNames": {"#id": KEY_ATTRIBUTE, "#st": "status", "#src": "source_key",
                                         "#sha": "source_sha256"},
        }}
        for attempt in range(_BACKOFF_TRIES + 1):
            if attempt:
                sleep(_BACKOFF_S * 2 ** (attempt - 1))
            resp = ddb.batch_get_item(RequestItems=request)
            report.batch_requests += 1
            for item in resp.get("Responses", {}).get(table, []):
                plain = {k: str(next(iter(v.values()))) for k, v in item.items()}
                found[plain[KEY_ATTRIBUTE]] = plain
            request = resp.get("UnprocessedKeys") or {}
            if not request:
                break
        else:
            raise ManifestThrottledError(f"BatchGetItem on {table} left keys unprocessed after {_BACKOFF_TRIES} "
                                         "backoffs; the next run (or Lambda's retry) asks again")
    return found


def _sha256_of(s3: Any, bucket: str, obj: Listed) -> str | None:
    """The sha256 of the object's bytes, read in 1 MiB chunks; None when it is gone or was replaced since listed."""
    try:
        resp = s3.get_object(Bucket=bucket, Key=obj.key, IfMatch=_quoted(obj.etag))
    except ClientError as err:
        if error_code(err) in ("NoSuchKey", "404", "PreconditionFailed", "412"):
            return None
        raise
    digest = hashlib.sha256()
    body = resp["Body"]
    try:
        for chunk in body.iter_chunks(1024 * 1024):
            digest.update(chunk)
    finally:
        body.close()
    return digest.hexdigest()


def quarantined_without_item(s3: Any, bucket: str, key: str, report: Report) -> str | None:
    """The ``reason_code`` of ``quarantine/<path>.reason.json`` when it is one validation writes no item for."""
    report.reason_files_read += 1
    try:
        resp = s3.get_object(Bucket=bucket, Key=quarantine_key_for(key) + REASON_SUFFIX)
    except ClientError as err:
        if error_code(err) in ("NoSuchKey", "404"):
            return None
        raise
    try:
        reason = json.loads(resp["Body"].read())
    except ValueError:
        return None
    if not isinstance(reason, dict) or reason.get("source_key") != key:
        return None
    code = reason.get("reason_code")
    return str(code) if code in QUARANTINED_WITHOUT_ITEM else None


Verdict = Literal["ok", "other", "open"]


def _verdict(obj: Listed, image_id: str, item: dict[str, str] | None,
             sha256: str | None) -> tuple[Verdict, Unreconciled | None]:
    """What the item of ``image_id`` says of ``obj``: reconciled (``ok``), another upload's (``other``: with
    ``sha256`` None, any other key), or not (``open``, with why)."""
    if item is None:
        return "open", Unreconciled(obj.key, obj.size, obj.etag, image_id, NO_ITEM,
                                    detail=f"no manifest item {image_id}")
    if holds_other_upload(item, obj.key, sha256):
        return "other", None
    status = item.get("status")
    if status in FINAL_STATUSES and "source_key" in item:
        return "ok", None
    recorded = "" if "source_key" in item else " (no upload recorded in it)"
    return "open", Unreconciled(obj.key, obj.size, obj.etag, image_id, NOT_FINAL, status,
                                f"item {image_id} is {status or 'without status'}{recorded}")


class _Checker:
    """One run's state: objects wait in batches of distinct names for their BatchGetItem."""

    def __init__(self, s3: Any, ddb: Any, bucket: str, table: str, report: Report,
                 sleep: Callable[[float], None]):
        self.s3, self.ddb, self.bucket, self.table, self.report, self.sleep = s3, ddb, bucket, table, report, sleep
        self.pending: dict[str, list[Listed]] = {}
        # (object, its file name, that name's item) where the item holds another key: hashed in batches
        self.others: list[tuple[Listed, str, dict[str, str]]] = []

    def add(self, obj: Listed) -> None:
        name = image_id_for(obj.key)
        if not is_valid_image_id(name):  # validation quarantines it without an item: nothing to look up
            self._settle_without_item(obj, name, NO_ITEM, f"file name {name!r} is not a usable image id")
            return
        self.pending.setdefault(name, []).append(obj)
        if len(self.pending) >= BATCH_KEYS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            items = get_items(self.ddb, self.table, self.pending, self.report, self.sleep)
            for name, objs in self.pending.items():
                for obj in objs:
                    self._add_verdict(obj, name, items.get(name))
            self.pending = {}
        if len(self.others) >= BATCH_KEYS:
            self.flush_others()

    def _add_verdict(self, obj: Listed, name: str, item: dict[str, str] | None) -> None:
        # Without the bytes, another key is enough to look further (the same bytes are checked once hashed).
        verdict, open_ = _verdict(obj, name, item, None)
        if verdict == "ok":
            self.report.reconciled += 1
        elif verdict == "other":
            assert item is not None
            self.others.append((obj, name, item))
        elif open_ is not None:
            self.report.unreconciled.append(open_)

    def flush_others(self) -> None:
        """Hash the objects whose name holds another key, then look their alternate ids up."""
        if not self.others:
            return
        others, self.others = self.others, []
        with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
            hashes = list(pool.map(lambda entry: _sha256_of(self.s3, self.bucket, entry[0]), others))
        self.report.objects_read += len(others)
        alternates = {alternate_id_for(name, sha) for (_, name, _), sha in zip(others, hashes, strict=True) if sha}
        items = get_items(self.ddb, self.table, alternates, self.report, self.sleep)
        for (obj, name, item), sha in zip(others, hashes, strict=True):
            if sha is None:  # gone (lifecycle) or replaced since it was listed: nothing to reconcile
                continue
            if _verdict(obj, name, item, sha)[0] == "ok":  # the same bytes from another folder: the item's picture
                self.report.reconciled += 1
                continue
            alternate = alternate_id_for(name, sha)
            verdict, open_ = _verdict(obj, alternate, items.get(alternate), sha)
            if verdict == "ok":
                self.report.reconciled += 1
            elif open_ is not None and open_.reason == NOT_FINAL:
                self.report.unreconciled.append(open_)
            else:
                self._settle_without_item(obj, alternate, OTHER_UPLOAD, f"{name} holds {item.get('source_key')}; "
                                                                        f"no item {alternate} records this upload")

    def _settle_without_item(self, obj: Listed, image_id: str, reason: Reason, detail: str) -> None:
        """Reconciled when validation quarantined it without an item; otherwise unreconciled for ``reason``."""
        if quarantined_without_item(self.s3, self.bucket, obj.key, self.report):
            self.report.reconciled += 1
        else:
            self.report.unreconciled.append(Unreconciled(obj.key, obj.size, obj.etag, image_id, reason,
                                                         detail=detail))


def reconcile(s3: Any, ddb: Any, bucket: str, table: str, *, grace: timedelta = GRACE, now: datetime | None = None,
              sleep: Callable[[float], None] = time.sleep) -> Report:
    """Check every image object under ``incoming/`` older than ``grace`` against the manifest (module docstring).

    Parameters
    ----------
    s3, ddb : botocore clients
        S3 and DynamoDB (low-level clients).
    bucket, table : str
        The data bucket and the manifest table.
    grace : timedelta
        Objects modified more recently are in flight (their event may not have been handled yet): skipped.
    now : datetime, optional
        The time the grace period counts back from (UTC; default now).

    Returns
    -------
    Report
        The unreconciled objects in listing order of their batches, and the counts.
    """
    report = Report()
    cutoff = (now or datetime.now(UTC)) - grace
    checker = _Checker(s3, ddb, bucket, table, report, sleep)
    for obj in list_incoming(s3, bucket, report):
        kind = route(obj.key)
        if kind == "csv":
            report.label_files += 1
            continue
        if kind != "image":
            continue
        if obj.last_modified > cutoff:
            report.recent += 1
            continue
        report.images += 1
        checker.add(obj)
    checker.flush()
    checker.flush_others()
    return report


def redrive(s3: Any, bucket: str, obj: Unreconciled, now: datetime | None = None) -> str:
    """Make S3 send the object's "Object Created" event again: copy it onto itself, bytes unchanged.

    ``MetadataDirective=REPLACE`` is what lets an object be copied onto itself; the replacement keeps its content
    type, content headers, user metadata, storage class and encryption, and adds ``redriven-at``. The copy is
    conditional on the ETag listed, so that an object replaced since (which had its own event) is left alone. The
    event runs the normal validation path with its own permissions. On the versioned data bucket the copy is a new
    version (the previous one expires with the noncurrent versions); the ``incoming/`` expiry counts from the copy.

    Returns
    -------
    str
        ``redriven``, ``changed`` (replaced or deleted since listed), or ``too_large`` (over CopyObject's 5 GB).
    """
    if obj.size > MAX_COPY_BYTES:
        return "too_large"
    try:
        head = s3.head_object(Bucket=bucket, Key=obj.key, IfMatch=_quoted(obj.etag))
    except ClientError as err:
        if error_code(err) in ("NoSuchKey", "404", "PreconditionFailed", "412"):
            return "changed"
        raise
    stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    kwargs: dict[str, Any] = {
        "Bucket": bucket, "Key": obj.key, "CopySource": {"Bucket": bucket, "Key": obj.key},
        "CopySourceIfMatch": _quoted(obj.etag), "MetadataDirective": "REPLACE",
        "Metadata": {**head.get("Metadata", {}), "redriven-at": stamp},
    }
    for header in ("ContentType", "CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage"):
        if head.get(header):
            kwargs[header] = head[header]
    if head.get("StorageClass"):  # HeadObject leaves it out for STANDARD
        kwargs["StorageClass"] = head["StorageClass"]
    if head.get("ServerSideEncryption") in ("aws:kms", "aws:kms:dsse"):
        kwargs["ServerSideEncryption"] = head["ServerSideEncryption"]
        if head.get("SSEKMSKeyId"):
            kwargs["SSEKMSKeyId"] = head["SSEKMSKeyId"]
        if head.get("BucketKeyEnabled") is not None:
            kwargs["BucketKeyEnabled"] = head["BucketKeyEnabled"]
    try:
        s3.copy_object(**kwargs)
    except ClientError as err:
        if error_code(err) in ("NoSuchKey", "404", "PreconditionFailed", "412"):
            return "changed"
        raise
    return "redriven"
