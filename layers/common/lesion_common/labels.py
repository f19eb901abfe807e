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
ISIC2019_METADATA_FORMAT: Final = "isic2019_metadata"
BCN20000_FORMAT: Final = "bcn20000"
ISIC_ARCHIVE_FORMAT: Final = "isic_archive"
LABELS_FORMAT: Final = "labels"

# An ISIC class code (ISIC 2019's eight) -> its code in each label set; None: no class of that set holds it. HAM's
# akiec is "actinic keratoses and intraepithelial carcinoma (Bowen's disease)": AK and SCC in situ, not invasive SCC.
_TO_SET: Final[dict[str, dict[str, str | None]]] = {
    "mel": {"ham7": "mel", "isic8": "mel"}, "nv": {"ham7": "nv", "isic8": "nv"},
    "bcc": {"ham7": "bcc", "isic8": "bcc"}, "bkl": {"ham7": "bkl", "isic8": "bkl"},
    "df": {"ham7": "df", "isic8": "df"}, "vasc": {"ham7": "vasc", "isic8": "vasc"},
    "ak": {"ham7": "akiec", "isic8": "ak"}, "scc": {"ham7": None, "isic8": "scc"},
    "scc_in_situ": {"ham7": "akiec", "isic8": "scc"},
}
# The ISIC Archive's diagnoses (isic-cli's ``diagnosis_1`` .. ``diagnosis_5`` hierarchy; ``diagnosis`` in exports
# before 2024) -> an ISIC class code of _TO_SET, by keyword, in order: the first rule with a keyword in the
# (lower-cased) diagnosis wins, so melanoma comes before nevus, in-situ SCC before SCC, the carcinomas before the
# keratoses. A diagnosis no rule covers is reported, never guessed: ``lentigo NOS``, ``scar``, ``atypical
# melanocytic proliferation``, and the top levels (``Benign``, ``Malignant``, ``Indeterminate``).
ARCHIVE_RULES: Final[tuple[tuple[tuple[str, ...], str], ...]] = (
    (("melanoma",), "mel"),
    (("basal cell carcinoma",), "bcc"),
    (("squamous cell carcinoma in situ", "bowen", "intraepithelial carcinoma"), "scc_in_situ"),
    (("squamous cell carcinoma",), "scc"),
    (("actinic keratosis", "actinic keratoses"), "ak"),
    (("dermatofibroma",), "df"),
    (("seborrheic keratosis", "benign keratosis", "solar lentigo", "lichenoid keratosis", "lichen planus like",
      "lichen planus-like"), "bkl"),
    (("vascular", "angioma", "angiokeratoma", "pyogenic granuloma", "hemorrhage"), "vasc"),
    (("nevus", "nevi", "naevus", "benign melanocytic proliferation"), "nv"),
)
_ARCHIVE_LEVELS: Final = ("diagnosis_5", "diagnosis_4", "diagnosis_3", "diagnosis_2", "diagnosis_1", "diagnosis")


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
        The group the split is assigned by: the lesion, the patient where a format has no lesion id (isic-cli
        metadata), or None when there is neither (the image is its own group).
    skip_reason
        None for a usable row; else a short code: ``unk``, ``unknown_label``, ``label_not_in_label_set``,
        ``unmapped_diagnosis`` (an ISIC Archive diagnosis no class holds; ``detail`` names it), ``no_diagnosis``,
        ``invalid_image_id``, ``invalid_lesion_id``, ``not_one_hot``, ``bad_value``, ``malformed_row`` (more or
        fewer cells than the header), ``malformed_quoting`` (an unterminated or misplaced quote),
        ``row_too_long`` (over :data:`MAX_LINE_CHARS`), ``duplicate_row``, ``conflicting_label``.
        A usable row with ``label`` None carries a lesion id only (ISIC 2019 training metadata).
    detail
        What a skipped row held that explains the reason (the unmapped diagnosis), else None.
    """

    line: int
    image_id: str
    label: str | None
    lesion_id: str | None
    skip_reason: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        """True when the row can be applied to the manifest."""
        return self.skip_reason is None


def detect_format(header: list[str]) -> str:
    """The label file format of a CSV header row (one of the ``*_FORMAT`` names).

    HAM10000 metadata (``lesion_id,image_id,dx``), ISIC 2019 ground truth (``image`` and one-hot class columns)
    and training metadata (``image``, ``lesion_id``), BCN20000 (``bcn_filename``, ``diagnosis``, ``lesion_id``),
    the ISIC Archive's metadata export as isic-cli writes it (``isic_id`` and ``diagnosis_1`` .. ``diagnosis_5``,
    or ``diagnosis``), and a plain ``image_id,label[,lesion_id][,lesion_group]`` file.

    Raises
    ------
    MetadataFormatError
        No format's required columns are present.
    """
    cols = {c.strip() for c in header}
    if {"image_id", "dx"} <= cols:
        return HAM10000_FORMAT
    if {"image", *ISIC2019_COLUMNS} <= cols:
        return ISIC2019_FORMAT
    if {"image", "lesion_id"} <= cols:
        return ISIC2019_METADATA_FORMAT
    if {"bcn_filename", "diagnosis", "lesion_id"} <= cols:
        return BCN20000_FORMAT
    if "isic_id" in cols and cols & set(_ARCHIVE_LEVELS):
        return ISIC_ARCHIVE_FORMAT
    if {"image_id", "label"} <= cols:
        return LABELS_FORMAT
    raise MetadataFormatError(
        "not a label CSV: expected HAM10000 metadata (lesion_id,image_id,dx,...), ISIC 2019 ground truth "
        f"(image,{','.join(ISIC2019_COLUMNS)},UNK) or training metadata (image,...,lesion_id), BCN20000 "
        "(bcn_filename,...,diagnosis,lesion_id), ISIC Archive metadata (isic_id,...,diagnosis_1..diagnosis_5) or "
        f"image_id,label[,lesion_id][,lesion_group]; got {','.join(header[:12])}"
    )


def to_label_set(isic_code: str, label_set: str) -> str | None:
    """An ISIC class code (``ak``, ``scc``, ``scc_in_situ``, ...) as a class of ``label_set``; None if none holds it."""
    return _TO_SET[isic_code][label_set] if label_set in LABEL_SETS else None


def archive_code(diagnosis: str) -> str | None:
    """The ISIC class code of one ISIC Archive diagnosis (:data:`ARCHIVE_RULES`), or None."""
    low = diagnosis.lower()
    for keywords, code in ARCHIVE_RULES:
        if any(k in low for k in keywords):
            return code
    return None


def archive_class(diagnoses: dict[str, str]) -> tuple[str | None, str | None]:
    """(ISIC class code, None) for the most specific ISIC Archive diagnosis level that maps to a class, or
    (None, the most specific diagnosis given) when none does, or (None, None) when no level is filled."""
    given = [(diagnoses.get(level) or "").strip() for level in _ARCHIVE_LEVELS]
    given = [g for g in given if g]
    for diagnosis in given:
        code = archive_code(diagnosis)
        if code is not None:
            return code, None
    return None, (given[0] if given else None)


def _ham_row(rec: dict[str, str]) -> tuple[str, str | None, str | None, str | None]:
    """(image_id, label, lesion_id, skip_reason) of a HAM10000 metadata row."""
    image_id = (rec.get("image_id") or "").strip()
    lesion_id = (rec.get("lesion_id") or "").strip() or None
    dx = (rec.get("dx") or "").strip().lower()
    if dx not in ALL_CODES:
        return image_id, None, lesion_id, "unknown_label"
    return image_id, dx, lesion_id, None


_Row = tuple[str, str | None, str | None, str | None, str | None]  # image id, label, lesion, skip reason, detail


def _isic_row(rec: dict[str, str], label_set: str) -> _Row:
    """An ISIC 2019 one-hot ground-truth row (no lesion id)."""
    image_id = (rec.get("image") or "").strip()
    columns = [*ISIC2019_COLUMNS, ISIC2019_UNKNOWN] if ISIC2019_UNKNOWN in rec else list(ISIC2019_COLUMNS)
    try:
        values = [float((rec.get(c) or "").strip()) for c in columns]
    except ValueError:
        return image_id, None, None, "bad_value", None
    if any(not math.isfinite(v) or v not in (0.0, 1.0) for v in values) or sum(values) != 1.0:
        return image_id, None, None, "not_one_hot", None
    column = columns[values.index(1.0)]
    if column == ISIC2019_UNKNOWN:
        return image_id, None, None, "unk", None
    return _in_set(image_id, column.lower(), None, label_set)


def _in_set(image_id: str, isic_code: str, lesion_id: str | None, label_set: str) -> _Row:
    label = to_label_set(isic_code, label_set)
    if label is None:
        return image_id, None, lesion_id, "label_not_in_label_set", isic_code
    return image_id, label, lesion_id, None, None


def _isic_metadata_row(rec: dict[str, str], label_set: str) -> _Row:
    """An ISIC 2019 training metadata row: a lesion id for an image, no label."""
    return (rec.get("image") or "").strip(), None, (rec.get("lesion_id") or "").strip() or None, None, None


def _bcn_row(rec: dict[str, str], label_set: str) -> _Row:
    """A BCN20000 metadata row: ``bcn_filename`` names the image, ``diagnosis`` is an ISIC 2019 code (empty on the
    held-out test rows)."""
    image_id = (rec.get("bcn_filename") or "").strip().removesuffix(".jpg").removesuffix(".JPG")
    lesion_id = (rec.get("lesion_id") or "").strip() or None
    diagnosis = (rec.get("diagnosis") or "").strip()
    if not diagnosis:
        return image_id, None, lesion_id, "no_diagnosis", None
    code = diagnosis.lower()
    if code not in _TO_SET:
        return image_id, None, lesion_id, "unmapped_diagnosis", diagnosis
    return _in_set(image_id, code, lesion_id, label_set)


def _archive_row(rec: dict[str, str], label_set: str) -> _Row:
    """An ISIC Archive metadata row (isic-cli): grouped by ``lesion_id``, else by ``patient_id``, else the image."""
    image_id = (rec.get("isic_id") or "").strip()
    group = (rec.get("lesion_id") or "").strip() or (rec.get("patient_id") or "").strip() or None
    code, unmapped = archive_class(rec)
    if code is None:
        return image_id, None, group, ("unmapped_diagnosis" if unmapped else "no_diagnosis"), unmapped
    return _in_set(image_id, code, group, label_set)


def _labels_row(rec: dict[str, str], label_set: str) -> _Row:
    """A plain ``image_id,label`` row: grouped by ``lesion_group`` (images found to show one lesion), else
    ``lesion_id``, else the image."""
    image_id = (rec.get("image_id") or "").strip()
    group = (rec.get("lesion_group") or "").strip() or (rec.get("lesion_id") or "").strip() or None
    label = (rec.get("label") or "").strip().lower()
    if label not in ALL_CODES:
        return image_id, None, group, "unknown_label", label or None
    return image_id, label, group, None, None


def _ham_in(rec: dict[str, str], label_set: str) -> _Row:
    image_id, label, lesion_id, reason = _ham_row(rec)
    return image_id, label, lesion_id, reason, None


_PARSERS: Final = {HAM10000_FORMAT: _ham_in, ISIC2019_FORMAT: _isic_row, ISIC2019_METADATA_FORMAT: _isic_metadata_row,
                   BCN20000_FORMAT: _bcn_row, ISIC_ARCHIVE_FORMAT: _archive_row, LABELS_FORMAT: _labels_row}


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
    """Read labels (and lesion ids) from a label CSV of any format :func:`detect_format` knows.

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
        When given, rows whose label is not in it are skipped as ``label_not_in_label_set``; ISIC codes are
        converted to it first (:func:`to_label_set`: AK is ham7's ``akiec``). Without it, ISIC codes are kept as
        isic8's.

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
    parse = _PARSERS[fmt]
    target = label_set if label_set is not None else "isic8"

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
        image_id, label, lesion_id, reason, detail = parse(dict(zip(names, cells, strict=True)), target)
        if reason is None and not is_valid_image_id(image_id):
            reason = "invalid_image_id"
        if reason is None and lesion_id is not None and not is_valid_image_id(lesion_id):
            reason = "invalid_lesion_id"
        if reason is None and label is not None and label not in allowed:
            reason = "label_not_in_label_set"
        if reason is None and label is not None:
            if image_id in seen:
                reason = "duplicate_row" if seen[image_id] == label else "conflicting_label"
            else:
                seen[image_id] = label
        if reason is not None:
            rows.append(LabelRow(line, image_id[:_REPORTED_ID_CHARS], None, lesion_id, reason,
                                 detail[:_REPORTED_ID_CHARS] if detail else None))
        else:
            rows.append(LabelRow(line, image_id, label, lesion_id))
    return rows
