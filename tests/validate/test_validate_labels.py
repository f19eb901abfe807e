"""Label sets, metadata CSV parsing and lesion-level splits (layers/common/lesion_common)."""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter

import pytest

from lesion_common.labels import (
    HAM7,
    ISIC8,
    LABEL_SETS,
    MAX_LINE_CHARS,
    DuplicateColumnError,
    MetadataFormatError,
    UnknownLabelSetError,
    classes_for,
    parse_metadata_csv,
)
from lesion_common.splits import SPLITS, assign_split

from .helpers import SAMPLE, SHARED

ISIC_HEADER = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"


def test_label_sets_match_the_contract() -> None:
    # docs/contracts.md, "Label sets": order is the model's output index.
    assert list(HAM7) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert list(ISIC8) == ["mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc"]
    assert classes_for("ham7") == list(HAM7) and classes_for("isic8") == list(ISIC8)
    assert set(LABEL_SETS) == {"ham7", "isic8"}
    assert "mel" in HAM7 and "mel" in ISIC8


def test_classes_for_refuses_unknown_sets_and_returns_a_copy() -> None:
    with pytest.raises(UnknownLabelSetError):
        classes_for("HAM7")
    classes_for("ham7").append("x")
    assert classes_for("ham7") == list(HAM7)


def test_ham10000_sample_csv_parses_completely() -> None:
    text = (SAMPLE / "HAM10000_metadata.csv").read_text()
    rows = parse_metadata_csv(text, label_set="ham7")
    with (SAMPLE / "HAM10000_metadata.csv").open(newline="") as f:
        expected = {r["image_id"]: (r["dx"], r["lesion_id"]) for r in csv.DictReader(f)}
    assert len(rows) == len(expected) > 100
    assert all(r.ok for r in rows)
    assert {r.image_id: (r.label, r.lesion_id) for r in rows} == expected
    assert rows[0].line == 2  # the header is line 1


def test_ham10000_bad_rows_are_reported_not_dropped() -> None:
    text = (
        "\ufefflesion_id,image_id,dx,dx_type,age,sex,localization\n"
        "HAM_1,ISIC_1,MEL,histo,50,male,back\n"  # upper case is accepted
        "HAM_2,ISIC_2,xyz,histo,50,male,back\n"
        "HAM_3,ISIC_3,scc,histo,50,male,back\n"  # a code, but of isic8 only
        "HAM_4,bad id!,nv,histo,50,male,back\n"
        "HAM_5,ISIC_5,nv\n"
        "\n"
        "HAM_1,ISIC_1,mel,histo,50,male,back\n"
        "HAM_1,ISIC_1,nv,histo,50,male,back\n"
        ",ISIC_9,bkl,histo,50,male,back\n"
    )
    rows = parse_metadata_csv(text, label_set="ham7")
    by_reason = {(r.line, r.image_id): r.skip_reason for r in rows}
    assert by_reason == {
        (2, "ISIC_1"): None,
        (3, "ISIC_2"): "unknown_label",
        (4, "ISIC_3"): "label_not_in_label_set",
        (5, "bad id!"): "invalid_image_id",
        (6, "HAM_5"): "malformed_row",
        (8, "ISIC_1"): "duplicate_row",
        (9, "ISIC_1"): "conflicting_label",
        (10, "ISIC_9"): None,
    }
    first = rows[0]
    assert (first.label, first.lesion_id, first.ok) == ("mel", "HAM_1", True)
    assert rows[-1].lesion_id is None  # an empty lesion id is unknown, not ""


def test_isic2019_one_hot_format() -> None:
    text = (
        ISIC_HEADER
        + "ISIC_0000000,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        + "ISIC_0000001,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        + "ISIC_0000002,0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n"  # AK: ham7's akiec
        + "ISIC_0000003,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0\n"  # invasive SCC: not in ham7
        + "ISIC_0000004,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0\n"  # UNK
        + "ISIC_0000005,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        + "ISIC_0000006,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        + "ISIC_0000007,0.0,x,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        + "ISIC_0000008,0.0,0.0,0.0,0.0,0.0,0.0,1,0.0,0.0\n"
    )
    ham = {r.image_id: (r.label, r.skip_reason) for r in parse_metadata_csv(text, label_set="ham7")}
    assert ham == {
        "ISIC_0000000": ("nv", None),
        "ISIC_0000001": ("mel", None),
        "ISIC_0000002": ("akiec", None),
        "ISIC_0000003": (None, "label_not_in_label_set"),
        "ISIC_0000004": (None, "unk"),
        "ISIC_0000005": (None, "not_one_hot"),
        "ISIC_0000006": (None, "not_one_hot"),
        "ISIC_0000007": (None, "bad_value"),
        "ISIC_0000008": ("vasc", None),
    }
    isic = {r.image_id: r.label for r in parse_metadata_csv(text, label_set="isic8") if r.ok}
    assert isic["ISIC_0000002"] == "ak" and isic["ISIC_0000003"] == "scc"
    assert all(r.lesion_id is None for r in parse_metadata_csv(text))


def test_unknown_csv_formats_raise() -> None:
    for text in ("", "\n\n", "a,b,c\n1,2,3\n", "image,MEL,NV\nx,1,0\n"):
        with pytest.raises(MetadataFormatError):
            parse_metadata_csv(text)


def test_real_isic2019_ground_truth_when_present() -> None:
    path = SHARED / "ham10000" / "ISIC_2019_Training_GroundTruth.csv"
    if not path.is_file():
        pytest.skip("../shared/data is not present on this machine")
    rows = parse_metadata_csv(path.read_text(), label_set="isic8")
    assert len(rows) == 25331 and all(r.ok for r in rows)
    counts = Counter(r.label for r in rows)
    assert counts["nv"] == 12875 and counts["mel"] == 4522 and set(counts) == set(ISIC8)


def test_split_is_sha256_of_the_lesion_id() -> None:
    # Pinned, so that a change of hash or bucketing (which would move every image) fails here.
    assert assign_split("HAM_0000000") == "train"
    assert assign_split("HAM_0000003") == "test"
    assert assign_split("HAM_0000006") == "validation"
    for lesion in ("HAM_0000118", "ISIC_0024306", "x"):
        bucket = int(hashlib.sha256(lesion.encode()).hexdigest()[:16], 16) % 10_000
        expected = "train" if bucket < 7000 else "validation" if bucket < 8500 else "test"
        assert assign_split(lesion) == expected
    with pytest.raises(ValueError):
        assign_split("")


def test_split_proportions_and_lesion_grouping() -> None:
    counts = Counter(assign_split(f"HAM_{i:07d}") for i in range(20_000))
    assert set(counts) == set(SPLITS)
    assert abs(counts["train"] / 20_000 - 0.70) < 0.015
    assert abs(counts["validation"] / 20_000 - 0.15) < 0.01
    assert abs(counts["test"] / 20_000 - 0.15) < 0.01
    # All images of a lesion share its split: the split depends on nothing but the lesion id.
    rows = parse_metadata_csv((SAMPLE / "HAM10000_metadata.csv").read_text())
    by_lesion: dict[str, set[str]] = {}
    for r in rows:
        assert r.lesion_id is not None
        by_lesion.setdefault(r.lesion_id, set()).add(assign_split(r.lesion_id))
    assert all(len(s) == 1 for s in by_lesion.values())


def test_parse_accepts_windows_line_endings() -> None:
    text = "lesion_id,image_id,dx\r\nHAM_1,ISIC_1,nv\r\n"
    rows = parse_metadata_csv(io.StringIO(text).read())
    assert [(r.image_id, r.label, r.ok) for r in rows] == [("ISIC_1", "nv", True)]


# ------------------------------------------------------------------------------------------ one bad cell (issue 19)

HAM_HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization"


def ham_lines(n: int, start: int = 0) -> list[str]:
    return [f"HAM_{i:07d},ISIC_{i:07d},{HAM7[i % 7]},histo,50.0,male,back" for i in range(start, start + n)]


def test_a_stray_quote_costs_one_row_not_the_file() -> None:
    # The quote opens a field that, read as CSV, runs to the end of the file: over csv's 128 KiB field limit,
    # which raised and lost every label. Now that line alone is skipped and every other row is read.
    body = ham_lines(4000)
    body[10] = 'HAM_0000010,ISIC_0000010,"nv,histo,50.0,male,back'
    text = "\n".join([HAM_HEADER, *body]) + "\n"
    assert len(text) > csv.field_size_limit()
    with pytest.raises(csv.Error):
        list(csv.reader(io.StringIO(text)))
    rows = parse_metadata_csv(text, label_set="ham7")
    assert len(rows) == 4000
    bad = [r for r in rows if not r.ok]
    assert [(r.line, r.image_id, r.skip_reason) for r in bad] == [(12, "HAM_0000010", "malformed_quoting")]
    assert {r.image_id for r in rows if r.ok} == {f"ISIC_{i:07d}" for i in range(4000)} - {"ISIC_0000010"}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('HAM_9,ISIC_9,"nv",histo,50.0,male,back', None),  # quoted cells are fine
        ('HAM_9,ISIC_9,"nv"x,histo,50.0,male,back', "malformed_quoting"),  # text after a closing quote
        ('"HAM_9,ISIC_9,nv,histo,50.0,male,back', "malformed_quoting"),  # never closed
        ("HAM_9,ISIC_9,nv,histo,50.0,male,back,extra", "malformed_row"),  # too many cells
        ("HAM_9,ISIC_9,nv,histo", "malformed_row"),  # too few
        ("HAM_9,ISIC_9,melanoma,histo,50.0,male,back", "unknown_label"),
        ("HAM_9,ISIC_9,nv,histo,50.0,male," + "x" * MAX_LINE_CHARS, "row_too_long"),
        ("HAM_9,ISIC_9,nv,histo,50.0,male,\x00back", None),  # a NUL in a column nobody reads
    ],
)
def test_each_bad_row_is_reported_and_its_neighbours_apply(line: str, reason: str | None) -> None:
    text = "\n".join([HAM_HEADER, *ham_lines(2), line, *ham_lines(2, start=2)]) + "\n"
    rows = parse_metadata_csv(text, label_set="ham7")
    assert [r.line for r in rows] == [2, 3, 4, 5, 6]
    assert [r.skip_reason for r in rows] == [None, None, reason, None, None]
    assert all(len(r.image_id) <= 128 for r in rows)


@pytest.mark.parametrize(
    "header",
    [
        "lesion_id,image_id,dx,dx,age",  # which dx? DictReader would silently keep the last
        "lesion_id,image_id,dx,DX ,age",
        "lesion_id,image_id,image_id,dx",
        "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK,MEL",
    ],
)
def test_duplicate_header_names_are_refused(header: str) -> None:
    with pytest.raises(DuplicateColumnError, match="more than once"):
        parse_metadata_csv(header + "\n" + ",".join(["x"] * header.count(",")) + ",x\n")


def test_unnamed_columns_are_not_duplicates() -> None:
    rows = parse_metadata_csv("lesion_id,image_id,dx,,\nHAM_1,ISIC_1,nv,,\n")
    assert [(r.image_id, r.label) for r in rows] == [("ISIC_1", "nv")]


def test_byte_order_mark_and_line_endings() -> None:
    for text in ("\ufeff" + HAM_HEADER + "\r\nHAM_1,ISIC_1,nv,histo,50,male,back\r\n",
                 HAM_HEADER + "\rHAM_1,ISIC_1,nv,histo,50,male,back\r",
                 "\n\n" + HAM_HEADER + "\nHAM_1,ISIC_1,nv,histo,50,male,back"):
        rows = parse_metadata_csv(text, label_set="ham7")
        assert [(r.image_id, r.label, r.lesion_id) for r in rows] == [("ISIC_1", "nv", "HAM_1")], repr(text)


def test_an_unreadable_header_is_a_format_error() -> None:
    with pytest.raises(MetadataFormatError, match="line 1"):
        parse_metadata_csv('"lesion_id,image_id,dx\nHAM_1,ISIC_1,nv\n')
