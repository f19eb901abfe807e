"""Real-image material for the drift tests and benchmarks: HAM10000 split by lesion, a real model, capture records.

The model is EfficientNet-Lite0 with its packaged ImageNet weights and a seeded, untrained linear head (no
fine-tuning): a real embedding, and predictions that are a fixed function of it, which is all drift detection
needs. The reference is built with :func:`lesionml.reference_stats.build_reference_stats` exactly as the training
job builds it, from training-split images; windows come from test-split images, so no lesion is on both sides.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from lesion_common.splits import assign_split
from lesionml.acquisition import gamma

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
HAM = SHARED / "ham10000"
NEGATIVES = SHARED / "negatives"
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HEIGHT, WIDTH = 150, 200


def ham_splits() -> dict[str, list[str]]:
    """HAM10000 image ids per split (by lesion id, as validate_image assigns them), sorted."""
    out: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    with open(HAM / "HAM10000_metadata.csv", newline="") as f:
        for row in csv.DictReader(f):
            out[assign_split(row["lesion_id"])].append(row["image_id"])
    return {k: sorted(v) for k, v in out.items()}


def load_ham(image_id: str) -> Image.Image:
    """One HAM10000 image, decoded to RGB."""
    from lesionml.preprocessing import load_image

    return load_image(HAM / "images" / f"{image_id}.jpg")


def negative_images() -> list[tuple[str, Image.Image]]:
    """The out-of-distribution photos of ../shared/data/negatives (natural photos, medical non-skin, textures,
    plots, masks: ``expected_behaviour`` "reject / out-of-distribution") that decode and that the endpoint would
    not refuse for size."""
    from lesionml.preprocessing import load_image

    out = []
    with open(NEGATIVES / "negatives.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["expected_behaviour"].startswith("reject / out-of-distribution")]
    for row in rows:
        try:
            img = load_image(NEGATIVES / row["file"])
        except Exception:  # noqa: BLE001 - e.g. the multi-page TIFF Pillow cannot open; the endpoint refuses it
            continue
        if min(img.size) >= 32:
            out.append((row["file"], img))
    return out


# ------------------------------------------------------------------ acquisition changes
def colour_cast(img: Image.Image, strength: float) -> Image.Image:
    """A warmer camera white balance: red gain ``1 + s``, blue gain ``1 - s``."""
    px = np.asarray(img, dtype=np.float32) * np.array([1 + strength, 1.0, 1 - strength], dtype=np.float32)
    return Image.fromarray(np.clip(px + 0.5, 0, 255).astype(np.uint8))


def blur(img: Image.Image, radius: float) -> Image.Image:
    """An out-of-focus or lower-resolution camera: Gaussian blur of ``radius`` pixels (on the 200x150 image)."""
    return img.filter(ImageFilter.GaussianBlur(radius))


def squash(img: Image.Image, factor: float) -> Image.Image:
    """A resize that does not keep the aspect ratio: width scaled by ``factor``, height kept."""
    return img.resize((max(1, round(img.width * factor)), img.height), Image.Resampling.BILINEAR)


SHIFTS: dict[str, tuple[Callable[[Image.Image, float], Image.Image], tuple[float, ...], str]] = {
    "colour_cast": (colour_cast, (0.02, 0.04, 0.08, 0.15), "red/blue gain change"),
    "blur": (blur, (0.5, 1.0, 2.0, 3.0), "Gaussian blur radius, px"),
    "squash": (squash, (0.95, 0.9, 0.75, 0.6), "width scale factor"),
    # The model's shift benchmark's own transform (one definition of the shift).
    "gamma": (gamma, (0.95, 0.9, 0.8, 0.7), "exponent, < 1 brightens the mid-tones"),
}


# ------------------------------------------------------------------ model
class Embedder:
    """The real model: probabilities and embeddings of decoded images, as the serving path computes them.

    The PyTorch model is exported to ONNX and run by ONNX Runtime when it is installed (the serving image's fast
    path): about 8x faster than eager PyTorch on these CPUs, equal to 1e-5.
    """

    def __init__(self, seed: int = 0, threads: int = 2) -> None:
        import torch

        from lesionml.archs import norm_mean_std
        from lesionml.models import build_model
        from lesionml.preprocessing import PreprocessingSpec

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.torch = torch
        self.model, info = build_model("efficientnet_lite0", len(CLASSES), pretrained=True,
                                       image_size=(HEIGHT, WIDTH))
        if not info.weights.startswith("imagenet"):
            raise RuntimeError("EfficientNet-Lite0 ImageNet weights are not installed")
        self.model.eval()
        mean, std = norm_mean_std("efficientnet_lite0")
        self.spec = PreprocessingSpec(arch="efficientnet_lite0", height=HEIGHT, width=WIDTH, mean=mean, std=std)
        self.session = self._onnx_session(threads)

    def _onnx_session(self, threads: int) -> Any:
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        import io
        import warnings

        torch = self.torch
        model = self.model

        class _Predict(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: Any) -> Any:
                return self.model.predict(x)

        # eval() on the wrapper: export restores the wrapper's mode afterwards, which must not be training.
        wrapper = _Predict().eval()
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, torch.zeros(1, 3, HEIGHT, WIDTH), buf, input_names=["x"],
                              output_names=["probs", "embedding"], opset_version=17, dynamo=False,
                              dynamic_axes={"x": {0: "n"}, "probs": {0: "n"}, "embedding": {0: "n"}})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: Sequence[Image.Image], batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """``(N, C)`` probabilities and ``(N, D)`` embeddings."""
        from lesionml.preprocessing import normalise, resize_for_model

        probs, embs = [], []
        for i in range(0, len(images), batch):
            x = np.stack([normalise(np.asarray(resize_for_model(im, self.spec)), self.spec)
                          for im in images[i:i + batch]])
            if self.session is not None:
                p, e = self.session.run(None, {"x": x})
            else:
                with self.torch.inference_mode():
                    pt, et = self.model.predict(self.torch.from_numpy(x))
                p, e = pt.numpy(), et.numpy()
            probs.append(np.asarray(p, dtype=np.float64))
            embs.append(np.asarray(e, dtype=np.float64))
        return np.concatenate(probs), np.concatenate(embs)


@dataclass
class Embedded:
    """Images seen through the model: probabilities, embeddings and image statistics."""

    names: list[str]
    probs: np.ndarray
    embeddings: np.ndarray
    stats: list[dict[str, float]]

    def subset(self, index: Sequence[int] | np.ndarray) -> Embedded:
        """The rows at ``index``."""
        idx = np.asarray(index, dtype=np.int64)
        return Embedded([self.names[i] for i in idx], self.probs[idx], self.embeddings[idx],
                        [self.stats[i] for i in idx])


def embed(embedder: Embedder, names: Sequence[str], images: Sequence[Image.Image]) -> Embedded:
    """Run the model and compute the reference's image statistics of each image."""
    from lesionml.reference_stats import image_statistics

    probs, embs = embedder(images)
    return Embedded(list(names), probs, embs, [image_statistics(im) for im in images])


def build_reference(ref: Embedded) -> dict[str, Any]:
    """``reference_stats.json`` of ``ref``, as the training job writes it (labels are irrelevant here)."""
    from lesionml.reference_stats import build_reference_stats

    labels = np.zeros(len(ref.names), dtype=np.int64)
    return build_reference_stats(ref.embeddings, ref.probs, labels, ref.stats, labels, "ham7", CLASSES)


def capture_records(data: Embedded, reference: dict[str, Any], model_version: str = "1",
                    timestamp: str = "2026-11-29T10:30:00.000Z", threshold: float = 0.5) -> list[dict[str, Any]]:
    """Container capture records (docs/contracts.md, "Monitoring record") of embedded images."""
    from lesionml.reference_stats import project

    proj = project(data.embeddings, reference)
    out = []
    for i, name in enumerate(data.names):
        probs = data.probs[i]
        top = int(np.argmax(probs))
        mel = float(probs[CLASSES.index("mel")])
        out.append({
            "schema_version": 1, "timestamp": timestamp, "model_version": model_version, "label_set": "ham7",
            "predicted_class": CLASSES[top], "confidence": float(probs[top]),
            "probabilities": {c: float(v) for c, v in zip(CLASSES, probs, strict=True)},
            "melanoma": {"probability": mel, "threshold": threshold, "at_risk": mel >= threshold},
            "ood": {"score": 0.0, "flag": False, "reasons": []},
            "embedding": {"pca": [float(v) for v in proj[i]], "norm": float(np.linalg.norm(data.embeddings[i]))},
            "image": {**data.stats[i], "format": "JPEG", "mode": "RGB"},
            "request_id": f"req-{name}", "index": 0, "inference_id": name, "content_type": "image/jpeg",
        })
    return out


def detection_summary(scores: dict[float, dict[str, Any]]) -> str:
    """One line per severity: the DriftScore and each family's score."""
    lines = []
    for severity, result in scores.items():
        fam = ", ".join(f"{k} {v['score']:.2f}" for k, v in sorted(result["tests"].items()))
        score = result["drift_score"]
        lines.append(f"{severity:g}: DriftScore {score:.2f} ({fam})" if score is not None and math.isfinite(score)
                     else f"{severity:g}: not evaluated")
    return "\n".join(lines)
