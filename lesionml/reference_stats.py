"""Drift reference written by training as ``reference_stats.json`` (numpy + Pillow, no torch).

The reference describes held-out images the model was not trained on (the validation and test splits), seen
through the final model, so production traffic can be compared with it. Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "source": "validation+test",          # which images the reference describes
      "n": 123,                              # images in the reference
      "label_set": "ham7", "classes": [...],
      "class_prior": {
        "train": {code: fraction},           # label frequencies of the training split
        "reference_true": {code: fraction},  # label frequencies of the reference images
        "reference_predicted": {code: fraction}  # arg-max predictions on the reference images
      },
      "embedding": {                         # model.ts embed(x) / predict(x)[1], penultimate layer
        "dim": D, "mean": [D], "std": [D],
        "pca": {"k": k, "components": [[D] * k], "explained_variance": [k], "explained_variance_ratio": [k]},
        "projection": <summary of each PCA coordinate: {"mean": [k], "std": [k]}>,
        "projections_sample": [[k] * m],    # up to `sample_size` reference points in PCA space
        "norm": <summary>                    # L2 norm of the embedding
      },
      "confidence": <summary>,               # max class probability
      "image": {name: <summary>}             # see IMAGE_STATISTICS
    }

where ``<summary>`` is ``{"mean", "std", "min", "max", "quantiles": {"p01", "p05", "p25", "p50", "p75", "p95",
"p99"}, "histogram": {"edges": [...], "counts": [...]}, "sample": [...]}``. Histograms use fixed edges for
bounded statistics (``[0, 1]`` in 20 bins) and the reference quantiles otherwise, so a new batch can be binned the
same way (see :func:`population_stability_index`). Project new embeddings with :func:`project`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

SCHEMA_VERSION = 1
# Statistics of the decoded RGB image, in [0, 1] unless noted.
IMAGE_STATISTICS = (
    "brightness",  # mean luma (ITU-R BT.601 weights)
    "contrast",  # standard deviation of luma
    "red_mean",
    "green_mean",
    "blue_mean",
    "saturation",  # mean HSV saturation (max - min) / max
    "width",  # pixels, before any resizing
    "height",
    "aspect",  # width / height
)
_BOUNDED = {"brightness", "contrast", "red_mean", "green_mean", "blue_mean", "saturation", "confidence"}
_STATS_MAX_SIDE = 256  # statistics are computed on a copy no larger than this (same result for any upload size)
_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def image_statistics(img: Image.Image | np.ndarray) -> dict[str, float]:
    """Colour and size statistics of one RGB image (PIL image or ``(H, W, 3)`` uint8 array)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    if max(width, height) > _STATS_MAX_SIDE:
        scale = _STATS_MAX_SIDE / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
    rgb = np.asarray(img, dtype=np.float32) / 255.0
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    cmax, cmin = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(cmax > 0, (cmax - cmin) / np.maximum(cmax, 1e-12), 0.0)
    means = rgb.reshape(-1, 3).mean(axis=0)
    return {
        "brightness": float(luma.mean()),
        "contrast": float(luma.std()),
        "red_mean": float(means[0]),
        "green_mean": float(means[1]),
        "blue_mean": float(means[2]),
        "saturation": float(sat.mean()),
        "width": float(width),
        "height": float(height),
        "aspect": float(width / height),
    }


def _round(x: np.ndarray | float, digits: int = 6) -> Any:
    """Round to ``digits`` significant digits to keep the JSON small."""
    arr = np.asarray(x, dtype=np.float64)
    out = np.vectorize(lambda v: float(f"{v:.{digits}g}"), otypes=[np.float64])(arr) if arr.size else arr
    return out.tolist()


def summarize(values: Sequence[float] | np.ndarray, bounded: bool, sample_size: int, seed: int = 0) -> dict[str, Any]:
    """Summary of a 1-D sample: moments, quantiles, histogram and a random sub-sample.

    Parameters
    ----------
    values : array-like
        The sample.
    bounded : bool
        Values lie in ``[0, 1]``: use 20 fixed bins; otherwise bin edges are the reference deciles.
    sample_size : int
        Maximum number of raw values kept (for KS tests).
    seed : int
        Seed of the sub-sampling.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "quantiles": {}, "histogram": None, "sample": []}
    if bounded:
        edges = np.linspace(0.0, 1.0, 21)
    else:
        edges = np.unique(np.quantile(v, np.linspace(0, 1, 11)))
        if edges.size < 2:
            edges = np.array([v.min() - 0.5, v.max() + 0.5])
    counts, _ = np.histogram(np.clip(v, edges[0], edges[-1]), bins=edges)
    rng = np.random.default_rng(seed)
    sample = v if v.size <= sample_size else rng.choice(v, size=sample_size, replace=False)
    return {
        "mean": _round(v.mean()),
        "std": _round(v.std()),
        "min": _round(v.min()),
        "max": _round(v.max()),
        "quantiles": {f"p{round(q * 100):02d}": _round(np.quantile(v, q)) for q in _QUANTILES},
        "histogram": {"edges": _round(edges), "counts": counts.astype(int).tolist()},
        "sample": _round(sample),
    }


def fit_pca(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, top-``k`` principal axes ``(k, D)``, their variances and variance ratios."""
    x = np.asarray(embeddings, dtype=np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    k = max(1, min(k, x.shape[0], x.shape[1]))
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s**2 / max(x.shape[0] - 1, 1)
    total = var.sum()
    ratio = var / total if total > 0 else np.zeros_like(var)
    # Fix each axis's sign (largest loading positive) so refits give comparable coordinates.
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    return mean, comps, var[:k], ratio[:k]


def project(embeddings: np.ndarray, reference: Mapping[str, Any]) -> np.ndarray:
    """Project embeddings ``(N, D)`` onto the reference PCA basis, giving ``(N, k)``."""
    emb = reference["embedding"]
    mean = np.asarray(emb["mean"], dtype=np.float64)
    comps = np.asarray(emb["pca"]["components"], dtype=np.float64)
    return (np.asarray(embeddings, dtype=np.float64) - mean) @ comps.T


def population_stability_index(reference_summary: Mapping[str, Any], values: Sequence[float] | np.ndarray) -> float:
    """PSI of ``values`` against a reference :func:`summarize` histogram (0.1-0.25 moderate, >0.25 large)."""
    hist = reference_summary["histogram"]
    edges = np.asarray(hist["edges"], dtype=np.float64)
    ref = np.asarray(hist["counts"], dtype=np.float64)
    new, _ = np.histogram(np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1]), bins=edges)
    eps = 1e-4
    p = np.maximum(ref / max(ref.sum(), 1.0), eps)
    q = np.maximum(new / max(new.sum(), 1), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def _prior(indices: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    counts = np.bincount(np.asarray(indices, dtype=np.int64), minlength=len(classes)).astype(np.float64)
    total = counts.sum()
    return {c: _round(counts[i] / total) if total else 0.0 for i, c in enumerate(classes)}


def build_reference_stats(
    embeddings: np.ndarray,
    probs: np.ndarray,
    y_true: np.ndarray,
    image_stats: Sequence[Mapping[str, float]],
    train_labels: np.ndarray,
    label_set: str,
    classes: Sequence[str],
    source: str = "validation+test",
    pca_components: int = 16,
    sample_size: int = 500,
    seed: int = 0,
    predicted: np.ndarray | None = None,
) -> dict[str, Any]:
    """Assemble the ``reference_stats.json`` document (see the module docstring).

    Parameters
    ----------
    embeddings : np.ndarray
        ``(N, D)`` embeddings of the reference images.
    probs : np.ndarray
        ``(N, C)`` predicted probabilities of the same images.
    y_true : np.ndarray
        ``(N,)`` true class indices of the same images.
    image_stats : sequence of dict
        :func:`image_statistics` of each image.
    train_labels : np.ndarray
        Class indices of the training split (for the training prior).
    label_set, classes : str, sequence of str
        Label set and class codes in output order.
    source : str
        Which images the reference describes.
    pca_components, sample_size, seed : int
        PCA width, raw points kept per statistic, and sub-sampling seed.
    predicted : np.ndarray, optional
        ``(N,)`` predicted class indices under the model's decision rule (``lesionml.metrics.decide`` with its
        decision offsets); default the arg-max of ``probs``. The predicted-class prior and the confidence (the
        probability of the predicted class) are what serving reports for the same images.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    pred = p.argmax(axis=1) if predicted is None else np.asarray(predicted, dtype=np.int64)
    mean, comps, var, ratio = fit_pca(emb, pca_components)
    proj = (emb - mean) @ comps.T
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(emb), size=min(sample_size, len(emb)), replace=False))
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "n": int(len(emb)),
        "label_set": label_set,
        "classes": list(classes),
        "class_prior": {
            "train": _prior(train_labels, classes),
            "reference_true": _prior(y_true, classes),
            "reference_predicted": _prior(pred, classes),
        },
        "embedding": {
            "dim": int(emb.shape[1]),
            "mean": _round(mean),
            "std": _round(emb.std(axis=0)),
            "pca": {
                "k": int(comps.shape[0]),
                "components": _round(comps),
                "explained_variance": _round(var),
                "explained_variance_ratio": _round(ratio),
            },
            "projection": {"mean": _round(proj.mean(axis=0)), "std": _round(proj.std(axis=0))},
            "projections_sample": _round(proj[keep]),
            "norm": summarize(np.linalg.norm(emb, axis=1), bounded=False, sample_size=sample_size, seed=seed),
        },
        "confidence": summarize(p[np.arange(len(p)), pred], bounded=True, sample_size=sample_size, seed=seed),
        "image": {
            name: summarize(
                [s[name] for s in image_stats], bounded=name in _BOUNDED, sample_size=sample_size, seed=seed
            )
            for name in IMAGE_STATISTICS
        },
    }
