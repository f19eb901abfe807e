"""The hash index table: who holds a picture's exact bytes, and near-duplicate search by pHash bands.

Duplicate search reads a bounded number of items whatever the archive size:

- an exact copy by a conditional write of ``sha256#<clean sha256>`` (sort key ``owner``): of two copies at the
  same instant one wins, the other is a DUPLICATE of it (1 write + at most 1 read);
- a near copy through the ``band#<i>#<slice>`` buckets (sort key ``bucket``) of its pHash
  (:mod:`lesion_imaging.bands`): the 264 bucket items of 8 bands x (own slice + 32 one bit away) in 3
  BatchGetItem requests, each bucket holding at most ``BUCKET_CAP`` images (a string set ``members`` of
  ``<phash><image id>``).

Only VALIDATED images are in the buckets (a near copy points at the original, not at another copy).
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from botocore.exceptions import ClientError

from lesion_common.aws_errors import error_code
from lesion_imaging.bands import band_keys, probe_keys
from lesion_imaging.validation import hamming

# Most images one band bucket holds (one item, its members a string set of "<phash><image id>": 32 members are
# under 4 KB, one read unit). A bucket holds the images whose hash has one 32-bit slice in common; on HAM10000
# none holds more than 3 (RESULTS.md), so a full one means a flood of near-identical frames: a further image is
# left out of that band (still in the other seven), and the caller logs and counts it (HashBucketFull).
BUCKET_CAP: Final = 32
SHA_KEY_PREFIX: Final = "sha256#"
SHA_SORT_KEY: Final = "owner"
BUCKET_SORT_KEY: Final = "bucket"
# BatchGetItem's limit of keys a request.
BATCH_KEYS: Final = 100


class IndexSettings(Protocol):
    """The index's table and search parameters (validate_image's settings)."""

    @property
    def hash_table(self) -> str: ...

    @property
    def bands(self) -> int: ...

    @property
    def near_duplicate_bits(self) -> int: ...

    @property
    def bucket_cap(self) -> int: ...


def _sha_key(sha256: str) -> dict[str, Any]:
    return {"pk": {"S": SHA_KEY_PREFIX + sha256}, "sk": {"S": SHA_SORT_KEY}}


def _bucket_key(bucket: str) -> dict[str, Any]:
    return {"pk": {"S": bucket}, "sk": {"S": BUCKET_SORT_KEY}}


def claim_picture(client: Any, table: str, sha256: str, image_id: str, source_key: str) -> str:
    """Claim the clean bytes ``sha256`` for ``image_id``; return the image id that holds them.

    One item ``sha256#<hex>`` per picture, written with a condition, so that of two copies written at the same
    instant exactly one wins and the other reads the winner: the key lookup that replaces the scan for exact
    copies. The same upload (its key) or the same image id may claim again (redelivered events, a file moved to
    its alternate id, the same bytes re-uploaded under the same name from another folder).
    """
    key = _sha_key(sha256)
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
            if error_code(err) != "ConditionalCheckFailedException":
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
            Key=_sha_key(sha256),
            UpdateExpression="REMOVE #id, #src",
            ConditionExpression="#id = :id",
            ExpressionAttributeNames={"#id": "image_id", "#src": "source_key"},
            ExpressionAttributeValues={":id": {"S": image_id}},
        )
    except ClientError as err:
        if error_code(err) != "ConditionalCheckFailedException":
            raise


def read_buckets(client: Any, table: str, keys: list[str]) -> list[dict[str, Any]]:
    """The bucket items of ``keys`` (those that exist), strongly consistent, ``BATCH_KEYS`` keys a request.

    Keys DynamoDB leaves unprocessed (throttling) are asked again; a retry is a further read, and Lambda's own
    retry takes over when the client's retries run out.
    """
    items: list[dict[str, Any]] = []
    for start in range(0, len(keys), BATCH_KEYS):
        request: dict[str, Any] = {table: {
            "Keys": [_bucket_key(k) for k in keys[start : start + BATCH_KEYS]],
            "ConsistentRead": True,
            "ProjectionExpression": "members",
        }}
        while request:
            resp = client.batch_get_item(RequestItems=request)
            items.extend(resp.get("Responses", {}).get(table, []))
            request = resp.get("UnprocessedKeys") or {}
    return items


def find_near_duplicate(client: Any, settings: IndexSettings, image_id: str, phash: str) -> tuple[str, int] | None:
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
    client: Any, settings: IndexSettings, image_id: str, sha256: str, phash: str, source_key: str
) -> tuple[str, int] | None:
    """The image this one duplicates: the holder of the same clean bytes (distance 0, decided by a conditional
    write, see :func:`claim_picture`), else the nearest pHash in the band index: at most 1 GetItem and
    ``ceil(bands * 33 / 100)`` BatchGetItem requests (3 for 8 bands), whatever the archive size."""
    owner = claim_picture(client, settings.hash_table, sha256, image_id, source_key)
    if owner != image_id:
        return owner, 0
    return find_near_duplicate(client, settings, image_id, phash)


def update_band_index(
    client: Any, settings: IndexSettings, image_id: str, new_phash: str | None, old_phash: str | None
) -> list[str]:
    """Put ``image_id`` in the buckets of ``new_phash`` and take it out of those of ``old_phash`` (idempotent).

    Only VALIDATED images are indexed (a near copy points at the original, not at another copy), so ``new_phash``
    is None for a DUPLICATE, and ``old_phash`` is the hash the item was indexed under before (a replaced upload).

    Returns
    -------
    list of str
        The buckets that were full (``bucket_cap``), which the image was left out of.
    """
    if old_phash and old_phash != new_phash:
        for bucket in band_keys(old_phash, settings.bands):
            client.update_item(
                TableName=settings.hash_table,
                Key=_bucket_key(bucket),
                UpdateExpression="DELETE #m :m",
                ExpressionAttributeNames={"#m": "members"},
                ExpressionAttributeValues={":m": {"SS": [old_phash + image_id]}},
            )
    if not new_phash:
        return []
    member = new_phash + image_id
    full: list[str] = []
    for bucket in band_keys(new_phash, settings.bands):
        try:
            client.update_item(
                TableName=settings.hash_table,
                Key=_bucket_key(bucket),
                UpdateExpression="ADD #m :m",
                # A member already there (a redelivery) is no growth: only a new one is refused by the cap.
                ConditionExpression="attribute_not_exists(#m) OR size(#m) < :cap OR contains(#m, :one)",
                ExpressionAttributeNames={"#m": "members"},
                ExpressionAttributeValues={":m": {"SS": [member]}, ":cap": {"N": str(settings.bucket_cap)},
                                           ":one": {"S": member}},
            )
        except ClientError as err:
            if error_code(err) != "ConditionalCheckFailedException":
                raise
            full.append(bucket)
    return full
