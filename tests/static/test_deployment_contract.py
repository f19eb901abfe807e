"""The deployment's contract in the template and the ASL: the trigger's pattern, the version lock, the retries of
the named AWS conditions, the wait budget, the KMS grant and the one source of the package's instance type."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from localmode.eventbridge import pattern_matches
from localmode.template import Resolver, load_template

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "template.yaml")
RESOURCES = TEMPLATE["Resources"]
ASL = json.loads((REPO / "statemachines" / "deployment.asl.json").read_text())
STATES = ASL["States"]
SAMPLES = REPO / "events" / "deployment"


def _resolver(stack: str = "skin-lesion") -> Resolver:
    pseudo = {"AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012", "AWS::StackName": stack,
              "AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com"}
    values = {"TrainingImageUri": "i:1", "InferenceImageUri": "i:2"}
    return Resolver(TEMPLATE, {k: v for k, v in values.items() if k in TEMPLATE["Parameters"]}, pseudo)


def _pattern() -> dict[str, Any]:
    events = RESOURCES["DeploymentStateMachine"]["Properties"]["Events"]
    return dict(_resolver().resolve(events["ModelApproved"]["Properties"]["Pattern"]))


def _sample(name: str) -> dict[str, Any]:
    return dict(json.loads((SAMPLES / name).read_text()))


# ------------------------------------------------------------------ defect 5: one deployment per version
def test_only_a_completed_approved_package_starts_a_deployment() -> None:
    pattern = _pattern()
    assert pattern_matches(pattern, _sample("model_package_approved.json"))
    assert not pattern_matches(pattern, _sample("model_package_approved_in_progress.json"))
    pending = _sample("model_package_approved.json")
    pending["detail"]["ModelApprovalStatus"] = "PendingManualApproval"
    assert not pattern_matches(pattern, pending)


def test_a_later_change_to_an_approved_package_still_matches_so_the_lock_must_stop_it() -> None:
    """Why the pattern is not enough: the update event of an approved version looks like its approval."""
    assert pattern_matches(_pattern(), _sample("model_package_approved_updated.json"))
    assert STATES["Start"]["Next"] == "TakeVersionLock"


def test_the_version_lock_is_a_conditional_write_and_a_taken_lock_ends_quietly() -> None:
    lock = STATES["TakeVersionLock"]
    assert lock["Resource"] == "arn:aws:states:::dynamodb:putItem"
    params = lock["Parameters"]
    assert params["TableName"] == "${DeploymentLockTableName}"
    key = RESOURCES["DeploymentLockTable"]["Properties"]["KeySchema"][0]["AttributeName"]
    assert params["Item"][key] == {"S.$": "$.package.ModelPackageArn"}
    assert params["ConditionExpression"] == f"attribute_not_exists({key})"
    taken = [c for c in lock["Catch"] if "DynamoDB.ConditionalCheckFailedException" in c["ErrorEquals"]]
    assert taken and STATES[taken[0]["Next"]]["Type"] == "Succeed"
    assert lock["Catch"][-1]["ErrorEquals"] == ["States.ALL"]  # anything else fails loudly
    assert not any("ConditionalCheckFailed" in e or e in ("States.ALL", "States.TaskFailed")
                   for r in lock["Retry"] for e in r["ErrorEquals"])
    assert lock["Next"] == "CreateModelConfig"  # before any SageMaker call


def test_the_state_machine_may_take_the_lock_and_nothing_more() -> None:
    props = RESOURCES["DeploymentStateMachine"]["Properties"]
    assert props["DefinitionSubstitutions"]["DeploymentLockTableName"] == {"Ref": "DeploymentLockTable"}
    statements = [s for p in props["Policies"] if isinstance(p, dict) for s in p.get("Statement", [])]
    lock = [s for s in statements if any(str(a).startswith("dynamodb:") for a in s["Action"])]
    assert lock == [{"Sid": "TakeTheVersionLock", "Effect": "Allow", "Action": ["dynamodb:PutItem"],
                     "Resource": {"Fn::GetAtt": ["DeploymentLockTable", "Arn"]}}]


# ------------------------------------------------------------------ defect 3: the key's grant for SageMaker
def _statements(logical_id: str) -> list[dict[str, Any]]:
    policies = RESOURCES[logical_id]["Properties"]["Policies"]
    return [s for p in policies if isinstance(p, dict) for s in p.get("Statement", [])]


def test_creating_the_config_needs_no_key_permission() -> None:
    """The key policy must allow "the IAM role that you specify in your CreateEndpoint, UpdateEndpoint requests"
    (CreateEndpointConfig's KmsKeyId documentation): CreateEndpointConfig only names the key."""
    assert not [s for s in _statements("CreateModelConfigFunction") if any(a.startswith("kms:") for a in s["Action"])]


@pytest.mark.parametrize("logical_id", ["UpdateEndpointFunction"])
def test_the_role_that_uses_a_keyed_config_may_grant_the_key_to_sagemaker_only(logical_id: str) -> None:
    statements = _statements(logical_id)
    grants = [s for s in statements if "kms:CreateGrant" in s["Action"]]
    assert grants, f"{logical_id} cannot create the grant SageMaker needs for the endpoint's KMS key"
    for grant in grants:
        assert grant["Action"] == ["kms:CreateGrant"]
        assert grant["Resource"] == {"Fn::GetAtt": ["DataKey", "Arn"]}
        assert grant["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": True}}
    assert any("kms:DescribeKey" in s["Action"] and s["Resource"] == {"Fn::GetAtt": ["DataKey", "Arn"]}
               for s in statements)


# ------------------------------------------------------------------ defect 9: named, retried AWS conditions
RETRIED = {
    "CreateModelConfig": {"SageMakerThrottledError"},
    "UpdateEndpoint": {"SageMakerThrottledError", "EndpointConfigNotVisibleError", "EndpointBusyError",
                       "AutoScalingThrottledError", "AutoScalingConflictError"},
    "CheckEndpoint": {"SageMakerThrottledError"},
    "ConfigureAutoscaling": {"AutoScalingThrottledError", "AutoScalingConflictError"},
    "RollBackEndpoint": {"SageMakerThrottledError", "EndpointConfigNotVisibleError", "EndpointBusyError",
                         "AutoScalingThrottledError", "AutoScalingConflictError"},
}


@pytest.mark.parametrize("state", sorted(RETRIED))
def test_transient_aws_conditions_are_retried_with_backoff(state: str) -> None:
    retried: set[str] = set()
    for retrier in STATES[state]["Retry"]:
        names = set(retrier["ErrorEquals"]) & RETRIED[state]
        if names:
            assert retrier["BackoffRate"] > 1 and retrier["MaxAttempts"] >= 3
            retried |= names
    assert retried == RETRIED[state]


def test_every_retried_name_is_an_error_the_handlers_raise() -> None:
    errors = (REPO / "layers" / "common" / "lesion_common" / "errors.py").read_text()
    for names in RETRIED.values():
        for name in names:
            assert re.search(rf"^class {name}\(PipelineError\)", errors, re.M), name


def test_every_smoke_test_failure_reaches_the_rollback() -> None:
    catch = STATES["SmokeTest"]["Catch"][0]
    assert catch["ErrorEquals"] == ["SmokeTestFailedError"] and catch["Next"] == "CanRollBack?"


# ------------------------------------------------------------------ defect 6: the wait budget
def test_the_wait_budget_comes_from_the_update_not_a_constant() -> None:
    limits = [c for c in STATES["Settled?"]["Choices"] if c.get("Variable") == "$.polls"]
    assert limits == [{"Variable": "$.polls", "NumericGreaterThanEqualsPath": "$.update.result.maxPolls",
                       "Next": "EndpointTimedOut"}]
    assert STATES["WaitForEndpoint"]["SecondsPath"] == "$.update.result.pollSeconds"


def test_bake_parameter_stays_within_sagemakers_wait_limits() -> None:
    bake = TEMPLATE["Parameters"]["BakeSeconds"]
    assert bake["MinValue"] == 0 and bake["MaxValue"] <= 3600  # WaitIntervalInSeconds, TerminationWaitInSeconds


# ------------------------------------------------------------------ defect 13: one source of the instance type
def test_the_package_lists_the_endpoints_instance_type() -> None:
    assert "InferenceInstanceTypes" not in TEMPLATE["Parameters"]
    r = _resolver()

    def instance_type(logical_id: str) -> Any:
        return r.resolve(RESOURCES[logical_id]["Properties"]["Environment"]["Variables"]["ENDPOINT_INSTANCE_TYPE"])

    assert instance_type("RegisterModelFunction") == instance_type("CreateModelConfigFunction") == \
        TEMPLATE["Parameters"]["EndpointInstanceType"]["Default"]
