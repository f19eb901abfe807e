"""Synthetic embeddings, references and capture files for the handler tests and the benchmark (no model needed).

A fixed random "world" produces embeddings from a Gaussian, predictions from a fixed linear head and image
statistics like HAM10000's; ``shift`` moves the embeddings and the brightness, as a new camera would.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
import uuid
from typing import Any

import numpy as np

from tests.monitoring.realdata import CLASSES, Embedded, build_reference, capture_records

DIM = 64
_FAKE_JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + bytes(4096)).decode()  # ~ a 200x150 JPEG's size


class World:
    """A reproducible source of embedded "images"."""

    def __init__(self, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.scales = np.linspace(3.0, 0.3, DIM)
        self.head = rng.normal(size=(DIM, len(CLASSES))) * 0.6
        # Mostly along the leading axis, where a camera change shows most in real embeddings too.
        self.direction = np.eye(DIM)[0] + 0.2 * rng.normal(size=DIM)
        self.direction /= np.linalg.norm(self.direction)

    def sample(self, n: int, seed: int, shift: float = 0.0) -> Embedded:
        """``n`` images; ``shift`` (in units of the leading embedding scale) moves embeddings and brightness."""
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=(n, DIM)) * self.scales + 5.0 + shift * 3.0 * self.direction
        logits = (emb - 5.0) @ self.head
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        stats = []
        for _ in range(n):
            r, g, b = rng.normal([0.76, 0.54, 0.57], 0.08)
            stats.append({
                "brightness": float(np.clip(0.299 * r + 0.587 * g + 0.114 * b + shift * 0.05, 0, 1)),
                "contrast": float(abs(rng.normal(0.11, 0.03))), "red_mean": float(r), "green_mean": float(g),
                "blue_mean": float(b), "saturation": float(abs(rng.normal(0.3, 0.07))), "width": 200.0,
                "height": 150.0, "aspect": 200.0 / 150.0,
            })
        return Embedded([f"img-{seed}-{i}" for i in range(n)], probs, emb, stats)

    def reference(self, n: int = 500) -> dict[str, Any]:
        """A ``reference_stats.json`` built as the training job builds it."""
        return build_reference(self.sample(n, seed=10_000))


def answer_for(records: list[dict[str, Any]], with_monitoring: bool = True) -> dict[str, Any]:
    """The endpoint's JSON answer for the images of ``records`` (container capture records)."""
    predictions = []
    for r in records:
        block = {
            "predicted_class": r["predicted_class"], "confidence": r["confidence"],
            "probabilities": r["probabilities"], "melanoma": r["melanoma"],
            "ood": {**r["ood"], "embedding_distance": 1.0, "embedding_threshold": 5.0, "image_excess": 0.0,
                    "image_threshold": 0.75, "image_z": {}},
            "image": {"format": "JPEG", "mode": "RGB", "width": 200, "height": 150, "conversions": []},
        }
        if with_monitoring:
            block["monitoring"] = {
                "schema_version": 1, "embedding": r["embedding"],
                "image": {k: v for k, v in r["image"].items() if k not in ("format", "mode")},
            }
        predictions.append(block)
    return {"model_version": records[0]["model_version"], "label_set": "ham7", "predictions": predictions,
            "timing_ms": {"decode": 1.0, "preprocess": 0.3, "model": 6.0, "postprocess": 0.2, "total": 7.5}}


def data_capture_line(records: list[dict[str, Any]], inference_id: str | None, time: str,
                      encoding: str = "JSON", with_monitoring: bool = True) -> str:
    """One SageMaker Data Capture line for a request holding the images of ``records``."""
    data = json.dumps(answer_for(records, with_monitoring), separators=(",", ":"))
    if encoding == "BASE64":
        data = base64.b64encode(data.encode()).decode()
    meta: dict[str, Any] = {"eventId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{inference_id}{time}")),
                            "inferenceTime": time}
    if inference_id is not None:
        meta["inferenceId"] = inference_id
    return json.dumps({
        "captureData": {
            "endpointInput": {"observedContentType": "image/jpeg", "mode": "INPUT", "data": _FAKE_JPEG,
                              "encoding": "BASE64"},
            "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT", "data": data,
                               "encoding": encoding},
        },
        "eventMetadata": meta,
        "eventVersion": "0",
    }, separators=(",", ":"))


def data_capture_file(data: Embedded, reference: dict[str, Any], time: str, model_version: str = "1",
                      encoding: str = "JSON") -> bytes:
    """A Data Capture file with one single-image request per embedded image (inference id = image name)."""
    records = capture_records(data, reference, model_version=model_version, timestamp=time)
    return "".join(data_capture_line([r], r["inference_id"], time, encoding) + "\n" for r in records).encode()


def model_tar(reference: dict[str, Any], padding_bytes: int = 2_000_000) -> bytes:
    """A ``model.tar.gz`` with a model file ahead of ``reference_stats.json``, as the training job packs it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in (("model.ts", np.random.default_rng(0).bytes(padding_bytes)),
                              ("classes.json", json.dumps({"label_set": "ham7", "classes": CLASSES}).encode()),
                              ("reference_stats.json", json.dumps(reference).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()
