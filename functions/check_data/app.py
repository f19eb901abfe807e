"""Check data: is there enough new validated data to retrain, and write the dataset the job trains on.

Reads the manifest table (not a bucket listing), counts validated images per class and those added since the
last registered model, and, when the minimums are met, writes the train/validation/test manifests (split by
lesion, as recorded at validation time) and a SageMaker ManifestFile for the images channel.

At archive scale: the class counts kept at validation time (``lesion_common.class_counts``) and a count of the
index's items newer than the last model decide "not enough yet" without reading the manifest; it is read in full
(only the attributes the dataset needs) when they say "enough" or are over a week old, and the dataset files are
streamed to S3 part by part. benchmarks/ingestion/check_data_scale.py measures time and memory at 100k and 1M.

The dataset holds each picture once (items with equal clean-bytes sha256 are one picture recorded twice), and
pictures that are linked (the same lesion, or the same picture under two lesions) share one split, so that no
picture and no lesion is on both sides of a split even when validation let a copy through.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field

from lesion_common.class_counts import read_counts, reset_counts
from lesion_common.labels import classes_for
from lesion_common.manifest import DUPLICATE, VALIDATED, count_since, items_with_status
from lesion_common.parsing import parse_event
from lesion_common.s3_stream import S3Writer
from lesion_common.splits import DATASET_COLUMNS
from lesion_common.uploads import VALIDATED_PREFIX, path_under_validated

logger = Logger()
metrics = Metrics()

MANIFEST_TABLE = os.environ["MANIFEST_TABLE"]
# lesion_common.class_counts keeps the class counts there, beside the hash index (both derived from the manifest).
HASH_INDEX_TABLE = os.environ["HASH_INDEX_TABLE"]
DATA_BUCKET = os.environ["DATA_BUCKET"]
ARTIFACTS_BUCKET = os.environ["ARTIFACTS_BUCKET"]
MODEL_PACKAGE_GROUP = os.environ["MODEL_PACKAGE_GROUP"]
LABEL_SET = os.environ["LABEL_SET"]
MIN_NEW_IMAGES = int(os.environ["MIN_NEW_IMAGES"])
MIN_IMAGES_PER_CLASS = int(os.environ["MIN_IMAGES_PER_CLASS"])
# validate_image writes status_shard = <status>#<0..STATUS_SHARDS-1> (lesion_common.manifest); the same number is
# configured for both.
STATUS_SHARDS = int(os.environ["STATUS_SHARDS"])

s3 = boto3.client("s3")
sagemaker = boto3.client("sagemaker")
table = boto3.resource("dynamodb").Table(MANIFEST_TABLE)
ddb = boto3.client("dynamodb")  # the class counts speak DynamoDB's own types (a resource's client converts them)

SPLITS = ("train", "validation", "test")
# The class counts are made exact at every full read; older than this, they are not trusted to say "not enough".
RECONCILE_AFTER = timedelta(days=7)
# What the dataset needs of a VALIDATED item: a third of the item in memory. Every name is aliased: ``key`` and
# ``split`` are reserved words, and so may be names added later.
VALIDATED_ATTRIBUTES = ("image_id", "label", "lesion_id", "split", "sha256", "key", "validated_at", "source")


class Trigger(BaseModel):
    """Why this retraining started (filled in by the EventBridge rule that started it)."""

    model_config = ConfigDict(extra="allow")
    type: str = "manual"
    reason: str = ""


class RetrainingRequest(BaseModel):
    """The execution input."""

    model_config = ConfigDict(extra="forbid")
    trigger: Trigger = Field(default_factory=Trigger)
    force: bool = False
    hyperparameters: dict[str, str] = Field(default_factory=dict)


class CheckDataEvent(BaseModel):
    """What the state machine passes in."""

    execution_name: str = Field(alias="executionName", min_length=1)
    request: RetrainingRequest


def last_model_time(sm: Any, group: str) -> datetime | None:
    """Creation time of the newest model package in the group, or None when there is none yet.

    The stack creates the group, so an empty group answers an empty list; any error (a missing group included)
    is a misconfiguration that must fail the state, not read as "no model yet".
    """
    resp = sm.list_model_packages(
        ModelPackageGroupName=group, SortBy="CreationTime", SortOrder="Descending", MaxResults=1
    )
    packages = resp.get("ModelPackageSummaryList", [])
    return packages[0]["CreationTime"] if packages else None


def validated_images(tbl: Any, shards: int | None = None) -> list[dict[str, Any]]:
    """All manifest items with status VALIDATED (the attributes the dataset needs), through every shard of the
    by-status-shard index."""
    names = {f"#a{i}": name for i, name in enumerate(VALIDATED_ATTRIBUTES)}
    return items_with_status(tbl, VALIDATED, STATUS_SHARDS if shards is None else shards, ", ".join(names), names)


def duplicate_links(tbl: Any, shards: int | None = None) -> list[dict[str, Any]]:
    """``image_id, lesion_id, duplicate_of`` of every DUPLICATE item: a picture already in the data under
    another id, which links its lesion to that picture's."""
    return items_with_status(tbl, DUPLICATE, STATUS_SHARDS if shards is None else shards,
                             "image_id, lesion_id, duplicate_of")


def _parse_time(value: str) -> datetime:
    """Parse an ISO-8601 time; a missing or naive one counts as UTC (the validator writes UTC)."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class _Groups:
    """Union-find over string keys."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, key: str) -> str:
        root = self.parent.setdefault(key, key)
        while root != self.parent[root]:
            root = self.parent[root]
        while key != root:  # path compression
            self.parent[key], key = root, self.parent[key]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _lesion(item: dict[str, Any]) -> str:
    return str(item.get("lesion_id") or item["image_id"])


def one_row_per_picture(
    items: list[dict[str, Any]], links: list[dict[str, Any]], classes: list[str]
) -> tuple[list[dict[str, Any]], int]:
    """The labelled items to train on: each picture once, linked pictures in one split.

    Items with the same clean-bytes ``sha256`` are one picture recorded twice (two copies validated at the same
    moment, before either was visible to the other's duplicate check): the one with the smallest image id stays.
    Items are linked when they share a lesion, share a ``sha256``, or when a DUPLICATE item (``links``) ties its
    lesion to the picture it copies; every linked group takes the split recorded for its smallest
    ``(lesion_id, image_id)``, so a picture or a lesion known under two names cannot straddle two splits.

    Returns
    -------
    (rows, dropped)
        New dicts (the items are not changed), and how many copies were left out.
    """
    groups = _Groups()
    for item in items:
        node = "image:" + str(item["image_id"])
        groups.union(node, "lesion:" + _lesion(item))
        if item.get("sha256"):
            groups.union(node, "sha256:" + str(item["sha256"]))
    for link in links:
        if link.get("duplicate_of"):
            groups.union("lesion:" + _lesion(link), "image:" + str(link["duplicate_of"]))
            # A copy can name another copy (the exact-copy owner of its bytes was itself a near copy): chain them.
            groups.union("image:" + str(link["image_id"]), "lesion:" + _lesion(link))

    labelled = sorted((i for i in items if i.get("label") in classes), key=lambda i: str(i["image_id"]))
    kept: dict[str, dict[str, Any]] = {}
    for item in labelled:  # smallest image id first, so it is the copy that stays
        kept.setdefault(str(item.get("sha256") or "image:" + str(item["image_id"])), item)
    first_of_group: dict[str, dict[str, Any]] = {}
    for item in sorted(items, key=lambda i: (_lesion(i), str(i["image_id"]))):
        first_of_group.setdefault(groups.find("image:" + str(item["image_id"])), item)
    rows = []
    for item in kept.values():
        split = first_of_group[groups.find("image:" + str(item["image_id"]))].get("split")
        rows.append({**item, "split": split})
    return rows, len(labelled) - len(rows)


def shortfalls(counts: Mapping[str, int], split_counts: Mapping[str, Mapping[str, int]], new: int,
               classes: list[str], force: bool) -> list[str]:
    """Why the data does not suffice (empty: it does)."""
    reasons: list[str] = []
    if new < MIN_NEW_IMAGES and not force:
        reasons.append(f"{new} new validated images since the last model, {MIN_NEW_IMAGES} needed")
    for c in classes:
        if counts.get(c, 0) < MIN_IMAGES_PER_CLASS:
            reasons.append(f"class {c} has {counts.get(c, 0)} validated images, {MIN_IMAGES_PER_CLASS} needed")
        for s in SPLITS:
            if counts.get(c, 0) >= MIN_IMAGES_PER_CLASS and split_counts[s].get(c, 0) == 0:
                reasons.append(f"class {c} has no {s} images")
    return reasons


def assess(
    items: list[dict[str, Any]],
    classes: list[str],
    since: datetime | None,
    force: bool,
    links: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Count images per class and split, and decide whether the data suffices.

    Returns
    -------
    dict
        ``enough`` (bool), ``reasons`` (why not), ``counts``, ``splitCounts``, ``newImages``, ``totalImages``,
        ``droppedCopies`` (items left out as copies of another, see :func:`one_row_per_picture`), ``rows``
        (the usable items, each picture once) and ``exact`` (``{class: {split: n}}``, for the class counts).
    """
    rows, dropped = one_row_per_picture(items, links or [], classes)
    new = [r for r in rows if since is None or _parse_time(str(r.get("validated_at", ""))) > since]
    counts = Counter(r["label"] for r in rows)
    split_counts = {s: Counter(r["label"] for r in rows if r.get("split") == s) for s in SPLITS}
    reasons = shortfalls(counts, split_counts, len(new), classes, force)
    return {
        "enough": not reasons,
        "reasons": reasons,
        "counts": {c: counts[c] for c in classes},
        "splitCounts": {s: sum(split_counts[s].values()) for s in SPLITS},
        "newImages": len(new),
        "totalImages": len(rows),
        "droppedCopies": dropped,
        "countedFrom": "manifest",
        "rows": rows,
        "exact": {c: {s: split_counts[s][c] for s in SPLITS} for c in classes},
    }


def quick_check(client: Any, tbl: Any, classes: list[str], since: datetime | None, force: bool,
                now: datetime) -> dict[str, Any] | None:
    """The "not enough yet" decision from the class counts, when they are recent; None when the manifest must be
    read (the counts say enough, are stale or were never made exact).

    Reads: ``len(classes) * 3 * 16`` counter keys, and the index's items newer than the last model (COUNT only).
    """
    counts_by_split, reconciled = read_counts(client, HASH_INDEX_TABLE, classes)
    if reconciled is None or now - reconciled > RECONCILE_AFTER:
        return None
    counts = {c: sum(counts_by_split[c].values()) for c in classes}
    split_counts = {s: {c: counts_by_split[c][s] for c in classes} for s in SPLITS}
    new = (count_since(tbl, VALIDATED, STATUS_SHARDS, since.astimezone(UTC).isoformat(timespec="milliseconds"))
           if since else sum(counts.values()))
    reasons = shortfalls(counts, split_counts, new, classes, force)
    if not reasons:
        return None
    return {"enough": False, "reasons": reasons, "counts": counts,
            "splitCounts": {s: sum(split_counts[s].values()) for s in SPLITS}, "newImages": new,
            "totalImages": sum(counts.values()), "droppedCopies": None, "countedFrom": "class counts",
            "countsMadeExactAt": reconciled.isoformat()}


def write_dataset(client: Any, rows: list[dict[str, Any]], classes: list[str], prefix: str) -> dict[str, str]:
    """Write ``<split>.csv``, ``classes.json`` and ``images.manifest`` under ``s3://ARTIFACTS_BUCKET/<prefix>``,
    each streamed in parts (:class:`lesion_common.s3_stream.S3Writer`), so memory holds one part of a file.

    Rewriting the same execution's dataset yields the same objects, so a retried state is harmless.
    """
    ordered = sorted(rows, key=lambda r: r["image_id"])
    for split in SPLITS:
        with S3Writer(client, ARTIFACTS_BUCKET, f"{prefix}{split}.csv") as out:
            out.write(",".join(DATASET_COLUMNS) + "\n")
            for r in ordered:
                if r.get("split") == split:
                    buf = io.StringIO()
                    csv.writer(buf, lineterminator="\n").writerow(
                        [r["image_id"], path_under_validated(r["key"]), r["label"], r["lesion_id"],
                         r.get("source") or ""])
                    out.write(buf.getvalue())
    client.put_object(
        Bucket=ARTIFACTS_BUCKET,
        Key=f"{prefix}classes.json",
        Body=json.dumps({"label_set": LABEL_SET, "classes": classes}).encode(),
    )
    # A SageMaker ManifestFile is one JSON array: written element by element.
    with S3Writer(client, ARTIFACTS_BUCKET, f"{prefix}images.manifest") as out:
        out.write("[" + json.dumps({"prefix": f"s3://{DATA_BUCKET}/{VALIDATED_PREFIX}"}))
        for r in ordered:
            out.write(", " + json.dumps(path_under_validated(r["key"])))
        out.write("]")
    return {
        "manifestsUri": f"s3://{ARTIFACTS_BUCKET}/{prefix}",
        "imagesManifestUri": f"s3://{ARTIFACTS_BUCKET}/{prefix}images.manifest",
    }


@logger.inject_lambda_context(log_event=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Assess the manifest; return the decision and, when enough, where the dataset was written."""
    req = parse_event(CheckDataEvent, event, "invalid retraining request")
    classes = classes_for(LABEL_SET)
    since = last_model_time(sagemaker, MODEL_PACKAGE_GROUP)
    result = quick_check(ddb, table, classes, since, req.request.force, datetime.now(UTC))
    rows: list[dict[str, Any]] = []
    if result is None:
        result = assess(validated_images(table), classes, since, req.request.force, duplicate_links(table))
        rows = result.pop("rows")
        reset_counts(ddb, HASH_INDEX_TABLE, result.pop("exact"))
    metrics.add_metric(name="NewValidatedImages", unit=MetricUnit.Count, value=result["newImages"])
    out: dict[str, Any] = {
        **result,
        "labelSet": LABEL_SET,
        "lastModelTime": since.isoformat() if since else None,
        "trigger": req.request.trigger.model_dump(),
        "hyperparameters": req.request.hyperparameters,
        "summary": (
            f"{result['totalImages']} validated images ({result['newImages']} new); "
            + ("enough to retrain" if result["enough"] else "not enough: " + "; ".join(result["reasons"]))
        ),
    }
    if result["enough"]:
        out.update(write_dataset(s3, rows, classes, f"datasets/{req.execution_name}/"))
    logger.info("data check", extra={"decision": out["summary"]})
    return out
