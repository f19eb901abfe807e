"""Training data pipeline cost per image: the deployed recipe against the pipeline before issue 20, as a ratio.

One training sample is what ``TrainDataset.__getitem__`` does: take the cached decoded image, crop, flip, colour
jitter and normalise it. The deployed recipe (template.yaml's hyperparameters) adds the acquisition augmentation
(``acquisition_aug``) and Shades of Gray colour constancy. Both pipelines run on the same images in one process,
alternating (A, B, A, B, ...), single-threaded as a loader worker is; reported are the median milliseconds per
image and the ratio. Run it with and without ``--keep-freed-memory`` (the C allocator setting the training job
applies, :func:`lesionml.allocator.keep_freed_memory`) to see what the allocator costs.

    python -m benchmarks.training.pipeline_cost --images ../shared/data/ham10000 [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.training.quality import CPU_HPS
from benchmarks.training.throughput import emit
from lesionml.allocator import keep_freed_memory
from lesionml.archs import norm_mean_std
from lesionml.preprocessing import PreprocessingSpec
from training_image.config import build_config
from training_image.data import Sample, TrainDataset, TrainImages

ROOT = Path(__file__).resolve().parents[2]


def _pipelines(samples: list[Sample]) -> dict[str, TrainDataset]:
    cfg = build_config(CPU_HPS)
    height, width = cfg.image_size
    mean, std = norm_mean_std(cfg.arch)
    before = PreprocessingSpec(arch=cfg.arch, height=height, width=width, mean=mean, std=std)
    after = replace(before, color_constancy=cfg.color_constancy)
    out = {}
    for name, spec, acquisition in (("before", before, 0.0), ("deployed", after, cfg.acquisition_aug)):
        out[name] = TrainDataset(TrainImages(samples, spec, "true", 1), spec, cfg.seed, cfg.min_crop_scale,
                                 acquisition)
    return out


def _ms_per_image(dataset: TrainDataset, epoch: int) -> float:
    dataset.epoch = epoch
    t = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return 1000.0 * (time.perf_counter() - t) / len(dataset)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print (and optionally save) the result."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=ROOT / "data/sample/images", help="a folder of .jpg images")
    p.add_argument("--n", type=int, default=400, help="images per pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep-freed-memory", action="store_true", help="apply the training job's allocator setting")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    paths = sorted(args.images.rglob("*.jpg"))[: args.n]
    if not paths:
        p.error(f"no .jpg images under {args.images}")
    applied = keep_freed_memory() if args.keep_freed_memory else False
    pipelines = _pipelines([Sample(q.stem, q, 0, q.stem) for q in paths])
    for d in pipelines.values():
        _ms_per_image(d, 99)  # warm-up: caches filled, allocator settled
    runs: dict[str, list[float]] = {k: [] for k in pipelines}
    for rep in range(args.repeats):
        for name, d in pipelines.items():
            runs[name].append(_ms_per_image(d, rep))
            print(f"repeat {rep + 1}/{args.repeats} {name:9s} {runs[name][-1]:6.2f} ms/image", flush=True)
    median = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "images": len(paths), "image_size": CPU_HPS["image_size"], "keep_freed_memory": applied,
        "ms_per_image": {k: round(v, 2) for k, v in median.items()},
        "ratio": round(median["deployed"] / median["before"], 3),
        "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    return emit(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
