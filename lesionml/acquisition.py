"""Acquisition shifts: what differs between one clinic's pictures of a lesion and another's.

One module for the three places that need them, so that they measure and train against the same thing:

- :data:`SHIFTS`, each at a stated severity: the robustness benchmark (``benchmarks/training/shifts.py``) and
  the shifted validation set on which the melanoma threshold is chosen (``threshold_policy=shifted``);
- :func:`random_acquisition`: the training augmentation (``acquisition_aug``), drawn over wider ranges than the
  benchmark's severities.

Only numpy and Pillow: the inference image and the benchmarks use it without torch.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

Shift = Callable[[Image.Image], Image.Image]


def rescale(img: Image.Image, factor: float) -> Image.Image:
    """``img`` resized by ``factor`` per side (Pillow's filters are antialiased when they reduce)."""
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(size, Image.Resampling.BICUBIC if factor > 1 else Image.Resampling.BILINEAR)


def sharper_camera(img: Image.Image, factor: float = 3.0) -> Image.Image:
    """A larger, crisper picture: upsampled by ``factor`` and unsharp-masked.

    Stands for a camera with more pixels than the training images had, such as HAM10000's 600x450 originals
    against its 200x150 copies (the shift that halved melanoma sensitivity before ``detail_size``).
    """
    big = rescale(img, factor)
    return big.filter(ImageFilter.UnsharpMask(radius=2.0 * factor / 3.0, percent=120, threshold=2))


def resolution_chain(img: Image.Image, factor: float) -> Image.Image:
    """Down to ``factor`` of each side and back up: the detail lost by a smaller sensor or an earlier resize."""
    return rescale(img, factor).resize(img.size, Image.Resampling.BILINEAR)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Re-encoded as a baseline JPEG at ``quality`` (4:2:0 chroma, as cameras and most tools write)."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(quality))
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    return out.convert("RGB")


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def _image(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def colour_cast(img: Image.Image, gains: tuple[float, float, float]) -> Image.Image:
    """Per-channel gains: another illuminant or white balance."""
    return _image(_pixels(img) * np.asarray(gains, dtype=np.float32))


def gamma(img: Image.Image, g: float) -> Image.Image:
    """``out = 255 * (in / 255) ** g``: another tone curve (g < 1 brightens, g > 1 darkens)."""
    x = _pixels(img) / 255.0
    return _image(255.0 * np.power(x, g))


def vignette(img: Image.Image, strength: float) -> Image.Image:
    """Corners darkened by ``strength`` (0.5 halves them), falling off with the squared radius: a dermatoscope's
    round field of view and uneven lighting."""
    return _image(_pixels(img) * _falloff(img.height, img.width, strength)[..., None])


def _falloff(h: int, w: int, strength: float) -> np.ndarray:
    """``1 - strength * (r / r_corner) ** 2`` over an ``h x w`` picture (1 at the centre)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - (w - 1) / 2) / (w / 2)) ** 2 + ((yy - (h - 1) / 2) / (h / 2)) ** 2
    return (1.0 - strength * np.clip(r2 / 2.0, 0.0, 1.0)).astype(np.float32)


def squash_to_square(img: Image.Image) -> Image.Image:
    """Resized to a square without keeping the aspect ratio, as several published copies of the ISIC archive are
    (the shared second source's 512x512 images among them)."""
    side = min(img.size)
    return img.resize((side, side), Image.Resampling.BILINEAR)


# The benchmark's shifts at their stated severities. Each is a picture the model must still read as the clean one.
SHIFTS: dict[str, Shift] = {
    "sharper_camera_3x": sharper_camera,
    "resolution_half": lambda im: resolution_chain(im, 0.5),
    "jpeg_50": lambda im: jpeg(im, 50),
    "cast_warm": lambda im: colour_cast(im, (1.15, 1.0, 0.85)),
    "cast_cool": lambda im: colour_cast(im, (0.88, 1.0, 1.15)),
    "gamma_0.7": lambda im: gamma(im, 0.7),
    "gamma_1.4": lambda im: gamma(im, 1.4),
    "vignette_0.5": lambda im: vignette(im, 0.5),
    "squash_square": squash_to_square,
}
SEVERITIES: dict[str, str] = {
    "sharper_camera_3x": "3x the pixels per side (bicubic), unsharp mask radius 2, 120 %",
    "resolution_half": "down to half of each side and back",
    "jpeg_50": "JPEG quality 50",
    "cast_warm": "RGB gains 1.15, 1.00, 0.85",
    "cast_cool": "RGB gains 0.88, 1.00, 1.15",
    "gamma_0.7": "gamma 0.7 (brighter mid-tones)",
    "gamma_1.4": "gamma 1.4 (darker mid-tones)",
    "vignette_0.5": "corners at 50 % brightness",
    "squash_square": "4:3 squashed to 1:1",
}


@dataclass(frozen=True)
class AcquisitionRanges:
    """The training augmentation's ranges: each wider than the benchmark's severity, so that the benchmark's
    shifts lie inside what training has seen rather than at its edge."""

    p_resolution: float = 0.5
    resolution: tuple[float, float] = (0.35, 1.0)
    p_sharpen: float = 0.3
    p_jpeg: float = 0.4
    jpeg_quality: tuple[int, int] = (40, 95)
    p_cast: float = 0.5
    cast_sigma: float = 0.12
    # Every acquisition gets a tone curve. At 0.5 the deployed recipe missed the gamma 0.7 shift in 5 of 6 (seed,
    # source) pairs; at 1.0 with one epoch fewer (6, which keeps the CPU recipe well inside 30 minutes) in 2 of 6,
    # with half the misses overall and mean balanced accuracy within 0.01 (benchmarks/training/RESULTS.md, "J in
    # six epochs (J6)", decided by a rule set down before its runs).
    p_gamma: float = 1.0
    gamma: tuple[float, float] = (0.6, 1.6)
    p_vignette: float = 0.3
    vignette: tuple[float, float] = (0.2, 0.7)
    p_squash: float = 0.3
    squash: tuple[float, float] = (0.7, 1.0)


RANGES = AcquisitionRanges()


def random_squash(img: Image.Image, rng: np.random.Generator, ranges: AcquisitionRanges = RANGES) -> Image.Image:
    """Sometimes one side of ``img`` compressed: a copy resized without keeping its aspect ratio.

    Comes before the random crop, which restores the model's aspect from the squashed picture.
    """
    if rng.random() >= ranges.p_squash:
        return img
    s = float(rng.uniform(*ranges.squash))
    w, h = img.size
    size = (max(1, round(w * s)), h) if rng.random() < 0.5 else (w, max(1, round(h * s)))
    return img.resize(size, Image.Resampling.BILINEAR)


def random_acquisition(img: Image.Image, rng: np.random.Generator, ranges: AcquisitionRanges = RANGES) -> Image.Image:
    """A random acquisition of the model-sized ``img``: resolution, sharpening, tone, colour, vignetting, JPEG.

    Each effect is drawn independently with its probability; JPEG comes last, as a camera or an export would
    write it. Colour constancy (if the model uses it) comes after, in the preprocessing, and undoes most casts.
    """
    r = ranges
    if rng.random() < r.p_resolution:
        img = resolution_chain(img, float(rng.uniform(*r.resolution)))
    elif rng.random() < r.p_sharpen:
        img = img.filter(ImageFilter.UnsharpMask(radius=float(rng.uniform(1.0, 2.5)),
                                                 percent=int(rng.integers(50, 200)), threshold=2))
    x = _pixels(img)
    if rng.random() < r.p_gamma:
        lo, hi = np.log(r.gamma[0]), np.log(r.gamma[1])
        x = 255.0 * np.power(x / 255.0, float(np.exp(rng.uniform(lo, hi))))
    if rng.random() < r.p_cast:
        x = x * np.exp(rng.normal(0.0, r.cast_sigma, size=3)).astype(np.float32)
    if rng.random() < r.p_vignette:
        x = x * _falloff(x.shape[0], x.shape[1], float(rng.uniform(*r.vignette)))[..., None]
    img = _image(x)
    if rng.random() < r.p_jpeg:
        img = jpeg(img, int(rng.integers(r.jpeg_quality[0], r.jpeg_quality[1] + 1)))
    return img
