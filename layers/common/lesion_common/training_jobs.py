"""Training jobs: the name an execution's job gets, how SageMaker says a job is unknown, the metric definitions.

The retraining state machine waits for the job with ``sagemaker:createTrainingJob.sync``; prepare_training builds
the request (and finds a job a retried state or a redriven execution already started), so what a job is called and
how its absence is recognised live here.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from lesion_common.errors import PipelineError

TERMINAL_STATUSES = frozenset({"Completed", "Failed", "Stopped"})
# Statuses from which a job may still reach Completed: the state must wait, not start a second job.
RUNNING_STATUSES = frozenset({"InProgress", "Stopping"})
_METRIC_DEFINITIONS = Path(__file__).with_name("metric_definitions.json")
_MAX_JOB_NAME = 63


class TrainingJobStillRunningError(PipelineError):
    """This execution's training job is still running (a redriven or retried execution): retry later."""


class TrainingOutputMissingError(PipelineError):
    """The training job's output.tar.gz does not exist (S3 answered 404 NoSuchKey)."""


class TrainingOutputAccessDeniedError(PipelineError):
    """The training job's output could not be read: S3 answered 403 AccessDenied (a policy or key problem)."""


def job_name_for_execution(prefix: str, execution_name: str, attempt: int = 1) -> str:
    """Derive a valid, deterministic training job name from an execution name.

    Parameters
    ----------
    prefix : str
        The project's job-name prefix (the state machine's role is scoped to it).
    execution_name : str
        The Step Functions execution name (up to 80 characters, any of ``[A-Za-z0-9-_]``).
    attempt : int
        1 for the execution's first job; 2, 3, ... for the jobs started after an earlier one failed or was
        stopped (a redriven execution), which get ``-r2``, ``-r3``, ... appended.

    Returns
    -------
    str
        At most 63 characters of ``[A-Za-z0-9-]``, the same for the same execution and attempt, so a retried
        state finds the job it already created.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, not {attempt}")
    suffix = "" if attempt == 1 else f"-r{attempt}"
    budget = _MAX_JOB_NAME - len(suffix)
    clean = "".join(c if c.isalnum() else "-" for c in execution_name).strip("-")
    while "--" in clean:
        clean = clean.replace("--", "-")
    name = f"{prefix}-{clean}"
    if len(name) > budget:
        digest = hashlib.sha256(execution_name.encode()).hexdigest()[:8]
        name = f"{name[:budget - 9].rstrip('-')}-{digest}"
    return name + suffix


def is_unknown_training_job(err: ClientError) -> bool:
    """Tell whether a DescribeTrainingJob error means that no job has this name.

    SageMaker answers an unknown name with ``ValidationException`` and the message ``Requested resource not
    found.``; botocore's service model declares ``ResourceNotFound`` for the operation, which is accepted too.
    Every other error (throttling, access denied) is a real failure.
    """
    error = err.response.get("Error", {})
    code = error.get("Code", "")
    message = str(error.get("Message", "")).strip()
    if code == "ResourceNotFound":
        return True
    return code == "ValidationException" and message.rstrip(".") == "Requested resource not found"


def describe_job_or_none(sm: Any, name: str) -> dict[str, Any] | None:
    """DescribeTrainingJob, or None when no job has this name."""
    try:
        job: dict[str, Any] = sm.describe_training_job(TrainingJobName=name)
    except ClientError as err:
        if is_unknown_training_job(err):
            return None
        raise
    return job


def training_output(job: dict[str, Any]) -> dict[str, Any]:
    """What the ``.sync`` state keeps of a DescribeTrainingJob response (its ResultSelector), JSON-safe."""
    return json.loads(json.dumps({
        "TrainingJobName": job["TrainingJobName"],
        "TrainingJobArn": job["TrainingJobArn"],
        "TrainingJobStatus": job["TrainingJobStatus"],
        "ModelArtifacts": job["ModelArtifacts"],
    }, default=str))


@cache
def metric_definitions() -> list[dict[str, str]]:
    """The training job's MetricDefinitions (one file, shipped in this layer; the image's log lines match it)."""
    definitions: list[dict[str, str]] = json.loads(_METRIC_DEFINITIONS.read_text())
    return definitions
