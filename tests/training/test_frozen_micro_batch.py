"""The layers that do not train run a few images at a time on a CPU, with the same results as the whole batch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lesionml import models
from lesionml.models import LesionNet
from training_image.fit import train_epoch

SIZE = (64, 96)


def _lite0() -> LesionNet:
    torch.manual_seed(0)
    model, _ = models.build_model("efficientnet_lite0", 7, pretrained=False, image_size=SIZE)
    return model


def _batch_sizes_seen(module: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    seen: list[int] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[0])))
    return seen, handle


def _names(model: LesionNet, units: list[nn.Module]) -> list[str]:
    by_id = {id(m): n for n, m in model.backbone.named_modules()}
    return [by_id[id(u)] for u in units]


def test_frozen_units_are_the_largest_modules_before_trainable_from() -> None:
    model = _lite0()
    units = models.frozen_units(model, models.leading_backbone_params(model, "net._blocks.6"))
    assert _names(model, units) == ["net._conv_stem", "net._bn0"] + [f"net._blocks.{i}" for i in range(6)]
    assert models.frozen_units(model, frozenset()) == []

    resnet, _ = models.build_model("resnet50", 7, pretrained=False)
    fixed = models.leading_backbone_params(resnet, "layer2")
    assert _names(resnet, models.frozen_units(resnet, fixed)) == ["conv1", "bn1", "layer1"]


def _step(model: LesionNet, x: torch.Tensor, y: torch.Tensor, micro_batch: int, frozen: bool) -> float:
    always = models.leading_backbone_params(model, "net._blocks.6")
    models.freeze_backbone(model, False, always)
    opt = torch.optim.SGD(models.param_groups(model, 0.1, 1.0, 0.0), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    # The same seed on both sides: stochastic depth in the frozen blocks must draw the same masks.
    torch.manual_seed(123)
    stats = train_epoch(
        model, model.head if frozen else model, frozen, [(x, y)], opt, sched, None, nn.CrossEntropyLoss(),
        torch.device("cpu"), None, True, 1, None, always, None, micro_batch,
    )
    return stats["loss"]


@pytest.mark.parametrize("frozen", [False, True], ids=["fine-tuning", "head-only"])
def test_a_micro_batched_training_step_equals_the_whole_batch(frozen: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(12, 3, *SIZE)
    y = torch.randint(0, 7, (12,))
    whole, split = _lite0(), _lite0()
    seen_frozen, h1 = _batch_sizes_seen(split.backbone.net._blocks[2]._depthwise_conv)
    seen_trained, h2 = _batch_sizes_seen(split.backbone.net._blocks[8]._depthwise_conv)

    loss_whole = _step(whole, x, y, 0, frozen)
    loss_split = _step(split, x, y, 4, frozen)
    h1.remove()
    h2.remove()

    assert seen_frozen == [4, 4, 4]
    # Blocks that train keep the whole batch (their norm layers learn batch statistics); head-only: all frozen.
    assert seen_trained == ([4, 4, 4] if frozen else [12])
    assert loss_split == pytest.approx(loss_whole, rel=1e-5)
    for (name, a), b in zip(whole.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_norm_layers_that_learn_turn_the_split_off() -> None:
    model = _lite0()
    unit = model.backbone.net._blocks[1]
    seen, handle = _batch_sizes_seen(unit._depthwise_conv)
    x = torch.randn(8, 16, 32, 48)
    unit.train()
    with torch.no_grad(), models.micro_batched([unit], 4):
        unit(x)
    unit.eval()
    with torch.no_grad(), models.micro_batched([unit], 4):
        unit(x)
    handle.remove()
    assert seen == [8, 4, 4]


def test_the_split_is_undone_on_the_way_out_even_after_an_error() -> None:
    model = _lite0().eval()
    unit = model.backbone.net._blocks[1]
    seen, handle = _batch_sizes_seen(unit._depthwise_conv)
    x = torch.randn(8, 16, 32, 48)

    with pytest.raises(RuntimeError, match="stop"), torch.no_grad(), models.micro_batched([unit], 4):
        unit(x)
        raise RuntimeError("stop")
    assert "forward" not in vars(unit)
    with torch.no_grad():
        unit(x)
    handle.remove()
    assert seen == [4, 4, 8]
    # A deep copy after the block (the weight average's) is an ordinary module again.
    assert "forward" not in vars(copy.deepcopy(unit))


def test_the_fine_tuning_job_keeps_frozen_norm_layers_fixed() -> None:
    # The premise of the split: the frozen units' norm layers are the ones train_epoch puts in eval mode.
    model = _lite0()
    always = models.leading_backbone_params(model, "net._blocks.6")
    fixed = {id(m) for m in models.fixed_norm_layers(model, always)}
    for unit in models.frozen_units(model, always):
        norms = [m for m in unit.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms or isinstance(unit, nn.Conv2d)
        assert all(id(m) in fixed for m in norms)


def test_the_eta_before_a_full_epoch_is_measured_follows_trainable_from() -> None:
    from types import SimpleNamespace

    from training_image.fit import Fitter

    def eta(always_frozen: frozenset[str]) -> float:
        fitter = SimpleNamespace(
            epoch_times={True: [100.0], False: []}, cfg=SimpleNamespace(freeze_epochs=1), epochs=3,
            always_frozen=always_frozen,
        )
        return Fitter._eta(fitter, 2)  # type: ignore[arg-type]

    # After the head-only epoch: two full epochs to go.
    assert eta(frozenset({"net._conv_stem.weight"})) == pytest.approx(400.0)
    assert eta(frozenset()) == pytest.approx(800.0)
