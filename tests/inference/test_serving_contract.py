"""The SageMaker serving contract over real HTTP: /ping, /invocations, every content type, every refusal."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from .helpers import SAMPLE_IMAGES, Server, encode, odd_variants, png_header_only, sample_image

JPEG = sample_image()


def _check_prediction(pred: dict[str, Any], classes: list[str], threshold: float) -> None:
    probs = pred["probabilities"]
    assert list(probs) == classes
    assert abs(sum(probs.values()) - 1.0) < 1e-4
    assert pred["predicted_class"] == max(probs, key=probs.get)
    assert pred["confidence"] == pytest.approx(max(probs.values()), abs=1e-6)
    mel = pred["melanoma"]
    assert mel["threshold"] == threshold
    assert mel["probability"] == pytest.approx(probs["mel"], abs=1e-6)
    assert mel["at_risk"] is (mel["probability"] >= threshold)
    ood = pred["ood"]
    assert set(ood) >= {"score", "flag", "reasons", "embedding_distance", "image_excess", "image_z",
                        "embedding_threshold", "image_threshold"}
    assert ood["flag"] is (ood["score"] >= 1.0)
    assert ood["flag"] is bool(ood["reasons"])
    assert set(ood["image_z"]) == {"brightness", "contrast", "red_mean", "green_mean", "blue_mean", "saturation"}
    mon = pred["monitoring"]  # what drift detection reads from Data Capture (docs/contracts.md)
    assert mon["schema_version"] == 1 and len(mon["embedding"]["pca"]) == 16 and mon["embedding"]["norm"] > 0
    assert set(mon["image"]) == {"brightness", "contrast", "red_mean", "green_mean", "blue_mean", "saturation", "width",
                                 "height", "aspect"}


def test_ping_answers_healthy_quickly(server: Server) -> None:
    t0 = time.perf_counter()
    status, headers, body = server.request("GET", "/ping")
    assert time.perf_counter() - t0 < 2.0
    assert status == 200
    assert json.loads(body) == {"status": "healthy", "model_version": "test-7"}


def test_invocation_answer_follows_the_contract(server: Server, model_dir: Path) -> None:
    classes = json.loads((model_dir / "classes.json").read_text())["classes"]
    threshold = json.loads((model_dir / "metrics.json").read_text())["melanoma_threshold"]
    status, answer = server.invoke(JPEG, "image/jpeg", "application/json")
    assert status == 200, answer
    assert answer["model_version"] == "test-7"
    assert answer["label_set"] == "ham7"
    assert len(answer["predictions"]) == 1
    pred = answer["predictions"][0]
    _check_prediction(pred, classes, threshold)
    assert pred["image"] == {"format": "JPEG", "mode": "RGB", "width": 200, "height": 150, "conversions": []}
    assert pred["ood"]["flag"] is False  # a HAM10000 image is in distribution
    timing = answer["timing_ms"]
    assert set(timing) == {"decode", "preprocess", "model", "postprocess", "total"}
    assert 0 < timing["model"] < timing["total"]


def test_answers_match_model_ts_on_the_training_transform(server: Server, model_dir: Path) -> None:
    """The served runtime (ONNX export) and fast preprocessing give model.ts's own probabilities."""
    import torch

    from lesionml.models import load_torchscript
    from lesionml.preprocessing import ImageSource, preprocess_batch, read_spec

    paths: list[ImageSource] = list(sorted(SAMPLE_IMAGES.glob("*.jpg"))[:4])
    spec = read_spec(model_dir / "preprocessing.json")
    with torch.inference_mode():
        expected, _ = load_torchscript(model_dir / "model.ts").predict(torch.from_numpy(preprocess_batch(paths, spec)))
    for path, row in zip(paths, expected.numpy(), strict=True):
        assert isinstance(path, Path)
        status, answer = server.invoke(path.read_bytes())
        assert status == 200
        got = np.array(list(answer["predictions"][0]["probabilities"].values()))
        np.testing.assert_allclose(got, row, atol=1e-4)


@pytest.mark.parametrize("content_type", [
    "image/jpeg", "image/jpeg; charset=binary", "IMAGE/JPEG", "application/x-image", "application/octet-stream",
])
def test_raw_image_content_types(server: Server, content_type: str) -> None:
    status, answer = server.invoke(JPEG, content_type)
    assert status == 200, answer
    assert answer["predictions"][0]["image"]["format"] == "JPEG"


def test_png_body(server: Server) -> None:
    png = encode(Image.open(SAMPLE_IMAGES / "ISIC_0024323.jpg"), "PNG")
    status, answer = server.invoke(png, "image/png")
    assert status == 200, answer
    assert answer["predictions"][0]["image"]["format"] == "PNG"


def test_json_bodies_give_the_same_answers_as_raw_bytes(server: Server) -> None:
    other = sample_image("ISIC_0024360.jpg")
    raw = [server.invoke(img)[1]["predictions"][0]["probabilities"] for img in (JPEG, other)]
    b64 = base64.b64encode(JPEG).decode()
    b64_other = base64.b64encode(other).decode()

    status, single = server.invoke(json.dumps({"image": b64}).encode(), "application/json")
    assert status == 200, single
    assert [p["probabilities"] for p in single["predictions"]] == raw[:1]

    doc = {"instances": [{"b64": b64}, b64_other, f"data:image/jpeg;base64,{b64}"]}
    status, many = server.invoke(json.dumps(doc).encode(), "application/json; charset=utf-8")
    assert status == 200, many
    assert [p["probabilities"] for p in many["predictions"]] == [raw[0], raw[1], raw[0]]


@pytest.mark.parametrize(
    "accept", [None, "application/json", "*/*", "application/*", "text/html, application/json;q=0.5"]
)
def test_acceptable_accept_headers(server: Server, accept: str | None) -> None:
    assert server.invoke(JPEG, "image/jpeg", accept)[0] == 200


@pytest.mark.parametrize("accept", ["text/csv", "application/json;q=0", "image/png"])
def test_unsupported_accept_is_406(server: Server, accept: str) -> None:
    status, answer = server.invoke(JPEG, "image/jpeg", accept)
    assert (status, answer["error"]) == (406, "not_acceptable")


def _bomb_jpeg() -> bytes:
    """A real JPEG whose frame header is patched to claim 30000 x 30000 pixels."""
    data = bytearray(JPEG)
    i = data.index(b"\xff\xc0")  # baseline SOF0: length(2) precision(1) height(2) width(2)
    data[i + 5:i + 9] = (30000).to_bytes(2, "big") * 2
    return bytes(data)


REFUSALS = [
    # (id, content type, body, status, error code)
    ("text/csv", "text/csv", b"1,2,3", 415, "unsupported_media_type"),
    ("no content type", None, JPEG, 415, "unsupported_media_type"),
    ("empty body", "image/jpeg", b"", 400, "empty_body"),
    ("text as jpeg", "image/jpeg", b"this is not an image at all", 400, "not_an_image"),
    ("truncated jpeg", "image/jpeg", JPEG[: len(JPEG) * 2 // 5], 400, "truncated_image"),
    ("bad json", "application/json", b"{not json", 400, "invalid_json"),
    ("json without image", "application/json", b'{"foo": 1}', 400, "invalid_json"),
    ("json empty instances", "application/json", b'{"instances": []}', 400, "invalid_json"),
    ("bad base64", "application/json", b'{"image": "%%%not-base64%%%"}', 400, "invalid_base64"),
    ("base64 of text", "application/json", json.dumps({"image": base64.b64encode(b"hello").decode()}).encode(),
     400, "not_an_image"),
    ("second instance broken", "application/json", json.dumps(
        {"instances": [base64.b64encode(JPEG).decode(), base64.b64encode(b"junk").decode()]}).encode(),
     400, "not_an_image"),
    ("too many instances", "application/json", json.dumps({"instances": ["eA=="] * 17}).encode(),
     413, "too_many_instances"),
    ("body over 6 MB", "image/jpeg", JPEG + b"\0" * (6 * 1024 * 1024), 413, "payload_too_large"),
    ("bomb over our limit", "image/png", png_header_only(8000, 6000), 413, "image_too_large"),
    ("bomb over Pillow's limit", "image/png", png_header_only(30000, 30000), 413, "image_too_large"),
    ("jpeg bomb", "image/jpeg", _bomb_jpeg(), 413, "image_too_large"),
]


@pytest.mark.parametrize(("content_type", "body", "status", "code"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_bad_requests_get_json_errors(server: Server, content_type: str | None, body: bytes, status: int,
                                      code: str) -> None:
    got, answer = server.invoke(body, content_type)
    assert (got, answer["error"]) == (status, code), answer
    assert answer["status"] == status and answer["message"]


def test_error_names_the_broken_instance(server: Server) -> None:
    doc = {"instances": [base64.b64encode(JPEG).decode(), base64.b64encode(b"junk").decode()]}
    _, answer = server.invoke(json.dumps(doc).encode(), "application/json")
    assert answer["message"].startswith("instances[1]:")


def test_wrong_route_and_method(server: Server) -> None:
    assert server.request("GET", "/invocations")[0] == 405
    assert server.request("POST", "/ping")[0] == 405
    status, _, body = server.request("GET", "/nope")
    assert status == 404 and json.loads(body)["error"] == "not_found"
    status, _, body = server.request("GET", "/execution-parameters")
    assert status == 200 and json.loads(body)["MaxPayloadInMB"] == 6


def test_workers_survive_bad_requests(server: Server) -> None:
    booted = server.log().count("Booting worker")
    for _, content_type, body, _, _ in REFUSALS:
        server.invoke(body, content_type)
    assert server.invoke(JPEG)[0] == 200
    assert server.request("GET", "/ping")[0] == 200
    assert server.log().count("Booting worker") == booted, "a worker was restarted"
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("variant", ["exif_rotated", "cmyk", "rgba", "palette", "grey", "grey16", "webp"])
def test_odd_but_valid_images_are_converted_and_classified(server: Server, variant: str) -> None:
    data, conversion = odd_variants(JPEG)[variant]
    status, answer = server.invoke(data, "application/x-image")
    assert status == 200, answer
    image = answer["predictions"][0]["image"]
    if conversion:
        assert conversion in image["conversions"]
    if variant == "exif_rotated":
        assert (image["width"], image["height"]) == (450, 600)  # the 600x450 pixels shown rotated


def test_sixteen_bit_grey_is_scaled_not_clipped(server: Server) -> None:
    variants = odd_variants(JPEG)
    _, grey8 = server.invoke(variants["grey"][0], "image/png")
    _, grey16 = server.invoke(variants["grey16"][0], "image/png")
    p8, p16 = grey8["predictions"][0], grey16["predictions"][0]
    # Clipping would make the picture white (brightness z around +6) and change the prediction.
    assert p16["ood"]["image_z"]["brightness"] == pytest.approx(p8["ood"]["image_z"]["brightness"], abs=0.05)
    for c, v in p8["probabilities"].items():
        assert p16["probabilities"][c] == pytest.approx(v, abs=1e-3)


def test_capture_records_are_written_without_raw_images(server: Server, capture_dir: Path, model_dir: Path) -> None:
    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for f in sorted(capture_dir.glob("capture-*.jsonl")) for line in
                f.read_text().splitlines()]

    def key(r: dict[str, Any]) -> tuple[str, int]:
        return r["request_id"], r["index"]

    before = {key(r) for r in lines()}
    server.invoke(JPEG)
    server.invoke(json.dumps({"instances": [base64.b64encode(JPEG).decode()] * 2}).encode(), "application/json")
    deadline = time.monotonic() + 5
    while len(lines()) < len(before) + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    new = [r for r in lines() if key(r) not in before]  # two workers append to two files
    assert len(new) == 3
    k = json.loads((model_dir / "reference_stats.json").read_text())["embedding"]["pca"]["k"]
    for r in new:
        assert r["schema_version"] == 1 and r["model_version"] == "test-7"
        assert r["timestamp"].endswith("Z")
        assert set(r["probabilities"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
        assert len(r["embedding"]["pca"]) == k and r["embedding"]["norm"] > 0
        assert {"brightness", "saturation", "width", "height"} <= set(r["image"])
        assert {"score", "flag", "reasons"} <= set(r["ood"])
        assert r["latency_ms"] > 0 and "raw_path" not in r
    groups: dict[str, list[int]] = {}
    for r in new:
        groups.setdefault(r["request_id"], []).append(r["index"])
    assert sorted(sorted(g) for g in groups.values()) == [[0], [0, 1]]
    assert not (capture_dir / "raw").exists()
