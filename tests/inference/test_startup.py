"""Start-up and shutdown of ``serve``: a broken model directory never becomes healthy and says why; SIGTERM drains."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import REPO, launch, sample_image, server_env, wait_healthy


def _break_missing_reference(d: Path) -> None:
    (d / "reference_stats.json").unlink()


def _break_threshold(d: Path) -> None:
    metrics = json.loads((d / "metrics.json").read_text())
    del metrics["melanoma_threshold"]
    (d / "metrics.json").write_text(json.dumps(metrics))


def _break_classes(d: Path) -> None:
    (d / "classes.json").write_text(json.dumps({"label_set": "isic8", "classes": ["mel", "nv", "bcc"]}))


def _break_model(d: Path) -> None:
    (d / "model.ts").write_bytes(b"not a torchscript archive")


BROKEN: list[tuple[str, Callable[[Path], None], str]] = [
    ("missing reference_stats.json", _break_missing_reference, "missing reference_stats.json"),
    ("no melanoma threshold", _break_threshold, "melanoma_threshold"),
    ("classes disagree", _break_classes, "differ from classes.json"),
    ("corrupt model.ts", _break_model, "cannot be loaded"),
]


@pytest.mark.parametrize(("breakage", "message"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_model_directory_is_refused_with_the_reason(
    model_dir: Path, cache_dir: Path, tmp_path: Path, breakage: Callable[[Path], None], message: str
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    breakage(broken)
    server = launch(broken, tmp_path / "serve.log", cache_dir)
    healthy = False
    deadline = time.monotonic() + 90
    while server.process.poll() is None and time.monotonic() < deadline:
        try:
            healthy |= server.request("GET", "/ping", timeout=1.0)[0] == 200
        except OSError:
            pass
        time.sleep(0.05)
    code = server.stop()
    assert not healthy, "/ping answered 200 for a broken model directory"
    assert code == 1, server.log()
    last = server.log().strip().splitlines()[-1]
    assert last.startswith("serve: model not servable:") and message in last, last


def test_check_command_accepts_a_good_directory(model_dir: Path, cache_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "inference_image.serve", "check"], cwd=REPO, capture_output=True, text=True,
        env=server_env(model_dir, 8080, cache_dir), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model directory OK" in proc.stderr


def test_bad_environment_exits_2(model_dir: Path, cache_dir: Path) -> None:
    env = server_env(model_dir, 8080, cache_dir, {"SAGEMAKER_MODEL_SERVER_WORKERS": "many"})
    proc = subprocess.run([sys.executable, "-m", "inference_image.serve", "serve"], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert "SAGEMAKER_MODEL_SERVER_WORKERS" in proc.stderr


def test_sigterm_finishes_the_request_in_flight(model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    server = launch(model_dir, tmp_path / "serve.log", cache_dir, {"SAGEMAKER_MODEL_SERVER_WORKERS": "1"})
    try:
        wait_healthy(server)
        # 16 images in one request, timed once, then sent again and SIGTERM'd a third of the way through it.
        body = json.dumps({"instances": [base64.b64encode(sample_image()).decode()] * 16}).encode()
        t0 = time.perf_counter()
        assert server.invoke(body, "application/json")[0] == 200
        duration = time.perf_counter() - t0
        result: dict[str, int] = {}

        def call() -> None:
            result["status"] = server.invoke(body, "application/json")[0]

        t = threading.Thread(target=call)
        t.start()
        time.sleep(duration / 3)
        server.process.send_signal(signal.SIGTERM)
        t.join(60)
        assert result.get("status") == 200, server.log()[-2000:]
        assert server.process.wait(60) == 0
    finally:
        server.stop()
