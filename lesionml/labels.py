"""The label sets, as training and serving use them.

The definition lives in the common layer, ``lesion_common.labels`` (the Lambdas' copy; the images copy the same
package, see the Dockerfiles). This module re-exports it and gives ``classes_for`` as a tuple, the form the model
code indexes and compares. Neither module imports torch.
"""

from __future__ import annotations

from lesion_common import labels as _common
from lesion_common.labels import (
    DEFAULT_LABEL_SET,
    LABEL_SETS,
    MELANOMA,
    UnknownLabelSetError,
    class_index,
    classes_document,
    is_valid_label,
    melanoma_index,
    normalise_label,
    parse_classes_document,
)

__all__ = [
    "DEFAULT_LABEL_SET",
    "LABEL_SETS",
    "MELANOMA",
    "UnknownLabelSetError",
    "class_index",
    "classes_document",
    "classes_for",
    "is_valid_label",
    "melanoma_index",
    "normalise_label",
    "parse_classes_document",
]


def classes_for(label_set: str) -> tuple[str, ...]:
    """The ordered class codes of a label set, as a tuple.

    Raises
    ------
    UnknownLabelSetError
        A ``ValueError``: the label set is unknown.
    """
    return tuple(_common.classes_for(label_set))
