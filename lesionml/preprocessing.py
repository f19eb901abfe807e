"""The deterministic evaluation transform, shared by training (validation/test) and serving.

``preprocessing.json`` (written next to ``model.ts``) holds a :class:`PreprocessingSpec`::

    {"version": 1, "arch": "efficientnet_lite0", "height": 150, "width": 200,
     "mean": [0.498, 0.498, 0.498], "std": [0.502, 0.502, 0.502],
     "resize": "center_crop_to_aspect", "interpolation": "bilinear",
     "color": "RGB", "exif_transpose": true, "layout": "NCHW", "dtype": "float32", "scale": 255.0}

The transform: decode, apply the EXIF orientation, convert to RGB, crop the largest centred region with the
target aspect ratio (``width / height``; HAM10000's 4:3 images are not cropped at all), resize it to
``width x height`` with bilinear filtering, scale to ``[0, 1]`` by dividing by ``scale`` and normalise per channel
``(x - mean) / std``. The result is a float32 ``(3, height, width)`` array; stack arrays for a batch.

Only numpy and Pillow are needed, so the inference image can use it without torchvision.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

SPEC_VERSION = 1
RESIZE_POLICIES = ("center_crop_to_aspect", "stretch")
_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

ImageSource = str | Path | bytes | IO[bytes] | Image.Image


@dataclass(frozen=True)
class PreprocessingSpec:
    """Everything needed to turn an image file into the model's input."""

    arch: str
    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "center_crop_to_aspect"
    interpolation: str = "bilinear"
    color: str = "RGB"
    exif_transpose: bool = True
    layout: str = "NCHW"
    dtype: str = "float32"
    scale: float = 255.0
    version: int = field(default=SPEC_VERSION)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError("height and width must be positive")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessingSpec:
        """Inverse of :meth:`to_dict`; unknown keys are ignored so newer writers stay readable."""
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["mean"] = tuple(float(v) for v in d["mean"])
        kwargs["std"] = tuple(float(v) for v in d["std"])
        kwargs["height"], kwargs["width"] = int(d["height"]), int(d["width"])
        return cls(**kwargs)


def write_spec(spec: PreprocessingSpec, path: str | Path) -> None:
    """Write ``preprocessing.json``."""
    Path(path).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")


def read_spec(path: str | Path) -> PreprocessingSpec:
    """Read ``preprocessing.json``."""
    return PreprocessingSpec.from_dict(json.loads(Path(path).read_text()))


def load_image(source: ImageSource, exif_transpose: bool = True) -> Image.Image:
    """Decode ``source`` to an RGB PIL image with its EXIF orientation applied.

    Parameters
    ----------
    source : path, bytes, binary file or PIL image
        The encoded image (or an already decoded one).
    exif_transpose : bool
        Apply the EXIF orientation tag (phones store rotated pixels plus a tag).
    """
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (bytes, bytearray)):
        img = Image.open(io.BytesIO(source))
    else:
        img = Image.open(source)
    img.load()
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def crop_box_for_aspect(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int, int, int]:
    """Largest centred ``(left, top, right, bottom)`` box of a ``width x height`` image.

    Its aspect ratio is ``target_w / target_h``.
    """
    target = target_w / target_h
    if width / height > target:
        new_w = max(1, round(height * target))
        left = (width - new_w) // 2
        return left, 0, left + new_w, height
    new_h = max(1, round(width / target))
    top = (height - new_h) // 2
    return 0, top, width, top + new_h


def resize_for_model(img: Image.Image, spec: PreprocessingSpec) -> Image.Image:
    """Apply the spec's resize policy, returning a ``width x height`` RGB image."""
    box = (0, 0, img.width, img.height)
    if spec.resize == "center_crop_to_aspect":
        box = crop_box_for_aspect(img.width, img.height, spec.width, spec.height)
    if box == (0, 0, img.width, img.height) and img.size == (spec.width, spec.height):
        return img
    return img.resize((spec.width, spec.height), _INTERPOLATION[spec.interpolation], box=box)


def normalise(pixels: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    """``(H, W, 3)`` uint8 pixels to a normalised float32 ``(3, H, W)`` array."""
    x: np.ndarray = pixels.astype(np.float32) / np.float32(spec.scale)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(source: ImageSource, spec: PreprocessingSpec) -> np.ndarray:
    """The full evaluation transform: ``source`` to a float32 ``(3, height, width)`` array."""
    img = load_image(source, exif_transpose=spec.exif_transpose)
    return normalise(np.asarray(resize_for_model(img, spec)), spec)


def preprocess_batch(sources: list[ImageSource], spec: PreprocessingSpec) -> np.ndarray:
    """Preprocess several images into one float32 ``(N, 3, height, width)`` batch."""
    return np.stack([preprocess(s, spec) for s in sources])
