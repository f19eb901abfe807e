"""Label sets shared by training, serving and the Lambdas.

This module must stay free of torch (and of anything outside the standard library): the Lambda layer keeps a
copy at ``layers/common/lesion_common/labels.py`` and a test keeps the two equal. The order of each tuple is the
model's output index (docs/contracts.md).
"""

from __future__ import annotations

LABEL_SETS: dict[str, tuple[str, ...]] = {
    # HAM10000 `dx` codes.
    "ham7": ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"),
    # ISIC 2019 ground-truth columns MEL, NV, BCC, AK, BKL, DF, VASC, SCC (UNK is not a class).
    "isic8": ("mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc"),
}

MELANOMA = "mel"
DEFAULT_LABEL_SET = "ham7"


def classes_for(label_set: str) -> tuple[str, ...]:
    """Return the ordered class codes of a label set.

    Parameters
    ----------
    label_set : str
        ``"ham7"`` or ``"isic8"``.

    Raises
    ------
    ValueError
        If the label set is unknown.
    """
    try:
        return LABEL_SETS[label_set]
    except KeyError:
        raise ValueError(f"unknown label_set {label_set!r}; expected one of {sorted(LABEL_SETS)}") from None


def class_index(label_set: str) -> dict[str, int]:
    """Map each class code of ``label_set`` to its output index."""
    return {code: i for i, code in enumerate(classes_for(label_set))}


def melanoma_index(label_set: str) -> int:
    """Output index of the melanoma class in ``label_set``."""
    return classes_for(label_set).index(MELANOMA)


def normalise_label(label: str) -> str:
    """Normalise a raw label (``"MEL"``, ``" mel "``) to a lower-case class code."""
    return label.strip().lower()


def is_valid_label(label: str, label_set: str) -> bool:
    """Whether ``label`` (after normalisation) is a class of ``label_set``."""
    return normalise_label(label) in classes_for(label_set)


def classes_document(label_set: str) -> dict[str, object]:
    """The ``classes.json`` document: ``{"label_set": ..., "classes": [...]}``."""
    return {"label_set": label_set, "classes": list(classes_for(label_set))}


def parse_classes_document(doc: object) -> tuple[str, tuple[str, ...]]:
    """Validate a ``classes.json`` document and return ``(label_set, classes)``.

    Raises
    ------
    ValueError
        If the document is malformed or its class order differs from the label set's.
    """
    if not isinstance(doc, dict) or "label_set" not in doc or "classes" not in doc:
        raise ValueError('classes.json must be an object with "label_set" and "classes"')
    label_set = str(doc["label_set"])
    expected = classes_for(label_set)
    classes = doc["classes"]
    if not isinstance(classes, list) or tuple(str(c) for c in classes) != expected:
        raise ValueError(f"classes.json lists {classes!r}, but label_set {label_set!r} is {list(expected)!r}")
    return label_set, expected
