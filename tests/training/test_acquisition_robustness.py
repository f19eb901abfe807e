"""Issue 20: one path from picture to network whatever the camera, the shifts, the robust threshold, two sources."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from training_helpers import SAMPLE

from inference_image.imaging import decode_image
from inference_image.transform import ModelInputBuilder
from lesionml.acquisition import (
    SEVERITIES,
    SHIFTS,
    colour_cast,
    gamma,
    random_acquisition,
    random_squash,
    sharper_camera,
    squash_to_square,
)
from lesionml.metrics import choose_robust_threshold, highest_threshold_reaching, lowest_threshold_keeping
from lesionml.prepare_ham import make_job_dir, merge_splits, read_labelled_source, split_by_lesion
from lesionml.preprocessing import (
    PreprocessingSpec,
    detail_factor,
    preprocess,
    read_spec,
    reduce_to_detail,
    shades_of_gray,
    write_spec,
)
from training_image.data import EvalImages, Sample, TrainImages, median_crop_size, read_manifest

MEAN, STD = (0.498,) * 3, (0.502,) * 3


def _spec(**kw: object) -> PreprocessingSpec:
    args: dict[str, object] = {"arch": "efficientnet_lite0", "height": 192, "width": 256, "mean": MEAN, "std": STD}
    args.update(kw)
    return PreprocessingSpec(**args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lesion() -> Image.Image:
    """A real 200x150 HAM10000 picture (the bundled sample)."""
    path = sorted((SAMPLE / "images").glob("*.jpg"))[0]
    return Image.open(path).convert("RGB")


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_a_sharper_camera_reaches_the_network_as_the_training_picture_did(lesion: Image.Image) -> None:
    # HAM10000's originals are 600x450; the model learnt from 200x150 copies, upsampled to 256x192.
    big = sharper_camera(lesion)
    assert big.size == (600, 450)
    capped, uncapped = _spec(detail_width=200, detail_height=150), _spec()
    with_cap = _gap(preprocess(big, capped), preprocess(lesion, capped))
    without = _gap(preprocess(big, uncapped), preprocess(lesion, uncapped))
    assert with_cap < 0.5 * without, (with_cap, without)


def test_detail_cap_measures_the_part_the_model_sees() -> None:
    spec = _spec(detail_width=200, detail_height=150)
    assert detail_factor(200, 150, spec) == 1.0
    assert detail_factor(600, 450, spec) == pytest.approx(1 / 3)
    # A 512x512 square: the 4:3 crop the model sees is 512x384.
    assert detail_factor(512, 512, spec) == pytest.approx(200 / 512)
    assert reduce_to_detail(Image.new("RGB", (512, 512)), spec).size == (200, 200)
    assert detail_factor(100, 75, spec) == 1.0  # smaller pictures are never enlarged here
    assert detail_factor(600, 450, _spec()) == 1.0


def test_shades_of_gray_undoes_a_colour_cast(lesion: Image.Image) -> None:
    cast = colour_cast(lesion, (1.15, 1.0, 0.85))
    sog, plain = _spec(color_constancy="shades_of_gray"), _spec()
    with_cc = _gap(preprocess(cast, sog), preprocess(lesion, sog))
    without = _gap(preprocess(cast, plain), preprocess(lesion, plain))
    assert with_cc < 0.25 * without, (with_cc, without)
    grey = Image.new("RGB", (256, 192), (120, 120, 120))
    assert np.allclose(preprocess(grey, sog), preprocess(grey, plain), atol=1e-5)  # grey light: untouched


def test_median_gamma_undoes_another_tone_curve_with_or_without_a_cast(lesion: Image.Image) -> None:
    # Tone comes after the colour constancy: a cast would otherwise move the brightest channel it measures.
    toned, plain = _spec(tone="median_gamma", color_constancy="shades_of_gray"), _spec(color_constancy="shades_of_gray")
    neutral, warm, cool = (1.0, 1.0, 1.0), (1.15, 1.0, 0.85), (0.88, 1.0, 1.15)
    for g, gains in ((0.7, neutral), (1.4, neutral), (1.4, warm), (0.7, cool)):
        shifted = gamma(colour_cast(lesion, gains), g)
        with_tone = _gap(preprocess(shifted, toned), preprocess(lesion, toned))
        without = _gap(preprocess(shifted, plain), preprocess(lesion, plain))
        assert with_tone < 0.15 * without, (g, gains, with_tone, without)
    black = Image.new("RGB", (256, 192), (0, 0, 0))
    assert np.allclose(preprocess(black, toned), preprocess(black, plain))  # nothing to measure: left alone


@pytest.mark.parametrize("power", [1.0, 2.0, 5.0, 6.0, 2.5])
def test_shades_of_gray_fast_power_is_the_minkowski_mean(power: float) -> None:
    rng = np.random.default_rng(0)
    planes = (rng.uniform(0, 255, (3, 4096)) * np.array([[1.0], [0.8], [0.6]])).astype(np.float32)
    x = planes.astype(np.float64) / 255.0
    illuminant = np.power(np.mean(np.power(x, power), axis=1), 1.0 / power)
    expected = np.clip(planes * (illuminant.mean() / illuminant)[:, None], 0, 255)
    np.testing.assert_allclose(shades_of_gray(planes.copy(), power), expected, rtol=1e-5, atol=1e-3)


def test_allocator_setting_applies_on_glibc_and_is_skipped_without_a_c_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ctypes.util
    import platform

    from lesionml import allocator

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert allocator.keep_freed_memory() is True
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator.keep_freed_memory() is False


@pytest.mark.parametrize("tone", ["none", "median_gamma"])
@pytest.mark.parametrize("size", [(256, 192), (600, 450), (512, 512), (120, 90)])
def test_serving_computes_the_training_transform(lesion: Image.Image, size: tuple[int, int], tone: str) -> None:
    spec = _spec(detail_width=200, detail_height=150, color_constancy="shades_of_gray", tone=tone)
    img = lesion.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    served, _ = ModelInputBuilder(spec).model_input(decode_image(buf.getvalue(), 10**8, (spec.width, spec.height)))
    np.testing.assert_allclose(served, preprocess(img, spec), atol=1e-4)


def test_training_caches_images_at_the_detail_serving_reduces_them_to(tmp_path: Path, lesion: Image.Image) -> None:
    spec = _spec(height=48, width=64, detail_width=200, detail_height=150)
    path = tmp_path / "big.png"
    lesion.resize((800, 600)).save(path)
    images = TrainImages([Sample("big", path, 0, "big")], spec, "true", 1)
    # Reduced to 200x150 (the cap), not to the 128x96 thumbnail bound alone.
    reduced = np.asarray(reduce_to_detail(Image.open(path).convert("RGB"), spec))
    assert images.get(0).size == (128, 96)
    expected = Image.fromarray(reduced).copy()
    expected.thumbnail((128, 96), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(np.asarray(images.get(0)), np.asarray(expected))
    assert median_crop_size([Sample("big", path, 0, "big")], 48, 64) == (600, 800)


def test_a_version_one_spec_means_what_it_meant_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    v1 = {"version": 1, "arch": "x", "height": 150, "width": 200, "mean": list(MEAN), "std": list(STD),
          "resize": "center_crop_to_aspect", "interpolation": "bilinear"}
    (tmp_path / "p.json").write_text(json.dumps(v1))
    spec = read_spec(tmp_path / "p.json")
    assert (spec.version, spec.detail_width, spec.color_constancy) == (1, 0, "none")
    write_spec(_spec(detail_width=200, detail_height=150, color_constancy="shades_of_gray"), tmp_path / "q.json")
    assert read_spec(tmp_path / "q.json").color_constancy == "shades_of_gray"
    v2 = {**v1, "version": 2, "detail_width": 200, "detail_height": 150, "color_constancy": "shades_of_gray"}
    (tmp_path / "p.json").write_text(json.dumps(v2))  # before tone normalisation: none
    assert (read_spec(tmp_path / "p.json").tone, read_spec(tmp_path / "p.json").per_image) == ("none", True)
    (tmp_path / "p.json").write_text(json.dumps({**v1, "version": 99}))
    with pytest.raises(ValueError, match="newer"):
        read_spec(tmp_path / "p.json")


def test_every_shift_keeps_a_picture_and_states_its_severity(lesion: Image.Image) -> None:
    assert set(SEVERITIES) == set(SHIFTS)
    clean = np.asarray(lesion, dtype=np.float32)
    for name, shift in SHIFTS.items():
        out = shift(lesion)
        assert out.mode == "RGB", name
        if out.size == lesion.size:
            assert _gap(np.asarray(out, dtype=np.float32), clean) > 0.5, name  # it changes something
    assert squash_to_square(lesion).size == (150, 150)


def test_random_acquisition_depends_only_on_its_generator(lesion: Image.Image) -> None:
    a = random_acquisition(lesion, np.random.default_rng(3))
    b = random_acquisition(lesion, np.random.default_rng(3))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sizes = {random_squash(lesion, np.random.default_rng(s)).size for s in range(40)}
    assert lesion.size in sizes and len(sizes) > 5  # sometimes left alone, else one side compressed


def test_robust_threshold_holds_sensitivity_under_shift_above_the_floor() -> None:
    y = np.array([1] * 4 + [0] * 10, dtype=bool)
    scores = np.r_[[0.9, 0.8, 0.7, 0.6], np.linspace(0.05, 0.5, 10)]
    shifted = {"dark": np.array([0.5, 0.45, 0.35, 0.3]), "jpeg": np.array([0.85, 0.75, 0.65, 0.55])}
    # Clean: 0.6 catches all four. Under "dark" that needs 0.3; 0.3 keeps 6 of 10 negatives below it.
    low_floor = choose_robust_threshold(y, scores, shifted, 0.6, specificity_floor=0.5)
    assert low_floor.threshold == pytest.approx(0.3)
    assert low_floor.tradeoff["chosen"]["dark_sensitivity"] == 1.0
    assert low_floor.tradeoff["validation_threshold"]["dark_sensitivity"] == 0.0
    # A floor of 0.8 clean specificity stops it higher: sensitivity first, but not below the floor.
    high_floor = choose_robust_threshold(y, scores, shifted, 0.6, specificity_floor=0.8)
    assert 0.3 < high_floor.threshold <= 0.6
    assert high_floor.tradeoff["chosen"]["clean_specificity"] >= 0.8
    assert not low_floor.below_floor and not high_floor.below_floor
    # A clean choice already under the floor (0.3: specificity 0.5) is not raised to it: sensitivity first, flagged.
    under = choose_robust_threshold(y, scores, shifted, 0.3, specificity_floor=0.8)
    assert under.threshold == pytest.approx(0.3) and under.below_floor
    assert under.tradeoff["chosen"]["clean_specificity"] == pytest.approx(0.5)
    assert highest_threshold_reaching(np.array([0.2, 0.9, 0.5]), 2 / 3) == 0.5
    assert lowest_threshold_keeping(np.array([0.1, 0.2, 0.3, 0.4]), 0.5) > 0.2


def _write_plain_source(root: Path, lesion: Image.Image) -> None:
    (root / "images").mkdir(parents=True)
    rows = [("ISIC_0000001", "mel", "g1"), ("ISIC_0000002", "mel", "g1"), ("ISIC_0000003", "nv", ""),
            ("ISIC_0000004", "bkl", "")]
    for image_id, _, _ in rows:
        lesion.resize((512, 512)).save(root / "images" / f"{image_id}.jpg")
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "lesion_group"])
        w.writerows(rows)


def test_a_second_source_joins_the_dataset_by_its_lesion_groups(tmp_path: Path, lesion: Image.Image) -> None:
    _write_plain_source(tmp_path / "isic_archive", lesion)
    rows = read_labelled_source(tmp_path / "isic_archive" / "labels.csv", tmp_path / "isic_archive" / "images",
                                "isic_archive")
    assert [(r["lesion_id"], r["path"], r["source"]) for r in rows][:3] == [
        ("g1", "isic_archive/ISIC_0000001.jpg", "isic_archive"), ("g1", "isic_archive/ISIC_0000002.jpg",
                                                                   "isic_archive"),
        ("ISIC_0000003", "isic_archive/ISIC_0000003.jpg", "isic_archive")]
    splits = merge_splits(split_by_lesion(rows, seed=1))
    where = {r["image_id"]: s for s, part in splits.items() for r in part}
    assert where["ISIC_0000001"] == where["ISIC_0000002"]  # one lesion group, one split
    make_job_dir(tmp_path / "job", splits, {"isic_archive": tmp_path / "isic_archive" / "images"}, {})
    channel = tmp_path / "job" / "input" / "data"
    split = where["ISIC_0000001"]
    samples = read_manifest(channel / "manifests" / f"{split}.csv", channel / "images", "ham7")
    assert {s.source for s in samples} == {"isic_archive"} and all(s.path.is_file() for s in samples)


def test_a_manifest_without_source_still_reads(tmp_path: Path, lesion: Image.Image) -> None:
    lesion.save(tmp_path / "a.jpg")
    (tmp_path / "train.csv").write_text("image_id,path,label,lesion_id\na,a.jpg,mel,L1\n")
    [sample] = read_manifest(tmp_path / "train.csv", tmp_path, "ham7")
    assert (sample.lesion_id, sample.source) == ("L1", "")


def test_shifted_validation_images_are_the_shifted_pictures(tmp_path: Path, lesion: Image.Image) -> None:
    lesion.save(tmp_path / "a.png")
    spec = _spec(height=48, width=64)
    samples = [Sample("a", tmp_path / "a.png", 4, "a")]
    plain = EvalImages(samples, spec, 1)
    warm = EvalImages(samples, spec, 1, shift=SHIFTS["cast_warm"])
    assert warm.pixels[0][..., 0].mean() > plain.pixels[0][..., 0].mean() + 3  # redder
    assert warm.pixels[0][..., 2].mean() < plain.pixels[0][..., 2].mean() - 3  # less blue


def test_shift_benchmark_tells_a_clear_miss_from_noise() -> None:
    from benchmarks.training.shifts import drop_intervals, verdict

    rng = np.random.default_rng(1)
    is_mel = np.r_[np.ones(50, bool), np.zeros(200, bool)]
    clean = np.where(is_mel, rng.uniform(0.3, 1.0, 250), rng.uniform(0.0, 0.5, 250))
    collapsed = clean * 0.2  # every melanoma falls under the threshold
    one_lost = clean.copy()
    one_lost[0] = 0.0  # one melanoma in 50: 0.02 of sensitivity
    probs = {"clean": clean, "same": clean.copy(), "collapsed": collapsed, "one_lost": one_lost}
    iv = drop_intervals(is_mel, probs, 0.25, n=300)
    assert iv["collapsed"]["melanoma_sensitivity"][0] > 0.9
    assert iv["same"] == {"melanoma_sensitivity": [0.0, 0.0], "melanoma_auc": [0.0, 0.0]}
    # One melanoma in 50 is 0.02; resampled, it can weigh 0.06 or more: not a clear miss, not a clear pass.
    assert iv["one_lost"]["melanoma_sensitivity"][0] == 0.0 < 0.05 < iv["one_lost"]["melanoma_sensitivity"][1]
    figs = {"clean": {"melanoma_sensitivity": 1.0, "melanoma_auc": 0.9},
            "same": {"melanoma_sensitivity": 1.0, "melanoma_auc": 0.9},
            "collapsed": {"melanoma_sensitivity": 0.0, "melanoma_auc": 0.9},
            "one_lost": {"melanoma_sensitivity": 0.98, "melanoma_auc": 0.9}}
    v = verdict(figs, iv)
    assert (v["met"], v["failing_shifts"], v["clearly_missed"], v["clearly_met"]) == (
        False, ["collapsed"], ["collapsed"], ["same"])


def test_shift_benchmark_compares_models_at_one_clean_specificity() -> None:
    from benchmarks.training.shifts import matched_threshold

    is_mel = np.r_[np.ones(4, bool), np.zeros(10, bool)]
    clean = np.r_[[0.9, 0.8, 0.7, 0.6], np.linspace(0.05, 0.5, 10)]
    t = matched_threshold(is_mel, clean, 0.7)
    assert np.mean(clean[~is_mel] < t) >= 0.7 > np.mean(clean[~is_mel] < np.nextafter(t, 0))  # the lowest such
    # Another model that only scales its scores is the same classifier: whatever threshold it exported, it gets
    # the same operating point, and so the same sensitivity there.
    assert np.mean(clean[is_mel] >= t) == np.mean(0.5 * clean[is_mel] >= matched_threshold(is_mel, 0.5 * clean, 0.7))
