"""A clean reference cache per test (the monitoring layer is on sys.path through pyproject's ``pythonpath``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _reference_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test starts with an empty /tmp reference cache of its own."""
    from lesion_monitoring import reference

    cache = tmp_path / "reference-cache"
    monkeypatch.setattr(reference, "DEFAULT_CACHE", cache)
    return cache
