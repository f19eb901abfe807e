#!/usr/bin/env python
"""SageMaker training entry point.

    python training_image/train.py train [--name value ...]

SageMaker starts the container with the single argument ``train``; flags after it override hyperparameters.
Paths, hyperparameter sources and environment overrides are described in :mod:`training_image.config`.
Exit status: 0 success, 2 bad hyperparameters or inputs, 1 any other error, 143 SIGTERM; on failure one line
with the reason is written to ``<output>/failure``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from training_image.config import (
    ConfigError,
    Paths,
    build_config,
    parse_cli,
    read_hyperparameter_file,
    read_sm_hps,
    resolve_cluster,
    resolve_paths,
)

log = logging.getLogger("train")
MAX_FAILURE_CHARS = 1000  # SageMaker truncates FailureReason at 1024 characters


class JobTerminated(Exception):
    """SIGTERM: SageMaker stops the job (StopTrainingJob, max runtime, spot interruption)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise JobTerminated("terminated by SIGTERM (job stopped, out of time or spot interruption)")


def write_failure(paths: Paths, reason: str) -> None:
    """Write the one-line failure reason SageMaker reports as FailureReason."""
    line = " ".join(reason.split())[:MAX_FAILURE_CHARS] or "training failed"
    try:
        paths.failure_file.parent.mkdir(parents=True, exist_ok=True)
        paths.failure_file.write_text(line + "\n")
    except OSError as e:
        log.error("cannot write %s: %s", paths.failure_file, e)


def _torchrun(cluster_hosts: Sequence[str], current: str, gpus: int, argv: Sequence[str]) -> int:
    """Re-run this script under torchrun: one process per GPU on every host."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={max(gpus, 1)}"]
    if len(cluster_hosts) == 1:
        # One host: a local rendezvous, no need for the host name to resolve.
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={len(cluster_hosts)}", f"--node_rank={list(cluster_hosts).index(current)}",
            f"--master_addr={cluster_hosts[0]}", "--master_port=29500",
        ]
    cmd += [str(Path(__file__).resolve()), "train", *argv]
    log.info("launching %s", " ".join(cmd))
    return subprocess.call(cmd)


# Oldest Linux driver each CUDA major version runs on (NVIDIA's minor-version compatibility; without the
# cuda-compat forward-compatibility libraries).
_MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


class GpuUnusableError(RuntimeError):
    """The host has GPUs that this image's CUDA build cannot use."""


def check_gpus_usable(num_gpus: int, torch: Any, driver_file: Path = Path("/proc/driver/nvidia/version")) -> None:
    """Fail in seconds, with the reason, when the host's NVIDIA GPUs are there but torch cannot reach them.

    Without this a driver older than the image's CUDA build would train on the CPU for the whole
    MaxRuntimeInSeconds before failing on time. A host without an NVIDIA driver (CPU ranks standing in for GPUs,
    as the tests run them) is left alone.
    """
    if num_gpus <= 0 or not driver_file.is_file() or torch.cuda.is_available():
        return
    found = re.search(r"Kernel Module\s+([0-9.]+)", driver_file.read_text(errors="replace"))
    driver = found.group(1) if found else "unknown"
    cuda = str(torch.version.cuda or "none")
    major = int(cuda.split(".")[0]) if cuda[:1].isdigit() else 0
    need = _MIN_DRIVER.get(major, "a newer one")
    raise GpuUnusableError(
        f"the host has {num_gpus} GPU(s) with NVIDIA driver {driver}, but CUDA cannot use them: this image's torch "
        f"is built for CUDA {cuda}, which needs a driver >= {need}; rebuild the training image on a base with an "
        f"older CUDA (training_image/Dockerfile BASE_IMAGE) or choose an instance type whose host driver is newer")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "train":
        args = args[1:]
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    paths = resolve_paths()
    # As PID 1 in a container, Python would otherwise ignore SIGTERM until SageMaker's SIGKILL.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cfg = build_config(read_hyperparameter_file(paths), read_sm_hps(paths.env), parse_cli(args))
        log.info("hyperparameters: %s", " ".join(f"{k}:{v}" for k, v in cfg.as_strings().items()))
        import torch  # after validation, so bad hyperparameters fail in milliseconds

        cluster = resolve_cluster(paths, torch.cuda.device_count)
        check_gpus_usable(cluster.num_gpus, torch)
        if cluster.world_size > 1 and "WORLD_SIZE" not in os.environ and not cfg.dry_run:
            rc = _torchrun(cluster.hosts, cluster.current_host, cluster.num_gpus, args)
            if rc != 0 and not paths.failure_file.exists():
                write_failure(paths, f"distributed training exited with status {rc}")
            return rc
        from training_image.trainer import run

        run(cfg, paths, cluster)
        return 0
    except ConfigError as e:
        log.error("%s", e)
        write_failure(paths, str(e))
        return 2
    except JobTerminated as e:
        log.error("%s", e)
        write_failure(paths, str(e))
        return 143
    except Exception as e:
        traceback.print_exc()
        write_failure(paths, f"{type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
