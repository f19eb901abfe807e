"""Architecture names and their input normalisation, without importing torch (config validation uses it)."""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (x - 127) / 128 for x in 0..255, i.e. mean 127/255 and std 128/255.
LITE_MEAN = (0.498, 0.498, 0.498)
LITE_STD = (0.502, 0.502, 0.502)

TORCHVISION_ARCHS: tuple[str, ...] = (
    "resnet50",
    *(f"efficientnet_b{i}" for i in range(8)),
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
)
ARCHITECTURES: tuple[str, ...] = (*TORCHVISION_ARCHS, "efficientnet_lite0")


def norm_mean_std(arch: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Normalisation ``(mean, std)`` that ``arch``'s pretrained weights expect (applied to ``[0, 1]`` pixels)."""
    if arch == "efficientnet_lite0":
        return LITE_MEAN, LITE_STD
    return IMAGENET_MEAN, IMAGENET_STD
