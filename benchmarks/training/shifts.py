"""Acquisition shifts: a model's figures on its test splits under each shift of :data:`lesionml.acquisition.SHIFTS`.

Every test image (HAM10000's lesion split, and the second source's held-out part) is changed by a shift at its
stated severity, encoded losslessly (PNG; the JPEG shift's own bytes are JPEG) and scored through the serving
path: :func:`inference_image.imaging.decode_image`, :class:`inference_image.transform.ModelInputBuilder` and the
model directory's ``model.ts``, with the threshold and decision offsets its ``metrics.json`` exports. Per set and
shift: macro AUC, melanoma AUC, melanoma sensitivity and specificity at the exported threshold, balanced accuracy,
and melanoma sensitivity at one operating point for every model (``melanoma_sensitivity_matched``: at the threshold
that gives the clean set a specificity of :data:`MATCHED_SPECIFICITY`), so that models whose exported thresholds sit
at different specificities can still be compared.

Target on every shift: melanoma sensitivity within 0.05 of the clean figure and melanoma AUC within 0.03.
With a few dozen melanomas per set, one melanoma moves sensitivity by about 0.02, so each drop also gets a 95 %
paired bootstrap interval (the same resampled images clean and shifted; melanomas and others resampled
separately, as the set was drawn). A shift is *clearly missed* when the whole interval lies beyond the tolerance.

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
    lowest_threshold_keeping,
    macro_auc_ovr,
    roc_auc,
    sensitivity_specificity,
)
from lesionml.preprocessing import read_spec

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"melanoma_sensitivity": 0.05, "melanoma_auc": 0.03}
BOOTSTRAP = 1000
MATCHED_SPECIFICITY = 0.70  # the training job's default melanoma_specificity_floor
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


def matched_threshold(is_mel: np.ndarray, clean_mel_probs: np.ndarray,
                      specificity: float = MATCHED_SPECIFICITY) -> float:
    """The lowest melanoma threshold at which the clean set keeps ``specificity``: one operating point for all
    models, whatever threshold each exported."""
    return lowest_threshold_keeping(clean_mel_probs[~is_mel], specificity)


def figures(model: Model, labels: np.ndarray, probs: np.ndarray, matched: float) -> dict[str, float]:
    """The benchmark's figures for one set under one shift; ``matched`` is the set's :func:`matched_threshold`."""
    mel = melanoma_index(model.label_set)
    is_mel = labels == mel
    sens, spec = sensitivity_specificity(is_mel, probs[:, mel], model.threshold)
    cm = confusion_matrix(labels, decide(probs, model.offsets), len(model.classes))
    return {"macro_auc": macro_auc_ovr(labels, probs)[0], "melanoma_auc": roc_auc(is_mel, probs[:, mel]),
            "melanoma_sensitivity": sens, "melanoma_specificity": spec, "balanced_accuracy": balanced_accuracy(cm),
            "melanoma_sensitivity_matched": sensitivity_specificity(is_mel, probs[:, mel], matched)[0]}


def run_set(
    models: dict[str, Model], items: list[tuple[Path, str]], shifts: dict[str, Shift],
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], np.ndarray]:
    """Every model's figures on one set, clean and under each shift (each picture shifted once for all models).

    Also returns each model's melanoma probabilities per shift and the labels, for :func:`drop_intervals`.
    """
    first = next(iter(models.values()))
    index = class_index(first.label_set)
    labels = np.array([index[label] for _, label in items])
    originals = [Image.open(f).convert("RGB") for f, _ in items]
    out: dict[str, Any] = {name: {} for name in models}
    mel_probs: dict[str, dict[str, np.ndarray]] = {name: {} for name in models}
    matched: dict[str, float] = {}
    for shift_name, shift in {"clean": lambda im: im, **shifts}.items():
        t0 = time.time()
        pictures = [encoded(shift(im)) for im in originals]
        for name, model in models.items():
            probs = model.probabilities(pictures)
            mel_probs[name][shift_name] = probs[:, melanoma_index(model.label_set)]
            if shift_name == "clean":
                matched[name] = matched_threshold(labels == melanoma_index(model.label_set), mel_probs[name]["clean"])
            out[name][shift_name] = figures(model, labels, probs, matched[name])
        print(f"  {shift_name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return out, mel_probs, labels == melanoma_index(first.label_set)


def drop_intervals(
    is_mel: np.ndarray, mel_probs: dict[str, np.ndarray], threshold: float, n: int = BOOTSTRAP, seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """95 % paired bootstrap intervals of each shift's drop (clean minus shifted) in melanoma sensitivity and AUC."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(is_mel), np.flatnonzero(~is_mel)
    draws = [np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)] for _ in range(n)]
    y = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]  # every draw: melanomas first, then the others
    clean = mel_probs["clean"]
    out = {}
    for shift_name, shifted in mel_probs.items():
        if shift_name == "clean":
            continue
        sens, auc = np.empty(n), np.empty(n)
        for i, idx in enumerate(draws):
            sens[i] = np.mean(clean[idx][y] >= threshold) - np.mean(shifted[idx][y] >= threshold)
            auc[i] = roc_auc(y, clean[idx]) - roc_auc(y, shifted[idx])
        out[shift_name] = {"melanoma_sensitivity": [round(float(v), 4) for v in np.percentile(sens, [2.5, 97.5])],
                           "melanoma_auc": [round(float(v), 4) for v in np.percentile(auc, [2.5, 97.5])]}
    return out


def verdict(per_shift: dict[str, dict[str, float]],
            intervals: dict[str, dict[str, list[float]]] | None = None) -> dict[str, Any]:
    """Whether every shift holds melanoma sensitivity and AUC within :data:`TOLERANCE` of the clean figures.

    With ``intervals``, also which shifts miss it beyond doubt (the interval's low end past the tolerance) and which
    meet it beyond doubt (its high end within).
    """
    clean = per_shift["clean"]
    drops = {s: {k: round(clean[k] - f[k], 4) for k in TOLERANCE} for s, f in per_shift.items() if s != "clean"}
    failing = sorted(s for s, d in drops.items() if any(d[k] > TOLERANCE[k] for k in TOLERANCE))
    worst = {k: max(d[k] for d in drops.values()) for k in TOLERANCE} if drops else {}
    out: dict[str, Any] = {"met": not failing, "failing_shifts": failing, "worst_drop": worst}
    if intervals is not None:
        out["clearly_missed"] = sorted(s for s, iv in intervals.items()
                                       if any(iv[k][0] > TOLERANCE[k] for k in TOLERANCE))
        out["clearly_met"] = sorted(s for s, iv in intervals.items()
                                    if all(iv[k][1] <= TOLERANCE[k] for k in TOLERANCE))
        out["drop_interval_95"] = intervals
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Score each ``--model`` on the test (or validation) splits under every shift; exit 0 when the last model
    meets the target."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR", help="a model directory")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000")
    p.add_argument("--second-source", type=Path, default=ROOT.parent / "shared" / "data" / "isic_archive")
    p.add_argument("--others", type=int, default=0,
                   help="non-melanoma images drawn per set, beside every melanoma (0: the whole split)")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="validation: to choose between models or settings without looking at the test split")
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
    rows_of = splits[args.split]
    sets = {"ham10000": [r for r in rows_of if r.get("source", "ham10000") == "ham10000"]}
    if second is not None:
        sets[second.name] = [r for r in rows_of if r.get("source") == second.name]
    shifts = {k: SHIFTS[k] for k in args.shift} if args.shift else SHIFTS
    result: dict[str, Any] = {
        "split": args.split, "others": args.others, "severities": {k: SEVERITIES[k] for k in shifts},
        "tolerance": TOLERANCE, "matched_specificity": MATCHED_SPECIFICITY,
        "models": {n: {"threshold": m.threshold} for n, m in models.items()}, "sets": {},
    }
    for set_name, rows in sets.items():
        items = test_set(rows, folders, args.others)
        print(f"{set_name}: {len(items)} images", file=sys.stderr, flush=True)
        per_model, mel_probs, is_mel = run_set(models, items, shifts)
        result["sets"][set_name] = {
            "n": len(items), "n_melanoma": int(is_mel.sum()),
            **{n: {"figures": f, "verdict": verdict(f, drop_intervals(is_mel, mel_probs[n], models[n].threshold))}
               for n, f in per_model.items()},
        }
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        args.out.write_text(text + "\n")
    for set_name, block in result["sets"].items():
        for name in models:
            f = block[name]["figures"]
            v = block[name]["verdict"]
            print(f"\n{set_name} / {name}: " + ("met" if v["met"] else "NOT met")
                  + f"; clearly missed: {', '.join(v['clearly_missed']) or 'none'}")
            print(f"{'shift':20} {'macro AUC':>9} {'mel AUC':>8} {'mel sens':>8} {'mel spec':>8} {'bal acc':>8}"
                  f" {'sens@sp' + format(MATCHED_SPECIFICITY, '.2f'):>10}  {'sens drop 95%':>16} {'AUC drop 95%':>16}")
            for shift_name, fig in f.items():
                iv = v["drop_interval_95"].get(shift_name)
                spans = (f"  [{iv['melanoma_sensitivity'][0]:6.3f},{iv['melanoma_sensitivity'][1]:6.3f}]"
                         f"  [{iv['melanoma_auc'][0]:6.3f},{iv['melanoma_auc'][1]:6.3f}]") if iv else ""
                print(f"{shift_name:20} {fig['macro_auc']:9.3f} {fig['melanoma_auc']:8.3f}"
                      f" {fig['melanoma_sensitivity']:8.3f} {fig['melanoma_specificity']:8.3f}"
                      f" {fig['balanced_accuracy']:8.3f} {fig['melanoma_sensitivity_matched']:10.3f}{spans}")
    last = list(models)[-1]
    return 0 if all(block[last]["verdict"]["met"] for block in result["sets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
