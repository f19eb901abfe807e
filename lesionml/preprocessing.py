"""The deterministic evaluation transform, shared by training (validation/test) and serving.

``preprocessing.json`` (written next to ``model.ts``) holds a :class:`PreprocessingSpec`::

    {"version": 3, "arch": "efficientnet_lite0", "height": 192, "width": 256,
     "mean": [0.498, 0.498, 0.498], "std": [0.502, 0.502, 0.502],
     "resize": "center_crop_to_aspect", "interpolation": "bilinear",
     "color": "RGB", "exif_transpose": true, "layout": "NCHW", "dtype": "float32", "scale": 255.0,
     "detail_width": 200, "detail_height": 150, "color_constancy": "shades_of_gray", "color_constancy_power": 6,
     "tone": "none", "tone_target": 0.5}

The transform: decode, apply the EXIF orientation, convert to RGB; when the picture holds more detail than the
training images did (its centred crop of the target aspect is larger than ``detail_width x detail_height``),
reduce it to that first (:func:`reduce_to_detail`: what a 600x450 original must go through to look like the
200x150 copies the model learnt from); crop the largest centred region with the target aspect ratio
(``width / height``; HAM10000's 4:3 images are not cropped at all), resize it to ``width x height`` with bilinear
filtering; with ``color_constancy: shades_of_gray``, divide each channel by its Minkowski ``p``-norm mean
(:func:`shades_of_gray`: another illuminant or white balance is undone); with ``tone: median_gamma``, then raise
every value to the power that takes the median of each pixel's brightest channel to ``tone_target``
(:func:`median_gamma`: another tone curve is undone; after the colour constancy, so that a cast does not move the
brightest channel it measures); scale to ``[0, 1]`` by dividing by ``scale`` and normalise per channel
``(x - mean) / std``. The result is a float32 ``(3, height, width)`` array; stack arrays for a batch.

Training applies the same detail cap to its images before augmenting them, and the same colour constancy and tone
after, so that an image reaches the network through one path whichever side of the model it is on. A version-1 file (no
detail cap, no colour constancy) and a version-2 file (no tone normalisation) still read, and mean what they meant.

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

SPEC_VERSION = 3
RESIZE_POLICIES = ("center_crop_to_aspect", "stretch")
COLOR_CONSTANCY = ("none", "shades_of_gray")
TONE = ("none", "median_gamma")
# A median this close to black or white says little about the tone curve; the exponent is bounded for the same reason.
_TONE_MEDIAN_RANGE = (0.02, 0.98)
_TONE_EXPONENT_RANGE = (1 / 3, 3.0)
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
    # 0 = no cap (every version-1 model).
    detail_width: int = 0
    detail_height: int = 0
    color_constancy: str = "none"
    color_constancy_power: float = 6.0
    tone: str = "none"
    tone_target: float = 0.5
    version: int = field(default=SPEC_VERSION)

    def __post_init__(self) -> None:
        if self.version > SPEC_VERSION:
            raise ValueError(f"preprocessing version {self.version} is newer than this code reads ({SPEC_VERSION})")
        if self.color_constancy not in COLOR_CONSTANCY:
            raise ValueError(f"unknown color_constancy {self.color_constancy!r}")
        if self.tone not in TONE:
            raise ValueError(f"unknown tone {self.tone!r}")
        if not 0 < self.tone_target < 1:
            raise ValueError("tone_target must be in (0, 1)")
        if self.detail_width < 0 or self.detail_height < 0:
            raise ValueError("detail_width and detail_height must be >= 0")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError("height and width must be positive")

    @property
    def per_image(self) -> bool:
        """Whether the input depends on the whole picture's statistics (tone or colour constancy), not on each
        pixel alone."""
        return self.color_constancy != "none" or self.tone != "none"

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
        kwargs["version"] = int(d.get("version", 1))
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


def detail_factor(width: int, height: int, spec: PreprocessingSpec) -> float:
    """How much a ``width x height`` picture must shrink per side to hold no more detail than the training images:
    ``min(1, detail_width / crop_w, detail_height / crop_h)`` over the part of it the model sees."""
    if not (spec.detail_width and spec.detail_height):
        return 1.0
    if spec.resize == "center_crop_to_aspect":
        left, top, right, bottom = crop_box_for_aspect(width, height, spec.width, spec.height)
        width, height = right - left, bottom - top
    return min(1.0, spec.detail_width / width, spec.detail_height / height)


def reduce_to_detail(img: Image.Image, spec: PreprocessingSpec) -> Image.Image:
    """``img`` shrunk by :func:`detail_factor` (antialiased bilinear), or ``img`` itself when it needs no shrinking."""
    factor = detail_factor(img.width, img.height, spec)
    if factor >= 1.0:
        return img
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(size, _INTERPOLATION[spec.interpolation])


def resize_for_model(img: Image.Image, spec: PreprocessingSpec) -> Image.Image:
    """Apply the detail cap and the spec's resize policy, returning a ``width x height`` RGB image."""
    img = reduce_to_detail(img, spec)
    box = (0, 0, img.width, img.height)
    if spec.resize == "center_crop_to_aspect":
        box = crop_box_for_aspect(img.width, img.height, spec.width, spec.height)
    if box == (0, 0, img.width, img.height) and img.size == (spec.width, spec.height):
        return img
    return img.resize((spec.width, spec.height), _INTERPOLATION[spec.interpolation], box=box)


def _power(x: np.ndarray, power: float) -> np.ndarray:
    """``x ** power`` by repeated squaring when ``power`` is a whole number (16x faster than ``np.power`` at p = 6,
    and this runs on every training image and every request)."""
    n = int(power)
    if n != power or not 1 <= n <= 64:
        return np.power(x, np.float32(power))
    out: np.ndarray | None = None
    base = x
    while True:
        if n & 1:
            # base is never changed in place (squaring makes a new array), so out may share it.
            out = base if out is None else out * base
        n >>= 1
        if not n:
            return out if out is not None else np.ones_like(x)
        base = base * base


def median_gamma(planes: np.ndarray, target: float) -> np.ndarray:
    """Tone normalisation on ``(3, N)`` float32 values in 0-255, in place: the power ``e`` that takes the median of
    each pixel's brightest channel to ``target`` (of full scale), applied to every channel as ``255 (v/255)^e``.

    Another camera's tone curve (gamma) is undone: a power law applied to all channels is one applied to their
    per-pixel maximum, whose median it moves by the same power (exactly so on its own; after Shades of Gray, whose
    gains a gamma also moves a little, nearly). Black stays black.
    """
    brightest = planes.max(axis=0)
    k = brightest.size // 2
    median = float(np.partition(brightest, k)[k]) / 255.0
    median = min(max(median, _TONE_MEDIAN_RANGE[0]), _TONE_MEDIAN_RANGE[1])
    e = min(max(np.log(target) / np.log(median), _TONE_EXPONENT_RANGE[0]), _TONE_EXPONENT_RANGE[1])
    if abs(e - 1.0) < 1e-4:
        return planes
    with np.errstate(divide="ignore"):
        np.log(planes * np.float32(1.0 / 255.0), out=planes)
    planes *= np.float32(e)
    np.exp(planes, out=planes)
    planes *= np.float32(255.0)
    return planes


def shades_of_gray(planes: np.ndarray, power: float) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson and Trezzi, 2004) on ``(3, N)`` float32 values in 0-255, in place.

    The illuminant of each channel is its Minkowski ``power``-norm mean; each channel is scaled so that the
    illuminant becomes grey at its mean level, then clipped to 0-255. A grey-lit picture is left as it is.
    """
    x = planes * np.float32(1.0 / 255.0)
    illuminant = np.power(_power(x, power).mean(axis=1).astype(np.float64), 1.0 / power)
    gains = np.where(illuminant > 1e-6, illuminant.mean() / np.maximum(illuminant, 1e-6), 1.0)
    planes *= gains.astype(np.float32)[:, None]
    np.clip(planes, 0.0, 255.0, out=planes)
    return planes


def model_input(planes: np.ndarray, height: int, width: int, spec: PreprocessingSpec) -> np.ndarray:
    """``(3, H*W)`` float32 values in 0-255 to the normalised ``(3, H, W)`` model input (colour constancy, then
    tone, then normalisation).

    Shared by :func:`normalise` and the training augmentation, which hands over its colour-jittered planes.
    """
    if spec.color_constancy == "shades_of_gray":
        shades_of_gray(planes, spec.color_constancy_power)
    if spec.tone == "median_gamma":
        median_gamma(planes, spec.tone_target)
    # (v / scale - mean) / std as one multiply-add per value.
    std = np.asarray(spec.std, dtype=np.float64)
    planes *= (1.0 / (spec.scale * std)).astype(np.float32)[:, None]
    planes += (-np.asarray(spec.mean, dtype=np.float64) / std).astype(np.float32)[:, None]
    return planes.reshape(3, height, width)


def normalise(pixels: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    """``(H, W, 3)`` uint8 pixels to a normalised float32 ``(3, H, W)`` array."""
    h, w, _ = pixels.shape
    planes = np.ascontiguousarray(pixels.reshape(-1, 3).T, dtype=np.float32)
    return model_input(planes, h, w, spec)


def preprocess(source: ImageSource, spec: PreprocessingSpec) -> np.ndarray:
    """The full evaluation transform: ``source`` to a float32 ``(3, height, width)`` array."""
    img = load_image(source, exif_transpose=spec.exif_transpose)
    return normalise(np.asarray(resize_for_model(img, spec)), spec)


def preprocess_batch(sources: list[ImageSource], spec: PreprocessingSpec) -> np.ndarray:
    """Preprocess several images into one float32 ``(N, 3, height, width)`` batch."""
    return np.stack([preprocess(s, spec) for s in sources])
