"""Issue 19, item 5: one picture is one training row, and no picture or lesion straddles two splits.

check_data is the second line of defence behind validate_image's duplicate check (which two copies arriving at
the same moment can both pass): it drops items with equal clean-bytes sha256 and keeps linked pictures in one
split. And two different pictures with one file name each keep their own item and clean object, so the dataset
shows both.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest

from lesion_common.splits import SPLITS, assign_split
from tests.unit import test_issue16_sharding as sharding
from tests.unit.handlers import Context, load_handler
from tests.unit.test_pipeline_handlers import CHECK_ENV as PIPELINE_CHECK_ENV

REPO = Path(__file__).resolve().parents[2]
SAMPLE_IMAGES = sorted((REPO / "data" / "sample" / "images").glob("*.jpg"))
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
# The pipeline tests' check_data environment, with minimums low enough for a handful of images.
CHECK_ENV = {**PIPELINE_CHECK_ENV, "MIN_NEW_IMAGES": "1", "MIN_IMAGES_PER_CLASS": "1"}
VALIDATE_ENV = {
    "DATA_BUCKET": "data",
    "MANIFEST_TABLE": "manifest",
    "LABEL_SET": "ham7",
    "MIN_IMAGE_SIDE": "64",
    "MAX_IMAGE_SIDE": "10000",
    "MAX_IMAGE_PIXELS": "40000000",
    "MAX_ASPECT_RATIO": "4.0",
    "MAX_UPLOAD_BYTES": str(100 * 1024 * 1024),
    "HASH_INDEX_TABLE": "hashes",
    "STATUS_SHARDS": "1",
}


aws = sharding.aws  # the tables exactly as template.yaml declares them


def _lesions_in(split: str, n: int, prefix: str) -> list[str]:
    """``n`` lesion ids that assign_split puts in ``split``."""
    out, i = [], 0
    while len(out) < n:
        lesion = f"{prefix}_{i}"
        if assign_split(lesion) == split:
            out.append(lesion)
        i += 1
    return out


def _item(image_id: str, lesion: str, label: str, sha256: str, status: str = "VALIDATED") -> dict[str, Any]:
    return {"image_id": image_id, "lesion_id": lesion, "label": label, "status": status, "sha256": sha256,
            "status_shard": f"{status}#0",
            "split": assign_split(lesion), "key": f"validated/{sha256}.jpg",
            "validated_at": "2026-11-29T06:00:00+00:00"}


def _put(items: list[dict[str, Any]]) -> None:
    with boto3.resource("dynamodb").Table("manifest").batch_writer() as batch:
        for item in items:
            batch.put_item(Item=item)


def _check(app: ModuleType) -> dict[str, Any]:
    out: dict[str, Any] = app.lambda_handler(
        {"executionName": "run-1", "request": {"trigger": {"type": "manual"}, "force": True}}, Context())
    return out


def _dataset() -> tuple[dict[str, list[dict[str, str]]], list[Any]]:
    s3 = boto3.client("s3")
    splits = {}
    for split in SPLITS:
        body = s3.get_object(Bucket="artifacts", Key=f"datasets/run-1/{split}.csv")["Body"].read().decode()
        splits[split] = list(csv.DictReader(io.StringIO(body)))
    manifest = json.loads(s3.get_object(Bucket="artifacts", Key="datasets/run-1/images.manifest")["Body"].read())
    return splits, manifest


def _background() -> list[dict[str, Any]]:
    """One image per class in every split, so that the data is enough and every split exists."""
    items = []
    for split in SPLITS:
        for c, lesion in zip(CLASSES, _lesions_in(split, len(CLASSES), f"BG_{split}"), strict=True):
            items.append(_item(f"BG_{lesion}", lesion, c, f"{lesion:0>64}"[-64:]))
    return items


# ------------------------------------------------------------------------------------------ check_data


def test_equal_sha256s_are_one_picture_in_one_split(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two items of one picture (a race let both through), under lesions that fall in train and in test.
    train_lesion, = _lesions_in("train", 1, "L")
    test_lesion, = _lesions_in("test", 1, "M")
    same = "ab" * 32
    items = [
        _item("ISIC_B", test_lesion, "mel", same),
        _item("ISIC_A", train_lesion, "mel", same),
        _item("ISIC_A2", train_lesion, "mel", "cd" * 32),  # the other picture of A's lesion
        _item("ISIC_B2", test_lesion, "mel", "ef" * 32),  # the other picture of B's lesion
        *_background(),
    ]
    _put(items)
    app = load_handler("check_data", CHECK_ENV, monkeypatch)
    out = _check(app)
    assert out["enough"] is True and out["droppedCopies"] == 1
    assert out["totalImages"] == len(items) - 1
    splits, manifest = _dataset()
    where = {row["image_id"]: split for split, rows in splits.items() for row in rows}
    assert "ISIC_B" not in where, "the copy with the larger id is dropped"
    # The picture is lesion A's and lesion B's: both lesions, every picture of them, on one side.
    assert where["ISIC_A"] == where["ISIC_A2"] == where["ISIC_B2"] == "train"
    paths = [row["path"] for rows in splits.values() for row in rows]
    assert len(paths) == len(set(paths)) == len(manifest) - 1
    assert manifest.count(f"{same}.jpg") == 1


def test_a_duplicate_item_links_the_two_lesions(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # ISIC_C is a near-duplicate of ISIC_A filed under another lesion; that lesion's other picture follows A.
    train_lesion, = _lesions_in("train", 1, "L")
    validation_lesion, = _lesions_in("validation", 1, "M")
    items = [
        _item("ISIC_A", train_lesion, "nv", "11" * 32),
        {**_item("ISIC_C", validation_lesion, "nv", "22" * 32, status="DUPLICATE"), "duplicate_of": "ISIC_A"},
        _item("ISIC_D", validation_lesion, "nv", "33" * 32),
        *_background(),
    ]
    _put(items)
    out = _check(load_handler("check_data", CHECK_ENV, monkeypatch))
    assert out["droppedCopies"] == 0
    splits, _ = _dataset()
    where = {row["image_id"]: split for split, rows in splits.items() for row in rows}
    assert "ISIC_C" not in where and where["ISIC_D"] == where["ISIC_A"] == "train"


def test_grouping_property_on_random_manifests(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    app = load_handler("check_data", CHECK_ENV, monkeypatch)
    rng = random.Random(19)
    for _ in range(200):
        shas = [f"{k:064x}" for k in range(rng.randint(1, 12))]
        lesions = [f"L{k}" for k in range(rng.randint(1, 8))]
        items = [_item(f"I{k}", rng.choice(lesions), rng.choice(CLASSES[:3]), rng.choice(shas))
                 for k in range(rng.randint(1, 25))]
        rows, dropped = app.one_row_per_picture(items, [], CLASSES)
        assert len(rows) + dropped == len(items)
        assert len({r["sha256"] for r in rows}) == len(rows) == len({i["sha256"] for i in items})
        # Every lesion and every picture of the input is in at most one split of the output.
        split_of_lesion: dict[str, str] = {}
        for item in items:
            for row in rows:
                if row["sha256"] == item["sha256"]:
                    assert split_of_lesion.setdefault(item["lesion_id"], row["split"]) == row["split"]
        assert all(r is not i for r in rows for i in items), "the items are not changed"


# ------------------------------------------------------------------------------------------ end to end


def _event(key: str, etag: str) -> dict[str, Any]:
    return {"source": "aws.s3", "detail-type": "Object Created",
            "detail": {"bucket": {"name": "data"}, "object": {"key": key, "etag": etag}}}


def _upload(app: ModuleType, key: str, data: bytes) -> dict[str, Any]:
    etag = boto3.client("s3").put_object(Bucket="data", Key=key, Body=data)["ETag"].strip('"')
    out: dict[str, Any] = app.lambda_handler(_event(key, etag), Context())
    return out


def test_uploads_to_dataset(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    validate = load_handler("validate_image", VALIDATE_ENV, monkeypatch)
    first, second, third = (p.read_bytes() for p in SAMPLE_IMAGES[:3])
    # Two different pictures with one file name, in two folders: both stay, each with its own clean object.
    out_a = _upload(validate, "incoming/site_a/nv/ISIC_9000001.jpg", first)
    out_b = _upload(validate, "incoming/site_b/mel/ISIC_9000001.jpg", second)
    assert out_a["image_id"] == "ISIC_9000001" and out_b["image_id"].startswith("ISIC_9000001-")
    assert out_a["validated_key"] != out_b["validated_key"]
    # The same picture under two names at the same moment: neither sees the other, both are VALIDATED.
    monkeypatch.setattr(validate.intake, "find_duplicate", lambda *args, **kwargs: None)
    out_c = _upload(validate, "incoming/site_a/bcc/ISIC_9000002.jpg", third)
    out_d = _upload(validate, "incoming/site_b/bcc/ISIC_9000003.jpg", third)
    assert out_c["outcome"] == out_d["outcome"] == "validated" and out_c["sha256"] == out_d["sha256"]
    _put(_background())  # enough data in every split (these items' objects are not read here)

    out = _check(load_handler("check_data", CHECK_ENV, monkeypatch))
    assert out["droppedCopies"] == 1
    splits, manifest = _dataset()
    rows = {row["image_id"]: row for split_rows in splits.values() for row in split_rows}
    assert {out_a["image_id"], out_b["image_id"], "ISIC_9000002"} <= set(rows) and "ISIC_9000003" not in rows
    assert (rows[out_a["image_id"]]["label"], rows[out_b["image_id"]]["label"]) == ("nv", "mel")
    s3 = boto3.client("s3")
    for out_x in (out_a, out_b, out_c):
        path = rows[out_x["image_id"]]["path"]
        assert path in manifest and f"validated/{path}" == out_x["validated_key"]
        assert "/" not in path, "the images channel stays flat"
        s3.head_object(Bucket="data", Key=f"validated/{path}")


def test_each_row_names_its_source(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 20: several archives in one dataset; the training job reports each source's figures from this column.
    lesion, = _lesions_in("test", 1, "S")
    items = [{**_item("ISIC_S1", lesion, "mel", "a1" * 32), "source": "isic_archive"}, *_background()]
    _put(items)
    app = load_handler("check_data", CHECK_ENV, monkeypatch)
    assert _check(app)["enough"] is True
    splits, _ = _dataset()
    rows = {row["image_id"]: row for rows in splits.values() for row in rows}
    assert rows["ISIC_S1"]["source"] == "isic_archive"
    assert rows[items[1]["image_id"]]["source"] == ""  # an item written before sources were recorded
    assert list(rows["ISIC_S1"]) == ["image_id", "path", "label", "lesion_id", "source"]
