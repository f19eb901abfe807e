"""Launch training: start the SageMaker training job for this execution and park the task token.

The state calls this with ``lambda:invoke.waitForTaskToken``; the execution resumes when the training job's
state-change event reaches handle_training_event, which looks the token up in the training-jobs table.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lesion_common.errors import InvalidRequestError
from lesion_common.training_jobs import TERMINAL_STATUSES, complete_task, job_name_for_execution

logger = Logger()
metrics = Metrics()

TRAINING_IMAGE_URI = os.environ["TRAINING_IMAGE_URI"]
TRAINING_INSTANCE_TYPE = os.environ["TRAINING_INSTANCE_TYPE"]
TRAINING_INSTANCE_COUNT = int(os.environ["TRAINING_INSTANCE_COUNT"])
TRAINING_VOLUME_GB = int(os.environ["TRAINING_VOLUME_GB"])
MAX_RUNTIME_SECONDS = int(os.environ["MAX_RUNTIME_SECONDS"])
MAX_WAIT_SECONDS = int(os.environ["MAX_WAIT_SECONDS"])
USE_SPOT = os.environ["USE_SPOT"].lower() == "true"
SAGEMAKER_ROLE_ARN = os.environ["SAGEMAKER_ROLE_ARN"]
ARTIFACTS_BUCKET = os.environ["ARTIFACTS_BUCKET"]
KMS_KEY_ARN = os.environ["KMS_KEY_ARN"]
TRAINING_JOBS_TABLE = os.environ["TRAINING_JOBS_TABLE"]
MODEL_PACKAGE_GROUP = os.environ["MODEL_PACKAGE_GROUP"]
JOB_NAME_PREFIX = os.environ["JOB_NAME_PREFIX"]
HYPERPARAMETERS: dict[str, str] = json.loads(os.environ["HYPERPARAMETERS"])
METRIC_DEFINITIONS: list[dict[str, str]] = json.loads(os.environ["METRIC_DEFINITIONS"])
SUBNET_IDS = [s for s in os.environ["SUBNET_IDS"].split(",") if s]
SECURITY_GROUP_IDS = [s for s in os.environ["SECURITY_GROUP_IDS"].split(",") if s]
# Tokens outlive the longest job (spot waits included) by a day, then DynamoDB's TTL removes them.
TOKEN_TTL_SECONDS = MAX_WAIT_SECONDS + 86400

sagemaker = boto3.client("sagemaker")
sfn = boto3.client("stepfunctions")
table = boto3.resource("dynamodb").Table(TRAINING_JOBS_TABLE)


class Dataset(BaseModel):
    """The part of check_data's output this step needs."""

    model_config = ConfigDict(populate_by_name=True)
    manifests_uri: str = Field(alias="manifestsUri", pattern=r"^s3://")
    images_manifest_uri: str = Field(alias="imagesManifestUri", pattern=r"^s3://")
    label_set: str = Field(alias="labelSet")
    hyperparameters: dict[str, str] = Field(default_factory=dict)


class LaunchEvent(BaseModel):
    """What the state machine passes in."""

    task_token: str = Field(alias="taskToken", min_length=1)
    execution_name: str = Field(alias="executionName", min_length=1)
    execution_arn: str = Field(alias="executionArn", min_length=1)
    data: Dataset


def approved_model_data(sm: Any, group: str) -> str | None:
    """S3 URI of the newest Approved model in the group: the baseline the candidate is compared against."""
    try:
        resp = sm.list_model_packages(
            ModelPackageGroupName=group,
            ModelApprovalStatus="Approved",
            SortBy="CreationTime",
            SortOrder="Descending",
            MaxResults=1,
        )
    except sm.exceptions.ClientError as err:
        if "does not exist" in str(err):
            return None
        raise
    summaries = resp.get("ModelPackageSummaryList", [])
    if not summaries:
        return None
    pkg = sm.describe_model_package(ModelPackageName=summaries[0]["ModelPackageArn"])
    url: str = pkg["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
    return url


def training_job_request(job_name: str, req: LaunchEvent, baseline: str | None) -> dict[str, Any]:
    """The CreateTrainingJob request for this execution."""
    hyperparameters = {**HYPERPARAMETERS, **req.data.hyperparameters, "label_set": req.data.label_set}
    channels: list[dict[str, Any]] = [
        {
            "ChannelName": "manifests",
            "DataSource": {
                "S3DataSource": {
                    "S3DataType": "S3Prefix",
                    "S3Uri": req.data.manifests_uri,
                    "S3DataDistributionType": "FullyReplicated",
                }
            },
            "ContentType": "text/csv",
        },
        {
            "ChannelName": "images",
            "DataSource": {
                "S3DataSource": {
                    "S3DataType": "ManifestFile",
                    "S3Uri": req.data.images_manifest_uri,
                    "S3DataDistributionType": "FullyReplicated",
                }
            },
            "ContentType": "image/jpeg",
        },
    ]
    if baseline:
        channels.append(
            {
                "ChannelName": "baseline",
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": baseline,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            }
        )
    request: dict[str, Any] = {
        "TrainingJobName": job_name,
        "AlgorithmSpecification": {
            "TrainingImage": TRAINING_IMAGE_URI,
            "TrainingInputMode": "File",
            "MetricDefinitions": METRIC_DEFINITIONS,
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "RoleArn": SAGEMAKER_ROLE_ARN,
        "HyperParameters": {k: str(v) for k, v in hyperparameters.items()},
        "InputDataConfig": channels,
        "OutputDataConfig": {"S3OutputPath": f"s3://{ARTIFACTS_BUCKET}/training-jobs/", "KmsKeyId": KMS_KEY_ARN},
        "ResourceConfig": {
            "InstanceType": TRAINING_INSTANCE_TYPE,
            "InstanceCount": TRAINING_INSTANCE_COUNT,
            "VolumeSizeInGB": TRAINING_VOLUME_GB,
            "VolumeKmsKeyId": KMS_KEY_ARN,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": MAX_RUNTIME_SECONDS},
        "EnableNetworkIsolation": True,
        "EnableInterContainerTrafficEncryption": TRAINING_INSTANCE_COUNT > 1,
        "EnableManagedSpotTraining": USE_SPOT,
        "CheckpointConfig": {
            "S3Uri": f"s3://{ARTIFACTS_BUCKET}/checkpoints/{job_name}/",
            "LocalPath": "/opt/ml/checkpoints",
        },
        "Tags": [
            {"Key": "ExecutionArn", "Value": req.execution_arn[-256:]},
            {"Key": "project", "Value": JOB_NAME_PREFIX},
        ],
    }
    if USE_SPOT:
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = MAX_WAIT_SECONDS
    if SUBNET_IDS:
        request["VpcConfig"] = {"Subnets": SUBNET_IDS, "SecurityGroupIds": SECURITY_GROUP_IDS}
    return request


def launch(sm: Any, step_functions: Any, tbl: Any, req: LaunchEvent) -> dict[str, Any]:
    """Create the job unless this execution already did, store the token, and answer at once if it is done.

    Returns
    -------
    dict
        ``trainingJobName`` and whether this call created the job.
    """
    job_name = job_name_for_execution(JOB_NAME_PREFIX, req.execution_name)
    tbl.put_item(
        Item={
            "TrainingJobName": job_name,
            "TaskToken": req.task_token,
            "ExecutionArn": req.execution_arn,
            "Status": "WAITING",
            "ExpiresAt": int(time.time()) + TOKEN_TTL_SECONDS,
        }
    )
    try:
        existing = sm.describe_training_job(TrainingJobName=job_name)
    except sm.exceptions.ClientError as err:
        if "Could not find" not in str(err):
            raise
        existing = None
    if existing is None:
        baseline = approved_model_data(sm, MODEL_PACKAGE_GROUP)
        sm.create_training_job(**training_job_request(job_name, req, baseline))
        logger.info("training job created", extra={"job": job_name, "baseline": baseline})
        return {"trainingJobName": job_name, "created": True}
    # A retried state gets a new token: if the job already ended, its event went to the old one.
    if existing["TrainingJobStatus"] in TERMINAL_STATUSES:
        complete_task(step_functions, tbl, existing, req.task_token)
    logger.info("training job already exists", extra={"job": job_name, "status": existing["TrainingJobStatus"]})
    return {"trainingJobName": job_name, "created": False}


@logger.inject_lambda_context
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Start (or find) the training job; the execution waits for its token."""
    try:
        req = LaunchEvent.model_validate(event)
    except ValidationError as err:
        raise InvalidRequestError(f"invalid launch request: {err}") from err
    return launch(sagemaker, sfn, table, req)
