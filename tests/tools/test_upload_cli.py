"""``python -m tools.upload_dataset``: each operator mistake is one error line and exit status 1."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends

from tests.tools.helpers import assert_all_flags_have_help, one_error_line
from tools import upload_dataset as tool
from tools.cli import data_bucket_of_stack

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((SAMPLE / "images").glob("*.jpg"))[:5]:
        shutil.copy(path, folder)
    return folder


METADATA = SAMPLE / "HAM10000_metadata.csv"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = tool.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _tag(bucket: str, logical_id: str, stack: str = "skin-lesion") -> None:
    # aws: tags are reserved (PutBucketTagging refuses them, as on AWS); CloudFormation sets them, so set them in
    # moto's backend the way a stack would.
    s3_backends[DEFAULT_ACCOUNT_ID]["aws"].put_bucket_tagging(
        bucket, {"aws:cloudformation:logical-id": logical_id, "aws:cloudformation:stack-name": stack})


def test_every_flag_has_help() -> None:
    assert_all_flags_have_help(tool.build_parser())


@pytest.mark.parametrize(("setup", "expected"), [
    (lambda tmp, images: ["--folder", str(tmp / "nope"), "--metadata", str(METADATA)], "does not exist"),
    (lambda tmp, images: ["--folder", str(METADATA), "--metadata", str(METADATA)], "is not a folder"),
    (lambda tmp, images: ["--folder", str(tmp / "empty"), "--metadata", str(METADATA)], "no images"),
    (lambda tmp, images: ["--folder", str(images), "--metadata", str(tmp / "labels.csv")],
     "label file .*labels.csv does not exist"),
    (lambda tmp, images: ["--folder", str(images), "--metadata", str(tmp / "bad.csv")],
     "is not a label CSV of a known format"),
    (lambda tmp, images: ["--folder", str(images), "--metadata", str(tmp / "other.csv")],
     "names none of the 5 images"),
    (lambda tmp, images: ["--folder", str(images)], "no label file: pass --metadata"),
])
def test_local_mistakes_fail_before_any_aws_call(tmp_path: Path, images: Path, capsys: pytest.CaptureFixture[str],
                                                 no_credentials: None, setup: Any, expected: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    (tmp_path / "bad.csv").write_text("name,colour\na,b\n")
    (tmp_path / "other.csv").write_text("image_id,lesion_id,dx\nISIC_9999999,HAM_1,mel\n")
    code, out, err = _run(capsys, "--bucket", "b", *setup(tmp_path, images))
    assert code == 1
    assert out == ""
    assert re.search(expected, one_error_line(err)), err


def test_no_credentials_says_how_to_log_in(images: Path, capsys: pytest.CaptureFixture[str],
                                           no_credentials: None) -> None:
    code, out, err = _run(capsys, "--bucket", "some-bucket", "--folder", str(images), "--metadata", str(METADATA))
    line = one_error_line(err)
    assert code == 1
    assert "no AWS credentials found" in line
    assert "aws configure" in line and "aws sso login" in line and "AWS_PROFILE" in line
    assert "uploaded" not in out


def test_missing_bucket(aws: None, images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "--bucket", "no-such-bucket", "--folder", str(images), "--metadata", str(METADATA))
    assert code == 1
    assert "bucket no-such-bucket does not exist" in one_error_line(err)


def test_bucket_not_created_by_a_stack_is_refused(aws: None, images: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="someone-elses", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    code, out, err = _run(capsys, "--bucket", "someone-elses", "--folder", str(images), "--metadata", str(METADATA))
    assert code == 1
    assert "is not a stack's data bucket (it was not created by a CloudFormation stack)" in one_error_line(err)
    assert s3.list_objects_v2(Bucket="someone-elses")["KeyCount"] == 0
    # The operator may insist.
    code, out, err = _run(capsys, "--bucket", "someone-elses", "--folder", str(images), "--metadata", str(METADATA),
                          "--skip-bucket-check")
    assert code == 0, err
    assert out.startswith("uploaded 6, skipped 0, failed 0")


def test_the_stacks_other_bucket_is_refused(aws: None, images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    boto3.client("s3").create_bucket(Bucket="artifacts", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    _tag("artifacts", "ArtifactsBucket")
    code, _, err = _run(capsys, "--bucket", "artifacts", "--folder", str(images), "--metadata", str(METADATA))
    assert code == 1
    assert "it is the ArtifactsBucket of stack skin-lesion" in one_error_line(err)


def test_the_data_bucket_is_accepted_and_a_rerun_skips(aws: None, images: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="data", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    _tag("data", "DataBucket")
    code, out, err = _run(capsys, "--bucket", "data", "--folder", str(images), "--metadata", str(METADATA),
                          "--dataset", "ham10000")
    assert code == 0, err
    assert out.startswith("uploaded 6, skipped 0, failed 0")
    assert "labels for 5 of 5 images" in err
    code, out, _ = _run(capsys, "--bucket", "data", "--folder", str(images), "--metadata", str(METADATA),
                        "--dataset", "ham10000")
    assert (code, out.split(",")[:2]) == (0, ["uploaded 1", " skipped 5"])


def test_class_folders_are_labels(aws: None, tmp_path: Path, images: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    shutil.move(str(images), str(tmp_path / "mel"))
    (tmp_path / "upload").mkdir()
    shutil.move(str(tmp_path / "mel"), str(tmp_path / "upload" / "mel"))
    boto3.client("s3").create_bucket(Bucket="data", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    _tag("data", "DataBucket")
    code, out, err = _run(capsys, "--bucket", "data", "--folder", str(tmp_path / "upload"))
    assert code == 0, err
    assert "labels from class folders (5 of 5 images)" in err


def test_access_denied_mid_upload_stops_with_one_line(aws: None, images: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    boto3.client("s3").create_bucket(Bucket="data", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    _tag("data", "DataBucket")
    real_client = boto3.client
    calls = []

    def client(name: str, **kwargs: Any) -> Any:
        s3 = real_client(name, **kwargs)
        if name == "s3":
            def denied(*args: Any, **kw: Any) -> None:
                calls.append(args)
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject")
            s3.upload_file = denied
        return s3

    monkeypatch.setattr(tool.boto3, "client", client)
    code, out, err = _run(capsys, "--bucket", "data", "--folder", str(images), "--metadata", str(METADATA))
    assert code == 1
    assert "access denied on PutObject" in one_error_line(err)
    assert "uploaded" not in out
    assert len(calls) == 1  # the metadata: nothing after it was tried


def _stubbed_cfn(outputs: list[dict[str, str]] | None, error: str | None = None) -> Any:
    cfn = boto3.client("cloudformation", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x")
    stub = Stubber(cfn)
    if error:
        stub.add_client_error("describe_stacks", "ValidationError", error, 400)
    else:
        stub.add_response("describe_stacks", {"Stacks": [{
            "StackName": "skin-lesion", "CreationTime": "2024-01-01T00:00:00Z", "StackStatus": "CREATE_COMPLETE",
            "Outputs": outputs or []}]}, {"StackName": "skin-lesion"})
    stub.activate()
    return cfn


def test_stack_resolves_the_bucket(aws: None, images: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    boto3.client("s3").create_bucket(Bucket="skin-lesion-databucket-abc",
                                     CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    real_client = boto3.client
    cfn = _stubbed_cfn([{"OutputKey": "DataBucketName", "OutputValue": "skin-lesion-databucket-abc"}])
    monkeypatch.setattr(tool.boto3, "client", lambda name, **kw: cfn if name == "cloudformation"
                        else real_client(name, **kw))
    code, out, err = _run(capsys, "--stack", "skin-lesion", "--folder", str(images), "--metadata", str(METADATA))
    assert code == 0, err
    assert "s3://skin-lesion-databucket-abc/incoming/upload/" in err


def test_missing_stack_and_foreign_stack(capsys: pytest.CaptureFixture[str]) -> None:
    from tools.cli import ToolError
    cfn = _stubbed_cfn(None, error="Stack with id nope does not exist")
    with pytest.raises(ToolError, match="stack nope does not exist in region eu-west-1"):
        data_bucket_of_stack(cfn, "nope")
    cfn = _stubbed_cfn([{"OutputKey": "Other", "OutputValue": "x"}])
    with pytest.raises(ToolError, match="has no DataBucketName output"):
        data_bucket_of_stack(cfn, "skin-lesion")


def test_bucket_and_stack_are_exclusive(capsys: pytest.CaptureFixture[str], images: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--bucket", "b", "--stack", "s", "--folder", str(images)])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
