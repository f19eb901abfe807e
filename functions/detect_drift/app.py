"""Detect drift: compare the last window of captured predictions with the serving model's training reference.

Runs hourly (EventBridge schedule). Reads the predictions captured in ``[end - WINDOW_HOURS, end)`` (Data Capture
files, or the serving container's own records), keeps those of the model version most of them came from, loads
that version's ``reference_stats.json`` from the Model Registry, runs the drift tests of
:mod:`lesion_monitoring.drift`, publishes the scores to CloudWatch (``DriftScore`` is what the drift alarm
watches; >= 1.0 means drift at the ``DRIFT_ALPHA`` level) and writes the full result under ``RESULTS_S3_URI``.
A window with fewer than ``MIN_RECORDS`` predictions is skipped, with the reason logged; its sample size is still
published, so the dashboard shows why there is no score.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field

from lesion_common.parsing import parse_event
from lesion_monitoring.cloudwatch import put_metrics
from lesion_monitoring.drift import DriftBatch, compute_drift, drift_metrics
from lesion_monitoring.records import ReadStats, iter_s3_predictions, split_s3_uri
from lesion_monitoring.reference import load_reference

logger = Logger()
metrics = Metrics()

CAPTURE_S3_URI = os.environ["CAPTURE_S3_URI"]  # Data Capture: s3://<artifacts>/capture/<endpoint>/<variant>/
RECORDS_S3_URI = os.environ["RECORDS_S3_URI"]  # container records (local mode); empty when unused
RESULTS_S3_URI = os.environ["RESULTS_S3_URI"]
MODEL_PACKAGE_GROUP = os.environ["MODEL_PACKAGE_GROUP"]
REFERENCE_S3_URI = os.environ["REFERENCE_S3_URI"]  # empty: the registry's approved package
METRIC_NAMESPACE = os.environ["METRIC_NAMESPACE"]
MIN_RECORDS = int(os.environ["MIN_RECORDS"])
WINDOW_HOURS = int(os.environ["WINDOW_HOURS"])
DRIFT_ALPHA = float(os.environ["DRIFT_ALPHA"])
if MIN_RECORDS < 1 or WINDOW_HOURS < 1 or not 0.0 < DRIFT_ALPHA < 1.0:
    raise ValueError("MIN_RECORDS and WINDOW_HOURS must be >= 1 and DRIFT_ALPHA in (0, 1)")

s3 = boto3.client("s3")
sagemaker = boto3.client("sagemaker")
cloudwatch = boto3.client("cloudwatch")


class DriftRequest(BaseModel):
    """A ``Scheduled Event`` (its ``time`` ends the window) or a manual ``{"windowEnd", "windowHours"}``."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    time: datetime | None = None
    window_end: datetime | None = Field(default=None, alias="windowEnd")
    window_hours: int | None = Field(default=None, alias="windowHours", ge=1, le=24 * 14)


def window_of(req: DriftRequest, now: datetime) -> tuple[datetime, datetime]:
    """``[start, end)`` of the window a request asks for (UTC)."""
    end = req.window_end or req.time or now
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    return end - timedelta(hours=req.window_hours or WINDOW_HOURS), end


def read_window(s3_client: Any, uris: list[str], start: datetime, end: datetime) -> tuple[dict[str | None, DriftBatch],
                                                                                           ReadStats]:
    """The window's predictions, one :class:`DriftBatch` per model version."""
    stats = ReadStats()
    batches: dict[str | None, DriftBatch] = {}
    for p in iter_s3_predictions(s3_client, uris, start, end, stats):
        batch = batches.get(p.model_version)
        if batch is None:
            batch = batches[p.model_version] = DriftBatch()
        batch.add(p)
    return batches, stats


def evaluate(s3_client: Any, sm: Any, start: datetime, end: datetime) -> dict[str, Any]:
    """Read, test and describe one window (publishing and storing are the caller's)."""
    batches, stats = read_window(s3_client, [CAPTURE_S3_URI, RECORDS_S3_URI], start, end)
    versions = Counter({v: b.n for v, b in batches.items()})
    version, n = versions.most_common(1)[0] if versions else (None, 0)
    result: dict[str, Any] = {
        "window": {"start": start.isoformat(), "end": end.isoformat()},
        "read": stats.as_dict(),
        "model_versions": {str(v): c for v, c in versions.items()},
        "model_version": version,
        "n_records": n,
        "min_records": MIN_RECORDS,
    }
    if n < MIN_RECORDS:
        result.update(status="skipped", reason=f"{n} predictions in the window, MIN_RECORDS is {MIN_RECORDS}",
                      drift_score=None)
        return result
    ref = load_reference(s3_client, sm, group=MODEL_PACKAGE_GROUP, model_version=version,
                         override_uri=REFERENCE_S3_URI)
    if version is not None and ref.model_version != version and not REFERENCE_S3_URI:
        logger.warning("no approved package of version %s; compared with version %s", version, ref.model_version)
    drift = compute_drift(batches[version], ref.document, alpha=DRIFT_ALPHA, min_records=MIN_RECORDS)
    result.update(drift)
    result["reference"] = {"uri": ref.uri, "model_version": ref.model_version, "model_package_arn":
                           ref.model_package_arn, "n": ref.document.get("n")}
    if drift["drift_score"] is None:
        result.update(status="skipped", reason="no test family had enough records: " + "; ".join(
            f"{k}: {v}" for k, v in drift["skipped"].items()))
    else:
        result["status"] = "evaluated"
    return result


def store(s3_client: Any, result: dict[str, Any], end: datetime) -> str:
    """Write the result as JSON under ``RESULTS_S3_URI``; returns its URI."""
    bucket, prefix = split_s3_uri(RESULTS_S3_URI)
    key = f"{prefix.rstrip('/')}/{end:%Y/%m/%d/%H%M%S}.json".lstrip("/")
    s3_client.put_object(Bucket=bucket, Key=key, Body=json.dumps(result, default=str).encode(),
                         ContentType="application/json")
    return f"s3://{bucket}/{key}"


@logger.inject_lambda_context(log_event=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Evaluate the window ending at the event's time; publish and store the result."""
    req = parse_event(DriftRequest, event or {}, "invalid drift request")
    start, end = window_of(req, datetime.now(UTC))
    result = evaluate(s3, sagemaker, start, end)
    result["published"] = put_metrics(cloudwatch, METRIC_NAMESPACE, drift_metrics(result))
    result["result_uri"] = store(s3, result, end)
    metrics.add_metric(name="CaptureFilesRead", unit=MetricUnit.Count, value=result["read"]["files"])
    if result["read"]["bad_lines"]:
        logger.warning("unreadable capture lines", extra={"read": result["read"]})
    if result["status"] == "skipped":
        logger.info("drift window skipped", extra={"reason": result["reason"], "window": result["window"]})
    else:
        logger.info("drift window evaluated", extra={
            "drift_score": result["drift_score"], "drifted": result["drifted"], "n_records": result["n_records"],
            "scores": {k: v["score"] for k, v in result["tests"].items()}})
    return result
