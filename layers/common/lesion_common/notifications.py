"""The texts of the pipeline's notifications: every subject and body the operator receives, rendered here only.

The messages go to an SNS topic whose usual subscriber is an e-mail address, so they are plain text: short lines,
full URLs on lines of their own, commands ready to paste. Each one says what happened and what to do first, then
the evidence, then where to look. Subjects carry the stack name, so a reviewer with a staging and a production
stack (or two projects) can tell the mails apart and filter them.

The functions here only format: the facts (the state machine's data, the execution history's failed step, where
the plots were copied) are gathered by ``functions/compose_notification``, and nothing here calls AWS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote

# SNS refuses a subject of 100 characters or more, with a line break or a control character (Publish API
# reference); non-ASCII text is left out as well, since e-mail subjects are where it gets mangled.
SUBJECT_LIMIT = 99
CAUSE_LIMIT = 1500
TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
# Metrics in the order a reviewer reads them: the gated ones first (gate_model's THRESHOLDS), then the others.
METRIC_ORDER = ("balanced_accuracy", "melanoma_sensitivity", "macro_auc", "melanoma_specificity", "accuracy")

_CONSOLE_DOMAINS = {"aws": "console.aws.amazon.com", "aws-cn": "console.amazonaws.cn",
                    "aws-us-gov": "console.amazonaws-us-gov.com"}


@dataclass(frozen=True)
class Message:
    """One notification: the SNS subject and the plain-text body."""

    subject: str
    body: str


@dataclass(frozen=True)
class Plot:
    """An evaluation plot, copied where the reviewer can read it."""

    name: str
    bucket: str
    key: str


@dataclass(frozen=True)
class FailedStep:
    """The state whose error ended the execution, as the execution history tells it.

    Attributes
    ----------
    state : str
        The state's name in the ASL.
    resource : str
        The integration, e.g. ``lambda:invoke`` or ``sagemaker:createTrainingJob.sync`` ("" if unknown).
    function_name : str or None
        The Lambda function the state invoked.
    log_group : str or None
        That function's CloudWatch log group.
    training_job : str or None
        The SageMaker training job the state ran.
    """

    state: str
    resource: str = ""
    function_name: str | None = None
    log_group: str | None = None
    training_job: str | None = None


@dataclass(frozen=True)
class Gate:
    """The quality gate's rules and verdict (gate_model's result)."""

    thresholds: Mapping[str, float]
    max_regression: float | None
    failed_metrics: frozenset[str]
    summary: str


# ------------------------------------------------------------------ pieces
def subject(stack: str, text: str) -> str:
    """``[<stack>] <text>``, made acceptable to SNS: printable ASCII, one line, under 100 characters.

    A long stack name is shortened before the text is, so the subject still says what happened.
    """
    clean_text = _ascii_line(text)
    clean_stack = _ascii_line(stack)
    room = SUBJECT_LIMIT - len(clean_text) - 3
    if len(clean_stack) > room:
        clean_stack = clean_stack[: max(room - 3, 8)] + "..."
    return f"[{clean_stack}] {clean_text}"[:SUBJECT_LIMIT]


def _ascii_line(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", re.sub(r"\s+", " ", text)).strip()


def _arn_parts(arn: str) -> tuple[str, str]:
    """(partition, region) of an ARN."""
    parts = arn.split(":")
    return (parts[1], parts[3]) if len(parts) > 4 else ("aws", "")


def _console(region: str, partition: str = "aws") -> str:
    return f"https://{region}.{_CONSOLE_DOMAINS.get(partition, _CONSOLE_DOMAINS['aws'])}"


def execution_url(execution_arn: str) -> str:
    """The Step Functions console page of an execution (every state's input, output and error)."""
    partition, region = _arn_parts(execution_arn)
    return f"{_console(region, partition)}/states/home?region={region}#/v2/executions/details/{execution_arn}"


def state_machine_arn(execution_arn: str) -> str:
    """The state machine of an execution: ``...:execution:<machine>:<name>`` -> ``...:stateMachine:<machine>``."""
    head, _, _ = execution_arn.rpartition(":")
    return head.replace(":execution:", ":stateMachine:", 1)


def log_group_url(region: str, log_group: str, partition: str = "aws") -> str:
    """The CloudWatch console page of a log group (the console escapes the name twice, with ``$`` for ``%``)."""
    escaped = quote(quote(log_group, safe=""), safe="").replace("%", "$")
    return f"{_console(region, partition)}/cloudwatch/home?region={region}#logsV2:log-groups/log-group/{escaped}"


def training_job_url(region: str, job: str, partition: str = "aws") -> str:
    """The SageMaker console page of a training job (status, metrics, a link to its logs)."""
    return f"{_console(region, partition)}/sagemaker/home?region={region}#/jobs/{job}"


def s3_object_url(region: str, bucket: str, key: str, partition: str = "aws") -> str:
    """The S3 console page of an object (Open and Download buttons)."""
    return f"{_console(region, partition)}/s3/object/{bucket}?region={region}&prefix={quote(key, safe='/')}"


def readable_cause(cause: str) -> tuple[str, str | None]:
    """A failure's cause for people, and the Lambda request id when it has one.

    A function's unhandled exception reaches Step Functions as Lambda's error document (``{"errorType",
    "errorMessage", "requestId", "stackTrace"}``) in the cause; the type and message are what the reader wants.
    """
    text = cause.strip()
    request_id: str | None = None
    try:
        doc = json.loads(text) if text.startswith("{") else None
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "errorMessage" in doc:
        text = f"{doc.get('errorType') or 'Error'}: {doc['errorMessage']}"
        request_id = str(doc.get("requestId") or "") or None
    if len(text) > CAUSE_LIMIT:
        text = text[:CAUSE_LIMIT] + " ... (cut; the execution page has all of it)"
    return text, request_id


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _change(new: float | None, old: float | None) -> str:
    return "-" if new is None or old is None else f"{new - old:+.3f}"


def metric_table(metrics: Mapping[str, float], baseline: Mapping[str, float] | None, gate: Gate | None) -> list[str]:
    """The candidate's test figures beside the current model's, with the gate's minimum and verdict per metric."""
    names = [m for m in METRIC_ORDER if m in metrics] + sorted(set(metrics) - set(METRIC_ORDER))
    thresholds = gate.thresholds if gate else {}
    rows = [("metric", "new model", "current model", "change", "gate minimum", "result")]
    for name in names:
        old = baseline.get(name) if baseline else None
        if name in thresholds and gate is not None:
            result = "FAILED" if name in gate.failed_metrics else "passed"
            minimum = _fmt(thresholds[name])
        else:
            result, minimum = "not gated", "-"
        rows.append((name, _fmt(metrics[name]), _fmt(old), _change(metrics[name], old), minimum, result))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _gate_lines(gate: Gate | None, has_baseline: bool) -> list[str]:
    if gate is None:
        return []
    lines = []
    if gate.max_regression is not None:
        against = "the current model's" if has_baseline else "the current model's (none yet, so not applied)"
        lines.append(f"Gate: each gated metric must reach its minimum and be at most {gate.max_regression:.3f} "
                     f"below {against}.")
    lines.append(f"Gate verdict: {gate.summary}")
    return lines


def _plot_lines(region: str, plots: Sequence[Plot], plots_prefix: str | None, plots_note: str | None,
                local_dir: str) -> list[str]:
    lines = ["Evaluation plots:"]
    if plots:
        width = max(len(p.name) for p in plots)
        lines += [f"  {p.name.ljust(width)}  {s3_object_url(region, p.bucket, p.key)}" for p in plots]
        if plots_prefix:
            lines.append(f"  All of them: aws s3 cp {plots_prefix} ./{local_dir}/ --recursive --region {region}")
        lines.append("  (Reading them needs s3:GetObject on them and kms:Decrypt on the stack's key.)")
    else:
        lines.append("  none were copied.")
    if plots_note:
        lines.append(f"  {plots_note}")
    return lines


def _commands(region: str, arn: str) -> tuple[str, str]:
    approve = (f"aws sagemaker update-model-package --model-package-arn {arn} --model-approval-status Approved "
               f"--region {region}")
    reject = (f"aws sagemaker update-model-package --model-package-arn {arn} --model-approval-status Rejected "
              f"--approval-description \"<why it is rejected>\" --region {region}")
    return approve, reject


def _training_log_lines(region: str, job: str, partition: str) -> list[str]:
    return [
        f"  Training job {job}: CloudWatch log group {TRAINING_LOG_GROUP}, streams starting {job}/",
        f"    aws logs tail {TRAINING_LOG_GROUP} --log-stream-name-prefix {job}/ --since 7d --region {region}",
        f"    {training_job_url(region, job, partition)}",
    ]


# ------------------------------------------------------------------ retraining
def registered(
    *,
    stack: str,
    execution_arn: str,
    package_arn: str,
    version: int | str | None,
    group: str,
    approval_status: str,
    training_job: str,
    architecture: str,
    n_test: int | None,
    metrics: Mapping[str, float],
    baseline: Mapping[str, float] | None,
    baseline_model: str | None,
    gate: Gate | None,
    plots: Sequence[Plot],
    plots_prefix: str | None = None,
    plots_note: str | None = None,
    metrics_uri: str | None = None,
    trigger: str = "",
) -> Message:
    """A model passed the gate and is in the registry: what a reviewer needs to approve or reject it."""
    _, region = _arn_parts(package_arn)
    approve, reject = _commands(region, package_arn)
    auto = approval_status == "Approved"
    label = f"version {version}" if version is not None else "a new version"
    what = f"{label} of {group}" if group else label
    lines = [
        (f"Retraining registered {what} and approved it automatically (AutoApprove): its deployment has started."
         if auto else
         f"Retraining registered {what}. It waits for your review ({approval_status})."),
        "",
        "Model package ARN:",
        f"  {package_arn}",
        "",
        f"Test split{f' ({n_test} images)' if n_test else ''}: the new model beside the current approved model",
        *metric_table(metrics, baseline, gate),
        "",
    ]
    if baseline is None:
        lines.append("No model was approved before this one, so there is nothing to compare it with.")
    elif baseline_model:
        lines.append(f"Current model: {baseline_model} (evaluated by the training job on the same test split).")
    lines += [*_gate_lines(gate, baseline is not None), ""]
    lines += _plot_lines(region, plots, plots_prefix, plots_note, f"{training_job}-plots")
    if metrics_uri:
        lines.append(f"Full report (per class, confusion matrix, calibration): {metrics_uri}")
    lines.append("")
    if auto:
        lines += ["To withdraw the approval (the deployment already started; a rejected version is not deployed "
                  "again):", f"  {reject}"]
    else:
        lines += ["To approve it (this starts the deployment to the endpoint):", f"  {approve}", "",
                  "To reject it:", f"  {reject}"]
    lines += [
        "",
        f"Trained by {training_job} ({architecture or 'unknown architecture'})"
        + (f"; retraining triggered by {trigger}." if trigger else "."),
        "Retraining execution:",
        f"  {execution_url(execution_arn)}",
    ]
    state = "approved, deploying" if auto else "awaits approval"
    return Message(subject(stack, f"Skin-lesion model registered: {label} {state}"),
                   "\n".join(lines) + "\n")


def rejected_by_gate(
    *,
    stack: str,
    execution_arn: str,
    training_job: str,
    n_test: int | None,
    metrics: Mapping[str, float],
    baseline: Mapping[str, float] | None,
    gate: Gate,
    plots: Sequence[Plot],
    plots_prefix: str | None = None,
    plots_note: str | None = None,
) -> Message:
    """The candidate failed the gate and was not registered; the current model keeps serving."""
    _, region = _arn_parts(execution_arn)
    lines = [
        f"The model trained by {training_job} failed the quality gate and was not registered; the current model "
        "stays in place.",
        "",
        f"Failed: {gate.summary}",
        "",
        f"Test split{f' ({n_test} images)' if n_test else ''}: the new model beside the current approved model",
        *metric_table(metrics, baseline, gate),
        "",
        *_gate_lines(gate, baseline is not None),
        "",
        *_plot_lines(region, plots, plots_prefix, plots_note, f"{training_job}-plots"),
        "",
        "Retraining execution:",
        f"  {execution_url(execution_arn)}",
    ]
    return Message(subject(stack, "Skin-lesion model rejected by the quality gate"), "\n".join(lines) + "\n")


def not_enough_data(*, stack: str, execution_arn: str, summary: str, reasons: Sequence[str]) -> Message:
    """The data check found too little to train on; nothing was trained."""
    _, region = _arn_parts(execution_arn)
    machine = state_machine_arn(execution_arn)
    lines = [f"Retraining did not train a model: {summary}", ""]
    if reasons:
        lines += ["What is missing:", *[f"  - {r}" for r in reasons], ""]
    lines += [
        "Upload more labelled images (python -m tools.upload_dataset), or train on what there is:",
        f"  aws stepfunctions start-execution --state-machine-arn {machine} --region {region} "
        "--input '{\"trigger\": {\"type\": \"manual\", \"reason\": \"train anyway\"}, \"force\": true}'",
        "",
        "Retraining execution:",
        f"  {execution_url(execution_arn)}",
    ]
    return Message(subject(stack, "Skin-lesion retraining skipped: not enough data"), "\n".join(lines) + "\n")


# ------------------------------------------------------------------ failures
def _where_lines(execution_arn: str, step: FailedStep | None, request_id: str | None,
                 training_job: str | None) -> list[str]:
    partition, region = _arn_parts(execution_arn)
    lines = ["Where to look:", "  The execution (each step's input, output and error):",
             f"    {execution_url(execution_arn)}"]
    if step is not None and step.function_name:
        if step.log_group:
            request = f", request {request_id}" if request_id else ""
            lines += [f"  Function {step.function_name}: log group {step.log_group}{request}",
                      f"    aws logs tail {step.log_group} --since 1d --region {region}"
                      + (f" --filter-pattern '\"{request_id}\"'" if request_id else ""),
                      f"    {log_group_url(region, step.log_group, partition)}"]
        else:
            lines.append(f"  Function {step.function_name}: its log group is named in its configuration "
                         "(Monitoring tab).")
    job = (step.training_job if step else None) or training_job
    if job:
        lines += _training_log_lines(region, job, partition)
    return lines


def _step_line(step: FailedStep | None) -> str:
    if step is None:
        return "Step:  not found in the execution history (see the execution page below)"
    return f"Step:  {step.state}" + (f" ({step.resource})" if step.resource else "")


def _failure_lines(execution_arn: str, step: FailedStep | None, error: str, cause: str, training_job: str | None,
                   history_note: str | None) -> list[str]:
    """Step, error, readable cause and where to look: the part every failure message shares."""
    readable, request_id = readable_cause(cause)
    lines = [_step_line(step), f"Error: {error}", f"Cause: {readable}", "",
             *_where_lines(execution_arn, step, request_id, training_job)]
    if history_note:
        lines.append(f"  ({history_note})")
    return lines


def retraining_failed(*, stack: str, execution_arn: str, step: FailedStep | None, error: str, cause: str,
                      training_job: str | None = None, history_note: str | None = None) -> Message:
    """The retraining ended in an error: which step, why, where the logs are, how to run it again."""
    _, region = _arn_parts(execution_arn)
    where = step.state if step else "a step"
    lines = [
        f"Retraining failed at {where}; no model was registered.",
        "",
        *_failure_lines(execution_arn, step, error, cause, training_job, history_note),
    ]
    # Not redrive-execution: every error is caught and notified, so the unsuccessful step a redrive would resume
    # is the final Fail state, which fails again at once.
    lines += [
        "",
        "Once the cause is fixed, start a retraining again:",
        f"  aws stepfunctions start-execution --state-machine-arn {state_machine_arn(execution_arn)} "
        f"--region {region} --input '{{\"trigger\": {{\"type\": \"manual\", \"reason\": \"after {error}\"}}}}'",
    ]
    return Message(subject(stack, f"Skin-lesion retraining failed at {where}: {error}"), "\n".join(lines) + "\n")


def deployment_failed(*, stack: str, execution_arn: str, step: FailedStep | None, error: str, cause: str,
                      package_arn: str | None, version: int | str | None, lock_table: str,
                      history_note: str | None = None) -> Message:
    """The deployment ended in an error before serving the new version."""
    _, region = _arn_parts(execution_arn)
    where = step.state if step else "a step"
    model = f"model version {version}" if version is not None else "the approved model"
    lines = [
        f"Deploying {model} failed at {where}. The endpoint, if it exists, keeps its previous model.",
        "",
        f"Model package: {package_arn or 'unknown'}",
        *_failure_lines(execution_arn, step, error, cause, None, history_note),
    ]
    if package_arn:
        lines += [
            "",
            "A version deploys once. To deploy it again once the cause is fixed, delete its lock and approve it again:",
            f"  aws dynamodb delete-item --table-name {lock_table} --region {region} "
            f"--key '{{\"ModelPackageArn\": {{\"S\": \"{package_arn}\"}}}}'",
            f"  aws sagemaker update-model-package --model-package-arn {package_arn} "
            f"--model-approval-status Approved --region {region}",
        ]
    return Message(subject(stack, f"Skin-lesion deployment failed at {where}: {error}"), "\n".join(lines) + "\n")


def rolled_back(*, stack: str, execution_arn: str, step: FailedStep | None, error: str, cause: str,
                version: int | str | None, endpoint: str, previous_config: str | None,
                history_note: str | None = None) -> Message:
    """The new version did not pass on the endpoint; the previous configuration serves again."""
    lines = [
        f"Deploying model version {version} to {endpoint} was rolled back; the previous model "
        f"({previous_config or 'previous configuration'}) keeps serving.",
        "",
        *_failure_lines(execution_arn, step, error, cause, None, history_note),
    ]
    return Message(subject(stack, f"Skin-lesion deployment rolled back: version {version}"), "\n".join(lines) + "\n")


def deployed(*, stack: str, execution_arn: str, package_arn: str, version: int | str | None, endpoint: str,
             action: str, instance_type: str, traffic: str, min_capacity: int | None, max_capacity: int | None,
             smoke_summary: str) -> Message:
    """The approved version serves on the endpoint and answered the smoke test."""
    _, region = _arn_parts(execution_arn)
    lines = [
        f"Model version {version} now serves on endpoint {endpoint} ({action}, {instance_type}, traffic shift: "
        f"{traffic}, {min_capacity}..{max_capacity} instances).",
        "",
        f"Smoke test: {smoke_summary}",
        f"Model package: {package_arn}",
        "",
        "Call it:",
        f"  aws sagemaker-runtime invoke-endpoint --endpoint-name {endpoint} --content-type image/jpeg "
        f"--accept application/json --inference-id <image id> --body fileb://lesion.jpg --region {region} out.json",
        "",
        "Deployment execution:",
        f"  {execution_url(execution_arn)}",
    ]
    return Message(subject(stack, f"Skin-lesion model deployed: version {version} on {endpoint}"),
                   "\n".join(lines) + "\n")
