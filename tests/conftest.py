"""Shared fixtures: the repository on sys.path as Lambda and the images see it, and paths to data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
for extra in (REPO, REPO / "layers" / "common", REPO / "layers" / "imaging", REPO / "layers" / "monitoring"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real HAM10000 and the negatives); tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA
