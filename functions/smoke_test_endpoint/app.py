"""Smoke test: send the endpoint a known dermoscopy image and check the answer's shape and latency.

``known_lesion.jpg`` is HAM10000 image ISIC_0024323 (a histopathology-confirmed melanoma; Tschandl et al. 2018,
CC BY-NC 4.0), packaged with the function so the test needs no bucket access.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field, ValidationError

from lesion_common.errors import InvalidRequestError, SmokeTestFailedError

logger = Logger()

MAX_LATENCY_MS = float(os.environ["SMOKE_TEST_MAX_LATENCY_MS"])
KNOWN_IMAGE = (Path(__file__).parent / "known_lesion.jpg").read_bytes()

runtime = boto3.client("sagemaker-runtime")


class SmokeRequest(BaseModel):
    """Which endpoint, and the version it should now serve."""

    endpoint_name: str = Field(alias="endpointName", min_length=1)
    model_package_version: int | None = Field(alias="modelPackageVersion", default=None)


def check_answer(answer: Any) -> list[str]:
    """What is wrong with a prediction document (empty when it has the serving contract's shape)."""
    problems: list[str] = []
    prediction = answer["predictions"][0] if isinstance(answer, dict) and answer.get("predictions") else answer
    if not isinstance(prediction, dict):
        return [f"answer is not a JSON object: {str(answer)[:200]}"]
    probs = prediction.get("probabilities")
    if not isinstance(probs, dict) or len(probs) < 2:
        problems.append("no per-class probabilities")
    else:
        values = [float(v) for v in probs.values()]
        if any(not 0.0 <= v <= 1.0 or math.isnan(v) for v in values) or abs(sum(values) - 1.0) > 1e-3:
            problems.append(f"probabilities do not form a distribution (sum {sum(values):.4f})")
        if prediction.get("predicted_class") not in probs:
            problems.append(f"predicted_class {prediction.get('predicted_class')!r} is not one of the classes")
    melanoma = prediction.get("melanoma")
    if not isinstance(melanoma, dict) or not {"probability", "threshold", "at_risk"} <= set(melanoma):
        problems.append("no melanoma risk block (probability, threshold, at_risk)")
    return problems


def smoke_test(client: Any, req: SmokeRequest) -> dict[str, Any]:
    """Invoke once; raise SmokeTestFailedError with every problem found."""
    started = time.perf_counter()
    response = client.invoke_endpoint(EndpointName=req.endpoint_name, ContentType="image/jpeg",
                                      Accept="application/json", Body=KNOWN_IMAGE)
    latency_ms = (time.perf_counter() - started) * 1000
    body = response["Body"].read()
    try:
        answer = json.loads(body)
    except ValueError:
        answer = body[:200].decode(errors="replace")
    problems = check_answer(answer)
    if latency_ms > MAX_LATENCY_MS:
        problems.append(f"latency {latency_ms:.0f} ms over {MAX_LATENCY_MS:.0f} ms")
    if problems:
        raise SmokeTestFailedError(f"{req.endpoint_name}: " + "; ".join(problems))
    prediction = answer["predictions"][0] if answer.get("predictions") else answer
    summary = f"known melanoma image -> {prediction['predicted_class']} in {latency_ms:.0f} ms"
    return {"passed": True, "latencyMs": round(latency_ms, 1), "predictedClass": prediction["predicted_class"],
            "summary": summary}


@logger.inject_lambda_context(log_event=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Check the freshly deployed endpoint with a known image."""
    try:
        req = SmokeRequest.model_validate(event)
    except ValidationError as err:
        raise InvalidRequestError(f"invalid smoke test request: {err}") from err
    result = smoke_test(runtime, req)
    logger.info("smoke test passed", extra=result)
    return result
