"""Evaluate: read the metrics the training job wrote on its test split, and those of the current model.

The job writes ``metrics.json`` into its small ``output.tar.gz`` (next to ``model.tar.gz``) as well as into the
model archive, so this handler never downloads the weights. Its input is the finished job as the
``createTrainingJob.sync`` state returns it (DescribeTrainingJob's shape), so it needs no SageMaker call.

The role may list the job's prefix of the artifacts bucket: without ``s3:ListBucket`` S3 answers a missing key
with 403 AccessDenied, and a job that wrote no output could not be told from a policy that denies the read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from datetime import UTC, datetime
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lesion_common.errors import MetricsMissingError
from lesion_common.model_quality import sagemaker_statistics
from lesion_common.parsing import parse_event
from lesion_common.training_jobs import TrainingOutputAccessDeniedError, TrainingOutputMissingError

logger = Logger()
metrics = Metrics()

ARTIFACTS_BUCKET = os.environ["ARTIFACTS_BUCKET"]

s3 = boto3.client("s3")

GATED_METRICS = ("balanced_accuracy", "macro_auc", "melanoma_sensitivity")


class SplitMetrics(BaseModel):
    """One split's block of metrics.json (only what the pipeline reads is required)."""

    model_config = ConfigDict(extra="allow")
    balanced_accuracy: float = Field(ge=0, le=1)
    macro_auc: float = Field(ge=0, le=1)
    melanoma_sensitivity: float = Field(ge=0, le=1)
    melanoma_specificity: float = Field(ge=0, le=1)
    accuracy: float = Field(ge=0, le=1)


class TestSplitMetrics(SplitMetrics):
    """The candidate's test block: also the decided confusion matrix, for the registry's model-quality file."""

    confusion_matrix: list[list[int]]


class JobMetrics(BaseModel):
    """metrics.json as the training image writes it."""

    model_config = ConfigDict(extra="allow")
    classes: list[str]
    architecture: str = ""
    n_test: int = Field(ge=1)
    test: TestSplitMetrics
    baseline: SplitMetrics | None = None


class EvaluateEvent(BaseModel):
    """What the state machine passes in: the finished job's name and model artifact."""

    training_job_name: str = Field(alias="trainingJobName", min_length=1)
    model_data_url: str = Field(alias="modelDataUrl", pattern=r"^s3://[^/]+/.+/output/model\.tar\.gz$")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def read_job_metrics(client: Any, output_uri: str) -> tuple[JobMetrics, str | None]:
    """Extract and check metrics.json from the job's output.tar.gz, with the sha256 of its manifest.json (the
    model directory's list of file digests; None for a job that wrote none)."""
    bucket, key = split_s3_uri(output_uri)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code")
        if code == "NoSuchKey":
            raise TrainingOutputMissingError(f"{output_uri} does not exist") from err
        if code == "AccessDenied":
            raise TrainingOutputAccessDeniedError(f"reading {output_uri} was denied: {err}") from err
        raise
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
            member = next((m for m in tar.getmembers() if m.name.lstrip("./") == "metrics.json"), None)
            if member is None:
                raise MetricsMissingError(f"{output_uri} has no metrics.json")
            handle = tar.extractfile(member)
            raw = handle.read() if handle else b""
            manifest = next((m for m in tar.getmembers() if m.name.lstrip("./") == "manifest.json"), None)
            manifest_handle = tar.extractfile(manifest) if manifest is not None else None
            digest = hashlib.sha256(manifest_handle.read()).hexdigest() if manifest_handle else None
        return JobMetrics.model_validate_json(raw), digest
    except (tarfile.TarError, ValidationError, ValueError) as err:
        raise MetricsMissingError(f"unreadable metrics.json in {output_uri}: {err}") from err


def evaluate(client: Any, job_name: str, model_data_url: str) -> dict[str, Any]:
    """Collect the candidate's and the baseline's test metrics and store the report for the Model Registry."""
    output_uri = model_data_url.removesuffix("model.tar.gz") + "output.tar.gz"
    report, manifest_sha256 = read_job_metrics(client, output_uri)
    metrics_key = f"evaluations/{job_name}/metrics.json"
    client.put_object(
        Bucket=ARTIFACTS_BUCKET,
        Key=metrics_key,
        Body=report.model_dump_json(indent=2).encode(),
        ContentType="application/json",
    )
    try:
        quality = sagemaker_statistics(report.test.confusion_matrix, report.classes,
                                       datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    except ValueError as err:
        raise MetricsMissingError(f"metrics.json in {output_uri}: test confusion matrix: {err}") from err
    quality_key = f"evaluations/{job_name}/model_quality.json"
    client.put_object(Bucket=ARTIFACTS_BUCKET, Key=quality_key, Body=json.dumps(quality, indent=2).encode(),
                      ContentType="application/json")
    return {
        "trainingJobName": job_name,
        "modelDataUrl": model_data_url,
        "metricsS3Uri": f"s3://{ARTIFACTS_BUCKET}/{metrics_key}",
        "modelQualityS3Uri": f"s3://{ARTIFACTS_BUCKET}/{quality_key}",
        "architecture": report.architecture,
        "classes": report.classes,
        "nTest": report.n_test,
        "metrics": report.test.model_dump(include=set(SplitMetrics.model_fields)),
        "baseline": report.baseline.model_dump(include=set(SplitMetrics.model_fields)) if report.baseline else None,
        "manifestSha256": manifest_sha256,
    }


@logger.inject_lambda_context
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Return the candidate's test metrics, the baseline's, and where the full report is."""
    req = parse_event(EvaluateEvent, event, "invalid evaluate request")
    result = evaluate(s3, req.training_job_name, req.model_data_url)
    for name in GATED_METRICS:
        metrics.add_metric(name=f"Candidate_{name}", unit=MetricUnit.Count, value=result["metrics"][name])
    return result
