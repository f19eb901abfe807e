"""Deterministic train/validation/test assignment by lesion (see docs/contracts.md, "Manifest table").

Every image of a lesion lands in the same split, so a lesion never leaks from training into evaluation, and the
split of an image never changes between runs, machines or Python versions (sha256, not ``hash()``).
"""

from __future__ import annotations

import hashlib
from typing import Final, Literal

Split = Literal["train", "validation", "test"]
SPLITS: Final[tuple[Split, ...]] = ("train", "validation", "test")
# Percent of lesions per split, in SPLITS order.
SPLIT_PERCENT: Final[tuple[int, int, int]] = (70, 15, 15)
_BUCKETS: Final = 10_000
# A training dataset's ``<split>.csv`` columns (docs/contracts.md, "Training dataset"): check_data writes them, the
# training job reads them. ``source`` is the dataset an image came from (the first folder under ``incoming/``), so
# that the job can report each source's figures; a file without it still reads.
DATASET_COLUMNS: Final[tuple[str, ...]] = ("image_id", "path", "label", "lesion_id", "source")


def assign_split(lesion_id: str) -> Split:
    """The split of a lesion: 70% train, 15% validation, 15% test.

    Parameters
    ----------
    lesion_id
        The lesion id (the image id when the lesion is unknown). Compared exactly: no case folding or trimming.

    Raises
    ------
    ValueError
        ``lesion_id`` is empty.
    """
    if not lesion_id:
        raise ValueError("lesion_id must be a non-empty string")
    digest = hashlib.sha256(lesion_id.encode("utf-8")).digest()
    # 64 bits modulo 10,000: the bias is ~1e-15, and bucket boundaries stay exact integers.
    bucket = int.from_bytes(digest[:8], "big") % _BUCKETS
    train_end = _BUCKETS * SPLIT_PERCENT[0] // 100
    validation_end = train_end + _BUCKETS * SPLIT_PERCENT[1] // 100
    if bucket < train_end:
        return "train"
    if bucket < validation_end:
        return "validation"
    return "test"
