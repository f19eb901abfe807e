"""Out-of-distribution flagging: how many non-dermoscopic pictures are caught, how many real lesions are not.

Runs the server's own predictor in-process (same code as behind /invocations) over

* every file of ``../shared/data/negatives`` (negatives.csv says which are non-dermoscopic pictures), and
* held-out HAM10000 images (``../shared/data/ham10000/images``, minus the bundled sample the test model's
  reference was built from), a fixed random subset, and
* with ``--archive``, the second archive's test split as :mod:`benchmarks.training.quality` splits it: how many of
  another clinic's real lesions are flagged, and how many of the melanomas the model misses at its threshold are
  (a clinic whose pictures did not train the model is warned picture by picture only by those flags).

Run: ``.venv/bin/python -m benchmarks.inference.bench_ood [--model-dir [NAME=]DIR ...] [--ham 2000]`` (default model:
built by tests/inference/model_factory.py). Writes ``benchmarks/inference/results/ood.json``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
OOD_ROW = "reject / out-of-distribution"  # negatives.csv's expected behaviour of a non-dermoscopic picture


def held_out_ham(n: int) -> list[Path]:
    """``n`` HAM10000 pictures drawn at random (seed 0), none of them the bundled sample's."""
    sample = {p.name for p in (REPO / "data" / "sample" / "images").glob("*.jpg")}
    paths = sorted(p for p in (SHARED / "ham10000" / "images").glob("*.jpg") if p.name not in sample)
    return [paths[i] for i in np.random.default_rng(0).choice(len(paths), min(n, len(paths)), replace=False)]


def archive_flags(run: Any, archive: Path) -> dict[str, Any]:
    """Flags on the second archive's test split: overall, on melanomas, on melanomas missed at the threshold."""
    from benchmarks.training.quality import job_splits
    from benchmarks.training.shifts import test_set

    splits, folders = job_splits(SHARED / "ham10000", archive)
    flagged: collections.Counter[str] = collections.Counter()
    for path, label in test_set([r for r in splits["test"] if r.get("source") == archive.name], folders, 0):
        _, pred = run(path.read_bytes())
        assert pred is not None
        mel = label == "mel"
        kinds = ["pictures"] + (["melanomas"] if mel else []) + (
            ["melanomas_missed"] if mel and not pred["melanoma"]["at_risk"] else [])
        flagged.update(kinds)
        if pred["ood"]["flag"]:
            flagged.update(k + "_flagged" for k in kinds)
    return {k: flagged[k] for k in ("pictures", "pictures_flagged", "melanomas", "melanomas_flagged",
                                    "melanomas_missed", "melanomas_missed_flagged")}


def evaluate(model_dir: Path, cache_dir: Path, ham: int, archive: Path | None = None) -> dict[str, Any]:
    """Flag counts for one model directory."""
    from inference_image.artifacts import load_artifacts
    from inference_image.imaging import ImageRequestError
    from inference_image.predictor import Predictor
    from inference_image.runtime import load_backend, prepare
    from inference_image.settings import Settings

    settings = Settings.from_env({"SM_MODEL_DIR": str(model_dir), "SERVING_CACHE_DIR": str(cache_dir)})
    art = load_artifacts(model_dir)
    predictor = Predictor(art, load_backend(prepare(art, "onnx", cache_dir), art, 1), settings)

    def run(data: bytes) -> tuple[int, dict[str, Any] | None]:
        try:
            return 200, predictor.predict([data], capture=False)["predictions"][0]
        except ImageRequestError as e:
            return e.status, None

    rows = list(csv.DictReader((SHARED / "negatives" / "negatives.csv").read_text().splitlines()))
    negatives = {}
    for row in rows:
        status, pred = run((SHARED / "negatives" / row["file"]).read_bytes())
        negatives[row["file"]] = {
            "expected": row["expected_behaviour"], "status": status,
            "flag": None if pred is None else pred["ood"]["flag"],
            "score": None if pred is None else pred["ood"]["score"],
            "reasons": None if pred is None else pred["ood"]["reasons"],
        }
    non_derm = {k: v for k, v in negatives.items() if v["expected"] == OOD_ROW}
    photos = {r["file"] for r in rows if "photo" in r["kind"] and r["expected_behaviour"].startswith("reject")}

    pick = held_out_ham(ham)
    reasons: collections.Counter[str] = collections.Counter()
    scores, flagged = [], []
    t0 = time.perf_counter()
    for path in pick:
        _, pred = run(path.read_bytes())
        assert pred is not None
        scores.append(pred["ood"]["score"])
        if pred["ood"]["flag"]:
            flagged.append(path.name)
            reasons.update(r.split(":")[0] for r in pred["ood"]["reasons"])
    out: dict[str, Any] = {
        "model_version": art.version,
        "reference_images": art.reference.get("n"),
        "non_dermoscopic": {
            "files": len(non_derm),
            "flagged": sum(1 for v in non_derm.values() if v["flag"]),
            "refused_4xx": sum(1 for v in non_derm.values() if v["status"] != 200),
            "missed": sorted(k for k, v in non_derm.items() if v["status"] == 200 and not v["flag"]),
            "natural_photos_flagged": f"{sum(1 for k in photos if negatives[k]['flag'])}/{len(photos)}",
        },
        "ham10000_held_out": {
            "images": len(pick), "flagged": len(flagged), "false_flag_rate": round(len(flagged) / len(pick), 4),
            "reasons": dict(reasons), "score_p50": round(float(np.median(scores)), 3),
            "score_p99": round(float(np.percentile(scores, 99)), 3), "flagged_images": flagged[:50],
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "negatives": negatives,
    }
    if archive is not None:
        out["second_archive_test"] = archive_flags(run, archive)
    return out


def main(argv: list[str] | None = None) -> int:
    """Evaluate each model directory and write the JSON results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", action="append", default=[],
                    help="model directory, optionally named: [NAME=]DIR (repeatable)")
    ap.add_argument("--ham", type=int, default=2000, help="held-out HAM10000 images")
    ap.add_argument("--archive", type=Path, help="also flag this second source's test split (e.g. "
                    "../shared/data/isic_archive)")
    ap.add_argument("--out", type=Path, default=RESULTS / "ood.json")
    args = ap.parse_args(argv)
    if not (SHARED / "negatives" / "negatives.csv").is_file():
        print("../shared/data is not present", file=sys.stderr)
        return 1
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for spec in args.model_dir:
            name, _, path = spec.rpartition("=")
            dirs[name or path] = Path(path)
        if not dirs:
            from tests.inference.model_factory import build_model_dir

            dirs = {"test model (tests/inference/model_factory.py)": build_model_dir(Path(tmp) / "model")}
        for name, d in dirs.items():
            results[name] = evaluate(d, Path(tmp) / "cache", args.ham, args.archive)
            summary = {k: v for k, v in results[name].items() if k != "negatives"}
            summary["ham10000_held_out"] = {k: v for k, v in summary["ham10000_held_out"].items()
                                            if k != "flagged_images"}
            print(name, json.dumps(summary, indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
