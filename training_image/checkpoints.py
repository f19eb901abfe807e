"""Checkpoints: what a spot-interrupted or restarted job resumes from.

After every epoch the main rank writes ``checkpoint-last.pt`` atomically to the checkpoint directory, which
SageMaker syncs to S3 while the job runs (``CheckpointConfig``) and restores into a restarted job. A job resumes
from it only when the same configuration wrote it (:func:`fingerprint`); dry runs neither read nor write one.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lesionml.models import LesionNet
from training_image.config import Config
from training_image.ema import WeightEma

log = logging.getLogger("train")

CHECKPOINT_NAME = "checkpoint-last.pt"
# Fault injection for tests and local mode: SIGKILL the job right after this epoch's checkpoint is written.
STOP_AFTER_EPOCH_ENV = "LESIONML_STOP_AFTER_EPOCH"


@dataclass
class TrainState:
    """Everything a checkpoint restores besides the model and optimiser."""

    epoch: int = 0  # last completed epoch
    best_score: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    stale_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0


def fingerprint(cfg: Config, classes: tuple[str, ...]) -> dict[str, Any]:
    """What must match for a checkpoint to be resumable."""
    return {"arch": cfg.arch, "classes": list(classes), "image_size": list(cfg.image_size), "epochs": cfg.epochs,
            "freeze_epochs": cfg.freeze_epochs, "seed": cfg.seed, "ema_decay": cfg.ema_decay}


def save_checkpoint(
    path: Path, model: LesionNet, opt: torch.optim.Optimizer, sched: Any, scaler: Any, state: TrainState,
    fingerprint: dict[str, Any], ema: WeightEma | None = None,
) -> None:
    """Write the checkpoint atomically (SageMaker uploads the directory while the job runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": state.__dict__,
        "ema": ema.state_dict() if ema is not None else None,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, model: LesionNet, opt: torch.optim.Optimizer, sched: Any, scaler: Any,
    fingerprint: dict[str, Any], ema: WeightEma | None = None,
) -> TrainState | None:
    """Restore from ``path`` if it exists and was written by the same configuration."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated upload must not kill the job: start over instead
        log.warning("cannot read checkpoint %s (%s); starting from scratch", path, e)
        return None
    if payload.get("fingerprint") != fingerprint:
        log.warning("checkpoint %s was written by a different configuration; starting from scratch", path)
        return None
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])
    sched.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    if ema is not None and payload.get("ema"):
        ema.load_state_dict(payload["ema"])
    return TrainState(**payload["state"])


@dataclass
class Checkpoints:
    """The job's checkpoint: where it lives, whether this process reads and writes it, and the fault injection.

    Parameters
    ----------
    path : Path
        ``<checkpoint dir>/checkpoint-last.pt``.
    fingerprint : dict
        :func:`fingerprint` of this job.
    enabled : bool
        False for dry runs: nothing is read or written.
    is_main : bool
        Only the main rank writes (every rank reads).
    stop_after : int
        ``LESIONML_STOP_AFTER_EPOCH``: SIGKILL the job right after that epoch's checkpoint (0 = never).
    """

    path: Path
    fingerprint: dict[str, Any]
    enabled: bool
    is_main: bool
    stop_after: int = 0

    @classmethod
    def for_job(cls, directory: Path, cfg: Config, classes: tuple[str, ...], is_main: bool) -> Checkpoints:
        """The checkpoint of this configuration in ``directory``."""
        stop_after = int(os.environ.get(STOP_AFTER_EPOCH_ENV, "0") or 0)
        return cls(directory / CHECKPOINT_NAME, fingerprint(cfg, classes), not cfg.dry_run, is_main, stop_after)

    def resume(
        self, model: LesionNet, opt: torch.optim.Optimizer, sched: Any, scaler: Any, ema: WeightEma | None,
        epochs: int,
    ) -> TrainState:
        """The state to continue from: the checkpoint's, restored into the arguments, or a fresh one."""
        state = load_checkpoint(self.path, model, opt, sched, scaler, self.fingerprint, ema) if self.enabled else None
        if state is None:
            return TrainState()
        log.info("resumed from checkpoint %s: epoch %d of %d done, continuing at epoch %d",
                 self.path, state.epoch, epochs, state.epoch + 1)
        return state

    def epoch_done(
        self, epoch: int, model: LesionNet, opt: torch.optim.Optimizer, sched: Any, scaler: Any, state: TrainState,
        ema: WeightEma | None,
    ) -> None:
        """Save after ``epoch`` (main rank), then apply the fault injection if it names this epoch."""
        if self.is_main and self.enabled:
            save_checkpoint(self.path, model, opt, sched, scaler, state, self.fingerprint, ema)
            log.info("checkpoint saved: %s (epoch %d)", self.path, epoch)
        if self.stop_after and epoch == self.stop_after and self.is_main:
            log.warning("%s=%d: killing the job after this checkpoint", STOP_AFTER_EPOCH_ENV, self.stop_after)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
