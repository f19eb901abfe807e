"""Local mode runs every handler, state machine and training job under its own role (localmode/iam.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from localmode import iam
from localmode.cloud import ACCOUNT, REGION, LocalCloud


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    work = tmp_path_factory.mktemp("iam-cloud")
    with LocalCloud(work_dir=work, iam_trace_dir=work / "trace") as c:
        yield c


def _error(call: Any) -> dict[str, Any]:
    with pytest.raises(ClientError) as info:
        call()
    return info.value.response["Error"]


def test_a_call_outside_the_functions_policy_is_denied_as_aws_denies_it(cloud: LocalCloud) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    bucket = cloud.ref("DataBucket")
    s3.put_object(Bucket=bucket, Key="validated/a.jpg", Body=b"x")  # scaffolding: not checked
    role = cloud.iam.policies.principals["CheckDataFunctionRole"] if cloud.iam else None
    assert role is not None
    with iam.as_function("CheckDataFunction"):
        error = _error(lambda: s3.get_object(Bucket=bucket, Key="validated/a.jpg"))
        assert error["Code"] == "AccessDenied"
        assert error["Message"] == (
            f"User: arn:aws:sts::{ACCOUNT}:assumed-role/{role.name}/{cloud.ref('CheckDataFunction')} is not "
            f'authorized to perform: s3:GetObject on resource: "arn:aws:s3:::{bucket}/validated/a.jpg" because no '
            "identity-based policy allows the s3:GetObject action")
        ddb = boto3.client("dynamodb", region_name=REGION)
        error = _error(lambda: ddb.scan(TableName=cloud.ref("ManifestTable")))
        assert error["Code"] == "AccessDeniedException"
        assert "dynamodb:Scan on resource: arn:aws:dynamodb:" in error["Message"]
        # what the role allows goes through
        ddb.query(TableName=cloud.ref("ManifestTable"), IndexName="by-status-shard",
                  KeyConditionExpression="#s = :v", ExpressionAttributeNames={"#s": "status_shard"},
                  ExpressionAttributeValues={":v": {"S": "VALIDATED#0"}})
    # outside any principal: scaffolding again
    assert s3.get_object(Bucket=bucket, Key="validated/a.jpg")["Body"].read() == b"x"


def test_handlers_run_as_their_role(cloud: LocalCloud, tmp_path: Path) -> None:
    from localmode.lambdas import FunctionSpec

    code = tmp_path / "probe"
    code.mkdir()
    (code / "app.py").write_text(
        "import boto3, os\n"
        "s3 = boto3.client('s3')\n"
        "def lambda_handler(event, context):\n"
        "    try:\n"
        "        s3.get_object(Bucket=event['bucket'], Key='validated/a.jpg')\n"
        "        return 'read'\n"
        "    except s3.exceptions.ClientError as err:\n"
        "        return err.response['Error']['Code']\n")
    # A stand-in handler under CheckDataFunction's logical id: it acts as that function's role.
    cloud.runtime.register(FunctionSpec(logical_id="CheckDataFunction", name="iam-probe", arn="arn:probe",
                                        code_dir=code, handler="app.lambda_handler", environment={},
                                        timeout=30, memory_mb=128))
    boto3.client("s3", region_name=REGION).put_object(Bucket=cloud.ref("DataBucket"), Key="validated/a.jpg",
                                                      Body=b"x")
    ok, result = cloud.runtime.invoke("iam-probe", {"bucket": cloud.ref("DataBucket")})
    assert (ok, result) == (True, "AccessDenied")


def test_threads_and_pools_act_as_the_principal_that_started_them(cloud: LocalCloud) -> None:
    seen: list[Any] = []
    with iam.as_function("CheckDataFunction"):
        thread = threading.Thread(target=lambda: seen.append(iam.current()))
        thread.start()
        thread.join()
        with ThreadPoolExecutor(1) as pool:
            seen.append(pool.submit(iam.current).result())
    with ThreadPoolExecutor(1) as pool:
        seen.append(pool.submit(iam.current).result())
    assert [p.role if p else None for p in seen] == ["CheckDataFunctionRole", "CheckDataFunctionRole", None]


def test_the_trace_records_each_authorization(cloud: LocalCloud) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    with iam.as_function("ValidateImageFunction"):
        s3.put_object(Bucket=cloud.ref("DataBucket"), Key="quarantine/t.jpg", Body=b"x")
    assert cloud.iam is not None and cloud.iam.trace_path is not None
    rows = [json.loads(line) for line in cloud.iam.trace_path.read_text().splitlines()]
    assert rows[0]["type"] == "deployment" and rows[0]["stack_name"] == cloud.stack_name
    mine = [r for r in rows if r.get("resource", "").endswith("quarantine/t.jpg") or
            (r.get("operation") == "PutObject" and r.get("action") == "kms:GenerateDataKey")]
    assert {(r["principal"], r["action"], r["allowed"]) for r in mine} >= {
        ("ValidateImageFunctionRole", "s3:PutObject", True), ("ValidateImageFunctionRole", "kms:GenerateDataKey", True)}
