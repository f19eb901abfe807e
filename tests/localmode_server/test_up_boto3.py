"""`python -m localmode up` driven with boto3 only (endpoint_url): the operator's whole loop over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.upload_dataset import upload_dataset

from .helpers import FAST_PARAMETERS, REPO, Up, alive, small_dataset, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    server = Up(tmp_path / "work", "--no-sample", parameters=FAST_PARAMETERS)
    try:
        yield server.wait_ready()
    finally:
        server.kill()


def manifest(server: Up) -> dict[str, dict[str, str]]:
    table = server.env["MANIFEST_TABLE_NAME"]
    items = server.client("dynamodb").scan(TableName=table)["Items"]
    return {i["image_id"]["S"]: {k: next(iter(v.values())) for k, v in i.items()} for i in items}


def test_operator_loop_over_http(up: Up, tmp_path: Path) -> None:
    timings: dict[str, float] = {"ready": round(up.ready_after_s or 0, 1)}
    t0 = time.monotonic()
    assert up.ready_line == f"ready: AWS_ENDPOINT_URL={up.url}"
    assert up.get("/_localmode/health")[0] == 200
    data = small_dataset(tmp_path / "data")
    s3, sfn, sm = up.client("s3"), up.client("stepfunctions"), up.client("sagemaker")
    bucket = up.env["DATA_BUCKET_NAME"]

    # Upload: each image is validated by the real handler through the template's rule.
    upload_dataset(s3, bucket, data / "images", data / "HAM10000_metadata.csv", dataset="ham10000", progress=False)
    n_images = len(list((data / "images").glob("*.jpg")))

    def all_validated() -> dict[str, dict[str, str]] | None:
        items = manifest(up)
        return items if sum(i["status"] == "VALIDATED" for i in items.values()) == n_images else None

    items = wait_for(all_validated, timeout=300, what=f"{n_images} VALIDATED records")
    first = sorted(items)[0]
    assert items[first]["key"].startswith("validated/")
    assert s3.head_object(Bucket=bucket, Key=items[first]["key"])["ContentLength"] > 0
    timings["upload+validate"] = round(time.monotonic() - t0, 1)

    # Retraining asked for with put-events, as an operator would; it runs the real (tiny) training job.
    sample = json.loads((Path(__file__).resolve().parents[2] / "events" / "retraining" /
                         "manual_request.json").read_text())
    answer = up.client("events").put_events(Entries=[{
        "Source": sample["source"], "DetailType": sample["detail-type"], "Detail": json.dumps(sample["detail"])}])
    assert answer["FailedEntryCount"] == 0
    machine = up.env["RETRAINING_STATE_MACHINE_ARN"]
    (execution,) = wait_for(lambda: sfn.list_executions(stateMachineArn=machine)["executions"], timeout=60,
                            what="a retraining execution")
    t1 = time.monotonic()

    def ended() -> dict[str, str] | None:
        described = sfn.describe_execution(executionArn=execution["executionArn"])
        return None if described["status"] == "RUNNING" else described

    desc = wait_for(ended, timeout=900, interval=2.0, what="the retraining's end")
    assert desc["status"] == "SUCCEEDED", desc.get("cause")
    history = sfn.get_execution_history(executionArn=execution["executionArn"], maxResults=1000)["events"]
    entered = [e["stateEnteredEventDetails"]["name"] for e in history if e["type"].endswith("StateEntered")]
    assert "TrainModel" in entered and entered[-1] == "Registered", entered
    timings["retraining"] = round(time.monotonic() - t1, 1)

    # Manual approval (AutoApprove is false in up): the approval starts the deployment.
    group = up.env["MODEL_PACKAGE_GROUP_NAME"]
    (package,) = sm.list_model_packages(ModelPackageGroupName=group,
                                        ModelApprovalStatus="PendingManualApproval")["ModelPackageSummaryList"]
    assert sm.list_model_packages(ModelPackageGroupName=group, ModelApprovalStatus="Approved")[
        "ModelPackageSummaryList"] == []
    t2 = time.monotonic()
    sm.update_model_package(ModelPackageArn=package["ModelPackageArn"], ModelApprovalStatus="Approved")
    endpoint = up.env["ENDPOINT_NAME"]

    def in_service() -> dict[str, str] | None:
        try:
            described = sm.describe_endpoint(EndpointName=endpoint)
        except sm.exceptions.ClientError:
            return None
        assert described["EndpointStatus"] != "Failed", described.get("FailureReason")
        return described if described["EndpointStatus"] == "InService" else None

    wait_for(in_service, timeout=600, interval=2.0, what="endpoint InService")
    deployments = sfn.list_executions(stateMachineArn=up.env["DEPLOYMENT_STATE_MACHINE_ARN"])["executions"]
    assert len(deployments) >= 1
    timings["approve->InService"] = round(time.monotonic() - t2, 1)

    # The real serving process answers InvokeEndpoint.
    image = sorted((data / "images").glob("*.jpg"))[0]
    answer = up.client("sagemaker-runtime").invoke_endpoint(
        EndpointName=endpoint, ContentType="image/jpeg", Accept="application/json", Body=image.read_bytes(),
        InferenceId="op-test-1")
    body = json.loads(answer["Body"].read())
    prediction = body["predictions"][0] if isinstance(body, dict) and "predictions" in body else body
    assert prediction["predicted_class"] in prediction["probabilities"]
    assert abs(sum(prediction["probabilities"].values()) - 1.0) < 1e-3

    # Drift over the threshold and live balanced accuracy under it put the drift and quality alarms in ALARM (up
    # evaluates alarms every 10 s); each state-change event starts a retraining through the template's rules.
    cw = up.client("cloudwatch")
    watched = {a["MetricName"]: a for a in cw.describe_alarms()["MetricAlarms"]}
    drift, quality = watched["DriftScore"], watched["ModelBalancedAccuracy"]
    # created INSUFFICIENT_DATA; with no data yet, notBreaching evaluates OK and ignore keeps the state
    assert drift["StateValue"] in ("INSUFFICIENT_DATA", "OK") and quality["StateValue"] == "INSUFFICIENT_DATA"
    cw.put_metric_data(Namespace=drift["Namespace"], MetricData=[
        {"MetricName": "DriftScore", "Value": drift["Threshold"] + 1.0},
        {"MetricName": "ModelBalancedAccuracy", "Value": quality["Threshold"] / 2}])
    names = [drift["AlarmName"], quality["AlarmName"]]
    wait_for(lambda: all(a["StateValue"] == "ALARM" for a in cw.describe_alarms(AlarmNames=names)["MetricAlarms"]),
             timeout=60, what="the drift and quality alarms in ALARM")

    def alarm_retrainings() -> dict[str, dict[str, str]] | None:
        found = {}
        for run in sfn.list_executions(stateMachineArn=machine)["executions"]:
            described = sfn.describe_execution(executionArn=run["executionArn"])
            trigger = json.loads(described["input"])["trigger"]
            if trigger["type"] in ("drift-alarm", "quality-alarm"):
                found[trigger["type"]] = described
        return found if len(found) == 2 else None

    started = wait_for(alarm_retrainings, timeout=60, what="the retrainings started by the two alarms")
    assert drift["AlarmName"] in started["drift-alarm"]["input"]
    assert quality["AlarmName"] in started["quality-alarm"]["input"]
    for described in started.values():
        sfn.stop_execution(executionArn=described["executionArn"])

    # The operator's tools work against local mode as against AWS (through AWS_ENDPOINT_URL); the data bucket is
    # recognised by the tags CloudFormation gives it.
    tool_env = {**os.environ, **up.env}
    answers = tmp_path / "answers.csv"
    classified = subprocess.run(
        [sys.executable, "-m", "tools.classify", "--endpoint", endpoint, "--inference-id-from-filename", "--csv",
         str(answers), str(image)], cwd=REPO, env=tool_env, capture_output=True, text=True, timeout=120)
    assert classified.returncode == 0, classified.stderr
    assert image.stem in answers.read_text()
    sent = subprocess.run(
        [sys.executable, "-m", "tools.send_ground_truth", "--bucket", bucket, str(data / "HAM10000_metadata.csv")],
        cwd=REPO, env=tool_env, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert s3.head_object(Bucket=bucket, Key="ground-truth/HAM10000_metadata.csv")["ContentLength"] > 0

    # The same picture uploaded again under another name is recorded as a duplicate of the first.
    original = image.stem
    s3.put_object(Bucket=bucket, Key="incoming/ham10000/COPY_OF_IT.jpg", Body=image.read_bytes())
    copy = wait_for(lambda: (manifest(up).get("COPY_OF_IT") or {}).get("status") and manifest(up)["COPY_OF_IT"],
                    timeout=60, what="the copy's record")
    assert copy["status"] == "DUPLICATE" and copy["duplicate_of"] == original, copy

    # SIGTERM stops the serving process (and its workers) and anything else it started: no orphans.
    children = up.children()
    assert children, "the endpoint's serving process should be a child of up"
    t3 = time.monotonic()
    assert up.terminate() == 0, up.stderr()
    timings["shutdown"] = round(time.monotonic() - t3, 1)
    assert alive(children) == [], f"left running: {alive(children)}"
    print("timings (s):", json.dumps(timings))
