"""Request bytes to an 8-bit RGB image, refusing what cannot or must not be decoded.

The conversions are the upload validation's own (``lesion_imaging.pixels``, from the imaging layer, which this
image copies), because the model was trained on what that validation stored: EXIF orientation applied, an embedded
colour profile converted to sRGB, 16-bit grey scaled (not clipped) to 8 bits, alpha dropped (not composited), CMYK,
palette and grey to RGB. Unlike validation, a picture that is not a lesion (blank, a mask, a photo of a
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

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from lesion_imaging.pixels import DECODE_ERRORS, grey_filled_scan, to_rgb, upright_rgb

try:  # optional: without it every JPEG takes Pillow's path (same pixels, slower)
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - installed in the image and in development
    _simplejpeg = None

# Formats a camera, phone or dermatoscope app may send; every other Pillow plugin stays unreachable from a request.
# (Pillow opens a JPEG with an MPF extension, "MPO", through its JPEG plugin.)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_DECODE_ERRORS = DECODE_ERRORS  # Pillow's many ways of saying "unreadable" (lesion_imaging.pixels)
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


def _reduce_large(im: Image.Image, target_size: tuple[int, int], conversions: list[str]) -> Image.Image:
    """Box-average a decoded picture by the largest integer factor that keeps it :data:`DRAFT_MARGIN` times larger
    than the model input on both sides (the JPEG draft rule), so everything after decoding costs in proportion to
    the model input. Palette and bilevel pictures are converted to RGB first (indices cannot be averaged)."""
    side = DRAFT_MARGIN * max(target_size)  # square request: EXIF orientation may still swap the sides
    factor = min(im.width, im.height) // side
    if factor < 2:
        return im
    if im.mode in ("P", "PA", "1"):
        im = to_rgb(im, conversions)
    w, h = im.width // factor, im.height // factor
    if im.mode.startswith("I;16"):  # Image.reduce does not take 16-bit modes; a box resize is the same average
        out = im.resize((w, h), Image.Resampling.BOX, box=(0, 0, w * factor, h * factor))
    else:
        out = im.reduce(factor, box=(0, 0, w * factor, h * factor))
    conversions.append(f"reduced_1/{factor}")
    return out


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


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) an image of an allowed format whose claimed size is within ``max_pixels``."""
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
    return im


def _load_pixels(im: Image.Image, source_format: str, target_size: tuple[int, int] | None,
                 conversions: list[str]) -> None:
    """Decode the pixel data (a large JPEG at a reduced scale); refuse truncated or damaged data."""
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
    if source_format in ("JPEG", "MPO") and grey_filled_scan(im):
        raise ImageRequestError(400, "corrupt_image", "JPEG scan data is damaged: the bottom of the image is "
                                "the decoder's grey fill")


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
        im = _open_checked(data, max_pixels)
        width, height = im.size
        source_format, source_mode = str(im.format), im.mode
        conversions: list[str] = []
        _load_pixels(im, source_format, target_size, conversions)
        try:
            if target_size is not None:
                im = _reduce_large(im, target_size, conversions)
            rgb = upright_rgb(im, conversions)
        except _DECODE_ERRORS as e:
            raise ImageRequestError(400, "corrupt_image", f"cannot convert {source_mode} to RGB: {e}") from None
    return DecodedImage(rgb, source_format, source_mode, width, height, conversions)
