"""The training job: data, transfer learning loop, checkpoints, evaluation and the model directory."""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import tarfile
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lesionml.labels import classes_document, melanoma_index, parse_classes_document
from lesionml.metrics import (
    balanced_accuracy,
    choose_threshold,
    confusion_matrix,
    decide,
    evaluate_split,
    fit_class_offsets,
    macro_auc_ovr,
    tune_class_bias,
)
from lesionml.model_dir import MANIFEST_NAME, record_known_answers, write_manifest
from lesionml.models import (
    LesionNet,
    build_model,
    export_torchscript,
    fixed_norm_layers,
    freeze_backbone,
    leading_backbone_params,
    load_torchscript,
    param_groups,
    view_count,
)
from lesionml.preprocessing import PreprocessingSpec, read_spec, write_spec
from lesionml.reference_stats import build_reference_stats
from training_image.config import Cluster, Config, ConfigError, Paths
from training_image.data import (
    EvalDataset,
    EvalImages,
    Sample,
    TrainDataset,
    TrainImages,
    balanced_weights,
    class_counts,
    read_classes,
    read_manifest,
    stratified_cap,
)
from training_image.report import write_report

log = logging.getLogger("train")

CHECKPOINT_NAME = "checkpoint-last.pt"
# Fault injection for tests and local mode: SIGKILL the job right after this epoch's checkpoint is written.
STOP_AFTER_EPOCH_ENV = "LESIONML_STOP_AFTER_EPOCH"


def emit_metrics(values: dict[str, float | int | None]) -> None:
    """Print one ``name=value;`` line for SageMaker MetricDefinitions (non-finite values are left out)."""
    parts = []
    for k, v in values.items():
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        parts.append(f"{k}={v};" if isinstance(v, int) else f"{k}={v:.6g};")
    print(" ".join(parts), flush=True)


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: CPU autocast to bf16 is then faster than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the ``amp`` hyperparameter on ``device`` (None = float32)."""
    if setting == "false":
        return None
    if device.type == "cuda":
        if setting == "fp16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if setting == "auto":
        return torch.bfloat16 if _cpu_has_bf16() else None
    return torch.bfloat16  # float16 autocast on CPU is slow; "true"/"bf16"/"fp16" all mean bf16 there


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass
class Runtime:
    """Process placement: single process or one DDP rank."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: Config, cluster: Cluster) -> Runtime:
    """Pick the device and, under torchrun, join the process group."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        local_rank = int(os.environ["LOCAL_RANK"])
        use_cuda = torch.cuda.is_available() and cluster.num_gpus > 0
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return Runtime(device, dist.get_rank(), dist.get_world_size(), local_rank)
    use_cuda = torch.cuda.is_available() and cluster.num_gpus > 0
    return Runtime(torch.device("cuda", 0) if use_cuda else torch.device("cpu"))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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


class WeightEma:
    """An exponential moving average of a model's weights and BatchNorm statistics (``ema_decay``).

    Averaging the weights of the last few hundred steps smooths out the noise of the last mini-batches, which on a
    small data set moves the rare classes' decision regions from one epoch to the next. The average is what is
    validated, selected and exported; the raw weights keep training. The decay ramps up as ``(1 + n) / (10 + n)``
    over the first updates so that the average does not start out dominated by the initial weights.

    Parameters
    ----------
    model : nn.Module
        The (unwrapped) network, already on its device and in its memory format.
    decay : float
        Per-step decay in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values(), strict=True))
        self._floats = [(a, b) for a, b in pairs if a.dtype.is_floating_point]
        self._others = [(a, b) for a, b in pairs if not a.dtype.is_floating_point]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current weights (call after each optimiser step)."""
        weight = 1.0 - self.current_decay()
        self.updates += 1
        torch._foreach_lerp_([a for a, _ in self._floats], [b.detach() for _, b in self._floats], weight)
        for a, b in self._others:
            a.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint."""
        return {"updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["module"])


def _fingerprint(cfg: Config, classes: tuple[str, ...]) -> dict[str, Any]:
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
class Predictions:
    """Model outputs over one split."""

    probs: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray | None
    loss: float


@torch.no_grad()
def predict(
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    loader: DataLoader[tuple[torch.Tensor, int]],
    device: torch.device,
    channels_last: bool,
    dtype: torch.dtype | None,
    keep_embeddings: bool,
    max_batches: int = 0,
) -> Predictions:
    """Run ``fn`` (returning probabilities and embeddings) over ``loader``."""
    probs, labels, embs = [], [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for i, (x, y) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with _autocast(device, dtype):
            p, e = fn(x)
        probs.append(p.float().cpu().numpy())
        labels.append(y.numpy())
        if keep_embeddings:
            embs.append(e.float().cpu().numpy())
    p_all = np.concatenate(probs).astype(np.float64)
    y_all = np.concatenate(labels).astype(np.int64)
    # Plain NLL, whatever the training loss weighting: comparable across runs.
    loss = float(-np.log(np.clip(p_all[np.arange(len(y_all)), y_all], 1e-12, None)).mean())
    return Predictions(p_all, y_all, np.concatenate(embs) if keep_embeddings else None, loss)


def _torchscript_predict(ts: torch.jit.ScriptModule) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(ts, "predict"):
        return ts.predict

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = ts(x)
        return torch.softmax(logits, dim=1), logits

    return fn


def _loader(
    dataset: torch.utils.data.Dataset[tuple[torch.Tensor, int]], batch_size: int, sampler: Sampler[int] | None,
    workers: int, device: torch.device, drop_last: bool = False,
) -> DataLoader[tuple[torch.Tensor, int]]:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        drop_last=drop_last, persistent_workers=False,
    )


class _ShardedSampler(Sampler[int]):
    """Per-epoch sampler, identical for a given (seed, epoch) and split across DDP ranks."""

    def __init__(self, n: int, weights: np.ndarray | None, seed: int, rank: int, world: int) -> None:
        self.n, self.weights, self.seed, self.rank, self.world = n, weights, seed, rank, world
        self.epoch = 0
        self.per_rank = math.ceil(n / world)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.per_rank * self.world
        if self.weights is not None:
            idx = torch.multinomial(torch.as_tensor(self.weights, dtype=torch.double), total, True, generator=g)
        else:
            perm = torch.randperm(self.n, generator=g)
            idx = torch.cat([perm, perm[: total - self.n]])
        return iter(idx[self.rank :: self.world].tolist())


def eval_batch_size(cfg: Config, device: torch.device, views: int = 1) -> int:
    """Loader batch for evaluation: ``eval_batch_size`` images per forward pass, of which each image takes ``views``.

    ``auto``: 64 on a GPU; 4 on a CPU, where a small batch's activations stay in cache (float32 Lite0 at 256x192 on
    the 2-core machine: 76 images/s at 4, 35 at 64; bf16 194 and 81).
    """
    per_pass = cfg.eval_batch_size if cfg.eval_batch_size > 0 else (64 if device.type == "cuda" else 4)
    return max(1, per_pass // views)


def _auto_workers(cfg: Config, device: torch.device) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(8, cpus - 1))
    # On CPU the workers compete with the math threads; only a wide machine gains from them.
    return 0 if cpus <= 4 else min(4, cpus // 4)


@dataclass
class Data:
    """Everything read from the channels."""

    label_set: str
    classes: tuple[str, ...]
    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]


def load_data(cfg: Config, paths: Paths) -> Data:
    """Read and validate the manifests and images channels."""
    manifests = paths.channel("manifests")
    images = paths.channel("images")
    if manifests is None:
        raise ConfigError(f"channel 'manifests' not found (SM_CHANNEL_MANIFESTS or {paths.data_dir / 'manifests'})")
    if images is None:
        raise ConfigError(f"channel 'images' not found (SM_CHANNEL_IMAGES or {paths.data_dir / 'images'})")
    label_set, classes = read_classes(manifests, cfg.label_set)
    splits = {s: read_manifest(manifests / f"{s}.csv", images, label_set) for s in ("train", "validation", "test")}
    train = stratified_cap(splits["train"], cfg.max_train_images, cfg.seed)
    counts = class_counts(train, len(classes))
    absent = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if absent:
        log.warning("no training images for class(es) %s", ", ".join(absent))
    if int(counts[melanoma_index(label_set)]) == 0:
        log.warning("no melanoma in the training split: melanoma metrics will be meaningless")
    return Data(label_set, classes, train, splits["validation"], splits["test"])


def _json_dump(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def write_known_answers(model_dir: Path, spec: PreprocessingSpec, classes: tuple[str, ...]) -> None:
    """``known_answers.json``: synthetic images and the exported ``model.ts``'s probabilities for them, on the CPU
    in float32 (what serving reproduces before it answers; lesionml/model_dir.py)."""
    ts = load_torchscript(model_dir / "model.ts", "cpu")

    def probabilities(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return ts.predict(torch.from_numpy(x))[0].float().numpy()

    record_known_answers(model_dir, spec, classes, probabilities)


def _find_baseline(channel: Path) -> Path:
    """Directory holding the baseline's model.ts, extracting model.tar.gz if needed."""
    if (channel / "model.ts").is_file():
        return channel
    archives = sorted(channel.rglob("*.tar.gz"))
    if not archives:
        raise FileNotFoundError("baseline channel holds neither model.ts nor a .tar.gz")
    out = Path(tempfile.mkdtemp(prefix="baseline-"))
    with tarfile.open(archives[0]) as tar:
        try:
            tar.extractall(out, filter="data")
        except TypeError:  # Python without extraction filters: refuse unsafe members ourselves
            for m in tar.getmembers():
                if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts or m.issym() or m.islnk():
                    raise ValueError(f"unsafe member {m.name!r} in {archives[0].name}") from None
            tar.extractall(out)
    hits = sorted(out.rglob("model.ts"))
    if not hits:
        raise FileNotFoundError(f"{archives[0].name} has no model.ts")
    return hits[0].parent


def evaluate_baseline(
    channel: Path, data: Data, val_images: EvalImages, test_images: EvalImages, rt: Runtime, cfg: Config,
    workers: int,
) -> dict[str, Any]:
    """Evaluate an earlier model.tar.gz on the same validation (threshold) and test split."""
    root = _find_baseline(channel)
    label_set, classes = parse_classes_document(json.loads((root / "classes.json").read_text()))
    if classes != data.classes:
        raise ValueError(f"baseline classes {list(classes)} differ from this job's {list(data.classes)}")
    spec = read_spec(root / "preprocessing.json")
    ts = load_torchscript(root / "model.ts", rt.device)
    fn = _torchscript_predict(ts)
    threads = max(1, torch.get_num_threads())
    out = {}
    for name, images in (("validation", val_images), ("test", test_images)):
        if not images.same_geometry(spec):
            images = EvalImages(images.samples, spec, threads)
        loader = _loader(EvalDataset(images, spec), eval_batch_size(cfg, rt.device), None, workers, rt.device)
        out[name] = predict(fn, loader, rt.device, False, None, False, 1 if cfg.dry_run else 0)
    mel = melanoma_index(label_set)
    val = out["validation"]
    threshold = choose_threshold(val.labels == mel, val.probs[:, mel], cfg.melanoma_target_sensitivity)
    # The same procedure as for the new model, on the same validation split: a threshold and, with
    # class_bias, decision offsets (starting from the ones the baseline was served with, if any).
    offsets = np.zeros(len(classes))
    if cfg.class_bias != "none" and not cfg.dry_run:
        start = recorded_offsets(root / "metrics.json", classes)
        offsets = choose_offsets(cfg.class_bias, val.labels, val.probs, start)[0]
    block = evaluate_split(out["test"].labels, out["test"].probs, classes, threshold, mel, offsets)
    block["architecture"] = spec.arch
    block["melanoma_threshold"] = threshold
    block["decision_offsets"] = dict(zip(classes, np.round(offsets, 4).tolist(), strict=True))
    return block


def choose_offsets(
    method: str, labels: np.ndarray, probs: np.ndarray, start: np.ndarray | None
) -> tuple[np.ndarray, float, float]:
    """Decision offsets on validation data (``class_bias``): the balanced cross-entropy fit or the search."""
    if method == "search":
        return tune_class_bias(labels, probs, start=start)
    return fit_class_offsets(labels, probs, start=start)


def recorded_offsets(metrics_path: Path, classes: tuple[str, ...]) -> np.ndarray:
    """The ``decision_offsets`` a model directory's ``metrics.json`` records (0 where absent or unreadable)."""
    try:
        recorded = json.loads(metrics_path.read_text()).get("decision_offsets") or {}
        return np.array([float(recorded.get(c, 0.0)) for c in classes])
    except (OSError, ValueError, AttributeError, TypeError):
        return np.zeros(len(classes))


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
    progress: Callable[[int, int, Callable[[], float]], None] | None = None,
    always_frozen: Collection[str] = (),
    after_step: Callable[[], None] | None = None,
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

    Returns
    -------
    dict
        Mean loss, accuracy and images per second of this process.
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
    for step, (x, y) in enumerate(loader, start=1):
        if step > steps:
            break
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with _autocast(device, dtype):
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
    elapsed = max(time.time() - t0, 1e-9)
    return {
        "loss": float(loss_sum) / max(seen, 1),
        "accuracy": float(correct) / max(seen, 1),
        "images_per_sec": seen / elapsed,
    }


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy on ``logits + log(prior)`` (Menon et al., 2021, "Long-tail learning via logit adjustment").

    The training prior is added inside the loss only, so the network's own logits learn the prior-free part: their
    arg-max aims at balanced accuracy while every class keeps its full share of the gradient signal (a class-
    weighted loss instead multiplies the rare classes' few, noisy gradients by up to ~60 on HAM10000).
    """

    def __init__(self, counts: np.ndarray, label_smoothing: float = 0.0) -> None:
        super().__init__()
        prior = np.maximum(counts.astype(np.float64), 1.0) / max(float(counts.sum()), 1.0)
        self.register_buffer("log_prior", torch.as_tensor(np.log(prior), dtype=torch.float32))
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch."""
        log_prior: torch.Tensor = self.log_prior
        return nn.functional.cross_entropy(logits + log_prior, target, label_smoothing=self.label_smoothing)


class Trainer:
    """One training job."""

    def __init__(self, cfg: Config, paths: Paths, cluster: Cluster) -> None:
        self.cfg = cfg
        self.paths = paths
        self.cluster = cluster
        self.rt = setup_runtime(cfg, cluster)
        self.epochs = 1 if cfg.dry_run else cfg.epochs
        self.max_steps = 1 if cfg.dry_run else 0
        self.always_frozen: frozenset[str] = frozenset()
        self.bias_start: np.ndarray | None = None
        self.ema: WeightEma | None = None
        if not self.rt.is_main:
            logging.getLogger().setLevel(logging.WARNING)

    # ----------------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any] | None:
        """Train, evaluate and write the model directory; returns metrics.json on the main rank."""
        cfg, rt = self.cfg, self.rt
        t_start = time.time()
        seed_everything(cfg.seed + rt.rank)
        if rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        data = load_data(cfg, self.paths)
        dtype = amp_dtype(cfg.amp, rt.device)
        workers = _auto_workers(cfg, rt.device)
        threads = max(1, torch.get_num_threads())
        log.info(
            "device %s (rank %d of %d), arch %s, %s, %d threads, %d loader workers; train %d, validation %d, "
            "test %d images; label set %s",
            rt.device, rt.rank, rt.world_size, cfg.arch, f"autocast {dtype}" if dtype else "float32", threads,
            workers, len(data.train), len(data.validation), len(data.test), data.label_set,
        )

        height, width = cfg.image_size
        model, info = build_model(cfg.arch, len(data.classes), cfg.pretrained, (height, width), cfg.dropout)
        log.info("model %s: %s weights, embedding %d", cfg.arch, info.weights, info.embedding_dim)
        spec = PreprocessingSpec(arch=cfg.arch, height=height, width=width, mean=info.mean, std=info.std)

        t0 = time.time()
        cache = "false" if cfg.dry_run else cfg.cache_images
        train_images = TrainImages(data.train, height, width, cache, threads)
        val_images = EvalImages(data.validation, spec, threads)
        test_images = EvalImages(data.test, spec, threads)
        log.info("images loaded in %.1fs (training cache %s)", time.time() - t0,
                 "on" if train_images.cache is not None else "off")

        counts = class_counts(data.train, len(data.classes))
        weights = balanced_weights(counts)
        if cfg.imbalance == "none":
            # Plain cross-entropy learns the training prior; dividing it out (logit adjustment) is where the
            # class-bias search for balanced accuracy starts.
            present = counts > 0
            self.bias_start = np.where(present, -np.log(np.maximum(counts, 1) / counts.sum()), 0.0)
            self.bias_start[present] -= self.bias_start[present].mean()
        train_ds = TrainDataset(train_images, spec, cfg.seed, cfg.min_crop_scale)
        sample_w = weights[[s.label for s in data.train]] if cfg.imbalance == "sampler" else None
        sampler = _ShardedSampler(len(train_ds), sample_w, cfg.seed, rt.rank, rt.world_size)
        bs = min(cfg.batch_size, len(sampler))
        # drop_last avoids a batch of one (BatchNorm cannot train on it) when the data allow it.
        train_loader = _loader(train_ds, bs, sampler, workers, rt.device, drop_last=len(sampler) > bs)
        val_loader = _loader(EvalDataset(val_images, spec), eval_batch_size(cfg, rt.device), None, workers, rt.device)
        steps_per_epoch = min(len(train_loader), self.max_steps) if self.max_steps else len(train_loader)

        try:
            self.always_frozen = leading_backbone_params(model, cfg.trainable_from)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.always_frozen:
            n_frozen = sum(p.numel() for n, p in model.backbone.named_parameters() if n in self.always_frozen)
            log.info("trainable_from %s: %d backbone tensors (%d parameters) before it keep their pretrained values",
                     cfg.trainable_from, len(self.always_frozen), n_frozen)
        # Before any DDP wrapper is built: DDP only expects gradients for parameters that require them then.
        freeze_backbone(model, False, self.always_frozen)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(rt.device).to(memory_format=fmt)
        groups = param_groups(model, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay)
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(groups, steps_per_epoch, cfg, self.epochs))
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and rt.device.type == "cuda" else None
        class_w = torch.as_tensor(weights, dtype=torch.float32, device=rt.device) if cfg.imbalance == "loss" else None
        loss_fn: nn.Module = nn.CrossEntropyLoss(weight=class_w, label_smoothing=cfg.label_smoothing)
        if cfg.imbalance == "logit_adjusted":
            loss_fn = LogitAdjustedLoss(counts, cfg.label_smoothing).to(rt.device)

        # Built from the model as it is now (pretrained weights, device, memory format); a checkpoint overwrites both.
        self.ema = WeightEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        ckpt = self.paths.checkpoint_dir / CHECKPOINT_NAME
        fingerprint = _fingerprint(cfg, data.classes)
        state = None if cfg.dry_run else load_checkpoint(ckpt, model, opt, sched, scaler, fingerprint, self.ema)
        if state is not None:
            log.info("resumed from checkpoint %s: epoch %d of %d done, continuing at epoch %d",
                     ckpt, state.epoch, self.epochs, state.epoch + 1)
        state = state or TrainState()

        wrapped_full: nn.Module = model
        wrapped_head: nn.Module = model.head
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [rt.device.index] if rt.device.type == "cuda" else None
            wrapped_full = DDP(model, device_ids=ids)
            # The frozen phase trains only the head; a separate wrapper keeps DDP's gradient hooks consistent.
            wrapped_head = DDP(model.head, device_ids=ids)

        stop_after = int(os.environ.get(STOP_AFTER_EPOCH_ENV, "0") or 0)
        epoch_times: dict[bool, list[float]] = {True: [], False: []}  # by frozen_backbone
        while state.epoch < self.epochs:
            if cfg.patience and state.stale_epochs >= cfg.patience:
                log.info("early stopping: no better validation balanced accuracy for %d epochs", cfg.patience)
                break
            epoch = state.epoch + 1
            frozen = epoch <= cfg.freeze_epochs
            t_epoch = time.time()
            train_ds.epoch = sampler.epoch = epoch
            train_stats = self._train_epoch(
                model, wrapped_head if frozen else wrapped_full, frozen, train_loader, opt, sched, scaler, loss_fn,
                dtype, epoch, steps_per_epoch, epoch_times,
            )
            # With ema_decay, the weight average is what is validated, selected and exported.
            judged: LesionNet = self.ema.module if self.ema is not None else model  # type: ignore[assignment]
            model.eval()
            val = predict(judged.predict, val_loader, rt.device, cfg.channels_last, dtype, False, self.max_steps)
            cm = confusion_matrix(val.labels, val.probs.argmax(1), len(data.classes))
            val_bacc = balanced_accuracy(cm)
            val_auc, _ = macro_auc_ovr(val.labels, val.probs)
            mel = melanoma_index(data.label_set)
            thr = choose_threshold(val.labels == mel, val.probs[:, mel], cfg.melanoma_target_sensitivity)
            is_mel = val.labels == mel
            val_sens = float(((val.probs[:, mel] >= thr) & is_mel).sum() / max(1, is_mel.sum()))
            # With a class bias to come, select epochs on the balanced accuracy it reaches: the raw arg-max's
            # balanced accuracy mostly tracks how the classes' logits drift relative to each other.
            score = val_bacc
            if cfg.class_bias != "none":
                score = choose_offsets(cfg.class_bias, val.labels, val.probs, self.bias_start)[2]
            seconds = time.time() - t_epoch
            epoch_times[frozen].append(seconds)
            state.train_seconds += seconds
            record = {
                "epoch": epoch, "frozen_backbone": frozen, "train_loss": train_stats["loss"],
                "train_accuracy": train_stats["accuracy"], "val_loss": val.loss,
                "val_balanced_accuracy": val_bacc, "val_balanced_accuracy_with_bias": score, "val_macro_auc": val_auc,
                "val_melanoma_sensitivity": val_sens, "lr": opt.param_groups[-1]["lr"],
                "images_per_sec": train_stats["images_per_sec"], "epoch_seconds": seconds,
            }
            # JSON has no NaN (e.g. AUC on a validation split missing classes): store None instead.
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            state.history.append(record)
            improved = score > state.best_score + 1e-9 or (
                abs(score - state.best_score) <= 1e-9 and val.loss < state.best_loss
            )
            if improved:
                state.best_score, state.best_loss, state.best_epoch = score, val.loss, epoch
                state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in judged.state_dict().items()}
                state.stale_epochs = 0
            else:
                state.stale_epochs += 1
            state.epoch = epoch
            if rt.is_main:
                emit_metrics({k: v for k, v in record.items() if k not in ("frozen_backbone",)})
                log.info(
                    "epoch %d/%d done in %.1fs: validation balanced accuracy %.4f (model selection: %.4f, best "
                    "%.4f at epoch %d), "
                    "total eta %s", epoch, self.epochs, seconds, val_bacc, score, state.best_score, state.best_epoch,
                    _fmt_eta(self._eta(epoch_times, epoch + 1)),
                )
                if not cfg.dry_run:
                    save_checkpoint(ckpt, model, opt, sched, scaler, state, fingerprint, self.ema)
                    log.info("checkpoint saved: %s (epoch %d)", ckpt, epoch)
            if stop_after and epoch == stop_after and rt.is_main:
                log.warning("%s=%d: killing the job after this checkpoint", STOP_AFTER_EPOCH_ENV, stop_after)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)

        if state.best_state is not None:
            model.load_state_dict(state.best_state)
        if not rt.is_main:
            self._barrier()
            return None
        metrics = self._finish(model, spec, data, val_images, test_images, state, workers, t_start)
        self._barrier()
        return metrics

    def _barrier(self) -> None:
        if self.rt.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _eta(
        self, times: dict[bool, list[float]], first: int, current: tuple[bool, float] | None = None
    ) -> float:
        """Seconds left for epochs ``first``..end, from the mean measured time of head-only and full epochs."""
        known = {phase: float(np.mean(t)) for phase, t in times.items() if t}
        if current is not None:
            known.setdefault(*current)
        total = 0.0
        for e in range(first, self.epochs + 1):
            frozen = e <= self.cfg.freeze_epochs
            if frozen in known:
                total += known[frozen]
            elif known:
                # Not measured yet: a full epoch also backpropagates through the backbone, ~4x a head-only one.
                total += known[not frozen] * (0.25 if frozen else 4.0)
        return total

    # ----------------------------------------------------------------------------------------------------------
    def _train_epoch(
        self, model: LesionNet, net: nn.Module, frozen: bool, loader: DataLoader[tuple[torch.Tensor, int]],
        opt: torch.optim.Optimizer, sched: Any, scaler: Any, loss_fn: nn.Module, dtype: torch.dtype | None,
        epoch: int, steps: int, epoch_times: dict[bool, list[float]],
    ) -> dict[str, float]:
        rt = self.rt
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
                seen * rt.world_size / max(now - t0, 1e-9), _fmt_eta(left_epoch),
                _fmt_eta(left_epoch + self._eta(epoch_times, epoch + 1, this_epoch)),
            )

        stats = train_epoch(
            model, net, frozen, loader, opt, sched, scaler, loss_fn, rt.device, dtype, self.cfg.channels_last, steps,
            progress, self.always_frozen, self.ema.update if self.ema is not None else None,
        )
        stats["images_per_sec"] *= rt.world_size
        return stats

    # ----------------------------------------------------------------------------------------------------------
    def _finish(
        self, model: LesionNet, spec: PreprocessingSpec, data: Data, val_images: EvalImages,
        test_images: EvalImages, state: TrainState, workers: int, t_start: float,
    ) -> dict[str, Any]:
        """Export, evaluate the exported model, write the model and output directories."""
        cfg, rt, paths = self.cfg, self.rt, self.paths
        model_dir, out_dir = paths.model_dir, paths.output_data_dir
        model_dir.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        # A directory being written has no manifest: serving refuses it until the manifest comes, last.
        (model_dir / MANIFEST_NAME).unlink(missing_ok=True)

        cpu_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(cpu_state, model_dir / "model.pt")
        example = torch.zeros(1, 3, spec.height, spec.width)
        views = view_count(spec.height, spec.width) if cfg.tta == "dihedral" else 1
        export_torchscript(model, example, str(model_dir / "model.ts"), tta=views > 1)
        if views > 1:
            log.info("model.ts averages %d views of each image (tta=dihedral)", views)
        _json_dump(model_dir / "classes.json", classes_document(data.label_set))
        write_spec(spec, model_dir / "preprocessing.json")

        # Evaluate the artefact serving will load, in float32, so metrics.json describes exactly model.ts.
        ts = load_torchscript(model_dir / "model.ts", rt.device)
        fn = _torchscript_predict(ts)
        batch = eval_batch_size(cfg, rt.device, views)
        mb = 1 if cfg.dry_run else 0
        preds = {}
        for name, images in (("validation", val_images), ("test", test_images)):
            loader = _loader(EvalDataset(images, spec), batch, None, workers, rt.device)
            preds[name] = predict(fn, loader, rt.device, cfg.channels_last, None, True, mb)
        # Decision offsets, not a change to the classifier: model.ts keeps its calibrated probabilities (adding the
        # offsets to the logits would cost ROC-AUC and calibration), and the predicted class is the arg-max of
        # log p + offsets, in these metrics as in serving, which reads them from metrics.json.
        offsets, offset_scores = np.zeros(len(data.classes)), None
        if cfg.class_bias != "none" and not cfg.dry_run:
            offsets, before, after = choose_offsets(
                cfg.class_bias, preds["validation"].labels, preds["validation"].probs, self.bias_start
            )
            offset_scores = {"before": before, "after": after}
            log.info("decision offsets %s: validation balanced accuracy %.4f -> %.4f",
                     np.round(offsets, 2).tolist(), before, after)
        offsets = np.round(offsets, 4)
        mel = melanoma_index(data.label_set)
        val, test = preds["validation"], preds["test"]
        threshold = choose_threshold(val.labels == mel, val.probs[:, mel], cfg.melanoma_target_sensitivity)
        blocks = {
            n: evaluate_split(p.labels, p.probs, data.classes, threshold, mel, offsets) for n, p in preds.items()
        }

        baseline, baseline_error = None, None
        channel = paths.channel("baseline")
        if channel is not None and any(channel.iterdir()):
            try:
                baseline = evaluate_baseline(channel, data, val_images, test_images, rt, cfg, workers)
            except Exception as e:  # a broken baseline must not lose the new model: report it instead
                baseline_error = f"{type(e).__name__}: {e}"
                log.warning("baseline evaluation failed: %s", baseline_error)

        metrics: dict[str, Any] = {
            "label_set": data.label_set,
            "classes": list(data.classes),
            "architecture": cfg.arch,
            "melanoma_threshold": threshold,
            "decision_offsets": dict(zip(data.classes, offsets.tolist(), strict=True)),
            "decision_offsets_validation_balanced_accuracy": offset_scores,
            "n_train": len(data.train),
            "n_validation": len(val.labels),
            "n_test": len(test.labels),
            "validation": blocks["validation"],
            "test": blocks["test"],
            "baseline": baseline,
            "baseline_error": baseline_error,
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "history": state.history,
            "hyperparameters": cfg.as_strings(),
            "pretrained_weights": bool(cfg.pretrained),
            "dry_run": cfg.dry_run,
            "training_seconds": round(state.train_seconds, 1),
            "job_seconds": None,
        }

        # Drift reference from held-out images (validation + test), capped.
        assert val.embeddings is not None and test.embeddings is not None
        ref_emb = np.concatenate([val.embeddings, test.embeddings])
        ref_probs = np.concatenate([val.probs, test.probs])
        ref_labels = np.concatenate([val.labels, test.labels])
        ref_stats = val_images.stats[: len(val.labels)] + test_images.stats[: len(test.labels)]
        if len(ref_labels) > cfg.reference_max_images:
            keep = np.sort(np.random.default_rng(cfg.seed).choice(len(ref_labels), cfg.reference_max_images, False))
            ref_emb, ref_probs, ref_labels = ref_emb[keep], ref_probs[keep], ref_labels[keep]
            ref_stats = [ref_stats[i] for i in keep]
        reference = build_reference_stats(
            ref_emb, ref_probs, ref_labels, ref_stats, np.array([s.label for s in data.train]), data.label_set,
            data.classes, seed=cfg.seed, predicted=decide(ref_probs, offsets),
        )
        _json_dump(model_dir / "reference_stats.json", reference)
        write_known_answers(model_dir, spec, data.classes)

        eval_dir = model_dir / "evaluation"
        write_report(eval_dir, test.labels, test.probs, data.classes, blocks["test"]["ece"], state.history)
        metrics["job_seconds"] = round(time.time() - t_start, 1)
        _json_dump(model_dir / "metrics.json", metrics)
        _json_dump(out_dir / "metrics.json", metrics)
        # The last file of the model directory: every other file's digest. Its own digest identifies the model; the
        # byte-identical copy in the small output.tar.gz is where the pipeline reads it for the model package.
        manifest_sha256 = write_manifest(model_dir)
        shutil.copyfile(model_dir / MANIFEST_NAME, out_dir / MANIFEST_NAME)
        log.info("model directory sealed: %s sha256 %s", MANIFEST_NAME, manifest_sha256)
        shutil.copytree(eval_dir, out_dir / "evaluation", dirs_exist_ok=True)

        t = blocks["test"]
        final: dict[str, float | int | None] = {
            "melanoma_threshold": threshold,
            "test_balanced_accuracy": t["balanced_accuracy"],
            "test_accuracy": t["accuracy"],
            "test_macro_auc": t["macro_auc"],
            "test_melanoma_sensitivity": t["melanoma_sensitivity"],
            "test_melanoma_specificity": t["melanoma_specificity"],
            "test_melanoma_sensitivity_at_spec90": t["melanoma_sensitivity_at_spec90"],
            "test_ece": t["ece"],
        }
        if baseline is not None:
            final.update({
                "baseline_balanced_accuracy": baseline["balanced_accuracy"],
                "baseline_macro_auc": baseline["macro_auc"],
                "baseline_melanoma_sensitivity": baseline["melanoma_sensitivity"],
            })
        emit_metrics(final)
        log.info("done in %s; model directory %s", _fmt_eta(time.time() - t_start), model_dir)
        return metrics
