"""SageMaker real-time endpoints in local mode: the inference image's ``serve`` entry point as real processes.

Each named endpoint is one ``python -m inference_image.serve serve`` process (gunicorn and its workers) on a free
port of 127.0.0.1, started from a model directory exactly as SageMaker starts the container (``SM_MODEL_DIR``,
``SAGEMAKER_BIND_TO_PORT``, ``MODEL_VERSION``), and considered in service once ``GET /ping`` answers 200.
:meth:`LocalEndpoints.install` makes boto3's ``sagemaker-runtime`` ``invoke_endpoint`` under moto's ``mock_aws``
reach that process over HTTP, so handlers and tests call endpoints exactly as they would on AWS::

    with mock_aws(), LocalEndpoints(work_dir) as endpoints:
        endpoints.install()
        endpoints.start("skin-lesion", model_dir, version="3")
        rt = boto3.client("sagemaker-runtime", region_name="us-east-1")
        out = rt.invoke_endpoint(EndpointName="skin-lesion", Body=jpeg, ContentType="image/jpeg")
        endpoints.swap("skin-lesion", new_model_dir, version="4")   # blue/green: new beside old, then switch
        endpoints.stop("skin-lesion")                              # SIGTERM, graceful

As on SageMaker, a 4xx/5xx answer from the container surfaces as botocore's ``ModelError`` (HTTP 424 with
``OriginalStatusCode`` and ``OriginalMessage``), a container that does not answer within InvokeEndpoint's 60 s as
the ``ModelError`` SageMaker gives then (``Received server error (0) ... Your invocation timed out ...``), and an
unknown endpoint name as a ``ValidationError``. Endpoint
names are global here (account and region are ignored). Logs of each process go to
``<work_dir>/endpoints/<name>-<n>.log``.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

log = logging.getLogger("localmode.endpoints")

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class EndpointError(RuntimeError):
    """An endpoint process did not become healthy, or the name is unknown; the message says why."""


@dataclass
class LocalEndpoint:
    """One running serving process.

    Attributes
    ----------
    name : str
        Endpoint name.
    model_dir : Path
        The model directory it serves.
    version : str or None
        ``MODEL_VERSION`` it was started with.
    port : int
        Its port on 127.0.0.1.
    process : subprocess.Popen
        The gunicorn master (started as the ``serve`` entry point).
    log_path : Path
        Its stdout and stderr.
    """

    name: str
    model_dir: Path
    version: str | None
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.time)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{HOST}:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        """The end of its log (for error messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1 (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_request(port: int, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
                 timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to 127.0.0.1:port; returns status, headers (lower-case names) and body.

    Uses http.client directly: moto's mock intercepts the ``requests`` library, not the standard library.
    """
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class LocalEndpoints:
    """Named local endpoints, each a real ``serve`` process; see the module docstring.

    Parameters
    ----------
    work_dir : Path
        Logs go to ``work_dir/endpoints/``, the ONNX export cache to ``work_dir/endpoints/cache``.
    workers : int
        Worker processes per endpoint (``SAGEMAKER_MODEL_SERVER_WORKERS``); 1 keeps local mode light.
    startup_timeout : float
        Seconds to wait for ``/ping`` before giving up on a start.
    env : mapping, optional
        Extra environment for every endpoint process (e.g. ``CAPTURE_DIR``).
    python : str
        Interpreter that runs the entry point.
    """

    def __init__(self, work_dir: str | Path, workers: int = 1, startup_timeout: float = 180.0,
                 env: Mapping[str, str] | None = None, python: str = sys.executable) -> None:
        self.work_dir = Path(work_dir)
        self.workers = workers
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self.python = python
        self._endpoints: dict[str, LocalEndpoint] = {}
        self._lock = threading.RLock()
        self._serial = 0
        self._undo: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalEndpoints:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every endpoint and remove the boto3 hook."""
        self.stop_all()
        self.uninstall()

    def names(self) -> list[str]:
        """Names of the endpoints in service."""
        with self._lock:
            return sorted(self._endpoints)

    def get(self, name: str) -> LocalEndpoint:
        """The endpoint in service under ``name``.

        Raises
        ------
        EndpointError
            No such endpoint.
        """
        with self._lock:
            ep = self._endpoints.get(name)
        if ep is None:
            raise EndpointError(f"Could not find endpoint \"{name}\".")
        return ep

    def _launch(self, name: str, model_dir: Path, version: str | None, env: Mapping[str, str] | None) -> LocalEndpoint:
        """Start a process and wait until /ping answers 200 (kills it and raises if it never does)."""
        logs = self.work_dir / "endpoints"
        logs.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._serial += 1
            serial = self._serial
        port = free_port()
        proc_env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SAGEMAKER_"))}
        proc_env.update({
            "SM_MODEL_DIR": str(model_dir),
            "SAGEMAKER_BIND_TO_PORT": str(port),
            "SERVING_BIND_HOST": HOST,
            "SAGEMAKER_MODEL_SERVER_WORKERS": str(self.workers),
            "SERVING_CACHE_DIR": str(logs / "cache"),
            "SERVING_ENDPOINT_NAME": name,
            # The image's PYTHONPATH (inference_image/Dockerfile): the repository and the common and imaging layers.
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), str(REPO_ROOT / "layers" / "common"),
                                                      str(REPO_ROOT / "layers" / "imaging"),
                                                      os.environ.get("PYTHONPATH", "")) if p),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        if version is not None:
            proc_env["MODEL_VERSION"] = str(version)
        proc_env.update(self.env)
        proc_env.update(env or {})
        log_path = logs / f"{name}-{serial}.log"
        with open(log_path, "wb") as log_file:
            # Own session: a Ctrl-C in the parent's terminal must not hit the server before stop() drains it.
            process = subprocess.Popen(
                [self.python, "-m", "inference_image.serve", "serve"], cwd=REPO_ROOT, env=proc_env,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
        ep = LocalEndpoint(name, model_dir, version, port, process, log_path)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                raise EndpointError(f"endpoint {name}: the server exited with status {code} before becoming healthy:"
                                    f"\n{ep.log_tail()}")
            try:
                status, _, _ = http_request(port, "GET", "/ping", timeout=2.0)
                if status == 200:
                    log.info("endpoint %s in service on %s (model %s, version %s)", name, ep.url, model_dir, version)
                    return ep
            except OSError:
                pass
            time.sleep(0.1)
        self._terminate(ep, timeout=5.0)
        raise EndpointError(f"endpoint {name}: /ping not healthy after {self.startup_timeout:.0f} s:\n{ep.log_tail()}")

    def start(self, name: str, model_dir: str | Path, version: str | None = None,
              env: Mapping[str, str] | None = None) -> LocalEndpoint:
        """Put ``model_dir`` in service as ``name`` (a running endpoint of that name is swapped, not duplicated).

        Parameters
        ----------
        name : str
            Endpoint name, as ``invoke_endpoint(EndpointName=...)`` uses it.
        model_dir : str or Path
            A model directory as the training job writes it (what SageMaker extracts to /opt/ml/model).
        version : str, optional
            ``MODEL_VERSION`` reported in every answer.
        env : mapping, optional
            Extra environment for this process only.

        Raises
        ------
        EndpointError
            The server exited or never answered /ping with 200; the message holds its log.
        """
        with self._lock:
            running = name in self._endpoints
        if running:
            return self.swap(name, model_dir, version, env)
        ep = self._launch(name, Path(model_dir), version, env)
        with self._lock:
            self._endpoints[name] = ep
        return ep

    def swap(self, name: str, model_dir: str | Path, version: str | None = None,
             env: Mapping[str, str] | None = None, drain_timeout: float = 30.0) -> LocalEndpoint:
        """Blue/green: start the new version beside the old one, switch once it is healthy, then stop the old one.

        If the new version does not become healthy the old one keeps serving and :class:`EndpointError` is raised.
        """
        new = self._launch(name, Path(model_dir), version, env)
        with self._lock:
            old = self._endpoints.get(name)
            self._endpoints[name] = new
        if old is not None:
            self._terminate(old, drain_timeout)
        return new

    def stop(self, name: str, timeout: float = 30.0) -> int | None:
        """Take ``name`` out of service: SIGTERM (gunicorn finishes in-flight requests), SIGKILL after ``timeout``.

        Returns the exit status (0 after a graceful stop), or None if no such endpoint.
        """
        with self._lock:
            ep = self._endpoints.pop(name, None)
        return None if ep is None else self._terminate(ep, timeout)

    def stop_all(self, timeout: float = 30.0) -> None:
        """Stop every endpoint."""
        for name in self.names():
            self.stop(name, timeout)

    @staticmethod
    def _terminate(ep: LocalEndpoint, timeout: float) -> int:
        if ep.process.poll() is None:
            ep.process.send_signal(signal.SIGTERM)
            try:
                ep.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("endpoint %s (pid %d) ignored SIGTERM for %.0f s; killing it", ep.name, ep.process.pid,
                            timeout)
                try:
                    os.killpg(ep.process.pid, signal.SIGKILL)  # its own session: the master and its workers
                except ProcessLookupError:
                    pass
                ep.process.wait()
        return int(ep.process.returncode)

    # ------------------------------------------------------------------ invocation
    def invoke(self, name: str, body: bytes, content_type: str | None = None, accept: str | None = None,
               headers: Mapping[str, str] | None = None, timeout: float = 60.0) -> tuple[int, str, bytes]:
        """POST ``body`` to the endpoint's ``/invocations``; returns (status, content type, body).

        A request that finds the old process of a swap already gone is retried once on the new one.
        """
        sent = dict(headers or {})
        if content_type:
            sent["Content-Type"] = content_type
        if accept:
            sent["Accept"] = accept
        for attempt in (1, 2):
            ep = self.get(name)
            try:
                status, resp_headers, data = http_request(ep.port, "POST", "/invocations", body, sent, timeout)
                return status, resp_headers.get("content-type", "application/octet-stream"), data
            except ConnectionError:
                with self._lock:
                    current = self._endpoints.get(name)
                if attempt == 2 or current is ep:
                    raise
        raise AssertionError("unreachable")

    def install(self) -> Callable[[], None]:
        """Route moto's ``sagemaker-runtime`` ``InvokeEndpoint`` to these endpoints; returns the undo function.

        Call it inside ``mock_aws`` (or before it starts); :meth:`close` undoes it too.
        """
        from moto.sagemakerruntime.responses import SageMakerRuntimeResponse

        if self._undo is not None:
            return self._undo
        original = SageMakerRuntimeResponse.invoke_endpoint
        original_raw = SageMakerRuntimeResponse.use_raw_body
        endpoints = self

        def invoke_endpoint(response: Any) -> Any:
            # /endpoints/<name>/invocations (the name URL-encoded)
            name = unquote(response.parsed_url.path.split("/")[2])
            headers = response.headers
            passed = {k: v for k, v in headers.items() if k.lower().startswith("x-amzn-sagemaker-")}
            body = response.raw_body if isinstance(response.raw_body, bytes) else (response.raw_body or "").encode()
            try:
                status, ctype, data = endpoints.invoke(
                    name, body, headers.get("Content-Type"), headers.get("Accept"), passed
                )
            except EndpointError:
                return 400, {"status": 400, "x-amzn-ErrorType": "ValidationError"}, json.dumps(
                    {"message": f"Endpoint {name} of account 123456789012 not found."}
                )
            except TimeoutError:
                return _model_error(name, 0, INVOCATION_TIMED_OUT)
            except OSError as e:
                return _model_error(name, 500, f"connection to the container failed: {e}")
            if status >= 400:
                return _model_error(name, status, data.decode("utf-8", errors="replace"))
            resp_headers = {"Content-Type": ctype, "x-Amzn-Invoked-Production-Variant": "AllTraffic"}
            return 200, resp_headers, data

        SageMakerRuntimeResponse.invoke_endpoint = invoke_endpoint  # type: ignore[method-assign,assignment]
        # moto decodes request bodies as UTF-8 unless told otherwise, which fails on every JPEG.
        SageMakerRuntimeResponse.use_raw_body = True

        def undo() -> None:
            SageMakerRuntimeResponse.invoke_endpoint = original  # type: ignore[method-assign]
            SageMakerRuntimeResponse.use_raw_body = original_raw
            self._undo = None

        self._undo = undo
        return undo

    def uninstall(self) -> None:
        """Remove the hook installed by :meth:`install` (no-op if none)."""
        if self._undo is not None:
            self._undo()


# SageMaker's message when the container has not answered after 60 s (reported with original status 0).
INVOCATION_TIMED_OUT = ("Your invocation timed out while waiting for a response from container primary. Review the "
                        "latency metrics for each container in Amazon CloudWatch, resolve the issue, and try again.")


def _model_error(name: str, status: int, message: str) -> tuple[int, dict[str, Any], str]:
    """SageMaker's answer when the container returns an error: 424 ModelError carrying the original status."""
    kind = "client" if 400 <= status < 500 else "server"
    body = {
        "ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL",
        "Message": f"Received {kind} error ({status}) from primary with message \"{message}\". See the endpoint's "
                   f"log in local mode for more information.",
        "OriginalStatusCode": status,
        "OriginalMessage": message,
        "LogStreamArn": f"arn:aws:logs:local:123456789012:log-group:/aws/sagemaker/Endpoints/{name}",
    }
    return 424, {"status": 424, "x-amzn-ErrorType": "ModelError", "Content-Type": "application/json"}, json.dumps(body)
