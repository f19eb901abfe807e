"""``python -m tools.send_ground_truth``: the file evaluate_quality reads, where it goes, and each error as one line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends

from tests.tools.helpers import assert_all_flags_have_help, one_error_line
from tests.unit.handlers import load_handler
from tools import send_ground_truth as tool

REPO = Path(__file__).resolve().parents[2]
BUCKET = "skin-lesion-databucket-1"
# A tools.classify --csv output with a diagnosis column added: the intended way to send labels.
CLASSIFIED = ("file,inference_id,inference_time,predicted_class,confidence,diagnosis\r\n"
              "a/ISIC_1.jpg,ISIC_1,2026-11-29T09:20:00+00:00,nv,0.8,NV\r\n"
              "a/ISIC_2.jpg,ISIC_2,2026-11-29T09:21:00+00:00,mel,0.6,mel\r\n"
              "a/ISIC_3.jpg,ISIC_3,2026-11-29T09:22:00+00:00,nv,0.7,melanoma?\r\n")
QUALITY_ENV = {
    "DATA_BUCKET": BUCKET, "CAPTURE_S3_URI": "s3://artifacts/capture/", "RECORDS_S3_URI": "",
    "RESULTS_S3_URI": "s3://artifacts/monitoring/quality/", "LABEL_SET": "ham7",
    "METRIC_NAMESPACE": "SkinLesion/Monitoring", "LOOKBACK_HOURS": "48", "QUALITY_WINDOW_DAYS": "30",
    "MIN_QUALITY_SAMPLES": "20", "MIN_MELANOMA_CASES": "5",
}


class Session:
    """A boto3 Session stand-in: the given (stubbed) clients, else real ones (under moto)."""

    region_name = "eu-west-1"

    def __init__(self, **clients: Any) -> None:
        self.clients = clients

    def client(self, name: str, **kwargs: Any) -> Any:
        return self.clients.get(name) or boto3.client(name, region_name=self.region_name)


def _run(capsys: pytest.CaptureFixture[str], *argv: str, session: Any = None) -> tuple[int, str, str]:
    code = tool.main(list(argv), session=session)
    out, err = capsys.readouterr()
    return code, out, err


def _data_bucket(name: str = BUCKET, logical_id: str | None = "DataBucket") -> None:
    boto3.client("s3", region_name="eu-west-1").create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    if logical_id:  # aws: tags are CloudFormation's to set: set them in moto's backend as a stack would
        s3_backends[DEFAULT_ACCOUNT_ID]["aws"].put_bucket_tagging(
            name, {"aws:cloudformation:logical-id": logical_id, "aws:cloudformation:stack-name": "skin-lesion"})


def _keys(bucket: str = BUCKET) -> list[str]:
    return [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    path = tmp_path / "confirmed-june.csv"
    path.write_bytes(CLASSIFIED.encode())
    return path


def test_every_flag_has_help() -> None:
    assert_all_flags_have_help(tool.build_parser())


def test_size_limit_is_evaluate_qualitys(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    app = load_handler("evaluate_quality", QUALITY_ENV, monkeypatch)
    assert tool.MAX_BYTES == app.MAX_GROUND_TRUTH_BYTES


@pytest.mark.parametrize(("setup", "expected"), [
    (lambda tmp: [str(tmp / "nope.csv")], r"label file .*nope\.csv does not exist"),
    (lambda tmp: [str(tmp)], r"is not a file"),
    (lambda tmp: [str(tmp / "latin1.csv")], r"latin1\.csv is not UTF-8 text"),
    (lambda tmp: [str(tmp / "empty.csv")], r"empty\.csv is not a ground-truth CSV: empty file: expected a header row"),
    (lambda tmp: [str(tmp / "columns.csv")],
     r"columns\.csv is not a ground-truth CSV: columns \['file', 'class'\]: need one of inference_id, .* and one of "
     r"diagnosis, label, dx"),
    (lambda tmp: [str(tmp / "ok.csv"), "--key-name", "../escape.csv"], r"key name '\.\./escape\.csv': use a name"),
    (lambda tmp: [str(tmp / "ok.csv"), "--key-name", "june.txt"], r"key name 'june\.txt': use a name ending in \.csv"),
    (lambda tmp: [str(tmp / "big.csv")], r"big\.csv is \d+ bytes; the quality evaluation reads at most 100: split it"),
])
def test_local_mistakes_fail_before_any_aws_call(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, no_credentials: None, setup: Any,
                                                 expected: str) -> None:
    (tmp_path / "latin1.csv").write_bytes("image_id,dx\nISIC_1,n\xe6vus\n".encode("latin-1"))
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "columns.csv").write_text("file,class\na.jpg,nv\n")
    (tmp_path / "ok.csv").write_text("image_id,dx\nISIC_1,nv\n")
    (tmp_path / "big.csv").write_text("image_id,dx\n" + "ISIC_1,nv\n" * 20)
    monkeypatch.setattr(tool, "MAX_BYTES", 100)
    code, out, err = _run(capsys, "--bucket", BUCKET, *setup(tmp_path))
    assert code == 1 and out == ""
    assert re.search(expected, one_error_line(err)), err


def test_no_credentials_says_how_to_log_in(labels: Path, capsys: pytest.CaptureFixture[str],
                                           no_credentials: None) -> None:
    code, out, err = _run(capsys, "--bucket", BUCKET, str(labels))
    line = one_error_line(err)
    assert code == 1 and out == ""
    assert "no AWS credentials found" in line and "aws configure" in line


@pytest.mark.parametrize(("logical_id", "bucket", "expected"), [
    (None, "not-there", "bucket not-there does not exist: pass the stack's DataBucketName output, or --stack NAME"),
    ("ArtifactsBucket", BUCKET, f"bucket {BUCKET} is not a stack's data bucket (it is the ArtifactsBucket of stack "
                                "skin-lesion)"),
])
def test_a_bucket_that_is_not_the_data_bucket_is_refused(aws: None, labels: Path, capsys: pytest.CaptureFixture[str],
                                                         logical_id: str | None, bucket: str, expected: str) -> None:
    _data_bucket(logical_id=logical_id)
    code, out, err = _run(capsys, "--bucket", bucket, str(labels))
    assert code == 1 and out == ""
    assert expected in one_error_line(err)
    assert _keys() == []


def test_nothing_usable_is_refused_with_the_rows(aws: None, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _data_bucket()
    path = tmp_path / "typos.csv"
    path.write_text("inference_id,diagnosis\nISIC_1,melanoma\n,nv\n")
    code, out, err = _run(capsys, "--bucket", BUCKET, str(path))
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert "typos.csv has no usable row (2 rows; each needs an id and a class of label set ham7: akiec, bcc" in line
    assert "line 2: id 'ISIC_1', label 'melanoma'; line 3: id '', label 'nv'" in line
    assert _keys() == []


def test_sends_what_evaluate_quality_reads(aws: None, labels: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _data_bucket()
    code, out, err = _run(capsys, "--bucket", BUCKET, str(labels))
    assert code == 0, err
    assert out.splitlines() == [
        f"{labels}: 2 usable, 1 rejected of 3 rows (label set ham7)",
        "  rejected line 4: id 'ISIC_3', label 'melanoma?'",
        f"sent to s3://{BUCKET}/ground-truth/confirmed-june.csv; the quality evaluation runs on it now",
    ]
    assert _keys() == ["ground-truth/confirmed-june.csv"]
    s3 = boto3.client("s3")
    assert s3.get_object(Bucket=BUCKET, Key="ground-truth/confirmed-june.csv")["Body"].read() == labels.read_bytes()
    # The Lambda's own reader takes it: ids, labels and the inference times that narrow its search.
    app = load_handler("evaluate_quality", QUALITY_ENV, monkeypatch)
    gt = app.read_ground_truth(s3, BUCKET, "ground-truth/confirmed-june.csv")
    assert gt.labels == {"ISIC_1": "nv", "ISIC_2": "mel"} and gt.rejected == 1 and len(gt.times) == 2

    code, out, _ = _run(capsys, "--bucket", BUCKET, str(labels), "--key-name", "2026/june.csv")
    assert code == 0 and _keys() == ["ground-truth/2026/june.csv", "ground-truth/confirmed-june.csv"]
    code, out, _ = _run(capsys, "--bucket", BUCKET, str(labels))
    assert code == 0 and "(replacing the earlier file of that name)" in out


def test_ham10000_metadata_is_ground_truth(aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    _data_bucket()
    metadata = REPO / "data" / "sample" / "HAM10000_metadata.csv"
    rows = len(metadata.read_text().splitlines()) - 1
    code, out, err = _run(capsys, "--bucket", BUCKET, str(metadata), "--dry-run")
    assert code == 0, err
    assert out.splitlines()[0] == f"{metadata}: {rows} usable, 0 rejected of {rows} rows (label set ham7)"
    assert "dry run: would send to" in out and _keys() == []


def _stack(cfn: Any, label_set: str, times: int = 2) -> Stubber:
    stub = Stubber(cfn)
    for _ in range(times):
        stub.add_response("describe_stacks", {"Stacks": [{
            "StackName": "skin-lesion", "CreationTime": "2026-01-01T00:00:00Z", "StackStatus": "UPDATE_COMPLETE",
            "Parameters": [{"ParameterKey": "LabelSet", "ParameterValue": label_set}],
            "Outputs": [{"OutputKey": "DataBucketName", "OutputValue": BUCKET}]}]}, {"StackName": "skin-lesion"})
    return stub


def test_stack_gives_the_bucket_and_the_label_set(aws: None, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _data_bucket(logical_id=None)  # found through the stack: no tag check
    path = tmp_path / "isic.csv"
    path.write_text("image_id,label\nISIC_1,SCC\nISIC_2,akiec\n")  # scc is isic8's, akiec ham7's
    cfn = boto3.client("cloudformation", region_name="eu-west-1")
    with _stack(cfn, "isic8") as stub:
        code, out, err = _run(capsys, "--stack", "skin-lesion", str(path), session=Session(cloudformation=cfn))
        stub.assert_no_pending_responses()
    assert code == 0, err
    assert out.startswith(f"{path}: 1 usable, 1 rejected of 2 rows (label set isic8)")
    assert _keys() == ["ground-truth/isic.csv"]

    with _stack(cfn, "isic8") as stub:
        code, out, err = _run(capsys, "--stack", "skin-lesion", "--label-set", "ham7", str(path),
                              session=Session(cloudformation=cfn))
    assert code == 1 and out == ""
    assert one_error_line(err) == ("error: --label-set ham7, but stack skin-lesion is deployed with LabelSet isic8: "
                                   "leave --label-set out")
