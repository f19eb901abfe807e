"""Compose: the subject and body of a notification, from the execution's data and, for failures, its history.

Each notification of the two state machines is a pair of states: this function's Task (``Notify...``), then an
``sns:publish`` of what it returns (``Publish...``). If composing or that publish fails, the Catch publishes the
plain one-line message of ``Publish...Plain`` instead, so an operator is told even when this function is broken.
The texts themselves are rendered in ``lesion_common.notifications``; this module gathers the facts.

Why the execution history: a Catch hands the next state the error and its cause, never the name of the state that
raised it, and "which step failed" is the first thing the operator asks. Recording it in the ASL would need one
Catch ``ResultPath`` (or variable) per state, kept right in every Catch of both machines and by every state added
later. The history already says it: read newest first (``states:GetExecutionHistory``, this stack's two machines
only), the failed step is the most recent Task state whose last attempt failed; a failure that a Choice declares
(the endpoint that never settled) has none, and then it is the most recent Task state. The Task's scheduled
parameters name the Lambda function (hence its log group) or the training job (hence its log streams).

The "registered" and "rejected by the gate" messages link to the evaluation plots: the training job writes them
into its ``output.tar.gz``, which reviewers cannot open from a mail, so they are copied to
``s3://<artifacts>/evaluations/<job>/plots/`` beside ``metrics.json`` (the same keys each time: a repeated
invocation rewrites the same objects). A plot that cannot be copied is reported in the message, not raised.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, Literal, TypeVar

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field

from lesion_common import notifications as texts
from lesion_common.errors import InvalidRequestError
from lesion_common.parsing import parse_event

logger = Logger()

STACK_NAME = os.environ["STACK_NAME"]
ARTIFACTS_BUCKET = os.environ["ARTIFACTS_BUCKET"]
DEPLOYMENT_LOCK_TABLE = os.environ["DEPLOYMENT_LOCK_TABLE"]
# {function name: log group}: the stack's functions log to groups of their own (LoggingConfig), not to Lambda's
# default /aws/lambda/<name>, and the history names only the function.
LAMBDA_LOG_GROUPS: dict[str, str] = json.loads(os.environ["LAMBDA_LOG_GROUPS"])

sfn = boto3.client("stepfunctions")
s3 = boto3.client("s3")

MAX_HISTORY_PAGES = 25  # 25 pages of 1,000: a Standard execution's history ends at 25,000 events
MAX_PLOTS = 12
MAX_PLOT_BYTES = 5 * 1024 * 1024
PLOT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}\.png$")

FAILURE_EVENTS = frozenset({"TaskFailed", "TaskTimedOut", "TaskStartFailed", "TaskSubmitFailed",
                            "LambdaFunctionFailed", "LambdaFunctionTimedOut", "LambdaFunctionStartFailed",
                            "LambdaFunctionScheduleFailed"})
OUTCOME_EVENTS = FAILURE_EVENTS | {"TaskSucceeded", "LambdaFunctionSucceeded"}
STEP_ENTERED = frozenset({"TaskStateEntered", "MapStateEntered", "ParallelStateEntered"})
# Events before these belong to an earlier run of the execution (a redrive) or to nothing.
HISTORY_START = frozenset({"ExecutionStarted", "ExecutionRedriven"})

Kind = Literal["not-enough-data", "registered", "gate-rejected", "retraining-failed", "deployed", "rolled-back",
               "deployment-failed"]
T = TypeVar("T")


# ------------------------------------------------------------------ input
class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Step(_Loose, Generic[T]):
    """A Task's output as the ASL stores it (``ResultSelector: {"result.$": "$.Payload"}``)."""

    result: T


class DataCheck(_Loose):
    summary: str = ""
    reasons: list[str] = Field(default_factory=list)
    trigger: dict[str, Any] = Field(default_factory=dict)


class Prepared(_Loose):
    training_job_name: str | None = Field(alias="trainingJobName", default=None)
    request: dict[str, Any] | None = None


class Evaluation(_Loose):
    training_job_name: str = Field(alias="trainingJobName", min_length=1)
    model_data_url: str = Field(alias="modelDataUrl", pattern=r"^s3://[^/]+/.+$")
    metrics_s3_uri: str | None = Field(alias="metricsS3Uri", default=None)
    architecture: str = ""
    n_test: int | None = Field(alias="nTest", default=None)
    metrics: dict[str, float]
    baseline: dict[str, float] | None = None


class GateVerdict(_Loose):
    passed: bool
    failures: list[dict[str, Any]] = Field(default_factory=list)
    summary: str = ""
    thresholds: dict[str, float] = Field(default_factory=dict)
    max_regression: float | None = Field(alias="maxRegression", default=None)


class Registration(_Loose):
    model_package_arn: str = Field(alias="modelPackageArn", min_length=1)
    model_package_version: int | None = Field(alias="modelPackageVersion", default=None)
    approval_status: str = Field(alias="approvalStatus", default="PendingManualApproval")
    model_package_group: str = Field(alias="modelPackageGroup", default="")


class ErrorInfo(_Loose):
    error: str = Field(alias="Error", default="Unknown")
    cause: str = Field(alias="Cause", default="")


class RetrainingState(_Loose):
    """The retraining machine's data, as far as notifications read it (every part is optional)."""

    data: Step[DataCheck] | None = None
    prepared: Step[Prepared] | None = None
    training: dict[str, Any] | None = None
    evaluation: Step[Evaluation] | None = None
    gate: Step[GateVerdict] | None = None
    registration: Step[Registration] | None = None
    error: ErrorInfo | None = None
    failed_training: dict[str, Any] | None = Field(alias="failedTraining", default=None)


class Package(_Loose):
    model_package_arn: str | None = Field(alias="ModelPackageArn", default=None)
    model_package_version: int | None = Field(alias="ModelPackageVersion", default=None)


class ModelConfig(_Loose):
    model_package_version: int | str | None = Field(alias="modelPackageVersion", default=None)
    instance_type: str = Field(alias="instanceType", default="")


class EndpointUpdate(_Loose):
    endpoint_name: str = Field(alias="endpointName", default="")
    action: str = ""
    traffic_routing: str = Field(alias="trafficRouting", default="")
    previous_config: str | None = Field(alias="previousConfig", default=None)


class Scaling(_Loose):
    min_capacity: int | None = Field(alias="minCapacity", default=None)
    max_capacity: int | None = Field(alias="maxCapacity", default=None)


class Smoke(_Loose):
    summary: str = ""


class DeploymentState(_Loose):
    """The deployment machine's data, as far as notifications read it."""

    package: Package = Field(default_factory=Package)
    model: Step[ModelConfig] | None = None
    update: Step[EndpointUpdate] | None = None
    scaling: Step[Scaling] | None = None
    smoke: Step[Smoke] | None = None
    error: ErrorInfo | None = None


class ComposeEvent(BaseModel):
    """What a notification state passes in: which message, the execution, its own name, and its whole input."""

    kind: Kind
    execution_arn: str = Field(alias="executionArn", pattern=r"^arn:[a-z-]+:states:[a-z0-9-]+:\d{12}:execution:")
    state_name: str = Field(alias="stateName", min_length=1)
    state: dict[str, Any]


# ------------------------------------------------------------------ the failed step
def history_newest_first(client: Any, execution_arn: str) -> Iterator[dict[str, Any]]:
    """The execution's events, newest first (each page is sorted too, whatever order a service returns)."""
    token: str | None = None
    for _ in range(MAX_HISTORY_PAGES):
        kwargs: dict[str, Any] = {"executionArn": execution_arn, "reverseOrder": True, "maxResults": 1000}
        if token:
            kwargs["nextToken"] = token
        page = client.get_execution_history(**kwargs)
        yield from sorted(page.get("events", []), key=lambda e: e["id"], reverse=True)
        token = page.get("nextToken")
        if not token:
            return


def _describe(state: str, own: list[dict[str, Any]], log_groups: Mapping[str, str]) -> texts.FailedStep:
    """A Task state from its events (newest first): the integration, and the function or job it called."""
    scheduled: dict[str, Any] = next(
        (e.get("taskScheduledEventDetails", {}) for e in own if e["type"] == "TaskScheduled"), {})
    resource = ":".join(p for p in (scheduled.get("resourceType"), scheduled.get("resource")) if p)
    try:
        params = json.loads(scheduled.get("parameters") or "{}")
    except ValueError:
        params = {}
    params = params if isinstance(params, dict) else {}
    function = str(params.get("FunctionName") or "") or None
    if function and function.startswith("arn:"):
        function = function.split(":")[6]
    job = params.get("TrainingJobName") if scheduled.get("resourceType") == "sagemaker" else None
    return texts.FailedStep(state=state, resource=resource, function_name=function,
                            log_group=log_groups.get(function) if function else None,
                            training_job=str(job) if job else None)


def failed_step(events: Iterable[dict[str, Any]], current_state: str,
                log_groups: Mapping[str, str]) -> texts.FailedStep | None:
    """The step whose error ended the run: the newest Task state whose last attempt failed, else the newest Task.

    Parameters
    ----------
    events : iterable of dict
        History events, newest first.
    current_state : str
        The notification state asking (skipped: it is running, not failed).
    log_groups : mapping
        Function name to log group.
    """
    own: list[dict[str, Any]] = []  # the events of the state entered just before them (newest first)
    newest_task: texts.FailedStep | None = None
    for event in events:
        kind = event["type"]
        if kind in HISTORY_START:
            break
        if not kind.endswith("StateEntered"):
            own.append(event)
            continue
        name = event.get("stateEnteredEventDetails", {}).get("name", "")
        state_events, own = own, []
        if kind not in STEP_ENTERED or name == current_state:
            continue
        step = _describe(name, state_events, log_groups)
        outcome = next((e["type"] for e in state_events if e["type"] in OUTCOME_EVENTS), None)
        if outcome in FAILURE_EVENTS:
            return step
        newest_task = newest_task or step
    return newest_task


def find_failed_step(client: Any, execution_arn: str, current_state: str) -> tuple[texts.FailedStep | None,
                                                                                   str | None]:
    """The failed step, or None and why the history could not tell (the message then says so)."""
    try:
        return failed_step(history_newest_first(client, execution_arn), current_state, LAMBDA_LOG_GROUPS), None
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "error")
        logger.warning("execution history unreadable", extra={"code": code, "error": str(err)})
        return None, f"the execution history could not be read ({code}), so the failed step is not named"


# ------------------------------------------------------------------ the plots
def publish_plots(client: Any, job: str, model_data_url: str) -> tuple[list[texts.Plot], str | None]:
    """Copy the job's ``evaluation/*.png`` from its output.tar.gz to ``evaluations/<job>/plots/``.

    Returns
    -------
    (plots, note)
        The copies, and a sentence for the reader when some or all could not be made.
    """
    output_uri = model_data_url.removesuffix("model.tar.gz") + "output.tar.gz"
    bucket, _, key = output_uri.removeprefix("s3://").partition("/")
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "error")
        return [], f"The plots could not be read from {output_uri} ({code})."
    plots: list[texts.Plot] = []
    skipped: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
            for member in tar.getmembers():
                path = member.name.lstrip("./")
                folder, _, name = path.rpartition("/")
                if folder != "evaluation" or not name.endswith(".png"):
                    continue
                if not (member.isfile() and PLOT_NAME.match(name) and member.size <= MAX_PLOT_BYTES
                        and len(plots) < MAX_PLOTS):
                    skipped.append(name)
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    skipped.append(name)
                    continue
                target = f"evaluations/{job}/plots/{name}"
                client.put_object(Bucket=ARTIFACTS_BUCKET, Key=target, Body=handle.read(), ContentType="image/png")
                plots.append(texts.Plot(name=name, bucket=ARTIFACTS_BUCKET, key=target))
    except (tarfile.TarError, OSError, EOFError) as err:
        return plots, f"{output_uri} could not be unpacked ({err}); the plots are inside it."
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "error")
        return plots, f"Copying the plots failed ({code}); they are inside {output_uri}."
    if skipped:
        return plots, f"Not copied (name, size or count over the limits): {', '.join(sorted(skipped))}."
    if not plots:
        return plots, f"The training job wrote no evaluation/*.png into {output_uri}."
    return plots, None


# ------------------------------------------------------------------ the messages
def _gate(verdict: GateVerdict | None) -> texts.Gate | None:
    if verdict is None:
        return None
    return texts.Gate(thresholds=verdict.thresholds, max_regression=verdict.max_regression,
                      failed_metrics=frozenset(str(f.get("metric")) for f in verdict.failures),
                      summary=verdict.summary)


def _trigger(data: DataCheck | None) -> str:
    if data is None or not data.trigger:
        return ""
    t = data.trigger
    details = "; ".join(str(v) for v in (t.get("reason"), t.get("requestedBy") and f"by {t['requestedBy']}") if v)
    return f"{t.get('type', 'unknown')}" + (f" ({details})" if details else "")


def _baseline_model(prepared: Prepared | None) -> str | None:
    """Which model the baseline figures are of: the approved model the training job was given."""
    request = prepared.request if prepared else None
    for channel in (request or {}).get("InputDataConfig", []):
        if channel.get("ChannelName") == "baseline":
            uri = channel.get("DataSource", {}).get("S3DataSource", {}).get("S3Uri")
            return f"the newest approved version, model data {uri}"
    return None


def _plots(evaluation: Evaluation) -> dict[str, Any]:
    plots, note = publish_plots(s3, evaluation.training_job_name, evaluation.model_data_url)
    return {"plots": plots, "plots_note": note,
            "plots_prefix": f"s3://{ARTIFACTS_BUCKET}/evaluations/{evaluation.training_job_name}/plots/"}


def _require(value: T | None, what: str) -> T:
    if value is None:
        raise InvalidRequestError(f"the state has no {what}")
    return value


def compose_retraining(req: ComposeEvent) -> texts.Message:
    """A retraining message (not enough data, registered, rejected by the gate, failed)."""
    state = RetrainingState.model_validate(req.state)
    data = state.data.result if state.data else None
    if req.kind == "not-enough-data":
        check = _require(data, "data check")
        return texts.not_enough_data(stack=STACK_NAME, execution_arn=req.execution_arn, summary=check.summary,
                                     reasons=check.reasons)
    if req.kind in ("registered", "gate-rejected"):
        evaluation = _require(state.evaluation, "evaluation").result
        gate = _gate(state.gate.result if state.gate else None)
        common = {"stack": STACK_NAME, "execution_arn": req.execution_arn,
                  "training_job": evaluation.training_job_name, "n_test": evaluation.n_test,
                  "metrics": evaluation.metrics, "baseline": evaluation.baseline, **_plots(evaluation)}
        if req.kind == "gate-rejected":
            return texts.rejected_by_gate(gate=_require(gate, "gate verdict"), **common)
        registration = _require(state.registration, "registration").result
        return texts.registered(
            package_arn=registration.model_package_arn, version=registration.model_package_version,
            group=registration.model_package_group, approval_status=registration.approval_status,
            architecture=evaluation.architecture, gate=gate, metrics_uri=evaluation.metrics_s3_uri,
            baseline_model=_baseline_model(state.prepared.result if state.prepared else None),
            trigger=_trigger(data), **common)
    error = state.error or ErrorInfo()
    step, note = find_failed_step(sfn, req.execution_arn, req.state_name)
    job = (state.failed_training or {}).get("job", {}).get("TrainingJobName") \
        if error.error.startswith("TrainingJob") else None
    return texts.retraining_failed(stack=STACK_NAME, execution_arn=req.execution_arn, step=step, error=error.error,
                                   cause=error.cause, training_job=job, history_note=note)


def compose_deployment(req: ComposeEvent) -> texts.Message:
    """A deployment message (deployed, rolled back, failed)."""
    state = DeploymentState.model_validate(req.state)
    model = state.model.result if state.model else ModelConfig()
    update = state.update.result if state.update else EndpointUpdate()
    version = model.model_package_version or state.package.model_package_version
    if req.kind == "deployed":
        scaling = state.scaling.result if state.scaling else Scaling()
        return texts.deployed(
            stack=STACK_NAME, execution_arn=req.execution_arn, package_arn=state.package.model_package_arn or "",
            version=version, endpoint=update.endpoint_name, action=update.action, instance_type=model.instance_type,
            traffic=update.traffic_routing, min_capacity=scaling.min_capacity, max_capacity=scaling.max_capacity,
            smoke_summary=state.smoke.result.summary if state.smoke else "")
    error = state.error or ErrorInfo()
    step, note = find_failed_step(sfn, req.execution_arn, req.state_name)
    if req.kind == "rolled-back":
        return texts.rolled_back(stack=STACK_NAME, execution_arn=req.execution_arn, step=step, error=error.error,
                                 cause=error.cause, version=version, endpoint=update.endpoint_name,
                                 previous_config=update.previous_config, history_note=note)
    return texts.deployment_failed(stack=STACK_NAME, execution_arn=req.execution_arn, step=step, error=error.error,
                                   cause=error.cause, package_arn=state.package.model_package_arn, version=version,
                                   lock_table=DEPLOYMENT_LOCK_TABLE, history_note=note)


def compose(req: ComposeEvent) -> texts.Message:
    """The message for ``req.kind``."""
    if req.kind in ("deployed", "rolled-back", "deployment-failed"):
        return compose_deployment(req)
    return compose_retraining(req)


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, str]:
    """Return ``{"subject", "message"}`` for the notification state to publish."""
    req = parse_event(ComposeEvent, event, "invalid notification request")
    try:
        message = compose(req)
    except ValueError as err:  # pydantic's ValidationError: the state lacks what this kind needs
        raise InvalidRequestError(f"cannot compose the {req.kind} notification: {err}") from err
    logger.info("notification composed", extra={"kind": req.kind, "subject": message.subject})
    return {"subject": message.subject, "message": message.body}
