"""smoke_test_endpoint: the answer's shape and the latency bound."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from botocore.response import StreamingBody

from tests.unit.handlers import load_handler

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
