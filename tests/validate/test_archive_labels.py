"""Label files of the public archives beyond HAM10000: ISIC 2019 (ground truth and training metadata), BCN20000,
the ISIC Archive's metadata export (isic-cli), and the plain image_id,label file of the shared second source.

Rows follow each format's published column layout. Real values: BCN20000's first row, the ISIC lesion ids (official
ISIC 2019 training metadata, as the shared second source records them) and the ISIC Archive's diagnosis names; the
other rows are written for the cases they test."""

from __future__ import annotations

import csv

import pytest

from lesion_common.labels import (
    BCN20000_FORMAT,
    ISIC2019_METADATA_FORMAT,
    ISIC_ARCHIVE_FORMAT,
    LABELS_FORMAT,
    archive_class,
    detect_format,
    parse_metadata_csv,
)
from lesion_common.splits import assign_split

from .helpers import SHARED

ISIC2019_METADATA = (
    "image,age_approx,anatom_site_general,lesion_id,sex\n"
    "ISIC_0000000,55.0,anterior torso,,female\n"
    "ISIC_0012657,45.0,lower extremity,MSK4_0011173,male\n"
    "ISIC_0012660,45.0,lower extremity,MSK4_0011174,male\n"
)

BCN20000 = (
    "bcn_filename,age_approx,anatom_site_general,diagnosis,lesion_id,capture_date,sex,split\n"
    "BCN_0000000001.jpg,55.0,anterior torso,MEL,BCN_0003884,2012-05-16,male,train\n"
    "BCN_0000000002.jpg,55.0,anterior torso,MEL,BCN_0003884,2012-05-16,male,train\n"
    "BCN_0000000003.jpg,70.0,head/neck,AK,BCN_0000112,2014-03-11,female,train\n"
    "BCN_0000000004.jpg,80.0,head/neck,SCC,BCN_0000113,2015-07-02,male,train\n"
    "BCN_0000000005.jpg,35.0,posterior torso,,BCN_0000114,2019-01-20,female,test\n"
)

ISIC_CLI = (
    "isic_id,attribution,copyright_license,age_approx,anatom_site_general,benign_malignant,diagnosis_1,diagnosis_2,"
    "diagnosis_3,diagnosis_4,diagnosis_5,diagnosis_confirm_type,image_type,lesion_id,patient_id,sex\n"
    "ISIC_0012657,MSKCC,CC-BY,45,lower extremity,benign,Benign,Benign melanocytic proliferations,Nevus,"
    "Spitz nevus,,single image expert consensus,dermoscopic,MSK4_0011173,IP_1234567,male\n"
    "ISIC_0000031,Anonymous,CC-0,50,,malignant,Malignant,Malignant melanocytic proliferations (Melanoma),"
    "Melanoma Invasive,,,histopathology,dermoscopic,,IP_7654321,female\n"
    "ISIC_0024329,ViDIR Group,CC-BY-NC,75,lower extremity,benign,Benign,"
    "Benign epidermal proliferations,Solar or actinic keratosis,,,histopathology,dermoscopic,,,female\n"
    "ISIC_0053466,Hospital Clinic Barcelona,CC-BY-NC,60,upper extremity,benign,Benign,"
    "Benign soft tissue proliferations - Fibro-histiocytic,Scar,,,single image expert consensus,dermoscopic,,,male\n"
    "ISIC_0053467,Hospital Clinic Barcelona,CC-BY-NC,60,upper extremity,indeterminate,Indeterminate,,,,,"
    "single image expert consensus,dermoscopic,,,male\n"
)


def test_each_format_is_recognised_by_its_header() -> None:
    for text, fmt in ((ISIC2019_METADATA, ISIC2019_METADATA_FORMAT), (BCN20000, BCN20000_FORMAT),
                      (ISIC_CLI, ISIC_ARCHIVE_FORMAT), ("image_id,label,lesion_id,lesion_group\n", LABELS_FORMAT)):
        assert detect_format(next(csv.reader([text.splitlines()[0]]))) == fmt


def test_isic2019_training_metadata_gives_lesion_ids_without_labels() -> None:
    rows = {r.image_id: r for r in parse_metadata_csv(ISIC2019_METADATA, label_set="ham7")}
    assert all(r.ok and r.label is None for r in rows.values())
    assert rows["ISIC_0012657"].lesion_id == "MSK4_0011173" and rows["ISIC_0000000"].lesion_id is None


def test_bcn20000_rows_map_their_codes_and_keep_the_lesion() -> None:
    ham = {r.image_id: r for r in parse_metadata_csv(BCN20000, label_set="ham7")}
    assert (ham["BCN_0000000001"].label, ham["BCN_0000000001"].lesion_id) == ("mel", "BCN_0003884")
    # two images of one lesion: one group, so one split
    assert ham["BCN_0000000002"].lesion_id == ham["BCN_0000000001"].lesion_id
    assert assign_split(ham["BCN_0000000002"].lesion_id or "") == assign_split("BCN_0003884")
    assert ham["BCN_0000000003"].label == "akiec"  # HAM's akiec holds actinic keratoses
    assert (ham["BCN_0000000004"].skip_reason, ham["BCN_0000000004"].detail) == ("label_not_in_label_set", "scc")
    assert ham["BCN_0000000005"].skip_reason == "no_diagnosis"  # the held-out test split has no labels
    isic = {r.image_id: r.label for r in parse_metadata_csv(BCN20000, label_set="isic8") if r.ok}
    assert isic == {"BCN_0000000001": "mel", "BCN_0000000002": "mel", "BCN_0000000003": "ak",
                    "BCN_0000000004": "scc"}


def test_isic_cli_hierarchy_maps_the_most_specific_known_level_and_reports_the_rest() -> None:
    rows = {r.image_id: r for r in parse_metadata_csv(ISIC_CLI, label_set="ham7")}
    nevus = rows["ISIC_0012657"]  # "Spitz nevus" (level 4) is not a class of its own: "Nevus" (level 3) is
    assert (nevus.label, nevus.lesion_id) == ("nv", "MSK4_0011173")
    melanoma = rows["ISIC_0000031"]  # no lesion id: grouped by patient
    assert (melanoma.label, melanoma.lesion_id) == ("mel", "IP_7654321")
    ak = rows["ISIC_0024329"]  # neither lesion nor patient: the image is its own group
    assert (ak.label, ak.lesion_id) == ("akiec", None)
    scar = rows["ISIC_0053466"]
    assert (scar.skip_reason, scar.detail) == ("unmapped_diagnosis", "Scar")
    assert (rows["ISIC_0053467"].skip_reason, rows["ISIC_0053467"].detail) == ("unmapped_diagnosis", "Indeterminate")


@pytest.mark.parametrize(("levels", "expected"), [
    ({"diagnosis_3": "Squamous cell carcinoma in situ"}, ("scc_in_situ", None)),
    ({"diagnosis": "pigmented benign keratosis"}, ("bkl", None)),  # exports before the 2024 hierarchy
    ({"diagnosis": "lentigo NOS"}, (None, "lentigo NOS")),
    ({}, (None, None)),
])
def test_archive_diagnoses(levels: dict[str, str], expected: tuple[str | None, str | None]) -> None:
    assert archive_class(levels) == expected


def test_in_situ_scc_is_hams_akiec_and_invasive_scc_is_no_ham7_class() -> None:
    text = ("isic_id,diagnosis_1,diagnosis_2,diagnosis_3\n"
            "ISIC_1,Malignant,Malignant epidermal proliferations,Squamous cell carcinoma in situ\n"
            "ISIC_2,Malignant,Malignant epidermal proliferations,\"Squamous cell carcinoma, Invasive\"\n")
    ham = {r.image_id: (r.label, r.skip_reason) for r in parse_metadata_csv(text, label_set="ham7")}
    assert ham == {"ISIC_1": ("akiec", None), "ISIC_2": (None, "label_not_in_label_set")}
    assert {r.label for r in parse_metadata_csv(text, label_set="isic8")} == {"scc"}


@pytest.mark.skipif(not (SHARED / "isic_archive" / "labels.csv").is_file(), reason="needs ../shared/data")
def test_the_shared_second_source_groups_by_lesion_group() -> None:
    text = (SHARED / "isic_archive" / "labels.csv").read_text()
    rows = parse_metadata_csv(text, label_set="ham7")
    assert len(rows) == 2162 and all(r.ok for r in rows)
    by_id = {r.image_id: r for r in rows}
    source = {r["image_id"]: r for r in csv.DictReader(text.splitlines())}
    for image_id, r in by_id.items():
        expected = source[image_id]["lesion_group"] or source[image_id]["lesion_id"] or None
        assert r.lesion_id == expected and r.label == source[image_id]["label"]
    assert by_id["ISIC_0000268"].lesion_id == "grp_ISIC_0000268"
