"""Models side by side on the second source's split, with paired bootstrap intervals of their differences.

Made for the leave-one-source-out test (benchmarks/training/RESULTS.md, "Mixing feature styles"): models trained
on HAM10000 alone are scored on the second archive, which none of them saw, through the serving path
(:class:`benchmarks.training.shifts.Model`), clean. Each model after the first gets a 95 % paired bootstrap interval
of its difference from the first in melanoma AUC and macro AUC: the same resampled pictures for both, melanomas and
others resampled separately, as :func:`benchmarks.training.shifts.drop_intervals` does for shifts::

    python -m benchmarks.training.unseen_archive --model h42=/tmp/h42/job/model --model m42=/tmp/m42/job/model \\
        --out unseen_archive_result.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.training.quality import job_splits
from benchmarks.training.shifts import BOOTSTRAP, Model, encoded, figures, matched_threshold, test_set
from lesionml.labels import class_index, melanoma_index
from lesionml.metrics import macro_auc_ovr, roc_auc

ROOT = Path(__file__).resolve().parents[2]

# Diagnostic views of the stored pictures, to ask what separates the archives (none is something serving could do
# without knowing each picture's history): the second archive's pictures were squashed to 512x512 from their
# original aspect, which is unknown per picture; most dermoscopy cameras give 4:3.
VIEWS = {
    "as_stored": None,
    "unsquash_4x3": lambda im: im.resize((im.width, im.width * 3 // 4), Image.Resampling.BICUBIC),
    "centre_75": lambda im: im.crop((im.width // 8, im.height // 8, im.width * 7 // 8, im.height * 7 // 8)),
    "mirror_padded_133": lambda im: Image.fromarray(
        np.pad(np.asarray(im), ((im.height // 6, im.height // 6), (im.width // 6, im.width // 6), (0, 0)), "reflect")
    ),
}


def probabilities(
    models: dict[str, Model], items: list[tuple[Path, str]], view: str = "as_stored",
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The labels of ``items`` and each model's class probabilities for them, seen as :data:`VIEWS` ``view``."""
    first = next(iter(models.values()))
    labels = np.array([class_index(first.label_set)[label] for _, label in items])
    change = VIEWS[view]
    pictures = [f.read_bytes() if change is None else encoded(change(Image.open(f).convert("RGB"))) for f, _ in items]
    return labels, {name: m.probabilities(pictures) for name, m in models.items()}


def clean_figures(models: dict[str, Model], labels: np.ndarray, probs: dict[str, np.ndarray]) -> dict[str, Any]:
    """:func:`benchmarks.training.shifts.figures` of each model."""
    out = {}
    for name, m in models.items():
        mel = melanoma_index(m.label_set)
        out[name] = figures(m, labels, probs[name], matched_threshold(labels == mel, probs[name][:, mel]))
    return out


def difference_intervals(
    labels: np.ndarray, mel: int, base: np.ndarray, other: np.ndarray, n: int = BOOTSTRAP, seed: int = 0,
) -> dict[str, list[float]]:
    """95 % paired bootstrap intervals of ``other`` minus ``base`` (probabilities ``(N, C)``) in melanoma and macro
    AUC."""
    rng = np.random.default_rng(seed)
    is_mel = labels == mel
    pos, neg = np.flatnonzero(is_mel), np.flatnonzero(~is_mel)
    mel_auc, macro = np.empty(n), np.empty(n)
    for i in range(n):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        y = labels[idx]
        mel_auc[i] = roc_auc(y == mel, other[idx, mel]) - roc_auc(y == mel, base[idx, mel])
        macro[i] = macro_auc_ovr(y, other[idx])[0] - macro_auc_ovr(y, base[idx])[0]
    return {"melanoma_auc": [round(float(v), 4) for v in np.percentile(mel_auc, [2.5, 97.5])],
            "macro_auc": [round(float(v), 4) for v in np.percentile(macro, [2.5, 97.5])]}


def report(result: dict[str, Any], out: Path | None) -> None:
    """Print ``result`` as JSON, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=2, default=float)
    if out:
        out.write_text(text + "\n")
    print(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Score every ``--model`` on the second source's split; intervals against the first."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR", help="a model directory; the "
                   "first is the baseline")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000")
    p.add_argument("--second-source", type=Path, default=ROOT.parent / "shared" / "data" / "isic_archive")
    p.add_argument("--split", choices=("test", "validation"), default="test")
    p.add_argument("--view", choices=sorted(VIEWS), default="as_stored", help="a diagnostic view of the pictures")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    dirs = dict(spec.partition("=")[::2] for spec in args.model)
    missing = [d for d in dirs.values() if not (Path(d) / "model.ts").is_file()]
    if missing or len(dirs) != len(args.model):
        print(f"error: each --model is NAME=DIR with a distinct NAME and DIR/model.ts; not so: {missing or args.model}",
              file=sys.stderr)
        return 2
    splits, folders = job_splits(args.data, args.second_source)
    source = args.second_source.name
    items = test_set([r for r in splits[args.split] if r.get("source") == source], folders, 0)
    models = {name: Model(Path(d)) for name, d in dirs.items()}
    labels, probs = probabilities(models, items, args.view)
    base = next(iter(models))
    mel = melanoma_index(models[base].label_set)
    result: dict[str, Any] = {
        "scored_on": f"{source} {args.split} split, {len(items)} pictures, clean, through the serving path",
        "view": args.view,
        "n_melanoma": int((labels == mel).sum()),
        "models": dirs,
        "figures": clean_figures(models, labels, probs),
        "difference_from_" + base + "_95": {
            name: difference_intervals(labels, mel, probs[base], probs[name]) for name in models if name != base
        },
    }
    report(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
