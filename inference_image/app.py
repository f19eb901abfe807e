"""The ASGI application: SageMaker's ``GET /ping`` and ``POST /invocations`` (plus ``/execution-parameters``).

Plain ASGI, no framework: two routes do not need routing or validation layers, and every microsecond here is
serving overhead on top of a ~6 ms model run (see benchmarks/inference/RESULTS.md). gunicorn runs it with uvicorn
workers (:mod:`inference_image.gunicorn_conf`); :func:`create_app` is called once per worker, loads the model and
warms it up before the worker accepts its first connection, so ``/ping`` only ever answers from a ready worker.

The model runs inline, on the event loop: it is CPU-bound and runs one at a time per worker anyway, and handing
it to a thread costs a thread wake-up per request, which measured slower here (most of all on a busy machine).

Request and answer formats are documented in ``inference_image/README.md``. Every refusal is a JSON body
``{"error": <code>, "message": <text>, "status": <int>}`` with a 4xx status; the worker keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import gc
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from inference_image.artifacts import load_artifacts
from inference_image.imaging import ImageRequestError
from inference_image.predictor import Predictor
from inference_image.runtime import Plan, load_backend, prepare
from inference_image.settings import Settings

log = logging.getLogger("inference.app")

JSON = "application/json"
# Raw image bodies: the SageMaker conventions plus the image types the decoder reads. The bytes decide the format.
IMAGE_TYPES = frozenset({
    "image/jpeg", "image/jpg", "image/png", "application/x-image", "application/octet-stream", "image/webp",
    "image/bmp", "image/gif", "image/tiff",
})
_ACCEPTABLE = frozenset({JSON, "application/*", "*/*"})
# Bodies over the limit are still read (and dropped) up to this size, so the client gets the 413 answer instead of
# a connection reset in the middle of its upload; beyond it the connection is closed.
_DRAIN_LIMIT = 64 * 1024 * 1024


class RequestError(Exception):
    """A refused request: HTTP status, machine-readable code, message."""

    def __init__(self, status: int, code: str, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close


def media_type(header: str | None) -> str:
    """``"Image/JPEG; q=1"`` -> ``"image/jpeg"``."""
    return (header or "").split(";", 1)[0].strip().lower()


def accepts_json(header: str | None) -> bool:
    """True if an ``Accept`` header allows a JSON answer (absent means anything)."""
    if not header or not header.strip():
        return True
    for part in header.split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        if kind.lower() not in _ACCEPTABLE:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


def _b64(value: Any, where: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("b64")
    if not isinstance(value, str) or not value:
        raise RequestError(400, "invalid_json", f"{where} must be a base64 string or {{\"b64\": <base64 string>}}")
    if value.startswith("data:"):  # data URLs from browsers: data:image/png;base64,....
        value = value.partition(",")[2]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid_base64", f"{where} is not valid base64") from None


def images_from_json(body: bytes, max_instances: int) -> list[bytes]:
    """The images of a JSON request: ``{"instances": [{"b64": ...} | "<b64>", ...]}`` or ``{"image": "<b64>"}``."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:  # also invalid UTF-8
        raise RequestError(400, "invalid_json", f"body is not JSON: {e}") from None
    if isinstance(doc, dict) and "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list) or not instances:
            raise RequestError(400, "invalid_json", "\"instances\" must be a non-empty list")
        if len(instances) > max_instances:
            raise RequestError(413, "too_many_instances", f"{len(instances)} instances, limit {max_instances}")
        return [_b64(v, f"instances[{i}]") for i, v in enumerate(instances)]
    if isinstance(doc, dict) and "image" in doc:
        return [_b64(doc["image"], "\"image\"")]
    raise RequestError(400, "invalid_json", "expected {\"instances\": [{\"b64\": ...}, ...]} or {\"image\": \"<b64>\"}")


Headers = list[tuple[bytes, bytes]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Application:
    """The ASGI callable.

    Parameters
    ----------
    predictor : Predictor
        The loaded, warmed-up model.
    settings : Settings
        Limits.
    """

    def __init__(self, predictor: Predictor, settings: Settings) -> None:
        self.predictor = predictor
        self.settings = settings
        self._ping = json.dumps({"status": "healthy", "model_version": predictor.artifacts.version}).encode()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        status, body, close = await self._handle(scope, receive)
        headers: Headers = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        # The model is loaded before the server starts (create_app); start-up and shutdown have nothing to do.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: dict[str, Any], receive: Receive) -> tuple[int, bytes, bool]:
        """Status, body and whether to close the connection."""
        path, method = scope["path"], scope["method"]
        try:
            if path == "/ping":
                if method not in ("GET", "HEAD"):
                    raise RequestError(405, "method_not_allowed", "use GET /ping")
                return 200, self._ping, False
            if path == "/invocations":
                if method != "POST":
                    raise RequestError(405, "method_not_allowed", "use POST /invocations")
                return 200, await self._invoke(scope, receive), False
            if path == "/execution-parameters" and method == "GET":
                # Batch transform asks this once; one record per request keeps requests under the payload limit.
                return 200, _dumps({
                    "MaxConcurrentTransforms": self.settings.workers, "BatchStrategy": "SINGLE_RECORD",
                    "MaxPayloadInMB": max(1, self.settings.max_payload_bytes // (1024 * 1024)),
                }), False
            raise RequestError(404, "not_found", f"no route {method} {path}")
        except (RequestError, ImageRequestError) as e:
            log.info("refused %d %s: %s", e.status, e.code, e.message)
            return e.status, _dumps({"error": e.code, "message": e.message, "status": e.status}), \
                getattr(e, "close", False)
        except Exception:  # a bug must cost one request, not the worker
            log.exception("unhandled error on %s %s", method, path)
            return 500, _dumps({"error": "internal_error", "message": "internal server error", "status": 500}), False

    async def _read_body(self, scope: dict[str, Any], receive: Receive) -> bytes:
        limit = self.settings.max_payload_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > _DRAIN_LIMIT:
            raise RequestError(413, "payload_too_large", f"body of {declared} bytes, limit {limit}", close=True)
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client_disconnected", "the client went away", close=True)
            chunk = message.get("body", b"")
            total += len(chunk)
            # Over the limit: keep reading (and dropping) so the client gets the 413 instead of a reset mid-upload.
            if total <= limit:
                chunks.append(chunk)
            elif total > _DRAIN_LIMIT:
                raise RequestError(413, "payload_too_large", f"body over {limit} bytes", close=True)
            more = message.get("more_body", False)
        if total > limit:
            raise RequestError(413, "payload_too_large", f"body of {total} bytes, limit {limit} bytes")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _invoke(self, scope: dict[str, Any], receive: Receive) -> bytes:
        accept = _header(scope, b"accept")
        content_type = media_type(_header(scope, b"content-type"))
        body = await self._read_body(scope, receive)
        if not accepts_json(accept):
            raise RequestError(406, "not_acceptable", f"Accept {accept!r}: only {JSON} answers")
        if content_type != JSON and content_type not in IMAGE_TYPES:
            raise RequestError(
                415, "unsupported_media_type",
                f"Content-Type {content_type or '(none)'!r}; use image/jpeg, image/png, application/x-image or "
                f"{JSON}",
            )
        images = images_from_json(body, self.settings.max_instances) if content_type == JSON else [body]
        answer = self.predictor.predict(
            images, content_type=content_type, inference_id=_header(scope, b"x-amzn-sagemaker-inference-id")
        )
        return _dumps(answer)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    """First value of a request header (ASGI gives lower-case names)."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _dumps(doc: Any) -> bytes:
    # orjson: ~10x faster than json.dumps on an answer (~70 us -> ~8 us here), the same compact JSON; numpy
    # arrays and scalars are written as lists and numbers, non-finite floats as null.
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def create_app(settings: Settings | None = None) -> Application:
    """Build the application for one worker: read the model directory, load the runtime, warm up.

    The entry point has already checked the model directory and exported the model; its decision arrives in
    ``SERVING_PLAN``. Without it (gunicorn started by hand) the worker prepares the model itself.
    """
    settings = settings or Settings.from_env()
    if not logging.getLogger().handlers:  # gunicorn configures only its own loggers
        logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    artifacts = load_artifacts(settings.model_dir, settings.model_version, os.environ.get("SERVING_MODEL_SHA256"))
    plan_json = os.environ.get("SERVING_PLAN")
    plan = Plan.from_json(plan_json) if plan_json else prepare(artifacts, settings.runtime, settings.cache_dir,
                                                               settings.gpus)
    worker_index = int(os.environ.get("SERVING_WORKER_INDEX", "0"))
    backend = load_backend(plan, artifacts, settings.intra_op_threads, worker_index)
    predictor = Predictor(artifacts, backend, settings)
    predictor.warm_up()
    # Everything loaded so far lives as long as the worker: moved out of the collector's generations, it is never
    # traversed again, so the collections that request garbage triggers stay short.
    gc.collect()
    gc.freeze()
    log.info("worker %d ready: model %s, runtime %s (%s), %d intra-op thread(s)", os.getpid(), artifacts.version,
             backend.name, plan.device, settings.intra_op_threads)
    return Application(predictor, settings)
