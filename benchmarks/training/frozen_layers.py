"""The layers that do not train, a few images at a time: the job's training loop with and without it, as a ratio.

``training_image.fit.train_epoch`` as the deployed recipe runs it (``trainable_from=net._blocks.6``, batch 32,
the data pipeline with acquisition augmentation), in its two phases: fine-tuning, where the stem and blocks 0-5
stay at their pretrained values, and the head-only epoch, where the whole backbone does. "Whole batch" runs those
layers on all 32 images at once (``micro_batch=0``, the loop before this change); "micro-batched" runs them 4
at a time (what the job does on a CPU: ``eval_batch_size=auto``). The two give the same results
(``tests/training/test_frozen_micro_batch.py``); only the time differs.

Measurements alternate (whole, micro-batched, whole, ...) so that other load hits both alike; the first
``--warmup`` steps of each are not timed. Reported: median images/s per setting and phase, and the ratios.

    python -m benchmarks.training.frozen_layers [--image-size 256x192] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence

import torch
from torch import nn

from benchmarks.training.throughput import _cpu_name, _samples, _Timer, emit, loop_arguments
from lesionml.models import build_model, freeze_backbone, leading_backbone_params, param_groups
from lesionml.preprocessing import PreprocessingSpec
from training_image.config import build_config
from training_image.data import ShardedSampler, TrainDataset, TrainImages, make_loader
from training_image.fit import lr_lambdas, train_epoch
from training_image.runtime import amp_dtype

TRAINABLE_FROM = "net._blocks.6"


def run(samples: Sequence[object], args: argparse.Namespace, frozen: bool, micro_batch: int) -> float:
    """Images/s of one phase of the job's loop."""
    cfg = build_config({
        "arch": "efficientnet_lite0", "batch_size": str(args.batch), "image_size": args.image_size,
        "trainable_from": TRAINABLE_FROM, "freeze_epochs": "1" if frozen else "0", "epochs": "10",
        "amp": args.amp,
    })
    height, width = cfg.image_size
    device = torch.device("cpu")
    torch.manual_seed(0)
    model, info = build_model(cfg.arch, 7, True, (height, width))
    spec = PreprocessingSpec(arch=cfg.arch, height=height, width=width, mean=info.mean, std=info.std)
    images = TrainImages(samples, spec, cfg.cache_images, torch.get_num_threads())  # type: ignore[arg-type]
    dataset = TrainDataset(images, spec, cfg.seed, cfg.min_crop_scale, cfg.acquisition_aug)
    sampler = ShardedSampler(len(dataset), None, cfg.seed, 0, 1)
    loader = make_loader(dataset, cfg.batch_size, sampler, 0, device, drop_last=True)
    always = leading_backbone_params(model, cfg.trainable_from)
    freeze_backbone(model, False, always)
    model = model.to(memory_format=torch.channels_last)
    groups = param_groups(model, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(groups, steps, cfg, cfg.epochs))
    timer = _Timer(cfg.batch_size, args.warmup)
    train_epoch(
        model, model.head if frozen else model, frozen, loader, opt, sched, None, nn.CrossEntropyLoss(), device,
        amp_dtype(cfg.amp, device), True, steps, lambda *_: timer.step(), always, None, micro_batch,
    )
    return timer.rate()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print (and optionally save) the result."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    loop_arguments(p, "256x192")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--amp", default="auto", help="the job's amp hyperparameter (auto: bf16 where fast)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.batch * (args.warmup + args.steps)
    samples = _samples(args.metadata, args.images, n)
    if len(samples) < n:
        p.error(f"need {n} images, found {len(samples)}")
    runs: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for phase, frozen in (("fine_tuning", False), ("head_only", True)):
            for setting, mb in (("whole_batch", 0), ("micro_batched", args.micro_batch)):
                key = f"{phase}/{setting}"
                runs.setdefault(key, []).append(run(samples, args, frozen, mb))
                print(f"repeat {rep + 1}/{args.repeats} {key:26s} {runs[key][-1]:7.2f} img/s", flush=True)
    median = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "image_size": args.image_size, "batch": args.batch, "micro_batch": args.micro_batch,
        "threads": args.threads, "timed_steps": args.steps, "repeats": args.repeats,
        "autocast": str(amp_dtype(args.amp, torch.device("cpu"))),
        "images_per_sec": {k: round(v, 2) for k, v in median.items()},
        "ratio": {
            phase: round(median[f"{phase}/micro_batched"] / median[f"{phase}/whole_batch"], 3)
            for phase in ("fine_tuning", "head_only")
        },
        "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "cpu": _cpu_name(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
