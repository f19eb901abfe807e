"""Create the SageMaker model and endpoint configuration for an approved model package version.

Data Capture is on (sampling percentage from the stack), the endpoint's storage volume is encrypted with the
stack's key, and the container runs with network isolation. Names derive from the package version, so a repeat
finds its own work.

Instance types with local NVMe instance storage (g4dn, g5, g6, p4d, ...) have no EBS volume to encrypt: their
instance store is encrypted by the instance's hardware, and SageMaker rejects a ``KmsKeyId`` in
CreateEndpointConfig for them (botocore's documentation of ``CreateEndpointConfigInput.KmsKeyId``), so the key is
left out there. Data Capture's ``KmsKeyId`` (S3 encryption of the captured requests) is kept for every type.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field

from lesion_common.deployment import VARIANT, is_already_existing, sagemaker_errors, versioned_name
from lesion_common.instances import has_local_nvme
from lesion_common.parsing import parse_event

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
# Empty: SageMaker's default hosting AMI. A CUDA 12 GPU image needs a newer driver than the default AMI of the
# g4dn/g5/p4d families (470), e.g. al2-ami-sagemaker-inference-gpu-3-1 (driver 550).
INFERENCE_AMI_VERSION = os.environ["INFERENCE_AMI_VERSION"]
# Decided once, at cold start (an unknown instance type fails here, not mid-deployment).
LOCAL_NVME = has_local_nvme(INSTANCE_TYPE)

sagemaker = boto3.client("sagemaker")


class PackageApproved(BaseModel):
    """The ``SageMaker Model Package State Change`` detail this step needs."""

    model_config = ConfigDict(extra="allow")
    ModelPackageArn: str = Field(min_length=1)
    ModelPackageGroupName: str = Field(min_length=1)
    ModelPackageVersion: int = Field(ge=1)
    ModelApprovalStatus: str = Field(pattern="^Approved$")


def endpoint_config_request(name: str) -> dict[str, Any]:
    """The CreateEndpointConfig request for the model ``name`` (the volume key only where SageMaker takes one)."""
    config: dict[str, Any] = {
        "EndpointConfigName": name,
        "ProductionVariants": [{
            "VariantName": VARIANT,
            "ModelName": name,
            "InstanceType": INSTANCE_TYPE,
            "InitialInstanceCount": INITIAL_INSTANCE_COUNT,
        }],
        "DataCaptureConfig": {
            "EnableCapture": CAPTURE_PERCENT > 0,
            "InitialSamplingPercentage": max(CAPTURE_PERCENT, 1),
            "DestinationS3Uri": CAPTURE_S3_URI,
            "KmsKeyId": KMS_KEY_ARN,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
        },
    }
    if INFERENCE_AMI_VERSION:
        config["ProductionVariants"][0]["InferenceAmiVersion"] = INFERENCE_AMI_VERSION
    if not LOCAL_NVME:
        config["KmsKeyId"] = KMS_KEY_ARN
    return config


def _create_once(call: Any, action: str, request: dict[str, Any]) -> None:
    """Create, treating SageMaker's "already existing" answer as the earlier attempt's success."""
    try:
        with sagemaker_errors(action):
            call(**request)
    except ClientError as err:
        if not is_already_existing(err):
            raise


def create(sm: Any, pkg: PackageApproved) -> dict[str, Any]:
    """Create (or find) the model and the endpoint configuration for this version."""
    name = versioned_name(PROJECT_NAME, pkg.ModelPackageGroupName, pkg.ModelPackageVersion)
    with sagemaker_errors("DescribeModelPackage"):
        described = sm.describe_model_package(ModelPackageName=pkg.ModelPackageArn)
    container = described["InferenceSpecification"]["Containers"][0]
    supported = described["InferenceSpecification"].get("SupportedRealtimeInferenceInstanceTypes") or []
    if supported and INSTANCE_TYPE not in supported:
        # Registered before EndpointInstanceType changed: the endpoint follows the stack, the registry keeps its list.
        logger.warning("the package does not list the endpoint's instance type",
                       extra={"instanceType": INSTANCE_TYPE, "supported": supported})
    model: dict[str, Any] = {
        "ModelName": name,
        "ExecutionRoleArn": SAGEMAKER_ROLE_ARN,
        "PrimaryContainer": {
            "Image": container["Image"],
            "ModelDataUrl": container["ModelDataUrl"],
            # The package's own environment (the manifest digest the server enforces) comes first.
            "Environment": {**(container.get("Environment") or {}), "MODEL_VERSION": str(pkg.ModelPackageVersion),
                            "MODEL_PACKAGE_ARN": pkg.ModelPackageArn},
        },
        "EnableNetworkIsolation": True,
        "Tags": [{"Key": "ModelPackageArn", "Value": pkg.ModelPackageArn[-256:]}],
    }
    if SUBNET_IDS:
        model["VpcConfig"] = {"Subnets": SUBNET_IDS, "SecurityGroupIds": SECURITY_GROUP_IDS}
    _create_once(sm.create_model, "CreateModel", model)
    _create_once(sm.create_endpoint_config, "CreateEndpointConfig", endpoint_config_request(name))
    return {
        "modelName": name,
        "endpointConfigName": name,
        "instanceType": INSTANCE_TYPE,
        "volumeEncryption": "instance-hardware (local NVMe)" if LOCAL_NVME else "kms",
        "modelPackageArn": pkg.ModelPackageArn,
        "modelPackageVersion": pkg.ModelPackageVersion,
        "modelDataUrl": container["ModelDataUrl"],
    }


@logger.inject_lambda_context(log_event=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Model and endpoint configuration for the approved version."""
    pkg = parse_event(PackageApproved, event, "not an approved model package")
    return create(sagemaker, pkg)
