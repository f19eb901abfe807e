"""Load a handler module as Lambda would: environment first, then import (inside moto)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_handler(name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``functions/<name>/app.py`` fresh with ``env`` set (clients bind to the active mock)."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "Test")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "test")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = REPO / "functions" / name / "app.py"
    spec = importlib.util.spec_from_file_location(f"_test_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Context:
    """A minimal Lambda context."""

    function_name = "test"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:test"
    memory_limit_in_mb = 128
    aws_request_id = "req-1"

    def get_remaining_time_in_millis(self) -> int:
        return 60000


class RecordingStepFunctions:
    """Stands in for the Step Functions client where only the calls made matter."""

    def __init__(self, fail_with: str | None = None):
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_with = fail_with

    def _record(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        self.calls.append((name, kwargs))
        if self.fail_with:
            raise ClientError({"Error": {"Code": self.fail_with, "Message": "x"}}, name)
        return {}

    def send_task_success(self, **kwargs: Any) -> dict[str, Any]:
        return self._record("success", kwargs)

    def send_task_failure(self, **kwargs: Any) -> dict[str, Any]:
        return self._record("failure", kwargs)

    def send_task_heartbeat(self, **kwargs: Any) -> dict[str, Any]:
        return self._record("heartbeat", kwargs)


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A gzipped tar of ``files`` (name -> bytes), as a training job's output.tar.gz."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
