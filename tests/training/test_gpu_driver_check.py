"""A GPU host whose driver is too old for the image's CUDA fails the job at once, with the reason."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from training_image.train import GpuUnusableError, check_gpus_usable

DRIVER_470 = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May  2 14:37:44 UTC 2024\n"


def _torch(available: bool, cuda: str | None = "13.0") -> SimpleNamespace:
    return SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: available), version=SimpleNamespace(cuda=cuda))


def test_old_driver_fails_with_driver_and_cuda_named(tmp_path: Path) -> None:
    driver = tmp_path / "version"
    driver.write_text(DRIVER_470)
    with pytest.raises(GpuUnusableError) as info:
        check_gpus_usable(1, _torch(False, "13.0"), driver)
    message = str(info.value)
    assert "driver 470.256.02" in message and "CUDA 13.0" in message and ">= 580" in message


@pytest.mark.parametrize(("gpus", "available", "driver_present"), [
    (1, True, True),    # the GPU works
    (0, False, True),   # a CPU instance
    (2, False, False),  # CPU ranks standing in for GPUs: no NVIDIA driver on the host
])
def test_usable_or_cpu_hosts_pass(tmp_path: Path, gpus: int, available: bool, driver_present: bool) -> None:
    driver = tmp_path / "version"
    if driver_present:
        driver.write_text(DRIVER_470)
    check_gpus_usable(gpus, _torch(available), driver)
