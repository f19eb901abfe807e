"""Fixtures for the training-image tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

# This folder is on sys.path through pyproject's ``pythonpath``, whatever pytest's import mode.
from training_helpers import make_job


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
