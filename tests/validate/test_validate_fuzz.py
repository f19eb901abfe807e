"""Property: for any bytes, validate_image_bytes returns a clean image or raises an ImageValidationError subclass.

Random bytes mostly stop at the magic check, so most examples mutate real JPEGs and PNGs (the bundled HAM10000
sample, in several modes and with EXIF/ICC blocks) to reach Pillow's parsers and decoders. Bounded and
derandomised so that CI is fast and repeatable; set VALIDATE_FUZZ_EXAMPLES (e.g. 20000) to search harder.
"""

from __future__ import annotations

import io
import os
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageCms

from lesion_imaging.validation import (
    JPEG_MAGIC,
    PNG_MAGIC,
    CleanImage,
    ImageValidationError,
    ValidationLimits,
    validate_image_bytes,
)

from .helpers import decode, encode, sample_jpeg

LIMITS = ValidationLimits()
EXAMPLES = int(os.environ.get("VALIDATE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@cache
def seeds() -> tuple[bytes, ...]:
    """Valid files in the shapes uploads take."""
    jpeg = sample_jpeg(0)
    im = Image.open(io.BytesIO(jpeg))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 12.5)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return (
        jpeg,
        encode(im, "JPEG", quality=90, progressive=True, exif=exif.tobytes(), icc_profile=icc, comment=b"x"),
        encode(im.convert("CMYK"), "JPEG"),
        encode(im.convert("L"), "JPEG"),
        encode(im, "PNG"),
        encode(im.convert("RGBA"), "PNG", exif=exif.tobytes()),
        encode(im.convert("P"), "PNG"),
        encode(im.convert("LA"), "PNG"),
        encode(im.convert("I").convert("I;16"), "PNG"),
    )


def check(data: bytes) -> None:
    try:
        clean = validate_image_bytes(data, limits=LIMITS)
    except ImageValidationError as err:
        assert err.reason_code and err.message
        return
    assert isinstance(clean, CleanImage)
    assert decode(clean.jpeg).mode == "RGB"


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2**20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("delete"), st.integers(0, 2**20), st.integers(1, 64)),
)


Mutation = tuple[str, int, int | bytes]


def mutate(data: bytes, mutations: list[Mutation], header_bias: bool) -> bytes:
    buf = bytearray(data)
    for op, where, arg in mutations:
        if not buf:
            break
        # Header bias: most parser branches live in the first few hundred bytes.
        pos = where % (min(len(buf), 600) if header_bias else len(buf))
        if op == "flip" and isinstance(arg, int):
            buf[pos] = arg
        elif op == "cut":
            del buf[max(pos, 3) :]
        elif op == "insert" and isinstance(arg, bytes):
            buf[pos:pos] = arg
        elif op == "delete" and isinstance(arg, int):
            del buf[pos : pos + arg]
    return bytes(buf)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(st.sampled_from([JPEG_MAGIC, PNG_MAGIC]), st.binary(max_size=2048))
def test_random_bytes_behind_a_valid_signature(magic: bytes, tail: bytes) -> None:
    check(magic + tail)


@FUZZ
@given(st.integers(0, 8), st.lists(mutation, min_size=1, max_size=4), st.booleans())
def test_mutated_real_images(seed: int, mutations: list[Mutation], header_bias: bool) -> None:
    check(mutate(seeds()[seed], mutations, header_bias))
