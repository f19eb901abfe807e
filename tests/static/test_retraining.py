"""The retraining machine's training wait (createTrainingJob.sync) and what the template gives it, checked on the
template as SAM transforms it and on botocore's model of CreateTrainingJob."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from localmode.template import Resolver, load_template
from tests.static.test_security import expand_sam

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "template.yaml")
ASL = json.loads((REPO / "statemachines" / "retraining.asl.json").read_text())
STATES = ASL["States"]
PSEUDO = {"AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012", "AWS::StackName": "skin-lesion",
          "AWS::Partition": "aws"}
REQUIRED = {"TrainingImageUri": "x", "InferenceImageUri": "y"}


def _create_training_job_members() -> set[str]:
    path = next((Path(boto3.__file__).parents[1] / "botocore" / "data" / "sagemaker").glob("*/service-2.json.gz"))
    shapes = json.loads(gzip.decompress(path.read_bytes()))["shapes"]
    return set(shapes["CreateTrainingJobRequest"]["members"])


@pytest.fixture(scope="module")
def transformed() -> dict[str, Any]:
    return expand_sam(TEMPLATE)


# ------------------------------------------------------------------ defect 4: the monthly schedule
@pytest.mark.parametrize(("enabled", "state"), [("true", "ENABLED"), ("false", "DISABLED")])
def test_monthly_schedule_state_follows_the_parameter(transformed: dict[str, Any], enabled: str, state: str) -> None:
    """SAM's transform of the schedule, resolved as CloudFormation would for each EnableMonthlyRetraining value.

    With ``Enabled: !If [...]`` SAM wrote ``State: ENABLED`` whatever the parameter said.
    """
    rule = transformed["Resources"]["RetrainingStateMachineMonthly"]
    assert rule["Type"] == "AWS::Events::Rule"
    resolver = Resolver(transformed, {**REQUIRED, "EnableMonthlyRetraining": enabled}, PSEUDO)
    assert resolver.resolve(rule["Properties"]["State"]) == state


# ------------------------------------------------------------------ the .sync state
@pytest.mark.parametrize("name", ["TrainModel", "TrainModelInVpc"])
def test_training_runs_as_create_training_job_sync(name: str) -> None:
    state = STATES[name]
    assert state["Resource"] == "arn:aws:states:::sagemaker:createTrainingJob.sync"
    keys = {k.removesuffix(".$") for k in state["Parameters"]}
    # Step Functions accepts only the API's own fields as Parameters of an optimised integration.
    assert keys <= _create_training_job_members()
    assert {"TrainingJobName", "AlgorithmSpecification", "RoleArn", "OutputDataConfig", "ResourceConfig",
            "StoppingCondition", "InputDataConfig", "HyperParameters", "CheckpointConfig"} <= keys
    assert ("VpcConfig" in keys) is (name == "TrainModelInVpc")
    assert state["TimeoutSecondsPath"] == "$.prepared.result.timeoutSeconds"
    assert state["ResultPath"] == "$.training" and state["Next"] == "EvaluateModel"


@pytest.mark.parametrize("name", ["TrainModel", "TrainModelInVpc"])
def test_a_failed_job_is_not_retried_and_its_reason_is_notified(name: str) -> None:
    state = STATES[name]
    retried = {e for r in state["Retry"] for e in r["ErrorEquals"]}
    assert "SageMaker.AmazonSageMakerException" in retried
    assert not retried & {"States.TaskFailed", "States.ALL", "States.Timeout"}
    first, *_ = state["Catch"]
    assert first["ErrorEquals"] == ["States.TaskFailed"] and first["Next"] == "ReadTrainingFailure"
    assert "StringToJson($.error.Cause)" in json.dumps(STATES["ReadTrainingFailure"])
    failed = STATES["TrainingJobFailed"]["Parameters"]
    assert failed["Error"] == "TrainingJobFailedError" and "FailureReason" in failed["Cause.$"]
    assert STATES["TrainingJobFailed"]["Next"] == STATES["TrainingJobStopped"]["Next"] == "NotifyFailure"


def test_prepare_then_choose_train_or_reuse() -> None:
    assert STATES["EnoughData?"]["Choices"][0]["Next"] == "PrepareTraining"
    prepare = STATES["PrepareTraining"]
    assert prepare["Parameters"]["FunctionName"] == "${PrepareTrainingFunctionArn}"
    assert prepare["Next"] == "TrainingJobDone?"
    choice = STATES["TrainingJobDone?"]
    assert [c["Next"] for c in choice["Choices"]] == ["ReuseTrainingJob", "TrainModelInVpc"]
    assert choice["Default"] == "TrainModel"
    assert STATES["ReuseTrainingJob"]["Next"] == "EvaluateModel"
    payload = STATES["EvaluateModel"]["Parameters"]["Payload"]
    assert payload == {"trainingJobName.$": "$.training.TrainingJobName",
                       "modelDataUrl.$": "$.training.ModelArtifacts.S3ModelArtifacts"}


def test_task_token_machinery_is_gone() -> None:
    resources = TEMPLATE["Resources"]
    for gone in ("TrainingJobsTable", "HandleTrainingEventFunction", "HandleTrainingEventLogGroup",
                 "LaunchTrainingFunction", "LaunchTrainingLogGroup"):
        assert gone not in resources
    assert "waitForTaskToken" not in json.dumps(ASL)
    for path in ("functions/handle_training_event", "functions/launch_training", "events/handle_training_event"):
        assert not (REPO / path).exists()


def test_prepare_function_has_no_metric_definitions_in_its_environment() -> None:
    """Defect 10: the definitions (about 3 KB) are read from the layer, not the 4 KB environment."""
    env = TEMPLATE["Resources"]["PrepareTrainingFunction"]["Properties"]["Environment"]["Variables"]
    assert "METRIC_DEFINITIONS" not in env and "TRAINING_JOBS_TABLE" not in env


# ------------------------------------------------------------------ the state machine's role
def _role_statements(transformed: dict[str, Any], role: str) -> list[dict[str, Any]]:
    statements: list[dict[str, Any]] = []
    for policy in transformed["Resources"][role]["Properties"].get("Policies", []):
        statement = policy["PolicyDocument"]["Statement"]
        statements += statement if isinstance(statement, list) else [statement]
    return statements


def _granted(statements: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [s for s in statements if s["Effect"] == "Allow" and action in (
        s["Action"] if isinstance(s["Action"], list) else [s["Action"]])]


def test_state_machine_role_can_run_the_sync_integration(transformed: dict[str, Any]) -> None:
    """The permissions AWS's policy template for createTrainingJob.sync lists, scoped to the project's jobs."""
    statements = _role_statements(transformed, "RetrainingStateMachineRole")
    resolver = Resolver(transformed, REQUIRED, PSEUDO)
    resolver.attrs["SageMakerExecutionRole"] = {"Arn": "arn:aws:iam::123456789012:role/sm"}
    resolver.attrs["DataKey"] = {"Arn": "arn:aws:kms:eu-west-1:123456789012:key/k"}
    jobs = "arn:aws:sagemaker:eu-west-1:123456789012:training-job/skinlesion-*"
    for action in ("sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob",
                   "sagemaker:AddTags"):
        (grant,) = _granted(statements, action)
        assert resolver.resolve(grant["Resource"]) == jobs, action
    (passrole,) = _granted(statements, "iam:PassRole")
    assert resolver.resolve(passrole["Resource"]) == "arn:aws:iam::123456789012:role/sm"
    assert passrole["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
    rule = "arn:aws:events:eu-west-1:123456789012:rule/StepFunctionsGetEventsForSageMakerTrainingJobsRule"
    for action in ("events:PutTargets", "events:PutRule", "events:DescribeRule"):
        (grant,) = _granted(statements, action)
        assert resolver.resolve(grant["Resource"]) == rule, action
    # The volume key is granted by the job's execution role, the one CreateTrainingJob names ("The KMS key policy
    # must grant permission to the IAM role that you specify in your CreateTrainingJob request"): not the caller.
    assert not _granted(statements, "kms:CreateGrant")


def test_prepare_function_cannot_create_jobs(transformed: dict[str, Any]) -> None:
    statements = _role_statements(transformed, "PrepareTrainingFunctionRole")
    assert _granted(statements, "sagemaker:DescribeTrainingJob")
    for action in ("sagemaker:CreateTrainingJob", "iam:PassRole", "states:SendTaskSuccess", "dynamodb:PutItem"):
        assert not _granted(statements, action), action
