"""Validate every upload to the data bucket's ``incoming/`` prefix (EventBridge S3 "Object Created").

An image goes through :mod:`lesion_imaging.intake` (decoded and checked, stored clean under ``validated/`` or
quarantined, recorded in the manifest table, duplicates found through :mod:`lesion_imaging.hash_index`); a label
file (``.csv``) through :mod:`lesion_common.label_import`. The bucket's layout is :mod:`lesion_common.uploads`, the
manifest item :mod:`lesion_common.manifest`. The upload itself is never deleted or changed.

Every outcome is idempotent (events arrive twice). Unexpected AWS errors propagate so that Lambda retries.
"""

from __future__ import annotations

import os
from typing import Any, Final, Literal

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser.models.s3 import (
    S3EventNotificationEventBridgeBucketModel,
    S3EventNotificationObjectModel,
)
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config
from pydantic import BaseModel, Field

from lesion_common.label_import import CSV_WORKERS, import_labels
from lesion_common.parsing import parse_event
from lesion_common.uploads import Outcome, Upload, route
from lesion_imaging import intake
from lesion_imaging.validation import ValidationLimits

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
SETTINGS = intake.Settings(bucket=DATA_BUCKET, table=MANIFEST_TABLE, label_set=LABEL_SET, limits=LIMITS,
                           hash_table=HASH_INDEX_TABLE, status_shards=STATUS_SHARDS)

s3 = boto3.client("s3")
# A label file's rows are written in parallel (CSV_WORKERS at once).
dynamodb = boto3.client("dynamodb", config=Config(max_pool_connections=CSV_WORKERS + 2))


# Powertools' models of the detail's bucket and object, kept to what this handler has always accepted: a name and
# a key that are not empty, a size (absent on some event sources) in whole bytes, an etag that may be null.
class UploadBucket(S3EventNotificationEventBridgeBucketModel):
    """``detail.bucket``."""

    name: str = Field(min_length=1)


class UploadedObject(S3EventNotificationObjectModel):
    """``detail.object``: ``key``, ``size``, ``etag``, ``version-id`` (on a versioned bucket), ``sequencer``."""

    key: str = Field(min_length=1)
    size: int | None = Field(default=None, ge=0)
    etag: str | None = None  # type: ignore[assignment]


class ObjectCreatedDetail(BaseModel):
    """``detail`` of an S3 event delivered through EventBridge: what this function reads of it.

    Not Powertools' ``S3EventNotificationEventBridgeDetailModel``, which also requires ``version``, ``request-id``
    and ``requester``, nor its envelope (``id``, ``account``, ``time``, ``region``, ``resources``): nothing here
    reads them, and events without them (tests, benchmarks, a hand-made redrive) are accepted as before.
    """

    bucket: UploadBucket
    obj: UploadedObject = Field(alias="object")


class ObjectCreatedEvent(BaseModel):
    """The EventBridge event this function is invoked with (other fields are ignored)."""

    source: Literal["aws.s3"]
    detail_type: Literal["Object Created"] = Field(alias="detail-type")
    detail: ObjectCreatedDetail


def process_upload(s3_client: Any, ddb: Any, settings: intake.Settings, upload: Upload) -> Outcome:
    """Route one uploaded object to its processing."""
    kind = route(upload.key)
    if kind == "ignore":
        logger.info("not under incoming/: ignored", extra={"key": upload.key})
        return {"outcome": "ignored", "key": upload.key}
    if kind == "csv":
        return import_labels(s3_client, ddb, upload, bucket=settings.bucket, table=settings.table,
                             counts_table=settings.hash_table, label_set=settings.label_set,
                             max_bytes=settings.limits.max_bytes)
    return intake.process_image(s3_client, ddb, settings, upload)


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
    req = parse_event(ObjectCreatedEvent, event, "not an S3 Object Created event")
    obj = req.detail.obj
    if req.detail.bucket.name != SETTINGS.bucket:
        logger.warning("event for another bucket: ignored", extra={"bucket": req.detail.bucket.name})
        return {"outcome": "ignored", "key": obj.key}
    upload = Upload(key=obj.key, size=obj.size, etag=obj.etag or None, version_id=obj.version_id)
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
