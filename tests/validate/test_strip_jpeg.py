"""Lossless metadata stripping of JPEGs that need no conversion: only what decoding needs reaches validated/."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesion_imaging.jpeg_strip import strip_jpeg_metadata
from lesion_imaging.validation import CleanImage, ImageValidationError, ValidationLimits, validate_image_bytes

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "images" / "ISIC_0024323.jpg"
LIMITS = ValidationLimits()
TEXT = b"Jane Doe, 51.5074N 0.1278W, 1970-01-01"


def _with_exif_gps_and_comment(data: bytes) -> bytes:
    im = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)}  # GPS IFD
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, exif=exif.tobytes(), comment=b"patient 1234")
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    im.load()
    return np.asarray(im.convert("RGB"))


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload


def _header_offsets(data: bytes) -> tuple[int, int]:
    """Offsets of the segment after APP0 and of SOS, walking the segments (tables may hold 0xFFDA bytes)."""
    pos, after_app0 = 2, 2
    while True:
        marker = data[pos + 1]
        if marker == 0xDA:
            return after_app0, pos
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE0:
            after_app0 = pos


def _scan_end(data: bytes) -> int:
    end = len(data)
    assert data[end - 2 :] == b"\xff\xd9"
    return end - 2


def _payload(tag: str) -> bytes:
    return f"PAYLOAD-{tag}-".encode() + TEXT


def _hostile_cases(data: bytes) -> dict[str, tuple[bytes, bytes]]:
    """name -> (upload, the text it carries): every marker type, and the forms decoders are known to tolerate."""
    after_app0, sos = _header_offsets(data)
    cases: dict[str, tuple[bytes, bytes]] = {}
    for marker in range(0xC0, 0xFF):
        text = _payload(f"{marker:02X}")
        cases[f"{marker:02X}"] = (data[:sos] + _segment(marker, text) + data[sos:], text)
    # Well-formed tables in slots nothing uses: every decoder reads them and none needs them.
    text = _payload("DQT-unused")
    table = (text * 2)[:64]
    cases["DQT-unused-slot"] = (data[:sos] + _segment(0xDB, b"\x03" + table) + data[sos:], table)
    text = _payload("DHT-unused")
    counts = bytes(15) + bytes((len(text),))
    cases["DHT-unused-slot"] = (data[:sos] + _segment(0xC4, b"\x13" + counts + text) + data[sos:], text)
    # The same slots as the real tables, defined first and then overridden by them.
    text = _payload("DQT-overridden")
    table = (text * 2)[:64]
    cases["DQT-overridden"] = (data[:after_app0] + _segment(0xDB, b"\x00" + table) + data[after_app0:], table)
    text = _payload("DHT-overridden")
    counts = bytes(15) + bytes((len(text),))
    cases["DHT-overridden"] = (data[:after_app0] + _segment(0xC4, b"\x10" + counts + text) + data[after_app0:], text)
    # Text in the JFIF header: after its fields, and as its density fields.
    text = _payload("JFIF-tail")
    jfif = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + text
    cases["JFIF-tail"] = (b"\xff\xd8" + _segment(0xE0, jfif) + data[after_app0:], text)
    text = b"JaneDoe"
    jfif = b"JFIF\x00\x01\x02\x01" + b"Jane" + b"\x00\x00"
    cases["JFIF-fields"] = (b"\xff\xd8" + _segment(0xE0, jfif) + data[after_app0:], b"Jane")
    # After the last coded block, before EOI: decoders skip it (no 0xFF in the text, so no marker is formed).
    text = _payload("scan-slack")
    end = _scan_end(data)
    cases["scan-slack"] = (data[:end] + text + data[end:], text)
    text = _payload("after-EOI")
    cases["after-EOI"] = (data + text, text)
    return cases


def _run(upload: bytes) -> CleanImage | None:
    try:
        return validate_image_bytes(upload, limits=LIMITS)
    except ImageValidationError:
        return None


def test_no_marker_type_carries_text_into_the_stored_bytes() -> None:
    """Every marker 0xC0-0xFE (and the tolerated forms of the allowed ones) with text: refused, or stored without
    it; and where the upload's own coded data was kept, it decodes to exactly the upload's pixels."""
    data = SAMPLE.read_bytes()
    stored: dict[str, CleanImage] = {}
    for name, (upload, text) in _hostile_cases(data).items():
        assert text in upload
        clean = _run(upload)
        if clean is None:
            continue
        assert text not in clean.jpeg, f"{name}: the text survived into the stored bytes"
        if clean.lossless:
            assert np.array_equal(_pixels(clean.jpeg), _pixels(upload)), f"{name}: pixels changed"
        stored[name] = clean
    # Not vacuous: what decoders tolerate was accepted (and so went through the strip), not refused.
    # (DNL and RSTn before the scan are skipped by libjpeg; the older strip kept DNL, tables and JFIF text.)
    tolerated = {f"{m:02X}" for m in (*range(0xD0, 0xD8), 0xDC, *range(0xE0, 0xF0), 0xFE)} | {
        "DQT-unused-slot", "DHT-unused-slot", "DQT-overridden", "DHT-overridden", "JFIF-tail", "JFIF-fields",
        "scan-slack", "after-EOI"}
    assert tolerated <= set(stored), sorted(tolerated - set(stored))
    # Dropping metadata segments keeps the coded data; what is not on the allow-list is re-encoded.
    for name in ("E0", "E1", "E2", "EF", "FE", "JFIF-tail", "JFIF-fields", "after-EOI"):
        assert stored[name].lossless, name
    for name in ("D0", "DC", "EE", "DQT-unused-slot", "DHT-unused-slot", "DQT-overridden", "DHT-overridden",
                 "scan-slack"):
        assert not stored[name].lossless, name


@pytest.mark.parametrize("quality", [75, 95])
@pytest.mark.parametrize("subsampling", [0, 2])
def test_clean_jpegs_keep_their_coded_data(quality: int, subsampling: int) -> None:
    # Not a re-encode for the common case: the JFIF header is regenerated and the rest is the upload's.
    buf = io.BytesIO()
    Image.open(SAMPLE).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    data = buf.getvalue()
    clean = validate_image_bytes(data, limits=LIMITS)
    assert clean.lossless and clean.jpeg == data
    clean_sample = validate_image_bytes(SAMPLE.read_bytes(), limits=LIMITS)
    assert clean_sample.lossless and np.array_equal(_pixels(clean_sample.jpeg), _pixels(SAMPLE.read_bytes()))


def test_stripping_keeps_the_pixels_and_drops_gps_and_comments() -> None:
    data = _with_exif_gps_and_comment(SAMPLE.read_bytes())
    assert b"patient 1234" in data and b"Exif" in data
    stripped = strip_jpeg_metadata(data)
    assert stripped is not None
    assert b"patient 1234" not in stripped and b"Exif" not in stripped
    assert np.array_equal(_pixels(data), _pixels(stripped))


def test_validation_stores_the_stripped_bytes_not_a_reencode() -> None:
    data = _with_exif_gps_and_comment(SAMPLE.read_bytes())
    clean = validate_image_bytes(data, limits=LIMITS)
    assert clean.lossless and clean.jpeg == strip_jpeg_metadata(data)
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
    assert trailing is not None and b"hidden payload" not in trailing
    restart = io.BytesIO()
    im.save(restart, format="JPEG", quality=90, restart_marker_blocks=4)
    assert strip_jpeg_metadata(restart.getvalue()) is None  # slack can hide before every restart marker


@pytest.mark.parametrize("slack", [b"J", b"JD", b"J.D.", b"Jane"])
def test_even_a_few_bytes_after_the_last_block_are_found(slack: bytes) -> None:
    # Shorter than libjpeg's look-ahead: a strict decode of the whole file does not see them.
    data = SAMPLE.read_bytes()
    end = _scan_end(data)
    upload = data[:end] + slack + data[end:]
    assert strip_jpeg_metadata(upload) is None
    clean = validate_image_bytes(upload, limits=LIMITS)
    assert not clean.lossless and clean.jpeg[-2 - len(slack) : -2] != slack


def test_every_bundled_sample_keeps_its_coded_data() -> None:
    # No false alarm on real images: the slack probe and the table checks pass all of them.
    for path in sorted(SAMPLE.parent.glob("*.jpg")):
        data = path.read_bytes()
        stripped = strip_jpeg_metadata(data)
        assert stripped is not None, path.name
        assert stripped[20:] == data[20:], path.name  # the JFIF header is the only difference (it is Pillow's)
