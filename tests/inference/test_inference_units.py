"""In-process checks of the serving pieces: parity with the training transform and the upload validation,
request parsing, out-of-distribution rules, settings and model-directory checks."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference_image.app import RequestError, accepts_json, images_from_json, media_type
from inference_image.artifacts import ModelDirError, load_artifacts
from inference_image.capture import CaptureWriter
from inference_image.imaging import DecodedImage, ImageRequestError, decode_image
from inference_image.ood import OODScorer
from inference_image.predictor import Predictor
from inference_image.settings import Settings, SettingsError
from inference_image.transform import ModelInputBuilder, planes_from_array, statistics_and_flatness
from lesionml.preprocessing import PreprocessingSpec, normalise, preprocess_batch, resize_for_model
from lesionml.reference_stats import image_statistics

from .helpers import NEGATIVES, SAMPLE_IMAGES, encode, odd_variants, sample_image
from .model_factory import reseal

SPEC = PreprocessingSpec(arch="efficientnet_lite0", height=150, width=200, mean=(0.498,) * 3, std=(0.502,) * 3)


def _images() -> list[Image.Image]:
    """Real images of several sizes and aspect ratios (resized, cropped, statistics on a reduced copy)."""
    imgs = [Image.open(p).convert("RGB") for p in sorted(SAMPLE_IMAGES.glob("*.jpg"))[:3]]
    imgs.append(imgs[0].resize((900, 300)))
    imgs.append(imgs[1].resize((97, 131)))
    imgs.append(Image.new("RGB", (64, 48), (0, 0, 0)))
    return imgs


@pytest.mark.parametrize("index", range(6))
def test_fast_transform_equals_lesionml(index: int) -> None:
    img = _images()[index]
    x, stats = ModelInputBuilder(SPEC).build(DecodedImage(img, "PNG", "RGB", img.width, img.height))
    expected_x = normalise(np.asarray(resize_for_model(img, SPEC)), SPEC)
    assert x.dtype == np.float32 and x.shape == expected_x.shape
    np.testing.assert_allclose(x, expected_x, atol=1e-5)
    expected = image_statistics(img)
    assert set(stats) == set(expected)
    for name, value in expected.items():  # lesionml sums channel means in float32: up to ~2e-4 of rounding
        assert stats[name] == pytest.approx(value, abs=1e-3), name
    small = img if max(img.size) <= 256 else img.resize(
        (round(img.width * 256 / max(img.size)), round(img.height * 256 / max(img.size))), Image.Resampling.BILINEAR)
    exact = np.asarray(small, dtype=np.float64).reshape(-1, 3).mean(axis=0) / 255
    np.testing.assert_allclose([stats["red_mean"], stats["green_mean"], stats["blue_mean"]], exact, atol=1e-9)


@pytest.mark.parametrize("variant", ["exif_rotated", "cmyk", "rgba", "palette", "grey", "grey16"])
def test_decoding_matches_upload_validation(variant: str) -> None:
    """Served pixels equal the validated copy training read (up to its JPEG re-encoding)."""
    validation = pytest.importorskip("lesion_imaging.validation")
    data, _ = odd_variants(sample_image())[variant]
    served = np.asarray(decode_image(data, 40_000_000).image, dtype=np.float64)
    clean = validation.validate_image_bytes(data, limits=validation.ValidationLimits())
    stored = np.asarray(Image.open(io.BytesIO(clean.jpeg)).convert("RGB"), dtype=np.float64)
    assert served.shape == stored.shape
    assert np.abs(served - stored).mean() < 2.0  # JPEG quality 95 re-encoding


@pytest.mark.skipif(not (NEGATIVES / "negatives.csv").is_file(), reason="../shared/data/negatives is not present")
def test_decoding_never_raises_anything_but_request_errors() -> None:
    for path in sorted(NEGATIVES.iterdir()):
        try:
            img = decode_image(path.read_bytes(), 40_000_000, (200, 150)).image
        except ImageRequestError as e:
            assert e.status in (400, 413)
            continue
        assert img.mode == "RGB"


def _jpegs() -> list[tuple[str, bytes]]:
    """Plain JPEGs (fast path) and JPEGs Pillow must handle (EXIF, CMYK, grey, damaged)."""
    rgb = Image.open(SAMPLE_IMAGES / "ISIC_0024323.jpg").convert("RGB")
    out = [(p.name, p.read_bytes()) for p in sorted(SAMPLE_IMAGES.glob("*.jpg"))[:20]]
    out += [("progressive", encode(rgb, "JPEG", progressive=True, quality=80)),
            ("444", encode(rgb.resize((640, 480)), "JPEG", subsampling=0, quality=97))]
    out += [(k, v[0]) for k, v in odd_variants(sample_image()).items() if k in ("exif_rotated", "cmyk")]
    out.append(("grey", encode(rgb.convert("L"), "JPEG")))
    out.append(("truncated", sample_image()[:3000]))
    return out


def test_fast_jpeg_path_gives_pillows_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """libjpeg-turbo through simplejpeg and through Pillow: identical pixels and metadata, or no fast path."""
    from inference_image import imaging

    fast_used = 0
    for name, data in _jpegs():
        fast = imaging._fast_jpeg(data, 40_000_000, (200, 150))
        with monkeypatch.context() as m:
            m.setattr(imaging, "_simplejpeg", None)
            try:
                slow = decode_image(data, 40_000_000, (200, 150))
            except ImageRequestError:
                assert fast is None, name
                continue
        if fast is None:
            assert name in ("exif_rotated", "cmyk", "grey"), name
            continue
        fast_used += 1
        assert np.array_equal(np.asarray(fast.image), np.asarray(slow.image)), name
        assert (fast.width, fast.height, fast.source_mode, fast.conversions) == (
            slow.width, slow.height, slow.source_mode, slow.conversions), name
    assert fast_used == 22


def test_large_jpeg_is_decoded_at_reduced_scale_with_full_size_reported() -> None:
    big = Image.open(SAMPLE_IMAGES / "ISIC_0024323.jpg").convert("RGB").resize((4000, 3000))
    decoded = decode_image(encode(big, "JPEG", quality=90), 40_000_000, (200, 150))
    assert decoded.image.size == (2000, 1500) and "jpeg_draft_1/2" in decoded.conversions
    assert (decoded.width, decoded.height) == (4000, 3000)


@pytest.mark.parametrize("mode", ["I;16", "RGB", "RGBA", "P", "L"])
def test_large_pictures_of_any_format_are_reduced_right_after_decoding(mode: str) -> None:
    """A picture with no reduced decode (PNG) is box-averaged to a few times the model input before any conversion:
    the cost past decoding no longer grows with the picture, and the model input barely moves."""
    base = Image.open(SAMPLE_IMAGES / "ISIC_0024323.jpg").convert("RGB").resize((2400, 1800), Image.Resampling.BICUBIC)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        full = base.convert("L").convert("RGB")
    else:
        img = base.convert(mode) if mode != "P" else base.convert("P", palette=Image.Palette.ADAPTIVE)
        full = img.convert("RGB")
    decoded = decode_image(encode(img, "PNG"), 40_000_000, (200, 150))
    assert "reduced_1/2" in decoded.conversions, decoded.conversions
    assert decoded.size == (1200, 900) and (decoded.width, decoded.height) == (2400, 1800)
    builder = ModelInputBuilder(SPEC)
    x, _ = builder.model_input(decoded)
    expected = normalise(np.asarray(resize_for_model(full, SPEC)), SPEC)
    # Averaging 2x2 blocks before the antialiased resize: the same picture to within a grey level or two.
    assert float(np.abs(x - expected).mean()) * 0.502 * 255 < 1.0
    small = decode_image(encode(img.resize((800, 600)), "PNG"), 40_000_000, (200, 150))
    assert not any(c.startswith("reduced") for c in small.conversions)  # under 2 x 4 x the input: untouched


def test_inference_id_follows_sagemakers_constraint() -> None:
    from inference_image.app import inference_id

    assert inference_id(None) is None
    for ok in ("a", "x" * 64, "req-1 with spaces", "~!@#$%^&*()"):
        assert inference_id(ok) == ok
    for bad in ("x" * 65, "x" * 10_000, "", " leading-space", "tab\tinside", "caf\u00e9", "new\nline"):
        with pytest.raises(RequestError) as err:
            inference_id(bad)
        assert (err.value.status, err.value.code) == (400, "invalid_inference_id")


def test_media_type_and_accept_parsing() -> None:
    assert media_type("Image/JPEG; q=1") == "image/jpeg"
    assert media_type(None) == ""
    assert accepts_json(None) and accepts_json("") and accepts_json("*/*;q=0.1")
    assert accepts_json("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")
    assert not accepts_json("text/csv") and not accepts_json("application/json;q=0")
    assert not accepts_json("application/json;q=abc")


def test_json_request_shapes() -> None:
    raw = b"\xff\xd8\xff-bytes"
    b64 = base64.b64encode(raw).decode()
    assert images_from_json(json.dumps({"image": b64}).encode(), 4) == [raw]
    doc = {"instances": [{"b64": b64}, b64, "data:image/jpeg;base64," + b64, b64[:8] + "\n" + b64[8:]]}
    assert images_from_json(json.dumps(doc).encode(), 4) == [raw] * 4
    for bad, code in [(b"[]", "invalid_json"), (b'{"instances": {}}', "invalid_json"),
                      (b'{"instances": [1]}', "invalid_json"), (b'{"image": "a"}', "invalid_base64"),
                      (b"\xff\xfe", "invalid_json")]:
        with pytest.raises(RequestError) as err:
            images_from_json(bad, 4)
        assert err.value.code == code and err.value.status == 400
    with pytest.raises(RequestError) as err:
        images_from_json(json.dumps({"instances": [b64] * 5}).encode(), 4)
    assert err.value.status == 413


def _reference(dim: int = 8) -> dict:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, dim))
    q = {"p01": 0.3, "p50": 0.5, "p99": 0.7}
    return {
        "embedding": {"dim": dim, "mean": emb.mean(0).tolist(), "std": emb.std(0).tolist(),
                      "pca": {"k": 2, "components": np.eye(dim)[:2].tolist()}},
        "image": {n: {"mean": 0.5, "std": 0.1, "quantiles": q}
                  for n in ("brightness", "contrast", "red_mean", "green_mean", "blue_mean", "saturation")},
    }


def flat_share(pixels: np.ndarray) -> float:
    return statistics_and_flatness(planes_from_array(pixels), pixels.shape[1], pixels.shape[0])[1]


def test_ood_rules() -> None:
    scorer = OODScorer(_reference())
    normal = dict.fromkeys(("brightness", "contrast", "red_mean", "green_mean", "blue_mean", "saturation"), 0.5)
    photo = np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    size = (80, 60)
    ok = scorer.score(np.zeros(8), normal, size, flat_share(photo))
    assert not ok.flag and ok.score < 1 and ok.reasons == []
    far = scorer.score(np.full(8, 10.0), normal, size, flat_share(photo))
    assert far.flag and far.reasons == ["embedding_distance"] and far.score >= 1
    odd_stats = scorer.score(np.zeros(8), {**normal, "saturation": 0.0}, size, 0.0)
    assert odd_stats.reasons == ["image_statistics:saturation"]
    assert odd_stats.image_z["saturation"] == pytest.approx(-5.0)
    blank = scorer.score(np.zeros(8), {**normal, "contrast": 0.0}, size, 1.0)
    assert "blank_image" in blank.reasons and blank.score >= 1
    mask = np.zeros((60, 80, 3), dtype=np.uint8)
    mask[20:40, 20:50] = 255
    assert flat_share(mask) == pytest.approx(1 - 600 / 4800)
    assert "flat_image" in scorer.score(np.zeros(8), normal, size, flat_share(mask)).reasons
    assert "too_small" in scorer.score(np.zeros(8), normal, (20, 20), 0.0).reasons
    assert len(scorer.score(np.ones(8), normal, size, 0.0).projection) == 2
    assert len(scorer.project(np.ones(8))) == 2


def test_flatness_counts_the_most_common_luma_level() -> None:
    img = Image.open(SAMPLE_IMAGES / "ISIC_0024323.jpg").convert("RGB")
    grey = np.asarray(img.convert("L"))
    expected = np.bincount(grey.ravel(), minlength=256).max() / grey.size
    assert flat_share(np.asarray(img)) == pytest.approx(expected, abs=0.01)  # float vs Pillow's integer luma
    assert flat_share(np.zeros((10, 10, 3), dtype=np.uint8)) == 1.0


def test_settings_defaults_and_errors(tmp_path: Path) -> None:
    s = Settings.from_env({})
    assert (s.port, s.host, str(s.model_dir), s.max_payload_bytes) == (8080, "0.0.0.0", "/opt/ml/model", 6291456)
    assert s.workers >= 1 and s.intra_op_threads >= 1 and s.capture_dir is None
    s = Settings.from_env({"MODEL_DIR": str(tmp_path), "SAGEMAKER_BIND_TO_PORT": "9000", "CAPTURE_DIR": "/x",
                           "SAGEMAKER_MODEL_SERVER_WORKERS": "3"})
    assert (s.model_dir, s.port, str(s.capture_dir), s.workers) == (tmp_path, 9000, "/x", 3)
    assert Settings.from_env({"SM_MODEL_DIR": "/a", "MODEL_DIR": "/b"}).model_dir == Path("/a")
    for env in ({"SAGEMAKER_BIND_TO_PORT": "http"}, {"SERVING_RUNTIME": "tensorrt"}, {"CAPTURE_RAW_IMAGES": "maybe"},
                {"OOD_EMBEDDING_THRESHOLD": "-1"}, {"SAGEMAKER_MODEL_SERVER_WORKERS": "0"}):
        with pytest.raises(SettingsError):
            Settings.from_env(env)


def test_model_directory_checks(model_dir: Path, tmp_path: Path) -> None:
    art = load_artifacts(model_dir)
    assert art.version == f"sha256-{art.model_sha256[:12]}" and art.classes[4] == "mel"
    assert load_artifacts(model_dir, version="9").version == "9"
    with pytest.raises(ModelDirError, match="does not exist"):
        load_artifacts(tmp_path / "nowhere")
    broken = tmp_path / "m"
    shutil.copytree(model_dir, broken)
    (broken / "preprocessing.json").write_text("{")
    with pytest.raises(ModelDirError, match="^preprocessing.json does not match manifest.json"):
        load_artifacts(broken)
    reseal(broken)  # past the manifest, the content check names the file too
    with pytest.raises(ModelDirError, match="preprocessing.json .* is invalid"):
        load_artifacts(broken)
    (broken / "preprocessing.json").unlink()
    (broken / "model.ts").unlink()
    reseal(broken)
    with pytest.raises(ModelDirError, match="missing model.ts .* preprocessing.json"):
        load_artifacts(broken)


class _FixedBackend:
    """A model stand-in that answers the same probabilities for every image."""

    name = "fixed"

    def __init__(self, probs: list[float], dim: int) -> None:
        self.probs = np.asarray([probs], dtype=np.float32)
        self.emb = np.zeros((1, dim), dtype=np.float32)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.probs, self.emb


def test_predicted_class_follows_the_decision_offsets(model_dir: Path, tmp_path: Path) -> None:
    art = load_artifacts(model_dir)
    assert art.decision_offsets is None  # the factory's metrics.json has none: plain arg-max
    backend = _FixedBackend([0.05, 0.05, 0.1, 0.05, 0.2, 0.5, 0.05], art.reference["embedding"]["dim"])
    settings = Settings.from_env({})
    image = sample_image()
    plain = Predictor(art, backend, settings).predict([image], capture=False)["predictions"][0]
    assert (plain["predicted_class"], plain["confidence"]) == ("nv", 0.5)

    # log 0.2 + 1.0 = -0.61 beats log 0.5 - 0.5 = -1.19: the balanced decision names mel; probabilities stay.
    offsets = {"akiec": 0.0, "bcc": 0.0, "bkl": 0.0, "df": 0.0, "mel": 1.0, "nv": -0.5, "vasc": 0.0}
    broken = tmp_path / "m"
    shutil.copytree(model_dir, broken)
    metrics = json.loads((broken / "metrics.json").read_text())
    (broken / "metrics.json").write_text(json.dumps({**metrics, "decision_offsets": offsets}))
    reseal(broken)
    shifted_art = load_artifacts(broken)
    assert shifted_art.decision_offsets == tuple(offsets[c] for c in art.classes)
    shifted = Predictor(shifted_art, backend, settings).predict([image], capture=False)["predictions"][0]
    assert (shifted["predicted_class"], shifted["confidence"]) == ("mel", 0.2)
    assert shifted["probabilities"] == plain["probabilities"]
    assert shifted["melanoma"] == plain["melanoma"]

    for bad in ({**offsets, "mel": "high"}, {k: v for k, v in offsets.items() if k != "vasc"}, [0.0] * 7):
        (broken / "metrics.json").write_text(json.dumps({**metrics, "decision_offsets": bad}))
        reseal(broken)
        with pytest.raises(ModelDirError, match="decision_offsets"):
            load_artifacts(broken)


def test_capture_writer_survives_an_unwritable_directory(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    writer = CaptureWriter(blocked / "capture", raw=True)
    writer.write([{"a": 1}])  # logged, not raised
    assert writer.write_raw("r", 0, b"x", "JPEG") is None
    ok = CaptureWriter(tmp_path / "capture", raw=True)
    ok.write([{"a": 1}, {"b": 2}])
    assert ok.write_raw("r", 0, b"x", "PNG") == "raw/r-0.png"
    ok.close()
    (path,) = (tmp_path / "capture").glob("capture-*.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"b": 2}]


def test_workers_import_only_the_image_dependencies() -> None:
    """A worker needs only what inference_image/requirements.txt installs, and never torch."""
    import subprocess
    import sys

    code = ("import sys, inference_image.app, inference_image.gunicorn_conf, onnxruntime, "
            "uvicorn.protocols.http.httptools_impl, uvicorn.loops.uvloop, uvicorn.lifespan.on; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))))")
    root = Path(__file__).resolve().parents[2]
    # The image's PYTHONPATH (inference_image/Dockerfile): the repository and the two layers it copies.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (root, root / "layers" / "common",
                                                                         root / "layers" / "imaging"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root, env=env).stdout.split()
    imported = {m for m in out if not m.startswith("_") and m != "cython_runtime"}
    assert "torch" not in imported
    assert imported == {"PIL", "click", "gunicorn", "httptools", "inference_image", "lesion_common",
                        "lesion_imaging", "lesionml", "numpy", "onnxruntime", "orjson", "simplejpeg", "uvicorn",
                        "uvicorn_worker", "uvloop"}


def test_image_pins_are_what_the_tests_run() -> None:
    """The container runs what the tests ran: every pin of inference_image/requirements.txt is installed here at
    that version, and the direct dependencies are pinned for development too (requirements/)."""
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[2]

    def pins(text: str) -> dict[str, str]:
        out = {}
        for line in text.splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                name, _, ver = line.partition("==")
                out[name.split("[")[0].strip().lower()] = ver.strip()
        return out

    image = pins((root / "inference_image" / "requirements.txt").read_text())
    for name, pinned in image.items():
        assert version(name).split("+")[0] == pinned, name
    dev: dict[str, str] = {}
    for f in (root / "requirements").glob("*.txt"):
        dev.update(pins(f.read_text()))
    for name in ("torch", "onnx", "onnxruntime", "numpy", "pillow", "simplejpeg", "gunicorn", "uvicorn",
                 "uvicorn-worker", "httptools", "uvloop"):
        assert dev.get(name) == image[name], name


def test_test_time_augmented_model_serves_the_same_with_onnx_and_torchscript(model_dir: Path, tmp_path: Path) -> None:
    import torch

    from inference_image.runtime import OnnxBackend, TorchScriptBackend, prepare
    from lesionml.models import build_model, export_torchscript

    art = load_artifacts(model_dir)
    spec = art.spec
    model, _ = build_model(spec.arch, len(art.classes), pretrained=False, image_size=(spec.height, spec.width))
    model.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    model.eval()
    tta_dir = tmp_path / "tta"
    shutil.copytree(model_dir, tta_dir)
    export_torchscript(model, torch.zeros(1, 3, spec.height, spec.width), str(tta_dir / "model.ts"), tta=True)
    reseal(tta_dir, answers=True)  # a different model.ts: its own known answers, as the training job writes them

    plan = prepare(load_artifacts(tta_dir), "onnx", tmp_path / "cache")
    assert plan.runtime == "onnx" and plan.onnx_path and plan.head_path
    onnx = OnnxBackend(plan.onnx_path, plan.head_path)
    script = TorchScriptBackend(str(tta_dir / "model.ts"))
    x = preprocess_batch([str(p) for p in sorted(SAMPLE_IMAGES.glob("*.jpg"))[:3]], spec)
    p_onnx, e_onnx = onnx.run(x)
    p_ts, e_ts = script.run(x)
    np.testing.assert_allclose(p_onnx, p_ts, atol=1e-4)
    np.testing.assert_allclose(e_onnx, e_ts, atol=1e-3 * float(np.abs(e_ts).max()))
    # The mean over flips and 180 degrees: a mirrored upload gets the same answer, which one view alone does not.
    np.testing.assert_allclose(onnx.run(np.ascontiguousarray(x[:, :, :, ::-1]))[0], p_onnx, atol=1e-5)
    with torch.inference_mode():
        views = (x, x[..., ::-1], x[:, :, ::-1], x[:, :, ::-1, ::-1])
        per_view = np.stack([torch.softmax(model(torch.from_numpy(np.ascontiguousarray(v))), 1).numpy() for v in views])
    np.testing.assert_allclose(p_ts, per_view.mean(0), atol=1e-5)
    assert float(np.abs(per_view[0] - per_view[1]).max()) > 1e-3


def test_a_long_model_run_stops_the_worker_heartbeat() -> None:
    """The model runs beside the event loop, which would keep gunicorn's heartbeat alive through a stuck run:
    ``stalled`` (read by the worker's heartbeat) turns true while one run lasts longer than the limit."""
    import threading
    import time
    from types import SimpleNamespace

    from inference_image.app import Application

    release = threading.Event()

    class SlowPredictor:
        artifacts = SimpleNamespace(version="t")

        def predict(self, images: list[bytes], **kwargs: object) -> dict:
            release.wait(10)
            return {"ok": True}

    app = Application(SlowPredictor(), Settings.from_env({}))  # type: ignore[arg-type]
    assert not app.stalled(0.0)
    t = threading.Thread(target=app._answer, args=(b"x", "image/jpeg", None))
    t.start()
    time.sleep(0.3)
    try:
        assert app.stalled(0.1) and not app.stalled(5.0)
    finally:
        release.set()
        t.join()
    assert not app.stalled(0.0)
