"""Helpers for the training-image tests: tiny fake SageMaker job directories built from data/sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from lesionml.prepare_ham import read_ham_metadata, split_by_lesion, write_manifests

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample"
TRAIN_PY = ROOT / "training_image" / "train.py"

# Small and fast: a few images per class at 64x48 (width x height).
FAST_HPS = {
    "arch": "mobilenet_v3_small",
    "pretrained": "false",
    "image_size": "64x48",
    "batch_size": "16",
    "eval_batch_size": "32",
    "epochs": "2",
    "freeze_epochs": "1",
    "warmup_epochs": "0.5",
    "seed": "7",
    "threads": "1",  # one thread: robust when the machine is shared (see README)
}


def _per_class(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    by: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if len(by[r["label"]]) < n:
            by[r["label"]].append(r)
    return [r for label in sorted(by) for r in by[label]]


def make_job(base: Path, hps: Mapping[str, str], per_class: tuple[int, int, int] = (6, 3, 3)) -> Path:
    """Lay out ``base`` as /opt/ml with manifests over a per-class subset of data/sample."""
    rows = read_ham_metadata(SAMPLE / "HAM10000_metadata.csv", SAMPLE / "images")
    splits = split_by_lesion(rows, seed=1)
    splits = {s: _per_class(splits[s], n) for s, n in zip(("train", "validation", "test"), per_class, strict=True)}
    write_manifests(splits, base / "input" / "data" / "manifests")
    (base / "input" / "data").mkdir(parents=True, exist_ok=True)
    link = base / "input" / "data" / "images"
    if not link.exists():
        link.symlink_to(SAMPLE / "images", target_is_directory=True)
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    # Exactly as SageMaker writes them: every value a string.
    (config / "hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hps.items()}))
    return base


def run_train(
    base: Path, args: list[str] | None = None, env: Mapping[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run ``training_image/train.py train`` as SageMaker would, against the fake job directory ``base``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "LESIONML_"))}
    full_env.update({"SM_BASE_DIR": str(base), "PYTHONDONTWRITEBYTECODE": "1",
                     "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "layers" / "common")))})  # the image's
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(TRAIN_PY), "train", *(args or [])],
        cwd=base, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
