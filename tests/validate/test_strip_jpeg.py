"""Lossless metadata stripping of JPEGs that need no conversion."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from lesion_imaging.validation import ValidationLimits, strip_jpeg_metadata, validate_image_bytes

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "images" / "ISIC_0024323.jpg"


def _with_exif_gps_and_comment(data: bytes) -> bytes:
    im = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)}  # GPS IFD
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, exif=exif.tobytes(), comment=b"patient 1234")
    return buf.getvalue()


def test_stripping_keeps_the_pixels_and_drops_gps_and_comments() -> None:
    data = _with_exif_gps_and_comment(SAMPLE.read_bytes())
    assert b"patient 1234" in data and b"Exif" in data
    stripped = strip_jpeg_metadata(data)
    assert stripped is not None
    assert b"patient 1234" not in stripped and b"Exif" not in stripped
    before = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    after = np.asarray(Image.open(io.BytesIO(stripped)).convert("RGB"))
    assert np.array_equal(before, after)


def test_validation_stores_the_stripped_bytes_not_a_reencode() -> None:
    data = _with_exif_gps_and_comment(SAMPLE.read_bytes())
    clean = validate_image_bytes(data, limits=ValidationLimits())
    assert clean.jpeg == strip_jpeg_metadata(data)
    assert "exif" not in Image.open(io.BytesIO(clean.jpeg)).info


def test_what_cannot_be_vouched_for_is_declined() -> None:
    im = Image.open(SAMPLE)
    progressive = io.BytesIO()
    im.save(progressive, format="JPEG", progressive=True)
    assert strip_jpeg_metadata(progressive.getvalue()) is None
    data = SAMPLE.read_bytes()
    assert strip_jpeg_metadata(data[: len(data) // 2]) is None  # no EOI
    assert strip_jpeg_metadata(b"\x89PNG\r\n\x1a\n") is None
    trailing = strip_jpeg_metadata(data + b"hidden payload")
    assert trailing is not None and not trailing.endswith(b"hidden payload")
