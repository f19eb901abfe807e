"""Drift of a window of captured predictions against the model's ``reference_stats.json``.

Four families of two-sample tests, each reduced to one p-value:

``embedding``
    Kolmogorov-Smirnov on each of the ``k`` reference PCA coordinates of the embedding, and on the embedding's
    L2 norm, Bonferroni-corrected over the ``k + 1`` tests. Per-component KS on a PCA projection is as powerful
    as multivariate kernel tests on image embeddings in practice (Rabanser et al., "Failing Loudly", NeurIPS
    2019), it is exact enough with asymptotic p-values, and it runs in O(n log n): a window of 100k records costs
    no more than reading it, where MMD's permutation test is quadratic and cannot resolve p-values below
    ``1 / permutations``.
``prediction``
    Pearson's chi-square test of the predicted-class counts against the reference's predicted-class prior
    (sparse classes pooled); the PSI is reported alongside.
``confidence``
    KS on the top-class probability.
``image``
    KS on each image statistic (brightness, contrast, mean R/G/B, saturation, aspect ratio), Bonferroni-corrected.

The families are Bonferroni-combined too: family ``t`` is tested at ``alpha_t = alpha / T``. Its score is
``log10(p_t) / log10(alpha_t)`` (0 at p = 1, 1.0 exactly at ``alpha_t``, 2.0 at ``alpha_t**2``) and
**DriftScore is the largest family score**. So ``DriftScore >= 1`` happens by chance with probability at most
``alpha`` per window, and each further unit means ``log10(1/alpha_t)`` more decimal orders of evidence.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lesion_monitoring.records import IMAGE_FIELDS, Prediction
from lesion_monitoring.stats import (
    bonferroni_log10,
    chi2_homogeneity,
    drift_score,
    ks_2samp,
    population_stability_index,
)

FAMILIES = ("embedding", "prediction", "confidence", "image")
# Image statistics tested. Width and height are left out: a client sending larger photos of the same lesions is
# not drift the model sees (every image is resized), whereas a changed aspect ratio changes the crop.
IMAGE_TESTS = ("brightness", "contrast", "red_mean", "green_mean", "blue_mean", "saturation", "aspect")
_IMAGE_INDEX = {name: IMAGE_FIELDS.index(name) for name in IMAGE_TESTS}


@dataclass
class DriftBatch:
    """The columns drift needs from a window's predictions, kept compact (8 bytes a number)."""

    classes: Counter[str] = field(default_factory=Counter)
    confidence: array[float] = field(default_factory=lambda: array("d"))
    pca: array[float] = field(default_factory=lambda: array("d"))
    norm: array[float] = field(default_factory=lambda: array("d"))
    image: array[float] = field(default_factory=lambda: array("d"))
    k: int | None = None
    n: int = 0
    n_embedding: int = 0
    n_image: int = 0
    n_ood: int = 0
    n_ood_known: int = 0
    mismatched_pca: int = 0

    def add(self, p: Prediction) -> None:
        """Append one prediction's columns."""
        self.n += 1
        self.classes[p.predicted_class] += 1
        if p.confidence is not None:
            self.confidence.append(p.confidence)
        if p.ood_flag is not None:
            self.n_ood_known += 1
            self.n_ood += int(p.ood_flag)
        if p.pca is not None:
            if self.k is None:
                self.k = len(p.pca)
            if len(p.pca) == self.k:
                self.pca.extend(p.pca)
                self.norm.append(float("nan") if p.norm is None else p.norm)
                self.n_embedding += 1
            else:
                self.mismatched_pca += 1
        if p.image is not None and len(p.image) == len(IMAGE_FIELDS):
            self.image.extend(p.image)
            self.n_image += 1

    def extend(self, predictions: Iterable[Prediction]) -> DriftBatch:
        """Append many; returns self."""
        for p in predictions:
            self.add(p)
        return self

    def pca_matrix(self) -> np.ndarray:
        """``(n_embedding, k)`` projections."""
        return np.frombuffer(self.pca, dtype=np.float64).reshape(-1, self.k or 1)

    def image_matrix(self) -> np.ndarray:
        """``(n_image, len(IMAGE_FIELDS))`` statistics."""
        return np.frombuffer(self.image, dtype=np.float64).reshape(-1, len(IMAGE_FIELDS))


def _sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}")


def _ks_family(
    window: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> tuple[float, dict[str, dict[str, Any]]]:
    """KS on each named column; the Bonferroni ``log10 p`` and the per-column details."""
    details: dict[str, dict[str, Any]] = {}
    log_ps = []
    for name, values in window.items():
        ref = reference[name]
        d, log_p = ks_2samp(values, ref)
        finite = values[~np.isnan(values)]
        details[name] = {
            "ks_d": _sig(d), "log10_p": _sig(log_p), "window_mean": _sig(float(finite.mean())) if finite.size else None,
            "reference_mean": _sig(float(np.mean(ref))) if len(ref) else None,
        }
        log_ps.append(log_p)
    return bonferroni_log10(log_ps), details


def _worst(details: Mapping[str, Mapping[str, Any]]) -> str | None:
    return min(details, key=lambda k: details[k]["log10_p"]) if details else None


def compute_drift(batch: DriftBatch, reference: Mapping[str, Any], alpha: float = 0.001,
                  min_records: int = 100) -> dict[str, Any]:
    """Run every test family the window has enough records for.

    Parameters
    ----------
    batch : DriftBatch
        The window's predictions (one model version).
    reference : dict
        The model's ``reference_stats.json``.
    alpha : float
        Family-wise significance level of one window: ``DriftScore >= 1`` has at most this chance under no drift.
    min_records : int
        A family runs only with at least this many records carrying its inputs.

    Returns
    -------
    dict
        ``drift_score`` (None when no family ran), ``alpha``, ``families_run``, ``tests`` (per family:
        ``log10_p``, ``score``, ``alpha``, ``n``, details) and ``skipped`` (family -> reason).
    """
    tests: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}

    # embedding
    emb = reference.get("embedding") or {}
    ref_proj = np.asarray(emb.get("projections_sample") or [], dtype=np.float64)
    ref_norm = np.asarray(((emb.get("norm") or {}).get("sample")) or [], dtype=np.float64)
    if batch.n_embedding < min_records:
        skipped["embedding"] = f"{batch.n_embedding} records with an embedding, {min_records} needed"
    elif ref_proj.ndim != 2 or ref_proj.shape[0] < 2:
        skipped["embedding"] = "the reference has no projections_sample"
    elif ref_proj.shape[1] != batch.k:
        skipped["embedding"] = (f"records carry {batch.k} PCA coordinates, the reference {ref_proj.shape[1]}: "
                                "they were projected on another model's basis")
    else:
        win = batch.pca_matrix()
        window_cols = {f"pc{j + 1}": win[:, j] for j in range(win.shape[1])}
        ref_cols = {f"pc{j + 1}": ref_proj[:, j] for j in range(ref_proj.shape[1])}
        norms = np.frombuffer(batch.norm, dtype=np.float64)
        if ref_norm.size >= 2 and np.isfinite(norms).sum() >= min_records:
            window_cols["norm"], ref_cols["norm"] = norms, ref_norm
        log_p, details = _ks_family(window_cols, ref_cols)
        tests["embedding"] = {"log10_p": log_p, "n": batch.n_embedding, "worst": _worst(details),
                              "components": details}

    # prediction
    classes = list(reference.get("classes") or [])
    prior = ((reference.get("class_prior") or {}).get("reference_predicted")) or {}
    n_ref = int(reference.get("n") or 0)
    if batch.n < min_records:
        skipped["prediction"] = f"{batch.n} records, {min_records} needed"
    elif not classes or not prior or n_ref <= 0:
        skipped["prediction"] = "the reference has no predicted-class prior"
    else:
        unknown = sum(c for k, c in batch.classes.items() if k not in classes)
        ref_counts = np.array([float(prior.get(c, 0.0)) * n_ref for c in classes] + [0.0])
        win_counts = np.array([float(batch.classes.get(c, 0)) for c in classes] + [float(unknown)])
        stat, df, log_p = chi2_homogeneity(ref_counts, win_counts)
        total = max(win_counts.sum(), 1.0)
        tests["prediction"] = {
            "log10_p": log_p, "n": batch.n, "chi2": _sig(stat), "df": df,
            "psi": _sig(population_stability_index(ref_counts[:-1], win_counts[:-1])),
            "reference_fractions": {c: _sig(float(prior.get(c, 0.0))) for c in classes},
            "window_fractions": {c: _sig(batch.classes.get(c, 0) / total) for c in classes},
            "unknown_classes": unknown,
        }

    # confidence
    ref_conf = np.asarray(((reference.get("confidence") or {}).get("sample")) or [], dtype=np.float64)
    conf = np.frombuffer(batch.confidence, dtype=np.float64)
    if conf.size < min_records:
        skipped["confidence"] = f"{conf.size} records with a confidence, {min_records} needed"
    elif ref_conf.size < 2:
        skipped["confidence"] = "the reference has no confidence sample"
    else:
        d, log_p = ks_2samp(conf, ref_conf)
        tests["confidence"] = {"log10_p": log_p, "n": int(conf.size), "ks_d": _sig(d),
                               "window_mean": _sig(float(conf.mean())), "reference_mean": _sig(float(ref_conf.mean()))}

    # image statistics
    ref_image = reference.get("image") or {}
    if batch.n_image < min_records:
        skipped["image"] = f"{batch.n_image} records with image statistics, {min_records} needed"
    else:
        img = batch.image_matrix()
        window_cols, ref_cols = {}, {}
        for name in IMAGE_TESTS:
            sample = np.asarray((ref_image.get(name) or {}).get("sample") or [], dtype=np.float64)
            column = img[:, _IMAGE_INDEX[name]]
            if sample.size >= 2 and np.isfinite(column).sum() >= min_records:
                window_cols[name], ref_cols[name] = column, sample
        if not window_cols:
            skipped["image"] = "the reference has no image statistics samples"
        else:
            log_p, details = _ks_family(window_cols, ref_cols)
            tests["image"] = {"log10_p": log_p, "n": batch.n_image, "worst": _worst(details), "statistics": details}

    family_alpha = alpha / max(len(tests), 1)
    for block in tests.values():
        block["alpha"] = _sig(family_alpha)
        block["score"] = round(drift_score(block["log10_p"], family_alpha), 4)
        block["log10_p"] = _sig(block["log10_p"])
    score = max((b["score"] for b in tests.values()), default=None)
    return {
        "drift_score": score,
        "drifted": score is not None and score >= 1.0,
        "alpha": alpha,
        "families_run": sorted(tests),
        "tests": tests,
        "skipped": skipped,
        "n_records": batch.n,
        "ood_rate": _sig(batch.n_ood / batch.n_ood_known) if batch.n_ood_known else None,
        "mismatched_pca": batch.mismatched_pca,
    }


def score_name(family: str) -> str:
    """CloudWatch metric name of a family's score (``DriftScoreEmbedding`` ...)."""
    return "DriftScore" + family.capitalize()


def drift_metrics(result: Mapping[str, Any]) -> dict[str, tuple[float, str]]:
    """The CloudWatch metrics of a :func:`compute_drift` result: name -> (value, unit)."""
    out: dict[str, tuple[float, str]] = {"DriftSampleSize": (float(result.get("n_records") or 0), "Count")}
    if result.get("drift_score") is not None:
        out["DriftScore"] = (float(result["drift_score"]), "None")
    for family, block in (result.get("tests") or {}).items():
        out[score_name(family)] = (float(block["score"]), "None")
    psi = ((result.get("tests") or {}).get("prediction") or {}).get("psi")
    if psi is not None and math.isfinite(psi):
        out["PredictionPSI"] = (float(psi), "None")
    if result.get("ood_rate") is not None:
        out["OODRate"] = (float(result["ood_rate"]), "None")
    return out
