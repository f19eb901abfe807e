"""Register: add the gated model to the Model Package Group with its metrics attached.

The package is ``PendingManualApproval`` unless the stack's ``AutoApprove`` says otherwise; approving it (in the
console or with ``aws sagemaker update-model-package``) is what starts a deployment.

The package's supported real-time instance type is the one the stack's endpoint runs on (``EndpointInstanceType``,
also what create_model_config puts in the endpoint configuration): one source, so the registry never advertises a
type the deployment does not use.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field

from lesion_common.parsing import parse_event

logger = Logger()
metrics = Metrics()

MODEL_PACKAGE_GROUP = os.environ["MODEL_PACKAGE_GROUP"]
INFERENCE_IMAGE_URI = os.environ["INFERENCE_IMAGE_URI"]
AUTO_APPROVE = os.environ["AUTO_APPROVE"].lower() == "true"
IDEMPOTENCY_TABLE = os.environ["IDEMPOTENCY_TABLE"]
ENDPOINT_INSTANCE_TYPE = os.environ["ENDPOINT_INSTANCE_TYPE"]

sagemaker = boto3.client("sagemaker")
# Events and retries can deliver the same registration twice; one training job gives one package.
persistence = DynamoDBPersistenceLayer(table_name=IDEMPOTENCY_TABLE)
idempotency_config = IdempotencyConfig(event_key_jmespath="trainingJobName", expires_after_seconds=7 * 24 * 3600)


class Evaluation(BaseModel):
    """evaluate_model's output, as far as registration needs it."""

    training_job_name: str = Field(alias="trainingJobName", min_length=1)
    model_data_url: str = Field(alias="modelDataUrl", pattern=r"^s3://")
    metrics_s3_uri: str = Field(alias="metricsS3Uri", pattern=r"^s3://")
    model_quality_s3_uri: str = Field(alias="modelQualityS3Uri", pattern=r"^s3://")
    architecture: str = ""
    metrics: dict[str, float]
    baseline: dict[str, float] | None = None
    manifest_sha256: str | None = Field(alias="manifestSha256", default=None, pattern=r"^[0-9a-f]{64}$")


class RegisterEvent(BaseModel):
    """What the state machine passes in."""

    execution_arn: str = Field(alias="executionArn", min_length=1)
    trigger_type: str = Field(alias="triggerType", default="manual")
    evaluation: Evaluation


def package_request(req: RegisterEvent) -> dict[str, Any]:
    """The CreateModelPackage request."""
    ev = req.evaluation
    properties = {
        "TrainingJobName": ev.training_job_name,
        "ExecutionArn": req.execution_arn[-256:],
        "Trigger": req.trigger_type,
        "Architecture": ev.architecture or "unknown",
        "MetricsS3Uri": ev.metrics_s3_uri[:256],  # our full report; ModelQuality holds SageMaker's format
        **{f"test_{k}": f"{v:.4f}" for k, v in sorted(ev.metrics.items())},
    }
    container: dict[str, Any] = {"Image": INFERENCE_IMAGE_URI, "ModelDataUrl": ev.model_data_url}
    if ev.manifest_sha256:
        # The serving container refuses a model directory whose manifest.json has another digest: the registry
        # records which exact files were gated and approved.
        properties["ModelManifestSha256"] = ev.manifest_sha256
        container["Environment"] = {"MODEL_MANIFEST_SHA256": ev.manifest_sha256}
    return {
        "ModelPackageGroupName": MODEL_PACKAGE_GROUP,
        "ModelPackageDescription": f"{ev.architecture} from {ev.training_job_name}"[:1024],
        "InferenceSpecification": {
            "Containers": [container],
            "SupportedContentTypes": ["image/jpeg", "image/png", "application/x-image", "application/json"],
            "SupportedResponseMIMETypes": ["application/json"],
            "SupportedRealtimeInferenceInstanceTypes": [ENDPOINT_INSTANCE_TYPE],
        },
        "ModelApprovalStatus": "Approved" if AUTO_APPROVE else "PendingManualApproval",
        "ModelMetrics": {
            "ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": ev.model_quality_s3_uri}}
        },
        "CustomerMetadataProperties": properties,
    }


@idempotent_function(data_keyword_argument="request", persistence_store=persistence, config=idempotency_config)
def register(request: dict[str, Any]) -> dict[str, Any]:
    """Create the model package (once per training job)."""
    req = RegisterEvent.model_validate(request)
    resp = sagemaker.create_model_package(**package_request(req))
    arn = resp["ModelPackageArn"]
    described = sagemaker.describe_model_package(ModelPackageName=arn)
    return {
        "modelPackageArn": arn,
        "modelPackageVersion": described.get("ModelPackageVersion"),
        "approvalStatus": described.get("ModelApprovalStatus"),
        "modelPackageGroup": MODEL_PACKAGE_GROUP,
    }


@logger.inject_lambda_context(log_event=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Register the candidate; a repeated request returns the first registration."""
    idempotency_config.register_lambda_context(context)
    parse_event(RegisterEvent, event, "invalid register request")
    result = register(request={"trainingJobName": event["evaluation"]["trainingJobName"], **event})
    metrics.add_metric(name="ModelRegistered", unit=MetricUnit.Count, value=1)
    return result
