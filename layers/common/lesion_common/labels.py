"""Label sets, ``classes.json`` and the metadata CSVs that carry labels (see docs/contracts.md, "Label sets").

The one definition of the label sets, for the Lambdas (the common layer), training and serving (the images copy
this package; ``lesionml.labels`` re-exports it). Standard library only. Class codes are lower case and ordered as
the model's output index.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from typing import Final

HAM7: Final[tuple[str, ...]] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
ISIC8: Final[tuple[str, ...]] = ("mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc")
LABEL_SETS: Final[dict[str, tuple[str, ...]]] = {"ham7": HAM7, "isic8": ISIC8}
MELANOMA: Final = "mel"
DEFAULT_LABEL_SET: Final = "ham7"
# Every code of every set: a folder with one of these names in an upload key is read as a label.
ALL_CODES: Final[frozenset[str]] = frozenset(HAM7) | frozenset(ISIC8)
# ISIC 2019 ground-truth columns, in file order; UNK marks "none of the eight" and is not a class.
ISIC2019_COLUMNS: Final[tuple[str, ...]] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
ISIC2019_UNKNOWN: Final = "UNK"
# Image ids become S3 keys and DynamoDB keys: keep them to what ISIC and HAM use, plus a little room.
IMAGE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Longest line read as a row. Label rows are under 200 characters; a longer one is a stray quote's doing, or
# not a label file, and is skipped as one bad row (the csv module's own limit, 128 KiB per field, would raise).
MAX_LINE_CHARS: Final = 64 * 1024
# A record is one line: label files have no line breaks inside fields, and this is what keeps one stray quote
# from swallowing every row after it.
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
# How much of a bad row's first cell a report repeats.
_REPORTED_ID_CHARS: Final = 128

HAM10000_FORMAT: Final = "ham10000"
ISIC2019_FORMAT: Final = "isic2019"


class UnknownLabelSetError(ValueError):
    """A label set name that is not ``ham7`` or ``isic8``."""


class MetadataFormatError(ValueError):
    """A CSV that is neither HAM10000 metadata nor ISIC 2019 ground truth."""


class DuplicateColumnError(MetadataFormatError):
    """A header that names a column twice: which one holds the label would be a guess."""


def classes_for(label_set: str) -> list[str]:
    """The class codes of a label set, in model output order.

    Raises
    ------
    UnknownLabelSetError
        ``label_set`` is not one of :data:`LABEL_SETS`.
    """
    try:
        return list(LABEL_SETS[label_set])
    except KeyError:
        raise UnknownLabelSetError(f"unknown label set {label_set!r}; expected one of {sorted(LABEL_SETS)}") from None


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
    return {"label_set": label_set, "classes": classes_for(label_set)}


def parse_classes_document(doc: object) -> tuple[str, tuple[str, ...]]:
    """Validate a ``classes.json`` document and return ``(label_set, classes)``.

    Raises
    ------
    ValueError
        If the document is malformed, names an unknown label set (:class:`UnknownLabelSetError`) or lists the
        classes in another order than the label set's.
    """
    if not isinstance(doc, dict) or "label_set" not in doc or "classes" not in doc:
        raise ValueError('classes.json must be an object with "label_set" and "classes"')
    label_set = str(doc["label_set"])
    expected = tuple(classes_for(label_set))
    classes = doc["classes"]
    if not isinstance(classes, list) or tuple(str(c) for c in classes) != expected:
        raise ValueError(f"classes.json lists {classes!r}, but label_set {label_set!r} is {list(expected)!r}")
    return label_set, expected


def is_valid_image_id(image_id: str) -> bool:
    """Whether ``image_id`` may be used as a manifest key and an S3 file name."""
    return IMAGE_ID_PATTERN.fullmatch(image_id) is not None


@dataclass(frozen=True)
class LabelRow:
    """One data row of a metadata CSV, usable or not.

    Attributes
    ----------
    line
        1-based line number in the file (the header is line 1).
    image_id
        As written in the file (stripped); may be empty on a bad row.
    label
        Lower-case class code, or None when the row is skipped.
    lesion_id
        The lesion, or None when the format has none (ISIC 2019 ground truth).
    skip_reason
        None for a usable row; else a short code: ``unk``, ``unknown_label``, ``label_not_in_label_set``,
        ``invalid_image_id``, ``invalid_lesion_id``, ``not_one_hot``, ``bad_value``, ``malformed_row`` (more or
        fewer cells than the header), ``malformed_quoting`` (an unterminated or misplaced quote),
        ``row_too_long`` (over :data:`MAX_LINE_CHARS`), ``duplicate_row``, ``conflicting_label``.
    """

    line: int
    image_id: str
    label: str | None
    lesion_id: str | None
    skip_reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when the row can be applied to the manifest."""
        return self.skip_reason is None


def detect_format(header: list[str]) -> str:
    """``"ham10000"`` or ``"isic2019"`` from a CSV header row.

    Raises
    ------
    MetadataFormatError
        Neither format's required columns are present.
    """
    cols = {c.strip() for c in header}
    if {"image_id", "dx"} <= cols:
        return HAM10000_FORMAT
    if {"image", *ISIC2019_COLUMNS} <= cols:
        return ISIC2019_FORMAT
    raise MetadataFormatError(
        "not a label CSV: expected HAM10000 columns (lesion_id,image_id,dx,...) or ISIC 2019 ground truth "
        f"(image,{','.join(ISIC2019_COLUMNS)},UNK); got {','.join(header[:12])}"
    )


def _ham_row(rec: dict[str, str]) -> tuple[str, str | None, str | None, str | None]:
    """(image_id, label, lesion_id, skip_reason) of a HAM10000 metadata row."""
    image_id = (rec.get("image_id") or "").strip()
    lesion_id = (rec.get("lesion_id") or "").strip() or None
    dx = (rec.get("dx") or "").strip().lower()
    if dx not in ALL_CODES:
        return image_id, None, lesion_id, "unknown_label"
    return image_id, dx, lesion_id, None


def _isic_row(rec: dict[str, str]) -> tuple[str, str | None, str | None, str | None]:
    """(image_id, label, None, skip_reason) of an ISIC 2019 one-hot ground-truth row."""
    image_id = (rec.get("image") or "").strip()
    columns = [*ISIC2019_COLUMNS, ISIC2019_UNKNOWN] if ISIC2019_UNKNOWN in rec else list(ISIC2019_COLUMNS)
    try:
        values = [float((rec.get(c) or "").strip()) for c in columns]
    except ValueError:
        return image_id, None, None, "bad_value"
    if any(not math.isfinite(v) or v not in (0.0, 1.0) for v in values) or sum(values) != 1.0:
        return image_id, None, None, "not_one_hot"
    column = columns[values.index(1.0)]
    if column == ISIC2019_UNKNOWN:
        return image_id, None, None, "unk"
    return image_id, column.lower(), None, None


def _split_line(line: str) -> list[str] | str:
    """The cells of one line, or the skip reason when the line is not one well-formed CSV record."""
    if len(line) > MAX_LINE_CHARS:
        return "row_too_long"
    if '"' not in line:  # what almost every label row is, and what csv would split the same way
        return line.split(",")
    try:
        # strict: a quote left open or text after a closing quote is an error, not silently merged cells.
        return next(csv.reader([line], strict=True), [])
    except csv.Error:
        return "malformed_quoting"


def _column_names(header: list[str]) -> list[str]:
    """The stripped header names; a name given twice (ignoring case) is refused.

    Raises
    ------
    DuplicateColumnError
        Which column holds the label would otherwise depend on the reader (``csv.DictReader`` keeps the last).
    """
    names = [c.strip() for c in header]
    groups: dict[str, list[str]] = {}
    for name in names:
        if name:  # unnamed columns are never read
            groups.setdefault(name.casefold(), []).append(name)
    repeated = [" and ".join(repr(n) for n in group) for group in groups.values() if len(group) > 1]
    if repeated:
        raise DuplicateColumnError(f"the header names a column more than once: {'; '.join(repeated)}")
    return names


def parse_metadata_csv(text: str, *, label_set: str | None = None) -> list[LabelRow]:
    """Read labels from a HAM10000 metadata CSV or an ISIC 2019 ground-truth CSV.

    Every data row comes back, usable or not, so that the caller can report what it skipped and why: one bad row
    (a stray quote, a cell the csv module would refuse as too large, a wrong number of cells) is skipped on its
    own and never costs the rows around it. Each line is one record. Blank lines are ignored. For a repeated
    image id the first row wins; a later one is a ``duplicate_row`` when it agrees and a ``conflicting_label``
    when it does not.

    Parameters
    ----------
    text
        The whole file (a UTF-8 byte-order mark is allowed).
    label_set
        When given, rows whose label is not in it are skipped as ``label_not_in_label_set``.

    Returns
    -------
    list[LabelRow]
        In file order; filter on ``row.ok``.

    Raises
    ------
    DuplicateColumnError
        The header names a column twice.
    MetadataFormatError
        No header, an unreadable header, or a header of neither format.
    UnknownLabelSetError
        ``label_set`` is not a known set.
    """
    allowed = set(classes_for(label_set)) if label_set is not None else set(ALL_CODES)
    lines = _LINE_BREAK.split(text.removeprefix("\ufeff"))
    numbered = ((number, line) for number, line in enumerate(lines, start=1) if line.strip())
    first = next(numbered, None)
    if first is None:
        raise MetadataFormatError("empty CSV: no header row")
    header = _split_line(first[1])
    if isinstance(header, str):
        raise MetadataFormatError(f"the header (line {first[0]}) is not a CSV record: {header}")
    fmt = detect_format(header)
    names = _column_names(header)
    parse = _ham_row if fmt == HAM10000_FORMAT else _isic_row

    rows: list[LabelRow] = []
    seen: dict[str, str] = {}
    for line, text_line in numbered:
        cells = _split_line(text_line)
        if isinstance(cells, str):
            rows.append(LabelRow(line, text_line.split(",", 1)[0].strip()[:_REPORTED_ID_CHARS], None, None, cells))
            continue
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(names):
            rows.append(LabelRow(line, cells[0].strip()[:_REPORTED_ID_CHARS], None, None, "malformed_row"))
            continue
        image_id, label, lesion_id, reason = parse(dict(zip(names, cells, strict=True)))
        if reason is None and not is_valid_image_id(image_id):
            reason = "invalid_image_id"
        if reason is None and lesion_id is not None and not is_valid_image_id(lesion_id):
            reason = "invalid_lesion_id"
        if reason is None and label not in allowed:
            reason = "label_not_in_label_set"
        if reason is None and label is not None:
            if image_id in seen:
                reason = "duplicate_row" if seen[image_id] == label else "conflicting_label"
            else:
                seen[image_id] = label
        if reason is not None:
            rows.append(LabelRow(line, image_id[:_REPORTED_ID_CHARS], None, lesion_id, reason))
        else:
            rows.append(LabelRow(line, image_id, label, lesion_id))
    return rows
