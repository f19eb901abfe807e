"""Local mode: two deployment executions for one model package version (SageMaker can send an approval event more
than once, and a later change to an approved package matches the rule again): one deploys, the other ends
quietly without a SageMaker call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from localmode import LocalCloud
from localmode.cloud import ACCOUNT, REGION

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _states(execution_arn: str) -> list[str]:
    sfn = boto3.client("stepfunctions", region_name=REGION)
    events = sfn.get_execution_history(executionArn=execution_arn, maxResults=1000)["events"]
    return [e["stateEnteredEventDetails"]["name"] for e in events if e["type"].endswith("StateEntered")]


def test_a_second_execution_for_the_same_version_ends_quietly(tmp_path: Path) -> None:
    event: dict[str, Any] = json.loads((REPO / "events" / "deployment" / "model_package_approved.json").read_text())
    with LocalCloud(work_dir=tmp_path / "local") as cloud:
        # The sample names a package of another account's stack; point it at this stack's group (still absent), so
        # the traced calls are the ones this stack's roles make.
        group = cloud.output("ModelPackageGroupName")
        event["detail"]["ModelPackageGroupName"] = group
        event["detail"]["ModelPackageArn"] = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{group}/3"
        sfn = boto3.client("stepfunctions", region_name=REGION)
        machine = cloud.output("DeploymentStateMachineArn")
        # Both start before either ends, as duplicate events do.
        arns = [sfn.start_execution(stateMachineArn=machine, input=json.dumps(event), name=f"dup-{i}")["executionArn"]
                for i in (1, 2)]
        ended = {arn: cloud.wait_for_execution(arn, timeout=300) for arn in arns}
        paths = {arn: _states(arn) for arn in arns}
        quiet = [arn for arn in arns if paths[arn] == ["Start", "TakeVersionLock", "AlreadyDeploying"]]
        assert len(quiet) == 1, paths
        assert ended[quiet[0]]["status"] == "SUCCEEDED"
        (deploying,) = set(arns) - set(quiet)
        assert paths[deploying][:3] == ["Start", "TakeVersionLock", "CreateModelConfig"]
        # (this sample's package does not exist here, so that execution fails after the lock; what matters is that
        # exactly one execution reached SageMaker)
        assert len(cloud.runtime.find("CreateModelConfigFunction").invocations) == 1
        lock = boto3.client("dynamodb", region_name=REGION).get_item(
            TableName=cloud.ref("DeploymentLockTable"),
            Key={"ModelPackageArn": {"S": event["detail"]["ModelPackageArn"]}})["Item"]
        assert lock["ExecutionArn"]["S"] == deploying
        notes = cloud.read_notifications()
        assert len(notes) == 1 and "failed" in notes[0]["subject"]  # nothing from the quiet one
        # The composed message names the step (from the execution history) and its function's log group.
        assert "Step:  CreateModelConfig (lambda:invoke)" in notes[0]["message"]
        assert f"/aws/lambda/{cloud.stack_name}/create-model-config" in notes[0]["message"]
