"""Each epoch's log says how long it waited for data and how much CPU it used, so a slow job can be read."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator

import torch
from torch import nn

from lesionml.models import LesionNet
from training_image.fit import train_epoch
from training_image.runtime import cpu_seconds


def _batches(n: int, delay: float) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(n):
        time.sleep(delay)  # a loader that decodes slowly
        yield torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, i % 3])


def _epoch(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = LesionNet(nn.Flatten(), 12, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    return train_epoch(
        model, model, False, batches, opt, sched, None, nn.CrossEntropyLoss(),  # type: ignore[arg-type]  # any iterable of batches
        torch.device("cpu"), None, False, steps,
    )


def test_waiting_for_a_slow_loader_is_counted_and_compute_is_not() -> None:
    slow = _epoch(_batches(4, 0.15), 4)
    assert 0.6 <= slow["data_wait_seconds"] < 1.5
    fast = _epoch(_batches(4, 0.0), 4)
    assert fast["data_wait_seconds"] < 0.1


def test_the_wait_for_a_batch_past_the_last_step_is_counted_too() -> None:
    # The loop asks for one batch more than it trains on only when the loader is longer than ``steps``.
    stats = _epoch(_batches(5, 0.15), 2)
    assert 0.4 <= stats["data_wait_seconds"] < 1.0


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_seconds_include_workers_that_have_exited() -> None:
    before = cpu_seconds()
    worker = multiprocessing.get_context("fork").Process(target=_burn, args=(0.5,))
    worker.start()
    worker.join()
    assert cpu_seconds() - before >= 0.45
