"""Realistic near-duplicate variants of an upload, and the clean hashes validation gives them.

A variant is what a second copy of a picture looks like when it reaches us by another route: re-encoded by some
other software (JPEG quality 70-95), downsized (0.5-0.9), or lightly cropped (2-5 % of each side in total) and
re-saved. Every variant is deterministic (no randomness), so runs compare.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Final

from PIL import Image

from lesion_imaging.validation import ValidationLimits, validate_image_bytes

REPO = Path(__file__).resolve().parents[2]

SHARED: Final = REPO.parent / "shared" / "data"
HAM_IMAGES: Final = SHARED / "ham10000" / "images"
SAMPLE_IMAGES: Final = REPO / "data" / "sample" / "images"
LIMITS: Final = ValidationLimits()


def image_paths() -> list[Path]:
    """The shared HAM10000 images (sorted), or the bundled sample where the shared set is absent."""
    folder = HAM_IMAGES if HAM_IMAGES.is_dir() else SAMPLE_IMAGES
    return sorted(folder.glob("*.jpg"))


def _save(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def reencode(quality: int) -> Callable[[Image.Image], bytes]:
    """Re-encode at ``quality``."""
    return lambda im: _save(im, quality)


def resize(scale: float) -> Callable[[Image.Image], bytes]:
    """Downsize by ``scale`` (Lanczos), saved at quality 90."""
    def apply(im: Image.Image) -> bytes:
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        return _save(im.resize(size, Image.Resampling.LANCZOS), 90)
    return apply


def crop(fraction: float) -> Callable[[Image.Image], bytes]:
    """Cut ``fraction`` of the width and of the height, split between both sides, saved at quality 90."""
    def apply(im: Image.Image) -> bytes:
        dx, dy = round(im.width * fraction / 2), round(im.height * fraction / 2)
        return _save(im.crop((dx, dy, im.width - dx, im.height - dy)), 90)
    return apply


VARIANTS: Final[dict[str, Callable[[Image.Image], bytes]]] = {
    "jpeg_q95": reencode(95),
    "jpeg_q85": reencode(85),
    "jpeg_q70": reencode(70),
    "resize_0.9": resize(0.9),
    "resize_0.7": resize(0.7),
    "resize_0.5": resize(0.5),
    "crop_2pct": crop(0.02),
    "crop_5pct": crop(0.05),
}


def make_variant(data: bytes, name: str) -> bytes:
    """The variant ``name`` of the JPEG ``data``."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return VARIANTS[name](im)


def clean_hashes(data: bytes) -> tuple[str, str]:
    """``(sha256, phash)`` of the clean image validation makes of ``data``."""
    clean = validate_image_bytes(data, limits=LIMITS)
    return clean.sha256, clean.phash
