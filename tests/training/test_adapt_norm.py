"""benchmarks.training.adapt_norm: norm statistics re-estimated on unlabelled pictures, and only where asked."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.training.adapt_norm import adapt_norm_statistics


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5))


def test_adapted_layers_hold_the_new_pictures_statistics_and_the_rest_are_untouched() -> None:
    net = _net()
    first, second = net[1], net[5]
    with torch.no_grad():
        first.running_mean.fill_(7.0)
        second.running_mean.fill_(-3.0)
    kept = {k: v.clone() for k, v in second.state_dict().items()}
    batches = [torch.randn(6, 3, 8, 8) * 2 + 5, torch.randn(2, 3, 8, 8) * 2 + 5]

    adapt_norm_statistics(net, batches, [first])

    # A cumulative average over the batches, not the default exponential one (momentum 0.1 would stay near 7).
    with torch.no_grad():
        per_batch = [net[0](x).mean(dim=(0, 2, 3)) for x in batches]
    expected = (per_batch[0] + per_batch[1]) / 2
    assert torch.allclose(first.running_mean, expected, atol=1e-5)
    assert int(first.num_batches_tracked) == 2
    assert all(torch.equal(second.state_dict()[k], v) for k, v in kept.items())
    assert not any(m.training for m in net.modules())


def test_the_adapted_model_changes_its_answers_only_through_the_statistics() -> None:
    net = _net()
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    x = torch.randn(4, 3, 8, 8) * 3 + 2
    before = net.eval()(x)

    adapt_norm_statistics(net, [x], [net[5]])

    after = net(x)
    assert not torch.allclose(before, after)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())
    # Estimated on exactly this batch (and nothing before it adapted): the last layer's output is centred on it.
    assert torch.allclose(after.mean(dim=(0, 2, 3)), net[5].bias, atol=1e-4)
