"""Local mode end to end: the real template, ASL and handlers, a real (tiny) training job, the real rules."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from localmode import LocalCloud
from localmode.cloud import REGION
from tests.localmode_server.helpers import small_dataset as sample_subset
from tools.upload_dataset import upload_dataset

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
# Small and fast: the point is the pipeline's behaviour, not the model's quality (benchmarks/ measures that).
FAST_HPS = json.dumps({"arch": "efficientnet_lite0", "pretrained": "true", "epochs": "1", "freeze_epochs": "1",
                       "image_size": "96x72", "batch_size": "32", "num_workers": "0", "threads": "1"})
BASE = {
    "MinNewImages": "50",
    "MinImagesPerClass": "10",
    "MinBalancedAccuracy": "0.0",
    "MinMelanomaSensitivity": "0.0",
    "MinMacroAuc": "0.0",
    "MaxRegression": "1.0",
    "AutoApprove": "false",
    "TrainingHyperparameters": FAST_HPS,
}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 20 images per class from the bundled sample, every split represented, with their metadata rows."""
    return sample_subset(tmp_path_factory.mktemp("data"))


def _cloud(tmp_path: Path, **overrides: str) -> LocalCloud:
    return LocalCloud(work_dir=tmp_path / "local", parameters={**BASE, **overrides})


def _upload(cloud: LocalCloud, data: Path) -> None:
    upload_dataset(boto3.client("s3", region_name=REGION), cloud.output("DataBucketName"), data / "images",
                   data / "HAM10000_metadata.csv", dataset="ham10000", progress=False)
    cloud.bus.drain()


def _request_retraining(cloud: LocalCloud) -> dict[str, Any]:
    sample = json.loads((REPO / "events" / "retraining" / "manual_request.json").read_text())
    boto3.client("events", region_name=REGION).put_events(Entries=[{
        "Source": f"{cloud.resolver.parameters['ProjectName']}.pipeline", "DetailType": sample["detail-type"],
        "Detail": json.dumps(sample["detail"])}])
    cloud.bus.drain()
    return _only_execution(cloud)


def _only_execution(cloud: LocalCloud) -> dict[str, Any]:
    sfn = boto3.client("stepfunctions", region_name=REGION)
    executions = sfn.list_executions(stateMachineArn=cloud.output("RetrainingStateMachineArn"))["executions"]
    assert len(executions) == 1
    return cloud.wait_for_execution(executions[0]["executionArn"], timeout=900)


def _states(cloud: LocalCloud, execution: dict[str, Any]) -> list[str]:
    sfn = boto3.client("stepfunctions", region_name=REGION)
    events = sfn.get_execution_history(executionArn=execution["executionArn"], maxResults=1000)["events"]
    return [e["stateEnteredEventDetails"]["name"] for e in events if e["type"].endswith("StateEntered")]


@pytest.fixture
def quiet() -> Iterator[None]:
    import logging

    level = logging.getLogger("moto").level
    logging.getLogger("moto").setLevel(logging.CRITICAL)
    yield
    logging.getLogger("moto").setLevel(level)


def test_retraining_succeeds_and_registers_a_model(tmp_path: Path, small_dataset: Path, quiet: None) -> None:
    with _cloud(tmp_path) as cloud:
        _upload(cloud, small_dataset)
        execution = _request_retraining(cloud)
        assert execution["status"] == "SUCCEEDED", execution.get("cause")
        assert _states(cloud, execution) == ["CheckData", "EnoughData?", "PrepareTraining", "TrainingJobDone?",
                                             "TrainModel", "EvaluateModel", "GateModel", "PassedGate?",
                                             "RegisterModel", "NotifySuccess", "PublishSuccess", "Registered"]
        output = json.loads(execution["output"])
        assert output["data"]["result"]["trigger"]["type"] == "manual"
        assert output["data"]["result"]["trigger"]["requestedBy"] == "dermatology-ml-team"
        sm = boto3.client("sagemaker", region_name=REGION)
        packages = sm.list_model_packages(ModelPackageGroupName=cloud.output("ModelPackageGroupName"))
        (summary,) = packages["ModelPackageSummaryList"]
        package = sm.describe_model_package(ModelPackageName=summary["ModelPackageArn"])
        assert package["ModelApprovalStatus"] == "PendingManualApproval"
        props = package["CustomerMetadataProperties"]
        assert 0.0 <= float(props["test_balanced_accuracy"]) <= 1.0
        assert 0.0 <= float(props["test_macro_auc"]) <= 1.0
        model_url = package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
        bucket, _, key = model_url.removeprefix("s3://").partition("/")
        assert boto3.client("s3", region_name=REGION).head_object(Bucket=bucket, Key=key)["ContentLength"] > 100_000
        job = sm.describe_training_job(TrainingJobName=output["training"]["TrainingJobName"])
        assert job["TrainingJobStatus"] == "Completed"
        assert {m["MetricName"] for m in job["FinalMetricDataList"]} >= {"test:balanced_accuracy", "test:macro_auc"}
        assert job["HyperParameters"]["epochs"] == "1"
        (runner,) = cloud.runners
        for name in ("model.ts", "classes.json", "preprocessing.json", "metrics.json", "reference_stats.json"):
            assert (runner.root / "model" / name).is_file(), name
        hps = json.loads((runner.root / "input" / "config" / "hyperparameters.json").read_text())
        assert all(isinstance(v, str) for v in hps.values())
        (note,) = cloud.read_notifications()
        # The reviewer's message: stack, package, both models' figures and the gate, the commands, the plots.
        assert cloud.stack_name in note["subject"] and "registered" in note["subject"]
        arn = summary["ModelPackageArn"]
        assert arn in note["message"]
        assert f"update-model-package --model-package-arn {arn} --model-approval-status Approved" in note["message"]
        assert f"--model-package-arn {arn} --model-approval-status Rejected --approval-description" in note["message"]
        assert "balanced_accuracy" in note["message"] and "gate minimum" in note["message"]
        plots = boto3.client("s3", region_name=REGION).list_objects_v2(
            Bucket=cloud.output("ArtifactsBucketName"),
            Prefix=f"evaluations/{output['training']['TrainingJobName']}/plots/").get("Contents", [])
        assert {p["Key"].rsplit("/", 1)[1] for p in plots} >= {"confusion_matrix.png", "roc.png"}
        assert all(p["Key"] in note["message"] for p in plots)
        # The state machine ran the job (createTrainingJob.sync); the Lambda only prepared the request.
        (prepared,) = [i["result"] for i in cloud.runtime.find("PrepareTrainingFunction").invocations if i.get("ok")]
        assert prepared["request"]["TrainingJobName"] == job["TrainingJobName"]
        assert output["training"]["ModelArtifacts"]["S3ModelArtifacts"] == model_url


def test_too_little_data_ends_without_training_and_notifies(tmp_path: Path, small_dataset: Path, quiet: None) -> None:
    with _cloud(tmp_path, MinNewImages="100000") as cloud:
        _upload(cloud, small_dataset)
        execution = _request_retraining(cloud)
        assert execution["status"] == "SUCCEEDED"
        assert _states(cloud, execution) == ["CheckData", "EnoughData?", "NotifyNotEnoughData", "PublishNotEnoughData",
                                             "NotEnoughData"]
        assert cloud.runners == []
        (note,) = cloud.read_notifications()
        assert "not enough data" in note["subject"]
        assert "100000 needed" in note["message"]


def test_failed_training_job_reports_its_reason(tmp_path: Path, small_dataset: Path, quiet: None) -> None:
    bad = json.dumps({**json.loads(FAST_HPS), "epochs": "abc"})
    with _cloud(tmp_path, TrainingHyperparameters=bad) as cloud:
        _upload(cloud, small_dataset)
        execution = _request_retraining(cloud)
        assert execution["status"] == "FAILED"
        assert execution["error"] == "TrainingJobFailedError"
        assert "epochs" in execution["cause"] and "abc" in execution["cause"]
        assert "ReadTrainingFailure" in _states(cloud, execution)  # the .sync failure's cause, parsed
        job_name = cloud.runners[0].name
        job = boto3.client("sagemaker", region_name=REGION).describe_training_job(TrainingJobName=job_name)
        assert job["TrainingJobStatus"] == "Failed" and "epochs" in job["FailureReason"]
        (note,) = cloud.read_notifications()
        assert "failed" in note["subject"] and "epochs" in note["message"] and "abc" in note["message"]
        assert "Step:  TrainModel" in note["message"] and f"--log-stream-name-prefix {job_name}/" in note["message"]


def test_aborting_the_retraining_stops_its_training_job(tmp_path: Path, small_dataset: Path, quiet: None) -> None:
    """With createTrainingJob.sync, StopExecution stops the job (the task-token wait left it running)."""
    slow = json.dumps({**json.loads(FAST_HPS), "epochs": "50", "freeze_epochs": "0"})
    with _cloud(tmp_path, TrainingHyperparameters=slow) as cloud:
        _upload(cloud, small_dataset)
        boto3.client("events", region_name=REGION).put_events(Entries=[{
            "Source": f"{cloud.resolver.parameters['ProjectName']}.pipeline", "DetailType": "RetrainingRequested",
            "Detail": json.dumps({"reason": "abort test", "requestedBy": "e2e"})}])
        cloud.bus.drain()
        sfn = boto3.client("stepfunctions", region_name=REGION)
        (execution,) = sfn.list_executions(stateMachineArn=cloud.output("RetrainingStateMachineArn"))["executions"]
        sm = boto3.client("sagemaker", region_name=REGION)
        deadline = time.monotonic() + 300
        while not (cloud.runners and cloud.runners[0].job.secondary_status == "Training"):
            assert time.monotonic() < deadline, "the training job never started"
            time.sleep(0.5)
        (runner,) = cloud.runners
        sfn.stop_execution(executionArn=execution["executionArn"], error="Operator", cause="abort test")
        runner.thread.join(timeout=120)
        job = sm.describe_training_job(TrainingJobName=runner.name)
        assert job["TrainingJobStatus"] == "Stopped"
        assert runner.proc is not None and runner.proc.poll() is not None
        assert sfn.describe_execution(executionArn=execution["executionArn"])["status"] == "ABORTED"


def test_model_failing_the_gate_is_not_registered(tmp_path: Path, small_dataset: Path, quiet: None) -> None:
    with _cloud(tmp_path, MinBalancedAccuracy="0.99", MinMacroAuc="0.0", MinMelanomaSensitivity="0.0") as cloud:
        _upload(cloud, small_dataset)
        execution = _request_retraining(cloud)
        assert execution["status"] == "FAILED" and execution["error"] == "ModelRejectedByGate"
        assert "balanced_accuracy" in execution["cause"]
        packages = boto3.client("sagemaker", region_name=REGION).list_model_packages(
            ModelPackageGroupName=cloud.output("ModelPackageGroupName"))["ModelPackageSummaryList"]
        assert packages == []
        (note,) = cloud.read_notifications()
        assert "rejected" in note["subject"] and "balanced_accuracy" in note["message"] and "< 0.990" in note["message"]


def test_drift_alarm_and_schedule_start_retraining_with_their_reason(tmp_path: Path, quiet: None) -> None:
    with _cloud(tmp_path, MinNewImages="100000") as cloud:
        alarm = json.loads((REPO / "events" / "retraining" / "drift_alarm.json").read_text())
        alarm["resources"] = [cloud.resolver.attrs["DriftAlarm"]["Arn"]]
        alarm["detail"]["alarmName"] = cloud.ref("DriftAlarm")
        cloud.bus.put(alarm)
        cloud.bus.drain()
        execution = _only_execution(cloud)
        trigger = json.loads(execution["input"])["trigger"]
        assert trigger["type"] == "drift-alarm" and trigger["alarm"] == cloud.ref("DriftAlarm")
        assert "Threshold Crossed" in trigger["reason"]

        cloud.bus.fire_schedule("RetrainingStateMachineMonthly", account="123456789012", region=REGION)
        sfn = boto3.client("stepfunctions", region_name=REGION)
        deadline = time.monotonic() + 60
        while len(sfn.list_executions(stateMachineArn=cloud.output("RetrainingStateMachineArn"))["executions"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        inputs = [json.loads(sfn.describe_execution(executionArn=e["executionArn"])["input"])["trigger"]["type"]
                  for e in sfn.list_executions(stateMachineArn=cloud.output("RetrainingStateMachineArn"))["executions"]]
        assert sorted(inputs) == ["drift-alarm", "schedule"]


def test_invalid_upload_is_quarantined_not_lost(tmp_path: Path, quiet: None) -> None:
    with _cloud(tmp_path) as cloud:
        s3 = boto3.client("s3", region_name=REGION)
        bucket = cloud.output("DataBucketName")
        s3.put_object(Bucket=bucket, Key="incoming/phone/mel/not_an_image.jpg", Body=b"hello, not a jpeg")
        cloud.bus.drain()
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
        assert "incoming/phone/mel/not_an_image.jpg" in keys
        reasons = [k for k in keys if k.startswith("quarantine/") and k.endswith(".reason.json")]
        assert len(reasons) == 1
        reason = json.loads(s3.get_object(Bucket=bucket, Key=reasons[0])["Body"].read())
        assert reason["source_key"] == "incoming/phone/mel/not_an_image.jpg"


def _deployments(cloud: LocalCloud, count: int) -> list[dict[str, Any]]:
    """Wait for ``count`` deployment executions to end; oldest first."""
    sfn = boto3.client("stepfunctions", region_name=REGION)
    machine = cloud.output("DeploymentStateMachineArn")
    deadline = time.monotonic() + 120
    while True:
        cloud.bus.drain()
        executions = sfn.list_executions(stateMachineArn=machine)["executions"]
        if len(executions) >= count:
            break
        assert time.monotonic() < deadline, f"{len(executions)} deployments started, {count} expected"
        time.sleep(0.5)
    ordered = sorted(executions, key=lambda e: e["startDate"])
    return [cloud.wait_for_execution(e["executionArn"], timeout=600) for e in ordered]


def _invoke(cloud: LocalCloud) -> dict[str, Any]:
    answer = boto3.client("sagemaker-runtime", region_name=REGION).invoke_endpoint(
        EndpointName=cloud.output("EndpointName"), ContentType="image/jpeg", Accept="application/json",
        Body=(REPO / "functions" / "smoke_test_endpoint" / "known_lesion.jpg").read_bytes())
    return json.loads(answer["Body"].read())


def test_approved_model_is_deployed_updated_blue_green_and_rolled_back(tmp_path: Path, small_dataset: Path,
                                                                       quiet: None) -> None:
    with _cloud(tmp_path, AutoApprove="true", DeploymentPollSeconds="1") as cloud:
        _upload(cloud, small_dataset)
        retraining = _request_retraining(cloud)
        assert retraining["status"] == "SUCCEEDED", (retraining.get("error"), retraining.get("cause"))
        (first,) = _deployments(cloud, 1)
        assert first["status"] == "SUCCEEDED", first.get("cause")
        sm = boto3.client("sagemaker", region_name=REGION)
        endpoint = sm.describe_endpoint(EndpointName=cloud.output("EndpointName"))
        assert endpoint["EndpointStatus"] == "InService" and endpoint["EndpointConfigName"].endswith("-v1")
        answer = _invoke(cloud)
        assert answer["model_version"] == "1" and answer["predictions"][0]["predicted_class"]
        aas = boto3.client("application-autoscaling", region_name=REGION)
        (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
        assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 5)

        # A second approved version: blue/green update, the endpoint moves to v2.
        group = cloud.output("ModelPackageGroupName")
        v1_arn = f"arn:aws:sagemaker:{REGION}:123456789012:model-package/{group}/1"
        spec = sm.describe_model_package(ModelPackageName=v1_arn)["InferenceSpecification"]
        sm.create_model_package(ModelPackageGroupName=group, InferenceSpecification=spec,
                                ModelApprovalStatus="Approved")
        second = _deployments(cloud, 2)[1]
        assert second["status"] == "SUCCEEDED", second.get("cause")
        assert sm.describe_endpoint(EndpointName=cloud.output("EndpointName"))["EndpointConfigName"].endswith("-v2")
        assert _invoke(cloud)["model_version"] == "2"

        # A third version whose model cannot serve: rolled back, v2 keeps serving, and it says so.
        s3 = boto3.client("s3", region_name=REGION)
        bucket = cloud.output("ArtifactsBucketName")
        broken = io.BytesIO()
        with tarfile.open(fileobj=broken, mode="w:gz") as tar:
            info = tarfile.TarInfo("classes.json")
            payload = b'{"label_set": "ham7"}'
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        s3.put_object(Bucket=bucket, Key="broken/model.tar.gz", Body=broken.getvalue())
        bad_spec = {**spec, "Containers": [{**spec["Containers"][0], "ModelDataUrl": f"s3://{bucket}/broken/model.tar.gz"}]}
        sm.create_model_package(ModelPackageGroupName=group, InferenceSpecification=bad_spec,
                                ModelApprovalStatus="Approved")
        third = _deployments(cloud, 3)[2]
        assert third["status"] == "FAILED" and third["error"] == "EndpointRolledBackError"
        assert "-v2" in third["cause"]
        assert sm.describe_endpoint(EndpointName=cloud.output("EndpointName"))["EndpointConfigName"].endswith("-v2")
        assert _invoke(cloud)["model_version"] == "2"
        subjects = [n["subject"] for n in cloud.read_notifications()]
        assert sum("Skin-lesion model deployed" in s for s in subjects) == 2
        assert sum("Skin-lesion deployment rolled back" in s for s in subjects) == 1
