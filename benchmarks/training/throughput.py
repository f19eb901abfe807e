"""Training throughput: the project's training loop against a plain torchvision loop, as a ratio.

Both loops train the same network (built by ``lesionml.models.build_model``), on the same images, at the same
resolution, batch size, thread count and number of loader workers, with AdamW and cross-entropy. They differ in
what the project adds: its data pipeline (decoded-image cache, dermoscopy augmentation), channels-last memory
format, bf16 autocast where the hardware supports it, per-step LR schedule, gradient clipping, class weights.
The reference is the textbook loop: ImageFolder-style decoding with torchvision transforms, float32, NCHW.

Measurements alternate between the loops (A, B, A, B, ...) so that load from other processes hits both alike;
the first ``--warmup`` steps of each measurement are not timed. Reported: median images/s per loop and the
ratio project / reference (target >= 1.0).

    python -m benchmarks.training.throughput [--arch efficientnet_lite0] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lesionml.labels import class_index
from lesionml.models import build_model, param_groups
from lesionml.preprocessing import PreprocessingSpec
from training_image.config import build_config
from training_image.data import (
    Sample,
    TrainDataset,
    TrainImages,
    balanced_weights,
    class_counts,
)
from training_image.trainer import _loader, _ShardedSampler, amp_dtype, lr_lambdas, train_epoch

ROOT = Path(__file__).resolve().parents[2]


def _samples(metadata: Path, images: Path, n: int) -> list[Sample]:
    import csv

    index = class_index("ham7")
    out = []
    with open(metadata, newline="") as f:
        for row in csv.DictReader(f):
            path = images / f"{row['image_id']}.jpg"
            if path.is_file() and row["dx"] in index:
                out.append(Sample(row["image_id"], path, index[row["dx"]], row["lesion_id"]))
            if len(out) >= n:
                break
    return out


class _Timer:
    """Per-step timestamps; the rate excludes the first ``warmup`` steps."""

    def __init__(self, batch: int, warmup: int) -> None:
        self.batch, self.warmup, self.stamps = batch, warmup, [time.perf_counter()]

    def step(self) -> None:
        self.stamps.append(time.perf_counter())

    def rate(self) -> float:
        timed = self.stamps[self.warmup :]
        return self.batch * (len(timed) - 1) / (timed[-1] - timed[0])


def run_project(samples: Sequence[Sample], args: argparse.Namespace, amp: str) -> float:
    """Images/s of ``training_image.trainer.train_epoch`` with the project's data pipeline."""
    cfg = build_config(
        {"arch": args.arch, "amp": amp, "batch_size": str(args.batch), "image_size": args.image_size,
         "freeze_epochs": "0", "warmup_epochs": "1", "epochs": "10"}
    )
    height, width = cfg.image_size
    device = torch.device("cpu")
    model, info = build_model(cfg.arch, 7, True, (height, width))
    spec = PreprocessingSpec(arch=cfg.arch, height=height, width=width, mean=info.mean, std=info.std)
    images = TrainImages(samples, spec, cfg.cache_images, torch.get_num_threads())
    dataset = TrainDataset(images, spec, cfg.seed, cfg.min_crop_scale)
    sampler = _ShardedSampler(len(dataset), None, cfg.seed, 0, 1)
    loader = _loader(dataset, cfg.batch_size, sampler, args.workers, device, drop_last=True)
    model = model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    groups = param_groups(model, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(groups, steps, cfg, cfg.epochs))
    weights = torch.as_tensor(balanced_weights(class_counts(samples, 7)), dtype=torch.float32)
    timer = _Timer(cfg.batch_size, args.warmup)
    train_epoch(
        model, model, False, loader, opt, sched, None, nn.CrossEntropyLoss(weight=weights), device,
        amp_dtype(cfg.amp, device), cfg.channels_last, steps, lambda *_: timer.step(),
    )
    return timer.rate()


class _FolderDataset(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.samples[i]
        with Image.open(s.path) as img:
            return self.transform(img.convert("RGB")), s.label


def run_reference(samples: Sequence[Sample], args: argparse.Namespace) -> float:
    """Images/s of the textbook torchvision loop on the same network and data."""
    from torchvision import transforms as T

    height, width = build_config({"image_size": args.image_size}).image_size
    model, info = build_model(args.arch, 7, True, (height, width))
    transform = T.Compose([
        T.RandomResizedCrop((height, width), scale=(0.35, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2, 0.03),
        T.ToTensor(),
        T.Normalize(info.mean, info.std),
    ])
    loader = DataLoader(_FolderDataset(samples, transform), batch_size=args.batch, shuffle=True,
                        num_workers=args.workers, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    timer = _Timer(args.batch, args.warmup)
    for step, (x, y) in enumerate(loader, start=1):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # the usual per-step loss read
        timer.step()
        if step >= args.warmup + args.steps:
            break
    return timer.rate()


def loop_arguments(p: argparse.ArgumentParser, image_size: str) -> None:
    """The options every training-loop benchmark takes: data, input, batch, threads, timing and output."""
    p.add_argument("--metadata", type=Path, default=ROOT / "data/sample/HAM10000_metadata.csv")
    p.add_argument("--images", type=Path, default=ROOT / "data/sample/images")
    p.add_argument("--image-size", default=image_size)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the result here")


def emit(result: dict[str, object], path: Path | None) -> int:
    """Print ``result`` as JSON, and write it to ``path`` when given; the benchmark's exit status."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print (and optionally save) the result."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    loop_arguments(p, "200x150")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.batch * (args.warmup + args.steps)
    samples = _samples(args.metadata, args.images, n)
    if len(samples) < n:
        p.error(f"need {n} images, found {len(samples)}")
    runs: dict[str, list[float]] = {"project": [], "project_fp32": [], "reference": []}
    for rep in range(args.repeats):
        for name, fn in (
            ("project", lambda: run_project(samples, args, "auto")),
            ("reference", lambda: run_reference(samples, args)),
            ("project_fp32", lambda: run_project(samples, args, "false")),
        ):
            runs[name].append(fn())
            print(f"repeat {rep + 1}/{args.repeats} {name:13s} {runs[name][-1]:7.2f} img/s", flush=True)
    median = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "arch": args.arch, "image_size": args.image_size, "batch": args.batch, "threads": args.threads,
        "workers": args.workers, "timed_steps": args.steps, "repeats": args.repeats,
        "autocast": str(amp_dtype("auto", torch.device("cpu"))),
        "images_per_sec": {k: round(v, 2) for k, v in median.items()},
        "ratio": round(median["project"] / median["reference"], 3),
        "ratio_fp32": round(median["project_fp32"] / median["reference"], 3),
        "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "cpu": _cpu_name(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    return emit(result, args.json)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
