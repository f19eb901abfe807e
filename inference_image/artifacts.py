"""The model directory the training job writes (docs/contracts.md), checked before anything is served.

A directory that lacks a file, holds malformed JSON or whose files disagree (classes, embedding width) is refused
with one :class:`ModelDirError` naming the problem; the entry point prints it and exits non-zero, so SageMaker
reports the endpoint as failed instead of serving wrong answers.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionml.preprocessing import PreprocessingSpec, read_spec

# What serving needs; model.pt (the state dict) is only needed for the eager benchmark, not required here.
REQUIRED_FILES: dict[str, str] = {
    "model.ts": "the TorchScript model",
    "preprocessing.json": "the evaluation transform",
    "classes.json": "the label set and class order",
    "metrics.json": "the melanoma threshold and the decision offsets",
    "reference_stats.json": "the drift / out-of-distribution reference",
}
MELANOMA = "mel"


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
        Digest of ``model.ts`` (names the ONNX export cache and the default model version).
    version : str
        The model version reported with each answer.
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path.name} in {path.parent} is unreadable: {e}") from None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def load_artifacts(
    model_dir: str | Path, version: str | None = None, model_sha256: str | None = None
) -> ModelArtifacts:
    """Read and cross-check a model directory.

    Parameters
    ----------
    model_dir : str or Path
        The directory (``/opt/ml/model`` in SageMaker).
    version : str, optional
        The version to report (``MODEL_VERSION``); else ``metrics.json``'s ``model_version``, else the digest.
    model_sha256 : str, optional
        ``model.ts``'s digest when already known (workers get it from the entry point and skip re-hashing).

    Raises
    ------
    ModelDirError
        Missing file, malformed content, or files that disagree.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelDirError(f"model directory {root} does not exist (SM_MODEL_DIR / MODEL_DIR)")
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
    try:
        label_set = str(classes_doc["label_set"])
        classes = tuple(str(c) for c in classes_doc["classes"])
    except (KeyError, TypeError) as e:
        raise ModelDirError(f"classes.json in {root} lacks label_set/classes: {e}") from None
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ModelDirError(f"classes.json in {root} must list at least two distinct classes, got {list(classes)}")
    for name, doc in (("metrics.json", metrics), ("reference_stats.json", reference)):
        other = doc.get("classes") if isinstance(doc, dict) else None
        if other is not None and tuple(other) != classes:
            raise ModelDirError(f"{name} classes {other} differ from classes.json {list(classes)}")

    threshold: float | None = None
    if MELANOMA in classes:
        raw = metrics.get("melanoma_threshold") if isinstance(metrics, dict) else None
        if not isinstance(raw, (int, float)) or not 0.0 <= float(raw) <= 1.0:
            raise ModelDirError(f"metrics.json in {root} has no melanoma_threshold in [0, 1] (got {raw!r})")
        threshold = float(raw)

    offsets = _decision_offsets(metrics, classes, root)

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

    digest = model_sha256 or file_sha256(root / "model.ts")
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
    )
