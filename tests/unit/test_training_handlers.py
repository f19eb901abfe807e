"""launch_training and handle_training_event: the event-driven wait for the SageMaker job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from lesion_common.training_jobs import job_name_for_execution
from tests.unit.handlers import Context, RecordingStepFunctions, load_handler

REPO = Path(__file__).resolve().parents[2]
ENV = {
    "TRAINING_IMAGE_URI": "123456789012.dkr.ecr.us-east-1.amazonaws.com/train:1",
    "TRAINING_INSTANCE_TYPE": "ml.g5.xlarge",
    "TRAINING_INSTANCE_COUNT": "1",
    "TRAINING_VOLUME_GB": "50",
    "MAX_RUNTIME_SECONDS": "3600",
    "MAX_WAIT_SECONDS": "7200",
    "USE_SPOT": "true",
    "SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/sm",
    "ARTIFACTS_BUCKET": "artifacts",
    "KMS_KEY_ARN": "arn:aws:kms:us-east-1:123456789012:key/abc",
    "TRAINING_JOBS_TABLE": "jobs",
    "MODEL_PACKAGE_GROUP": "grp",
    "JOB_NAME_PREFIX": "skinlesion",
    "HYPERPARAMETERS": json.dumps({"arch": "efficientnet_b0", "epochs": "30"}),
    "METRIC_DEFINITIONS": json.dumps([{"Name": "test:balanced_accuracy",
                                       "Regex": "test_balanced_accuracy=([0-9.]+);"}]),
    "SUBNET_IDS": "",
    "SECURITY_GROUP_IDS": "",
}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        boto3.client("dynamodb").create_table(
            TableName="jobs", BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "TrainingJobName", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "TrainingJobName", "KeyType": "HASH"}],
        )
        yield


def _launch_event(token: str = "token-1") -> dict[str, Any]:
    event = json.loads((REPO / "events" / "launch_training" / "event.json").read_text())
    event["taskToken"] = token
    return event


def test_job_names_are_valid_and_deterministic() -> None:
    long = "Manual-20261129T080000-" + "x" * 60
    name = job_name_for_execution("skinlesion", long)
    assert len(name) <= 63 and name == job_name_for_execution("skinlesion", long)
    assert name.startswith("skinlesion-") and all(c.isalnum() or c == "-" for c in name)
    assert job_name_for_execution("skinlesion", "a_b__c") == "skinlesion-a-b-c"


def test_launch_creates_a_spot_job_with_checkpoints_and_stores_the_token(aws: None, monkeypatch) -> None:
    app = load_handler("launch_training", ENV, monkeypatch)
    result = app.lambda_handler(_launch_event(), Context())
    assert result == {"trainingJobName": "skinlesion-manual-2026-11-29", "created": True}
    request = app.training_job_request(result["trainingJobName"], app.LaunchEvent.model_validate(_launch_event()), None)
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert request["CheckpointConfig"]["S3Uri"] == "s3://artifacts/checkpoints/skinlesion-manual-2026-11-29/"
    assert request["HyperParameters"] == {"arch": "efficientnet_b0", "epochs": "40", "label_set": "ham7"}
    assert request["OutputDataConfig"]["KmsKeyId"] == ENV["KMS_KEY_ARN"]
    assert request["ResourceConfig"]["VolumeKmsKeyId"] == ENV["KMS_KEY_ARN"]
    assert request["EnableNetworkIsolation"] is True
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["manifests", "images"]
    assert request["InputDataConfig"][1]["DataSource"]["S3DataSource"]["S3DataType"] == "ManifestFile"
    assert "VpcConfig" not in request
    item = boto3.resource("dynamodb").Table("jobs").get_item(Key={"TrainingJobName": result["trainingJobName"]})["Item"]
    assert item["TaskToken"] == "token-1" and item["Status"] == "WAITING"


def test_launch_with_vpc(aws: None, monkeypatch) -> None:
    app = load_handler("launch_training", {**ENV, "SUBNET_IDS": "subnet-1,subnet-2", "SECURITY_GROUP_IDS": "sg-1"},
                       monkeypatch)
    request = app.training_job_request("j", app.LaunchEvent.model_validate(_launch_event()), "s3://b/model.tar.gz")
    assert request["VpcConfig"] == {"Subnets": ["subnet-1", "subnet-2"], "SecurityGroupIds": ["sg-1"]}
    assert request["InputDataConfig"][-1]["ChannelName"] == "baseline"


def test_a_retried_launch_reuses_the_job_and_takes_the_new_token(aws: None, monkeypatch) -> None:
    app = load_handler("launch_training", ENV, monkeypatch)
    app.lambda_handler(_launch_event("token-1"), Context())
    second = app.lambda_handler(_launch_event("token-2"), Context())
    assert second["created"] is False
    assert len(boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"]) == 1
    item = boto3.resource("dynamodb").Table("jobs").get_item(Key={"TrainingJobName": second["trainingJobName"]})["Item"]
    assert item["TaskToken"] == "token-2"


def test_a_retried_launch_of_a_finished_job_answers_at_once(aws: None, monkeypatch) -> None:
    app = load_handler("launch_training", ENV, monkeypatch)
    app.lambda_handler(_launch_event("token-1"), Context())  # moto's jobs are Completed at once
    sfn = RecordingStepFunctions()
    req = app.LaunchEvent.model_validate(_launch_event("token-2"))
    app.launch(app.sagemaker, sfn, app.table, req)
    assert [c[0] for c in sfn.calls] == ["success"]
    assert sfn.calls[0][1]["taskToken"] == "token-2"


def test_invalid_launch_request_is_a_named_error(aws: None, monkeypatch) -> None:
    app = load_handler("launch_training", ENV, monkeypatch)
    with pytest.raises(Exception) as info:
        app.lambda_handler({"taskToken": "t"}, Context())
    assert type(info.value).__name__ == "InvalidRequestError"


# ------------------------------------------------------------------ callback
def _event(name: str) -> dict[str, Any]:
    return json.loads((REPO / "events" / "handle_training_event" / name).read_text())


def _store_token(job: str, token: str = "tok") -> None:
    boto3.resource("dynamodb").Table("jobs").put_item(
        Item={"TrainingJobName": job, "TaskToken": token, "Status": "WAITING"})


def test_completed_event_resumes_the_execution_once(aws: None, monkeypatch) -> None:
    app = load_handler("handle_training_event", {"TRAINING_JOBS_TABLE": "jobs"}, monkeypatch)
    event = app.TrainingStateChange.model_validate(_event("training_completed.json"))
    _store_token(event.detail.TrainingJobName)
    sfn = RecordingStepFunctions()
    assert app.handle(sfn, app.table, event) == "sent"
    assert app.handle(sfn, app.table, event) == "duplicate"
    assert [c[0] for c in sfn.calls] == ["success"]
    output = json.loads(sfn.calls[0][1]["output"])
    assert output["TrainingJobName"] == event.detail.TrainingJobName
    assert output["ModelArtifacts"]["S3ModelArtifacts"].endswith("model.tar.gz")


def test_failed_event_carries_the_failure_reason(aws: None, monkeypatch) -> None:
    app = load_handler("handle_training_event", {"TRAINING_JOBS_TABLE": "jobs"}, monkeypatch)
    event = app.TrainingStateChange.model_validate(_event("training_failed.json"))
    _store_token(event.detail.TrainingJobName)
    sfn = RecordingStepFunctions()
    app.handle(sfn, app.table, event)
    (kind, kwargs), = sfn.calls
    assert kind == "failure" and kwargs["error"] == "TrainingJobFailedError"
    assert "epochs='abc' is not an integer" in kwargs["cause"]


def test_spent_token_is_not_an_error(aws: None, monkeypatch) -> None:
    app = load_handler("handle_training_event", {"TRAINING_JOBS_TABLE": "jobs"}, monkeypatch)
    event = app.TrainingStateChange.model_validate(_event("training_completed.json"))
    _store_token(event.detail.TrainingJobName)
    assert app.handle(RecordingStepFunctions(fail_with="TaskTimedOut"), app.table, event) == "spent"
    with pytest.raises(Exception, match="ThrottlingException"):
        _store_token(event.detail.TrainingJobName)
        app.handle(RecordingStepFunctions(fail_with="ThrottlingException"), app.table, event)


def test_in_progress_event_heartbeats_and_unknown_jobs_are_ignored(aws: None, monkeypatch) -> None:
    app = load_handler("handle_training_event", {"TRAINING_JOBS_TABLE": "jobs"}, monkeypatch)
    raw = _event("training_completed.json")
    raw["detail"].update(TrainingJobStatus="InProgress", SecondaryStatus="Training")
    event = app.TrainingStateChange.model_validate(raw)
    sfn = RecordingStepFunctions()
    assert app.handle(sfn, app.table, event) == "unknown-job"
    _store_token(event.detail.TrainingJobName)
    assert app.handle(sfn, app.table, event) == "heartbeat"
    assert [c[0] for c in sfn.calls] == ["heartbeat"]


def test_handler_returns_the_outcome(aws: None, monkeypatch) -> None:
    app = load_handler("handle_training_event", {"TRAINING_JOBS_TABLE": "jobs"}, monkeypatch)
    assert app.lambda_handler(_event("training_completed.json"), Context())["outcome"] == "unknown-job"
