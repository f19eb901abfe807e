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

from lesionml.model_dir import manifest_digest

from .helpers import REPO, flip_weight_bytes, free_port, launch, sample_image, server_env, wait_healthy
from .model_factory import reseal


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


def _flip_weights(d: Path) -> None:
    flip_weight_bytes(d / "model.ts")


def _drop_manifest(d: Path) -> None:
    (d / "manifest.json").unlink()


def _add_file(d: Path) -> None:
    (d / "evaluation").mkdir(exist_ok=True)
    (d / "evaluation" / "notes.txt").write_text("added after training")


# (id, breakage, regenerate the manifest afterwards, what the last line must name)
BROKEN: list[tuple[str, Callable[[Path], None], bool, str]] = [
    ("missing reference_stats.json", _break_missing_reference, False, "reference_stats.json is missing"),
    ("weights flipped", _flip_weights, False, "model.ts does not match manifest.json"),
    ("no manifest", _drop_manifest, False, "has no manifest.json"),
    ("extra file", _add_file, False, "evaluation/notes.txt is not listed in manifest.json"),
    # Past a regenerated manifest, the content checks and the known-answer check still refuse.
    ("no melanoma threshold, resealed", _break_threshold, True, "melanoma_threshold"),
    ("classes disagree, resealed", _break_classes, True, "classes.json"),
    ("corrupt model.ts, resealed", _break_model, True, "cannot be loaded"),
    ("weights flipped, resealed", _flip_weights, True, "known-answer check failed"),
]


@pytest.mark.parametrize(("breakage", "resealed", "message"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_model_directory_is_refused_with_the_reason(
    model_dir: Path, cache_dir: Path, tmp_path: Path, breakage: Callable[[Path], None], resealed: bool, message: str
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    breakage(broken)
    if resealed:
        reseal(broken)
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
    log = server.log()
    last = log.strip().splitlines()[-1]
    assert last.startswith("serve: model not servable:") and message in last, last
    assert "Traceback" not in log, log[-3000:]


def test_a_worker_that_cannot_verify_the_model_ends_the_log_with_the_reason(model_dir: Path, cache_dir: Path,
                                                                           tmp_path: Path) -> None:
    """gunicorn started without the entry point's checks (or files changed after them): the worker refuses, the
    master exits 3, and its last line is the worker's one-line reason, not a traceback."""
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    _flip_weights(broken)
    env = server_env(broken, free_port(), cache_dir, {"SAGEMAKER_MODEL_SERVER_WORKERS": "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--config", "python:inference_image.gunicorn_conf",
         "inference_image.app:create_app()"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("serve: model not servable: model.ts does not match manifest.json"), last
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_model_package_digest_is_enforced_when_given(model_dir: Path, cache_dir: Path) -> None:
    """``MODEL_MANIFEST_SHA256`` (the model package's record): any other directory, however consistent, is refused."""
    run = [sys.executable, "-m", "inference_image.serve", "check"]
    digest = manifest_digest(model_dir)
    ok = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=server_env(model_dir, 8080, cache_dir, {"MODEL_MANIFEST_SHA256": digest}))
    assert ok.returncode == 0, ok.stderr[-2000:]
    other = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120,
                           env=server_env(model_dir, 8080, cache_dir, {"MODEL_MANIFEST_SHA256": "0" * 64}))
    assert other.returncode == 1
    assert "the model package recorded 0000000000000000" in other.stderr.strip().splitlines()[-1]


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
