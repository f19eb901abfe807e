"""Fitting: the transfer-learning loop, its schedule, the weight average, DDP, and epoch selection on validation.

A job trains the head alone on the frozen backbone for ``freeze_epochs``, then fine-tunes (from ``trainable_from``
on). After every epoch the model (or its weight average, ``ema_decay``) is validated, and the epoch whose
validation balanced accuracy under the decision rule it would be served with is highest is kept
(:func:`lesionml.metrics.decide_on_validation`); the checkpoint follows (:mod:`training_image.checkpoints`).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from lesionml.labels import melanoma_index
from lesionml.metrics import balanced_accuracy, confusion_matrix, decide_on_validation, macro_auc_ovr
from lesionml.models import (
    LesionNet,
    fixed_norm_layers,
    freeze_backbone,
    frozen_units,
    leading_backbone_params,
    micro_batched,
    param_groups,
)
from lesionml.preprocessing import PreprocessingSpec
from training_image.checkpoints import Checkpoints, TrainState
from training_image.config import Config, ConfigError
from training_image.data import (
    Data,
    EvalDataset,
    EvalImages,
    ShardedSampler,
    TrainDataset,
    TrainImages,
    balanced_weights,
    class_counts,
    make_loader,
)
from training_image.ema import WeightEma
from training_image.evaluate import predict
from training_image.runtime import Runtime, autocast, cpu_seconds, emit_metrics, eval_batch_size, fmt_eta

log = logging.getLogger("train")

Progress = Callable[[int, int, Callable[[], float]], None]


def lr_lambdas(
    groups: list[dict[str, Any]], steps_per_epoch: int, cfg: Config, epochs: int
) -> list[Callable[[int], float]]:
    """Per-group LR factors: linear warm-up then cosine decay to 1 %; the backbone warms up again once unfrozen."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    unfreeze = min(cfg.freeze_epochs, epochs) * steps_per_epoch

    def cosine(step: int) -> float:
        progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    def head(step: int) -> float:
        return (step + 1) / warmup if step < warmup else cosine(step)

    def backbone(step: int) -> float:
        if step < unfreeze:
            return 0.0
        since = step - unfreeze
        return min(1.0, (since + 1) / warmup) * cosine(step) if warmup else cosine(step)

    return [backbone if g["name"].startswith("backbone") else head for g in groups]


def _mean(total: torch.Tensor, n: int) -> float:
    return float(total) / max(n, 1)


def train_epoch(
    model: LesionNet,
    net: nn.Module,
    frozen: bool,
    loader: DataLoader[tuple[torch.Tensor, int]],
    opt: torch.optim.Optimizer,
    sched: Any,
    scaler: Any,
    loss_fn: nn.Module,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
    steps: int,
    progress: Progress | None = None,
    always_frozen: Collection[str] = (),
    after_step: Callable[[], None] | None = None,
    micro_batch: int = 0,
) -> dict[str, float]:
    """One pass of the project's training loop (also what benchmarks/training/throughput.py times).

    Parameters
    ----------
    model : LesionNet
        The network (its backbone is frozen or unfrozen here).
    net : nn.Module
        What the forward pass calls: ``model`` (or its DDP wrapper), or the head (or its wrapper) when frozen.
    frozen : bool
        Train only the head on features of the frozen backbone, computed without autograd.
    loader, opt, sched, scaler, loss_fn
        Data, AdamW, per-step scheduler, GradScaler (float16 on CUDA only) and loss.
    device, dtype, channels_last
        Placement, autocast dtype (None = float32) and memory format.
    steps : int
        Stop after this many batches.
    progress : callable, optional
        Called after each step with (step, images seen, a function returning the mean loss so far).
    always_frozen : collection of str
        Backbone parameters that never train (``trainable_from``); their norm layers keep running statistics.
    after_step : callable, optional
        Called after each optimiser step (the weight average's update).
    micro_batch : int
        Run the layers that do not train (the whole backbone when ``frozen``, else the modules before
        ``always_frozen``'s end) this many images at a time (:func:`lesionml.models.micro_batched`); 0 = the whole
        batch at once. The same results, faster on a CPU.

    Returns
    -------
    dict
        Mean loss, accuracy and images per second of this process, and ``data_wait_seconds``: how long it waited
        for the loader's next batch (a job that waits long is bound by decoding and augmentation, not by compute).
    """
    freeze_backbone(model, frozen, always_frozen)
    model.train()
    if frozen:
        # Frozen BatchNorm statistics: the backbone stays exactly the pretrained feature extractor.
        model.backbone.eval()
    else:
        for layer in fixed_norm_layers(model, always_frozen):
            layer.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    t0 = time.time()
    data_wait = 0.0
    units = [model.backbone] if frozen else frozen_units(model, always_frozen)
    with micro_batched(units, micro_batch):
        t_asked = time.perf_counter()
        for step, (x, y) in enumerate(loader, start=1):
            data_wait += time.perf_counter() - t_asked
            if step > steps:
                break
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with autocast(device, dtype):
                if frozen:
                    with torch.no_grad():
                        features = model.backbone(x)
                    logits = net(features)
                else:
                    logits = net(x)
                loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, 5.0)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            # Accumulate on the device: an .item() per step would synchronise CUDA every iteration.
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if progress is not None:
                progress(step, seen, functools.partial(_mean, loss_sum, seen))
            t_asked = time.perf_counter()
    elapsed = max(time.time() - t0, 1e-9)
    return {
        "loss": float(loss_sum) / max(seen, 1),
        "accuracy": float(correct) / max(seen, 1),
        "images_per_sec": seen / elapsed,
        "data_wait_seconds": data_wait,
    }


class Fitter:
    """One job's training loop, set up from its data and model: loaders, optimiser, schedule, loss, average.

    Parameters
    ----------
    cfg, rt : Config, Runtime
        Hyperparameters and placement.
    data, spec : Data, PreprocessingSpec
        The splits and the model input.
    model : LesionNet
        The network as built (pretrained weights); moved to the device here.
    train_images, val_images : TrainImages, EvalImages
        Decoded images of the training and validation splits.
    workers : int
        Data loader workers.
    dtype : torch.dtype or None
        Autocast dtype (None = float32).
    offset_start : np.ndarray or None
        Where the decision offsets' fit starts (:func:`training_image.evaluate.offset_start`).
    checkpoints : Checkpoints
        The job's checkpoint.
    """

    def __init__(
        self, cfg: Config, rt: Runtime, data: Data, spec: PreprocessingSpec, model: LesionNet,
        train_images: TrainImages, val_images: EvalImages, workers: int, dtype: torch.dtype | None,
        offset_start: np.ndarray | None, checkpoints: Checkpoints,
    ) -> None:
        self.cfg, self.rt, self.dtype = cfg, rt, dtype
        self.epochs = 1 if cfg.dry_run else cfg.epochs
        self.max_steps = 1 if cfg.dry_run else 0
        self.mel = melanoma_index(data.label_set)
        self.num_classes = len(data.classes)
        self.offset_start = offset_start
        self.checkpoints = checkpoints
        self.epoch_times: dict[bool, list[float]] = {True: [], False: []}  # by frozen_backbone

        counts = class_counts(data.train, len(data.classes))
        self.train_ds = TrainDataset(train_images, spec, cfg.seed, cfg.min_crop_scale, cfg.acquisition_aug)
        sample_w = balanced_weights(counts)[[s.label for s in data.train]] if cfg.imbalance == "sampler" else None
        self.sampler = ShardedSampler(len(self.train_ds), sample_w, cfg.seed, rt.rank, rt.world_size)
        bs = min(cfg.batch_size, len(self.sampler))
        # drop_last avoids a batch of one (BatchNorm cannot train on it) when the data allow it.
        self.train_loader = make_loader(
            self.train_ds, bs, self.sampler, workers, rt.device, drop_last=len(self.sampler) > bs
        )
        self.val_loader = make_loader(
            EvalDataset(val_images, spec), eval_batch_size(cfg, rt.device), None, workers, rt.device
        )
        # The layers that do not train run as evaluation does: on a CPU, a few images at a time stay in cache.
        self.micro_batch = eval_batch_size(cfg, rt.device) if rt.device.type == "cpu" else 0
        n_batches = len(self.train_loader)
        self.steps_per_epoch = min(n_batches, self.max_steps) if self.max_steps else n_batches

        self.always_frozen = self._leading_frozen(model)
        # Before any DDP wrapper is built: DDP only expects gradients for parameters that require them then.
        freeze_backbone(model, False, self.always_frozen)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(rt.device).to(memory_format=fmt)
        groups = param_groups(self.model, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay)
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambdas(groups, self.steps_per_epoch, cfg, self.epochs)
        )
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and rt.device.type == "cuda" else None
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        # Built from the model as it is now (pretrained weights, device, memory format); a checkpoint overwrites both.
        self.ema = WeightEma(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    def _leading_frozen(self, model: LesionNet) -> frozenset[str]:
        """The backbone parameters before ``trainable_from``, which keep their pretrained values."""
        cfg = self.cfg
        try:
            frozen = leading_backbone_params(model, cfg.trainable_from)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if frozen:
            n_frozen = sum(p.numel() for n, p in model.backbone.named_parameters() if n in frozen)
            log.info("trainable_from %s: %d backbone tensors (%d parameters) before it keep their pretrained values",
                     cfg.trainable_from, len(frozen), n_frozen)
        return frozen

    def _wrap(self) -> tuple[nn.Module, nn.Module]:
        """What the forward pass calls when fine-tuning and when training the head alone (DDP wrappers on ranks)."""
        if not self.rt.distributed:
            return self.model, self.model.head
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
        # The frozen phase trains only the head; a separate wrapper keeps DDP's gradient hooks consistent.
        return DDP(self.model, device_ids=ids), DDP(self.model.head, device_ids=ids)

    def fit(self) -> tuple[LesionNet, TrainState]:
        """Resume, train until the last epoch or early stopping, and return the model with the selected weights."""
        cfg = self.cfg
        state = self.checkpoints.resume(self.model, self.opt, self.sched, self.scaler, self.ema, self.epochs)
        full, head = self._wrap()
        while state.epoch < self.epochs:
            if cfg.patience and state.stale_epochs >= cfg.patience:
                log.info("early stopping: no better validation balanced accuracy for %d epochs", cfg.patience)
                break
            epoch = state.epoch + 1
            frozen = epoch <= cfg.freeze_epochs
            self._epoch(state, epoch, frozen, head if frozen else full)
        if state.best_state is not None:
            self.model.load_state_dict(state.best_state)
        return self.model, state

    def _epoch(self, state: TrainState, epoch: int, frozen: bool, net: nn.Module) -> None:
        """Train one epoch, validate, select, log and checkpoint."""
        cfg, rt = self.cfg, self.rt
        t_epoch, cpu_start = time.time(), cpu_seconds()
        self.train_ds.epoch = self.sampler.epoch = epoch
        train_stats = self._train(net, frozen, epoch)
        # With ema_decay, the weight average is what is validated, selected and exported.
        judged: LesionNet = self.ema.module if self.ema is not None else self.model  # type: ignore[assignment]
        self.model.eval()
        val = predict(judged.predict, self.val_loader, rt.device, cfg.channels_last, self.dtype, False, self.max_steps)
        val_bacc = balanced_accuracy(confusion_matrix(val.labels, val.probs.argmax(1), self.num_classes))
        val_auc, _ = macro_auc_ovr(val.labels, val.probs)
        # Selection judges each epoch by the decision rule it would be served with: with a class bias to come, the
        # raw arg-max's balanced accuracy mostly tracks how the classes' logits drift relative to each other.
        decision = decide_on_validation(
            val.labels, val.probs, self.mel, cfg.class_bias != "none", self.offset_start,
            cfg.melanoma_target_sensitivity,
        )
        score = decision.balanced_accuracy_after
        is_mel = val.labels == self.mel
        val_sens = float(((val.probs[:, self.mel] >= decision.melanoma_threshold) & is_mel).sum()
                         / max(1, is_mel.sum()))
        seconds = time.time() - t_epoch
        cpu = cpu_seconds() - cpu_start
        self.epoch_times[frozen].append(seconds)
        state.train_seconds += seconds
        record = {
            "epoch": epoch, "frozen_backbone": frozen, "train_loss": train_stats["loss"],
            "train_accuracy": train_stats["accuracy"], "val_loss": val.loss,
            "val_balanced_accuracy": val_bacc, "val_balanced_accuracy_with_bias": score, "val_macro_auc": val_auc,
            "val_melanoma_sensitivity": val_sens, "lr": self.opt.param_groups[-1]["lr"],
            "images_per_sec": train_stats["images_per_sec"], "epoch_seconds": seconds,
            "data_wait_seconds": train_stats["data_wait_seconds"], "cpu_seconds": cpu,
        }
        # JSON has no NaN (e.g. AUC on a validation split missing classes): store None instead.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        state.history.append(record)
        _select(state, epoch, score, val.loss, judged)
        state.epoch = epoch
        if rt.is_main:
            emit_metrics({k: v for k, v in record.items() if k not in ("frozen_backbone",)})
            log.info(
                "epoch %d/%d done in %.1fs (%.1fs of it waiting for data, %.0f CPU-seconds): validation balanced "
                "accuracy %.4f (model selection: %.4f, best %.4f at epoch %d), total eta %s",
                epoch, self.epochs, seconds, train_stats["data_wait_seconds"], cpu, val_bacc, score,
                state.best_score, state.best_epoch, fmt_eta(self._eta(epoch + 1)),
            )
        self.checkpoints.epoch_done(epoch, self.model, self.opt, self.sched, self.scaler, state, self.ema)

    def _eta(self, first: int, current: tuple[bool, float] | None = None) -> float:
        """Seconds left for epochs ``first``..end, from the mean measured time of head-only and full epochs."""
        known = {phase: float(np.mean(t)) for phase, t in self.epoch_times.items() if t}
        if current is not None:
            known.setdefault(*current)
        total = 0.0
        for e in range(first, self.epochs + 1):
            frozen = e <= self.cfg.freeze_epochs
            if frozen in known:
                total += known[frozen]
            elif known:
                # Not measured yet: a full epoch also backpropagates through the backbone. With the early layers
                # fixed (trainable_from) a full epoch measured 1.4x (float32) and 1.9x (bf16) a head-only one,
                # validation included (Lite0 from net._blocks.6, 2-core CPU); through the whole backbone about 4x.
                ratio = 2.0 if self.always_frozen else 4.0
                total += known[not frozen] * (1.0 / ratio if frozen else ratio)
        return total

    def _train(self, net: nn.Module, frozen: bool, epoch: int) -> dict[str, float]:
        """:func:`train_epoch` with progress lines on the main rank; images per second of all ranks."""
        rt, steps = self.rt, self.steps_per_epoch
        t0 = time.time()
        last_log = [t0]

        def progress(step: int, seen: int, mean_loss: Callable[[], float]) -> None:
            now = time.time()
            last = step == steps
            if not rt.is_main or (not last and (now - last_log[0] < 5 or step % max(1, steps // 5))):
                return
            last_log[0] = now
            left_epoch = (steps - step) * (now - t0) / step
            this_epoch = (frozen, (now - t0) * steps / step)
            log.info(
                "epoch %d/%d %s step %d/%d | loss %.4f | %.1f img/s | epoch eta %s | total eta %s",
                epoch, self.epochs, "head-only" if frozen else "full", step, steps, mean_loss(),
                seen * rt.world_size / max(now - t0, 1e-9), fmt_eta(left_epoch),
                fmt_eta(left_epoch + self._eta(epoch + 1, this_epoch)),
            )

        stats = train_epoch(
            self.model, net, frozen, self.train_loader, self.opt, self.sched, self.scaler, self.loss_fn, rt.device,
            self.dtype, self.cfg.channels_last, steps, progress, self.always_frozen,
            self.ema.update if self.ema is not None else None, self.micro_batch,
        )
        stats["images_per_sec"] *= rt.world_size
        return stats


def _select(state: TrainState, epoch: int, score: float, val_loss: float, judged: nn.Module) -> None:
    """Keep ``judged``'s weights when this epoch beats the best so far (ties: lower validation loss)."""
    improved = score > state.best_score + 1e-9 or (abs(score - state.best_score) <= 1e-9 and val_loss < state.best_loss)
    if improved:
        state.best_score, state.best_loss, state.best_epoch = score, val_loss, epoch
        state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in judged.state_dict().items()}
        state.stale_epochs = 0
    else:
        state.stale_epochs += 1
