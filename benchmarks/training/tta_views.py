"""Test-time augmentation, measured offline on a finished HAM10000 quality job: which views to average.

Runs the job's trained network (``model.pt``) on every label-preserving view of the validation and test images
(identity, horizontal flip, vertical flip, 180 degrees; plus the 90-degree turns for a square input) and compares
view sets and ways of averaging: validation figures to choose by (macro ROC-AUC, log-loss, ECE, balanced accuracy
with decision offsets fitted on validation, and the same by two-fold cross-validation within validation), and the
test figures for the record.

    python -m benchmarks.training.tta_views --job /tmp/ham-quality/job --json /tmp/tta_views.json

Results: benchmarks/training/RESULTS.md ("Test-time augmentation").
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lesionml import metrics as M
from lesionml.models import build_model, dihedral_views
from lesionml.preprocessing import preprocess_batch, read_spec


def per_view_probs(job: Path, split: str, classes: Sequence[str], batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(V, N, C)`` softmax probabilities of every view, and the ``(N,)`` labels of one split."""
    spec = read_spec(job / "model" / "preprocessing.json")
    model, _ = build_model(spec.arch, len(classes), pretrained=False, image_size=(spec.height, spec.width))
    model.load_state_dict(torch.load(job / "model" / "model.pt", map_location="cpu", weights_only=True))
    model = model.eval().to(memory_format=torch.channels_last)
    with open(job / "input" / "data" / "manifests" / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images = job / "input" / "data" / "images"
    labels = np.array([classes.index(r["label"]) for r in rows])
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            x = torch.from_numpy(preprocess_batch([str(images / r["path"]) for r in rows[i:i + batch]], spec))
            out.append(np.stack([
                torch.softmax(model(v.contiguous(memory_format=torch.channels_last)), 1).numpy()
                for v in dihedral_views(x, spec.height == spec.width)
            ]))
    return np.concatenate(out, axis=1).astype(np.float64), labels


def _nll(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def _ba(y: np.ndarray, p: np.ndarray, offsets: np.ndarray) -> float:
    return M.balanced_accuracy(M.confusion_matrix(y, M.decide(p, offsets), p.shape[1]))


def cross_validated_ba(y: np.ndarray, p: np.ndarray, start: np.ndarray, repeats: int = 50, seed: int = 1) -> float:
    """Mean balanced accuracy on one random half of ``y`` with offsets fitted on the other, both ways."""
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(repeats):
        half = np.zeros(len(y), dtype=bool)
        half[rng.permutation(len(y))[: len(y) // 2]] = True
        for fit in (half, ~half):
            offsets, _, _ = M.fit_class_offsets(y[fit], p[fit], start=start)
            scores.append(_ba(y[~fit], p[~fit], offsets))
    return float(np.mean(scores))


def combine(views: np.ndarray, chosen: Sequence[int], how: str) -> np.ndarray:
    """Average the chosen views' probabilities (``mean``) or log-probabilities (``geometric``, renormalised)."""
    v = views[list(chosen)]
    if how == "mean":
        return v.mean(axis=0)
    logp = np.log(np.clip(v, 1e-30, None)).mean(axis=0)
    e = np.exp(logp - logp.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", type=Path, default=Path("/tmp/ham-quality/job"), help="a quality.py job directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    classes = json.loads((args.job / "model" / "classes.json").read_text())["classes"]
    with open(args.job / "input" / "data" / "manifests" / "train.csv", newline="") as f:
        counts = np.bincount([classes.index(r["label"]) for r in csv.DictReader(f)], minlength=len(classes))
    start = -np.log(np.maximum(counts, 1) / counts.sum())
    start -= start.mean()

    t0 = time.time()
    val_views, y_val = per_view_probs(args.job, "validation", classes)
    test_views, y_test = per_view_probs(args.job, "test", classes)
    n_views = val_views.shape[0]
    print(f"{n_views} views of {len(y_val)} validation and {len(y_test)} test images in {time.time() - t0:.0f} s")

    sets: dict[str, tuple[list[int], str]] = {
        "1 view": ([0], "mean"),
        "2 views (identity, left-right flip), mean probability": ([0, 1], "mean"),
        f"{n_views} views, mean probability (tta=dihedral)": (list(range(n_views)), "mean"),
        f"{n_views} views, mean log-probability": (list(range(n_views)), "geometric"),
    }
    rows = []
    for name, (chosen, how) in sets.items():
        pv, pt = combine(val_views, chosen, how), combine(test_views, chosen, how)
        offsets, _, val_ba = M.fit_class_offsets(y_val, pv, start=start)
        row = {
            "views": name,
            "val_macro_auc": M.macro_auc_ovr(y_val, pv)[0], "val_nll": _nll(y_val, pv),
            "val_ece": M.expected_calibration_error(y_val, pv), "val_balanced_accuracy": val_ba,
            "val_balanced_accuracy_cv": cross_validated_ba(y_val, pv, start),
            "test_macro_auc": M.macro_auc_ovr(y_test, pt)[0], "test_nll": _nll(y_test, pt),
            "test_ece": M.expected_calibration_error(y_test, pt), "test_balanced_accuracy": _ba(y_test, pt, offsets),
        }
        rows.append(row)
        print(" | ".join([name] + [f"{k} {v:.4f}" for k, v in row.items() if k != "views"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"job": str(args.job), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
