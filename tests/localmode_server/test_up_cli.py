"""`python -m localmode up` driven through the real AWS CLI (subprocess calls, JSON parsed from stdout)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import FAST_PARAMETERS, REPO, Up, alive, small_dataset, wait_for

pytestmark = pytest.mark.e2e
AWS = shutil.which("aws", path=str(Path(sys.executable).parent))


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    if AWS is None:
        pytest.skip("the AWS CLI (awscli in requirements/dev.txt) is not installed in this environment")
    server = Up(tmp_path / "work", "--no-sample", parameters=FAST_PARAMETERS)
    try:
        yield server.wait_ready()
    finally:
        server.kill()


def aws(server: Up, *args: str, check: bool = True) -> Any:
    """Run ``aws ARGS`` with only the exports `up` printed; stdout parsed as JSON (None when empty)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(server.env)
    env.update({"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_PAGER": ""})
    extra = ["--only-show-errors"] if args[0] == "s3" else ["--output", "json"]
    proc = subprocess.run([str(AWS), *args, *extra], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    if check:
        assert proc.returncode == 0, f"aws {' '.join(args)}: {proc.stderr}"
        return json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc


def test_operator_loop_through_the_aws_cli(up: Up, tmp_path: Path) -> None:
    env = up.env
    data = small_dataset(tmp_path / "data")
    images = sorted((data / "images").glob("*.jpg"))
    bucket = env["DATA_BUCKET_NAME"]
    machine = env["RETRAINING_STATE_MACHINE_ARN"]

    def ended(arn: str) -> dict[str, Any] | None:
        desc = aws(up, "stepfunctions", "describe-execution", "--execution-arn", arn)
        return None if desc["status"] == "RUNNING" else desc

    # Before any data: an unnamed execution gets a UUID for a name, as on AWS, and ends in not-enough-data.
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"trigger": {"type": "manual", "reason": "cli test", "requestedBy": "ops"}}))
    early = aws(up, "stepfunctions", "start-execution", "--state-machine-arn", machine, "--input", f"file://{request}")
    assert re.fullmatch(r".*:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", early["executionArn"])
    desc = wait_for(lambda: ended(early["executionArn"]), timeout=120, what="the first execution's end")
    assert desc["status"] == "SUCCEEDED", desc
    assert json.loads(desc["output"])["data"]["result"]["enough"] is False

    # aws s3 cp -> the validation function (the template's rule) records each image.
    aws(up, "s3", "cp", str(data / "HAM10000_metadata.csv"), f"s3://{bucket}/incoming/ham10000/")
    aws(up, "s3", "cp", "--recursive", str(data / "images"), f"s3://{bucket}/incoming/ham10000/")

    def record(image_id: str) -> dict[str, Any] | None:
        item = aws(up, "dynamodb", "get-item", "--table-name", env["MANIFEST_TABLE_NAME"],
                   "--key", json.dumps({"image_id": {"S": image_id}}), "--consistent-read")
        found = item.get("Item") if item else None
        # A label row alone (LABEL_ONLY) or a claim is not yet the image's outcome.
        done = found and found.get("status", {}).get("S") in ("VALIDATED", "DUPLICATE", "QUARANTINED")
        return found if done else None

    item = wait_for(lambda: record(images[-1].stem), timeout=300, what="the last image's record")
    assert item["status"]["S"] == "VALIDATED"
    assert item["source_key"]["S"] == f"incoming/ham10000/{images[-1].name}"
    first = record(images[0].stem)
    assert first is not None and first["status"]["S"] == "VALIDATED"

    # Nothing to approve yet; the endpoint does not exist yet and answers as SageMaker does.
    group = env["MODEL_PACKAGE_GROUP_NAME"]
    pending = ["sagemaker", "list-model-packages", "--model-package-group-name", group,
               "--model-approval-status", "PendingManualApproval"]
    assert aws(up, *pending)["ModelPackageSummaryList"] == []
    invoke = ["sagemaker-runtime", "invoke-endpoint", "--endpoint-name", env["ENDPOINT_NAME"], "--body",
              f"fileb://{images[0]}", "--content-type", "image/jpeg", "--inference-id", "cli-1"]
    missing = aws(up, *invoke, str(tmp_path / "none.json"), check=False)
    assert missing.returncode != 0 and "ValidationError" in missing.stderr, missing.stderr

    # aws stepfunctions start-execution -> describe-execution, get-execution-history, list-executions.
    started = aws(up, "stepfunctions", "start-execution", "--state-machine-arn", machine, "--name", "cli-test",
                  "--input", f"file://{request}")
    desc = wait_for(lambda: ended(started["executionArn"]), timeout=900, interval=3.0, what="the retraining's end")
    assert desc["status"] == "SUCCEEDED", desc
    history = aws(up, "stepfunctions", "get-execution-history", "--execution-arn", started["executionArn"])
    entered = [e["stateEnteredEventDetails"]["name"] for e in history["events"] if e["type"].endswith("StateEntered")]
    assert "TrainModel" in entered and entered[-1] == "Registered", entered
    listed = aws(up, "stepfunctions", "list-executions", "--state-machine-arn", machine)
    assert sorted(e["name"] for e in listed["executions"]) == sorted(["cli-test", early["executionArn"].split(":")[-1]])

    # list pending packages -> approve -> describe-endpoint InService.
    (package,) = aws(up, *pending)["ModelPackageSummaryList"]
    aws(up, "sagemaker", "update-model-package", "--model-package-arn", package["ModelPackageArn"],
        "--model-approval-status", "Approved")

    def in_service() -> bool:
        described = aws(up, "sagemaker", "describe-endpoint", "--endpoint-name", env["ENDPOINT_NAME"], check=False)
        if described.returncode != 0:
            return False
        status = json.loads(described.stdout)["EndpointStatus"]
        assert status != "Failed", described.stdout
        return bool(status == "InService")

    wait_for(in_service, timeout=600, interval=3.0, what="endpoint InService")

    # invoke-endpoint: the real serving process answers.
    out = tmp_path / "out.json"
    meta = aws(up, *invoke, str(out))
    assert meta["ContentType"].startswith("application/json")
    body = json.loads(out.read_text())
    prediction = body["predictions"][0] if isinstance(body, dict) and "predictions" in body else body
    assert prediction["predicted_class"] in prediction["probabilities"]

    # The same picture again, under another name: a DUPLICATE of the first.
    aws(up, "s3", "cp", str(images[0]), f"s3://{bucket}/incoming/ham10000/SECOND_COPY.jpg")
    copy = wait_for(lambda: record("SECOND_COPY"), timeout=60, what="the copy's record")
    assert copy["status"]["S"] == "DUPLICATE" and copy["duplicate_of"]["S"] == images[0].stem

    # An operation local mode does not offer: an AWS-shaped error, not a stack trace.
    unknown = aws(up, "sagemaker", "list-hub-contents", "--hub-name", "x", "--hub-content-type", "Model",
                  check=False)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "An error occurred (" in unknown.stderr, unknown.stderr

    # The hourly drift check fired on demand (python -m localmode fire) on the running server.
    fired = subprocess.run([sys.executable, "-m", "localmode", "fire", "DetectDriftFunctionHourly", "--port",
                            str(up.port)], cwd=REPO, capture_output=True, text=True, timeout=300)
    answer = json.loads(fired.stdout)
    assert answer["rule"] == "DetectDriftFunctionHourly" and "result" in answer, fired.stderr
    nope = subprocess.run([sys.executable, "-m", "localmode", "fire", "NoSuchRule", "--port", str(up.port)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert nope.returncode == 1 and nope.stderr.startswith("error: no schedule rule"), nope.stderr
    assert "DetectDriftFunctionHourly" in nope.stderr

    children = up.children()
    assert children, "the endpoint's serving process should be a child of up"
    assert up.terminate() == 0, up.stderr()
    assert alive(children) == []
