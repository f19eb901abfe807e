"""One worker's model: decode, preprocess, run, score out-of-distribution, and shape the answer."""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image

from inference_image.artifacts import MELANOMA, ModelArtifacts
from inference_image.capture import SCHEMA_VERSION, CaptureWriter
from inference_image.imaging import DecodedImage, ImageRequestError, decode_image
from inference_image.ood import ImageEvidence, OODScorer
from inference_image.runtime import Backend
from inference_image.settings import Settings
from inference_image.transform import ModelInputBuilder
from lesionml.metrics import at_risk, decide

log = logging.getLogger("inference.predictor")


@dataclass
class Timing:
    """Milliseconds spent per stage over one request."""

    decode: float = 0.0
    preprocess: float = 0.0
    model: float = 0.0
    postprocess: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self) -> dict[str, float]:
        """Rounded figures plus the total since the request started."""
        return {
            "decode": round(self.decode, 3),
            "preprocess": round(self.preprocess, 3),
            "model": round(self.model, 3),
            "postprocess": round(self.postprocess, 3),
            "total": round((time.perf_counter() - self.started) * 1000, 3),
        }


@dataclass
class _Prepared:
    decoded: DecodedImage
    x: np.ndarray
    stats: dict[str, float]
    flat: float
    evidence: ImageEvidence
    image_block: dict[str, Any]
    image_stats: dict[str, float]


class Predictor:
    """Everything one worker needs to answer ``/invocations``.

    Parameters
    ----------
    artifacts : ModelArtifacts
        The checked model directory.
    backend : Backend
        The model runtime.
    settings : Settings
        Limits, thresholds, capture.
    """

    def __init__(self, artifacts: ModelArtifacts, backend: Backend, settings: Settings) -> None:
        self.artifacts = artifacts
        self.backend = backend
        self.settings = settings
        self.spec = artifacts.spec
        self.inputs = ModelInputBuilder(artifacts.spec)
        self.classes = artifacts.classes
        self.mel_index = self.classes.index(MELANOMA) if MELANOMA in self.classes else None
        # metrics.json's decision offsets, as decide() takes them (None: the plain arg-max).
        offsets = artifacts.decision_offsets
        self.offsets = None if offsets is None else np.asarray(offsets, dtype=np.float64)
        self.ood = OODScorer(artifacts.reference, settings.ood_embedding_threshold, settings.ood_image_threshold)
        self.capture = CaptureWriter(settings.capture_dir, settings.capture_raw) if settings.capture_dir else None
        # One model run at a time per worker: each run already uses the worker's share of the CPUs. (The uvicorn
        # worker calls predict from its one model thread; the lock keeps other callers, e.g. tools, correct.)
        self._model_lock = threading.Lock()

    def warm_up(self, runs: int = 3) -> None:
        """Run the whole path on a synthetic image, so the first real request does not pay for lazy set-up."""
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (self.spec.height * 2, self.spec.width * 2, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        for _ in range(runs):
            self.predict([buf.getvalue()], capture=False)

    def predict(
        self,
        images: list[bytes],
        content_type: str = "",
        inference_id: str | None = None,
        capture: bool = True,
    ) -> dict[str, Any]:
        """Answer for one request holding ``images``.

        Raises
        ------
        inference_image.imaging.ImageRequestError
            An image is refused (the whole request is refused; the message names the instance when several).
        """
        timing = Timing()
        prepared: list[_Prepared] = []
        target = (self.spec.width, self.spec.height)
        for i, data in enumerate(images):
            t0 = time.perf_counter()
            try:
                decoded = decode_image(data, self.settings.max_image_pixels, target)
            except ImageRequestError as e:
                if len(images) > 1:
                    e.message = f"instances[{i}]: {e.message}"
                raise
            t1 = time.perf_counter()
            x, full = self.inputs.model_input(decoded)
            # Everything that does not need the model happens before its run, while the pixels and the interpreter's
            # code are still in the CPU caches: measured faster than after it, and than overlapping it with the run
            # on another thread.
            prepared.append(self._prepare(decoded, x, full))
            timing.decode += (t1 - t0) * 1000
            timing.preprocess += (time.perf_counter() - t1) * 1000

        t0 = time.perf_counter()
        with self._model_lock:
            # Single images, one after the other: on this CPU a batch is no faster per image (RESULTS.md).
            outputs = [self.backend.run(p.x[None]) for p in prepared]
        t1 = time.perf_counter()
        timing.model = (t1 - t0) * 1000

        predictions, records = [], []
        with_record = capture and self.capture is not None
        # Only capture records carry it (uuid4 costs tens of microseconds per request on this VM).
        request_id = str(uuid.uuid4()) if with_record else ""
        for i, (p, (probs, emb)) in enumerate(zip(prepared, outputs, strict=True)):
            pred, record = self._answer(p, probs[0], emb[0], with_record)
            predictions.append(pred)
            if record is not None and self.capture is not None:
                record.update(request_id=request_id, index=i, inference_id=inference_id, content_type=content_type,
                              bytes=len(images[i]))
                raw = self.capture.write_raw(request_id, i, images[i], p.decoded.source_format)
                if raw:
                    record["raw_path"] = raw
                records.append(record)
        timing.postprocess = (time.perf_counter() - t1) * 1000
        timing_ms = timing.as_dict()
        answer: dict[str, Any] = {
            "model_version": self.artifacts.version,
            "label_set": self.artifacts.label_set,
            "predictions": predictions,
            "timing_ms": timing_ms,
        }
        if records and self.capture is not None:
            latency = timing_ms["total"]
            for r in records:
                r["latency_ms"] = latency
            self.capture.write(records)
        return answer

    def _prepare(self, d: DecodedImage, x: np.ndarray, full: tuple[np.ndarray, np.ndarray] | None) -> _Prepared:
        """The model-independent part of one image's answer: statistics, image evidence, the image block."""
        stats, flat = self.inputs.statistics(d, full)
        evidence = self.ood.image_evidence(stats, (d.width, d.height), flat)
        image_block = {
            "format": d.source_format, "mode": d.source_mode, "width": d.width, "height": d.height,
            "conversions": d.conversions,
        }
        image_stats = {k: round(v, 6) for k, v in stats.items()}
        return _Prepared(d, x, stats, flat, evidence, image_block, image_stats)

    def _answer(
        self, p: _Prepared, probs: np.ndarray, emb: np.ndarray, with_record: bool
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The prediction block for one image, and its capture record when ``with_record``."""
        # The decision rule the training job evaluated, from the one place that defines it (lesionml.metrics).
        top = int(decide(probs[np.newaxis], self.offsets)[0])
        values = probs.tolist()
        rounded = [round(v, 6) for v in values]
        probabilities = dict(zip(self.classes, rounded, strict=True))
        melanoma = None
        if self.mel_index is not None:
            pm = values[self.mel_index]
            threshold = self.artifacts.melanoma_threshold
            assert threshold is not None
            melanoma = {"probability": rounded[self.mel_index], "threshold": threshold,
                        "at_risk": bool(at_risk(pm, threshold))}
        ood = self.ood.score(emb, p.evidence)
        d = p.decoded
        # What drift detection needs, in the answer itself: on AWS, Data Capture stores the answers, not our records.
        embedding = {"pca": [round(v, 5) for v in ood.projection.tolist()], "norm": round(ood.norm, 5)}
        image_stats = p.image_stats
        pred = {
            "predicted_class": self.classes[top],
            "confidence": rounded[top],
            "probabilities": probabilities,
            "melanoma": melanoma,
            "ood": ood.to_dict(self.ood.embedding_threshold, self.ood.image_threshold),
            "image": p.image_block,
            "monitoring": {"schema_version": SCHEMA_VERSION, "embedding": embedding, "image": image_stats},
        }
        if not with_record:
            return pred, None
        record = {
            "schema_version": SCHEMA_VERSION,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "model_version": self.artifacts.version,
            "label_set": self.artifacts.label_set,
            "predicted_class": pred["predicted_class"],
            "confidence": pred["confidence"],
            "probabilities": probabilities,
            "melanoma": melanoma,
            "ood": {
                "score": round(ood.score, 4), "flag": ood.flag, "reasons": ood.reasons,
                "embedding_distance": round(ood.embedding_distance, 4), "image_excess": round(ood.image_excess, 4),
            },
            "embedding": embedding,
            "image": {**image_stats, "format": d.source_format, "mode": d.source_mode},
        }
        return pred, record
