"""The ASGI application: SageMaker's ``GET /ping`` and ``POST /invocations`` (plus ``/execution-parameters``).

Plain ASGI, no framework: two routes do not need routing or validation layers, and every microsecond here is
serving overhead on top of a ~6 ms model run (see benchmarks/inference/RESULTS.md). gunicorn runs it with uvicorn
workers (:mod:`inference_image.gunicorn_conf`); :func:`create_app` is called once per worker, loads the model and
warms it up before the worker accepts its first connection, so ``/ping`` only ever answers from a ready worker.

The event loop only reads requests and writes answers; everything CPU-bound about a request (JSON and base64
parsing, decoding, the model, the answer's JSON) runs on one model thread per worker
(:class:`concurrent.futures.ThreadPoolExecutor` with one thread: one model run at a time, each using the
worker's share of the CPUs, and one decoded picture in memory at a time). Pillow, numpy and ONNX Runtime release
the GIL while they work, so the loop keeps reading bodies and answering ``/ping`` under any admitted load: with the
model inline on the loop, 16 clients posting 40 M-pixel PNGs kept ``/ping`` waiting for 10 s and more, longer
than SageMaker's health check allows; on this thread, its p99 stayed under 40 ms (benchmarks/robustness/RESULTS.md).
The hand-off costs thread wake-ups: +0.6 ms at p50 per request on an unloaded 2-vCPU VM.

``X-Amzn-SageMaker-Inference-Id`` is checked against SageMaker's own constraint for ``InferenceId`` (1 to 64
characters, the first not white space, all printable ASCII; botocore's sagemaker-runtime model): SageMaker refuses
a longer id at its API, so one here did not come through SageMaker, and it is refused with 400 rather than stored.

Request and answer formats are documented in ``inference_image/README.md``. Every refusal is a JSON body
``{"error": <code>, "message": <text>, "status": <int>}`` with a 4xx status; the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from inference_image.artifacts import ModelDirError, load_artifacts
from inference_image.imaging import ImageRequestError
from inference_image.known_answers import check_known_answers
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
INFERENCE_ID_HEADER = b"x-amzn-sagemaker-inference-id"
# SageMaker's InferenceId: min 1, max 64, pattern \A\S[\p{Print}]*\z (botocore sagemaker-runtime 2017-05-13).
INFERENCE_ID_MAX = 64
_INFERENCE_ID = re.compile(r"[\x21-\x7e][\x20-\x7e]*")
WORKER_BOOT_ERROR = 3  # gunicorn's exit status for a worker that cannot start: the master stops with it


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


def inference_id(value: str | None) -> str | None:
    """The request's inference id, or None when absent; refused (400) where SageMaker would refuse it."""
    if value is None:
        return None
    if len(value) > INFERENCE_ID_MAX:
        raise RequestError(400, "invalid_inference_id",
                           f"X-Amzn-SageMaker-Inference-Id has {len(value)} characters, at most {INFERENCE_ID_MAX}")
    if not _INFERENCE_ID.fullmatch(value):
        raise RequestError(400, "invalid_inference_id", "X-Amzn-SageMaker-Inference-Id must be 1 to 64 printable "
                           "ASCII characters, the first not white space")
    return value


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
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._run_started: float | None = None  # monotonic start of the run on the model thread, if any

    def stalled(self, limit: float) -> bool:
        """True while one run on the model thread has lasted more than ``limit`` seconds (the worker heartbeat)."""
        started = self._run_started
        return started is not None and time.monotonic() - started > limit

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

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        # The model is loaded before the server starts (create_app); at shutdown the requests in flight are done.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._model_thread.shutdown(wait=False)
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
        request_id = inference_id(_header(scope, INFERENCE_ID_HEADER))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, self._answer, body, content_type, request_id)

    def _answer(self, body: bytes, content_type: str, request_id: str | None) -> bytes:
        """On the model thread: the images of the body, the model's answer, its JSON."""
        self._run_started = time.monotonic()
        try:
            images = images_from_json(body, self.settings.max_instances) if content_type == JSON else [body]
            return _dumps(self.predictor.predict(images, content_type=content_type, inference_id=request_id))
        finally:
            self._run_started = None


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
    """Build the application for one worker: verify and read the model directory, load the runtime, pass the
    known-answer check, warm up.

    The entry point has already checked the model directory and exported the model; its decision arrives in
    ``SERVING_PLAN``. Without it (gunicorn started by hand) the worker prepares the model itself. A worker that
    cannot start logs one line, leaves it in ``SERVING_FAILURE_FILE`` for the master to print last, and exits with
    gunicorn's boot-error status (the master then stops: every worker would fail the same way).
    """
    try:
        return _create_app(settings)
    except Exception as e:  # one line, not a traceback, whatever failed (the traceback at debug level)
        log.debug("worker start-up failed", exc_info=True)
        detail = " ".join(str(e).split())[:1000]
        reason = (f"serve: model not servable: {detail}" if isinstance(e, ModelDirError)
                  else f"serve: worker start-up failed: {type(e).__name__}: {detail}")
        log.error("worker %d cannot serve: %s", os.getpid(), reason)
        _leave_reason(reason)
        raise SystemExit(WORKER_BOOT_ERROR) from None


def _leave_reason(reason: str) -> None:
    path = os.environ.get("SERVING_FAILURE_FILE")
    if not path:
        return
    try:
        # Renamed into place: workers failing together leave one whole line, never a mix.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".failure-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(reason + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def _create_app(settings: Settings | None) -> Application:
    settings = settings or Settings.from_env()
    if not logging.getLogger().handlers:  # gunicorn configures only its own loggers
        logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    # Verified again here, not only by the entry point: the files must not have changed since.
    artifacts = load_artifacts(settings.model_dir, settings.model_version, settings.model_manifest_sha256)
    plan_json = os.environ.get("SERVING_PLAN")
    plan = Plan.from_json(plan_json) if plan_json else prepare(artifacts, settings.runtime, settings.cache_dir,
                                                               settings.gpus)
    worker_index = int(os.environ.get("SERVING_WORKER_INDEX", "0"))
    backend = load_backend(plan, artifacts, settings.intra_op_threads, worker_index)
    # This worker's own runtime, device and threads, before it accepts a connection.
    check_known_answers(artifacts, backend, settings.max_image_pixels)
    predictor = Predictor(artifacts, backend, settings)
    predictor.warm_up()
    # Everything loaded so far lives as long as the worker: moved out of the collector's generations, it is never
    # traversed again, so the collections that request garbage triggers stay short.
    gc.collect()
    gc.freeze()
    log.info("worker %d ready: model %s, runtime %s (%s), %d intra-op thread(s), known answers reproduced",
             os.getpid(), artifacts.version, backend.name, plan.device, settings.intra_op_threads)
    return Application(predictor, settings)
