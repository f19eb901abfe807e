"""The training job seals its model directory (issue 19): known answers, then a manifest of every file, last;
and the serving code accepts exactly that directory and reproduces the answers with both runtimes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from training_helpers import FAST_HPS, run_train

from lesionml.model_dir import (
    KNOWN_ANSWERS_NAME,
    MANIFEST_NAME,
    manifest_digest,
    model_files,
    read_known_answers,
    verify_manifest,
)


@pytest.fixture(scope="module")
def sealed_job(job_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = job_factory("sealed", FAST_HPS)
    out = tmp_path_factory.mktemp("sealed-out")
    proc = run_train(base, args=["--dry_run=true"], env={"SM_OUTPUT_DATA_DIR": str(out)})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return base / "model", out


def test_manifest_lists_every_file_and_is_written_last(sealed_job: tuple[Path, Path]) -> None:
    model_dir, out = sealed_job
    manifest = verify_manifest(model_dir)
    files = set(manifest.files)
    assert files == set(model_files(model_dir))
    assert {"model.ts", "model.pt", "classes.json", "preprocessing.json", "metrics.json", "reference_stats.json",
            KNOWN_ANSWERS_NAME} <= files
    assert any(f.startswith("evaluation/") for f in files)
    newest = max((model_dir / f).stat().st_mtime_ns for f in files)
    assert (model_dir / MANIFEST_NAME).stat().st_mtime_ns >= newest
    # The output's byte-identical copy: where the pipeline reads the digest for the model package.
    assert (out / MANIFEST_NAME).read_bytes() == (model_dir / MANIFEST_NAME).read_bytes()
    assert manifest.digest == manifest_digest(out) == manifest_digest(model_dir)
    assert json.loads((out / "metrics.json").read_text()) == json.loads((model_dir / "metrics.json").read_text())


def test_known_answers_are_model_ts_on_the_training_transform(sealed_job: tuple[Path, Path]) -> None:
    import torch

    from lesionml.labels import classes_for
    from lesionml.models import load_torchscript
    from lesionml.preprocessing import preprocess_batch, read_spec

    model_dir, _ = sealed_job
    classes = classes_for("ham7")
    answers = read_known_answers(model_dir, classes)
    assert len(answers) == 4
    spec = read_spec(model_dir / "preprocessing.json")
    x = torch.from_numpy(preprocess_batch([png for png, _ in answers], spec))
    with torch.inference_mode():
        probs = load_torchscript(model_dir / "model.ts").predict(x)[0].numpy()
    np.testing.assert_allclose(probs, np.stack([p for _, p in answers]), atol=1e-6)


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_serving_accepts_the_sealed_directory(sealed_job: tuple[Path, Path], tmp_path: Path, runtime: str) -> None:
    from inference_image.artifacts import load_artifacts
    from inference_image.runtime import prepare

    model_dir, _ = sealed_job
    art = load_artifacts(model_dir, manifest_sha256=manifest_digest(model_dir))
    plan: Any = prepare(art, runtime, tmp_path / "cache")  # runs the known-answer check with that runtime
    assert plan.runtime == runtime
