"""Smoke test: send the endpoint a known dermoscopy image and check the answer's shape and latency.

``known_lesion.jpg`` is HAM10000 image ISIC_0024323 (a histopathology-confirmed melanoma; Tschandl et al. 2018,
CC BY-NC 4.0), packaged with the function so the test needs no bucket access.

Every way the check can fail is a ``SmokeTestFailedError``, the error the state machine rolls back on: a wrong or
slow answer, and also the model answering 4xx/5xx (botocore's ``ModelError``), a model not ready, any other
InvokeEndpoint error code, and a timed-out or refused connection. Anything else would end the execution without a
rollback and leave the new model serving.
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
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, Field

from lesion_common.errors import SmokeTestFailedError
from lesion_common.parsing import parse_event

logger = Logger()

MAX_LATENCY_MS = float(os.environ["SMOKE_TEST_MAX_LATENCY_MS"])
KNOWN_IMAGE = (Path(__file__).parent / "known_lesion.jpg").read_bytes()

# Two tries of at most 5 + 20 s fit the function's timeout, so a hanging endpoint fails the test instead of timing
# the function out (which the state machine could not tell from a Lambda fault).
READ_TIMEOUT_S = 20
runtime = boto3.client("sagemaker-runtime", config=Config(connect_timeout=5, read_timeout=READ_TIMEOUT_S,
                                                          retries={"mode": "standard", "total_max_attempts": 2}))


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
    elif not all(isinstance(v, int | float) and not isinstance(v, bool) for v in probs.values()):
        problems.append("probabilities are not all numbers")
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


def invoke(client: Any, endpoint: str) -> tuple[bytes, float]:
    """One InvokeEndpoint with the known image: the body and the latency in ms.

    Raises
    ------
    SmokeTestFailedError
        Whatever InvokeEndpoint raised, with its code (and, for ``ModelError``, the model's own status).
    """
    started = time.perf_counter()
    try:
        response = client.invoke_endpoint(EndpointName=endpoint, ContentType="image/jpeg",
                                          Accept="application/json", Body=KNOWN_IMAGE)
        body = response["Body"].read()
    except ClientError as err:
        error = err.response.get("Error", {})
        detail = f"{error.get('Code', 'ClientError')}: {error.get('Message', '')}"
        if "OriginalStatusCode" in err.response:
            detail += f" (the model answered {err.response['OriginalStatusCode']})"
        raise SmokeTestFailedError(f"{endpoint}: InvokeEndpoint failed: {detail}"[:2000]) from err
    except BotoCoreError as err:  # ReadTimeoutError, ConnectTimeoutError, EndpointConnectionError, ...
        raise SmokeTestFailedError(f"{endpoint}: InvokeEndpoint failed: {type(err).__name__}: {err}"[:2000]) from err
    return body, (time.perf_counter() - started) * 1000


def smoke_test(client: Any, req: SmokeRequest) -> dict[str, Any]:
    """Invoke once; raise SmokeTestFailedError with every problem found."""
    body, latency_ms = invoke(client, req.endpoint_name)
    try:
        answer = json.loads(body)
    except ValueError:
        answer = body[:200].decode(errors="replace")
    try:
        problems = check_answer(answer)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        problems = [f"the answer has an unexpected shape ({type(err).__name__}: {err}): {str(answer)[:200]}"]
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
    req = parse_event(SmokeRequest, event, "invalid smoke test request")
    result = smoke_test(runtime, req)
    logger.info("smoke test passed", extra=result)
    return result
