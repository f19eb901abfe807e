"""The weight average that a job validates, selects and exports (``ema_decay``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


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
