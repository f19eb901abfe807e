"""Acquisition shifts: a model's figures on its test splits under each shift of :data:`lesionml.acquisition.SHIFTS`.

Every test image (HAM10000's lesion split, and the second source's held-out part) is changed by a shift at its
stated severity, encoded losslessly (PNG; the JPEG shift's own bytes are JPEG) and scored through the serving
path: :func:`inference_image.imaging.decode_image`, :class:`inference_image.transform.ModelInputBuilder` and the
model directory's ``model.ts``, with the threshold and decision offsets its ``metrics.json`` exports. Per set and
shift: macro AUC, melanoma AUC, melanoma sensitivity and specificity at the exported threshold, balanced accuracy.

Target on every shift: melanoma sensitivity within 0.05 of the clean figure and melanoma AUC within 0.03.

    python -m benchmarks.training.shifts --model before=/tmp/rob-A/job/model --model after=/tmp/rob-B/job/model \\
        --data ../shared/data/ham10000 --second-source ../shared/data/isic_archive --others 300 \\
        --out benchmarks.training.shifts_result.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.training.quality import job_splits
from inference_image.imaging import decode_image
from inference_image.transform import ModelInputBuilder
from lesionml.acquisition import SEVERITIES, SHIFTS, Shift
from lesionml.labels import class_index, melanoma_index, parse_classes_document
from lesionml.metrics import (
    balanced_accuracy,
    confusion_matrix,
    decide,
    macro_auc_ovr,
    roc_auc,
    sensitivity_specificity,
)
from lesionml.preprocessing import read_spec

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"melanoma_sensitivity": 0.05, "melanoma_auc": 0.03}
MAX_PIXELS = 100_000_000


def test_set(
    rows: list[dict[str, str]], folders: dict[str, Path], others: int, seed: int = 0
) -> list[tuple[Path, str]]:
    """``(file, label)`` of a test split: every melanoma, and ``others`` of the other images drawn at random
    (all of them for 0)."""
    def file_of(r: dict[str, str]) -> Path:
        source, _, rel = r["path"].partition("/")
        return folders[source] / rel if rel and source in folders else next(iter(folders.values())) / r["path"]

    items = [(file_of(r), r["label"]) for r in rows]
    mel = [it for it in items if it[1] == "mel"]
    rest = [it for it in items if it[1] != "mel"]
    if not others or others >= len(rest):
        return items
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(rest), size=others, replace=False).tolist())
    return mel + [rest[i] for i in picked]


def encoded(img: Image.Image) -> bytes:
    """Lossless bytes of a shifted picture, as an upload would carry it (a JPEG stays the JPEG it became)."""
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class Model:
    """A model directory scored the way serving scores it."""

    def __init__(self, model_dir: Path) -> None:
        self.spec = read_spec(model_dir / "preprocessing.json")
        self.label_set, self.classes = parse_classes_document(json.loads((model_dir / "classes.json").read_text()))
        metrics = json.loads((model_dir / "metrics.json").read_text())
        self.threshold = float(metrics["melanoma_threshold"])
        self.offsets = np.array([float(metrics.get("decision_offsets", {}).get(c, 0.0)) for c in self.classes])
        self.ts = torch.jit.load(str(model_dir / "model.ts"), map_location="cpu").eval()
        self.inputs = ModelInputBuilder(self.spec)

    @torch.no_grad()
    def probabilities(self, pictures: list[bytes], batch: int = 4) -> np.ndarray:
        target = (self.spec.width, self.spec.height)
        out = []
        for i in range(0, len(pictures), batch):
            xs = [self.inputs.model_input(decode_image(b, MAX_PIXELS, target))[0] for b in pictures[i : i + batch]]
            x = torch.from_numpy(np.stack(xs))
            probs = self.ts.predict(x)[0] if hasattr(self.ts, "predict") else torch.softmax(self.ts(x), dim=1)
            out.append(probs.float().numpy())
        return np.concatenate(out).astype(np.float64)


def figures(model: Model, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The benchmark's figures for one set under one shift."""
    mel = melanoma_index(model.label_set)
    is_mel = labels == mel
    sens, spec = sensitivity_specificity(is_mel, probs[:, mel], model.threshold)
    cm = confusion_matrix(labels, decide(probs, model.offsets), len(model.classes))
    return {"macro_auc": macro_auc_ovr(labels, probs)[0], "melanoma_auc": roc_auc(is_mel, probs[:, mel]),
            "melanoma_sensitivity": sens, "melanoma_specificity": spec, "balanced_accuracy": balanced_accuracy(cm)}


def run_set(models: dict[str, Model], items: list[tuple[Path, str]], shifts: dict[str, Shift]) -> dict[str, Any]:
    """Every model's figures on one set, clean and under each shift (each picture shifted once for all models)."""
    first = next(iter(models.values()))
    index = class_index(first.label_set)
    labels = np.array([index[label] for _, label in items])
    originals = [Image.open(f).convert("RGB") for f, _ in items]
    out: dict[str, Any] = {name: {} for name in models}
    for shift_name, shift in {"clean": lambda im: im, **shifts}.items():
        t0 = time.time()
        pictures = [encoded(shift(im)) for im in originals]
        for name, model in models.items():
            out[name][shift_name] = figures(model, labels, model.probabilities(pictures))
        print(f"  {shift_name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def verdict(per_shift: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Whether every shift holds melanoma sensitivity and AUC within :data:`TOLERANCE` of the clean figures."""
    clean = per_shift["clean"]
    drops = {s: {k: round(clean[k] - f[k], 4) for k in TOLERANCE} for s, f in per_shift.items() if s != "clean"}
    failing = sorted(s for s, d in drops.items() if any(d[k] > TOLERANCE[k] for k in TOLERANCE))
    worst = {k: max(d[k] for d in drops.values()) for k in TOLERANCE} if drops else {}
    return {"met": not failing, "failing_shifts": failing, "worst_drop": worst}


def main(argv: Sequence[str] | None = None) -> int:
    """Score each ``--model`` on the test splits under every shift; exit 0 when the last model meets the target."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR", help="a model directory")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000")
    p.add_argument("--second-source", type=Path, default=ROOT.parent / "shared" / "data" / "isic_archive")
    p.add_argument("--others", type=int, default=0,
                   help="non-melanoma images drawn per set, beside every melanoma (0: the whole split)")
    p.add_argument("--shift", action="append", choices=sorted(SHIFTS), help="only these shifts (repeatable)")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = p.parse_args(argv)
    models = {}
    for spec in args.model:
        name, eq, folder = spec.partition("=")
        if not eq or not (Path(folder) / "model.ts").is_file():
            p.error(f"--model {spec}: expected NAME=DIR with DIR holding model.ts")
        models[name] = Model(Path(folder))
    second = args.second_source if args.second_source and args.second_source.is_dir() else None
    splits, folders = job_splits(args.data, second)
    sets = {"ham10000": [r for r in splits["test"] if r.get("source", "ham10000") == "ham10000"]}
    if second is not None:
        sets[second.name] = [r for r in splits["test"] if r.get("source") == second.name]
    shifts = {k: SHIFTS[k] for k in args.shift} if args.shift else SHIFTS
    result: dict[str, Any] = {"others": args.others, "severities": {k: SEVERITIES[k] for k in shifts},
                              "tolerance": TOLERANCE, "models": {n: {"threshold": m.threshold} for n, m in
                                                                 models.items()}, "sets": {}}
    for set_name, rows in sets.items():
        items = test_set(rows, folders, args.others)
        print(f"{set_name}: {len(items)} images", file=sys.stderr, flush=True)
        per_model = run_set(models, items, shifts)
        result["sets"][set_name] = {"n": len(items), "n_melanoma": sum(label == "mel" for _, label in items),
                                    **{n: {"figures": f, "verdict": verdict(f)} for n, f in per_model.items()}}
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        args.out.write_text(text + "\n")
    for set_name, block in result["sets"].items():
        for name in models:
            f = block[name]["figures"]
            print(f"\n{set_name} / {name}: " + ("met" if block[name]["verdict"]["met"] else "NOT met"))
            print(f"{'shift':20} {'macro AUC':>9} {'mel AUC':>8} {'mel sens':>8} {'mel spec':>8} {'bal acc':>8}")
            for shift_name, v in f.items():
                print(f"{shift_name:20} {v['macro_auc']:9.3f} {v['melanoma_auc']:8.3f} {v['melanoma_sensitivity']:8.3f}"
                      f" {v['melanoma_specificity']:8.3f} {v['balanced_accuracy']:8.3f}")
    last = list(models)[-1]
    return 0 if all(block[last]["verdict"]["met"] for block in result["sets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
