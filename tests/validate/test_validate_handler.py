"""The validate_image handler end to end on a moto account: S3 layout, manifest items, idempotency."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from botocore.exceptions import ClientError
from PIL import Image

from lesion_common.errors import InvalidRequestError
from lesion_common.splits import assign_split

from .helpers import (
    BUCKET,
    REPO,
    SAMPLE,
    Cloud,
    decode,
    encode,
    jpeg_markers,
    negatives_rows,
    object_created,
    sample_image_paths,
)
from .test_validate_imaging import EXPECTED

REASON_FIELDS = {"reason_code", "message", "source_key", "size", "checked_at"}
# Files among the negatives made from one image (ISIC_0024306): the same picture, so one counts, the rest are
# near duplicates. The rotated one is not among them: pHash is not rotation-invariant (documented limit).
SAME_PICTURE = {"odd_png_named_jpg", "odd_cmyk", "odd_rgba", "odd_progressive", "odd_huge_4000x3000",
                "odd_palette", "odd_gray16"}


def sample(index: int) -> tuple[str, bytes]:
    path = sample_image_paths()[index]
    return path.stem, path.read_bytes()


def clean_body(cloud: Cloud, image_id: str) -> bytes:
    """The clean copy an item points at, checked to be at its content-derived key."""
    item = cloud.item(image_id)
    assert item is not None and item["key"] == f"validated/{item['sha256']}.jpg", item
    return cloud.body(item["key"])


def assert_quarantined(cloud: Cloud, key: str, data: bytes, code: str) -> dict[str, Any]:
    qkey = "quarantine/" + key.removeprefix("incoming/")
    assert cloud.body(key) == data, "the upload must stay as it was"
    assert cloud.body(qkey) == data, "the quarantine copy must be the upload"
    reason = json.loads(cloud.body(qkey + ".reason.json"))
    assert set(reason) >= REASON_FIELDS
    assert (reason["reason_code"], reason["source_key"], reason["size"]) == (code, key, len(data))
    return dict(reason)


# ------------------------------------------------------------------------------------------ negatives


def test_every_negative_through_the_handler(cloud: Cloud, negatives: Path) -> None:
    outcomes = {}
    for row in negatives_rows():
        key = f"incoming/negatives/{row['file']}"
        data = (negatives / row["file"]).read_bytes()
        outcomes[row["file"]] = cloud.upload(key, data)

    items = cloud.items()
    for name, outcome in outcomes.items():
        key = f"incoming/negatives/{name}"
        data = (negatives / name).read_bytes()
        image_id = Path(name).stem
        item = items[image_id]
        expected = EXPECTED[name]
        assert cloud.body(key) == data, "nothing is lost: the upload stays"
        if expected is None:
            assert outcome["outcome"] in ("validated", "duplicate"), (name, outcome)
            assert item["status"] in ("VALIDATED", "DUPLICATE")
            clean = clean_body(cloud, image_id)
            assert decode(clean).mode == "RGB"
            assert item["source_key"] == key
            assert int(item["bytes"]) == len(clean) and item["source"] == "negatives"
            assert not any(k.startswith(f"quarantine/negatives/{name}") for k in cloud.keys("quarantine/"))
        else:
            assert outcome["outcome"] == "quarantined" and outcome["reason_code"] == expected, (name, outcome)
            assert_quarantined(cloud, key, data, expected)
            assert item["status"] == "QUARANTINED" and item["reason_code"] == expected
            assert "key" not in item
    assert (int(items["odd_exif_rotate90"]["width"]), int(items["odd_exif_rotate90"]["height"])) == (450, 600)
    statuses = {n: items[n]["status"] for n in SAME_PICTURE}
    assert sorted(statuses.values()).count("VALIDATED") == 1, statuses
    original = next(n for n, s in statuses.items() if s == "VALIDATED")
    assert all(items[n]["duplicate_of"] == original for n, s in statuses.items() if s == "DUPLICATE")


# ------------------------------------------------------------------------------------------ real images


def test_real_images_are_validated_clean_and_split(cloud: Cloud) -> None:
    for index in range(12):
        image_id, data = sample(index)
        outcome = cloud.upload(f"incoming/ham10000/{image_id}.jpg", data)
        assert outcome["outcome"] == "validated", outcome
        item = cloud.item(image_id)
        assert item is not None
        assert item["status"] == "VALIDATED" and item["label_set"] == "ham7" and item["source"] == "ham10000"
        assert item["lesion_id"] == image_id and item["split"] == assign_split(image_id)
        assert "label" not in item and "duplicate_of" not in item
        assert item["validated_at"].endswith("+00:00") and len(item["sha256"]) == 64
        clean = clean_body(cloud, image_id)
        assert all(not (0xE1 <= m <= 0xEF or m == 0xFE) for m in jpeg_markers(clean))
    assert len(cloud.items()) == 12


def test_metadata_never_reaches_validated(cloud: Cloud) -> None:
    from PIL import ExifTags

    image_id, data = sample(20)
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 12.5)
    exif[ExifTags.Base.ImageDescription] = "Jane Doe"
    tagged = encode(Image.open(io.BytesIO(data)), "JPEG", quality=95, exif=exif.tobytes(), comment=b"Jane Doe")
    assert cloud.upload(f"incoming/clinic/{image_id}.jpg", tagged)["outcome"] == "validated"
    clean = clean_body(cloud, image_id)
    assert b"Jane" not in clean and b"Exif" not in clean and len(decode(clean).getexif()) == 0


def test_label_from_the_folder(cloud: Cloud) -> None:
    a, data_a = sample(30)
    b, data_b = sample(31)
    c, data_c = sample(32)
    assert cloud.upload(f"incoming/batch1/mel/{a}.jpg", data_a)["label"] == "mel"
    assert cloud.upload(f"incoming/batch1/NV/{b}.jpg", data_b)["label"] == "nv"
    assert "label" not in cloud.upload(f"incoming/batch1/misc/{c}.jpg", data_c)
    items = cloud.items()
    assert items[a]["label"] == "mel" and items[b]["label"] == "nv" and "label" not in items[c]
    # A class code of the other label set is a label this deployment cannot train on.
    d, data_d = sample(33)
    out = cloud.upload(f"incoming/batch1/scc/{d}.jpg", data_d)
    assert out["outcome"] == "quarantined" and out["reason_code"] == "label_not_in_label_set"
    assert_quarantined(cloud, f"incoming/batch1/scc/{d}.jpg", data_d, "label_not_in_label_set")
    assert cloud.item(d)["status"] == "QUARANTINED"  # type: ignore[index]


# ------------------------------------------------------------------------------------------ idempotency


def test_the_same_event_twice_leaves_one_record(cloud: Cloud) -> None:
    image_id, data = sample(40)
    event = cloud.put(f"incoming/ham10000/{image_id}.jpg", data)
    first = cloud.invoke(event)
    item = cloud.item(image_id)
    second = cloud.invoke(event)
    assert first["outcome"] == "validated" and second["outcome"] == "unchanged"
    assert cloud.items() == {image_id: item}
    assert cloud.keys() == [f"incoming/ham10000/{image_id}.jpg", item["key"]]  # type: ignore[index]


def test_the_same_bad_event_twice_leaves_one_record(cloud: Cloud) -> None:
    key = "incoming/ham10000/ISIC_9999999.jpg"
    event = cloud.put(key, b"not an image")
    assert cloud.invoke(event)["outcome"] == "quarantined"
    assert cloud.invoke(event)["outcome"] == "unchanged"
    assert list(cloud.items()) == ["ISIC_9999999"]
    assert cloud.keys("quarantine/") == ["quarantine/ham10000/ISIC_9999999.jpg",
                                         "quarantine/ham10000/ISIC_9999999.jpg.reason.json"]


def test_the_same_image_under_two_folders_is_one_record(cloud: Cloud) -> None:
    image_id, data = sample(41)
    cloud.upload(f"incoming/a/{image_id}.jpg", data)
    out = cloud.upload(f"incoming/b/nv/{image_id}.jpg", data)
    assert out["outcome"] == "validated"  # not a duplicate of itself
    assert list(cloud.items()) == [image_id]
    assert cloud.item(image_id)["label"] == "nv"  # type: ignore[index]


def test_exact_and_near_duplicates_are_recorded_not_counted(cloud: Cloud) -> None:
    image_id, data = sample(42)
    cloud.upload(f"incoming/ham10000/{image_id}.jpg", data)
    exact = cloud.upload("incoming/other/COPY_1.jpg", data)
    im = Image.open(io.BytesIO(data)).convert("RGB")
    reencoded = cloud.upload("incoming/other/COPY_2.png", encode(im.resize((300, 225)), "PNG"))
    darker = cloud.upload("incoming/other/COPY_3.jpg", encode(im.point(lambda x: int(x * 0.95)), "JPEG", quality=80))
    different = cloud.upload("incoming/other/OTHER_1.jpg", sample(43)[1])
    assert (exact["outcome"], exact["duplicate_of"], exact["duplicate_distance"]) == ("duplicate", image_id, 0)
    assert reencoded["outcome"] == "duplicate" and reencoded["duplicate_of"] == image_id
    assert darker["outcome"] == "duplicate" and darker["duplicate_of"] == image_id
    assert different["outcome"] == "validated"
    items = cloud.items()
    assert {k for k, i in items.items() if i["status"] == "VALIDATED"} == {image_id, "OTHER_1"}
    assert {items[k]["duplicate_of"] for k in ("COPY_1", "COPY_2", "COPY_3")} == {image_id}
    # What check_data reads (every VALIDATED shard of the by-status-shard index) holds each picture once.
    found = []
    for shard in range(cloud.app.STATUS_SHARDS):
        resp = cloud.ddb.query(TableName=cloud.app.MANIFEST_TABLE, IndexName="by-status-shard",
                               KeyConditionExpression="#s = :v", ExpressionAttributeNames={"#s": "status_shard"},
                               ExpressionAttributeValues={":v": {"S": f"VALIDATED#{shard}"}})
        found += [i["image_id"]["S"] for i in resp["Items"]]
    assert sorted(found) == sorted([image_id, "OTHER_1"])


def test_reupload_of_a_duplicate_that_became_unique(cloud: Cloud) -> None:
    image_id, data = sample(44)
    cloud.upload(f"incoming/x/{image_id}.jpg", data)
    assert cloud.upload("incoming/x/COPY.jpg", data)["outcome"] == "duplicate"
    other = sample(45)[1]
    assert cloud.upload("incoming/x/COPY.jpg", other)["outcome"] == "validated"  # the file replaced: same id
    item = cloud.item("COPY")
    assert item is not None and item["status"] == "VALIDATED" and "duplicate_of" not in item


def test_different_lesions_are_not_duplicates(cloud: Cloud, ham_images: Path) -> None:
    # 2 bits apart under the classic 64-bit pHash, yet different lesions; and one real cross-lesion duplicate.
    for name in ("ISIC_0024326", "ISIC_0029416", "ISIC_0025226", "ISIC_0030074"):
        cloud.upload(f"incoming/ham10000/{name}.jpg", (ham_images / f"{name}.jpg").read_bytes())
    items = cloud.items()
    assert items["ISIC_0024326"]["status"] == items["ISIC_0029416"]["status"] == "VALIDATED"
    assert items["ISIC_0030074"]["status"] == "DUPLICATE" and items["ISIC_0030074"]["duplicate_of"] == "ISIC_0025226"


def test_a_bad_reupload_does_not_remove_a_good_image(cloud: Cloud) -> None:
    image_id, data = sample(46)
    cloud.upload(f"incoming/a/{image_id}.jpg", data)
    before = cloud.item(image_id)
    bad = data[: len(data) // 2]
    out = cloud.upload(f"incoming/a/{image_id}.jpg", bad)  # the same file, replaced by a broken one
    assert out["outcome"] == "quarantined" and out["manifest_updated"] is False
    assert cloud.item(image_id) == before
    assert_quarantined(cloud, f"incoming/a/{image_id}.jpg", bad, "truncated_image")
    # The same name in another folder is another upload: its own record, and the good one stays.
    out = cloud.upload(f"incoming/b/{image_id}.jpg", bad)
    assert out["outcome"] == "quarantined" and out["manifest_updated"] is True
    assert out["image_id"] == f"{image_id}-{hashlib.sha256(bad).hexdigest()[:12]}"
    assert cloud.item(image_id) == before
    assert cloud.item(out["image_id"])["status"] == "QUARANTINED"  # type: ignore[index]


def test_a_good_reupload_replaces_a_quarantined_one(cloud: Cloud) -> None:
    image_id, data = sample(47)
    cloud.upload(f"incoming/a/{image_id}.jpg", data[:100])
    assert cloud.item(image_id)["status"] == "QUARANTINED"  # type: ignore[index]
    cloud.upload(f"incoming/a/{image_id}.jpg", data)
    item = cloud.item(image_id)
    assert item is not None and item["status"] == "VALIDATED"
    assert not {"reason_code", "reason", "quarantine_key"} & set(item)


def test_two_pictures_with_one_file_name_are_both_kept(cloud: Cloud) -> None:
    # Issue 19: the second overwrote the first in validated/ and in the manifest, and a redelivered event
    # swapped them back. Each picture now has its own item and its own content-derived object.
    name = "ISIC_5555555"
    (_, first), (_, second) = sample(70), sample(71)
    event_a = cloud.put(f"incoming/site_a/{name}.jpg", first)
    event_b = cloud.put(f"incoming/site_b/{name}.jpg", second)
    out_a, out_b = cloud.invoke(event_a), cloud.invoke(event_b)
    other = f"{name}-{hashlib.sha256(second).hexdigest()[:12]}"
    assert (out_a["outcome"], out_a["image_id"]) == ("validated", name)
    assert (out_b["outcome"], out_b["image_id"], out_b["file_name_taken_by"]) == ("validated", other, name)
    before = cloud.items()
    assert {k: i["status"] for k, i in before.items()} == {name: "VALIDATED", other: "VALIDATED"}
    assert before[name]["key"] != before[other]["key"]
    assert np.array_equal(np.asarray(decode(clean_body(cloud, name))), np.asarray(decode(first)))
    assert np.array_equal(np.asarray(decode(clean_body(cloud, other))), np.asarray(decode(second)))
    for event in (event_a, event_b, event_a, event_b):  # redelivered, in any order: nothing moves
        assert cloud.invoke(event)["outcome"] == "unchanged"
    assert cloud.items() == before
    assert len(cloud.keys("validated/")) == 2


def test_two_pictures_with_one_file_name_at_the_same_moment(cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both read "no item yet"; the conditional write lets only one take the name, the other takes its own id.
    name = "ISIC_5555556"
    (_, first), (_, second) = sample(72), sample(73)
    event_a = cloud.put(f"incoming/site_a/{name}.jpg", first)
    event_b = cloud.put(f"incoming/site_b/{name}.jpg", second)
    real = cloud.app.intake.find_duplicate
    calls: list[str] = []

    def interleaved(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[2])
        if len(calls) == 1:  # b has resolved its id and validated; a is recorded before b writes
            assert cloud.invoke(event_a)["image_id"] == name
        return real(*args, **kwargs)

    monkeypatch.setattr(cloud.app.intake, "find_duplicate", interleaved)  # the image flow's module
    out_b = cloud.invoke(event_b)
    other = f"{name}-{hashlib.sha256(second).hexdigest()[:12]}"
    assert calls == [name, name, other] and out_b["image_id"] == other
    items = cloud.items()
    assert items[name]["source_key"] == f"incoming/site_a/{name}.jpg"
    assert items[other]["source_key"] == f"incoming/site_b/{name}.jpg"
    assert {i["status"] for i in items.values()} == {"VALIDATED"}


def test_a_bad_picture_with_a_taken_file_name_at_the_same_moment(cloud: Cloud,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name = "ISIC_5555557"
    good, bad = sample(74)[1], b"not an image"
    event_good = cloud.put(f"incoming/site_a/{name}.jpg", good)
    event_bad = cloud.put(f"incoming/site_b/{name}.jpg", bad)
    real = cloud.app.intake.quarantine

    def interleaved(*args: Any, **kwargs: Any) -> Any:
        assert cloud.invoke(event_good)["image_id"] == name
        return real(*args, **kwargs)

    monkeypatch.setattr(cloud.app.intake, "quarantine", interleaved)
    out = cloud.invoke(event_bad)
    assert out["outcome"] == "quarantined" and out["manifest_updated"] is True
    assert out["image_id"] == f"{name}-{hashlib.sha256(bad).hexdigest()[:12]}"
    items = cloud.items()
    assert items[name]["status"] == "VALIDATED" and items[out["image_id"]]["status"] == "QUARANTINED"


# ------------------------------------------------------------------------------------------ CSVs


def ham_csv(rows: list[tuple[str, str, str]]) -> bytes:
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    lines += [f"{lesion},{image},{dx},histo,50.0,male,back" for lesion, image, dx in rows]
    return ("\n".join(lines) + "\n").encode()


def test_ham_csv_before_and_after_the_image(cloud: Cloud) -> None:
    (a, data_a), (b, data_b) = sample(50), sample(51)
    # a: CSV first, then image. b: image first, then CSV. Both must end identical in their fields.
    cloud.upload("incoming/ham10000/part1.csv", ham_csv([("HAM_A", a, "mel")]))
    item_a = cloud.item(a)
    assert item_a is not None and item_a["status"] == "LABEL_ONLY"
    assert (item_a["label"], item_a["lesion_id"], item_a["split"]) == ("mel", "HAM_A", assign_split("HAM_A"))
    cloud.upload(f"incoming/ham10000/{a}.jpg", data_a)
    cloud.upload(f"incoming/ham10000/{b}.jpg", data_b)
    assert cloud.item(b)["split"] == assign_split(b)  # type: ignore[index]
    cloud.upload("incoming/ham10000/part2.csv", ham_csv([("HAM_B", b, "bcc")]))
    after = cloud.items()
    cloud.upload("incoming/ham10000/part1.csv", ham_csv([("HAM_A", a, "mel")]))  # the same file again: no change
    assert cloud.items() == after
    for image_id, lesion, label in ((a, "HAM_A", "mel"), (b, "HAM_B", "bcc")):
        item = cloud.item(image_id)
        assert item is not None
        assert item["status"] == "VALIDATED"
        assert (item["label"], item["lesion_id"], item["split"]) == (label, lesion, assign_split(lesion))
        assert item["key"] == f"validated/{item['sha256']}.jpg"


def test_bundled_ham_csv_applies_every_row(cloud: Cloud) -> None:
    data = (SAMPLE / "HAM10000_metadata.csv").read_bytes()
    n = len(data.decode().strip().splitlines()) - 1
    assert n > 100
    out = cloud.upload("incoming/ham10000/HAM10000_metadata.csv", data)
    assert (out["outcome"], out["rows"], out["applied"], out["skipped"]) == ("labels", n, n, {})
    items = cloud.items()
    assert len(items) == n and {i["status"] for i in items.values()} == {"LABEL_ONLY"}
    assert all(i["split"] == assign_split(i["lesion_id"]) for i in items.values())
    assert not cloud.keys("quarantine/")


def test_isic_csv_with_rejected_rows(cloud: Cloud) -> None:
    image_id, data = sample(52)
    cloud.upload(f"incoming/isic2019/{image_id}.jpg", data)
    text = (
        "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
        f"{image_id},0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_0000001,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_0000002,0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_0000003,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0\n"
    ).encode()
    key = "incoming/isic2019/ISIC_2019_Training_GroundTruth.csv"
    out = cloud.upload(key, text)
    assert out["applied"] == 3 and out["skipped"] == {"unk": 1}
    items = cloud.items()
    assert items[image_id]["status"] == "VALIDATED" and items[image_id]["label"] == "bcc"
    assert items[image_id]["lesion_id"] == image_id  # the ISIC format has no lesion: kept as it was
    assert items["ISIC_0000001"]["status"] == "LABEL_ONLY"
    assert items["ISIC_0000002"]["label"] == "akiec"  # ISIC's AK is ham7's akiec
    reason = assert_quarantined(cloud, key, text, "rows_rejected")
    assert [(r["line"], r["reason"]) for r in reason["rejected_rows"]] == [(5, "unk")]


def test_one_bad_cell_costs_its_row_not_the_file(cloud: Cloud) -> None:
    # Issue 19: a stray quote made csv read the rest of the file as one field, over csv's 128 KiB limit: the
    # handler raised, Lambda retried, and every label was lost with nothing in quarantine/.
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    long_site = "back " * 200  # a legitimate long cell, so that few rows exceed the csv field limit
    lines += [f"HAM_{i:04d},ISIC_{i:07d},{('mel', 'nv', 'bcc')[i % 3]},histo,50.0,male,{long_site}"
              for i in range(160)]
    lines[11] = 'HAM_0010,ISIC_0000010,"nv,histo,50.0,male,back'  # the stray quote
    lines[21] = "HAM_0020,ISIC_0000020,nv,histo,50.0,male,back,extra"  # too many cells
    lines[31] = "HAM_0030,ISIC_0000030,nv"  # too few
    lines[41] = "HAM_0040,ISIC_0000040,melanoma,histo,50.0,male,back"  # not a class code
    data = ("\n".join(lines) + "\n").encode()
    assert len(data) > csv.field_size_limit()
    key = "incoming/ham10000/labels.csv"
    out = cloud.upload(key, data)
    assert (out["outcome"], out["rows"], out["applied"]) == ("labels", 160, 156)
    assert out["skipped"] == {"malformed_quoting": 1, "malformed_row": 2, "unknown_label": 1}
    reason = assert_quarantined(cloud, key, data, "rows_rejected")
    assert [(r["line"], r["reason"]) for r in reason["rejected_rows"]] == [
        (12, "malformed_quoting"), (22, "malformed_row"), (32, "malformed_row"), (42, "unknown_label")]
    assert (reason["applied_rows"], reason["rejected_row_count"]) == (156, 4)
    items = cloud.items()
    assert len(items) == 156 and not {"ISIC_0000010", "ISIC_0000020", "ISIC_0000030", "ISIC_0000040"} & set(items)
    assert items["ISIC_0000011"]["label"] == "bcc" and items["ISIC_0000159"]["lesion_id"] == "HAM_0159"


def test_duplicate_header_names_quarantine_the_whole_file(cloud: Cloud) -> None:
    data = b"lesion_id,image_id,dx,dx_type,dx\nHAM_1,ISIC_0000001,nv,histo,mel\n"
    out = cloud.upload("incoming/ham10000/labels.csv", data)
    assert out == {"outcome": "quarantined", "key": "incoming/ham10000/labels.csv", "reason_code": "duplicate_columns"}
    reason = assert_quarantined(cloud, "incoming/ham10000/labels.csv", data, "duplicate_columns")
    assert "'dx'" in reason["message"]
    assert cloud.items() == {}


def test_a_byte_order_mark_is_read_as_nothing(cloud: Cloud) -> None:
    data = b"\xef\xbb\xbf" + ham_csv([("HAM_1", "ISIC_0000001", "nv")]).replace(b"\n", b"\r\n")
    out = cloud.upload("incoming/ham10000/labels.csv", data)
    assert (out["outcome"], out["applied"], out["skipped"]) == ("labels", 1, {})
    assert cloud.item("ISIC_0000001")["label"] == "nv"  # type: ignore[index]
    assert not cloud.keys("quarantine/")


@pytest.mark.parametrize(
    ("content", "code"),
    [(b"a,b,c\n1,2,3\n", "unknown_csv_format"), (b"\xff\xfe\x00bad", "invalid_csv"), (b"", "unknown_csv_format")],
)
def test_unusable_csvs_are_quarantined(cloud: Cloud, content: bytes, code: str) -> None:
    out = cloud.upload("incoming/x/labels.csv", content)
    assert out["outcome"] == "quarantined" and out["reason_code"] == code
    assert_quarantined(cloud, "incoming/x/labels.csv", content, code)
    assert cloud.items() == {}


# ------------------------------------------------------------------------------------------ routing and errors


@pytest.mark.parametrize("key", ["validated/ISIC_1.jpg", "quarantine/x/ISIC_1.jpg", "other/ISIC_1.jpg",
                                 "incoming/folder/", "incomingISIC_1.jpg"])
def test_keys_outside_incoming_are_a_no_op(cloud: Cloud, key: str) -> None:
    event = cloud.put(key, sample(0)[1])
    assert cloud.invoke(event) == {"outcome": "ignored", "key": key}
    assert cloud.keys() == [key] and cloud.items() == {}


def test_other_buckets_and_malformed_events(cloud: Cloud) -> None:
    assert cloud.invoke(object_created("incoming/x/ISIC_1.jpg", 10, None, bucket="someone-else"))["outcome"] == (
        "ignored"
    )
    bad = object_created("incoming/x/ISIC_1.jpg", 10, None)
    bad["detail-type"] = "Object Deleted"
    with pytest.raises(InvalidRequestError):
        cloud.invoke(bad)
    with pytest.raises(InvalidRequestError):
        cloud.invoke({"source": "aws.s3"})


def test_gone_and_replaced_uploads(cloud: Cloud) -> None:
    image_id, data = sample(60)
    key = f"incoming/x/{image_id}.jpg"
    event = object_created(key, len(data), None)
    assert cloud.invoke(event)["outcome"] == "gone"  # deleted before we got to it
    stale = cloud.put(key, data)
    cloud.put(key, sample(61)[1])  # replaced: the stale event must not validate the new bytes under its name
    assert cloud.invoke(stale)["outcome"] == "gone"
    assert cloud.items() == {} and not cloud.keys("validated/")


def test_url_encoded_keys(cloud: Cloud) -> None:
    image_id, data = sample(62)
    real_key = f"incoming/my batch/{image_id}.jpg"
    event = cloud.put(real_key, data)
    event["detail"]["object"]["key"] = f"incoming/my+batch/{image_id}.jpg"
    out = cloud.invoke(event)
    assert out["outcome"] == "validated" and out["key"] == real_key


def test_unusable_image_ids_are_quarantined_without_a_record(cloud: Cloud) -> None:
    key = "incoming/x/bad name (1).jpg"
    out = cloud.upload(key, sample(63)[1])
    assert out["outcome"] == "quarantined" and out["reason_code"] == "invalid_image_id"
    assert_quarantined(cloud, key, sample(63)[1], "invalid_image_id")
    assert cloud.items() == {}


def test_oversized_uploads_are_not_downloaded(cloud: Cloud, app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    small = dataclasses.replace(app.SETTINGS, limits=dataclasses.replace(app.SETTINGS.limits, max_bytes=1000))
    monkeypatch.setattr(app, "SETTINGS", small)
    image_id, data = sample(64)
    out = cloud.upload(f"incoming/x/{image_id}.jpg", data)
    assert out["reason_code"] == "file_too_large"
    assert_quarantined(cloud, f"incoming/x/{image_id}.jpg", data, "file_too_large")


def test_unexpected_aws_errors_propagate(cloud: Cloud, app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    image_id, data = sample(65)
    event = cloud.put(f"incoming/x/{image_id}.jpg", data)

    def broken(**kwargs: Any) -> None:
        raise ClientError({"Error": {"Code": "InternalError", "Message": "boom"}}, "PutObject")

    monkeypatch.setattr(app.s3, "put_object", broken)
    with pytest.raises(ClientError):
        cloud.invoke(event)
    monkeypatch.undo()
    cloud.ddb.delete_table(TableName=app.MANIFEST_TABLE)
    with pytest.raises(ClientError, match="ResourceNotFound"):
        cloud.invoke(event)


def test_the_sample_event_file(cloud: Cloud, ham_images: Path) -> None:
    event = json.loads((REPO / "events" / "validate_image" / "object_created.json").read_text())
    assert event["detail"]["bucket"]["name"] == BUCKET
    data = (ham_images / "ISIC_0024306.jpg").read_bytes()
    cloud.s3.put_object(Bucket=BUCKET, Key=event["detail"]["object"]["key"], Body=data)
    out = cloud.invoke(event)  # its etag is that file's: the event matches the object
    assert out["outcome"] == "validated" and out["image_id"] == "ISIC_0024306"
    assert np.asarray(decode(clean_body(cloud, "ISIC_0024306"))).shape == (150, 200, 3)


def test_versioned_bucket_events_are_pinned_to_their_version(cloud: Cloud) -> None:
    # The deployed bucket is versioned: an event names a version, and that version is what gets checked and
    # quarantined, even after the key was overwritten (the newer version has its own event).
    cloud.s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    key = "incoming/x/ISIC_7777777.jpg"
    bad = b"not an image at all"
    v1 = cloud.s3.put_object(Bucket=BUCKET, Key=key, Body=bad)["VersionId"]
    image_id, good = sample(66)
    v2 = cloud.s3.put_object(Bucket=BUCKET, Key=key, Body=good)["VersionId"]
    event = object_created(key, len(bad), None)
    event["detail"]["object"]["version-id"] = v1
    out = cloud.invoke(event)
    assert out["outcome"] == "quarantined" and out["reason_code"] == "unsupported_format"
    assert cloud.body("quarantine/x/ISIC_7777777.jpg") == bad
    event["detail"]["object"]["version-id"] = v2
    assert cloud.invoke(event)["outcome"] == "validated"
    assert cloud.item("ISIC_7777777")["status"] == "VALIDATED"  # type: ignore[index]
    assert image_id != "ISIC_7777777"


def test_isic_training_metadata_sets_lesions_and_splits(cloud: Cloud) -> None:
    image_id, data = sample(53)
    cloud.upload(f"incoming/isic2019/{image_id}.jpg", data)
    assert cloud.items()[image_id]["lesion_id"] == image_id  # no lesion known yet
    lesion = "MSK4_0011173"
    text = ("image,age_approx,anatom_site_general,lesion_id,sex\n"
            f"{image_id},45.0,lower extremity,{lesion},male\n"
            "ISIC_0000009,55.0,anterior torso,,female\n"  # no lesion: nothing to set
            "ISIC_0000010,60.0,back,BCN_0000001,male\n").encode()
    out = cloud.upload("incoming/isic2019/ISIC_2019_Training_Metadata.csv", text)
    assert out["lesions_applied"] == 2 and out["skipped"] == {}
    items = cloud.items()
    assert (items[image_id]["lesion_id"], items[image_id]["split"]) == (lesion, assign_split(lesion))
    assert items[image_id]["status"] == "VALIDATED"  # the picture's record is kept
    assert items["ISIC_0000010"]["status"] == "LABEL_ONLY" and "label" not in items["ISIC_0000010"]
    assert "ISIC_0000009" not in items


def test_an_unmapped_archive_diagnosis_is_reported_by_name(cloud: Cloud) -> None:
    text = (b"isic_id,diagnosis_1,diagnosis_2,diagnosis_3,lesion_id\n"
            b"ISIC_0000011,Benign,Benign melanocytic proliferations,Nevus,IL_1\n"
            b"ISIC_0000012,Benign,Benign soft tissue proliferations - Fibro-histiocytic,Scar,IL_2\n")
    key = "incoming/archive/metadata.csv"
    out = cloud.upload(key, text)
    assert out["applied"] == 1 and out["skipped"] == {"unmapped_diagnosis": 1}
    reason = assert_quarantined(cloud, key, text, "rows_rejected")
    assert reason["rejected_rows"] == [{"line": 3, "image_id": "ISIC_0000012", "reason": "unmapped_diagnosis",
                                        "detail": "Scar"}]
