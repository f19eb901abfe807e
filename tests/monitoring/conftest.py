"""The monitoring layer on sys.path (as /opt/python is on Lambda), and a clean reference cache per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

LAYER = Path(__file__).resolve().parents[2] / "layers" / "monitoring"
if str(LAYER) not in sys.path:
    sys.path.insert(0, str(LAYER))


@pytest.fixture(autouse=True)
def _reference_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test starts with an empty /tmp reference cache of its own."""
    from lesion_monitoring import reference

    cache = tmp_path / "reference-cache"
    monkeypatch.setattr(reference, "DEFAULT_CACHE", cache)
    return cache
