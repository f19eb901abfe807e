"""The model directory the training job writes (docs/contracts.md), checked before anything is served.

First the seal (:mod:`lesionml.model_dir`): the directory must hold exactly the files ``manifest.json`` lists,
with the listed SHA-256 digests (and, when ``MODEL_MANIFEST_SHA256`` is set, the manifest must be the one the model
package recorded); nothing is parsed before that. A directory without a manifest (written before manifests) is
refused too: for a screening tool an unverifiable model is not a model to serve. Then the content: a directory that
lacks a file, holds malformed JSON or whose files disagree (classes, embedding width) is refused. Each refusal is
one :class:`ModelDirError` naming the file; the entry point prints it and exits non-zero, so SageMaker reports the
endpoint as failed instead of serving wrong answers. The known-answer check (``known_answers.json``, run with the
runtime that will serve) follows in :mod:`inference_image.known_answers`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lesionml.labels import MELANOMA, parse_classes_document
from lesionml.model_dir import (
    KNOWN_ANSWERS_NAME,
    ModelDirIntegrityError,
    file_sha256,
    read_known_answers,
    verify_manifest,
)
from lesionml.preprocessing import PreprocessingSpec, read_spec

__all__ = ["MELANOMA", "REQUIRED_FILES", "ModelArtifacts", "ModelDirError", "file_sha256", "load_artifacts"]

# What serving needs; model.pt (the state dict) is only needed for the eager benchmark, not required here.
REQUIRED_FILES: dict[str, str] = {
    "model.ts": "the TorchScript model",
    "preprocessing.json": "the evaluation transform",
    "classes.json": "the label set and class order",
    "metrics.json": "the melanoma threshold and the decision offsets",
    "reference_stats.json": "the drift / out-of-distribution reference",
    KNOWN_ANSWERS_NAME: "the known-answer check",
}


class ModelDirError(RuntimeError):
    """The model directory cannot be served; the message says why."""


@dataclass(frozen=True)
class ModelArtifacts:
    """The parsed model directory.

    Attributes
    ----------
    model_dir : Path
        The directory.
    spec : PreprocessingSpec
        The evaluation transform.
    label_set : str
        ``ham7`` or ``isic8``.
    classes : tuple of str
        Class codes in output order.
    melanoma_threshold : float or None
        Probability of ``mel`` at or above which the image is flagged (None when the label set has no ``mel``).
    decision_offsets : tuple of float or None
        Per-class offsets chosen on validation: the predicted class is the arg-max of ``log p + offsets``
        (``metrics.json``'s ``decision_offsets``). None when absent or all zero: the plain arg-max.
    reference : dict
        ``reference_stats.json``.
    model_sha256 : str
        Digest of ``model.ts`` (the default model version).
    version : str
        The model version reported with each answer.
    manifest_sha256 : str
        Digest of ``manifest.json``, which covers every file (names the ONNX export cache).
    known_answers : tuple of (bytes, ndarray)
        PNG images and the probabilities (in ``classes`` order) the training job recorded for them.
    """

    model_dir: Path
    spec: PreprocessingSpec
    label_set: str
    classes: tuple[str, ...]
    melanoma_threshold: float | None
    decision_offsets: tuple[float, ...] | None
    reference: dict[str, Any]
    model_sha256: str
    version: str
    manifest_sha256: str = ""
    known_answers: tuple[tuple[bytes, np.ndarray], ...] = ()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path.name} in {path.parent} is unreadable: {e}") from None


def _decision_offsets(metrics: Any, classes: tuple[str, ...], root: Path) -> tuple[float, ...] | None:
    """``metrics.json``'s ``decision_offsets``: one finite number per class, or absent (plain arg-max)."""
    raw = metrics.get("decision_offsets") if isinstance(metrics, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != set(classes):
        raise ModelDirError(f"metrics.json in {root}: decision_offsets must give each class in classes.json a number")
    values = []
    for c in classes:
        v = raw[c]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ModelDirError(f"metrics.json in {root}: decision_offsets[{c!r}] is not a finite number ({v!r})")
        values.append(float(v))
    return tuple(values) if any(values) else None


def _classes(classes_doc: Any, root: Path) -> tuple[str, tuple[str, ...]]:
    """``classes.json``'s label set and class order: at least two distinct classes, in the label set's order."""
    try:
        label_set = str(classes_doc["label_set"])
        classes = tuple(str(c) for c in classes_doc["classes"])
    except (KeyError, TypeError) as e:
        raise ModelDirError(f"classes.json in {root} lacks label_set/classes: {e}") from None
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ModelDirError(f"classes.json in {root} must list at least two distinct classes, got {list(classes)}")
    try:
        # The output order is the label set's (docs/contracts.md): classes reordered, even in every file alike,
        # would swap the answers.
        parse_classes_document(classes_doc)
    except ValueError as e:
        raise ModelDirError(f"classes.json in {root}: {e}") from None
    return label_set, classes


def _melanoma_threshold(metrics: Any, classes: tuple[str, ...], root: Path) -> float | None:
    """``metrics.json``'s ``melanoma_threshold`` in [0, 1], required when the label set has ``mel``."""
    if MELANOMA not in classes:
        return None
    raw = metrics.get("melanoma_threshold") if isinstance(metrics, dict) else None
    if not isinstance(raw, (int, float)) or not 0.0 <= float(raw) <= 1.0:
        raise ModelDirError(f"metrics.json in {root} has no melanoma_threshold in [0, 1] (got {raw!r})")
    return float(raw)


def _check_reference(reference: Any, root: Path) -> None:
    """``reference_stats.json`` holds the embedding statistics (of one width) and every image statistic."""
    try:
        emb = reference["embedding"]
        dim = int(emb["dim"])
        if len(emb["mean"]) != dim or len(emb["std"]) != dim:
            raise ValueError("embedding mean/std length differs from dim")
        comps = emb["pca"]["components"]
        if not comps or any(len(c) != dim for c in comps):
            raise ValueError("PCA components do not have the embedding width")
        for stat in ("brightness", "contrast", "red_mean", "green_mean", "blue_mean", "saturation"):
            q = reference["image"][stat]["quantiles"]
            for key in ("p01", "p50", "p99"):
                float(q[key])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelDirError(f"reference_stats.json in {root} is incomplete: {type(e).__name__}: {e}") from None


def load_artifacts(
    model_dir: str | Path, version: str | None = None, manifest_sha256: str | None = None
) -> ModelArtifacts:
    """Verify a model directory against its manifest, then read and cross-check it.

    Parameters
    ----------
    model_dir : str or Path
        The directory (``/opt/ml/model`` in SageMaker).
    version : str, optional
        The version to report (``MODEL_VERSION``); else ``metrics.json``'s ``model_version``, else the digest.
    manifest_sha256 : str, optional
        The digest ``manifest.json`` must have (``MODEL_MANIFEST_SHA256``: the model package's record).

    Raises
    ------
    ModelDirError
        No manifest or a file that does not match it, missing file, malformed content, or files that disagree.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelDirError(f"model directory {root} does not exist (SM_MODEL_DIR / MODEL_DIR)")
    try:
        manifest = verify_manifest(root, manifest_sha256)
    except (ModelDirIntegrityError, OSError) as e:
        raise ModelDirError(str(e)) from None
    missing = [f"{name} ({what})" for name, what in REQUIRED_FILES.items() if not (root / name).is_file()]
    if missing:
        raise ModelDirError(f"model directory {root} is missing {', '.join(missing)}")

    try:
        spec = read_spec(root / "preprocessing.json")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelDirError(f"preprocessing.json in {root} is invalid: {type(e).__name__}: {e}") from None
    classes_doc = _read_json(root / "classes.json")
    metrics = _read_json(root / "metrics.json")
    reference = _read_json(root / "reference_stats.json")
    label_set, classes = _classes(classes_doc, root)
    for name, doc in (("metrics.json", metrics), ("reference_stats.json", reference)):
        other = doc.get("classes") if isinstance(doc, dict) else None
        if other is not None and tuple(other) != classes:
            raise ModelDirError(f"{name} classes {other} differ from classes.json {list(classes)}")
    threshold = _melanoma_threshold(metrics, classes, root)
    offsets = _decision_offsets(metrics, classes, root)
    _check_reference(reference, root)

    try:
        known = tuple(read_known_answers(root, classes))
    except ModelDirIntegrityError as e:
        raise ModelDirError(str(e)) from None

    digest = manifest.files["model.ts"]
    if not version:
        meta = metrics.get("model_version") if isinstance(metrics, dict) else None
        version = str(meta) if meta else f"sha256-{digest[:12]}"
    return ModelArtifacts(
        model_dir=root,
        spec=spec,
        label_set=label_set,
        classes=classes,
        melanoma_threshold=threshold,
        decision_offsets=offsets,
        reference=reference,
        model_sha256=digest,
        version=version,
        manifest_sha256=manifest.digest,
        known_answers=known,
    )
