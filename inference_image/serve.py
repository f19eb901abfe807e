#!/usr/bin/env python
"""Entry point of the inference image: ``serve`` (what SageMaker runs: ``docker run <image> serve``).

    python -m inference_image.serve serve     # from the repository root (/opt/program, the image's WORKDIR)
    python -m inference_image.serve check     # check the model directory and the export, then exit

The image's ``PYTHONPATH`` (inference_image/Dockerfile) holds the repository root and the layers it copies; in
development the venv's ``.pth`` (Makefile) does the same.

``serve`` verifies the model directory against its manifest (every file, by SHA-256) and checks its content
(consistent files, ``model.ts``'s outputs), picks the runtime and exports the model to ONNX when that is the runtime
(cached under a key covering every input to the export), runs the known-answer check with that runtime, sizes the
workers, then replaces itself with the gunicorn master (``exec``: gunicorn becomes the container's PID 1 and
handles SIGTERM gracefully; torch, which the checks needed, does not stay in memory). Each worker verifies the
directory and passes the known-answer check again before it accepts a connection.

Exit status: 0 after a graceful stop, 1 model directory not servable or any other start-up failure, 2 bad
environment variable or usage, 3 a worker failed to load the model (gunicorn), 143 SIGTERM during start-up. Every
failure ends the output with one line giving the reason (``serve: ...``), never with a traceback: that line is what
SageMaker's CloudWatch log shows last for an endpoint that failed to start.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

# /opt/program in the image (the repository root in development): gunicorn's workers import inference_image from it.
_ROOT = Path(__file__).resolve().parent.parent

try:
    from inference_image.artifacts import ModelDirError, load_artifacts
    from inference_image.settings import Settings, SettingsError, usable_cpus
except ImportError as _e:  # a broken image: still one line
    print(f"serve: start-up failed: {type(_e).__name__}: {_e}", file=sys.stderr)
    sys.exit(1)

log = logging.getLogger("inference.serve")
USAGE = "usage: python -m inference_image.serve serve | check"


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # As PID 1, Python ignores SIGTERM unless it has a handler; a stop during start-up must not wait for SIGKILL.
    raise SystemExit(143)


def _plan_environment() -> dict[str, str]:
    """Check everything and return the environment for gunicorn (raises SettingsError / ModelDirError)."""
    from inference_image.runtime import prepare

    settings = Settings.from_env()
    artifacts = load_artifacts(settings.model_dir, settings.model_version, settings.model_manifest_sha256)
    log.info("model directory %s: %s %s, version %s, manifest sha256 %s", settings.model_dir, artifacts.spec.arch,
             artifacts.label_set, artifacts.version, artifacts.manifest_sha256)
    plan = prepare(artifacts, settings.runtime, settings.cache_dir, settings.gpus)
    env = dict(os.environ)
    cpus = usable_cpus()
    workers = settings.workers
    if "SAGEMAKER_MODEL_SERVER_WORKERS" not in os.environ:
        workers = plan.gpus if plan.device == "cuda" else cpus
    threads = int(os.environ.get("MODEL_INTRA_OP_THREADS") or max(1, cpus // workers))
    log.info("runtime %s on %s (%s); %d worker(s) x %d intra-op thread(s)", plan.runtime, plan.device, plan.note,
             workers, threads)
    env.update({
        "SERVING_PLAN": plan.to_json(),
        "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers),
        "MODEL_INTRA_OP_THREADS": str(threads),
        # numpy's BLAS and OpenMP must not start a thread per core in every worker.
        "OMP_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH", "")) if p),
    })
    if artifacts.version and not settings.model_version:
        env["MODEL_VERSION"] = artifacts.version
    return env


def _one_line(e: BaseException, limit: int = 1000) -> str:
    """The message on one line (torch puts whole tracebacks in its messages)."""
    return " ".join(str(e).split())[:limit]


def _fail(status: int, line: str) -> int:
    logging.shutdown()  # every log line before the reason
    sys.stdout.flush()
    sys.stderr.flush()
    print(line, file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the entry point; returns an exit status unless it becomes gunicorn."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else "serve"
    if command not in ("serve", "check") or len(args) > 1:
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        env = _plan_environment()
    except SettingsError as e:
        return _fail(2, f"serve: bad environment: {_one_line(e)}")
    except ModelDirError as e:
        return _fail(1, f"serve: model not servable: {_one_line(e)}")
    except Exception as e:  # anything else (a full disk, a broken install): still one line, never a traceback
        log.debug("start-up failed", exc_info=True)
        return _fail(1, f"serve: start-up failed: {type(e).__name__}: {_one_line(e)}")
    if command == "check":
        print("serve: model directory OK", file=sys.stderr)
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    argv_gunicorn = [
        sys.executable, "-m", "gunicorn", "--config", "python:inference_image.gunicorn_conf",
        "inference_image.app:create_app()",
    ]
    os.execve(sys.executable, argv_gunicorn, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
