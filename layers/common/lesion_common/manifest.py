"""The manifest table: one item per image id, what its attributes mean, and how items are read and written.

validate_image writes the items (:func:`record_validated`, :func:`record_quarantined`, :func:`record_label`);
check_data reads them by status (:func:`items_with_status`). An item's ``status`` is VALIDATED (a clean copy in
``validated/``), DUPLICATE (the same or nearly the same picture is already there under another id), QUARANTINED
(rejected, copied to ``quarantine/``) or LABEL_ONLY (a label file named it before its picture arrived).

Items carry ``status_shard`` (``<status>#<n>``, :func:`status_shard`), the partition key of the
``by-status-shard`` index (sort key ``validated_at``), so that no index partition takes every write of a bulk
upload; readers query every shard of a status. Writers and readers are configured with the same number of shards
(``STATUS_SHARDS`` of both functions in template.yaml).

Every write is idempotent: the item is keyed by the image id and written with expressions that give the same
item whatever the order or repetition of events.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol, TypedDict

from boto3.dynamodb.conditions import Key
from boto3.dynamodb.types import TypeSerializer
from botocore.exceptions import ClientError

from lesion_common import class_counts
from lesion_common.aws_errors import error_code
from lesion_common.splits import assign_split
from lesion_common.uploads import Fetched, alternate_id_for, clean_key_for, source_for

Status = Literal["VALIDATED", "DUPLICATE", "QUARANTINED", "LABEL_ONLY"]
VALIDATED: Final = "VALIDATED"
DUPLICATE: Final = "DUPLICATE"
QUARANTINED: Final = "QUARANTINED"
LABEL_ONLY: Final = "LABEL_ONLY"
# The statuses an upload's validation ends in (LABEL_ONLY is a label waiting for its picture).
FINAL_STATUSES: Final = frozenset({VALIDATED, DUPLICATE, QUARANTINED})

KEY_ATTRIBUTE: Final = "image_id"
STATUS_INDEX: Final = "by-status-shard"
STATUS_SHARD_ATTRIBUTE: Final = "status_shard"


class ManifestItem(TypedDict, total=False):
    """The attributes of a manifest item (the table's one definition; each is written only by this module)."""

    image_id: str  # the key: the file name without extension, or <name>-<12 hex> (lesion_common.uploads)
    status: Status
    status_shard: str  # <status>#<n>: the by-status-shard index's partition key
    validated_at: str  # the index's sort key (ISO-8601 UTC, :func:`utc_now`)
    key: str  # validated/<sha256>.jpg, the clean copy
    source_key: str  # incoming/..., the upload
    source: str  # the dataset: the first folder under incoming/
    sha256: str  # of the clean JPEG
    source_sha256: str  # of the upload's bytes
    phash: str  # 256-bit perceptual hash of the clean image, hex
    width: int
    height: int
    bytes: int  # of the clean JPEG
    source_bytes: int
    label: str  # class code
    label_set: str
    label_source: str  # the label file that set the label
    lesion_source: str  # the file of lesion ids (ISIC 2019 training metadata) that set the lesion
    lesion_id: str  # the group the split is assigned by; the image id when no label file named a lesion
    split: str  # train / validation / test (lesion_common.splits.assign_split of the lesion)
    duplicate_of: str  # DUPLICATE: the image id it copies
    duplicate_distance: int  # DUPLICATE: bits between the pHashes (0: the same clean bytes)
    reason_code: str  # QUARANTINED: why
    reason: str
    quarantine_key: str
    checked_at: str


class ManifestSettings(Protocol):
    """Where items are written and what they carry (validate_image's settings)."""

    @property
    def table(self) -> str: ...

    @property
    def status_shards(self) -> int: ...

    @property
    def label_set(self) -> str: ...

    @property
    def hash_table(self) -> str: ...


class CleanPicture(Protocol):
    """What an item records of a validated picture (``lesion_imaging.validation.CleanImage``)."""

    @property
    def jpeg(self) -> bytes: ...

    @property
    def sha256(self) -> str: ...

    @property
    def source_sha256(self) -> str: ...

    @property
    def phash(self) -> str: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


_serialize = TypeSerializer().serialize


def status_shard(status: str, image_id: str, shards: int) -> str:
    """``<status>#<n>``, ``n`` from a hash of the image id: the partition key of the ``by-status-shard`` index.

    A bulk upload writes thousands of VALIDATED items a second; keyed by status alone they would all land on
    one index partition (and throttle the table through it). Readers query every shard of a status.
    """
    n = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:4], "big") % shards
    return f"{status}#{n}"


def items_with_status(table: Any, status: str, shards: int, projection: str | None = None,
                      names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Every item of ``status``: each shard ``<status>#0`` .. ``<status>#<shards-1>`` queried to its last page.

    ``table`` is a boto3 DynamoDB ``Table`` resource; ``projection`` (with ``names`` for reserved words such as
    ``key``) keeps only the attributes a reader needs in memory.
    """
    items: list[dict[str, Any]] = []
    for shard in range(shards):
        kwargs: dict[str, Any] = {
            "IndexName": STATUS_INDEX,
            "KeyConditionExpression": Key(STATUS_SHARD_ATTRIBUTE).eq(f"{status}#{shard}"),
        }
        if projection:
            kwargs["ProjectionExpression"] = projection
        if names:
            kwargs["ExpressionAttributeNames"] = dict(names)
        while True:
            page = table.query(**kwargs)
            items.extend(page["Items"])
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return items


def count_since(table: Any, status: str, shards: int, since: str) -> int:
    """How many items of ``status`` were validated after ``since`` (ISO-8601 UTC): the index's sort key limits the
    read to those items (``Select=COUNT`` returns no item)."""
    total = 0
    for shard in range(shards):
        kwargs: dict[str, Any] = {
            "IndexName": STATUS_INDEX, "Select": "COUNT",
            "KeyConditionExpression": (Key(STATUS_SHARD_ATTRIBUTE).eq(f"{status}#{shard}")
                                       & Key("validated_at").gt(since)),
        }
        while True:
            page = table.query(**kwargs)
            total += int(page["Count"])
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return total


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds, the manifest's time format."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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


def _key(image_id: str) -> dict[str, Any]:
    return {KEY_ATTRIBUTE: {"S": image_id}}


def counted(item: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """The (class, split) an item adds to the class counts: a VALIDATED item with a label, else None."""
    if not item or item.get("status") != VALIDATED or not item.get("label") or not item.get("split"):
        return None
    return str(item["label"]), str(item["split"])


def _write(client: Any, table: str, counts_table: str, image_id: str, update: dict[str, Any],
           values: Mapping[str, Any], absent: Mapping[str, Any], remove: Iterable[str] = ()) -> None:
    """UpdateItem, then move the image's +1 in the class counts (lesion_common.class_counts) if the write changed
    what it counts as. The item before the write comes back with it (ALL_OLD); after it is computed."""
    answer = client.update_item(TableName=table, Key=_key(image_id), ReturnValues="ALL_OLD", **update)
    old = {k: next(iter(v.values())) for k, v in (answer.get("Attributes") or {}).items()}
    new = dict(old)
    for name, value in absent.items():
        new.setdefault(name, value)
    new.update(values)
    for name in remove:
        if name not in values:
            new.pop(name, None)
    before, after = counted(old or None), counted(new)
    if before != after:
        if before is not None:
            class_counts.add(client, counts_table, image_id, before, -1)
        if after is not None:
            class_counts.add(client, counts_table, image_id, after, +1)


def get_item(client: Any, table: str, image_id: str) -> dict[str, Any] | None:
    """The manifest item, strongly consistent, as plain strings/numbers (only S and N attributes are used)."""
    item = client.get_item(TableName=table, Key=_key(image_id), ConsistentRead=True).get("Item")
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
    for a different upload (:func:`holds_other_upload`), then :func:`lesion_common.uploads.alternate_id_for`."""
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


def record_validated(
    client: Any,
    settings: ManifestSettings,
    fetched: Fetched,
    image_id: str,
    clean: CleanPicture,
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
    status: Status = DUPLICATE if duplicate else VALIDATED
    values: ManifestItem = {
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
    absent: ManifestItem = {"lesion_id": image_id, "split": assign_split(image_id)}
    remove = ("reason_code", "reason", "quarantine_key", "checked_at", "duplicate_of", "duplicate_distance")
    update = build_update(values, absent, remove=remove)
    if claim:
        update["ConditionExpression"] = _claim(update, fetched.key, clean.source_sha256)
    try:
        _write(client, settings.table, settings.hash_table, image_id, update, values, absent, remove)
    except ClientError as err:
        if claim and error_code(err) == "ConditionalCheckFailedException":
            return False
        raise
    return True


def record_quarantined(
    client: Any,
    settings: ManifestSettings,
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
    values: ManifestItem = {
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
    absent: ManifestItem = {"lesion_id": image_id, "split": assign_split(image_id)}
    update = build_update(values, absent)
    update["ExpressionAttributeNames"]["#status"] = "status"
    update["ExpressionAttributeValues"].update({":keep1": {"S": VALIDATED}, ":keep2": {"S": DUPLICATE}})
    condition = "(attribute_not_exists(#status) OR NOT #status IN (:keep1, :keep2))"
    if claim:
        condition += " AND " + _claim(update, fetched.key, source_sha256)
    update["ConditionExpression"] = condition
    try:
        _write(client, settings.table, settings.hash_table, image_id, update, values, absent)
    except ClientError as err:
        if error_code(err) != "ConditionalCheckFailedException":
            raise
        if claim and holds_other_upload(get_item(client, settings.table, image_id), fetched.key, source_sha256):
            return "taken"
        return "kept"
    return "recorded"


def record_label(
    client: Any, table: str, counts_table: str, label_set: str, label_file: str, image_id: str, label: str,
    lesion: str | None,
) -> None:
    """Set the label a label file gives an image; an image not seen yet gets a LABEL_ONLY item.

    A file that names the lesion is authoritative for lesion and split; one that does not leaves them as found
    (or derives them from the image id on a new item).
    """
    values: ManifestItem = {"label": label, "label_set": label_set, "label_source": label_file}
    absent: ManifestItem = {"status": LABEL_ONLY, "source": source_for(label_file)}
    target = values if lesion is not None else absent
    target["lesion_id"] = lesion or image_id
    target["split"] = assign_split(lesion or image_id)
    _write(client, table, counts_table, image_id, build_update(values, absent), values, absent)


def record_lesion(client: Any, table: str, counts_table: str, label_file: str, image_id: str, lesion: str) -> None:
    """Set the lesion (and so the split) a file of lesion ids gives an image, without a label (ISIC 2019 training
    metadata); an image not seen yet gets a LABEL_ONLY item, labelled when its ground truth arrives."""
    values: ManifestItem = {"lesion_id": lesion, "split": assign_split(lesion), "lesion_source": label_file}
    absent: ManifestItem = {"status": LABEL_ONLY, "source": source_for(label_file)}
    _write(client, table, counts_table, image_id, build_update(values, absent), values, absent)
