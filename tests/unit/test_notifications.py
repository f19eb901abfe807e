"""The notifications' texts (lesion_common.notifications) and the handler that composes them
(functions/compose_notification), tested on what the operator reads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from lesion_common import notifications as texts
from tests.unit.handlers import Context, load_handler, tar_gz

REPO = Path(__file__).resolve().parents[2]
EVENTS = REPO / "events" / "compose_notification"
STACK = "skin-lesion-prod"
PKG = "arn:aws:sagemaker:eu-west-1:123456789012:model-package/skin-lesion-models/3"
EXEC = "arn:aws:states:eu-west-1:123456789012:execution:skin-lesion-retraining:manual-2026-11-29"
DEPLOY_EXEC = "arn:aws:states:eu-west-1:123456789012:execution:skin-lesion-deployment:7c2b1d4e"
GATE = texts.Gate(thresholds={"balanced_accuracy": 0.75, "melanoma_sensitivity": 0.70, "macro_auc": 0.90},
                  max_regression=0.01, failed_metrics=frozenset(), summary="balanced_accuracy 0.781 ... meet the gate")
METRICS = {"balanced_accuracy": 0.781, "macro_auc": 0.954, "melanoma_sensitivity": 0.742,
           "melanoma_specificity": 0.903, "accuracy": 0.842}
BASELINE = {"balanced_accuracy": 0.762, "macro_auc": 0.941, "melanoma_sensitivity": 0.713,
            "melanoma_specificity": 0.897, "accuracy": 0.831}
PLOTS = [texts.Plot("confusion_matrix.png", "art", "evaluations/job-1/plots/confusion_matrix.png"),
         texts.Plot("roc.png", "art", "evaluations/job-1/plots/roc.png")]
APPROVE = f"aws sagemaker update-model-package --model-package-arn {PKG} --model-approval-status Approved"
REJECT = (f"aws sagemaker update-model-package --model-package-arn {PKG} --model-approval-status Rejected "
          '--approval-description "')


def _registered(**overrides: Any) -> texts.Message:
    args: dict[str, Any] = {
        "stack": STACK, "execution_arn": EXEC, "package_arn": PKG, "version": 3, "group": "skin-lesion-models",
        "approval_status": "PendingManualApproval", "training_job": "job-1", "architecture": "efficientnet_b0",
        "n_test": 1503, "metrics": METRICS, "baseline": BASELINE, "baseline_model": "the newest approved version",
        "gate": GATE, "plots": PLOTS, "plots_prefix": "s3://art/evaluations/job-1/plots/",
        "metrics_uri": "s3://art/evaluations/job-1/metrics.json", "trigger": "manual"}
    args.update(overrides)
    return texts.registered(**args)


def _row(body: str, metric: str) -> list[str]:
    (line,) = [ln for ln in body.splitlines() if ln.split()[:1] == [metric]]
    return line.split()


def _assert_sns_subject(subject: str) -> None:
    assert len(subject) < 100 and subject.isascii() and "\n" not in subject and subject.isprintable()


# ------------------------------------------------------------------ registered
def test_registered_message_has_everything_a_reviewer_needs() -> None:
    msg = _registered()
    _assert_sns_subject(msg.subject)
    assert STACK in msg.subject and "registered" in msg.subject and "version 3" in msg.subject
    body = msg.body
    assert PKG in body
    assert APPROVE in body and REJECT in body and "--region eu-west-1" in body
    # Both models' figures side by side, with the gate's minimum and the verdict.
    assert _row(body, "balanced_accuracy") == ["balanced_accuracy", "0.781", "0.762", "+0.019", "0.750", "passed"]
    assert _row(body, "melanoma_sensitivity") == ["melanoma_sensitivity", "0.742", "0.713", "+0.029", "0.700",
                                                  "passed"]
    assert _row(body, "macro_auc") == ["macro_auc", "0.954", "0.941", "+0.013", "0.900", "passed"]
    assert _row(body, "accuracy")[1:4] == ["0.842", "0.831", "+0.011"] and "not gated" in body
    assert "new model" in body and "current model" in body and "1503 images" in body
    assert "at most 0.010 below the current model's" in body
    # The plots: a console link each, and one command for all.
    assert ("https://eu-west-1.console.aws.amazon.com/s3/object/art?region=eu-west-1"
            "&prefix=evaluations/job-1/plots/confusion_matrix.png") in body
    assert "evaluations/job-1/plots/roc.png" in body
    assert "aws s3 cp s3://art/evaluations/job-1/plots/ ./job-1-plots/ --recursive" in body
    assert "s3://art/evaluations/job-1/metrics.json" in body
    assert f"https://eu-west-1.console.aws.amazon.com/states/home?region=eu-west-1#/v2/executions/details/{EXEC}" \
        in body
    assert body.isascii()


def test_registered_first_model_has_no_comparison() -> None:
    body = _registered(baseline=None, baseline_model=None).body
    assert _row(body, "balanced_accuracy")[1:4] == ["0.781", "-", "-"]
    assert "No model was approved before" in body and "none yet, so not applied" in body


def test_auto_approved_model_says_it_deploys_and_offers_no_approve_command() -> None:
    msg = _registered(approval_status="Approved")
    assert "approved, deploying" in msg.subject
    assert "deployment has started" in msg.body
    assert APPROVE not in msg.body and REJECT in msg.body


def test_missing_plots_are_explained() -> None:
    body = _registered(plots=[], plots_note="The training job wrote no evaluation/*.png into s3://x.").body
    assert "none were copied" in body and "wrote no evaluation/*.png" in body


def test_gate_rejection_marks_the_failing_metric() -> None:
    gate = texts.Gate(thresholds=GATE.thresholds, max_regression=0.01, failed_metrics=frozenset({"balanced_accuracy"}),
                      summary="balanced_accuracy 0.700 < 0.750 (threshold)")
    msg = texts.rejected_by_gate(stack=STACK, execution_arn=EXEC, training_job="job-1", n_test=60,
                                 metrics={**METRICS, "balanced_accuracy": 0.70}, baseline=None, gate=gate, plots=PLOTS)
    assert STACK in msg.subject and "rejected" in msg.subject
    assert _row(msg.body, "balanced_accuracy")[-1] == "FAILED"
    assert _row(msg.body, "macro_auc")[-1] == "passed"
    assert "balanced_accuracy 0.700 < 0.750" in msg.body and "roc.png" in msg.body


@pytest.mark.parametrize("stack", ["s", "a" * 128])
def test_subject_is_valid_for_sns_and_keeps_what_happened(stack: str) -> None:
    msg = _registered(stack=stack)
    _assert_sns_subject(msg.subject)
    assert msg.subject.endswith("Skin-lesion model registered: version 3 awaits approval")


def test_subject_drops_line_breaks_and_non_ascii() -> None:
    subject = texts.subject("st\u00e4ck", "line\none\ttwo")
    _assert_sns_subject(subject)
    assert subject == "[st?ck] line one two"


# ------------------------------------------------------------------ failures
def test_lambda_failure_names_the_step_error_cause_and_logs() -> None:
    cause = json.dumps({"errorMessage": "s3://a/b/output.tar.gz has no metrics.json", "errorType":
                        "MetricsMissingError", "requestId": "11111111-2222-3333-4444-555555555555",
                        "stackTrace": ["  File app.py"]})
    step = texts.FailedStep(state="EvaluateModel", resource="lambda:invoke", function_name="stack-EvaluateModel-X",
                            log_group="/aws/lambda/skin-lesion-prod/evaluate-model")
    msg = texts.retraining_failed(stack=STACK, execution_arn=EXEC, step=step, error="MetricsMissingError", cause=cause)
    _assert_sns_subject(msg.subject)
    assert STACK in msg.subject and "failed at EvaluateModel" in msg.subject
    body = msg.body
    assert "Step:  EvaluateModel (lambda:invoke)" in body
    assert "Error: MetricsMissingError" in body
    assert "Cause: MetricsMissingError: s3://a/b/output.tar.gz has no metrics.json" in body
    assert "stackTrace" not in body
    assert "log group /aws/lambda/skin-lesion-prod/evaluate-model, request 11111111-2222-3333-4444-555555555555" in body
    assert ("aws logs tail /aws/lambda/skin-lesion-prod/evaluate-model --since 1d --region eu-west-1 "
            "--filter-pattern '\"11111111-2222-3333-4444-555555555555\"'") in body
    assert ("https://eu-west-1.console.aws.amazon.com/cloudwatch/home?region=eu-west-1#logsV2:log-groups/log-group/"
            "$252Faws$252Flambda$252Fskin-lesion-prod$252Fevaluate-model") in body
    assert f"#/v2/executions/details/{EXEC}" in body
    assert ("aws stepfunctions start-execution --state-machine-arn "
            "arn:aws:states:eu-west-1:123456789012:stateMachine:skin-lesion-retraining --region eu-west-1 "
            "--input '{\"trigger\": {\"type\": \"manual\", \"reason\": \"after MetricsMissingError\"}}'") in body


def test_training_failure_points_at_the_training_job_logs() -> None:
    step = texts.FailedStep(state="TrainModel", resource="sagemaker:createTrainingJob.sync", training_job="job-7")
    msg = texts.retraining_failed(stack=STACK, execution_arn=EXEC, step=step, error="TrainingJobFailedError",
                                  cause="Training job job-7 failed: AlgorithmError: epochs='abc'")
    body = msg.body
    assert "Step:  TrainModel (sagemaker:createTrainingJob.sync)" in body
    assert "Cause: Training job job-7 failed: AlgorithmError: epochs='abc'" in body
    assert "log group /aws/sagemaker/TrainingJobs, streams starting job-7/" in body
    assert "aws logs tail /aws/sagemaker/TrainingJobs --log-stream-name-prefix job-7/" in body
    assert "https://eu-west-1.console.aws.amazon.com/sagemaker/home?region=eu-west-1#/jobs/job-7" in body


def test_unknown_step_still_says_error_cause_and_where_to_look() -> None:
    msg = texts.retraining_failed(stack=STACK, execution_arn=EXEC, step=None, error="States.Timeout", cause="x" * 5000,
                                  history_note="the execution history could not be read (AccessDeniedException)")
    assert "not found in the execution history" in msg.body and "AccessDeniedException" in msg.body
    assert "Error: States.Timeout" in msg.body and "(cut; the execution page has all of it)" in msg.body
    assert f"#/v2/executions/details/{EXEC}" in msg.body


def test_deployment_failure_says_how_to_deploy_the_version_again() -> None:
    step = texts.FailedStep(state="UpdateEndpoint", resource="lambda:invoke", function_name="f",
                            log_group="/aws/lambda/skin-lesion-prod/update-endpoint")
    msg = texts.deployment_failed(stack=STACK, execution_arn=DEPLOY_EXEC, step=step, error="EndpointUpdateError",
                                  cause="quota", package_arn=PKG, version=3, lock_table="lock-table")
    assert STACK in msg.subject and "deployment failed at UpdateEndpoint" in msg.subject
    assert "Step:  UpdateEndpoint (lambda:invoke)" in msg.body and "Error: EndpointUpdateError" in msg.body
    assert "/aws/lambda/skin-lesion-prod/update-endpoint" in msg.body
    assert ("aws dynamodb delete-item --table-name lock-table --region eu-west-1 "
            f"--key '{{\"ModelPackageArn\": {{\"S\": \"{PKG}\"}}}}'") in msg.body
    assert APPROVE in msg.body


def test_rollback_and_deployed_messages() -> None:
    step = texts.FailedStep(state="SmokeTest", resource="lambda:invoke")
    back = texts.rolled_back(stack=STACK, execution_arn=DEPLOY_EXEC, step=step, error="SmokeTestFailedError",
                             cause="wrong class", version=4, endpoint="ep", previous_config="ep-v3")
    assert "rolled back" in back.subject and STACK in back.subject
    assert "(ep-v3) keeps serving" in back.body and "Step:  SmokeTest" in back.body and "wrong class" in back.body
    done = texts.deployed(stack=STACK, execution_arn=DEPLOY_EXEC, package_arn=PKG, version=4, endpoint="ep",
                          action="updated", instance_type="ml.c5.xlarge", traffic="CANARY", min_capacity=1,
                          max_capacity=5, smoke_summary="known image: mel 0.91")
    assert "Skin-lesion model deployed" in done.subject and STACK in done.subject
    assert "aws sagemaker-runtime invoke-endpoint --endpoint-name ep" in done.body and "1..5 instances" in done.body


def test_not_enough_data_lists_the_reasons_and_how_to_force() -> None:
    msg = texts.not_enough_data(stack=STACK, execution_arn=EXEC, summary="10 validated images (10 new); not enough",
                                reasons=["class mel has 2 validated images, 10 needed"])
    assert "not enough data" in msg.subject and STACK in msg.subject
    assert "  - class mel has 2 validated images, 10 needed" in msg.body
    assert ("aws stepfunctions start-execution --state-machine-arn "
            "arn:aws:states:eu-west-1:123456789012:stateMachine:skin-lesion-retraining") in msg.body
    assert '"force": true' in msg.body


# ------------------------------------------------------------------ the failed step, from the history
def _entered(kind: str, name: str) -> dict[str, Any]:
    return {"type": f"{kind}StateEntered", "stateEnteredEventDetails": {"name": name}}


def _lambda_task(name: str, function: str, outcomes: list[str]) -> list[dict[str, Any]]:
    events = [_entered("Task", name)]
    for outcome in outcomes:
        events.append({"type": "TaskScheduled", "taskScheduledEventDetails": {
            "resourceType": "lambda", "resource": "invoke", "region": "eu-west-1",
            "parameters": json.dumps({"FunctionName": f"arn:aws:lambda:eu-west-1:123456789012:function:{function}",
                                      "Payload": {}})}})
        events.append({"type": "TaskStarted"})
        events.append({"type": outcome, f"{outcome[0].lower()}{outcome[1:]}EventDetails": {"error": "E"}})
    return events


def _numbered(*groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    events = [{"type": "ExecutionStarted"}] + [e for g in groups for e in g]
    return [{**e, "id": i + 1} for i, e in enumerate(events)]


LOG_GROUPS = {"fn-evaluate": "/aws/lambda/s/evaluate-model", "fn-smoke": "/aws/lambda/s/smoke-test-endpoint",
              "fn-check": "/aws/lambda/s/check-endpoint", "fn-update": "/aws/lambda/s/update-endpoint"}


def test_failed_step_is_the_task_whose_last_attempt_failed(compose_module: Any) -> None:
    events = _numbered(_lambda_task("CheckData", "fn-check-data", ["TaskSucceeded"]),
                       _lambda_task("EvaluateModel", "fn-evaluate", ["TaskFailed", "TaskFailed"]),
                       _lambda_task("NotifyFailure", "fn-compose", []))
    step = compose_module.failed_step(reversed(events), "NotifyFailure", LOG_GROUPS)
    assert step == texts.FailedStep(state="EvaluateModel", resource="lambda:invoke", function_name="fn-evaluate",
                                    log_group="/aws/lambda/s/evaluate-model")


def test_failed_training_job_is_found_through_the_pass_and_choice_states(compose_module: Any) -> None:
    train = [_entered("Task", "TrainModel"),
             {"type": "TaskScheduled", "taskScheduledEventDetails": {
                 "resourceType": "sagemaker", "resource": "createTrainingJob.sync",
                 "parameters": json.dumps({"TrainingJobName": "job-9", "RoleArn": "r"})}},
             {"type": "TaskSubmitted"}, {"type": "TaskFailed"}, {"type": "TaskStateExited"}]
    events = _numbered(train, [_entered("Pass", "ReadTrainingFailure"), _entered("Choice", "TrainingJobFailed?"),
                               _entered("Pass", "TrainingJobFailed")], _lambda_task("NotifyFailure", "c", []))
    step = compose_module.failed_step(reversed(events), "NotifyFailure", LOG_GROUPS)
    assert step is not None and step.state == "TrainModel" and step.training_job == "job-9"
    assert step.resource == "sagemaker:createTrainingJob.sync" and step.function_name is None


def test_rollback_names_the_failed_smoke_test_not_the_rollback_that_worked(compose_module: Any) -> None:
    events = _numbered(_lambda_task("SmokeTest", "fn-smoke", ["TaskFailed"]), [_entered("Choice", "CanRollBack?")],
                       _lambda_task("RollBackEndpoint", "fn-update", ["TaskFailed", "TaskSucceeded"]),
                       _lambda_task("NotifyRolledBack", "c", []))
    step = compose_module.failed_step(reversed(events), "NotifyRolledBack", LOG_GROUPS)
    assert step is not None and step.state == "SmokeTest" and step.log_group == "/aws/lambda/s/smoke-test-endpoint"


def test_a_timeout_declared_by_a_choice_names_the_last_task(compose_module: Any) -> None:
    polls = [_lambda_task("CheckEndpoint", "fn-check", ["TaskSucceeded"]) + [_entered("Choice", "Settled?"),
                                                                             _entered("Wait", "WaitForEndpoint")]
             for _ in range(3)]
    events = _numbered(_lambda_task("UpdateEndpoint", "fn-update", ["TaskSucceeded"]), *polls,
                       [_entered("Pass", "EndpointTimedOut")], _lambda_task("NotifyFailure", "c", []))
    step = compose_module.failed_step(reversed(events), "NotifyFailure", LOG_GROUPS)
    assert step is not None and step.state == "CheckEndpoint"


def test_a_redriven_execution_reports_only_its_latest_run(compose_module: Any) -> None:
    events = _numbered(_lambda_task("EvaluateModel", "fn-evaluate", ["TaskFailed"]), [{"type": "ExecutionRedriven"}],
                       [_entered("Pass", "SomePass")], _lambda_task("NotifyFailure", "c", []))
    assert compose_module.failed_step(reversed(events), "NotifyFailure", LOG_GROUPS) is None


class PagedHistory:
    """get_execution_history as AWS pages it: reverseOrder, maxResults, nextToken."""

    def __init__(self, events: list[dict[str, Any]], page: int = 2, fail: str | None = None):
        self.events, self.page, self.fail, self.calls = events, page, fail, 0

    def get_execution_history(self, executionArn: str, reverseOrder: bool = False, maxResults: int = 100,
                              nextToken: str | None = None, **_: Any) -> dict[str, Any]:
        self.calls += 1
        if self.fail:
            raise ClientError({"Error": {"Code": self.fail, "Message": "no"}}, "GetExecutionHistory")
        ordered = list(reversed(self.events)) if reverseOrder else list(self.events)
        start = int(nextToken or 0)
        out: dict[str, Any] = {"events": ordered[start:start + self.page]}
        if start + self.page < len(ordered):
            out["nextToken"] = str(start + self.page)
        return out


def test_history_is_read_newest_first_across_pages_and_stops_when_found(compose_module: Any) -> None:
    events = _numbered(*[_lambda_task("CheckData", "fn", ["TaskSucceeded"]) for _ in range(20)],
                       _lambda_task("EvaluateModel", "fn-evaluate", ["TaskFailed"]),
                       _lambda_task("NotifyFailure", "c", []))
    client = PagedHistory(events, page=3)
    step, note = compose_module.find_failed_step(client, EXEC, "NotifyFailure")
    assert step is not None and step.state == "EvaluateModel" and note is None
    assert client.calls <= 4  # not the whole history: it stops at the failed step


# ------------------------------------------------------------------ the handler
COMPOSE_ENV = {"STACK_NAME": STACK, "ARTIFACTS_BUCKET": "skin-lesion-artifacts", "DEPLOYMENT_LOCK_TABLE": "lock",
               "LAMBDA_LOG_GROUPS": json.dumps(LOG_GROUPS)}


@pytest.fixture
def compose_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    return load_handler("compose_notification", COMPOSE_ENV, monkeypatch)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    with mock_aws():
        boto3.client("s3", region_name="eu-west-1").create_bucket(
            Bucket="skin-lesion-artifacts", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        yield load_handler("compose_notification", COMPOSE_ENV, monkeypatch)


def _event(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / f"{name}.json").read_text())


def _put_output(files: dict[str, bytes], job: str = "skinlesion-manual-2026-11-29") -> None:
    boto3.client("s3").put_object(Bucket="skin-lesion-artifacts", Key=f"training-jobs/{job}/output/output.tar.gz",
                                  Body=tar_gz(files))


PNG = b"\x89PNG\r\n\x1a\nfake"


def test_registered_sample_copies_the_plots_and_links_them(aws: Any) -> None:
    _put_output({"metrics.json": b"{}", "evaluation/roc.png": PNG, "evaluation/confusion_matrix.png": PNG,
                 "evaluation/../../evil.png": PNG, "model.pt": b"weights"})
    out = aws.lambda_handler(_event("registered"), Context())
    assert set(out) == {"subject", "message"}
    assert STACK in out["subject"] and "registered" in out["subject"]
    s3 = boto3.client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="skin-lesion-artifacts",
                                                 Prefix="evaluations/")["Contents"]}
    prefix = "evaluations/skinlesion-manual-2026-11-29/plots/"
    assert keys == {prefix + "roc.png", prefix + "confusion_matrix.png"}
    head = s3.head_object(Bucket="skin-lesion-artifacts", Key=prefix + "roc.png")
    assert head["ContentType"] == "image/png"
    body = out["message"]
    assert "arn:aws:sagemaker:eu-west-1:123456789012:model-package/skin-lesion-models/3" in body
    assert "--model-approval-status Approved" in body and "--model-approval-status Rejected" in body
    assert _row(body, "balanced_accuracy") == ["balanced_accuracy", "0.781", "0.762", "+0.019", "0.750", "passed"]
    assert f"prefix={prefix}roc.png" in body and f"aws s3 cp s3://skin-lesion-artifacts/{prefix}" in body
    assert "training-jobs/skinlesion-schedule-2026-11-01/output/model.tar.gz" in body  # which model is "current"
    assert "manual (new ISIC 2019 batch uploaded; by dermatology-ml-team)" in body
    # A repeated invocation (a retried state) writes the same objects and the same text.
    assert aws.lambda_handler(_event("registered"), Context()) == out


def test_registered_without_the_job_output_still_composes(aws: Any) -> None:
    out = aws.lambda_handler(_event("registered"), Context())
    assert "none were copied" in out["message"] and "NoSuchKey" in out["message"]
    assert "--model-approval-status Approved" in out["message"]


def test_retraining_failure_sample_reads_the_failed_step(aws: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    train = [_entered("Task", "TrainModel"),
             {"type": "TaskScheduled", "taskScheduledEventDetails": {
                 "resourceType": "sagemaker", "resource": "createTrainingJob.sync",
                 "parameters": json.dumps({"TrainingJobName": "skinlesion-manual-2026-11-29"})}},
             {"type": "TaskFailed"}]
    monkeypatch.setattr(aws, "sfn", PagedHistory(_numbered(train, [_entered("Pass", "TrainingJobFailed")],
                                                           _lambda_task("NotifyFailure", "c", []))))
    out = aws.lambda_handler(_event("retraining_failed"), Context())
    assert STACK in out["subject"] and "failed at TrainModel" in out["subject"]
    body = out["message"]
    assert "Step:  TrainModel (sagemaker:createTrainingJob.sync)" in body
    assert "Error: TrainingJobFailedError" in body and "epochs='abc'" in body
    assert "--log-stream-name-prefix skinlesion-manual-2026-11-29/" in body
    assert "#/v2/executions/details/arn:aws:states:eu-west-1:123456789012:execution:skin-lesion-retraining:" in body


def test_unreadable_history_still_gives_error_cause_and_training_logs(aws: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aws, "sfn", PagedHistory([], fail="AccessDeniedException"))
    body = aws.lambda_handler(_event("retraining_failed"), Context())["message"]
    assert "could not be read (AccessDeniedException)" in body and "Error: TrainingJobFailedError" in body
    assert "--log-stream-name-prefix skinlesion-manual-2026-11-29/" in body  # from failedTraining in the state


def test_deployment_failure_sample(aws: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aws, "sfn", PagedHistory(_numbered(_lambda_task("UpdateEndpoint", "fn-update", ["TaskFailed"]),
                                                           _lambda_task("NotifyFailure", "c", []))))
    out = aws.lambda_handler(_event("deployment_failed"), Context())
    assert "deployment failed at UpdateEndpoint" in out["subject"]
    body = out["message"]
    assert "Cause: EndpointUpdateError: skin-lesion-endpoint failed: ResourceLimitExceeded" in body
    assert "/aws/lambda/s/update-endpoint, request 5f2a0d8e-3c1b-4e7a-9f60-1b2c3d4e5f60" in body
    assert "aws dynamodb delete-item --table-name lock" in body


@pytest.mark.parametrize("event", [
    {"kind": "registered", "executionArn": EXEC, "stateName": "NotifySuccess", "state": {}},  # no evaluation
    {"kind": "promoted", "executionArn": EXEC, "stateName": "X", "state": {}},
    {"kind": "registered", "executionArn": "not-an-arn", "stateName": "X", "state": {}},
])
def test_an_event_it_cannot_compose_is_a_named_error(aws: Any, event: dict[str, Any]) -> None:
    with pytest.raises(Exception) as info:
        aws.lambda_handler(event, Context())
    assert type(info.value).__name__ == "InvalidRequestError"


def test_gate_verdict_carries_the_rules_the_message_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MIN_BALANCED_ACCURACY": "0.75", "MIN_MELANOMA_SENSITIVITY": "0.70", "MIN_MACRO_AUC": "0.90",
           "MAX_REGRESSION": "0.01"}
    app = load_handler("gate_model", env, monkeypatch)
    out = app.lambda_handler({"metrics": {"balanced_accuracy": 0.8, "melanoma_sensitivity": 0.8, "macro_auc": 0.95}},
                             Context())
    assert out["thresholds"] == {"balanced_accuracy": 0.75, "melanoma_sensitivity": 0.70, "macro_auc": 0.90}
    assert out["maxRegression"] == 0.01
