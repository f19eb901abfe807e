"""smoke_test_endpoint: the answer's shape and the latency bound."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from botocore.response import StreamingBody

from tests.unit.handlers import REPO, load_handler

GOOD = {"model_version": "3", "predictions": [{
    "predicted_class": "mel", "confidence": 0.7,
    "probabilities": {"akiec": 0.05, "bcc": 0.05, "bkl": 0.05, "df": 0.05, "mel": 0.7, "nv": 0.05, "vasc": 0.05},
    "melanoma": {"probability": 0.7, "threshold": 0.3, "at_risk": True}}]}


class FakeRuntime:
    def __init__(self, answer: Any):
        self.answer = answer
        self.calls: list[dict[str, Any]] = []

    def invoke_endpoint(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        raw = json.dumps(self.answer).encode()
        return {"Body": StreamingBody(io.BytesIO(raw), len(raw)), "ContentType": "application/json"}


def test_a_good_answer_passes(monkeypatch) -> None:
    app = load_handler("smoke_test_endpoint", {"SMOKE_TEST_MAX_LATENCY_MS": "5000"}, monkeypatch)
    runtime = FakeRuntime(GOOD)
    out = app.smoke_test(runtime, app.SmokeRequest.model_validate({"endpointName": "e"}))
    assert out["passed"] and out["predictedClass"] == "mel"
    assert runtime.calls[0]["ContentType"] == "image/jpeg" and runtime.calls[0]["Body"][:2] == b"\xff\xd8"


@pytest.mark.parametrize("broken", [
    {"predictions": [{**GOOD["predictions"][0], "probabilities": {"mel": 0.9, "nv": 0.9}}]},
    {"predictions": [{**GOOD["predictions"][0], "predicted_class": "cat"}]},
    {"predictions": [{k: v for k, v in GOOD["predictions"][0].items() if k != "melanoma"}]},
    "not json at all",
])
def test_a_malformed_answer_fails_naming_the_problem(monkeypatch, broken: Any) -> None:
    app = load_handler("smoke_test_endpoint", {"SMOKE_TEST_MAX_LATENCY_MS": "5000"}, monkeypatch)
    with pytest.raises(Exception) as info:
        app.smoke_test(FakeRuntime(broken), app.SmokeRequest.model_validate({"endpointName": "e"}))
    assert type(info.value).__name__ == "SmokeTestFailedError"


def test_a_slow_answer_fails(monkeypatch) -> None:
    app = load_handler("smoke_test_endpoint", {"SMOKE_TEST_MAX_LATENCY_MS": "0"}, monkeypatch)
    with pytest.raises(Exception, match="latency"):
        app.smoke_test(FakeRuntime(GOOD), app.SmokeRequest.model_validate({"endpointName": "e"}))


# ------------------------------------------------------------------ every failure rolls back (defect 7)
# What InvokeEndpoint raises, with the codes and HTTP statuses of botocore's sagemaker-runtime model.
RUNTIME_ERRORS = [
    ("ModelError", 424, 'Received server error (500) from primary with message "boom". See the log for more.',
     {"OriginalStatusCode": 500, "OriginalMessage": "boom",
      "LogStreamArn": "arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/e"}),
    ("ModelError", 424, 'Received client error (400) from primary with message "bad image".',
     {"OriginalStatusCode": 400, "OriginalMessage": "bad image"}),
    ("ModelNotReadyException", 429, "Model is not ready yet", {}),
    ("InternalFailure", 500, "An internal failure occurred.", {}),
    ("ServiceUnavailable", 503, "The service is unavailable.", {}),
    ("ValidationError", 400, "Endpoint e of account 123456789012 not found.", {}),
]


@pytest.mark.parametrize(("code", "status", "message", "fields"), RUNTIME_ERRORS, ids=[e[0] + str(e[3].get(
    "OriginalStatusCode", "")) for e in RUNTIME_ERRORS])
def test_an_invoke_error_is_a_smoke_test_failure(monkeypatch, code: str, status: int, message: str,
                                                 fields: dict[str, Any]) -> None:
    import boto3
    from botocore.stub import Stubber

    app = load_handler("smoke_test_endpoint", {"SMOKE_TEST_MAX_LATENCY_MS": "5000"}, monkeypatch)
    client = boto3.client("sagemaker-runtime", region_name="us-east-1")
    with Stubber(client) as stub:
        stub.add_client_error("invoke_endpoint", service_error_code=code, service_message=message,
                              http_status_code=status, modeled_fields=fields)
        with pytest.raises(Exception) as info:
            app.smoke_test(client, app.SmokeRequest.model_validate({"endpointName": "e"}))
    assert type(info.value).__name__ == "SmokeTestFailedError"
    assert code in str(info.value)
    if "OriginalStatusCode" in fields:
        assert f"the model answered {fields['OriginalStatusCode']}" in str(info.value)


class RaisingRuntime:
    def __init__(self, error: Exception):
        self.error = error

    def invoke_endpoint(self, **kwargs: Any) -> dict[str, Any]:
        raise self.error


@pytest.mark.parametrize("error", [
    "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError",
])
def test_a_timeout_or_connection_failure_is_a_smoke_test_failure(monkeypatch, error: str) -> None:
    from botocore import exceptions

    app = load_handler("smoke_test_endpoint", {"SMOKE_TEST_MAX_LATENCY_MS": "5000"}, monkeypatch)
    raised = getattr(exceptions, error)(endpoint_url="https://runtime.sagemaker.us-east-1.amazonaws.com/endpoints/e")
    with pytest.raises(Exception) as info:
        app.smoke_test(RaisingRuntime(raised), app.SmokeRequest.model_validate({"endpointName": "e"}))
    assert type(info.value).__name__ == "SmokeTestFailedError" and error in str(info.value)


@pytest.mark.parametrize("odd", [
    {"predictions": [{**GOOD["predictions"][0], "probabilities": {"mel": "high", "nv": 0.1}}]},
    {"predictions": {"not": "a list"}},
    {"predictions": [None]},
    [1, 2, 3],
    None,
])
def test_an_answer_of_the_wrong_shape_is_a_smoke_test_failure(monkeypatch, odd: Any) -> None:
    app = load_handler("smoke_test_endpoint", {"SMOKE_TEST_MAX_LATENCY_MS": "5000"}, monkeypatch)
    with pytest.raises(Exception) as info:
        app.smoke_test(FakeRuntime(odd), app.SmokeRequest.model_validate({"endpointName": "e"}))
    assert type(info.value).__name__ == "SmokeTestFailedError"


def test_the_client_gives_up_before_the_function_times_out(monkeypatch) -> None:
    """A hanging endpoint must fail the test (and roll back), not time the Lambda out (which does not roll back)."""
    from localmode.template import load_template

    app = load_handler("smoke_test_endpoint", {"SMOKE_TEST_MAX_LATENCY_MS": "5000"}, monkeypatch)
    config = app.runtime.meta.config
    attempts = config.retries["total_max_attempts"]
    timeout = load_template(REPO / "template.yaml")["Resources"]["SmokeTestEndpointFunction"]["Properties"]["Timeout"]
    assert attempts * (config.connect_timeout + config.read_timeout) < timeout


@pytest.mark.parametrize(("failure", "code"), [("timeout", "ModelError"), ("500", "ModelError"),
                                               ("unknown", "ValidationError")])
def test_local_endpoint_failures_roll_back(monkeypatch, tmp_path, failure: str, code: str) -> None:
    """Local mode answers InvokeEndpoint's failures as SageMaker does, and each one fails the smoke test."""
    import boto3
    from moto import mock_aws

    from localmode.endpoints import EndpointError, LocalEndpoints

    def invoke(self: Any, name: str, *args: Any, **kwargs: Any) -> tuple[int, str, bytes]:
        if failure == "timeout":
            raise TimeoutError("timed out")
        if failure == "unknown":
            raise EndpointError(f'Could not find endpoint "{name}".')
        return 500, "application/json", b'{"error": "model crashed"}'

    monkeypatch.setattr(LocalEndpoints, "invoke", invoke)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws(), LocalEndpoints(tmp_path) as endpoints:
        endpoints.install()
        app = load_handler("smoke_test_endpoint", {"SMOKE_TEST_MAX_LATENCY_MS": "5000"}, monkeypatch)
        client = boto3.client("sagemaker-runtime", region_name="us-east-1")
        with pytest.raises(Exception) as info:
            app.smoke_test(client, app.SmokeRequest.model_validate({"endpointName": "e"}))
    assert type(info.value).__name__ == "SmokeTestFailedError"
    error = info.value.__cause__.response  # type: ignore[union-attr]
    assert error["Error"]["Code"] == code
    if failure == "timeout":
        assert error["OriginalStatusCode"] == 0
        assert error["Error"]["Message"].startswith('Received server error (0) from primary with message "Your '
                                                    'invocation timed out while waiting for a response from container '
                                                    'primary.')
    if failure == "500":
        assert error["OriginalStatusCode"] == 500
