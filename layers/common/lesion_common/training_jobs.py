"""Hand a finished SageMaker training job's outcome back to the waiting Step Functions task.

Both the launcher (a job that finished before its token was stored) and the EventBridge callback use this, so the
decision of what counts as success or failure lives in one place.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from botocore.exceptions import ClientError

TERMINAL_STATUSES = frozenset({"Completed", "Failed", "Stopped"})
# A token that was already answered, or that timed out, cannot be answered again: nothing is left to do.
_SPENT_TOKEN_ERRORS = frozenset({"TaskTimedOut", "InvalidToken", "TaskDoesNotExist"})


def job_name_for_execution(prefix: str, execution_name: str) -> str:
    """Derive a valid, deterministic training job name from an execution name.

    Parameters
    ----------
    prefix : str
        The project's job-name prefix (the EventBridge rule matches on it).
    execution_name : str
        The Step Functions execution name (up to 80 characters, any of ``[A-Za-z0-9-_]``).

    Returns
    -------
    str
        At most 63 characters of ``[A-Za-z0-9-]``, the same for the same execution, so a retried launch finds
        the job it already created.
    """
    clean = "".join(c if c.isalnum() else "-" for c in execution_name).strip("-")
    while "--" in clean:
        clean = clean.replace("--", "-")
    name = f"{prefix}-{clean}"
    if len(name) > 63:
        digest = hashlib.sha256(execution_name.encode()).hexdigest()[:8]
        name = f"{name[:54].rstrip('-')}-{digest}"
    return name


def task_result(job: dict[str, Any]) -> dict[str, Any]:
    """Summarise a DescribeTrainingJob response (or its EventBridge twin) as the task's output."""
    return {
        "TrainingJobName": job["TrainingJobName"],
        "TrainingJobStatus": job["TrainingJobStatus"],
        "ModelArtifacts": job.get("ModelArtifacts", {}),
        "FinalMetricDataList": [
            {"MetricName": m["MetricName"], "Value": m["Value"]} for m in job.get("FinalMetricDataList", [])
        ],
        "BillableTimeInSeconds": job.get("BillableTimeInSeconds"),
    }


def complete_task(sfn: Any, table: Any, job: dict[str, Any], token: str) -> str:
    """Send the task success or failure for a terminal job and record that it was sent.

    Parameters
    ----------
    sfn : botocore client
        Step Functions client.
    table : boto3 Table
        The training-jobs table (``TrainingJobName`` → ``TaskToken``).
    job : dict
        DescribeTrainingJob response or the event detail; must have a terminal ``TrainingJobStatus``.
    token : str
        The task token stored for this job.

    Returns
    -------
    str
        ``"sent"``, or ``"spent"`` when the token had already been answered or had timed out.
    """
    status = job["TrainingJobStatus"]
    name = job["TrainingJobName"]
    try:
        if status == "Completed":
            sfn.send_task_success(taskToken=token, output=json.dumps(task_result(job), default=str))
        elif status == "Failed":
            reason = job.get("FailureReason") or "no FailureReason given"
            sfn.send_task_failure(
                taskToken=token, error="TrainingJobFailedError", cause=f"Training job {name} failed: {reason}"[:32768]
            )
        else:
            sfn.send_task_failure(
                taskToken=token, error="TrainingJobStoppedError", cause=f"Training job {name} was {status.lower()}"
            )
        outcome = "sent"
    except ClientError as err:
        if err.response["Error"]["Code"] not in _SPENT_TOKEN_ERRORS:
            raise
        outcome = "spent"
    table.update_item(
        Key={"TrainingJobName": name},
        UpdateExpression="SET #s = :done, JobStatus = :js",
        ExpressionAttributeNames={"#s": "Status"},
        ExpressionAttributeValues={":done": "DONE", ":js": status},
    )
    return outcome
