"""Local mode's SageMaker training: ``createTrainingJob.sync`` in moto's ASL interpreter, and SageMaker's answers.

A tiny stand-in replaces the training image's entry point, so each job takes a second, not minutes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from localmode import sagemaker, sfn_sagemaker

REPO = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/sm"
# The stand-in algorithm: its hyperparameter "mode" says what it does.
FAKE_TRAINING = '''
import json, os, pathlib, sys, time
hps = json.loads(os.environ["SM_HPS"])
mode = hps.get("mode", "succeed")
print("epoch=1; train_loss=0.5;", flush=True)
if mode == "fail":
    pathlib.Path(os.environ["SM_OUTPUT_DIR"], "failure").write_text("AlgorithmError: epochs='abc' is not an integer")
    sys.exit(1)
if mode == "sleep":
    time.sleep(120)
pathlib.Path(os.environ["SM_MODEL_DIR"], "model.ts").write_text("weights")
pathlib.Path(os.environ["SM_OUTPUT_DATA_DIR"], "metrics.json").write_text("{}")
print("test_balanced_accuracy=0.625;", flush=True)
'''
DEFINITION = {
    "StartAt": "Train",
    "States": {
        "Train": {
            "Type": "Task",
            "Resource": "arn:aws:states:::sagemaker:createTrainingJob.sync",
            "Parameters": {
                "TrainingJobName.$": "$.name",
                "AlgorithmSpecification": {
                    "TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/train:1",
                    "TrainingInputMode": "File",
                    "MetricDefinitions": [{"Name": "test:balanced_accuracy",
                                           "Regex": "test_balanced_accuracy=([0-9.]+);"}],
                },
                "RoleArn.$": "$.role",  # moto's lexer reads "RoleArn.$" as a keyword: the integration copes
                "HyperParameters.$": "$.hps",
                "InputDataConfig": [],
                "OutputDataConfig": {"S3OutputPath": "s3://artifacts/training-jobs/"},
                "ResourceConfig.$": "$.resources",
                "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
            },
            "TimeoutSecondsPath": "$.timeout",
            "End": True,
        }
    },
}
CPU = {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 5}


class Local:
    """A state machine with one createTrainingJob.sync state, over local mode's SageMaker."""

    def __init__(self, runners: list[sagemaker.TrainingJobRunner], events: list[dict[str, Any]]):
        self.runners = runners
        self.events = events
        self.sfn = boto3.client("stepfunctions", region_name=REGION)
        self.sm = boto3.client("sagemaker", region_name=REGION)
        self.arn = self.sfn.create_state_machine(name="train", definition=json.dumps(DEFINITION),
                                                 roleArn="arn:aws:iam::123456789012:role/sfn")["stateMachineArn"]

    def start(self, name: str, mode: str = "succeed", timeout: int = 600,
              resources: dict[str, Any] | None = None) -> str:
        execution_input = {"name": name, "hps": {"mode": mode}, "timeout": timeout, "resources": resources or CPU,
                           "role": ROLE}
        return self.sfn.start_execution(stateMachineArn=self.arn, name=f"run-{name}",
                                        input=json.dumps(execution_input))["executionArn"]

    def wait(self, execution_arn: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            desc = self.sfn.describe_execution(executionArn=execution_arn)
            if desc["status"] != "RUNNING":
                return desc
            assert time.monotonic() < deadline, "execution still running"
            time.sleep(0.2)

    def wait_for_job(self, name: str, statuses: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                job = self.sm.describe_training_job(TrainingJobName=name)
                if job["TrainingJobStatus"] in statuses and (job["TrainingJobStatus"] != "InProgress"
                                                              or job["SecondaryStatus"] == "Training"):
                    return job
            except ClientError:
                pass
            assert time.monotonic() < deadline, f"job {name} never reached {statuses}"
            time.sleep(0.1)

    def task_failure(self, execution_arn: str) -> dict[str, Any]:
        events = self.sfn.get_execution_history(executionArn=execution_arn)["events"]
        (failed,) = [e["taskFailedEventDetails"] for e in events if e["type"] == "TaskFailed"]
        return failed


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Local]:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setattr(sagemaker, "STOP_GRACE_SECONDS", 2.0)
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAINING)
    runners: list[sagemaker.TrainingJobRunner] = []
    events: list[dict[str, Any]] = []
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        boto3.client("s3", region_name=REGION).create_bucket(Bucket="artifacts")
        undo_jobs = sagemaker.install(tmp_path / "jobs", REPO, events.append, runners,
                                      command=[sys.executable, str(script)])
        undo_sfn = sfn_sagemaker.install()
        try:
            yield Local(runners, events)
        finally:
            for runner in runners:
                runner.stop()
                runner.thread.join(timeout=30)
            undo_sfn()
            undo_jobs()


def test_sync_returns_the_completed_jobs_description(local: Local) -> None:
    execution = local.wait(local.start("skinlesion-ok"))
    assert execution["status"] == "SUCCEEDED", execution
    output = json.loads(execution["output"])
    assert output["TrainingJobName"] == "skinlesion-ok" and output["TrainingJobStatus"] == "Completed"
    assert output["RoleArn"] == ROLE
    assert output["ModelArtifacts"]["S3ModelArtifacts"] == (
        "s3://artifacts/training-jobs/skinlesion-ok/output/model.tar.gz")
    assert {m["MetricName"]: m["Value"] for m in output["FinalMetricDataList"]}["test:balanced_accuracy"] == 0.625
    assert isinstance(output["CreationTime"], int)  # epoch milliseconds, as Step Functions renders them
    rule = boto3.client("events", region_name=REGION).describe_rule(
        Name="StepFunctionsGetEventsForSageMakerTrainingJobsRule")
    assert json.loads(rule["EventPattern"])["detail-type"] == ["SageMaker Training Job State Change"]


def test_a_failed_job_fails_the_task_with_its_description_as_cause(local: Local) -> None:
    arn = local.start("skinlesion-bad", mode="fail")
    execution = local.wait(arn)
    assert execution["status"] == "FAILED" and execution["error"] == "States.TaskFailed"
    cause = json.loads(local.task_failure(arn)["cause"])
    assert cause["TrainingJobStatus"] == "Failed"
    assert cause["FailureReason"] == "AlgorithmError: epochs='abc' is not an integer"
    assert json.loads(execution["cause"])["TrainingJobName"] == "skinlesion-bad"


def test_aborting_the_execution_stops_the_job(local: Local) -> None:
    arn = local.start("skinlesion-abort", mode="sleep")
    local.wait_for_job("skinlesion-abort", ("InProgress",))
    local.sfn.stop_execution(executionArn=arn, error="Operator", cause="wrong data")
    job = local.wait_for_job("skinlesion-abort", ("Stopped",))
    assert job["SecondaryStatus"] == "Stopped" and "FailureReason" not in job
    (runner,) = local.runners
    runner.thread.join(timeout=30)
    assert runner.proc is not None and runner.proc.returncode is not None  # the process really ended
    assert [e["TrainingJobStatus"] for e in local.events][-2:] == ["Stopping", "Stopped"]
    assert local.wait(arn)["status"] == "ABORTED"


def test_a_timed_out_state_stops_the_job(local: Local) -> None:
    arn = local.start("skinlesion-slow", mode="sleep", timeout=3)
    execution = local.wait(arn)
    assert execution["status"] == "FAILED" and execution["error"] == "States.Timeout"
    assert local.wait_for_job("skinlesion-slow", ("Stopped",))["TrainingJobStatus"] == "Stopped"


def test_sagemaker_errors_get_step_functions_names(local: Local) -> None:
    """A taken name is the modelled ResourceInUse; a volume key on an NVMe instance is a ValidationException."""
    assert local.wait(local.start("skinlesion-twice"))["status"] == "SUCCEEDED"
    again = local.sfn.start_execution(stateMachineArn=local.arn, name="run-again", input=json.dumps(
        {"name": "skinlesion-twice", "hps": {}, "timeout": 60, "resources": CPU, "role": ROLE}))["executionArn"]
    failed = local.wait(again)
    assert failed["error"] == "SageMaker.ResourceInUseException"
    assert "Training job names must be unique within an AWS account and region" in failed["cause"]
    assert "Error Code: ResourceInUse" in failed["cause"]

    nvme = {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 5,
            "VolumeKmsKeyId": "arn:aws:kms:us-east-1:123456789012:key/abc"}
    rejected = local.wait(local.start("skinlesion-nvme", resources=nvme))
    assert rejected["error"] == "SageMaker.AmazonSageMakerException"
    assert "VolumeKmsKeyId is not supported for instance type ml.g5.xlarge" in rejected["cause"]
    assert "Error Code: ValidationException" in rejected["cause"]
    without_key = {k: v for k, v in nvme.items() if k != "VolumeKmsKeyId"}
    assert local.wait(local.start("skinlesion-nvme-ok", resources=without_key))["status"] == "SUCCEEDED"


def test_unknown_job_answers_as_sagemaker(local: Local) -> None:
    for call in (local.sm.describe_training_job, local.sm.stop_training_job):
        with pytest.raises(ClientError) as info:
            call(TrainingJobName="skinlesion-nobody")
        assert info.value.response["Error"] == {"Code": "ValidationException",
                                                "Message": "Requested resource not found."}


def test_only_an_in_progress_job_can_be_stopped(local: Local) -> None:
    assert local.wait(local.start("skinlesion-done"))["status"] == "SUCCEEDED"
    with pytest.raises(ClientError) as info:
        local.sm.stop_training_job(TrainingJobName="skinlesion-done")
    assert info.value.response["Error"]["Code"] == "ValidationException"


def test_parameters_must_be_fields_of_the_request(local: Local) -> None:
    bad = json.loads(json.dumps(DEFINITION))
    bad["States"]["Train"]["Parameters"] = {"Request.$": "$"}
    arn = local.sfn.create_state_machine(name="bad", definition=json.dumps(bad), roleArn=ROLE)["stateMachineArn"]
    execution = local.sfn.start_execution(stateMachineArn=arn, input=json.dumps({"timeout": 60}))["executionArn"]
    failed = local.wait(execution)
    assert failed["status"] == "FAILED" and "Request" in failed.get("cause", "")
