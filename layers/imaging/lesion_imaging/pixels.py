"""Decoded pixels to what the model sees: the one definition for upload validation and for serving.

The model is trained on what upload validation stored and is served what the inference image decodes; both take a
decoded Pillow image through these steps, so the two cannot drift apart: EXIF orientation applied, an embedded
colour profile converted to sRGB, 16-bit grey scaled (not clipped) to 8 bits, 32-bit float grey scaled to 8 bits,
alpha dropped (not composited), CMYK, palette and grey to RGB. The damaged-JPEG check (the decoder's grey fill) is
here too. Used by ``lesion_imaging.validation`` (the imaging layer) and ``inference_image.imaging`` (the inference
image copies this package, see its Dockerfile).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from typing import Final

import numpy as np
from PIL import Image, ImageCms

EXIF_ORIENTATION: Final = 0x0112
# Where Pillow's getexif() finds an orientation: EXIF (JPEG APP1, PNG eXIf), ImageMagick's PNG text, or XMP.
ORIENTATION_SOURCES: Final = frozenset({"exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp"})
TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# What Pillow raises on malformed input varies by plugin and by where the damage is; all of it means "unreadable".
# MemoryError too: a crafted header can make a decoder ask for more than the process has.
DECODE_ERRORS: Final = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
)
SIXTEEN_BIT_MODES: Final = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def orientation(im: Image.Image) -> int:
    """The EXIF orientation, 1 when absent or unreadable (a broken EXIF block must not refuse the picture)."""
    if not ORIENTATION_SOURCES & im.info.keys():  # most pictures: skip building an Exif object
        return 1
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and value in TRANSPOSE else 1


def apply_orientation(im: Image.Image, conversions: list[str]) -> Image.Image:
    """``im`` turned upright by its EXIF orientation (recorded as ``exif_orientation_N``)."""
    value = orientation(im)
    if value == 1:
        return im
    conversions.append(f"exif_orientation_{value}")
    return im.transpose(TRANSPOSE[value])


def sixteen_bit_to_l(im: Image.Image) -> Image.Image:
    """Scale 16-bit grey (0..65535) to 8 bits; Pillow's own ``convert("L")`` clips at 255 instead of scaling."""
    arr = np.asarray(im)  # uint16 for I;16*, int32 for I
    if arr.dtype != np.uint16:
        arr = np.clip(arr, 0, 65535)
    wide = arr.astype(np.uint32)
    # In place: a 40 MP image is 160 MB as uint32; temporaries would double it.
    wide *= 255
    wide += 32767
    wide //= 65535
    return Image.fromarray(wide.astype(np.uint8))  # uint8 2-D: mode L


def float_to_l(im: Image.Image) -> Image.Image:
    """32-bit float grey (TIFF): values in [0, 1] are taken as intensities, anything else is min-max scaled."""
    arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.round(arr * 255).astype(np.uint8))


def to_rgb(im: Image.Image, conversions: list[str]) -> Image.Image:
    """Any decoded mode to 8-bit RGB (recorded as ``MODE->RGB``): alpha is dropped, not composited, so lesion
    pixels keep their values."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in SIXTEEN_BIT_MODES:
        out = sixteen_bit_to_l(im).convert("RGB")
    elif mode == "F":
        out = float_to_l(im).convert("RGB")
    elif mode in ("RGBA", "RGBa", "RGBX"):
        out = im.convert("RGB")
    elif mode in ("LA", "La", "PA"):
        out = im.convert("RGBA" if mode == "PA" else "LA").convert("RGB")
    elif mode == "P" and "transparency" in im.info:
        # Straight to RGB would warn and still drop the transparency; say so by going through RGBA.
        out = im.convert("RGBA").convert("RGB")
    else:  # L, 1, P, CMYK (Pillow inverts Adobe CMYK JPEGs on load), YCbCr, LAB, HSV
        out = im.convert("RGB")
    conversions.append(f"{mode}->RGB")
    return out


@functools.lru_cache(maxsize=16)
def icc_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """Profile-to-sRGB transform, cached: phones embed the same few profiles and building one costs milliseconds.

    None when littlecms cannot use the profile.
    """
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.buildTransform(src, ImageCms.createProfile("sRGB"), mode, "RGB")
    except (ImageCms.PyCMSError, *DECODE_ERRORS):
        return None


def apply_icc(im: Image.Image, conversions: list[str]) -> Image.Image:
    """Convert an embedded colour profile to sRGB (``icc->sRGB``); an unusable profile is ignored
    (``icc_ignored``: the pixels are then taken as sRGB, as most viewers do)."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "CMYK", "L"):
        return im
    transform = icc_transform(bytes(icc), im.mode)
    if transform is None:
        conversions.append("icc_ignored")
        return im
    try:
        out = ImageCms.applyTransform(im, transform)
    except (ImageCms.PyCMSError, *DECODE_ERRORS):
        conversions.append("icc_ignored")
        return im
    if out is None:  # only in place
        return im
    conversions.append("icc->sRGB")
    return out


def upright_rgb(im: Image.Image, conversions: list[str]) -> Image.Image:
    """A decoded picture as the model sees it: upright, sRGB, 8-bit RGB (each step recorded in ``conversions``).

    Modes the colour-management step cannot take (16-bit, float, alpha, palette) go to RGB first.

    Raises
    ------
    Exception
        One of :data:`DECODE_ERRORS` when Pillow fails on lazily decoded data; the caller refuses the picture.
    """
    im = apply_orientation(im, conversions)
    if im.mode not in ("RGB", "CMYK", "L"):
        im = to_rgb(im, conversions)
    im = apply_icc(im, conversions)
    return to_rgb(im, conversions)


def bottom_is_grey(im: Image.Image) -> bool:
    """Cheap screen for the decoder's grey fill: three pixels of the bottom row (the fill spans whole rows)."""
    if im.mode not in ("RGB", "L") or im.height < 8:
        return False
    grey = (128, 128, 128) if im.mode == "RGB" else 128
    y = im.height - 1
    return all(im.getpixel((x, y)) == grey for x in (0, im.width // 2, im.width - 1))


def grey_filled_scan(im: Image.Image) -> bool:
    """A decoded JPEG whose bottom 8 rows are the decoder's exact grey fill: its scan data was damaged.

    When entropy-coded data is damaged, libjpeg resynchronises at the end marker and paints the remaining blocks
    (Y=Cb=Cr=128, i.e. RGB 128,128,128) without raising; Pillow hides its "premature end of data segment" warning.
    Exact 128 across the full width of the bottom 8 rows does not occur in photographs (none of HAM10000's).
    """
    if not bottom_is_grey(im):
        return False
    band = im.crop((0, im.height - 8, im.width, im.height)).getextrema()
    extrema = [band] if im.mode == "L" else band
    return all(lo == hi == 128 for lo, hi in extrema)  # type: ignore[misc]
