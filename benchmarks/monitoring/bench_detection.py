"""Which real shifts the drift alarm catches: DriftScore over a grid of acquisition changes and of contamination.

Usage::

    python -m benchmarks.monitoring.bench_detection [--reference 300] [--window 200] [--draws 5] [--changes gamma]

Same material as tests/monitoring/test_drift_real.py (EfficientNet-Lite0 ImageNet features, reference from
HAM10000 training-split images, windows from test-split images), with a finer grid: for each change and severity,
``--draws`` windows of ``--window`` different test images are transformed and scored; a severity counts as
detected when the median window alarms. Contamination mixes the out-of-distribution photos of
../shared/data/negatives into otherwise clean windows.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from lesion_monitoring.drift import DriftBatch, compute_drift
from lesion_monitoring.records import from_container_record
from tests.monitoring import realdata as rd

GRID = {
    "colour_cast": (0.02, 0.03, 0.04, 0.06, 0.08),
    "blur": (0.5, 0.75, 1.0, 1.5),
    "squash": (0.98, 0.9, 0.8, 0.7, 0.6),
    # The model's weakest acquisition shift (benchmarks/training/RESULTS.md): brighter mid-tones.
    "gamma": (0.95, 0.9, 0.85, 0.8, 0.7),
}
CONTAMINATION = (0.05, 0.1, 0.2, 0.3, 0.5)


def _preds(data: rd.Embedded, reference: dict[str, Any]) -> list[Any]:
    return [from_container_record(r) for r in rd.capture_records(data, reference)]


def _score(preds: list[Any], reference: dict[str, Any], min_records: int = 100) -> dict[str, Any]:
    return compute_drift(DriftBatch().extend(preds), reference, alpha=0.001, min_records=min_records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=int, default=300)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--changes", nargs="+", choices=sorted(GRID), default=list(GRID),
                        help="the acquisition changes to score (default: all)")
    args = parser.parse_args()
    t0 = time.time()
    splits = rd.ham_splits()
    rng = np.random.default_rng(2026)
    ref_ids = sorted(rng.choice(splits["train"], args.reference, replace=False))
    test_ids = list(rng.permutation(splits["test"]))[: args.window * args.draws]
    embedder = rd.Embedder()
    reference = rd.build_reference(rd.embed(embedder, ref_ids, [rd.load_ham(i) for i in ref_ids]))
    images = [rd.load_ham(i) for i in test_ids]
    clean = _preds(rd.embed(embedder, test_ids, images), reference)
    windows = [range(d * args.window, (d + 1) * args.window) for d in range(args.draws)]

    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; reference {args.reference} train-split images, windows of "
          f"{args.window} test-split images, {args.draws} draws, alpha 0.001, threshold 1.0\n")
    base = [_score([clean[i] for i in w], reference)["drift_score"] for w in windows]
    print(f"unshifted windows: DriftScore {', '.join(f'{s:.2f}' for s in base)}\n")

    print("| change | severity | DriftScore median (min-max) | detected | embedding | prediction | confidence | "
          "image (strongest) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    smallest: dict[str, Any] = {}
    for name, severities in ((n, GRID[n]) for n in args.changes):
        fn, _, unit = rd.SHIFTS[name]
        for s in severities:
            shifted = _preds(rd.embed(embedder, test_ids, [fn(im, s) for im in images]), reference)
            results = [_score([shifted[i] for i in w], reference) for w in windows]
            scores = [r["drift_score"] for r in results]
            fam = {f: float(np.median([r["tests"][f]["score"] for r in results])) for f in results[0]["tests"]}
            worst = results[0]["tests"]["image"].get("worst")
            detected = float(np.median(scores)) >= 1.0
            if detected and name not in smallest:
                smallest[name] = s
            print(f"| {name} ({unit}) | {s:g} | {np.median(scores):.2f} ({min(scores):.2f}-{max(scores):.2f}) | "
                  f"{'yes' if detected else 'no'} | {fam['embedding']:.2f} | {fam['prediction']:.2f} | "
                  f"{fam['confidence']:.2f} | {fam['image']:.2f} ({worst}) |", flush=True)

    negatives = rd.negative_images()
    neg = _preds(rd.embed(embedder, [n for n, _ in negatives], [im for _, im in negatives]), reference)
    alone = _score(neg, reference, min_records=20)
    families = ", ".join(f"{k} {v['score']:.2f}" for k, v in sorted(alone["tests"].items()))
    print(f"\nnegatives alone ({len(neg)} photos, MIN_RECORDS 20): DriftScore {alone['drift_score']:.2f} "
          f"({families})\n")
    print("| negatives in a window | DriftScore median (min-max) | detected |")
    print("| --- | --- | --- |")
    for frac in CONTAMINATION:
        k = max(1, round(frac * args.window))
        scores = []
        for d, w in enumerate(windows):
            # More negatives than there are photos: some repeat (a clinic sending the same kinds of picture).
            pick = np.random.default_rng(d).choice(len(neg), k, replace=k > len(neg))
            scores.append(_score([clean[i] for i in list(w)[: args.window - k]] + [neg[i] for i in pick],
                                 reference)["drift_score"])
        print(f"| {frac:.0%} ({k}) | {np.median(scores):.2f} ({min(scores):.2f}-{max(scores):.2f}) | "
              f"{'yes' if np.median(scores) >= 1 else 'no'} |", flush=True)
    print(f"\nsmallest detected: {smallest}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
