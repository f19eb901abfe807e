"""Validate every upload to the data bucket's ``incoming/`` prefix (EventBridge S3 "Object Created").

An image is decoded and checked (``lesion_imaging.validation``); a good one is written, clean, to
``validated/<sha256 of the clean JPEG>.jpg`` and recorded in the manifest table as VALIDATED, or as DUPLICATE
when the same or nearly the same picture is already there under another id. A bad one is copied with its reason
to ``quarantine/`` and recorded as QUARANTINED. A metadata CSV (HAM10000 or ISIC 2019 ground truth) sets labels
and lesions on the manifest items; a bad row is skipped and reported, and the file is copied to ``quarantine/``
with the rejected rows. The upload itself is never deleted or changed.

The image id is the file name. When that name already stands for a different picture (another key and other
bytes: the same file name in two folders), the upload gets its own item, ``<name>-<12 hex of its sha256>``,
claimed with a conditional write so that two such uploads at once cannot both take the name. The clean copy's key
is content-derived, so two pictures can never overwrite each other in ``validated/``.

Duplicate search reads a bounded number of items whatever the archive size (a separate table, HASH_INDEX_TABLE):
an exact copy by a conditional write of ``sha256#<clean sha256>`` (of two copies at the same instant one wins,
the other is a DUPLICATE of it), a near copy through the ``band#<i>#<slice>`` buckets of its pHash
(:mod:`lesion_imaging.bands`): 1 write + at most 1 read for the claim, then the 264 bucket items of 8 bands x
(own slice + 32 one bit away) in 3 BatchGetItem requests, each bucket holding at most ``BUCKET_CAP`` images.
Manifest items carry ``status_shard`` (``<status>#<n>``), the partition key of the ``by-status-shard`` index, so
that no index partition takes every write of a bulk upload.

Every outcome is idempotent: the manifest item is keyed by the image id and written with expressions that give
the same item whatever the order or repetition of events. Unexpected AWS errors propagate so that Lambda retries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Final, Literal
from urllib.parse import unquote_plus

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from boto3.dynamodb.types import TypeSerializer
from botocore.config import Config
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lesion_common.errors import InvalidRequestError
from lesion_common.labels import (
    ALL_CODES,
    DuplicateColumnError,
    MetadataFormatError,
    classes_for,
    is_valid_image_id,
    parse_metadata_csv,
)
from lesion_common.splits import assign_split
from lesion_imaging.bands import BANDS, band_keys, probe_keys
from lesion_imaging.validation import (
    NEAR_DUPLICATE_BITS,
    CleanImage,
    ImageValidationError,
    ValidationLimits,
    hamming,
    validate_image_bytes,
)

logger = Logger()
metrics = Metrics()

DATA_BUCKET = os.environ["DATA_BUCKET"]
MANIFEST_TABLE = os.environ["MANIFEST_TABLE"]
HASH_INDEX_TABLE = os.environ["HASH_INDEX_TABLE"]
STATUS_SHARDS = int(os.environ["STATUS_SHARDS"])
LABEL_SET = os.environ["LABEL_SET"]
LIMITS = ValidationLimits(
    min_side=int(os.environ["MIN_IMAGE_SIDE"]),
    max_side=int(os.environ["MAX_IMAGE_SIDE"]),
    max_pixels=int(os.environ["MAX_IMAGE_PIXELS"]),
    max_aspect_ratio=float(os.environ["MAX_ASPECT_RATIO"]),
    max_bytes=int(os.environ["MAX_UPLOAD_BYTES"]),
)

# A metadata CSV holds up to ~25k rows (ISIC 2019); one UpdateItem each, so they go out in parallel.
CSV_WORKERS: Final = 8
s3 = boto3.client("s3")
dynamodb = boto3.client("dynamodb", config=Config(max_pool_connections=CSV_WORKERS + 2))

INCOMING: Final = "incoming/"
VALIDATED_PREFIX: Final = "validated/"
QUARANTINE_PREFIX: Final = "quarantine/"
# Most images one band bucket holds (one item, its members a string set of "<phash><image id>": 32 members are
# under 4 KB, one read unit). A bucket holds the images whose hash has one 32-bit slice in common; on HAM10000
# none holds more than 3 (RESULTS.md), so a full one means a flood of near-identical frames: a further image is
# left out of that band (still in the other seven), and it is logged and counted (HashBucketFull).
BUCKET_CAP: Final = 32
SHA_KEY_PREFIX: Final = "sha256#"
SHA_SORT_KEY: Final = "owner"
BUCKET_SORT_KEY: Final = "bucket"
# BatchGetItem's limit of keys a request.
BATCH_KEYS: Final = 100
VALIDATED: Final = "VALIDATED"
DUPLICATE: Final = "DUPLICATE"
QUARANTINED: Final = "QUARANTINED"
LABEL_ONLY: Final = "LABEL_ONLY"
# An image id that has to tell two pictures of one file name apart: "<name>-" + this many hex digits of the
# upload's sha256 (48 bits), within the 128 characters of an id.
ID_SUFFIX_HEX: Final = 12
# CopyObject's limit; a larger upload is left where it is and only its reason is written.
MAX_COPY_BYTES: Final = 5 * 1024**3
MAX_REPORTED_ROWS: Final = 1000

_serialize = TypeSerializer().serialize

Outcome = dict[str, Any]


class S3Bucket(BaseModel):
    """``detail.bucket``."""

    name: str = Field(min_length=1)


class S3Object(BaseModel):
    """``detail.object``; size, etag and version are absent on some event sources, so optional."""

    model_config = ConfigDict(populate_by_name=True)
    key: str = Field(min_length=1)
    size: int | None = Field(default=None, ge=0)
    etag: str | None = None
    version_id: str | None = Field(default=None, alias="version-id")


class ObjectCreatedDetail(BaseModel):
    """``detail`` of an S3 event delivered through EventBridge."""

    bucket: S3Bucket
    obj: S3Object = Field(alias="object")


class ObjectCreatedEvent(BaseModel):
    """The EventBridge event this function is invoked with (other fields are ignored)."""

    source: Literal["aws.s3"]
    detail_type: Literal["Object Created"] = Field(alias="detail-type")
    detail: ObjectCreatedDetail


@dataclass(frozen=True)
class Settings:
    """What the processing functions need from the configuration."""

    bucket: str
    table: str
    label_set: str
    limits: ValidationLimits
    hash_table: str = ""
    status_shards: int = 1
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS
    bands: int = BANDS
    bucket_cap: int = BUCKET_CAP

    def __post_init__(self) -> None:
        classes_for(self.label_set)  # an unknown label set fails here (the cold start), not on every upload
        if not self.hash_table or self.status_shards < 1:
            raise ValueError("a hash index table and at least one status shard are needed")

    @property
    def classes(self) -> frozenset[str]:
        """The label set's class codes."""
        return frozenset(classes_for(self.label_set))


@dataclass(frozen=True)
class Upload:
    """The object an event names."""

    key: str
    size: int | None = None
    etag: str | None = None
    version_id: str | None = None


@dataclass(frozen=True)
class Fetched:
    """An upload as read: ``data`` is None when it is over the size limit (then it is not downloaded)."""

    key: str
    size: int
    etag: str | None
    version_id: str | None
    data: bytes | None


SETTINGS = Settings(bucket=DATA_BUCKET, table=MANIFEST_TABLE, label_set=LABEL_SET, limits=LIMITS,
                    hash_table=HASH_INDEX_TABLE, status_shards=STATUS_SHARDS)


# ---------------------------------------------------------------------------------------------------- keys


def route(key: str) -> Literal["ignore", "csv", "image"]:
    """What an uploaded key is: only ``incoming/`` matters, and only the extension ``.csv`` is special.

    Images are not recognised by extension: the content decides, so a ``.gif`` or a nameless file is an image
    candidate that validation refuses with a reason.
    """
    if not key.startswith(INCOMING) or key.endswith("/"):
        return "ignore"
    return "csv" if key.lower().endswith(".csv") else "image"


def image_id_for(key: str) -> str:
    """The image id: the file name without its extension (``incoming/x/ISIC_0024306.jpg`` -> ``ISIC_0024306``)."""
    return PurePosixPath(key).stem


def alternate_id_for(image_id: str, source_sha256: str) -> str:
    """The id of an upload whose file name already stands for another picture: ``<name>-<12 hex of sha256>``."""
    return f"{image_id[: 127 - ID_SUFFIX_HEX]}-{source_sha256[:ID_SUFFIX_HEX]}"


def clean_key_for(sha256: str) -> str:
    """``validated/<sha256>.jpg``: derived from the clean bytes, so one picture has one key and no other picture
    can overwrite it; a redelivered event writes the same bytes again."""
    return f"{VALIDATED_PREFIX}{sha256}.jpg"


def label_for(key: str) -> str | None:
    """The class code from ``incoming/<anything>/<label>/<file>``, when ``<label>`` is a known code (any set)."""
    parts = key.split("/")
    if len(parts) >= 4 and parts[-2].lower() in ALL_CODES:
        return parts[-2].lower()
    return None


def source_for(key: str) -> str:
    """The dataset name: the first folder under ``incoming/``, or ``upload`` for a file directly in it."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[1] else "upload"


def quarantine_key_for(key: str) -> str:
    """``incoming/a/b.jpg`` -> ``quarantine/a/b.jpg``."""
    return QUARANTINE_PREFIX + key.removeprefix(INCOMING)


def status_shard(status: str, image_id: str, shards: int) -> str:
    """``<status>#<n>``, ``n`` from a hash of the image id: the partition key of the ``by-status-shard`` index.

    A bulk upload writes thousands of VALIDATED items a second; keyed by status alone they would all land on
    one index partition (and throttle the table through it). Readers query every shard of a status.
    """
    n = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:4], "big") % shards
    return f"{status}#{n}"


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds, the manifest's time format."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------------------- S3


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def fetch(client: Any, bucket: str, upload: Upload, max_bytes: int) -> Fetched | None:
    """Read the upload, pinned to the event's version (or ETag) so that what is checked is what was uploaded.

    Returns
    -------
    Fetched or None
        None when the object is gone or was replaced since the event (the replacement has its own event).
    """
    pin: dict[str, str] = {}
    if upload.version_id:
        pin["VersionId"] = upload.version_id
    elif upload.etag:
        pin["IfMatch"] = upload.etag
    # S3 notifications URL-encode keys ("a b.jpg" -> "a+b.jpg"); EventBridge's do not. Try as given, then decoded.
    candidates = [upload.key] + ([unquote_plus(upload.key)] if unquote_plus(upload.key) != upload.key else [])
    for key in candidates:
        try:
            resp = client.get_object(Bucket=bucket, Key=key, **pin)
        except ClientError as err:
            code = _error_code(err)
            if code in ("NoSuchKey", "404", "NoSuchVersion"):
                continue
            if code in ("PreconditionFailed", "412"):
                logger.info("upload replaced since the event; its own event will handle it", extra={"key": key})
                return None
            raise
        body = resp["Body"]
        size = int(resp["ContentLength"])
        try:
            data = None if size > max_bytes else body.read()
        finally:
            body.close()
        return Fetched(key, size, resp.get("ETag"), resp.get("VersionId"), data)
    logger.warning("upload no longer exists; nothing to validate", extra={"key": upload.key})
    return None


def quarantine(
    client: Any,
    bucket: str,
    fetched: Fetched,
    reason_code: str,
    message: str,
    checked_at: str,
    details: Mapping[str, Any] | None = None,
) -> str | None:
    """Copy the upload to ``quarantine/`` and write ``<copy>.reason.json`` beside it.

    Returns
    -------
    str or None
        The quarantine key, or None when the upload was replaced before it could be copied.
    """
    qkey = quarantine_key_for(fetched.key)
    reason: dict[str, Any] = {
        "reason_code": reason_code,
        "message": message,
        "source_key": fetched.key,
        "size": fetched.size,
        "checked_at": checked_at,
        **(details or {}),
    }
    if fetched.size <= MAX_COPY_BYTES:
        source: dict[str, str] = {"Bucket": bucket, "Key": fetched.key}
        pin: dict[str, str] = {}
        if fetched.version_id and fetched.version_id != "null":
            source["VersionId"] = fetched.version_id
        elif fetched.etag:
            pin["CopySourceIfMatch"] = fetched.etag
        try:
            client.copy_object(CopySource=source, Bucket=bucket, Key=qkey, **pin)
        except ClientError as err:
            if _error_code(err) in ("PreconditionFailed", "412"):
                logger.info("upload replaced before quarantine; its own event will handle it", extra={"key": qkey})
                return None
            raise
    else:
        reason["not_copied"] = f"over {MAX_COPY_BYTES} bytes: the upload is left in place, only this reason is written"
    client.put_object(
        Bucket=bucket,
        Key=qkey + ".reason.json",
        Body=json.dumps(reason, indent=2).encode(),
        ContentType="application/json",
    )
    return qkey


# ---------------------------------------------------------------------------------------------------- manifest


def build_update(
    set_values: Mapping[str, Any],
    set_if_absent: Mapping[str, Any] | None = None,
    remove: Iterable[str] = (),
) -> dict[str, Any]:
    """UpdateItem arguments: SET these, SET those only where absent, REMOVE the rest (all names aliased)."""
    names: dict[str, str] = {}
    values: dict[str, Any] = {}
    sets: list[str] = []
    for i, (name, value) in enumerate(set_values.items()):
        names[f"#s{i}"], values[f":s{i}"] = name, _serialize(value)
        sets.append(f"#s{i} = :s{i}")
    for i, (name, value) in enumerate((set_if_absent or {}).items()):
        names[f"#a{i}"], values[f":a{i}"] = name, _serialize(value)
        sets.append(f"#a{i} = if_not_exists(#a{i}, :a{i})")
    removes: list[str] = []
    for i, name in enumerate(n for n in remove if n not in set_values):
        names[f"#r{i}"] = name
        removes.append(f"#r{i}")
    expr = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
    return {"UpdateExpression": expr, "ExpressionAttributeNames": names, "ExpressionAttributeValues": values}


def get_item(client: Any, table: str, image_id: str) -> dict[str, Any] | None:
    """The manifest item, strongly consistent, as plain strings/numbers (only S and N attributes are used)."""
    item = client.get_item(TableName=table, Key={"image_id": {"S": image_id}}, ConsistentRead=True).get("Item")
    if item is None:
        return None
    return {k: next(iter(v.values())) for k, v in item.items()}


def holds_other_upload(item: Mapping[str, Any] | None, source_key: str, source_sha256: str | None) -> bool:
    """Whether a manifest item stands for a different upload: another key and other bytes.

    An item a CSV made (no ``source_key``) is waiting for its picture; the same key is a redelivery or a
    replacement of the file; the same bytes are the same picture from another folder. All of those are this
    upload's to take. ``source_sha256`` None (an upload too large to read) compares by key alone.
    """
    if item is None or "source_key" not in item or item["source_key"] == source_key:
        return False
    return source_sha256 is None or item.get("source_sha256") != source_sha256


def resolve_image_id(
    client: Any, table: str, name: str, source_key: str, source_sha256: str
) -> tuple[str, dict[str, Any] | None]:
    """The manifest id of an upload and its item as it stands: ``name`` (the file name) unless that item stands
    for a different upload (:func:`holds_other_upload`), then :func:`alternate_id_for`."""
    existing = get_item(client, table, name)
    if not holds_other_upload(existing, source_key, source_sha256):
        return name, existing
    other = alternate_id_for(name, source_sha256)
    return other, get_item(client, table, other)


def _claim(update: dict[str, Any], source_key: str, source_sha256: str | None) -> str:
    """Add to ``update`` the names and values of "this item is free or this upload's"; return that condition.

    The test of :func:`holds_other_upload`, made by DynamoDB at the write: of two different pictures with one
    file name written at once, only one gets the name.
    """
    update["ExpressionAttributeNames"]["#claim_key"] = "source_key"
    update["ExpressionAttributeValues"][":claim_key"] = {"S": source_key}
    condition = "attribute_not_exists(#claim_key) OR #claim_key = :claim_key"
    if source_sha256 is not None:
        update["ExpressionAttributeNames"]["#claim_sha"] = "source_sha256"
        update["ExpressionAttributeValues"][":claim_sha"] = {"S": source_sha256}
        condition += " OR #claim_sha = :claim_sha"
    return f"({condition})"


def claim_picture(client: Any, table: str, sha256: str, image_id: str, source_key: str) -> str:
    """Claim the clean bytes ``sha256`` for ``image_id``; return the image id that holds them.

    One item ``sha256#<hex>`` per picture, written with a condition, so that of two copies written at the same
    instant exactly one wins and the other reads the winner: the key lookup that replaces the scan for exact
    copies. The same upload (its key) or the same image id may claim again (redelivered events, a file moved to
    its alternate id, the same bytes re-uploaded under the same name from another folder).
    """
    key = {"pk": {"S": SHA_KEY_PREFIX + sha256}, "sk": {"S": SHA_SORT_KEY}}
    for _ in range(3):
        try:
            client.update_item(
                TableName=table,
                Key=key,
                UpdateExpression="SET #id = :id, #src = :src",
                ConditionExpression="attribute_not_exists(#id) OR #src = :src OR #id = :id",
                ExpressionAttributeNames={"#id": "image_id", "#src": "source_key"},
                ExpressionAttributeValues={":id": {"S": image_id}, ":src": {"S": source_key}},
            )
        except ClientError as err:
            if _error_code(err) != "ConditionalCheckFailedException":
                raise
            owner = client.get_item(TableName=table, Key=key, ConsistentRead=True).get("Item") or {}
            if "image_id" in owner:
                return str(owner["image_id"]["S"])
            continue  # released between the write and the read (see release_picture): claim again
        return image_id
    raise RuntimeError(f"the claim of {sha256} changed hands three times in one upload; Lambda retries")


def release_picture(client: Any, table: str, sha256: str, image_id: str) -> None:
    """Give up the claim of ``image_id`` on ``sha256`` (its upload was replaced by other bytes), so that the next
    copy of those bytes is not called a duplicate of a picture that is gone. Another owner's claim is kept."""
    try:
        client.update_item(
            TableName=table,
            Key={"pk": {"S": SHA_KEY_PREFIX + sha256}, "sk": {"S": SHA_SORT_KEY}},
            UpdateExpression="REMOVE #id, #src",
            ConditionExpression="#id = :id",
            ExpressionAttributeNames={"#id": "image_id", "#src": "source_key"},
            ExpressionAttributeValues={":id": {"S": image_id}},
        )
    except ClientError as err:
        if _error_code(err) != "ConditionalCheckFailedException":
            raise


def read_buckets(client: Any, table: str, keys: list[str]) -> list[dict[str, Any]]:
    """The bucket items of ``keys`` (those that exist), strongly consistent, ``BATCH_KEYS`` keys a request.

    Keys DynamoDB leaves unprocessed (throttling) are asked again; a retry is a further read, and Lambda's own
    retry takes over when the client's retries run out.
    """
    items: list[dict[str, Any]] = []
    for start in range(0, len(keys), BATCH_KEYS):
        request: dict[str, Any] = {table: {
            "Keys": [{"pk": {"S": k}, "sk": {"S": BUCKET_SORT_KEY}} for k in keys[start : start + BATCH_KEYS]],
            "ConsistentRead": True,
            "ProjectionExpression": "members",
        }}
        while request:
            resp = client.batch_get_item(RequestItems=request)
            items.extend(resp.get("Responses", {}).get(table, []))
            request = resp.get("UnprocessedKeys") or {}
    return items


def find_near_duplicate(client: Any, settings: Settings, image_id: str, phash: str) -> tuple[str, int] | None:
    """The nearest indexed (VALIDATED) image within ``near_duplicate_bits`` of ``phash``, ties to the smaller id.

    Looks up the ``bands * 33`` buckets of :func:`lesion_imaging.bands.probe_keys` (3 BatchGetItem requests for
    8 bands), whose members carry their hash, so nothing else is read: a fixed cost whatever the archive size.
    Every stored hash within :func:`lesion_imaging.bands.guaranteed_radius` (15 bits) is found; further ones
    when a band is still within a bit (benchmarks/ingestion/RESULTS.md).
    """
    best: tuple[int, str] | None = None
    for item in read_buckets(client, settings.hash_table, probe_keys(phash, settings.bands)):
        for member in item.get("members", {}).get("SS", []):
            other_hash, other = member[: len(phash)], member[len(phash) :]
            if other == image_id:
                continue
            distance = hamming(phash, other_hash)
            if distance <= settings.near_duplicate_bits and (best is None or (distance, other) < best):
                best = (distance, other)
    return (best[1], best[0]) if best else None


def find_duplicate(
    client: Any, settings: Settings, image_id: str, sha256: str, phash: str, source_key: str
) -> tuple[str, int] | None:
    """The image this one duplicates: the holder of the same clean bytes (distance 0, decided by a conditional
    write, see :func:`claim_picture`), else the nearest pHash in the band index: at most 1 GetItem and
    ``ceil(bands * 33 / 100)`` BatchGetItem requests (3 for 8 bands), whatever the archive size."""
    owner = claim_picture(client, settings.hash_table, sha256, image_id, source_key)
    if owner != image_id:
        return owner, 0
    return find_near_duplicate(client, settings, image_id, phash)


def update_band_index(
    client: Any, settings: Settings, image_id: str, new_phash: str | None, old_phash: str | None
) -> None:
    """Put ``image_id`` in the buckets of ``new_phash`` and take it out of those of ``old_phash`` (idempotent).

    Only VALIDATED images are indexed (a near copy points at the original, not at another copy), so ``new_phash``
    is None for a DUPLICATE, and ``old_phash`` is the hash the item was indexed under before (a replaced upload).
    """
    if old_phash and old_phash != new_phash:
        for bucket in band_keys(old_phash, settings.bands):
            client.update_item(
                TableName=settings.hash_table,
                Key={"pk": {"S": bucket}, "sk": {"S": BUCKET_SORT_KEY}},
                UpdateExpression="DELETE #m :m",
                ExpressionAttributeNames={"#m": "members"},
                ExpressionAttributeValues={":m": {"SS": [old_phash + image_id]}},
            )
    if not new_phash:
        return
    member = new_phash + image_id
    for bucket in band_keys(new_phash, settings.bands):
        try:
            client.update_item(
                TableName=settings.hash_table,
                Key={"pk": {"S": bucket}, "sk": {"S": BUCKET_SORT_KEY}},
                UpdateExpression="ADD #m :m",
                # A member already there (a redelivery) is no growth: only a new one is refused by the cap.
                ConditionExpression="attribute_not_exists(#m) OR size(#m) < :cap OR contains(#m, :one)",
                ExpressionAttributeNames={"#m": "members"},
                ExpressionAttributeValues={":m": {"SS": [member]}, ":cap": {"N": str(settings.bucket_cap)},
                                           ":one": {"S": member}},
            )
        except ClientError as err:
            if _error_code(err) != "ConditionalCheckFailedException":
                raise
            logger.warning("hash bucket full: the image is left out of this band",
                           extra={"bucket": bucket, "image_id": image_id, "cap": settings.bucket_cap})
            metrics.add_metric(name="HashBucketFull", unit=MetricUnit.Count, value=1)


def record_validated(
    client: Any,
    settings: Settings,
    fetched: Fetched,
    image_id: str,
    clean: CleanImage,
    label: str | None,
    duplicate: tuple[str, int] | None,
    validated_at: str,
    claim: bool = False,
) -> bool:
    """Upsert the item of a validated image; lesion and split stay as a CSV set them, else come from the id.

    Returns
    -------
    bool
        False when ``claim`` is set and the item turned out to stand for another upload (nothing written).
    """
    status = DUPLICATE if duplicate else VALIDATED
    values: dict[str, Any] = {
        "status": status,
        "status_shard": status_shard(status, image_id, settings.status_shards),
        "key": clean_key_for(clean.sha256),
        "source_key": fetched.key,
        "sha256": clean.sha256,
        "source_sha256": clean.source_sha256,
        "phash": clean.phash,
        "width": clean.width,
        "height": clean.height,
        "bytes": len(clean.jpeg),
        "source_bytes": fetched.size,
        "validated_at": validated_at,
        "label_set": settings.label_set,
        "source": source_for(fetched.key),
    }
    if label is not None:
        values["label"] = label
    if duplicate:
        values["duplicate_of"], values["duplicate_distance"] = duplicate
    update = build_update(
        values,
        {"lesion_id": image_id, "split": assign_split(image_id)},
        remove=("reason_code", "reason", "quarantine_key", "checked_at", "duplicate_of", "duplicate_distance"),
    )
    if claim:
        update["ConditionExpression"] = _claim(update, fetched.key, clean.source_sha256)
    try:
        client.update_item(TableName=settings.table, Key={"image_id": {"S": image_id}}, **update)
    except ClientError as err:
        if claim and _error_code(err) == "ConditionalCheckFailedException":
            return False
        raise
    return True


def record_quarantined(
    client: Any,
    settings: Settings,
    fetched: Fetched,
    image_id: str,
    reason_code: str,
    message: str,
    quarantine_key: str,
    checked_at: str,
    source_sha256: str | None,
    claim: bool = False,
) -> Literal["recorded", "kept", "taken"]:
    """Mark the item QUARANTINED, unless it already holds a good image (a bad re-upload must not remove it).

    Returns
    -------
    str
        ``recorded``; ``kept`` when the item holds a good image and was left as it was; ``taken`` when ``claim``
        is set and the item stands for another upload (nothing written).
    """
    values: dict[str, Any] = {
        "status": QUARANTINED,
        "status_shard": status_shard(QUARANTINED, image_id, settings.status_shards),
        "reason_code": reason_code,
        "reason": message,
        "source_key": fetched.key,
        "quarantine_key": quarantine_key,
        "source_bytes": fetched.size,
        "checked_at": checked_at,
        "label_set": settings.label_set,
        "source": source_for(fetched.key),
    }
    if source_sha256 is not None:
        values["source_sha256"] = source_sha256
    update = build_update(values, {"lesion_id": image_id, "split": assign_split(image_id)})
    update["ExpressionAttributeNames"]["#status"] = "status"
    update["ExpressionAttributeValues"].update({":keep1": {"S": VALIDATED}, ":keep2": {"S": DUPLICATE}})
    condition = "(attribute_not_exists(#status) OR NOT #status IN (:keep1, :keep2))"
    if claim:
        condition += " AND " + _claim(update, fetched.key, source_sha256)
    try:
        client.update_item(
            TableName=settings.table, Key={"image_id": {"S": image_id}}, ConditionExpression=condition, **update
        )
    except ClientError as err:
        if _error_code(err) != "ConditionalCheckFailedException":
            raise
        if claim and holds_other_upload(get_item(client, settings.table, image_id), fetched.key, source_sha256):
            return "taken"
        return "kept"
    return "recorded"


# ---------------------------------------------------------------------------------------------------- processing


def _quarantine_image(
    s3_client: Any,
    ddb: Any,
    settings: Settings,
    fetched: Fetched,
    name: str,
    image_id: str | None,
    reason_code: str,
    message: str,
    source_sha256: str | None,
) -> Outcome:
    """Quarantine an image upload and mark its manifest item.

    ``name`` is the file name; ``image_id`` the resolved id (:func:`resolve_image_id`), or None when no item is
    to be written (no usable id, or the name stands for another upload and there are no bytes to tell them apart).
    """
    checked_at = utc_now()
    qkey = quarantine(s3_client, settings.bucket, fetched, reason_code, message, checked_at)
    if qkey is None:
        return {"outcome": "superseded", "key": fetched.key, "image_id": image_id or name}
    result = "not_recorded"
    if image_id is not None:
        result = record_quarantined(
            ddb, settings, fetched, image_id, reason_code, message, qkey, checked_at, source_sha256,
            claim=image_id == name,
        )
        if result == "taken" and source_sha256 is not None:  # another picture took the name since it was read
            image_id = alternate_id_for(name, source_sha256)
            result = record_quarantined(
                ddb, settings, fetched, image_id, reason_code, message, qkey, checked_at, source_sha256
            )
    recorded = result == "recorded"
    logger.warning(
        "upload quarantined",
        extra={"key": fetched.key, "image_id": image_id or name, "reason_code": reason_code, "reason": message,
               "manifest_updated": recorded},
    )
    return {
        "outcome": "quarantined",
        "key": fetched.key,
        "image_id": image_id or name,
        "reason_code": reason_code,
        "reason": message,
        "quarantine_key": qkey,
        "manifest_updated": recorded,
    }


def process_image(s3_client: Any, ddb: Any, settings: Settings, upload: Upload) -> Outcome:
    """Validate one uploaded image and record the result (see the module docstring)."""
    name = image_id_for(upload.key)
    fetched = fetch(s3_client, settings.bucket, upload, settings.limits.max_bytes)
    if fetched is None:
        return {"outcome": "gone", "key": upload.key, "image_id": name}
    name = image_id_for(fetched.key)  # the key may have needed URL-decoding
    if not is_valid_image_id(name):
        return _quarantine_image(
            s3_client, ddb, settings, fetched, name, None, "invalid_image_id",
            f"file name {name!r} is not a usable image id ([A-Za-z0-9][A-Za-z0-9_.-]{{0,127}})", None,
        )
    if fetched.data is None:
        taken = holds_other_upload(get_item(ddb, settings.table, name), fetched.key, None)
        return _quarantine_image(
            s3_client, ddb, settings, fetched, name, None if taken else name, "file_too_large",
            f"{fetched.size} bytes, limit {settings.limits.max_bytes}", None,
        )
    source_sha256 = hashlib.sha256(fetched.data).hexdigest()
    image_id, existing = resolve_image_id(ddb, settings.table, name, fetched.key, source_sha256)
    if (
        existing is not None
        and existing.get("source_sha256") == source_sha256
        and existing.get("source_key") == fetched.key
        and existing.get("status") in (VALIDATED, DUPLICATE, QUARANTINED)
    ):
        logger.info("same upload already processed", extra={"key": fetched.key, "status": existing["status"]})
        if existing["status"] == VALIDATED and existing.get("phash"):
            # The index is written after the item: a run that stopped in between left it out (idempotent puts).
            update_band_index(ddb, settings, image_id, str(existing["phash"]), None)
        return {"outcome": "unchanged", "key": fetched.key, "image_id": image_id, "status": existing["status"]}

    label = label_for(fetched.key)
    if label is not None and label not in settings.classes:
        return _quarantine_image(
            s3_client, ddb, settings, fetched, name, image_id, "label_not_in_label_set",
            f"folder label {label!r} is not a class of {settings.label_set}", source_sha256,
        )
    try:
        clean = validate_image_bytes(fetched.data, limits=settings.limits)
    except ImageValidationError as err:
        return _quarantine_image(
            s3_client, ddb, settings, fetched, name, image_id, err.reason_code, err.message, source_sha256
        )

    key = clean_key_for(clean.sha256)
    # The file first: a VALIDATED item must always point at an existing object.
    s3_client.put_object(Bucket=settings.bucket, Key=key, Body=clean.jpeg, ContentType="image/jpeg")
    while True:
        duplicate = find_duplicate(ddb, settings, image_id, clean.sha256, clean.phash, fetched.key)
        if record_validated(ddb, settings, fetched, image_id, clean, label, duplicate, utc_now(),
                            claim=image_id == name):
            break
        # Another picture with this file name was recorded since the read: this one takes its own id.
        image_id = alternate_id_for(name, source_sha256)
        existing = get_item(ddb, settings.table, image_id)
    # After the item, so that a bucket never names an image before its item says VALIDATED; a run that stops
    # before this line is finished by the redelivery (the "already processed" branch above).
    indexed = existing.get("phash") if existing is not None and existing.get("status") == VALIDATED else None
    update_band_index(ddb, settings, image_id, None if duplicate else clean.phash,
                      None if indexed is None else str(indexed))
    held = existing.get("sha256") if existing is not None and existing.get("status") in (VALIDATED, DUPLICATE) else None
    if held and held != clean.sha256:
        release_picture(ddb, settings.hash_table, str(held), image_id)
    outcome: Outcome = {
        "outcome": "duplicate" if duplicate else "validated",
        "key": fetched.key,
        "image_id": image_id,
        "validated_key": key,
        "width": clean.width,
        "height": clean.height,
        "sha256": clean.sha256,
        "phash": clean.phash,
        "conversions": list(clean.conversions),
        "lossless": clean.lossless,
    }
    if image_id != name:
        outcome["file_name_taken_by"] = name
    if label is not None:
        outcome["label"] = label
    if duplicate:
        outcome["duplicate_of"], outcome["duplicate_distance"] = duplicate
    logger.info("image validated", extra={k: v for k, v in outcome.items() if k != "phash"})
    return outcome


def _apply_label_row(ddb: Any, settings: Settings, csv_key: str, image_id: str, label: str, lesion: str | None) -> None:
    values: dict[str, Any] = {"label": label, "label_set": settings.label_set, "label_source": csv_key}
    absent: dict[str, Any] = {"status": LABEL_ONLY, "source": source_for(csv_key)}
    # A CSV that names the lesion is authoritative for lesion and split; one that does not leaves them as found.
    target = values if lesion is not None else absent
    target["lesion_id"] = lesion or image_id
    target["split"] = assign_split(lesion or image_id)
    ddb.update_item(TableName=settings.table, Key={"image_id": {"S": image_id}}, **build_update(values, absent))


def process_csv(s3_client: Any, ddb: Any, settings: Settings, upload: Upload) -> Outcome:
    """Apply a metadata CSV's labels to the manifest; quarantine it (a copy) when rows or the whole file are bad."""
    fetched = fetch(s3_client, settings.bucket, upload, settings.limits.max_bytes)
    if fetched is None:
        return {"outcome": "gone", "key": upload.key}

    def reject(reason_code: str, message: str, details: Mapping[str, Any] | None = None) -> str | None:
        qkey = quarantine(s3_client, settings.bucket, fetched, reason_code, message, utc_now(), details)
        logger.warning("metadata CSV quarantined", extra={"key": fetched.key, "reason_code": reason_code})
        return qkey

    if fetched.data is None:
        reject("file_too_large", f"{fetched.size} bytes, limit {settings.limits.max_bytes}")
        return {"outcome": "quarantined", "key": fetched.key, "reason_code": "file_too_large"}
    try:
        rows = parse_metadata_csv(fetched.data.decode("utf-8-sig"), label_set=settings.label_set)
    except UnicodeDecodeError as err:
        reject("invalid_csv", f"not UTF-8 text: {err}")
        return {"outcome": "quarantined", "key": fetched.key, "reason_code": "invalid_csv"}
    except DuplicateColumnError as err:  # before its base class: a label file, but an ambiguous one
        reject("duplicate_columns", str(err))
        return {"outcome": "quarantined", "key": fetched.key, "reason_code": "duplicate_columns"}
    except MetadataFormatError as err:
        reject("unknown_csv_format", str(err))
        return {"outcome": "quarantined", "key": fetched.key, "reason_code": "unknown_csv_format"}

    good = [r for r in rows if r.ok and r.label is not None]
    bad = [r for r in rows if not r.ok]
    with ThreadPoolExecutor(max_workers=CSV_WORKERS) as pool:
        # list() so that the first failed write raises here, and Lambda retries the whole (idempotent) file.
        list(pool.map(lambda r: _apply_label_row(ddb, settings, fetched.key, r.image_id, str(r.label), r.lesion_id),
                      good))
    skipped: dict[str, int] = {}
    for r in bad:
        skipped[str(r.skip_reason)] = skipped.get(str(r.skip_reason), 0) + 1
    outcome: Outcome = {"outcome": "labels", "key": fetched.key, "rows": len(rows), "applied": len(good),
                        "skipped": skipped}
    if bad:
        outcome["quarantine_key"] = reject(
            "rows_rejected",
            f"{len(bad)} of {len(rows)} rows skipped ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))}); "
            f"the other {len(good)} were applied",
            {
                "applied_rows": len(good),
                "rejected_row_count": len(bad),
                "rejected_rows": [
                    {"line": r.line, "image_id": r.image_id, "reason": r.skip_reason} for r in bad[:MAX_REPORTED_ROWS]
                ],
            },
        )
    logger.info("metadata CSV applied", extra=outcome)
    return outcome


def process_upload(s3_client: Any, ddb: Any, settings: Settings, upload: Upload) -> Outcome:
    """Route one uploaded object to its processing."""
    kind = route(upload.key)
    if kind == "ignore":
        logger.info("not under incoming/: ignored", extra={"key": upload.key})
        return {"outcome": "ignored", "key": upload.key}
    if kind == "csv":
        return process_csv(s3_client, ddb, settings, upload)
    return process_image(s3_client, ddb, settings, upload)


_METRIC_FOR: Final = {
    "validated": "ImagesValidated",
    "duplicate": "ImagesDuplicate",
    "quarantined": "UploadsQuarantined",
    "labels": "LabelRowsApplied",
}


@logger.inject_lambda_context(log_event=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> Outcome:
    """Validate the object named by an EventBridge S3 "Object Created" event.

    Raises
    ------
    InvalidRequestError
        The event is not an S3 Object Created event.
    """
    try:
        req = ObjectCreatedEvent.model_validate(event)
    except ValidationError as err:
        raise InvalidRequestError(f"not an S3 Object Created event: {err}") from err
    obj = req.detail.obj
    if req.detail.bucket.name != SETTINGS.bucket:
        logger.warning("event for another bucket: ignored", extra={"bucket": req.detail.bucket.name})
        return {"outcome": "ignored", "key": obj.key}
    upload = Upload(key=obj.key, size=obj.size, etag=obj.etag, version_id=obj.version_id)
    outcome = process_upload(s3, dynamodb, SETTINGS, upload)
    metric = _METRIC_FOR.get(outcome["outcome"])
    if metric:
        value = outcome.get("applied", 1)
        metrics.add_metric(name=metric, unit=MetricUnit.Count, value=value)
    if outcome.get("skipped"):  # rows of a label file that were not applied (the file is in quarantine/)
        metrics.add_metric(name="LabelRowsRejected", unit=MetricUnit.Count, value=sum(outcome["skipped"].values()))
    if "reason_code" in outcome:
        metrics.add_dimension(name="reason_code", value=str(outcome["reason_code"]))
    return outcome
