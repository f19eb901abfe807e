"""Evaluate quality: join late ground truth to the captured predictions and publish the model's live quality.

Runs on each ground-truth CSV uploaded under ``ground-truth/`` of the data bucket (EventBridge ``Object
Created``). The file's ids are looked up in the captured predictions (the hours its ``inference_time`` column
names, else the ``LOOKBACK_HOURS`` before the upload), the matches are stored under ``RESULTS_S3_URI`` (one
object per ground-truth file, so a re-upload replaces its own rows), and the metrics are computed over every
match stored in the last ``QUALITY_WINDOW_DAYS``, for the model version that served the most recent of them:
``ModelBalancedAccuracy`` (with at least ``MIN_QUALITY_SAMPLES`` matches) and ``ModelMelanomaSensitivity``
(with at least ``MIN_MELANOMA_CASES`` confirmed melanomas), plus their sample sizes. The quality alarms watch
them and start a retraining.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field

from lesion_common.errors import InvalidRequestError
from lesion_common.labels import classes_for
from lesion_common.parsing import parse_event
from lesion_monitoring.cloudwatch import put_metrics
from lesion_monitoring.quality import (
    GroundTruth,
    GroundTruthFormatError,
    current_model_rows,
    join,
    matches,
    parse_ground_truth,
    quality_metrics,
)
from lesion_monitoring.records import ReadStats, hours_between, iter_s3_predictions, split_s3_uri

logger = Logger()
metrics = Metrics()

DATA_BUCKET = os.environ["DATA_BUCKET"]
CAPTURE_S3_URI = os.environ["CAPTURE_S3_URI"]
RECORDS_S3_URI = os.environ["RECORDS_S3_URI"]  # container records (local mode); empty when unused
RESULTS_S3_URI = os.environ["RESULTS_S3_URI"]
LABEL_SET = os.environ["LABEL_SET"]
METRIC_NAMESPACE = os.environ["METRIC_NAMESPACE"]
LOOKBACK_HOURS = int(os.environ["LOOKBACK_HOURS"])
QUALITY_WINDOW_DAYS = int(os.environ["QUALITY_WINDOW_DAYS"])
MIN_QUALITY_SAMPLES = int(os.environ["MIN_QUALITY_SAMPLES"])
MIN_MELANOMA_CASES = int(os.environ["MIN_MELANOMA_CASES"])
MAX_GROUND_TRUTH_BYTES = 50 * 1024 * 1024  # ~1M rows; larger uploads should be split

s3 = boto3.client("s3")
cloudwatch = boto3.client("cloudwatch")


class GroundTruthError(InvalidRequestError):
    """The uploaded ground truth cannot be used (format, size); the message says why."""


class _Bucket(BaseModel):
    name: str = Field(min_length=1)


class _Object(BaseModel):
    model_config = ConfigDict(extra="allow")
    key: str = Field(min_length=1)
    size: int | None = None


class _Detail(BaseModel):
    model_config = ConfigDict(extra="allow")
    bucket: _Bucket
    object: _Object


class ObjectCreated(BaseModel):
    """The EventBridge ``Object Created`` event of a ground-truth upload."""

    model_config = ConfigDict(extra="allow")
    time: datetime | None = None
    detail: _Detail


def read_ground_truth(s3_client: Any, bucket: str, key: str) -> GroundTruth:
    """Download and parse one ground-truth CSV."""
    head = s3_client.head_object(Bucket=bucket, Key=key)
    if head["ContentLength"] > MAX_GROUND_TRUTH_BYTES:
        raise GroundTruthError(f"s3://{bucket}/{key} is {head['ContentLength']} bytes, limit {MAX_GROUND_TRUTH_BYTES}")
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        return parse_ground_truth(body.decode("utf-8"), classes_for(LABEL_SET))
    except (UnicodeDecodeError, GroundTruthFormatError) as err:
        raise GroundTruthError(f"s3://{bucket}/{key}: {err}") from err


def hours_to_search(gt: GroundTruth, uploaded: datetime) -> list[datetime]:
    """Capture hours that can hold the ground truth's predictions, newest first."""
    if gt.times:
        hours: set[datetime] = set()
        for t in gt.times:
            # Data Capture files an hour by when it wrote the file, which can be just after the inference.
            hours.update(hours_between(t - timedelta(hours=1), t + timedelta(hours=1)))
        return sorted(hours, reverse=True)
    return list(reversed(hours_between(uploaded - timedelta(hours=LOOKBACK_HOURS), uploaded + timedelta(hours=1))))


def find_predictions(s3_client: Any, gt: GroundTruth, hours: list[datetime]) -> tuple[dict[str, dict[str, Any]],
                                                                                    ReadStats]:
    """Join ``gt`` to the captured predictions, newest hours first, stopping once every id is matched."""
    stats = ReadStats()
    found: dict[str, dict[str, Any]] = {}
    keep = matches(gt)
    far_past, far_future = datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC)
    for i in range(0, len(hours), 24):  # a day of hours per batch: parallel reads, early stop
        batch = hours[i:i + 24]
        preds = iter_s3_predictions(s3_client, [CAPTURE_S3_URI, RECORDS_S3_URI], far_past, far_future, stats,
                                    hours=batch, keep=keep)
        for key, row in join(gt, preds).items():
            found.setdefault(key, row)
        if len(found) >= len(gt.labels):
            break
    return found, stats


def store_matches(s3_client: Any, rows: dict[str, dict[str, Any]], source: str) -> str:
    """Write this upload's matches (JSON lines) under ``RESULTS_S3_URI``/joined/; returns the key."""
    bucket, prefix = split_s3_uri(RESULTS_S3_URI)
    name = hashlib.sha256(source.encode()).hexdigest()[:24]
    key = f"{prefix.rstrip('/')}/joined/{name}.jsonl".lstrip("/")
    body = "".join(json.dumps({**r, "source": source}) + "\n" for r in rows.values())
    s3_client.put_object(Bucket=bucket, Key=key, Body=body.encode(), ContentType="application/x-ndjson")
    return key


def rolling_rows(s3_client: Any, now: datetime) -> list[dict[str, Any]]:
    """Every stored match of the last ``QUALITY_WINDOW_DAYS``; an id matched twice keeps its newest object."""
    bucket, prefix = split_s3_uri(RESULTS_S3_URI)
    since = now - timedelta(days=QUALITY_WINDOW_DAYS)
    objects: list[dict[str, Any]] = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix.rstrip('/')}/joined/".lstrip("/")):
        objects.extend(o for o in page.get("Contents", []) if o["LastModified"] >= since)
    rows: dict[str, dict[str, Any]] = {}
    for obj in sorted(objects, key=lambda o: o["LastModified"]):
        body = s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        for line in body.splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["id"]] = row
    return list(rows.values())


def quality_result(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of the current model over the rolling rows, and what can be published."""
    version, current = current_model_rows(rows)
    q = quality_metrics(current, classes_for(LABEL_SET))
    publish: dict[str, tuple[float, str]] = {
        "QualitySampleSize": (float(q["n"]), "Count"),
        "QualityMelanomaCases": (float(q["melanoma_cases"]), "Count"),
    }
    reasons = []
    if q["n"] >= MIN_QUALITY_SAMPLES and q["balanced_accuracy"] is not None:
        publish["ModelBalancedAccuracy"] = (q["balanced_accuracy"], "None")
    else:
        reasons.append(f"{q['n']} labelled predictions, MIN_QUALITY_SAMPLES is {MIN_QUALITY_SAMPLES}")
    if q["melanoma_cases"] >= MIN_MELANOMA_CASES and q["melanoma_sensitivity"] is not None:
        publish["ModelMelanomaSensitivity"] = (q["melanoma_sensitivity"], "None")
    else:
        reasons.append(f"{q['melanoma_cases']} confirmed melanomas, MIN_MELANOMA_CASES is {MIN_MELANOMA_CASES}")
    return {"model_version": version, "rows_in_window": len(rows), "quality": q, "metrics": publish,
            "not_published": reasons}


@logger.inject_lambda_context(log_event=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Join one ground-truth upload and publish the rolling quality of the serving model."""
    ev = parse_event(ObjectCreated, event, "invalid Object Created event")
    bucket, key = ev.detail.bucket.name, ev.detail.object.key
    if bucket != DATA_BUCKET:
        raise InvalidRequestError(f"ground truth from bucket {bucket}, expected {DATA_BUCKET}")
    now = datetime.now(UTC)
    uploaded = ev.time or now
    uploaded = uploaded if uploaded.tzinfo else uploaded.replace(tzinfo=UTC)
    gt = read_ground_truth(s3, bucket, key)
    found, stats = find_predictions(s3, gt, hours_to_search(gt, uploaded))
    source = f"s3://{bucket}/{key}"
    stored = store_matches(s3, found, source)
    result = quality_result(rolling_rows(s3, now))
    unmatched = len(gt.labels) - len(found)
    result["metrics"]["GroundTruthUnmatched"] = (float(unmatched), "Count")
    result.update({
        "source": source, "stored": stored, "read": stats.as_dict(),
        "ground_truth": {"rows": gt.rows, "usable": len(gt.labels), "rejected": gt.rejected,
                         "rejected_examples": gt.rejected_examples, "matched": len(found), "unmatched": unmatched},
    })
    result["published"] = put_metrics(cloudwatch, METRIC_NAMESPACE, result["metrics"])
    metrics.add_metric(name="GroundTruthRows", unit=MetricUnit.Count, value=gt.rows)
    if unmatched:
        logger.warning("ground truth without a captured prediction", extra={"unmatched": unmatched,
                                                                           "source": source})
    logger.info("model quality", extra={"quality": {k: v for k, v in result["quality"].items()
                                                    if k in ("n", "balanced_accuracy", "melanoma_sensitivity",
                                                             "melanoma_cases")},
                                        "not_published": result["not_published"]})
    return result
