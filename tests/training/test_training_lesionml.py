"""The shared lesionml package: labels, preprocessing, models, drift reference, HAM10000 split."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lesionml import labels
from lesionml.models import build_model, export_torchscript, lite0_weights_path, load_torchscript, view_count
from lesionml.prepare_ham import split_by_lesion
from lesionml.preprocessing import PreprocessingSpec, crop_box_for_aspect, load_image, preprocess, read_spec, write_spec
from lesionml.reference_stats import (
    build_reference_stats,
    fit_pca,
    image_statistics,
    population_stability_index,
    project,
    summarize,
)

ROOT = Path(__file__).resolve().parents[2]


def test_label_sets_match_the_contract() -> None:
    assert labels.classes_for("ham7") == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert labels.classes_for("isic8") == ("mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc")
    assert labels.melanoma_index("ham7") == 4 and labels.melanoma_index("isic8") == 0
    assert labels.is_valid_label(" MEL ", "ham7") and not labels.is_valid_label("scc", "ham7")
    assert labels.parse_classes_document(labels.classes_document("isic8")) == ("isic8", labels.LABEL_SETS["isic8"])
    with pytest.raises(ValueError):
        labels.parse_classes_document({"label_set": "ham7", "classes": ["mel", "nv"]})
    with pytest.raises(ValueError):
        labels.classes_for("ham8")


def test_torch_free_modules_do_not_import_torch() -> None:
    code = (
        "import sys, lesionml.labels, lesionml.archs, lesionml.metrics, lesionml.preprocessing, "
        "lesionml.reference_stats, training_image.config; "
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; assert not bad, bad"
    )
    pythonpath = f"{ROOT}:{ROOT / 'layers' / 'common'}"  # the training image's PYTHONPATH
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": pythonpath})


def _jpeg(img: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_and_mode_are_normalised() -> None:
    data = _jpeg(Image.new("RGB", (40, 20), (200, 10, 10)), orientation=6)  # 6: rotate 90 degrees to display
    assert load_image(data).size == (20, 40)
    assert load_image(data, exif_transpose=False).size == (40, 20)
    assert load_image(Image.new("L", (8, 8), 100)).mode == "RGB"


def test_crop_box_keeps_the_target_aspect() -> None:
    assert crop_box_for_aspect(200, 150, 200, 150) == (0, 0, 200, 150)
    assert crop_box_for_aspect(400, 150, 200, 150) == (100, 0, 300, 150)
    assert crop_box_for_aspect(150, 200, 200, 150) == (0, 44, 150, 156)


def test_preprocess_normalises_deterministically(tmp_path: Path) -> None:
    spec = PreprocessingSpec(arch="x", height=30, width=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    img = Image.new("RGB", (80, 80), (255, 0, 128))
    x = preprocess(img, spec)
    assert x.shape == (3, 30, 40) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], [(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (128 / 255 - 0.5) / 1.0], atol=1e-6)
    path = tmp_path / "a.png"
    img.save(path)
    np.testing.assert_array_equal(preprocess(path, spec), preprocess(path.read_bytes(), spec))
    write_spec(spec, tmp_path / "preprocessing.json")
    assert read_spec(tmp_path / "preprocessing.json") == spec
    assert json.loads((tmp_path / "preprocessing.json").read_text())["resize"] == "center_crop_to_aspect"


def test_missing_weights_log_one_line_and_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with caplog.at_level(logging.INFO, logger="lesionml.models"):
        _, info = build_model("mobilenet_v3_small", 7, pretrained=True)
    assert info.weights == "random"
    assert len([r for r in caplog.records if "no local ImageNet weights" in r.getMessage()]) == 1


def test_cached_torchvision_weights_are_loaded_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    reference = torchvision.models.mobilenet_v3_small()
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "mobilenet_v3_small-047dcff4.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model, info = build_model("mobilenet_v3_small", 7, pretrained=True)
    assert info.weights.startswith("imagenet:")
    stem: Any = model.backbone.features[0][0]  # type: ignore[index]
    torch.testing.assert_close(stem.weight, reference.features[0][0].weight)


def test_lite0_uses_the_packaged_imagenet_weights() -> None:
    path = lite0_weights_path()
    assert path is not None
    model, info = build_model("efficientnet_lite0", 7, pretrained=True, image_size=(48, 64))
    assert info.weights == f"imagenet:{path}" and info.mean == (0.498, 0.498, 0.498)
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone: Any = model.backbone
    stem: Any = backbone.net._conv_stem
    torch.testing.assert_close(stem.weight, state["_conv_stem.weight"])
    random_model, random_info = build_model("efficientnet_lite0", 7, pretrained=False, image_size=(48, 64))
    assert random_info.weights == "random"
    random_backbone: Any = random_model.backbone
    random_stem: Any = random_backbone.net._conv_stem
    assert not torch.equal(random_stem.weight, state["_conv_stem.weight"])


def test_torchscript_export_matches_eager(tmp_path: Path) -> None:
    model, info = build_model("mobilenet_v3_small", 3, pretrained=False)
    model.eval()
    export_torchscript(model, torch.zeros(1, 3, 48, 64), str(tmp_path / "m.ts"))
    ts = load_torchscript(tmp_path / "m.ts")
    x = torch.randn(4, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), model(x))
        probs, emb = ts.predict(x)
    assert emb.shape == (4, info.embedding_dim)
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vgg16", 3)


def test_image_statistics_of_a_flat_red_image() -> None:
    stats = image_statistics(Image.new("RGB", (600, 450), (255, 0, 0)))
    assert stats["brightness"] == pytest.approx(0.299, abs=1e-4)
    assert stats["contrast"] == pytest.approx(0.0, abs=1e-6)
    assert (stats["red_mean"], stats["green_mean"], stats["saturation"]) == pytest.approx((1.0, 0.0, 1.0))
    assert (stats["width"], stats["height"], stats["aspect"]) == (600.0, 450.0, pytest.approx(4 / 3))


def test_pca_projection_and_psi() -> None:
    rng = np.random.default_rng(0)
    axis = np.array([3.0, 4.0, 0.0]) / 5.0
    emb = rng.normal(size=(200, 1)) * 10 * axis + rng.normal(size=(200, 3)) * 0.1
    mean, comps, var, ratio = fit_pca(emb, 2)
    assert abs(comps[0] @ axis) == pytest.approx(1.0, abs=1e-3) and ratio[0] > 0.99
    probs = rng.dirichlet(np.ones(7), size=200)
    ref = build_reference_stats(
        emb, probs, rng.integers(0, 7, 200), [{"brightness": 0.5, "contrast": 0.1, "red_mean": 0.6,
        "green_mean": 0.4, "blue_mean": 0.3, "saturation": 0.4, "width": 200.0, "height": 150.0,
        "aspect": 4 / 3}] * 200, rng.integers(0, 7, 50), "ham7", labels.LABEL_SETS["ham7"], pca_components=2,
        sample_size=50,
    )
    json.dumps(ref, allow_nan=False)
    np.testing.assert_allclose(project(emb[:5], ref), (emb[:5] - mean) @ comps.T, rtol=1e-4, atol=1e-4)
    assert len(ref["embedding"]["projections_sample"]) == 50
    # Under a decision rule that always names class 6, the predicted prior and the confidence follow it.
    decided = build_reference_stats(
        emb, probs, rng.integers(0, 7, 200), [{"brightness": 0.5, "contrast": 0.1, "red_mean": 0.6,
        "green_mean": 0.4, "blue_mean": 0.3, "saturation": 0.4, "width": 200.0, "height": 150.0,
        "aspect": 4 / 3}] * 200, rng.integers(0, 7, 50), "ham7", labels.LABEL_SETS["ham7"], pca_components=2,
        sample_size=50, predicted=np.full(200, 6),
    )
    assert decided["class_prior"]["reference_predicted"]["vasc"] == 1.0
    assert ref["class_prior"]["reference_predicted"]["vasc"] < 0.5
    assert decided["confidence"]["mean"] == pytest.approx(probs[:, 6].mean(), abs=1e-4)
    assert ref["confidence"]["mean"] == pytest.approx(probs.max(axis=1).mean(), abs=1e-4)
    values = rng.uniform(size=1000)
    summary = summarize(values, bounded=True, sample_size=10)
    assert population_stability_index(summary, rng.uniform(size=1000)) < 0.05
    assert population_stability_index(summary, rng.uniform(0.8, 1.0, size=1000)) > 1.0


def test_split_by_lesion_keeps_lesions_together_and_is_deterministic() -> None:
    rows = [{"image_id": f"I{i}", "path": f"I{i}.jpg", "label": "nv" if i % 3 else "mel", "lesion_id": f"L{i // 2}"}
            for i in range(300)]
    a, b = split_by_lesion(rows, seed=3), split_by_lesion(rows, seed=3)
    assert a == b
    lesions = {s: {r["lesion_id"] for r in a[s]} for s in a}
    assert not (lesions["train"] & lesions["validation"] or lesions["train"] & lesions["test"]
                or lesions["validation"] & lesions["test"])
    assert sum(len(v) for v in a.values()) == 300
    assert 0.6 < len(a["train"]) / 300 < 0.8
    assert split_by_lesion(rows, seed=4) != a


@pytest.mark.parametrize("height,width,views", [(48, 64, 4), (48, 48, 8)])
def test_test_time_augmented_export_averages_the_label_preserving_views(
    tmp_path: Path, height: int, width: int, views: int
) -> None:
    # ImageNet features: a randomly initialised network answers almost the same for every input.
    torch.manual_seed(0)
    model, info = build_model("efficientnet_lite0", 3, pretrained=True, image_size=(height, width))
    model.eval()
    assert view_count(height, width) == views
    export_torchscript(model, torch.zeros(1, 3, height, width), str(tmp_path / "m.ts"), tta=True)
    ts = load_torchscript(tmp_path / "m.ts")
    x = torch.randn(2, 3, height, width)
    turns = [x, x.flip(3), x.flip(2), x.flip([2, 3])]
    if views == 8:
        turns += [t.transpose(2, 3) for t in turns]
    with torch.no_grad():
        probs, emb = ts.predict(x)
        per_view = torch.stack([torch.softmax(model(v), 1) for v in turns])
        torch.testing.assert_close(probs, per_view.mean(0))
        torch.testing.assert_close(emb, torch.stack([model.embed(v) for v in turns]).mean(0))
        torch.testing.assert_close(ts.embed(x), emb)
        torch.testing.assert_close(torch.softmax(ts(x), 1), probs)
        # Every view of the input gets the answer of the input itself; one view alone would not.
        for v in turns[1:]:
            torch.testing.assert_close(ts.predict(v)[0], probs, atol=1e-5, rtol=0)
        assert float((per_view[0] - per_view[1]).abs().max()) > 1e-4
    assert emb.shape == (2, info.embedding_dim)
