"""The enforcer without the whole stack: state machine executions, report mode, explicit deny, unmapped calls."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from localmode import iam
from localmode.cloud import ACCOUNT, REGION
from localmode.iam_actions import Mapper, MotoWorld
from localmode.iam_policy import PolicySet, Principal, Statement


def _error(call: Any) -> dict[str, Any]:
    with pytest.raises(ClientError) as info:
        call()
    return info.value.response["Error"]


def _principal(role: str, statements: list[Statement]) -> Principal:
    return Principal(role=role, arn=f"arn:aws:iam::{ACCOUNT}:role/{role}", service="states.amazonaws.com",
                     session="StepFunctions", statements=statements)


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        yield


def test_a_state_machine_execution_acts_as_its_role(aws: None, tmp_path: Path) -> None:
    sns = boto3.client("sns", region_name=REGION)
    sfn = boto3.client("stepfunctions", region_name=REGION)
    allowed = sns.create_topic(Name="allowed")["TopicArn"]
    other = sns.create_topic(Name="other")["TopicArn"]

    def machine(name: str, topic: str) -> str:
        definition = {"StartAt": "Notify", "States": {"Notify": {
            "Type": "Task", "Resource": "arn:aws:states:::sns:publish",
            "Parameters": {"TopicArn": topic, "Message": "hi"}, "End": True}}}
        return sfn.create_state_machine(name=name, definition=json.dumps(definition),
                                        roleArn=f"arn:aws:iam::{ACCOUNT}:role/sm")["stateMachineArn"]

    good, bad = machine("good", allowed), machine("bad", other)
    role = _principal("SmRole", [Statement("SmRole/p/0", "Allow", ("sns:Publish",), resources=(allowed,))])
    policies = PolicySet({"SmRole": role}, state_machines={good: "SmRole", bad: "SmRole"})
    enforcer = iam.Enforcer(policies, Mapper(ACCOUNT, REGION, MotoWorld(ACCOUNT, REGION)),
                            trace_path=tmp_path / "t.jsonl")
    undo = enforcer.install()
    try:
        results = {}
        for arn in (good, bad):
            execution = sfn.start_execution(stateMachineArn=arn)["executionArn"]
            for _ in range(100):
                desc = sfn.describe_execution(executionArn=execution)
                if desc["status"] != "RUNNING":
                    break
                time.sleep(0.1)
            results[arn] = desc
    finally:
        undo()
    assert results[good]["status"] == "SUCCEEDED"
    assert results[bad]["status"] == "FAILED"
    assert "AuthorizationError" in results[bad].get("error", "") + results[bad].get("cause", "")
    assert [d["action"] for d in enforcer.denials] == ["sns:Publish"]


def test_report_mode_lets_a_denied_call_through_and_records_it(aws: None, tmp_path: Path) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="bkt")
    principal = Principal(role="R", arn=f"arn:aws:iam::{ACCOUNT}:role/R", service="lambda.amazonaws.com",
                          session="f", statements=[])
    enforcer = iam.Enforcer(PolicySet({"R": principal}), Mapper(ACCOUNT, REGION, MotoWorld(ACCOUNT, REGION)),
                            mode="report", trace_path=tmp_path / "t.jsonl")
    undo = enforcer.install()
    try:
        with iam.acting_as(principal):
            s3.put_object(Bucket="bkt", Key="k", Body=b"x")
    finally:
        undo()
    assert [(d["action"], d["resource"]) for d in enforcer.denials] == [("s3:PutObject", "arn:aws:s3:::bkt/k")]
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert rows[-1]["allowed"] is False and rows[-1]["decision"] == "implicit-deny"


def test_explicit_deny_message_and_unmapped_operations_fail_loudly(aws: None) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="bkt")
    principal = Principal(role="R", arn=f"arn:aws:iam::{ACCOUNT}:role/R", service="lambda.amazonaws.com",
                          session="f", statements=[
                              Statement("R/p/0", "Allow", ("s3:*",), resources=("*",)),
                              Statement("R/p/1", "Deny", ("s3:DeleteObject",), resources=("arn:aws:s3:::bkt/*",))])
    mapper = Mapper(ACCOUNT, REGION, MotoWorld(ACCOUNT, REGION))
    undo = iam.Enforcer(PolicySet({"R": principal}), mapper).install()
    try:
        with iam.acting_as(principal):
            error = _error(lambda: s3.delete_object(Bucket="bkt", Key="k"))
            assert error["Message"].endswith("s3:DeleteObject on resource: \"arn:aws:s3:::bkt/k\" with an explicit "
                                             "deny in an identity-based policy")
            with pytest.raises(iam.UnmappedOperation, match="GetBucketAccelerateConfiguration"):
                s3.get_bucket_accelerate_configuration(Bucket="bkt")
    finally:
        undo()


def test_off_mode_installs_nothing() -> None:
    assert iam.enable(object(), mode="off") is None
