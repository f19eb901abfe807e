"""Serving settings, read once from the environment (no torch, no onnxruntime: the entry point reads them first).

=================================  =====================================================================
Variable                           Meaning (default)
=================================  =====================================================================
``SM_MODEL_DIR`` / ``MODEL_DIR``   the model directory (``/opt/ml/model``, where SageMaker extracts it)
``SAGEMAKER_BIND_TO_PORT``         port (``8080``)
``SERVING_BIND_HOST``              address to bind (``0.0.0.0``; tests and local mode use ``127.0.0.1``)
``SAGEMAKER_MODEL_SERVER_WORKERS`` worker processes (one per GPU, else one per usable CPU)
``MODEL_INTRA_OP_THREADS``         threads one model run may use (usable CPUs / workers, at least 1)
``SAGEMAKER_MODEL_SERVER_TIMEOUT`` seconds before a stuck worker is restarted (``60``)
``SERVING_RUNTIME``                ``auto`` (ONNX Runtime on CPU, TorchScript on GPU), ``onnx``,
                                   ``torchscript``
``SERVING_CACHE_DIR``              where the ONNX export is kept between restarts (``$TMPDIR/lesion-serving``)
``MODEL_VERSION``                  version reported with every answer (else ``metrics.json``'s
                                   ``model_version``, else ``sha256-<first 12 hex of model.ts>``)
``CAPTURE_DIR``                    write one JSON line per prediction here (off when unset)
``CAPTURE_RAW_IMAGES``             also keep the request bytes in ``CAPTURE_DIR/raw/`` (``false``)
``MAX_PAYLOAD_BYTES``              largest request body (``6291456``, SageMaker's 6 MB)
``MAX_IMAGE_PIXELS``               largest width x height an image header may claim (``40000000``)
``MAX_INSTANCES``                  images per JSON request (``16``)
``OOD_EMBEDDING_THRESHOLD``        embedding distance that flags out-of-distribution (``5.0``)
``OOD_IMAGE_THRESHOLD``            image-statistics excess that flags out-of-distribution (``0.75``)
``SERVING_LOG_LEVEL``              ``info``
``MODEL_MANIFEST_SHA256``          SHA-256 ``manifest.json`` must have (the model package's record; unset:
                                   the directory is checked against its own manifest only)
``SERVING_REQUEST_READ_TIMEOUT``   seconds a request may take to arrive, headers and body, from its first
                                   byte (``30``); a slower sender gets 408 and the connection is closed
``SERVING_KEEPALIVE_TIMEOUT``      seconds an idle connection is kept open, before its first request and
                                   between requests (``75``)
=================================  =====================================================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_DIR = "/opt/ml/model"
DEFAULT_PORT = 8080
SAGEMAKER_MAX_PAYLOAD = 6 * 1024 * 1024
RUNTIMES = ("auto", "onnx", "torchscript")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class SettingsError(ValueError):
    """A malformed environment variable; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, low: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < low:
        raise SettingsError(f"{name}={value} must be >= {low}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise SettingsError(f"{name}={value} must be > 0")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}={raw!r} is not true/false")


def usable_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def gpu_count() -> int:
    """NVIDIA GPUs visible to this container, without importing torch (the entry point stays light)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len([d for d in os.listdir("/dev") if d.startswith("nvidia") and d[6:].isdigit()])
    except OSError:
        return 0


@dataclass(frozen=True)
class Settings:
    """Everything the entry point, the gunicorn config and the workers read from the environment."""

    model_dir: Path
    host: str
    port: int
    workers: int
    intra_op_threads: int
    timeout: int
    runtime: str
    cache_dir: Path
    model_version: str | None
    capture_dir: Path | None
    capture_raw: bool
    max_payload_bytes: int
    max_image_pixels: int
    max_instances: int
    ood_embedding_threshold: float
    ood_image_threshold: float
    log_level: str
    gpus: int
    model_manifest_sha256: str | None = None
    request_read_timeout: float = 30.0
    keepalive_timeout: int = 75

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check the environment (see the module docstring)."""
        env = os.environ if env is None else env
        cpus = usable_cpus()
        runtime = env.get("SERVING_RUNTIME", "auto").strip().lower() or "auto"
        if runtime not in RUNTIMES:
            raise SettingsError(f"SERVING_RUNTIME={runtime!r}; expected one of {', '.join(RUNTIMES)}")
        gpus = gpu_count() if runtime in ("auto", "torchscript") else 0
        # One worker per GPU (each owns one device), else one per CPU: a model run is CPU-bound and single-threaded
        # per worker, so more workers than CPUs only adds context switches and memory.
        workers = _int(env, "SAGEMAKER_MODEL_SERVER_WORKERS", gpus or cpus)
        capture = env.get("CAPTURE_DIR", "").strip()
        version = env.get("MODEL_VERSION", "").strip()
        manifest = env.get("MODEL_MANIFEST_SHA256", "").strip().lower()
        if manifest and not _SHA256.fullmatch(manifest):
            raise SettingsError(f"MODEL_MANIFEST_SHA256={manifest!r} is not a hex SHA-256")
        return cls(
            model_dir=Path(env.get("SM_MODEL_DIR") or env.get("MODEL_DIR") or DEFAULT_MODEL_DIR),
            host=env.get("SERVING_BIND_HOST", "0.0.0.0").strip() or "0.0.0.0",
            port=_int(env, "SAGEMAKER_BIND_TO_PORT", DEFAULT_PORT),
            workers=workers,
            intra_op_threads=_int(env, "MODEL_INTRA_OP_THREADS", max(1, cpus // workers)),
            timeout=_int(env, "SAGEMAKER_MODEL_SERVER_TIMEOUT", 60),
            runtime=runtime,
            cache_dir=Path(env.get("SERVING_CACHE_DIR") or Path(os.environ.get("TMPDIR", "/tmp")) / "lesion-serving"),
            model_version=version or None,
            capture_dir=Path(capture) if capture else None,
            capture_raw=_bool(env, "CAPTURE_RAW_IMAGES"),
            max_payload_bytes=_int(env, "MAX_PAYLOAD_BYTES", SAGEMAKER_MAX_PAYLOAD),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 40_000_000),
            max_instances=_int(env, "MAX_INSTANCES", 16),
            ood_embedding_threshold=_float(env, "OOD_EMBEDDING_THRESHOLD", 5.0),
            ood_image_threshold=_float(env, "OOD_IMAGE_THRESHOLD", 0.75),
            log_level=env.get("SERVING_LOG_LEVEL", "info").strip().lower() or "info",
            gpus=gpus,
            model_manifest_sha256=manifest or None,
            request_read_timeout=_float(env, "SERVING_REQUEST_READ_TIMEOUT", 30.0),
            keepalive_timeout=_int(env, "SERVING_KEEPALIVE_TIMEOUT", 75),
        )
