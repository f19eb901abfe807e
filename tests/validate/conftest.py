"""Fixtures for the validate_image tests: the handler module, a fresh moto account per test, the data dirs."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import moto  # noqa: F401  - imported before the handler creates its clients, so that moto can intercept them
import pytest
from moto import mock_aws

from .helpers import ENV, HAM_IMAGES, NEGATIVES, REPO, Cloud, create_resources


@pytest.fixture(scope="session")
def app() -> ModuleType:
    """The handler module, imported as local mode does (by path, under its own name) with its environment.

    The environment is only needed at import: the handler reads its configuration and creates its clients then.
    """
    mp = pytest.MonkeyPatch()
    try:
        for name, value in ENV.items():
            mp.setenv(name, value)
        path = REPO / "functions" / "validate_image" / "app.py"
        spec = importlib.util.spec_from_file_location("_validate_image_app", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        mp.undo()
    return module


@pytest.fixture(scope="session")
def clients(app: ModuleType) -> tuple[Any, Any]:
    """S3 and DynamoDB clients for the tests' own calls, made once (a client costs ~0.1 s to create).

    Clients made after moto's import are intercepted by whichever mock is active when they are called.
    """
    return app.s3, app.dynamodb


@pytest.fixture
def cloud(app: ModuleType, clients: tuple[Any, Any]) -> Iterator[Cloud]:
    """A fresh mocked account with the data bucket and the manifest table."""
    s3, ddb = clients
    with mock_aws():
        create_resources(s3, ddb)
        yield Cloud(app, s3, ddb)


@pytest.fixture(scope="session")
def negatives() -> Path:
    """../shared/data/negatives; skips where absent."""
    if not (NEGATIVES / "negatives.csv").is_file():
        pytest.skip("../shared/data/negatives is not present on this machine")
    return NEGATIVES


@pytest.fixture(scope="session")
def ham_images() -> Path:
    """../shared/data/ham10000/images; skips where absent."""
    if not HAM_IMAGES.is_dir():
        pytest.skip("../shared/data/ham10000 is not present on this machine")
    return HAM_IMAGES
