"""Per-class, per-split counts of the validated, labelled images, kept beside the manifest items.

check_data decides "not enough data yet" from these counts (a few hundred key reads) instead of reading every
manifest item on every execution; when the counts say "enough", or are older than a week, it reads the manifest in
full, decides from that, and writes the exact counts back (:func:`reset_counts`), which also repairs any drift.

Counter items live in the hash index table (derived data of the manifest, like the hash buckets; the manifest
table keeps one item per image): ``pk = count#<class>#<split>#<n>``, ``sk = count``, attribute ``n``. Each (class,
split) is spread over :data:`COUNT_SHARDS` items, the shard picked from the image id, so that a bulk upload's
increments do not all land on one item. The manifest's writers (``lesion_common.manifest``) apply the +1/-1 of
each item that starts or stops counting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

COUNT_PREFIX: Final = "count#"
RECONCILED_ID: Final = "count#reconciled"
SORT_KEY: Final = "count"
COUNT_SHARDS: Final = 16
SPLITS: Final = ("train", "validation", "test")
_BATCH_GET: Final = 100
_BATCH_WRITE: Final = 25


def count_id(label: str, split: str, shard: int) -> str:
    """The partition key of one counter item."""
    return f"{COUNT_PREFIX}{label}#{split}#{shard}"


def _key(pk: str) -> dict[str, Any]:
    return {"pk": {"S": pk}, "sk": {"S": SORT_KEY}}


def shard_of(image_id: str) -> int:
    """The counter shard an image's increments go to."""
    return int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:4], "big") % COUNT_SHARDS


def add(client: Any, table: str, image_id: str, counted: tuple[str, str], delta: int) -> None:
    """Add ``delta`` to the (class, split) count, on the image's shard."""
    label, split = counted
    client.update_item(TableName=table, Key=_key(count_id(label, split, shard_of(image_id))),
                       UpdateExpression="ADD #n :d", ExpressionAttributeNames={"#n": "n"},
                       ExpressionAttributeValues={":d": {"N": str(delta)}})


def _batch_get(client: Any, table: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), _BATCH_GET):
        request: dict[str, Any] = {table: {"Keys": [_key(x) for x in ids[i:i + _BATCH_GET]], "ConsistentRead": True}}
        while request:
            answer = client.batch_get_item(RequestItems=request)
            for item in answer.get("Responses", {}).get(table, []):
                found[item["pk"]["S"]] = item
            request = answer.get("UnprocessedKeys") or {}
    return found


def read_counts(client: Any, table: str, classes: Iterable[str]) -> tuple[dict[str, dict[str, int]], datetime | None]:
    """``{class: {split: n}}`` summed over the shards, and when they were last made exact (None: never)."""
    classes = list(classes)
    ids = [count_id(c, s, n) for c in classes for s in SPLITS for n in range(COUNT_SHARDS)] + [RECONCILED_ID]
    found = _batch_get(client, table, ids)
    counts = {c: {s: sum(int(found.get(count_id(c, s, n), {}).get("n", {}).get("N", "0"))
                         for n in range(COUNT_SHARDS)) for s in SPLITS} for c in classes}
    stamp = found.get(RECONCILED_ID, {}).get("at", {}).get("S")
    return counts, (datetime.fromisoformat(stamp) if stamp else None)


def reset_counts(client: Any, table: str, exact: Mapping[str, Mapping[str, int]]) -> None:
    """Write exact counts (shard 0 holds the total, the other shards 0) and the time they were made exact.

    An increment made between the full read and this write is lost or counted twice: the counts are a filter for
    "not enough yet", made exact again at every full read (and at least weekly), never the dataset itself.
    """
    items = [{**_key(count_id(c, s, n)), "n": {"N": str(by_split.get(s, 0) if n == 0 else 0)}}
             for c, by_split in exact.items() for s in SPLITS for n in range(COUNT_SHARDS)]
    items.append({**_key(RECONCILED_ID), "at": {"S": datetime.now(UTC).isoformat(timespec="seconds")}})
    for i in range(0, len(items), _BATCH_WRITE):
        request: dict[str, Any] = {table: [{"PutRequest": {"Item": item}} for item in items[i:i + _BATCH_WRITE]]}
        while request:
            request = client.batch_write_item(RequestItems=request).get("UnprocessedItems") or {}
