"""The training job, wired from its parts.

=================================  ===========================================================================
Module                             Concern
=================================  ===========================================================================
:mod:`training_image.runtime`      threads, device, process group, seeds, autocast, loader sizes, metric lines
:mod:`training_image.data`         channels and manifests, images, augmentation, datasets and loaders
:mod:`training_image.fit`          the loop: schedule, loss, DDP, validation and epoch selection
:mod:`training_image.ema`          the weight average (``ema_decay``)
:mod:`training_image.checkpoints`  save and resume (spot interruptions, restarts)
:mod:`training_image.evaluate`     export, the exported model's figures and decision rule, the baseline,
                                   ``metrics.json``, drift reference, report, the sealed model directory
=================================  ===========================================================================
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lesionml.models import LesionNet, build_model
from lesionml.preprocessing import PreprocessingSpec
from training_image.checkpoints import Checkpoints
from training_image.config import Cluster, Config, Paths
from training_image.data import Data, EvalImages, TrainImages, class_counts, load_data, median_crop_size

# benchmarks/training/throughput.py times the project's own loop through these names.
from training_image.data import ShardedSampler as _ShardedSampler  # noqa: F401
from training_image.data import make_loader as _loader  # noqa: F401
from training_image.evaluate import finish, offset_start
from training_image.fit import Fitter, lr_lambdas, train_epoch  # noqa: F401
from training_image.runtime import amp_dtype, loader_workers, start

log = logging.getLogger("train")


def _build(cfg: Config, data: Data) -> tuple[LesionNet, PreprocessingSpec]:
    """The network for this job's classes and the preprocessing its input needs."""
    height, width = cfg.image_size
    model, info = build_model(cfg.arch, len(data.classes), cfg.pretrained, (height, width), cfg.dropout)
    log.info("model %s: %s weights, embedding %d", cfg.arch, info.weights, info.embedding_dim)
    detail_h, detail_w = median_crop_size(data.train, height, width) if cfg.detail_size == (-1, -1) else cfg.detail_size
    log.info("detail cap %s, colour constancy %s, tone %s", f"{detail_w}x{detail_h}" if detail_w else "none",
             cfg.color_constancy, cfg.tone)
    return model, PreprocessingSpec(arch=cfg.arch, height=height, width=width, mean=info.mean, std=info.std,
                                    detail_width=detail_w, detail_height=detail_h,
                                    color_constancy=cfg.color_constancy, tone=cfg.tone)


def _images(
    cfg: Config, data: Data, spec: PreprocessingSpec, threads: int
) -> tuple[TrainImages, EvalImages, EvalImages]:
    """Decoded images of the three splits (the training ones cached in memory when they fit)."""
    t0 = time.time()
    cache = "false" if cfg.dry_run else cfg.cache_images
    train_images = TrainImages(data.train, spec, cache, threads)
    val_images = EvalImages(data.validation, spec, threads)
    test_images = EvalImages(data.test, spec, threads)
    log.info("images loaded in %.1fs (training cache %s)", time.time() - t0,
             "on" if train_images.cache is not None else "off")
    return train_images, val_images, test_images


def run(cfg: Config, paths: Paths, cluster: Cluster) -> dict[str, Any] | None:
    """Train, evaluate and write the model directory; returns metrics.json on the main rank (None on the others)."""
    rt = start(cfg, cluster)
    t_start = time.time()
    data = load_data(cfg, paths)
    dtype = amp_dtype(cfg.amp, rt.device)
    workers = loader_workers(cfg, rt.device)
    threads = max(1, torch.get_num_threads())
    log.info(
        "device %s (rank %d of %d), arch %s, %s, %d threads, %d loader workers; train %d, validation %d, "
        "test %d images; label set %s",
        rt.device, rt.rank, rt.world_size, cfg.arch, f"autocast {dtype}" if dtype else "float32", threads,
        workers, len(data.train), len(data.validation), len(data.test), data.label_set,
    )
    model, spec = _build(cfg, data)
    train_images, val_images, test_images = _images(cfg, data, spec, threads)
    offsets_from = offset_start(cfg, class_counts(data.train, len(data.classes)))
    checkpoints = Checkpoints.for_job(paths.checkpoint_dir, cfg, data.classes, rt.is_main)
    fitter = Fitter(cfg, rt, data, spec, model, train_images, val_images, workers, dtype, offsets_from, checkpoints)
    model, state = fitter.fit()
    if not rt.is_main:
        rt.barrier()
        return None
    metrics = finish(cfg, rt, paths, model, spec, data, val_images, test_images, state, workers, offsets_from,
                     t_start)
    rt.barrier()
    return metrics
