"""Class counts kept at validation time, and check_data deciding "not enough yet" from them without reading the
manifest; the dataset files streamed to S3 in parts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest

from lesion_common.class_counts import read_counts, reset_counts
from lesion_common.s3_stream import S3Writer
from lesion_common.splits import assign_split
from tests.unit import test_issue16_sharding as sharding
from tests.unit.handlers import Context, load_handler
from tests.unit.test_issue16_sharding import CHECK_ENV, SAMPLE_IMAGES, VALIDATE_ENV, _upload

aws = sharding.aws  # the tables exactly as template.yaml declares them

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _exact() -> dict[str, dict[str, int]]:
    """The counts a full read of the manifest gives (VALIDATED items with a label)."""
    items = boto3.resource("dynamodb").Table("manifest").scan()["Items"]
    out = {c: dict.fromkeys(("train", "validation", "test"), 0) for c in CLASSES}
    for i in items:
        if i.get("status") == "VALIDATED" and i.get("label"):
            out[str(i["label"])][str(i["split"])] += 1
    return out


def test_validation_and_label_files_keep_the_counts_exact(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    validate = load_handler("validate_image", VALIDATE_ENV, monkeypatch)
    ddb = boto3.client("dynamodb")
    for p in SAMPLE_IMAGES[:6]:  # labelled by their folder
        _upload(validate, f"incoming/ham/nv/{p.name}", p.read_bytes())
    for p in SAMPLE_IMAGES[6:10]:  # no label yet: not counted
        _upload(validate, f"incoming/ham/{p.name}", p.read_bytes())
    _upload(validate, "incoming/other/nv/COPY.jpg", SAMPLE_IMAGES[0].read_bytes())  # a DUPLICATE: not counted
    counts, _ = read_counts(ddb, "hashes", CLASSES)
    assert counts == _exact() and sum(counts["nv"].values()) == 6

    # A label file labels two, relabels one (nv -> mel) and moves another to a lesion of another split.
    moved = SAMPLE_IMAGES[1].stem
    other_split_lesion = next(f"L{i}" for i in range(1000)
                              if assign_split(f"L{i}") != assign_split(moved))
    rows = [f"HAM_{SAMPLE_IMAGES[6].stem},{SAMPLE_IMAGES[6].stem},bcc", f"HAM_{SAMPLE_IMAGES[7].stem},"
            f"{SAMPLE_IMAGES[7].stem},bcc", f"HAM_{SAMPLE_IMAGES[0].stem},{SAMPLE_IMAGES[0].stem},mel",
            f"{other_split_lesion},{moved},nv"]
    text = "lesion_id,image_id,dx\n" + "\n".join(rows) + "\n"
    _upload(validate, "incoming/ham/labels.csv", text.encode())
    counts, _ = read_counts(ddb, "hashes", CLASSES)
    assert counts == _exact()
    assert sum(counts["bcc"].values()) == 2 and sum(counts["mel"].values()) == 1 and sum(counts["nv"].values()) == 5


def test_recent_counts_say_not_enough_without_reading_the_manifest(aws: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    validate = load_handler("validate_image", VALIDATE_ENV, monkeypatch)
    for p in SAMPLE_IMAGES[:5]:
        _upload(validate, f"incoming/ham/nv/{p.name}", p.read_bytes())
    check = load_handler("check_data", {**CHECK_ENV, "MIN_IMAGES_PER_CLASS": "3"}, monkeypatch)
    request = {"executionName": "run-1", "request": {}}
    first = check.lambda_handler(request, Context())  # never made exact: the manifest is read
    assert first["countedFrom"] == "manifest" and first["enough"] is False
    read: list[str] = []
    monkeypatch.setattr(check, "validated_images", lambda *a, **k: read.append("full") or [])
    again = check.lambda_handler(request, Context())
    assert again["countedFrom"] == "class counts" and read == []
    assert (again["enough"], again["reasons"], again["counts"]) == (False, first["reasons"], first["counts"])

    # A week later the counts are not trusted to say "not enough": the manifest is read and they are made exact.
    monkeypatch.setattr(check, "RECONCILE_AFTER", timedelta(seconds=-1))
    assert check.lambda_handler(request, Context())["countedFrom"] == "manifest" and read == ["full"]


def test_counts_that_say_enough_are_checked_against_the_manifest(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ddb = boto3.client("dynamodb")
    reset_counts(ddb, "hashes", {c: {"train": 100, "validation": 20, "test": 20} for c in CLASSES})  # wrong
    check = load_handler("check_data", CHECK_ENV, monkeypatch)
    out = check.lambda_handler({"executionName": "run-1", "request": {"force": True}}, Context())
    assert out["countedFrom"] == "manifest" and out["enough"] is False and out["totalImages"] == 0
    counts, made_exact = read_counts(ddb, "hashes", CLASSES)
    assert counts == _exact() and made_exact is not None
    assert datetime.now(UTC) - made_exact < timedelta(minutes=1)


def test_s3_writer_streams_parts_and_aborts_on_error(aws: None) -> None:
    s3 = boto3.client("s3")
    part = 5 * 1024 * 1024  # S3's minimum part size
    chunk = b"x" * (1024 * 1024)
    with S3Writer(s3, "artifacts", "big.csv", part_bytes=part) as out:
        for _ in range(12):
            out.write(chunk)
    assert s3.head_object(Bucket="artifacts", Key="big.csv")["ContentLength"] == 12 * len(chunk)
    assert "-" in s3.head_object(Bucket="artifacts", Key="big.csv")["ETag"]  # a multipart object

    def fail() -> Any:
        with S3Writer(s3, "artifacts", "broken.csv", part_bytes=part) as out:
            for _ in range(6):
                out.write(chunk)
            raise RuntimeError("the listing failed")

    with pytest.raises(RuntimeError):
        fail()
    assert s3.list_objects_v2(Bucket="artifacts", Prefix="broken").get("KeyCount") == 0
    assert s3.list_multipart_uploads(Bucket="artifacts").get("Uploads", []) == []
