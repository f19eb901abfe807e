"""Request bytes to an 8-bit RGB image, refusing what cannot or must not be decoded.

The conversions mirror the upload validation (``layers/imaging/lesion_imaging/validation.py``), because the model
was trained on what that validation stored: EXIF orientation applied, an embedded colour profile converted to
sRGB, 16-bit grey scaled (not clipped) to 8 bits, alpha dropped (not composited), CMYK, palette and grey to RGB.
A test keeps the two in agreement. Unlike validation, a picture that is not a lesion (blank, a mask, a photo of a
cat) is not refused here: it is classified and flagged out-of-distribution (:mod:`inference_image.ood`).

Refusals carry an HTTP status: 400 for bytes that are not a readable image, 413 for a header claiming more
pixels than the limit (a decompression bomb is refused before any pixel is decoded).

Cost is bounded by the size of the model input, not of the picture, past the one unavoidable step: a large JPEG is
decoded at a reduced DCT scale, and any other large picture (PNG, WebP, TIFF... which have no reduced decode) is
box-averaged by an integer factor right after decoding, before orientation, colour profile, 16-bit scaling and
RGB conversion, which then work on a copy a few times the model input instead of up to ``MAX_IMAGE_PIXELS``
(a 16-bit 40 M-pixel PNG: ~0.9 s before, ~0.3 s with it, on this machine).
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError

try:  # optional: without it every JPEG takes Pillow's path (same pixels, slower)
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - installed in the image and in development
    _simplejpeg = None

# Formats a camera, phone or dermatoscope app may send; every other Pillow plugin stays unreachable from a request.
# (Pillow opens a JPEG with an MPF extension, "MPO", through its JPEG plugin.)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_SOURCES = frozenset({"exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp"})
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow raises all of these for malformed input, depending on the plugin and where the damage is.
_DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, IndexError, KeyError, TypeError,
    ZeroDivisionError, OverflowError, MemoryError,
)
# A JPEG decoded at 1/2, 1/4 or 1/8 scale (DCT scaling) is used only while it stays this many times larger than
# the model input: the antialiased resize then gives practically the same input, at a fraction of the decode cost.
DRAFT_MARGIN = 4


class ImageRequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, ``code`` a stable machine-readable reason."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class DecodedImage:
    """An 8-bit RGB image and what was done to get it.

    Either a Pillow image or a ``(H, W, 3)`` uint8 array backs it; the other view is made on first use (creating a
    Pillow image costs ~0.15 ms right after a model run, so the fast JPEG path does not make one it will not use).

    Attributes
    ----------
    source_format, source_mode : str
        What the request held (``JPEG``, ``PNG``...; ``RGB``, ``CMYK``, ``I;16``...).
    source_width, source_height : int
        Size in the header, before orientation and any reduced-scale decode.
    conversions : list of str
        Steps applied (``exif_orientation_6``, ``CMYK->RGB``, ``icc->sRGB``, ``jpeg_draft_1/4``...).
    """

    def __init__(self, image: Image.Image | np.ndarray, source_format: str, source_mode: str, source_width: int,
                 source_height: int, conversions: list[str] | None = None) -> None:
        self._image = image if isinstance(image, Image.Image) else None
        self._pixels = image if isinstance(image, np.ndarray) else None
        self.source_format = source_format
        self.source_mode = source_mode
        self.source_width = source_width
        self.source_height = source_height
        self.conversions = conversions if conversions is not None else []

    @property
    def image(self) -> Image.Image:
        """The Pillow view (RGB)."""
        if self._image is None:
            assert self._pixels is not None
            self._image = Image.fromarray(self._pixels)
        return self._image

    @property
    def pixels(self) -> np.ndarray:
        """The ``(H, W, 3)`` uint8 view."""
        if self._pixels is None:
            assert self._image is not None
            self._pixels = np.asarray(self._image)
        return self._pixels

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the decoded pixels (smaller than the picture after a reduced-scale decode)."""
        if self._pixels is not None:
            return int(self._pixels.shape[1]), int(self._pixels.shape[0])
        assert self._image is not None
        return self._image.size

    @property
    def width(self) -> int:
        """Width after orientation, at full scale (what the statistics report)."""
        return self.source_height if self._rotated else self.source_width

    @property
    def height(self) -> int:
        """Height after orientation, at full scale."""
        return self.source_width if self._rotated else self.source_height

    @property
    def _rotated(self) -> bool:
        return any(c in ("exif_orientation_5", "exif_orientation_6", "exif_orientation_7", "exif_orientation_8")
                   for c in self.conversions)


def _orientation(im: Image.Image) -> int:
    """EXIF orientation, 1 when absent or unreadable (a broken EXIF block must not fail the request)."""
    if not _ORIENTATION_SOURCES & im.info.keys():
        return 1
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _sixteen_bit_to_l(im: Image.Image) -> Image.Image:
    """Scale 16-bit grey to 8 bits; Pillow's own conversion clips at 255, turning most of the image white."""
    wide = np.clip(np.asarray(im).astype(np.int64, copy=False), 0, 65535).astype(np.uint32)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # uint8 2-D: mode L


def _float_to_l(im: Image.Image) -> Image.Image:
    """32-bit float grey (TIFF): values in [0, 1] are taken as intensities, anything else is min-max scaled."""
    arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.round(arr * 255).astype(np.uint8))


def _to_rgb(im: Image.Image, conversions: list[str]) -> Image.Image:
    """Any decoded mode to 8-bit RGB (alpha dropped, as validation does, so lesion pixels keep their values)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        out = _sixteen_bit_to_l(im).convert("RGB")
    elif mode == "F":
        out = _float_to_l(im).convert("RGB")
    elif mode in ("RGBA", "RGBa", "RGBX"):
        out = im.convert("RGB")
    elif mode in ("LA", "La", "PA"):
        out = im.convert("RGBA" if mode == "PA" else "LA").convert("RGB")
    elif mode == "P" and "transparency" in im.info:
        out = im.convert("RGBA").convert("RGB")
    else:  # L, 1, P, CMYK (Pillow inverts Adobe CMYK JPEGs on load), YCbCr, LAB, HSV
        out = im.convert("RGB")
    conversions.append(f"{mode}->RGB")
    return out


@functools.lru_cache(maxsize=16)
def _icc_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """Profile-to-sRGB transform, cached: phones embed the same few profiles and building one costs milliseconds."""
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.buildTransform(src, ImageCms.createProfile("sRGB"), mode, "RGB")
    except (ImageCms.PyCMSError, *_DECODE_ERRORS):
        return None


def _apply_icc(im: Image.Image, conversions: list[str]) -> Image.Image:
    """Convert an embedded colour profile to sRGB; an unusable profile is ignored (pixels taken as sRGB)."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "CMYK", "L"):
        return im
    transform = _icc_transform(bytes(icc), im.mode)
    if transform is None:
        conversions.append("icc_ignored")
        return im
    try:
        out = ImageCms.applyTransform(im, transform)
    except (ImageCms.PyCMSError, *_DECODE_ERRORS):
        conversions.append("icc_ignored")
        return im
    if out is None:
        return im
    conversions.append("icc->sRGB")
    return out


def _reduce_large(im: Image.Image, target_size: tuple[int, int], conversions: list[str]) -> Image.Image:
    """Box-average a decoded picture by the largest integer factor that keeps it :data:`DRAFT_MARGIN` times larger
    than the model input on both sides (the JPEG draft rule), so everything after decoding costs in proportion to
    the model input. Palette and bilevel pictures are converted to RGB first (indices cannot be averaged)."""
    side = DRAFT_MARGIN * max(target_size)  # square request: EXIF orientation may still swap the sides
    factor = min(im.width, im.height) // side
    if factor < 2:
        return im
    if im.mode in ("P", "PA", "1"):
        im = _to_rgb(im, conversions)
    w, h = im.width // factor, im.height // factor
    if im.mode.startswith("I;16"):  # Image.reduce does not take 16-bit modes; a box resize is the same average
        out = im.resize((w, h), Image.Resampling.BOX, box=(0, 0, w * factor, h * factor))
    else:
        out = im.reduce(factor, box=(0, 0, w * factor, h * factor))
    conversions.append(f"reduced_1/{factor}")
    return out


def _grey_filled_scan(im: Image.Image) -> bool:
    """A JPEG whose bottom 8 rows are the decoder's exact grey fill: the scan data was damaged (as validation)."""
    if im.mode not in ("RGB", "L") or im.height < 8:
        return False
    grey = (128, 128, 128) if im.mode == "RGB" else 128
    y = im.height - 1
    if not all(im.getpixel((x, y)) == grey for x in (0, im.width // 2, im.width - 1)):
        return False
    band = im.crop((0, im.height - 8, im.width, im.height)).getextrema()
    extrema = [band] if im.mode == "L" else band
    return all(lo == hi == 128 for lo, hi in extrema)  # type: ignore[misc]


def _plain_jpeg(data: bytes) -> bool:
    """True for a JPEG whose markers before the scan hold nothing Pillow's path would act on: no EXIF (orientation),
    no APP2 (ICC profile, MPF), no Adobe APP14 (CMYK/YCCK transforms). A pure-Python walk over a few segments."""
    if not data.startswith(b"\xff\xd8"):
        return False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan: the header is over
            return True
        if marker in (0xE1, 0xE2, 0xEE) or marker == 0xFF:
            return False
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def _fast_jpeg(data: bytes, max_pixels: int, target_size: tuple[int, int] | None) -> DecodedImage | None:
    """Decode a plain baseline/progressive YCbCr JPEG with libjpeg-turbo directly (simplejpeg), or return None.

    The same libjpeg-turbo with the same settings as Pillow (accurate DCT, fancy upsampling): the pixels are
    identical (a test checks), at a third of the cost for the small images dermatoscopes produce. Anything unusual
    (EXIF, ICC, CMYK, grey, damaged data, a size that Pillow would decode at a reduced scale) goes to Pillow.
    """
    if _simplejpeg is None or not _plain_jpeg(data):
        return None
    try:
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
        if colorspace != "YCbCr" or width * height > max_pixels or width < 1 or height < 1:
            return None
        if target_size is not None and min(width, height) >= 2 * DRAFT_MARGIN * max(target_size):
            return None
        pixels = _simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:  # corrupt or truncated: Pillow's path says exactly what is wrong
        return None
    return DecodedImage(pixels, "JPEG", "RGB", width, height, [])


def decode_image(data: bytes, max_pixels: int, target_size: tuple[int, int] | None = None) -> DecodedImage:
    """Decode request bytes to RGB.

    Parameters
    ----------
    data : bytes
        The encoded image; its format is taken from the content, never from a name or content type.
    max_pixels : int
        Largest ``width * height`` the header may claim (413 above).
    target_size : (width, height), optional
        The model input size; large JPEGs are then decoded at a reduced scale that stays
        :data:`DRAFT_MARGIN` times larger than it.

    Raises
    ------
    ImageRequestError
        400 for empty, unidentifiable, truncated or corrupt data; 413 for too many pixels.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a truncated upload would otherwise be served as half grey
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must be False")
    if not data:
        raise ImageRequestError(400, "empty_body", "the request body is empty")
    fast = _fast_jpeg(data, max_pixels, target_size)
    if fast is not None:
        return fast
    with warnings.catch_warnings():
        # Pillow's bomb warning (pixels over its own limit) must stop decoding; other warnings are noise.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im: Image.Image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRequestError(413, "image_too_large", f"decompression bomb refused: {e}") from None
        except UnidentifiedImageError:
            raise ImageRequestError(
                400, "not_an_image", f"not a readable image (supported: {', '.join(ALLOWED_FORMATS)})"
            ) from None
        except _DECODE_ERRORS as e:
            raise ImageRequestError(400, "corrupt_image", f"unreadable image header: {type(e).__name__}: {e}") from None
        width, height = im.size
        if width < 1 or height < 1:
            raise ImageRequestError(400, "corrupt_image", f"header gives an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ImageRequestError(
                413, "image_too_large", f"{width}x{height} = {width * height} pixels, limit {max_pixels} (refused "
                "before decoding)"
            )
        source_format, source_mode = str(im.format), im.mode
        conversions: list[str] = []
        if target_size is not None and source_format in ("JPEG", "MPO"):
            # Square request: the EXIF rotation is applied after decoding, so either side may become the width.
            side = DRAFT_MARGIN * max(target_size)
            before = im.size
            im.draft(None, (side, side))
            if im.size != before:
                conversions.append(f"jpeg_draft_1/{before[0] // im.size[0]}")
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRequestError(413, "image_too_large", f"decompression bomb refused: {e}") from None
        except _DECODE_ERRORS as e:
            if "truncated" in str(e) or isinstance(e, EOFError):
                raise ImageRequestError(400, "truncated_image", f"the image data ends early: {e}") from None
            raise ImageRequestError(400, "corrupt_image", f"pixel data cannot be decoded: {type(e).__name__}: {e}") \
                from None
        if source_format in ("JPEG", "MPO") and _grey_filled_scan(im):
            raise ImageRequestError(400, "corrupt_image", "JPEG scan data is damaged: the bottom of the image is "
                                    "the decoder's grey fill")
        try:
            if target_size is not None:
                im = _reduce_large(im, target_size, conversions)
            orientation = _orientation(im)
            if orientation != 1:
                im = im.transpose(_TRANSPOSE[orientation])
                conversions.append(f"exif_orientation_{orientation}")
            if im.mode not in ("RGB", "CMYK", "L"):
                im = _to_rgb(im, conversions)
            im = _apply_icc(im, conversions)
            rgb = _to_rgb(im, conversions)
        except _DECODE_ERRORS as e:
            raise ImageRequestError(400, "corrupt_image", f"cannot convert {source_mode} to RGB: {e}") from None
    return DecodedImage(rgb, source_format, source_mode, width, height, conversions)
