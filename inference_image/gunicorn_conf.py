"""gunicorn settings, from the environment the entry point prepared (:mod:`inference_image.settings`).

Why gunicorn with uvicorn workers: gunicorn's pre-forked processes give one model per worker (a model run keeps
one core busy; several processes use several cores without the GIL in the way), its master restarts a crashed or
stuck worker, and SIGTERM is a graceful shutdown (stop accepting, finish in-flight requests, exit). Inside each
worker, uvicorn's event loop (uvloop) with a C HTTP parser (httptools) keeps HTTP/1.1 connections alive and
costs the least per request: it serves a request on one thread from parse to answer, where gunicorn's threaded
worker hands every request from its poller thread to a pool thread and back. On this 2-CPU machine that hand-off
measured 0.5-1.2 ms more latency per request, and several ms more when other processes compete for the CPUs
(benchmarks/inference/RESULTS.md). The model itself runs on one thread beside the event loop (``app.py``), so
the loop keeps reading bodies and answering ``/ping`` whatever the load; the loop's heartbeat to the master stops
while a single model run exceeds half of ``timeout``, so a stuck run still gets the worker replaced.

Slow or silent connections are closed (:mod:`inference_image.protocol`). A worker that cannot load the model
writes its one-line reason to ``SERVING_FAILURE_FILE``; the master prints it as its last line when it exits
(status 3), so the container log ends with the reason, not a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Any

from uvicorn_worker import UvicornWorker

from inference_image.protocol import ServingHttpProtocol
from inference_image.settings import Settings
from lesionml.allocator import keep_freed_memory

_settings = Settings.from_env()
ServingHttpProtocol.read_timeout = _settings.request_read_timeout
# Where a worker that cannot start leaves its reason for the master (inherited by the workers at fork).
_FAILURE_FILE = os.path.join(tempfile.gettempdir(), f"lesion-serving-{os.getpid()}.failure")
os.environ["SERVING_FAILURE_FILE"] = _FAILURE_FILE
# The workers share one listening socket. A burst of new connections would otherwise all go to the first worker to
# wake (libuv accepts until the queue is empty), and the others would idle for as long as those keep-alive
# connections last; in single-accept mode libuv yields after each accept, so the workers take turns.
os.environ.setdefault("UV_TCP_SINGLE_ACCEPT", "1")


class ServingWorker(UvicornWorker):
    """uvicorn worker pinned to uvloop and httptools (fail loudly rather than silently run the slow pure-Python
    stack), with the ASGI lifespan on and uvicorn's per-request access log off unless asked for."""

    CONFIG_KWARGS = {
        "loop": "uvloop",
        "http": ServingHttpProtocol,  # httptools, with limits on idle and slow connections
        "lifespan": "on",
        "access_log": bool(os.environ.get("SERVING_ACCESS_LOG")),
        "timeout_graceful_shutdown": 25,  # below graceful_timeout, after which the master kills the worker
    }

    async def callback_notify(self) -> None:
        # The loop stays free while the model runs on its thread, so it would keep the master's heartbeat alive
        # through a stuck run; no heartbeat while one run exceeds half the timeout, as when it ran on the loop.
        stalled = getattr(self.wsgi, "stalled", None)
        if stalled is not None and stalled(_settings.timeout / 2):
            return
        self.notify()


bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
worker_class = "inference_image.gunicorn_conf.ServingWorker"
timeout = _settings.timeout
graceful_timeout = 30
# Longer than any load balancer's idle timeout in front of the container, so it never reuses a closed socket.
keepalive = _settings.keepalive_timeout
backlog = 2048
preload_app = False  # each worker loads its own model after fork (no runtime state shared across fork)
max_requests = int(os.environ.get("SERVING_MAX_REQUESTS", "0"))
max_requests_jitter = max_requests // 10
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# Off unless asked for: a log line per request is measurable overhead at a few milliseconds per request.
accesslog = os.environ.get("SERVING_ACCESS_LOG") or None
errorlog = "-"
loglevel = _settings.log_level
proc_name = "lesion-serving"
control_socket_disable = True  # gunicorn's runtime-control socket is not needed and wants a writable home


def post_fork(server: Any, worker: Any) -> None:
    """Number the worker (a GPU worker takes GPU ``index % gpus``); ``age`` counts spawns, replacements included."""
    os.environ["SERVING_WORKER_INDEX"] = str((worker.age - 1) % max(_settings.workers, 1))
    keep_freed_memory()


def when_ready(server: Any) -> None:
    """Log the listening address once the master is up (workers still load the model after this)."""
    logging.getLogger("gunicorn.error").info("listening on %s with %d worker(s)", bind, workers)


def on_starting(server: Any) -> None:
    """Forget a reason left by an earlier master with the same pid (containers restart with pid 1)."""
    try:
        os.unlink(_FAILURE_FILE)
    except OSError:
        pass


def on_exit(server: Any) -> None:
    """Make a worker's start-up failure the master's last line (gunicorn's own last line is "Reason: Worker failed
    to boot.")."""
    try:
        with open(_FAILURE_FILE, encoding="utf-8") as f:
            reason = f.read().strip()
        os.unlink(_FAILURE_FILE)
    except OSError:
        return
    if reason:
        sys.stderr.flush()
        print(reason.splitlines()[0], file=sys.stderr, flush=True)
