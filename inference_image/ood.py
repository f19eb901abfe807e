"""Out-of-distribution score of one image, against the training job's ``reference_stats.json``.

Three kinds of evidence, each expressed in units of the reference so that one threshold fits every model:

* **Embedding distance** (what the model sees). A diagonal Mahalanobis distance of the embedding from the
  reference mean, with each dimension's variance floored at ``(0.25 * RMS std)^2``, divided by the value an
  average reference image gets (so the reference scores 1 on average). The floor matters: features that never
  fire on dermoscopy have a near-zero reference spread, which would make the plain distance explode on normal
  images; floored, they still dominate for photos of cats or text. (A Mahalanobis distance inside the reference
  PCA subspace was tried first and separates nothing: unlike images project close to the centre.)
* **Image statistics** (what the camera saw): brightness, contrast, mean R/G/B and saturation, each compared with
  the reference 1st-99th percentile range; the excess beyond it is measured in units of the distance from the
  median to that percentile. 0 inside the range. z-scores against the reference mean/std are reported too.
* **Content rules**: a blank frame (luma std under 2/255), a flat graphic (one 8-bit luma level covering >= 30 %
  of the pixels: masks, plots, silhouettes; at most 16 % on 10,015 HAM10000 images), or a side under 32 px.

``score = max(embedding_distance / embedding_threshold, image_excess / image_threshold)``, raised to 1 when a
content rule fires; the image is flagged exactly when ``score >= 1``. The thresholds (5.0 and 0.75, env
``OOD_EMBEDDING_THRESHOLD`` / ``OOD_IMAGE_THRESHOLD``) were chosen on held-out HAM10000 images with two
different models (see benchmarks/inference/RESULTS.md for the false-flag rate and the non-dermoscopic photos
caught).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

OOD_STATISTICS = ("brightness", "contrast", "red_mean", "green_mean", "blue_mean", "saturation")
VARIANCE_FLOOR = 0.25  # of the RMS reference std, per embedding dimension
BLANK_CONTRAST = 2.0 / 255.0  # luma std; HAM10000's lowest is 5.9/255
FLAT_SHARE = 0.30  # share of the pixels in the most common 8-bit luma level (transform.statistics_and_flatness)
MIN_SIDE = 32


@dataclass(frozen=True)
class OODResult:
    """Scores of one image (see the module docstring)."""

    score: float
    flag: bool
    reasons: list[str]
    embedding_distance: float
    image_excess: float
    image_z: dict[str, float]
    projection: np.ndarray
    norm: float
    image_z_rounded: dict[str, float] | None = None

    def to_dict(self, embedding_threshold: float, image_threshold: float) -> dict[str, Any]:
        """The ``ood`` block of an answer."""
        return {
            "score": round(self.score, 4),
            "flag": self.flag,
            "reasons": self.reasons,
            "embedding_distance": round(self.embedding_distance, 4),
            "embedding_threshold": embedding_threshold,
            "image_excess": round(self.image_excess, 4),
            "image_threshold": image_threshold,
            "image_z": self.image_z_rounded if self.image_z_rounded is not None else {
                k: round(v, 3) for k, v in self.image_z.items()
            },
        }


@dataclass(frozen=True)
class ImageEvidence:
    """What the picture alone says (no model needed): computed before the model run, while the interpreter and the
    pixels are still in the CPU caches; after a 6 ms model run the same Python code takes ~3x longer."""

    excess: float
    excess_name: str | None
    image_z: dict[str, float]
    rules: list[str]  # content rules that fired: too_small, blank_image, flat_image
    image_z_rounded: dict[str, float]


class OODScorer:
    """Scores images against one ``reference_stats.json``.

    Parameters
    ----------
    reference : dict
        The parsed ``reference_stats.json``.
    embedding_threshold, image_threshold : float
        See the module docstring.
    """

    def __init__(self, reference: Mapping[str, Any], embedding_threshold: float = 5.0,
                 image_threshold: float = 0.75) -> None:
        emb = reference["embedding"]
        self.mean = np.asarray(emb["mean"], dtype=np.float32)
        std = np.asarray(emb["std"], dtype=np.float64)
        floor = VARIANCE_FLOOR * float(np.sqrt(np.mean(std**2)))
        var = std**2 + floor**2
        self.inv_var = (1.0 / var).astype(np.float32)
        # A reference image's expected squared z in dimension d is std_d^2 / var_d: dividing by the mean makes the
        # reference average exactly 1.
        self.norm = float(np.mean(std**2 / var))
        self.components = np.asarray(emb["pca"]["components"], dtype=np.float32)
        self.embedding_threshold = embedding_threshold
        self.image_threshold = image_threshold
        self.ranges: dict[str, tuple[float, float, float]] = {}
        self.moments: dict[str, tuple[float, float]] = {}
        for name in OOD_STATISTICS:
            s = reference["image"][name]
            q = s["quantiles"]
            self.ranges[name] = (float(q["p01"]), float(q["p50"]), float(q["p99"]))
            self.moments[name] = (float(s["mean"]), max(float(s["std"]), 1e-6))

    def image_excess(self, stats: Mapping[str, float]) -> tuple[float, str | None, dict[str, float]]:
        """Largest excess beyond the reference p01-p99 range, its statistic, and every statistic's z-score."""
        worst, worst_name = 0.0, None
        z: dict[str, float] = {}
        for name, (p01, p50, p99) in self.ranges.items():
            v = float(stats[name])
            mean, std = self.moments[name]
            z[name] = (v - mean) / std
            if v > p99:
                excess = (v - p99) / max(p99 - p50, 1e-3)
            elif v < p01:
                excess = (p01 - v) / max(p50 - p01, 1e-3)
            else:
                continue
            if excess > worst:
                worst, worst_name = excess, name
        return worst, worst_name, z

    def image_evidence(self, stats: Mapping[str, float], size: tuple[int, int], flat: float) -> ImageEvidence:
        """The image-statistics excess and the content rules of one picture.

        Parameters
        ----------
        stats : dict
            The decoded image's statistics, as :func:`lesionml.reference_stats.image_statistics` defines them.
        size : (int, int)
            The picture's ``(width, height)``.
        flat : float
            Flatness of the picture (:func:`inference_image.transform.statistics_and_flatness`).
        """
        excess, excess_name, z = self.image_excess(stats)
        rules = []
        if min(size) < MIN_SIDE:
            rules.append("too_small")
        if stats["contrast"] < BLANK_CONTRAST:
            rules.append("blank_image")
        elif flat >= FLAT_SHARE:
            rules.append("flat_image")
        return ImageEvidence(excess, excess_name, z, rules, {k: round(v, 3) for k, v in z.items()})

    def score(self, embedding: np.ndarray, stats: Mapping[str, float] | ImageEvidence,
              size: tuple[int, int] = (0, 0), flat: float = 0.0) -> OODResult:
        """Score one image.

        Parameters
        ----------
        embedding : np.ndarray
            ``(D,)`` model embedding.
        stats : dict or ImageEvidence
            The picture's :meth:`image_evidence`, or its statistics (then ``size`` and ``flat`` are needed too).
        size, flat
            See :meth:`image_evidence`.
        """
        ev = stats if isinstance(stats, ImageEvidence) else self.image_evidence(stats, size, flat)
        e = embedding.astype(np.float32, copy=False)
        d = e - self.mean
        # One difference vector serves the distance and the PCA projection (each numpy call is costly right after
        # a model run has flushed the caches).
        distance = float(np.dot(d * d, self.inv_var)) / (len(d) * self.norm)
        projection = self.components @ d
        score = max(distance / self.embedding_threshold, ev.excess / self.image_threshold)
        reasons = []
        if distance >= self.embedding_threshold:
            reasons.append("embedding_distance")
        if ev.excess >= self.image_threshold:
            reasons.append(f"image_statistics:{ev.excess_name}")
        reasons += ev.rules
        if reasons:
            score = max(score, 1.0)  # so that "flag" is exactly "score >= 1" whatever fired
        return OODResult(score, bool(reasons), reasons, distance, ev.excess, ev.image_z, projection,
                         float(np.dot(e, e)) ** 0.5, ev.image_z_rounded)

    def project(self, embedding: np.ndarray) -> np.ndarray:
        """``(k,)`` coordinates of an embedding on the reference PCA basis (what drift detection compares)."""
        return self.components @ (embedding.astype(np.float32, copy=False) - self.mean)
