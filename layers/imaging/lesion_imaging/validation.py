"""Decide whether uploaded bytes are a usable image, and produce its clean copy.

The checks run cheapest first and everything that can be refused from the header is refused before any pixel is
decoded. The clean copy is an 8-bit RGB baseline JPEG with the EXIF orientation applied and no metadata at all
(no EXIF/GPS, ICC, XMP, comments or PNG text): uploads can carry patient or device data, and the training and
serving code must see the same pixels whatever the source encoding was.

Whether the picture shows a skin lesion is not decided here; that is the model's out-of-distribution job. Only
images that carry no photographic content (blank, or two-level masks and line art) are refused.
"""

from __future__ import annotations

import functools
import hashlib
import io
import warnings
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from lesion_imaging.jpeg_strip import strip_jpeg_metadata
from lesion_imaging.pixels import DECODE_ERRORS, grey_filled_scan, upright_rgb

JPEG_MAGIC: Final = b"\xff\xd8\xff"
PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
# Pillow names a JPEG with an MPF extension (phones, some cameras) "MPO"; its first frame is the picture.
_PIL_FORMATS: Final = {"JPEG": ("JPEG", "MPO"), "PNG": ("PNG",)}
# The decode errors that mean "unreadable" (lesion_imaging.pixels, shared with serving; MemoryError included).
_DECODE_ERRORS: Final = DECODE_ERRORS
JPEG_QUALITY: Final = 95
PHASH_THUMB: Final = 64  # DCT input side
THUMB_SHORT: Final = 96  # short side of the grey working copy the hash and the content checks use
PHASH_KEEP: Final = 16  # the hash keeps the PHASH_KEEP x PHASH_KEEP lowest frequencies: 256 bits
# Largest phash Hamming distance taken as "the same picture". On all 10,015 HAM10000 images (measured by
# benchmarks/validation/bench_validate.py --phash-study, see RESULTS.md there): a JPEG q75 re-encode moves <= 2
# bits, +10% brightness <= 16, half size <= 18, 3x upscale <= 12; the nearest *different* lesion is >= 44 bits
# away for 99.9% of images, and the one pair under 24 is the same photograph filed under two lesion ids.
NEAR_DUPLICATE_BITS: Final = 24
# Luminance std below this (0-255 scale) is a blank frame; HAM10000 images measure >= 4.8 on the working copy.
BLANK_STD: Final = 2.0
# Two grey levels holding this share of the pixels is a mask or line art; HAM10000 peaks at 0.36.
BINARY_SHARE: Final = 0.95


class ImagingConfigError(RuntimeError):
    """The process is configured so that validation cannot be trusted (a programming error, not bad input)."""


class ImageValidationError(Exception):
    """Base of every refusal; ``reason_code`` is stable and machine-readable, ``message`` is for people."""

    reason_code: str = "invalid_image"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EmptyFileError(ImageValidationError):
    """Zero bytes."""

    reason_code = "empty_file"


class FileTooLargeError(ImageValidationError):
    """More bytes than the upload limit."""

    reason_code = "file_too_large"


class UnsupportedFormatError(ImageValidationError):
    """Not a JPEG or PNG by its content (the file name is not trusted)."""

    reason_code = "unsupported_format"


class DecompressionBombError(ImageValidationError):
    """The header claims more pixels than the limit; refused before decoding."""

    reason_code = "decompression_bomb"


class TruncatedImageError(ImageValidationError):
    """The pixel data ends early."""

    reason_code = "truncated_image"


class CorruptImageError(ImageValidationError):
    """The header or the pixel data cannot be decoded."""

    reason_code = "corrupt_image"


class ImageTooSmallError(ImageValidationError):
    """A side is shorter than the minimum."""

    reason_code = "too_small"


class ImageTooLargeError(ImageValidationError):
    """A side is longer than the maximum."""

    reason_code = "too_large"


class AspectRatioError(ImageValidationError):
    """Long side / short side exceeds the limit."""

    reason_code = "aspect_ratio"


class BlankImageError(ImageValidationError):
    """(Nearly) one colour: all black, all white, a flat frame."""

    reason_code = "blank_image"


class BinaryImageError(ImageValidationError):
    """Almost all pixels take two values: a segmentation mask, a silhouette or line art, not a photograph."""

    reason_code = "binary_image"


@dataclass(frozen=True)
class ValidationLimits:
    """Size limits an image must meet.

    Parameters
    ----------
    min_side, max_side
        Shortest and longest allowed side in pixels.
    max_pixels
        Largest width * height; checked from the header before decoding.
    max_aspect_ratio
        Largest long side / short side.
    max_bytes
        Largest encoded size.
    """

    min_side: int = 64
    max_side: int = 10_000
    max_pixels: int = 40_000_000
    max_aspect_ratio: float = 4.0
    max_bytes: int = 100 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError(f"need 1 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        # Our own check must fire first: Pillow's guard is a backstop, and it only warns below twice its limit.
        pil_limit = Image.MAX_IMAGE_PIXELS
        if not 1 <= self.max_pixels <= (pil_limit if pil_limit is not None else self.max_pixels):
            raise ValueError(f"max_pixels must be in [1, Image.MAX_IMAGE_PIXELS={pil_limit}], got {self.max_pixels}")


@dataclass(frozen=True, slots=True)
class CleanImage:
    """A validated image and what is known about it.

    Attributes
    ----------
    jpeg
        The clean image: RGB baseline JPEG, orientation applied, no metadata.
    width, height
        Size of the clean image (after orientation).
    sha256
        Hex digest of ``jpeg``.
    source_sha256
        Hex digest of the uploaded bytes.
    phash
        256-bit DCT perceptual hash as 64 hex digits; compare with :func:`hamming`.
    source_format, source_mode
        What the upload was (``JPEG``/``MPO``/``PNG``, Pillow mode).
    conversions
        What was done to get RGB, for the log (``exif_orientation_6``, ``CMYK->RGB``, ``icc->sRGB``, ...).
    lossless
        True when ``jpeg`` is the upload's own coded data (see :func:`strip_jpeg_metadata`), False when re-encoded.
    """

    jpeg: bytes
    width: int
    height: int
    sha256: str
    source_sha256: str
    phash: str
    source_format: str
    source_mode: str
    conversions: tuple[str, ...] = field(default=())
    lossless: bool = False


def sniff_format(data: bytes) -> str | None:
    """``"JPEG"``, ``"PNG"`` or None, from the leading bytes only."""
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    if data.startswith(PNG_MAGIC):
        return "PNG"
    return None


def _check_size(width: int, height: int, limits: ValidationLimits) -> None:
    """Refuse from the header's dimensions, before any pixel is decoded."""
    if width < 1 or height < 1:
        raise CorruptImageError(f"header gives an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise DecompressionBombError(
            f"header claims {width}x{height} = {width * height} pixels, limit {limits.max_pixels}"
        )
    short, long_ = min(width, height), max(width, height)
    if short < limits.min_side:
        raise ImageTooSmallError(f"{width}x{height}: a side is under {limits.min_side} px")
    if long_ > limits.max_side:
        raise ImageTooLargeError(f"{width}x{height}: a side is over {limits.max_side} px")
    if long_ / short > limits.max_aspect_ratio:
        raise AspectRatioError(f"{width}x{height}: aspect ratio {long_ / short:.2f} over {limits.max_aspect_ratio}")


def _open(data: bytes, fmt: str) -> Image.Image:
    """Parse the header with only the plugin the magic bytes name (the caller makes the bomb warning fatal)."""
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecompressionBombError(str(err)) from err
    except UnidentifiedImageError as err:
        raise CorruptImageError(f"{fmt} signature but unreadable header: {err}") from err
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"unreadable {fmt} header: {type(err).__name__}: {err}") from err
    if im.format not in _PIL_FORMATS[fmt]:  # cannot happen with formats=[fmt]; kept so a Pillow change fails loudly
        raise UnsupportedFormatError(f"content decoded as {im.format}, expected {fmt}")
    return im


def _decode(im: Image.Image) -> None:
    """Decode every pixel now, so that truncation and corrupt scans are caught here and not later."""
    try:
        im.load()
    except _DECODE_ERRORS as err:
        if "truncated" in str(err) or isinstance(err, EOFError):
            raise TruncatedImageError(f"pixel data ends early: {err}") from err
        raise CorruptImageError(f"pixel data cannot be decoded: {type(err).__name__}: {err}") from err


_LEVELS: Final = np.arange(256, dtype=np.int64)


def _check_content(grey: Image.Image, spread_lower_bound: float) -> None:
    """Refuse frames with no photographic content, from the luminance histogram of the working copy.

    ``spread_lower_bound`` (from the hash's low frequencies, free) settles "not blank" for almost every image;
    the exact standard deviation is computed only below the threshold.
    """
    hist = grey.histogram()
    total = grey.width * grey.height
    if spread_lower_bound < BLANK_STD:
        counts = np.array(hist, dtype=np.int64)
        mean = int(counts @ _LEVELS) / total
        std = max(int(counts @ (_LEVELS * _LEVELS)) / total - mean * mean, 0.0) ** 0.5
        if std < BLANK_STD:
            raise BlankImageError(f"blank image: luminance std {std:.2f} under {BLANK_STD}")
    first, second = sorted(hist)[-2:]
    share = (first + second) / total
    if share >= BINARY_SHARE:
        raise BinaryImageError(f"{share:.1%} of pixels in two grey levels: a mask or line art, not a photograph")


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis, rows are frequencies."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT_LOW: Final = _dct_matrix(PHASH_THUMB)[:PHASH_KEEP]


@functools.lru_cache(maxsize=64)
def _projection(n: int) -> np.ndarray:
    """``PHASH_KEEP x n``: area-average ``n`` samples down to PHASH_THUMB, then the lowest DCT frequencies.

    Resampling and DCT are both linear, so one small matrix per side replaces a resize plus a 2-D DCT; the
    coefficients of an image ``A`` are ``P_h @ A @ P_w.T``. Cached per length (uploads come in a few sizes).
    """
    edges = np.arange(PHASH_THUMB + 1) * (n / PHASH_THUMB)
    lo, hi = edges[:-1, None], edges[1:, None]
    pixel = np.arange(n)[None, :]
    overlap = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0.0, None)  # 64 x n
    area = overlap / overlap.sum(axis=1, keepdims=True)
    # float32 to match the pixels: a mixed-precision product would miss the BLAS fast path (5x slower).
    projected: np.ndarray = (_DCT_LOW @ area).astype(np.float32)
    return projected


def thumbnail(im: Image.Image) -> Image.Image:
    """The grey working copy for the hash and the content checks: short side at most THUMB_SHORT.

    Nearest-neighbour sampling costs in proportion to the output, not the input (a box reduction or a full-size
    grey conversion of a 4000x3000 upload costs ~5 ms each); the hash then area-averages ~2 samples per
    thumbnail cell, and sampling keeps the exact grey levels the binary-image check counts.
    """
    short = min(im.size)
    if short > THUMB_SHORT:
        scale = THUMB_SHORT / short
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.NEAREST)
    return im if im.mode == "L" else im.convert("L")


def _hash_and_spread(pixels: np.ndarray) -> tuple[str, float]:
    """:func:`phash` of a 2-D grey array, and a lower bound of the thumbnail's standard deviation.

    The DCT is orthonormal, so (Parseval) the energy of the kept non-DC coefficients over the 64x64 cells is at
    most the thumbnail's variance, which is at most the image's: a cheap proof of "not blank".
    """
    coeffs = (_projection(pixels.shape[0]) @ pixels.astype(np.float32) @ _projection(pixels.shape[1]).T).ravel()
    middle = (coeffs.size - 1) // 2
    bits = coeffs > np.partition(coeffs[1:], middle)[middle]
    ac_energy = float(coeffs @ coeffs) - float(coeffs[0]) ** 2
    spread = max(ac_energy, 0.0) ** 0.5 / PHASH_THUMB
    return np.packbits(bits).tobytes().hex(), spread


def phash(im: Image.Image) -> str:
    """256-bit DCT perceptual hash, as 64 hex digits.

    The pHash construction (grey area-average thumbnail -> 2-D DCT -> lowest frequencies -> one bit per
    coefficient, set when above their median; DC left out of the median as it only encodes brightness) at 16x16
    coefficients of a 64x64 thumbnail instead of the usual 8x8 of 32x32: dermoscopy images are all "a dark blob
    on skin", and on HAM10000 the 64-bit hash puts 1% of images within 4 bits of a different lesion, while this
    one keeps 99.9% at least 44 bits away. See :data:`NEAR_DUPLICATE_BITS`.

    Parameters
    ----------
    im
        Any image Pillow can convert to L (validation passes its RGB result).
    """
    return _hash_and_spread(np.asarray(thumbnail(im)))[0]


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes of equal length."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _encode_jpeg(rgb: Image.Image) -> bytes:
    """Baseline JPEG with nothing but the JFIF header.

    Pillow's JPEG writer copies ``info["comment"]`` from the image and writes EXIF/ICC/XMP only when passed as
    arguments; emptying ``info`` (this image is ours) and passing none of them leaves no metadata.
    """
    rgb.info = {}
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()


def validate_image_bytes(data: bytes, *, limits: ValidationLimits) -> CleanImage:
    """Validate an upload and return its clean copy.

    Parameters
    ----------
    data
        The uploaded bytes; the format is identified from them, never from a file name.
    limits
        Size limits.

    Returns
    -------
    CleanImage

    Raises
    ------
    ImageValidationError
        A subclass naming the reason; nothing else for any input bytes.
    ImagingConfigError
        Pillow is set to accept truncated images, which would let broken uploads through.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImagingConfigError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated uploads would pass")
    if not data:
        raise EmptyFileError("the file is empty")
    if len(data) > limits.max_bytes:
        raise FileTooLargeError(f"{len(data)} bytes, limit {limits.max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedFormatError(f"not a JPEG or PNG (starts with {data[:8].hex()})")
    with warnings.catch_warnings():
        # Pillow warns about every odd EXIF tag or chunk of an upload; the refusal reasons are the signal, and
        # the bomb warning (pixels over Pillow's own limit) must stop the decode, so it is raised.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _validate(data, fmt, limits)


def _validate(data: bytes, fmt: str, limits: ValidationLimits) -> CleanImage:
    """The checks after the cheap ones, on bytes that start like ``fmt``."""
    source_sha256 = hashlib.sha256(data).hexdigest()
    decoded = _open(data, fmt)
    _check_size(decoded.width, decoded.height, limits)
    source_format, source_mode = str(decoded.format), decoded.mode
    _decode(decoded)
    if fmt == "JPEG" and grey_filled_scan(decoded):
        raise CorruptImageError("JPEG scan data is damaged: the decoder filled the bottom of the image with grey")

    conversions: list[str] = []
    try:
        rgb = upright_rgb(decoded, conversions)
    except _DECODE_ERRORS as err:  # Pillow converts lazily-decoded palettes/modes here; still the upload's fault
        raise CorruptImageError(f"cannot convert {source_mode} to RGB: {type(err).__name__}: {err}") from err

    small = thumbnail(rgb)
    hashed, spread = _hash_and_spread(np.asarray(small))
    _check_content(small, spread)
    # An RGB JPEG that needed no conversion keeps its own coded data, stripped of metadata; others are re-encoded.
    lossless = fmt == "JPEG" and not conversions and source_mode == "RGB"
    stripped = strip_jpeg_metadata(data) if lossless else None
    jpeg = stripped if stripped is not None else _encode_jpeg(rgb)
    return CleanImage(
        jpeg=jpeg,
        width=rgb.width,
        height=rgb.height,
        sha256=hashlib.sha256(jpeg).hexdigest(),
        source_sha256=source_sha256,
        phash=hashed,
        source_format=source_format,
        source_mode=source_mode,
        conversions=tuple(conversions),
        lossless=stripped is not None,
    )
