"""A new clinic's norm statistics: re-estimate a model's batch-norm statistics on unlabelled pictures of an archive it
never saw (adaptive batch normalisation), and score it on that archive's test split.

No labels and no gradient: the pictures pass once through the serving path's preprocessing
(:func:`inference_image.imaging.decode_image`, :class:`inference_image.transform.ModelInputBuilder`), and the norm
layers' running mean and variance become their average over those pictures. ``--layers trained`` replaces only the
layers whose statistics fine-tuning estimated (the model's ``trainable_from`` onwards; the fixed early layers keep
ImageNet's, as in training); ``--layers all`` replaces every one. The adapted weights are exported as the job exports
them (``model.ts`` with the same views), into a copy of the model directory that keeps its threshold and offsets.

Every ``--score`` model directory (and each adapted one) is then scored on the second source's whole test split,
clean, as :mod:`benchmarks.training.shifts` scores it::

    python -m benchmarks.training.adapt_norm --model /tmp/h42/job/model --layers trained --layers all \\
        --score f42=/tmp/f42/job/model --out adapt_norm_result.json

Exploratory (benchmarks/training/RESULTS.md, "An archive the model never saw"): the pipeline does not adapt models.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.training.quality import job_splits
from benchmarks.training.shifts import MAX_PIXELS, Model, test_set
from benchmarks.training.unseen_archive import clean_figures, probabilities, report
from inference_image.imaging import decode_image
from inference_image.transform import ModelInputBuilder
from lesionml.models import build_model, export_torchscript, fixed_norm_layers, leading_backbone_params, view_count
from lesionml.preprocessing import PreprocessingSpec, read_spec

ROOT = Path(__file__).resolve().parents[2]


def inputs(files: Sequence[Path], spec: PreprocessingSpec, batch: int) -> list[torch.Tensor]:
    """The serving path's model inputs of ``files``, in batches."""
    builder = ModelInputBuilder(spec)
    target = (spec.width, spec.height)
    xs = [builder.model_input(decode_image(f.read_bytes(), MAX_PIXELS, target))[0] for f in files]
    return [torch.from_numpy(np.stack(xs[i : i + batch])) for i in range(0, len(xs), batch)]


def adapt_norm_statistics(model: nn.Module, batches: Sequence[torch.Tensor], norms: Sequence[nn.Module]) -> None:
    """Replace ``norms``' running statistics by their average over ``batches`` (the rest of ``model`` in eval mode).

    One pass, as AdaBN does it: while the statistics are gathered, the adapted layers before a layer normalise
    with each batch's own statistics, so what a layer sees then differs slightly from what it sees once adapted.
    """
    model.eval()
    for m in norms:
        assert isinstance(m, nn.modules.batchnorm._BatchNorm)
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch, not an exponential one
        m.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


def adapted_copy(model_dir: Path, out_dir: Path, layers: str, files: Sequence[Path], batch: int) -> Path:
    """``model_dir`` copied to ``out_dir`` with ``model.pt``/``model.ts`` adapted on ``files``."""
    metrics = json.loads((model_dir / "metrics.json").read_text())
    hps = metrics["hyperparameters"]
    spec = read_spec(model_dir / "preprocessing.json")
    classes = metrics["classes"]
    model, _ = build_model(hps["arch"], len(classes), pretrained=False, image_size=(spec.height, spec.width))
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu"))
    fixed = set(fixed_norm_layers(model, leading_backbone_params(model, hps.get("trainable_from", ""))))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and (layers == "all" or m not in fixed)]
    t0 = time.time()
    adapt_norm_statistics(model, inputs(files, spec, batch), norms)
    print(f"  {layers}: {len(norms)} norm layers adapted on {len(files)} pictures in {time.time() - t0:.0f} s",
          file=sys.stderr, flush=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(model_dir, out_dir)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir / "model.pt")
    views = view_count(spec.height, spec.width) if hps.get("tta") == "dihedral" else 1
    export_torchscript(model, torch.zeros(1, 3, spec.height, spec.width), str(out_dir / "model.ts"), tta=views > 1)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Adapt ``--model`` once per ``--layers``, score every model on the second source's test split."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the model directory to adapt")
    p.add_argument("--layers", action="append", choices=("trained", "all"), required=True)
    p.add_argument("--score", action="append", default=[], metavar="NAME=DIR", help="another model to score beside")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000")
    p.add_argument("--second-source", type=Path, default=ROOT.parent / "shared" / "data" / "isic_archive")
    p.add_argument("--work", type=Path, default=Path("/tmp/adapt_norm"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    splits, folders = job_splits(args.data, args.second_source)
    source = args.second_source.name
    train = [f for f, _ in test_set([r for r in splits["train"] if r.get("source") == source], folders, 0)]
    test = test_set([r for r in splits["test"] if r.get("source") == source], folders, 0)
    dirs = {"unadapted": args.model}
    for layers in args.layers:
        dirs[f"adapted_{layers}"] = adapted_copy(args.model, args.work / layers, layers, train, args.batch)
    for spec in args.score:
        name, _, folder = spec.partition("=")
        dirs[name] = Path(folder)
    models = {k: Model(v) for k, v in dirs.items()}
    result: dict[str, Any] = {
        "adapted_on": f"{source} train split, {len(train)} pictures, unlabelled",
        "scored_on": f"{source} test split, {len(test)} pictures",
        "n_melanoma": sum(label == "mel" for _, label in test),
        "models": {k: str(v) for k, v in dirs.items()},
        "figures": clean_figures(models, *probabilities(models, test)),
    }
    report(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
