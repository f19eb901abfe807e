"""Fixtures for the inference tests: a real model directory and the server started as SageMaker starts it."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import REPO, Server, launch, wait_healthy
from .model_factory import MODEL_FILES, build_model_dir


def _factory_key() -> str:
    """Changes whenever the code that shapes the model directory changes (then the cached copy is rebuilt)."""
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    for path in sorted([REPO / "tests" / "inference" / "model_factory.py", *(REPO / "lesionml").glob("*.py")]):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete model directory (EfficientNet-Lite0 with ImageNet weights, untrained head, real reference).

    Building it takes ~15 s of CPU, so it is kept in pytest's cache, keyed by the code that builds it.
    """
    cached = Path(request.config.cache.mkdir(f"inference-model-{_factory_key()}"))
    if not all((cached / name).is_file() for name in MODEL_FILES):
        build_model_dir(cached)
    dest = tmp_path_factory.mktemp("model") / "model"
    shutil.copytree(cached, dest)
    return dest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's ONNX export cache, shared by the servers of one test session."""
    return tmp_path_factory.mktemp("serving-cache")


@pytest.fixture(scope="session")
def capture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the shared server writes its capture records."""
    return tmp_path_factory.mktemp("capture")


@pytest.fixture(scope="session")
def server(model_dir: Path, cache_dir: Path, capture_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    """``serve`` in a subprocess with two workers, capture on, version pinned: the server most tests talk to."""
    log_path = tmp_path_factory.mktemp("server-log") / "serve.log"
    srv = launch(model_dir, log_path, cache_dir, {"CAPTURE_DIR": str(capture_dir), "MODEL_VERSION": "test-7"})
    try:
        wait_healthy(srv)
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, f"server did not stop cleanly ({code}):\n{srv.log()[-3000:]}"
