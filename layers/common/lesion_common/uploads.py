"""The data bucket's layout: where uploads arrive, where clean copies and rejected uploads go, and image ids.

- ``incoming/<source>/[<label>/]<image id>.<ext>``: uploads (never changed or deleted). ``<source>`` names the
  dataset; a folder ``<label>`` that is a class code labels the image; a ``.csv`` is a label file.
- ``validated/<sha256 of the clean JPEG>.jpg``: the clean copy, named by its content, so that one picture has one
  key and no picture can overwrite another (the manifest item's ``key``).
- ``quarantine/<path under incoming/>`` and ``<that>.reason.json``: a rejected upload (or a label file with
  rejected rows), copied, and why.

The image id is the file name without its extension; an upload whose name already stands for another picture
gets ``<name>-<12 hex of its sha256>`` (:func:`alternate_id_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Final, Literal

from lesion_common.labels import ALL_CODES

INCOMING: Final = "incoming/"
VALIDATED_PREFIX: Final = "validated/"
QUARANTINE_PREFIX: Final = "quarantine/"
REASON_SUFFIX: Final = ".reason.json"
# An image id that has to tell two pictures of one file name apart: "<name>-" + this many hex digits of the
# upload's sha256 (48 bits), within the 128 characters of an id.
ID_SUFFIX_HEX: Final = 12

# What handling an upload returns (the handler's result): ``outcome`` and what it concerned.
Outcome = dict[str, Any]


@dataclass(frozen=True)
class Upload:
    """The object an event names."""

    key: str
    size: int | None = None
    etag: str | None = None
    version_id: str | None = None


@dataclass(frozen=True)
class Fetched:
    """An upload as read: ``data`` is None when it is over the size limit (then it is not downloaded)."""

    key: str
    size: int
    etag: str | None
    version_id: str | None
    data: bytes | None


def route(key: str) -> Literal["ignore", "csv", "image"]:
    """What an uploaded key is: only ``incoming/`` matters, and only the extension ``.csv`` is special.

    Images are not recognised by extension: the content decides, so a ``.gif`` or a nameless file is an image
    candidate that validation refuses with a reason.
    """
    if not key.startswith(INCOMING) or key.endswith("/"):
        return "ignore"
    return "csv" if key.lower().endswith(".csv") else "image"


def image_id_for(key: str) -> str:
    """The image id: the file name without its extension (``incoming/x/ISIC_0024306.jpg`` -> ``ISIC_0024306``)."""
    return PurePosixPath(key).stem


def alternate_id_for(image_id: str, source_sha256: str) -> str:
    """The id of an upload whose file name already stands for another picture: ``<name>-<12 hex of sha256>``."""
    return f"{image_id[: 127 - ID_SUFFIX_HEX]}-{source_sha256[:ID_SUFFIX_HEX]}"


def clean_key_for(sha256: str) -> str:
    """``validated/<sha256>.jpg``: derived from the clean bytes, so one picture has one key and no other picture
    can overwrite it; a redelivered event writes the same bytes again."""
    return f"{VALIDATED_PREFIX}{sha256}.jpg"


def path_under_validated(key: str) -> str:
    """A clean copy's key relative to ``validated/`` (what the training job's manifests list)."""
    return key.removeprefix(VALIDATED_PREFIX)


def label_for(key: str) -> str | None:
    """The class code from ``incoming/<anything>/<label>/<file>``, when ``<label>`` is a known code (any set)."""
    parts = key.split("/")
    if len(parts) >= 4 and parts[-2].lower() in ALL_CODES:
        return parts[-2].lower()
    return None


def source_for(key: str) -> str:
    """The dataset name: the first folder under ``incoming/``, or ``upload`` for a file directly in it."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[1] else "upload"


def quarantine_key_for(key: str) -> str:
    """``incoming/a/b.jpg`` -> ``quarantine/a/b.jpg``."""
    return QUARANTINE_PREFIX + key.removeprefix(INCOMING)
