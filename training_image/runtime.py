"""Where and how the job runs: threads, device, process group, seeds, autocast, loader sizes; and the lines it prints.

Everything here depends on the machine, not on the model: one process on a CPU or a GPU, or one DDP rank under
torchrun (``train.py`` re-runs itself there when the job has more than one GPU or host).
"""

from __future__ import annotations

import logging
import math
import os
import random
import resource
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lesionml.allocator import keep_freed_memory
from training_image.config import Cluster, Config

log = logging.getLogger("train")


def emit_metrics(values: dict[str, float | int | None]) -> None:
    """Print one ``name=value;`` line for SageMaker MetricDefinitions (non-finite values are left out)."""
    parts = []
    for k, v in values.items():
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        parts.append(f"{k}={v};" if isinstance(v, int) else f"{k}={v:.6g};")
    print(" ".join(parts), flush=True)


def cpu_seconds() -> float:
    """User and system CPU time of this process and of its children that have exited (the loader's workers).

    Loader workers are not persistent, so an epoch's workers have exited, and count, by the time its validation ends.
    Well under vCPUs x wall seconds means the job sat idle; near it, the job was compute-bound.
    """
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def fmt_eta(seconds: float) -> str:
    """``h:mm:ss``."""
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


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device``, or nothing for float32."""
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

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


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


def start(cfg: Config, cluster: Cluster) -> Runtime:
    """Set the process up for training: placement, seeds (one stream per rank), cuDNN autotuning, quiet ranks."""
    rt = setup_runtime(cfg, cluster)
    keep_freed_memory()  # before the loader's workers fork, so that they inherit it
    if not rt.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(cfg.seed + rt.rank)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return rt


def loader_workers(cfg: Config, device: torch.device) -> int:
    """Data loader worker processes for ``num_workers`` (``auto`` = -1 depends on the machine)."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(8, cpus - 1))
    # On CPU the workers compete with the math threads; only a wide machine gains from them.
    return 0 if cpus <= 4 else min(4, cpus // 4)


def eval_batch_size(cfg: Config, device: torch.device, views: int = 1) -> int:
    """Loader batch for evaluation: ``eval_batch_size`` images per forward pass, of which each image takes ``views``.

    ``auto``: 64 on a GPU; 4 on a CPU, where a small batch's activations stay in cache (float32 Lite0 at 256x192 on
    the 2-core machine: 76 images/s at 4, 35 at 64; bf16 194 and 81).
    """
    per_pass = cfg.eval_batch_size if cfg.eval_batch_size > 0 else (64 if device.type == "cuda" else 4)
    return max(1, per_pass // views)
