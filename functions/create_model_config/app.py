"""Create the SageMaker model and endpoint configuration for an approved model package version.

Data Capture is on (sampling percentage from the stack), volumes are encrypted with the stack's key, and the
container runs with network isolation. Names derive from the package version, so a repeat finds its own work.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lesion_common.deployment import VARIANT, versioned_name
from lesion_common.errors import InvalidRequestError

logger = Logger()

PROJECT_NAME = os.environ["PROJECT_NAME"]
SAGEMAKER_ROLE_ARN = os.environ["SAGEMAKER_ROLE_ARN"]
KMS_KEY_ARN = os.environ["KMS_KEY_ARN"]
INSTANCE_TYPE = os.environ["ENDPOINT_INSTANCE_TYPE"]
INITIAL_INSTANCE_COUNT = int(os.environ["ENDPOINT_INITIAL_INSTANCE_COUNT"])
CAPTURE_PERCENT = int(os.environ["DATA_CAPTURE_PERCENT"])
CAPTURE_S3_URI = os.environ["DATA_CAPTURE_S3_URI"]
SUBNET_IDS = [s for s in os.environ["SUBNET_IDS"].split(",") if s]
SECURITY_GROUP_IDS = [s for s in os.environ["SECURITY_GROUP_IDS"].split(",") if s]

sagemaker = boto3.client("sagemaker")


class PackageApproved(BaseModel):
    """The ``SageMaker Model Package State Change`` detail this step needs."""

    model_config = ConfigDict(extra="allow")
    ModelPackageArn: str = Field(min_length=1)
    ModelPackageGroupName: str = Field(min_length=1)
    ModelPackageVersion: int = Field(ge=1)
    ModelApprovalStatus: str = Field(pattern="^Approved$")


def _exists(err: ClientError) -> bool:
    return "already exist" in err.response["Error"].get("Message", "")


def create(sm: Any, pkg: PackageApproved) -> dict[str, Any]:
    """Create (or find) the model and the endpoint configuration for this version."""
    name = versioned_name(PROJECT_NAME, pkg.ModelPackageGroupName, pkg.ModelPackageVersion)
    described = sm.describe_model_package(ModelPackageName=pkg.ModelPackageArn)
    container = described["InferenceSpecification"]["Containers"][0]
    model: dict[str, Any] = {
        "ModelName": name,
        "ExecutionRoleArn": SAGEMAKER_ROLE_ARN,
        "PrimaryContainer": {
            "Image": container["Image"],
            "ModelDataUrl": container["ModelDataUrl"],
            "Environment": {"MODEL_VERSION": str(pkg.ModelPackageVersion), "MODEL_PACKAGE_ARN": pkg.ModelPackageArn},
        },
        "EnableNetworkIsolation": True,
        "Tags": [{"Key": "ModelPackageArn", "Value": pkg.ModelPackageArn[-256:]}],
    }
    if SUBNET_IDS:
        model["VpcConfig"] = {"Subnets": SUBNET_IDS, "SecurityGroupIds": SECURITY_GROUP_IDS}
    try:
        sm.create_model(**model)
    except ClientError as err:
        if not _exists(err):
            raise
    config = {
        "EndpointConfigName": name,
        "ProductionVariants": [{
            "VariantName": VARIANT,
            "ModelName": name,
            "InstanceType": INSTANCE_TYPE,
            "InitialInstanceCount": INITIAL_INSTANCE_COUNT,
        }],
        "KmsKeyId": KMS_KEY_ARN,
        "DataCaptureConfig": {
            "EnableCapture": CAPTURE_PERCENT > 0,
            "InitialSamplingPercentage": max(CAPTURE_PERCENT, 1),
            "DestinationS3Uri": CAPTURE_S3_URI,
            "KmsKeyId": KMS_KEY_ARN,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
        },
    }
    try:
        sm.create_endpoint_config(**config)
    except ClientError as err:
        if not _exists(err):
            raise
    return {
        "modelName": name,
        "endpointConfigName": name,
        "instanceType": INSTANCE_TYPE,
        "modelPackageArn": pkg.ModelPackageArn,
        "modelPackageVersion": pkg.ModelPackageVersion,
        "modelDataUrl": container["ModelDataUrl"],
    }


@logger.inject_lambda_context(log_event=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Model and endpoint configuration for the approved version."""
    try:
        pkg = PackageApproved.model_validate(event)
    except ValidationError as err:
        raise InvalidRequestError(f"not an approved model package: {err}") from err
    return create(sagemaker, pkg)
