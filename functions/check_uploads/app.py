"""Check, every hour, that every upload under ``incoming/`` ended in VALIDATED, DUPLICATE or QUARANTINED.

Compares the data bucket's ``incoming/`` with the manifest table (:mod:`lesion_common.reconcile`: one ListObjectsV2
per 1,000 uploads and one BatchGetItem per 100, for the uploads of the ``UploadRetentionDays`` window) and publishes
``UnreconciledUploads``, the number of image uploads older than ``GRACE_MINUTES`` that no final manifest item
records, to ``METRIC_NAMESPACE`` (no dimensions). The ``UnreconciledUploadsAlarm`` fires when it stays above zero;
``python -m tools.reconcile --stack <stack> --redrive`` lists those uploads and sends their events again. This
function only reads: it never re-drives by itself.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict

from lesion_common.parsing import parse_event
from lesion_common.reconcile import Report, reconcile

logger = Logger()

DATA_BUCKET = os.environ["DATA_BUCKET"]
MANIFEST_TABLE = os.environ["MANIFEST_TABLE"]
METRIC_NAMESPACE = os.environ["METRIC_NAMESPACE"]
GRACE_MINUTES = int(os.environ["GRACE_MINUTES"])
if GRACE_MINUTES < 0:
    raise ValueError("GRACE_MINUTES must be >= 0")

METRIC: Final = "UnreconciledUploads"
# Unreconciled uploads named one by one in the log; the rest are counted (the tool lists them all).
LOGGED: Final = 100

s3 = boto3.client("s3")
dynamodb = boto3.client("dynamodb")
cloudwatch = boto3.client("cloudwatch")


class CheckRequest(BaseModel):
    """A ``Scheduled Event`` (nothing of it is read) or a manual invocation with an empty object."""

    model_config = ConfigDict(extra="ignore")
    time: datetime | None = None


def summarize(report: Report) -> dict[str, Any]:
    """The handler's result: counts, by reason, and the requests the run made."""
    return {
        "unreconciled": len(report.unreconciled),
        "byReason": report.by_reason(),
        "checked": report.images,
        "reconciled": report.reconciled,
        "inFlight": report.recent,
        "labelFiles": report.label_files,
        "requests": {"list": report.list_requests, "batchGet": report.batch_requests,
                     "objectsRead": report.objects_read, "reasonFilesRead": report.reason_files_read},
    }


def publish(cloudwatch_client: Any, namespace: str, count: int) -> None:
    """``UnreconciledUploads`` = ``count``, a datapoint every run, 0 included (the alarm tells 0 from no run)."""
    cloudwatch_client.put_metric_data(Namespace=namespace, MetricData=[
        {"MetricName": METRIC, "Value": float(count), "Unit": "Count"}])


@logger.inject_lambda_context(log_event=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Reconcile ``incoming/`` with the manifest and publish the count of unreconciled uploads.

    Raises
    ------
    InvalidRequestError
        The event is not an object.
    """
    parse_event(CheckRequest, event or {}, "invalid check request")
    report = reconcile(s3, dynamodb, DATA_BUCKET, MANIFEST_TABLE, grace=timedelta(minutes=GRACE_MINUTES),
                       now=datetime.now(UTC))
    publish(cloudwatch, METRIC_NAMESPACE, len(report.unreconciled))
    for item in report.unreconciled[:LOGGED]:
        logger.warning("upload not reconciled", extra={"key": item.key, "reason": item.reason,
                                                       "image_id": item.image_id, "detail": item.detail})
    result = summarize(report)
    if report.unreconciled:
        logger.warning("uploads not reconciled: python -m tools.reconcile --redrive re-drives them", extra=result)
    else:
        logger.info("every upload reconciled", extra=result)
    return result
