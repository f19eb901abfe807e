"""``python -m tools.classify``: what each image sends, what is printed and written, and every error as one line."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from tests.tools.helpers import assert_all_flags_have_help, one_error_line
from tools import classify as tool

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "images"
FIRST, SECOND = sorted(SAMPLE.glob("*.jpg"))[:2]
REGION = "eu-west-1"
NOT_FOUND = "Endpoint {} of account 123456789012 not found."


class Session:
    """A boto3 Session stand-in that hands out the given (stubbed) clients."""

    region_name = REGION

    def __init__(self, **clients: Any) -> None:
        self.clients = clients
        self.asked: list[str] = []

    def client(self, name: str, **kwargs: Any) -> Any:
        self.asked.append(name)
        return self.clients[name.replace("-", "_")]


def _client(name: str) -> Any:
    return boto3.client(name, region_name=REGION, aws_access_key_id="k", aws_secret_access_key="s")


def _answer(predicted: str = "nv", mel: float = 0.09, at_risk: bool = False, ood: bool = False) -> dict[str, Any]:
    """An answer in the inference image's format (inference_image/README.md, "Answer")."""
    return {"model_version": "7", "label_set": "ham7", "predictions": [{
        "predicted_class": predicted, "confidence": 0.8123,
        "probabilities": {"mel": mel, predicted: 0.8123},
        "melanoma": {"probability": mel, "threshold": 0.171, "at_risk": at_risk},
        "ood": {"score": 1.4 if ood else 0.3, "flag": ood, "reasons": ["embedding_distance"] if ood else []},
    }], "timing_ms": {"total": 7.2}}


def _ok(stub: Stubber, path: Path, answer: dict[str, Any], inference_id: str | None = None,
        content_type: str = "image/jpeg", endpoint: str = "skin-lesion-classifier") -> None:
    body = json.dumps(answer).encode()
    expected: dict[str, Any] = {"EndpointName": endpoint, "Body": path.read_bytes(), "ContentType": content_type,
                                "Accept": "application/json"}
    if inference_id is not None:
        expected["InferenceId"] = inference_id
    stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(body), len(body)),
                                          "ContentType": "application/json"}, expected)


def _run(capsys: pytest.CaptureFixture[str], *argv: str, session: Any = None) -> tuple[int, str, str]:
    code = tool.main(list(argv), session=session)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def runtime() -> Any:
    client = _client("sagemaker-runtime")
    with Stubber(client) as stub:
        client.stub = stub  # type: ignore[attr-defined]
        yield client
        stub.assert_no_pending_responses()


def test_every_flag_has_help() -> None:
    assert_all_flags_have_help(tool.build_parser())


def test_inference_id_limit_is_botocores() -> None:
    model = botocore.session.get_session().get_service_model("sagemaker-runtime")
    shape = model.shape_for("InferenceId")
    assert tool.INFERENCE_ID_MAX == shape.metadata["max"] == 64
    assert shape.metadata["min"] == 1


@pytest.mark.parametrize(("setup", "expected"), [
    (lambda tmp: [str(tmp / "nope.jpg")], r"nope\.jpg does not exist"),
    (lambda tmp: [str(tmp / "empty")], r"no images \(.*\) under .*empty"),
    (lambda tmp: ["--inference-id-from-filename", str(tmp / "long")],
     r"1 file name\(s\) cannot be an InferenceId \(1 to 64 .*\): x{65}\.jpg; rename them"),
    (lambda tmp: ["--inference-id-from-filename", str(tmp / "same")],
     r"same/a/ISIC_1\.jpg and .*same/b/ISIC_1\.png would both send InferenceId ISIC_1"),
    (lambda tmp: ["--csv", str(tmp / "no-such-folder" / "out.csv"), str(FIRST)],
     r"cannot write --csv .*: folder .*no-such-folder does not exist"),
])
def test_local_mistakes_fail_before_any_aws_call(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 no_credentials: None, setup: Any, expected: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    (tmp_path / "long").mkdir()
    shutil.copy(FIRST, tmp_path / "long" / ("x" * 65 + ".jpg"))
    shutil.copy(FIRST, tmp_path / "long" / ("y" * 64 + ".jpg"))  # 64 is allowed: only one name is refused
    for sub, suffix in (("a", ".jpg"), ("b", ".png")):
        (tmp_path / "same" / sub).mkdir(parents=True)
        shutil.copy(FIRST, tmp_path / "same" / sub / f"ISIC_1{suffix}")
    code, out, err = _run(capsys, "--endpoint", "e", *setup(tmp_path))
    assert code == 1
    assert out == ""
    assert re.search(expected, one_error_line(err)), err


def test_no_credentials_says_how_to_log_in(capsys: pytest.CaptureFixture[str], no_credentials: None) -> None:
    code, out, err = _run(capsys, "--endpoint", "skin-lesion-classifier", str(FIRST))
    line = one_error_line(err)
    assert code == 1 and out == ""
    assert "no AWS credentials found" in line and "aws configure" in line and "aws sso login" in line


def test_unknown_endpoint_stops_at_the_first_image(runtime: Any, capsys: pytest.CaptureFixture[str]) -> None:
    runtime.stub.add_client_error("invoke_endpoint", service_error_code="ValidationError",
                                  service_message=NOT_FOUND.format("nope"), http_status_code=400)
    code, out, err = _run(capsys, "--endpoint", "nope", str(FIRST), str(SECOND),
                          session=Session(sagemaker_runtime=runtime))
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert line.startswith(f"error: endpoint nope not found in region {REGION}: check the name (`aws sagemaker "
                           "list-endpoints`)"), line


def test_model_error_is_reported_and_the_other_images_go_on(runtime: Any, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    refusal = {"error": "corrupt_image", "status": 400, "message": "the image data is damaged"}
    runtime.stub.add_client_error(
        "invoke_endpoint", service_error_code="ModelError", http_status_code=424,
        service_message='Received client error (400) from primary with message "..."',
        modeled_fields={"OriginalStatusCode": 400, "OriginalMessage": json.dumps(refusal),
                        "LogStreamArn": "arn:aws:logs:eu-west-1:123456789012:log-group:/aws/sagemaker/Endpoints/e"})
    _ok(runtime.stub, SECOND, _answer("mel", 0.6, at_risk=True), endpoint="e")
    out_csv = tmp_path / "answers.csv"
    code, out, err = _run(capsys, "--endpoint", "e", "--csv", str(out_csv), str(FIRST), str(SECOND),
                          session=Session(sagemaker_runtime=runtime))
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(str(FIRST)) and "FAILED: the model answered 400: corrupt_image: the image data is "\
        "damaged" in lines[0] and "log-group" not in lines[0]  # a 4xx is the image's fault: no log pointer
    assert lines[1].startswith(str(SECOND)) and " mel " in lines[1] and "MELANOMA RISK" in lines[1]
    assert one_error_line(err) == "error: 1 of 2 image(s) failed (see FAILED above)"
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["file"] for r in rows] == [str(FIRST), str(SECOND)]
    assert "corrupt_image" in rows[0]["error"] and rows[0]["predicted_class"] == ""
    assert rows[1]["error"] == "" and rows[1]["melanoma_at_risk"] == "true" and rows[1]["melanoma_probability"] == "0.6"


def test_a_server_error_points_at_the_container_log(runtime: Any, capsys: pytest.CaptureFixture[str]) -> None:
    runtime.stub.add_client_error(
        "invoke_endpoint", service_error_code="ModelError", http_status_code=424, service_message="Received server "
        "error (500)", modeled_fields={"OriginalStatusCode": 500, "OriginalMessage": "Internal Server Error",
                                       "LogStreamArn": "arn:aws:logs:x:1:log-group:/aws/sagemaker/Endpoints/e"})
    code, out, err = _run(capsys, "--endpoint", "e", str(FIRST), session=Session(sagemaker_runtime=runtime))
    assert code == 1
    assert "FAILED: the model answered 500: Internal Server Error (container log: arn:aws:logs:x:1:log-group:" in out


def test_unreadable_answers_and_oversized_files_do_not_stop_the_others(runtime: Any, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (tool.MAX_BODY_BYTES + 1))  # never sent: the stub has no response for it
    runtime.stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(b"<html>"), 6)})
    _ok(runtime.stub, SECOND, _answer(), endpoint="e")
    code, out, err = _run(capsys, "--endpoint", "e", str(big), str(FIRST), str(SECOND),
                          session=Session(sagemaker_runtime=runtime))
    assert code == 1
    lines = out.splitlines()
    assert "FAILED: 6291457 bytes; an endpoint takes at most 6291456 bytes" in lines[0]
    assert "FAILED: unexpected answer from the endpoint" in lines[1]
    assert " nv " in lines[2] and "FAILED" not in lines[2]
    assert one_error_line(err) == "error: 2 of 3 image(s) failed (see FAILED above)"


def test_stack_ids_and_csv(runtime: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--stack finds the endpoint; each file is sent as itself with its name as InferenceId; the CSV has it all."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(FIRST, folder)
    png = folder / "lesion-2.png"
    shutil.copy(SECOND, png)  # the content type follows the name; the container reads the bytes
    (folder / "notes.txt").write_text("not sent")
    cfn = _client("cloudformation")
    with Stubber(cfn) as cfn_stub:
        cfn_stub.add_response("describe_stacks", {"Stacks": [{
            "StackName": "skin-lesion", "CreationTime": "2026-01-01T00:00:00Z", "StackStatus": "CREATE_COMPLETE",
            "Outputs": [{"OutputKey": "EndpointName", "OutputValue": "skin-lesion-classifier"}]}]},
            {"StackName": "skin-lesion"})
        _ok(runtime.stub, FIRST, _answer(), inference_id=FIRST.stem)
        _ok(runtime.stub, png, _answer("bcc", 0.2, at_risk=True, ood=True), inference_id="lesion-2",
            content_type="image/png")
        out_csv = tmp_path / "answers.csv"
        session = Session(sagemaker_runtime=runtime, cloudformation=cfn)
        code, out, err = _run(capsys, "--stack", "skin-lesion", "--inference-id-from-filename", "--csv",
                              str(out_csv), str(folder), str(folder / FIRST.name),  # named twice, sent once
                              session=session)
    assert code == 0, err
    assert "Traceback" not in err and "error:" not in err
    lines = out.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(rf"{re.escape(str(folder / FIRST.name))} +nv +confidence 0\.812  melanoma 0\.090 "
                        r"\(threshold 0\.171\)", lines[0]), lines[0]
    assert lines[1].endswith("bcc    confidence 0.812  melanoma 0.200 (threshold 0.171)  MELANOMA RISK  OUT OF "
                             "DISTRIBUTION (embedding_distance)"), lines[1]
    rows = list(csv.DictReader(out_csv.open()))
    assert tuple(rows[0]) == tool.CSV_COLUMNS
    assert [(r["inference_id"], r["predicted_class"], r["ood_flag"], r["model_version"]) for r in rows] == [
        (FIRST.stem, "nv", "false", "7"), ("lesion-2", "bcc", "true", "7")]
    assert rows[1]["ood_reasons"] == "embedding_distance" and rows[0]["inference_time"].endswith("+00:00")


def test_stack_without_endpoint_output(capsys: pytest.CaptureFixture[str]) -> None:
    cfn = _client("cloudformation")
    with Stubber(cfn) as stub:
        stub.add_response("describe_stacks", {"Stacks": [{
            "StackName": "other", "CreationTime": "2026-01-01T00:00:00Z", "StackStatus": "CREATE_COMPLETE",
            "Outputs": [{"OutputKey": "BucketName", "OutputValue": "b"}]}]})
        code, out, err = _run(capsys, "--stack", "other", str(FIRST), session=Session(cloudformation=cfn))
    assert code == 1 and out == ""
    assert "stack other has no EndpointName output" in one_error_line(err)


def test_missing_stack(capsys: pytest.CaptureFixture[str]) -> None:
    cfn = _client("cloudformation")
    with Stubber(cfn) as stub:  # AWS's answer for a stack that does not exist
        stub.add_client_error("describe_stacks", service_error_code="ValidationError", http_status_code=400,
                              service_message="Stack with id nope does not exist")
        code, out, err = _run(capsys, "--stack", "nope", str(FIRST), session=Session(cloudformation=cfn))
    assert code == 1 and out == ""
    assert "stack nope does not exist in region eu-west-1" in one_error_line(err)
