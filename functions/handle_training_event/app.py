"""Handle a SageMaker training job state change: resume the execution that waits for the job.

EventBridge delivers ``SageMaker Training Job State Change`` events at least once, so a repeated terminal event
must not answer twice: the training-jobs table records that the token was answered.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lesion_common.errors import InvalidRequestError
from lesion_common.training_jobs import TERMINAL_STATUSES, complete_task

logger = Logger()
metrics = Metrics()

TRAINING_JOBS_TABLE = os.environ["TRAINING_JOBS_TABLE"]

sfn = boto3.client("stepfunctions")
table = boto3.resource("dynamodb").Table(TRAINING_JOBS_TABLE)


class JobDetail(BaseModel):
    """The fields of the event's detail (a DescribeTrainingJob response) this handler reads."""

    model_config = ConfigDict(extra="allow")
    TrainingJobName: str = Field(min_length=1)
    TrainingJobStatus: str
    SecondaryStatus: str = ""
    FailureReason: str | None = None


class TrainingStateChange(BaseModel):
    """The EventBridge envelope."""

    model_config = ConfigDict(populate_by_name=True)
    detail_type: str = Field(alias="detail-type", pattern=r"^SageMaker Training Job State Change$")
    detail: JobDetail


def handle(step_functions: Any, tbl: Any, event: TrainingStateChange) -> str:
    """Answer, heartbeat or ignore, and say which.

    Returns
    -------
    str
        ``unknown-job`` (not started by this pipeline), ``duplicate``, ``heartbeat``, ``sent`` or ``spent``.
    """
    job = event.detail
    item = tbl.get_item(Key={"TrainingJobName": job.TrainingJobName}, ConsistentRead=True).get("Item")
    if item is None:
        return "unknown-job"
    if item.get("Status") == "DONE":
        return "duplicate"
    if job.TrainingJobStatus not in TERMINAL_STATUSES:
        try:
            step_functions.send_task_heartbeat(taskToken=item["TaskToken"])
        except ClientError as err:
            if err.response["Error"]["Code"] not in ("TaskTimedOut", "InvalidToken", "TaskDoesNotExist"):
                raise
        return "heartbeat"
    return complete_task(step_functions, tbl, job.model_dump(), str(item["TaskToken"]))


@logger.inject_lambda_context(log_event=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, str]:
    """Resume the waiting execution for a terminal job state; heartbeat it for the others."""
    try:
        change = TrainingStateChange.model_validate(event)
    except ValidationError as err:
        raise InvalidRequestError(f"not a training job state change: {err}") from err
    outcome = handle(sfn, table, change)
    if outcome in ("sent", "spent"):
        metrics.add_metric(name=f"TrainingJob{change.detail.TrainingJobStatus}", unit=MetricUnit.Count, value=1)
    logger.info("training job event", extra={"job": change.detail.TrainingJobName, "outcome": outcome})
    return {"trainingJobName": change.detail.TrainingJobName, "outcome": outcome}
