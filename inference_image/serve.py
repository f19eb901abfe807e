#!/usr/bin/env python
"""Entry point of the inference image: ``serve`` (what SageMaker runs: ``docker run <image> serve``).

    python -m inference_image.serve serve     # or: python inference_image/serve.py serve
    python -m inference_image.serve check     # check the model directory and the export, then exit

``serve`` checks the model directory (every file the training job writes, consistent with each other and with
``model.ts``'s outputs), picks the runtime and exports the model to ONNX when that is the runtime (cached by the
model's digest), sizes the workers, then replaces itself with the gunicorn master (``exec``: gunicorn becomes the
container's PID 1 and handles SIGTERM gracefully; torch, which the checks needed, does not stay in memory).

Exit status: 0 after a graceful stop, 1 model directory not servable (the reason is the last line on stderr),
2 bad environment variable or usage, 3 a worker failed to load the model (gunicorn), 143 SIGTERM during start-up.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

# /opt/program (the repository root in development) must be importable when run as a script.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from inference_image.artifacts import ModelDirError, load_artifacts  # noqa: E402
from inference_image.settings import Settings, SettingsError, usable_cpus  # noqa: E402

log = logging.getLogger("inference.serve")
USAGE = "usage: serve.py serve | check"


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # As PID 1, Python ignores SIGTERM unless it has a handler; a stop during start-up must not wait for SIGKILL.
    raise SystemExit(143)


def _plan_environment() -> dict[str, str]:
    """Check everything and return the environment for gunicorn (raises SettingsError / ModelDirError)."""
    from inference_image.runtime import prepare

    settings = Settings.from_env()
    artifacts = load_artifacts(settings.model_dir, settings.model_version)
    log.info("model directory %s: %s %s, version %s", settings.model_dir, artifacts.spec.arch, artifacts.label_set,
             artifacts.version)
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
        "SERVING_MODEL_SHA256": artifacts.model_sha256,
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
        print(f"serve: bad environment: {e}", file=sys.stderr)
        return 2
    except ModelDirError as e:
        print(f"serve: model not servable: {e}", file=sys.stderr)
        return 1
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
