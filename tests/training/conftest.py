"""Fixtures for the training-image tests."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

# Importable whatever pytest's import mode: the repository root (lesionml, training_image) and this folder.
_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE.parents[1]), str(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from training_helpers import make_job  # noqa: E402


@pytest.fixture(scope="session")
def job_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Create a fresh job directory: ``job_factory(name, hps, per_class=(6, 3, 3))``."""

    def factory(name: str, hps: Mapping[str, str], per_class: tuple[int, int, int] = (6, 3, 3)) -> Path:
        return make_job(tmp_path_factory.mktemp(name), hps, per_class)

    return factory


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """In-process tests use one thread: on a busy machine, OpenMP threads waiting for each other cost 100x."""
    import torch

    torch.set_num_threads(1)
