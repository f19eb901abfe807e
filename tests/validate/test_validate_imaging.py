"""validate_image_bytes on real dermoscopy, on the shared negatives and on crafted inputs (no AWS)."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, ImageFile, PngImagePlugin

from lesion_imaging import validation as v
from lesion_imaging.validation import (
    CleanImage,
    ImageValidationError,
    ImagingConfigError,
    ValidationLimits,
    hamming,
    phash,
    validate_image_bytes,
)

from .helpers import decode, encode, jpeg_markers, negatives_rows, sample_image_paths, sample_jpeg

LIMITS = ValidationLimits()

# What validation does with each shared negative: a reason code, or None for "accepted".
# Non-dermoscopic photographs that are valid images (negatives.csv: "reject / out-of-distribution") are
# ACCEPTED here on purpose: whether a picture shows a lesion is the model's out-of-distribution check, not a
# file check. Only files with no photographic content (blank frames, two-level masks, silhouettes, line plots)
# are refused, as they can never be a lesion photograph, and masks share image ids with the real images.
EXPECTED: dict[str, str | None] = {
    "sk_astronaut.png": None,
    "sk_coffee.png": None,
    "sk_chelsea.png": None,
    "sk_rocket.jpg": None,
    "sk_hubble_deep_field.jpg": None,
    "sk_retina.jpg": None,
    "sk_ihc.png": None,
    "sk_camera.png": None,
    "sk_brick.png": None,
    "sk_grass.png": None,
    "sk_horse.png": "binary_image",
    "sk_page.png": None,
    "sk_microaneurysms.png": None,
    "sk_motorcycle_left.png": None,
    "sk_logo.png": None,
    "sk_no_time_for_that_tiny.gif": "unsupported_format",
    "sk_multipage_rgb.tif": "unsupported_format",
    "repo_pabloantivil_src_confusion_bayesiano_rgb.png": None,
    "repo_pabloantivil_src_curvas_roc_bayesianos.png": "binary_image",
    "repo_pabloantivil_dataset_ISIC_0024306_expert.png": "binary_image",
    "repo_pabloantivil_dataset_ISIC_0024307_expert.png": "binary_image",
    "repo_pabloantivil_dataset_ISIC_0024308_expert.png": "binary_image",
    "repo_mmalek06_data_boxes_ISIC_0024306.png": "binary_image",
    "repo_mmalek06_data_boxes_ISIC_0024310.png": "binary_image",
    "repo_congtran19_ISIC_0024306_gray.jpg": None,
    "repo_congtran19_ISIC_0024319_gray.jpg": None,
    "repo_congtran19_ISIC_0024326_gray.jpg": None,
    "corrupt_truncated_40pct.jpg": "truncated_image",
    "corrupt_zero_bytes.jpg": "empty_file",
    "corrupt_text_as_jpg.jpg": "unsupported_format",
    "corrupt_random_bytes.jpg": "unsupported_format",
    "corrupt_zeroed_scan_data.jpg": "corrupt_image",
    "odd_png_named_jpg.jpg": None,
    "odd_1x1.png": "too_small",
    "odd_8x8.jpg": "too_small",
    "odd_extreme_aspect_1200x20.jpg": "too_small",
    "odd_cmyk.jpg": None,
    "odd_rgba.png": None,
    "odd_gray16.png": None,
    "odd_palette.png": None,
    "odd_all_black.png": "blank_image",
    "odd_all_white.jpg": "blank_image",
    "odd_exif_rotate90.jpg": None,
    "odd_progressive.jpg": None,
    "odd_huge_4000x3000.jpg": None,
}
# negatives.csv's expected_behaviour values that demand acceptance, and those that demand refusal.
MUST_ACCEPT = ("convert to RGB", "drop alpha", "should decode by content", "convert / scale correctly",
               "EXIF transpose", "decode normally", "resize without OOM", "odd: must not crash")
MUST_REJECT = ("error", "low confidence / reject")


def run(data: bytes, limits: ValidationLimits = LIMITS) -> CleanImage:
    return validate_image_bytes(data, limits=limits)


def reason(data: bytes, limits: ValidationLimits = LIMITS) -> str:
    with pytest.raises(ImageValidationError) as info:
        run(data, limits)
    return info.value.reason_code


def assert_clean(clean: CleanImage) -> Image.Image:
    """The output is an RGB baseline JPEG with JFIF only, and its hashes are right."""
    markers = jpeg_markers(clean.jpeg)
    assert markers[:2] == [0xD8, 0xE0], "must start SOI, APP0 (JFIF)"
    forbidden = [m for m in markers if 0xE1 <= m <= 0xEF or m == 0xFE]
    assert not forbidden, f"metadata segments left: {[hex(m) for m in forbidden]}"
    im = decode(clean.jpeg)
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (clean.width, clean.height)
    assert not {"exif", "icc_profile", "comment", "xmp", "progressive"} & set(im.info)
    assert len(im.getexif()) == 0
    assert clean.sha256 == hashlib.sha256(clean.jpeg).hexdigest()
    assert len(clean.phash) == 64 and int(clean.phash, 16) >= 0
    return im


# ------------------------------------------------------------------------------------------ shared negatives


def test_expectations_cover_negatives_csv(negatives: Path) -> None:
    rows = negatives_rows()
    assert {r["file"] for r in rows} == set(EXPECTED), "classify every negative (new ones too) in EXPECTED"
    for r in rows:
        got = EXPECTED[r["file"]]
        if r["expected_behaviour"].startswith(MUST_ACCEPT):
            assert got is None, f"{r['file']}: negatives.csv says {r['expected_behaviour']!r}"
        if r["expected_behaviour"].startswith(MUST_REJECT):
            assert got is not None, f"{r['file']}: negatives.csv says {r['expected_behaviour']!r}"


@pytest.mark.parametrize("row", negatives_rows(), ids=lambda r: r["file"])
def test_each_negative_gets_its_expected_behaviour(row: dict[str, str], negatives: Path) -> None:
    data = (negatives / row["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == row["sha256"]
    expected = EXPECTED[row["file"]]
    if expected is None:
        clean = run(data)
        assert_clean(clean)
        assert clean.source_sha256 == row["sha256"]
    else:
        assert reason(data) == expected


def test_exif_rotation_gives_450x600(negatives: Path) -> None:
    rotated = run((negatives / "odd_exif_rotate90.jpg").read_bytes())
    plain = run((negatives / "odd_png_named_jpg.jpg").read_bytes())
    assert (rotated.width, rotated.height) == (450, 600)
    assert "exif_orientation_6" in rotated.conversions
    # Orientation 6 means "rotate 90 clockwise to display": the result matches the upright image turned so.
    expected = np.asarray(decode(plain.jpeg).transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert np.abs(np.asarray(decode(rotated.jpeg), dtype=np.int16) - expected).mean() < 4


def test_mode_conversions_keep_the_picture(negatives: Path) -> None:
    reference = np.asarray(decode(run((negatives / "odd_png_named_jpg.jpg").read_bytes()).jpeg), dtype=np.float64)
    grey_reference = reference @ np.array([0.299, 0.587, 0.114])
    for name, tolerance in (("odd_cmyk.jpg", 6), ("odd_rgba.png", 2), ("odd_palette.png", 12)):
        out = np.asarray(decode(run((negatives / name).read_bytes()).jpeg), dtype=np.float64)
        assert np.abs(out - reference).mean() < tolerance, name
    # 16-bit grey is scaled (/257), not clipped: clipping would make it all white (and so blank).
    grey = np.asarray(decode(run((negatives / "odd_gray16.png").read_bytes()).jpeg), dtype=np.float64)
    assert np.abs(grey[..., 0] - grey_reference).mean() < 4


def test_huge_negative_is_handled(negatives: Path) -> None:
    clean = run((negatives / "odd_huge_4000x3000.jpg").read_bytes())
    assert (clean.width, clean.height) == (4000, 3000)
    assert reason((negatives / "odd_huge_4000x3000.jpg").read_bytes(), ValidationLimits(max_pixels=5_000_000)) == (
        "decompression_bomb"
    )


# ------------------------------------------------------------------------------------------ real dermoscopy


@pytest.mark.parametrize("index", [0, 1, 57, 200, -1])
def test_real_ham10000_images_pass(index: int) -> None:
    path = sample_image_paths()[index]
    clean = run(path.read_bytes())
    im = assert_clean(clean)
    assert im.size == Image.open(path).size
    assert clean.conversions == () and clean.source_format == "JPEG"
    original = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(im, dtype=np.int16) - original).mean() < 2.5  # q95: visually the same


def test_all_sample_images_pass() -> None:
    paths = sample_image_paths()
    assert len(paths) > 100
    for path in paths:
        run(path.read_bytes())


def test_metadata_is_stripped_from_jpeg() -> None:
    src = Image.open(io.BytesIO(sample_jpeg(3)))
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "DermLite"
    exif[ExifTags.Base.ImageDescription] = "patient Jane Doe, DOB 1970-01-01"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 12.5)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (4.0, 53.0, 40.1)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/>Jane Doe</x:xmpmeta>'
    data = encode(src, "JPEG", quality=92, exif=exif.tobytes(), icc_profile=icc, comment=b"Jane Doe", xmp=xmp)
    # The input really carries all of it, GPS included.
    probe = Image.open(io.BytesIO(data))
    assert probe.getexif().get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] == (52.0, 22.0, 12.5)
    assert {"exif", "icc_profile", "comment", "xmp"} <= set(probe.info)

    clean = run(data)
    assert_clean(clean)
    for secret in (b"Jane", b"DermLite", b"GPS", b"Exif", b"ICC_PROFILE", b"xmp"):
        assert secret not in clean.jpeg
    assert clean.source_sha256 != clean.sha256


def test_a_comment_alone_is_stripped() -> None:
    # Without a profile to apply, the decoded image itself is re-encoded: Pillow would copy its comment over.
    data = encode(Image.open(io.BytesIO(sample_jpeg(3))), "JPEG", quality=95, comment=b"patient Jane Doe")
    assert Image.open(io.BytesIO(data)).info["comment"] == b"patient Jane Doe"
    clean = run(data)
    assert_clean(clean)
    assert b"Jane" not in clean.jpeg


def test_metadata_is_stripped_from_png() -> None:
    src = Image.open(io.BytesIO(sample_jpeg(4)))
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Jane Doe")
    info.add_itxt("Comment", "patient record 1234", zip=True)
    exif = Image.Exif()
    exif[ExifTags.Base.Artist] = "Jane Doe"
    data = encode(src, "PNG", pnginfo=info, exif=exif.tobytes())
    assert "Author" in Image.open(io.BytesIO(data)).info
    clean = run(data)
    assert_clean(clean)
    assert b"Jane" not in clean.jpeg and b"1234" not in clean.jpeg


def test_icc_profile_is_applied_before_it_is_stripped() -> None:
    src = Image.open(io.BytesIO(sample_jpeg(5)))
    srgb_bytes = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = run(encode(src, "JPEG", quality=95, icc_profile=srgb_bytes))
    assert "icc->sRGB" in tagged.conversions
    broken = run(encode(src, "JPEG", quality=95, icc_profile=b"\x00" * 200))
    assert "icc_ignored" in broken.conversions


def test_gray16_is_scaled_not_clipped() -> None:
    ramp = (np.arange(256, dtype=np.uint32)[None, :].repeat(64, axis=0) * 257).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = np.asarray(decode(run(data).jpeg), dtype=np.float64)[..., 0]
    assert np.abs(out - np.arange(256)[None, :]).mean() < 1.5


def test_alpha_is_dropped_not_composited() -> None:
    rgb = Image.open(io.BytesIO(sample_jpeg(6))).convert("RGB")
    rgba = rgb.copy()
    alpha = Image.new("L", rgb.size, 0)
    alpha.paste(255, (0, 0, rgb.width // 2, rgb.height))
    rgba.putalpha(alpha)
    out = np.asarray(decode(run(encode(rgba, "PNG")).jpeg), dtype=np.int16)
    # The transparent half keeps its colour values (compositing on white or black would replace them).
    assert np.abs(out - np.asarray(rgb, dtype=np.int16)).mean() < 2.5


# ------------------------------------------------------------------------------------------ limits and bombs


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_header(width: int, height: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A tiny PNG whose IHDR claims width x height, with a few bytes of IDAT."""
    chunk = _chunk
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return v.PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def jpeg_with_header(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 is rewritten to claim width x height."""
    data = bytearray(sample_jpeg(0))
    pos = data.index(b"\xff\xc0")
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pixel data is decoded."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (png_with_header(100_000, 100_000), "decompression_bomb"),  # past Pillow's own guard (2 x 89.5 MP)
        (png_with_header(10_000, 9_000), "decompression_bomb"),  # past Pillow's warning (89.5 MP), made an error
        (png_with_header(8_000, 6_000), "decompression_bomb"),  # past ours (40 MP) only
        (png_with_header(2**31 - 1, 2**31 - 1), "decompression_bomb"),
        (jpeg_with_header(65_000, 65_000), "decompression_bomb"),
        (png_with_header(5_000, 50), "too_small"),
        (png_with_header(10_001, 3_000), "too_large"),
        (png_with_header(1_000, 200), "aspect_ratio"),
        (png_with_header(0, 500), "corrupt_image"),
    ],
    ids=["png-10Gpx", "png-90Mpx", "png-48Mpx", "png-max", "jpeg-4Gpx", "thin", "wide", "aspect", "zero"],
)
def test_refused_from_the_header_before_decoding(data: bytes, code: str, no_decoding: None) -> None:
    assert len(data) < 10_000  # a few KB claiming gigapixels
    assert reason(data) == code


def test_a_plausible_header_is_decoded_and_its_missing_data_caught() -> None:
    # Same tiny file claiming an allowed size: now it is decoded, and the missing pixel data is the reason.
    assert reason(png_with_header(800, 600)) in ("truncated_image", "corrupt_image")


def test_4000x3000_is_accepted_within_limits() -> None:
    rng = np.random.default_rng(1)
    base = np.asarray(Image.open(io.BytesIO(sample_jpeg(7))).convert("RGB").resize((4000, 3000)), dtype=np.int16)
    noisy = np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
    clean = run(encode(Image.fromarray(noisy), "JPEG", quality=90))
    assert (clean.width, clean.height) == (4000, 3000)
    assert reason(encode(Image.fromarray(noisy[:1500, :2000]), "JPEG"), ValidationLimits(max_side=1999)) == (
        "too_large"
    )


def test_file_size_and_empty_and_unknown_formats() -> None:
    assert reason(b"") == "empty_file"
    assert reason(sample_jpeg(0), ValidationLimits(max_bytes=100)) == "file_too_large"
    for data in (b"GIF89a" + b"\x00" * 100, b"BM" + b"\x00" * 100, b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"II*\x00",
                 b"\xff\xd8", b"\x89PNG\r\n"):
        assert reason(data) == "unsupported_format"
    assert reason(b"\xff\xd8\xff" + b"\x00" * 50) == "corrupt_image"
    assert reason(v.PNG_MAGIC + b"\x00" * 50) == "corrupt_image"


def test_pillow_errors_other_than_oserror_are_refusals() -> None:
    # Found by fuzzing: Pillow reports some damage as ValueError or SyntaxError, not OSError.
    ihdr = v.PNG_MAGIC + _chunk(b"IHDR", b"\x00" * 5) + _chunk(b"IEND", b"")
    with pytest.raises(ImageValidationError) as info:
        run(ihdr)
    assert info.value.reason_code == "corrupt_image" and isinstance(info.value.__cause__, ValueError)
    png = bytearray(encode(Image.open(io.BytesIO(sample_jpeg(2))).resize((600, 450)), "PNG"))
    second_idat = png.index(b"IDAT", png.index(b"IDAT") + 4)
    assert second_idat > 0, "needs a PNG with several IDAT chunks"
    png[second_idat : second_idat + 4] = b"\x00\x00\x00\x00"
    with pytest.raises(ImageValidationError) as info:
        run(bytes(png))
    assert info.value.reason_code == "corrupt_image" and isinstance(info.value.__cause__, SyntaxError)


def test_truncated_real_jpeg_and_png_are_refused() -> None:
    jpeg = sample_jpeg(8)
    png = encode(Image.open(io.BytesIO(jpeg)), "PNG")
    for cut in (0.3, 0.6, 0.9):
        assert reason(jpeg[: int(len(jpeg) * cut)]) in ("truncated_image", "corrupt_image")
        assert reason(png[: int(len(png) * cut)]) in ("truncated_image", "corrupt_image")


def test_load_truncated_images_must_stay_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImagingConfigError):
        run(sample_jpeg(0))


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        ValidationLimits(min_side=100, max_side=50)
    with pytest.raises(ValueError):
        ValidationLimits(max_aspect_ratio=0.5)
    with pytest.raises(ValueError):
        ValidationLimits(max_pixels=10**12)  # above Pillow's guard: ours would never be the one to fire


def test_blank_and_binary_frames() -> None:
    assert reason(encode(Image.new("RGB", (300, 200), (201, 150, 140)), "PNG")) == "blank_image"
    mask = Image.new("L", (300, 200), 0)
    mask.paste(255, (100, 50, 200, 150))
    assert reason(encode(mask, "PNG")) == "binary_image"
    # Nearly flat but textured (like skin with little contrast) is not blank.
    rng = np.random.default_rng(0)
    skin = np.clip(np.full((200, 300, 3), (200, 150, 140)) + rng.normal(0, 6, (200, 300, 3)), 0, 255)
    run(encode(Image.fromarray(skin.astype(np.uint8)), "PNG"))


# ------------------------------------------------------------------------------------------ perceptual hash


def test_phash_is_stable_under_reencoding_and_resizing() -> None:
    im = Image.open(io.BytesIO(sample_jpeg(9))).convert("RGB")
    h = phash(im)
    assert phash(decode(encode(im, "JPEG", quality=75)).convert("RGB")) == h or hamming(
        h, phash(decode(encode(im, "JPEG", quality=75)).convert("RGB"))
    ) <= 8
    assert hamming(h, phash(im.resize((400, 300)))) <= v.NEAR_DUPLICATE_BITS
    assert hamming(h, phash(im.resize((150, 112)))) <= v.NEAR_DUPLICATE_BITS


def test_phash_separates_different_lesions() -> None:
    hashes = [phash(Image.open(p).convert("RGB")) for p in sample_image_paths()[:120]]
    distances = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    # The sample holds a few images of the same lesion; the bulk must be far apart.
    assert np.percentile(distances, 1) > 2 * v.NEAR_DUPLICATE_BITS


def test_phash_known_hard_pair(ham_images: Path) -> None:
    # Different lesions 2 bits apart under the classic 64-bit pHash; this hash must keep them apart.
    a = phash(Image.open(ham_images / "ISIC_0024326.jpg").convert("RGB"))
    b = phash(Image.open(ham_images / "ISIC_0029416.jpg").convert("RGB"))
    assert hamming(a, b) > v.NEAR_DUPLICATE_BITS


def test_hamming() -> None:
    assert hamming("00", "ff") == 8 and hamming("f0f0", "f0f0") == 0 and hamming("1", "3") == 1
