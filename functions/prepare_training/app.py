"""Prepare training: build the CreateTrainingJob request for this execution; the state machine runs it.

The next state is ``sagemaker:createTrainingJob.sync``: Step Functions creates the job, waits for it to end, and
stops it when the execution is aborted or the state times out. This function only decides the request. Its job
name is derived from the execution name, so a retried state or a redriven execution finds the job it already
started: a Completed one is reused (``existingJob``), a Failed or Stopped one is followed by a fresh name
(``-r2``, ``-r3``, ...), and one still running is a ``TrainingJobStillRunningError`` the state retries later.
"""

from __future__ import annotations

import json
import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field

from lesion_common.errors import PipelineError
from lesion_common.instances import has_local_nvme
from lesion_common.parsing import parse_event
from lesion_common.registry import model_data_url, newest_approved_package
from lesion_common.training_jobs import (
    RUNNING_STATUSES,
    TrainingJobStillRunningError,
    describe_job_or_none,
    job_name_for_execution,
    metric_definitions,
    training_output,
)

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
MODEL_PACKAGE_GROUP = os.environ["MODEL_PACKAGE_GROUP"]
JOB_NAME_PREFIX = os.environ["JOB_NAME_PREFIX"]
HYPERPARAMETERS: dict[str, str] = json.loads(os.environ["HYPERPARAMETERS"])
SUBNET_IDS = [s for s in os.environ["SUBNET_IDS"].split(",") if s]
SECURITY_GROUP_IDS = [s for s in os.environ["SECURITY_GROUP_IDS"].split(",") if s]
# Read from the layer at cold start: 21 regexes would take most of Lambda's 4 KB environment.
METRIC_DEFINITIONS = metric_definitions()
# The .sync state's timeout: past the job's own limits (spot waiting included), plus time to stop and upload.
STATE_TIMEOUT_SECONDS = MAX_RUNTIME_SECONDS + (MAX_WAIT_SECONDS if USE_SPOT else 0) + 3600
# A redriven execution whose jobs keep failing gets a fresh name each time; past this many, something is wrong.
MAX_ATTEMPTS = 20

sagemaker = boto3.client("sagemaker")


class Dataset(BaseModel):
    """The part of check_data's output this step needs."""

    model_config = ConfigDict(populate_by_name=True)
    manifests_uri: str = Field(alias="manifestsUri", pattern=r"^s3://")
    images_manifest_uri: str = Field(alias="imagesManifestUri", pattern=r"^s3://")
    label_set: str = Field(alias="labelSet")
    hyperparameters: dict[str, str] = Field(default_factory=dict)


class PrepareEvent(BaseModel):
    """What the state machine passes in."""

    execution_name: str = Field(alias="executionName", min_length=1)
    execution_arn: str = Field(alias="executionArn", min_length=1)
    data: Dataset


class TooManyTrainingAttemptsError(PipelineError):
    """Every derived job name up to MAX_ATTEMPTS is taken by a failed or stopped job."""


def approved_model_data(sm: Any, group: str) -> str | None:
    """S3 URI of the newest Approved model in the group: the baseline the candidate is compared against.

    The group is a resource of the stack, so any error (AWS documents none for ListModelPackages) is raised.
    """
    newest = newest_approved_package(sm, group)
    if newest is None:
        return None
    return model_data_url(sm.describe_model_package(ModelPackageName=newest["ModelPackageArn"]))


def _s3_channel(name: str, uri: str, data_type: str, content_type: str | None) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {"S3DataType": data_type, "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
        },
    }
    if content_type:
        channel["ContentType"] = content_type
    return channel


def resource_config() -> dict[str, Any]:
    """ResourceConfig; the volume key only where an EBS volume is attached.

    SageMaker rejects ``VolumeKmsKeyId`` for instance types with local NVMe storage (ml.g5, ml.p4d, ...), whose
    instance store is encrypted by the instance's hardware (SECURITY.md).
    """
    config: dict[str, Any] = {
        "InstanceType": TRAINING_INSTANCE_TYPE,
        "InstanceCount": TRAINING_INSTANCE_COUNT,
        "VolumeSizeInGB": TRAINING_VOLUME_GB,
    }
    if not has_local_nvme(TRAINING_INSTANCE_TYPE):
        config["VolumeKmsKeyId"] = KMS_KEY_ARN
    return config


def training_job_request(job_name: str, req: PrepareEvent, baseline: str | None) -> dict[str, Any]:
    """The CreateTrainingJob request for this execution (every top-level field the ASL passes on is present)."""
    hyperparameters = {**HYPERPARAMETERS, **req.data.hyperparameters, "label_set": req.data.label_set}
    channels = [
        _s3_channel("manifests", req.data.manifests_uri, "S3Prefix", "text/csv"),
        _s3_channel("images", req.data.images_manifest_uri, "ManifestFile", "image/jpeg"),
    ]
    if baseline:
        channels.append(_s3_channel("baseline", baseline, "S3Prefix", None))
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": MAX_RUNTIME_SECONDS}
    if USE_SPOT:
        stopping["MaxWaitTimeInSeconds"] = MAX_WAIT_SECONDS
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
        "ResourceConfig": resource_config(),
        "StoppingCondition": stopping,
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
    if SUBNET_IDS:
        request["VpcConfig"] = {"Subnets": SUBNET_IDS, "SecurityGroupIds": SECURITY_GROUP_IDS}
    return request


def prepare(sm: Any, req: PrepareEvent) -> dict[str, Any]:
    """Decide this execution's job: reuse a completed one, or build the request for a new one.

    Returns
    -------
    dict
        ``{"trainingJobName", "existingJob"}`` when this execution's job already completed (the ASL skips
        training), else ``{"trainingJobName", "timeoutSeconds", "request"}``: the CreateTrainingJob request and
        the ``.sync`` state's timeout.

    Raises
    ------
    TrainingJobStillRunningError
        When this execution's job is still InProgress or Stopping.
    """
    for attempt in range(1, MAX_ATTEMPTS + 1):
        name = job_name_for_execution(JOB_NAME_PREFIX, req.execution_name, attempt)
        job = describe_job_or_none(sm, name)
        if job is None:
            baseline = approved_model_data(sm, MODEL_PACKAGE_GROUP)
            logger.info("training job prepared", extra={"job": name, "attempt": attempt, "baseline": baseline})
            return {"trainingJobName": name, "timeoutSeconds": STATE_TIMEOUT_SECONDS,
                    "request": training_job_request(name, req, baseline)}
        status = job["TrainingJobStatus"]
        if status == "Completed":
            logger.info("training job already completed; reusing it", extra={"job": name})
            return {"trainingJobName": name, "existingJob": training_output(job)}
        if status in RUNNING_STATUSES:
            raise TrainingJobStillRunningError(f"training job {name} is {status}; retry when it has ended")
        logger.info("earlier training job ended without a model", extra={"job": name, "status": status})
    raise TooManyTrainingAttemptsError(f"{MAX_ATTEMPTS} training jobs of {req.execution_name} failed or stopped")


@logger.inject_lambda_context
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Return the training request for the ``.sync`` state, or the job this execution already completed."""
    req = parse_event(PrepareEvent, event, "invalid prepare-training request")
    return prepare(sagemaker, req)
