"""MixStyle: training mixes the feature statistics of the images in a batch; evaluation and export never do."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import training_image.fit as fit
from lesionml.archs import STYLE_LAYERS
from lesionml.models import build_model, mix_styles, style_mixing
from training_image.config import build_config


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean((2, 3)), x.var((2, 3)).add(1e-6).sqrt()


def test_each_image_keeps_its_content_and_takes_a_mix_of_two_images_styles() -> None:
    torch.manual_seed(3)
    # Images whose channel statistics differ a lot, so each mix can be traced back to its two sources; alpha = 1
    # draws the weight uniformly, so most images move well away from their own style.
    n = 8
    x = torch.randn(n, 5, 6, 7) * torch.linspace(0.5, 4.0, n).view(n, 1, 1, 1) + torch.arange(float(n)).view(n, 1, 1, 1)
    out = mix_styles(x, alpha=1.0)
    mu, sig = _stats(x)
    out_mu, out_sig = _stats(out)
    # Content: the normalised maps are the input's.
    torch.testing.assert_close((out - out_mu[..., None, None]) / out_sig[..., None, None],
                               (x - mu[..., None, None]) / sig[..., None, None], atol=1e-4, rtol=1e-4)
    moved = 0
    for i in range(n):
        # Style: one weight lam and one partner j explain every channel's mean and standard deviation.
        fits = []
        for j in range(n):
            d_mu = mu[i] - mu[j]
            if j == i or d_mu.abs().max() < 1e-6:
                continue
            lam = ((out_mu[i] - mu[j]) / d_mu).mean()
            err = (lam * mu[i] + (1 - lam) * mu[j] - out_mu[i]).abs().max() + \
                (lam * sig[i] + (1 - lam) * sig[j] - out_sig[i]).abs().max()
            fits.append((float(err), float(lam)))
        err, lam = min(fits)
        own = float((out_mu[i] - mu[i]).abs().max()) < 1e-4  # the partner drawn may be itself
        assert own or (err < 1e-3 and -1e-4 <= lam <= 1 + 1e-4)
        moved += not own and lam < 0.99
    assert moved >= n // 2


def test_a_batch_of_one_is_left_alone_and_gradients_reach_the_input() -> None:
    x = torch.randn(1, 3, 4, 4)
    assert mix_styles(x) is x
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    mix_styles(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hooks_sit_on_the_style_layers_only_while_training_runs() -> None:
    model, _ = build_model("mobilenet_v3_small", 3, pretrained=False, image_size=(64, 48))
    model.train()
    modules = dict(model.backbone.named_modules())
    x = torch.randn(8, 3, 48, 64)
    torch.manual_seed(0)
    plain = model.backbone(x)
    with style_mixing(model, "mobilenet_v3_small", 1.0):
        assert sorted(n for n, m in modules.items() if m._forward_hooks) == sorted(STYLE_LAYERS["mobilenet_v3_small"])
        torch.manual_seed(0)
        mixed = model.backbone(x)
    assert not any(m._forward_hooks for m in modules.values())
    torch.manual_seed(0)
    assert torch.equal(model.backbone(x), plain)  # the same draws (dropout, if any) without mixing
    assert not torch.allclose(mixed, plain)
    with style_mixing(model, "mobilenet_v3_small", 0.0):
        assert not any(m._forward_hooks for m in modules.values())


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_the_fitter_trains_under_style_mixing_when_asked(monkeypatch: pytest.MonkeyPatch, p: float) -> None:
    model, _ = build_model("mobilenet_v3_small", 3, pretrained=False, image_size=(64, 48))
    hooked: list[list[str]] = []

    def fake_epoch(m: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
        hooked.append(sorted(n for n, mod in m.backbone.named_modules() if mod._forward_hooks))
        return {"images_per_sec": 1.0, "loss": 0.0, "accuracy": 0.0, "data_wait_seconds": 0.0}

    monkeypatch.setattr(fit, "train_epoch", fake_epoch)
    cfg = build_config({"arch": "mobilenet_v3_small", "mixstyle": str(p)})
    fitter = SimpleNamespace(
        cfg=cfg, rt=SimpleNamespace(is_main=True, world_size=1, device=torch.device("cpu")), steps_per_epoch=1,
        model=model, train_loader=[], opt=None, sched=None, scaler=None, loss_fn=None, dtype=None,
        always_frozen=frozenset(), ema=None, micro_batch=0,
    )
    fit.Fitter._train(fitter, model, False, 1)  # type: ignore[arg-type]
    assert hooked == [sorted(STYLE_LAYERS["mobilenet_v3_small"]) if p else []]
    assert not any(mod._forward_hooks for mod in model.backbone.modules())
