"""Parsing every stored form of a prediction, ids, times and hour prefixes; the reference from a model archive."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from lesion_monitoring.quality import GroundTruthFormatError, parse_ground_truth, quality_metrics
from lesion_monitoring.records import (
    IMAGE_FIELDS,
    ReadStats,
    RecordFormatError,
    hour_prefixes,
    hours_between,
    parse_line,
    parse_lines,
)
from lesion_monitoring.reference import ReferenceNotFoundError, load_reference
from tests.monitoring import synthetic as sy
from tests.monitoring.realdata import CLASSES, capture_records

WORLD = sy.World()
REFERENCE = WORLD.reference(200)
RECORDS = capture_records(WORLD.sample(3, seed=1), REFERENCE, model_version="4",
                          timestamp="2026-11-29T10:15:00.000Z")


def test_data_capture_json_and_base64_give_the_same_predictions() -> None:
    plain = parse_line(sy.data_capture_line(RECORDS[:2], "case-17", "2026-11-29T10:15:00Z"))
    b64 = parse_line(sy.data_capture_line(RECORDS[:2], "case-17", "2026-11-29T10:15:00Z", encoding="BASE64"))
    assert plain == b64 and len(plain) == 2
    first, second = plain
    assert (first.inference_id, second.inference_id) == ("case-17", "case-17#1")
    assert first.event_id and second.event_id == first.event_id + "#1"
    assert first.time == datetime(2026, 11, 29, 10, 15, tzinfo=UTC) and first.model_version == "4"
    r = RECORDS[0]
    assert first.predicted_class == r["predicted_class"] and first.confidence == r["confidence"]
    assert first.melanoma_at_risk is r["melanoma"]["at_risk"] and first.ood_flag is False
    assert first.pca == tuple(r["embedding"]["pca"]) and first.norm == r["embedding"]["norm"]
    assert first.image == tuple(r["image"][k] for k in IMAGE_FIELDS)


def test_container_record_and_answer_forms() -> None:
    from_record = parse_line(json.dumps(RECORDS[1]))[0]
    from_capture = parse_line(sy.data_capture_line([RECORDS[1]], RECORDS[1]["inference_id"],
                                                   RECORDS[1]["timestamp"]))[0]
    assert from_record.pca == from_capture.pca and from_record.image == from_capture.image
    assert from_record.inference_id == from_capture.inference_id and from_record.event_id == "req-img-1-1"
    answer = sy.answer_for(RECORDS, with_monitoring=False)
    preds = parse_line(json.dumps(answer))
    assert [p.predicted_class for p in preds] == [r["predicted_class"] for r in RECORDS]
    assert all(p.pca is None and p.image is None for p in preds)  # still counts for the class test
    second = dict(RECORDS[2], index=1, inference_id="multi")
    assert parse_line(json.dumps(second))[0].inference_id == "multi#1"


@pytest.mark.parametrize("line", [
    "not json", "[1, 2]", '{"foo": 1}', '{"captureData": {"endpointInput": {}}}',
    '{"captureData": {"endpointOutput": {"data": "!!", "encoding": "BASE64"}}}',
    '{"predictions": [{"confidence": 0.5}]}', '{"predictions": "x"}',
])
def test_malformed_lines_are_refused(line: str) -> None:
    with pytest.raises(RecordFormatError):
        parse_line(line)


def test_parse_lines_counts_and_filters_by_time() -> None:
    lines = [json.dumps(dict(RECORDS[0], timestamp="2026-11-29T08:59:59Z")), json.dumps(RECORDS[1]), "", "{bad",
             json.dumps({"model_version": "4", "error": "invalid_json", "status": 400})]
    stats = ReadStats()
    kept = parse_lines(lines, stats, "f", datetime(2026, 11, 29, 9, tzinfo=UTC), datetime(2026, 11, 29, 11, tzinfo=UTC))
    assert len(kept) == 1 and stats.outside_window == 1 and stats.bad_lines == 1 and stats.lines == 4
    assert stats.bad_examples == ["f:4: not JSON"]


def test_hours_and_prefixes() -> None:
    start, end = datetime(2026, 11, 29, 22, 30, tzinfo=UTC), datetime(2026, 11, 30, 1, 0, tzinfo=UTC)
    assert [h.hour for h in hours_between(start, end)] == [22, 23, 0]
    assert hour_prefixes("capture/ep/AllTraffic", datetime(2026, 1, 2, 3, tzinfo=UTC)) == (
        "capture/ep/AllTraffic/2026/01/02/03/", "capture/ep/AllTraffic/capture-20260102T03")


def test_reference_from_model_archive_is_streamed_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        s3, sm = boto3.client("s3"), boto3.client("sagemaker")
        s3.create_bucket(Bucket="models")
        s3.put_object(Bucket="models", Key="m/model.tar.gz", Body=sy.model_tar(REFERENCE))
        ref = load_reference(s3, sm, group="g", override_uri="s3://models/m/model.tar.gz", cache_dir=tmp_path)
        assert ref.document == REFERENCE and len(list(tmp_path.glob("reference-*.json"))) == 1
        s3.delete_object(Bucket="models", Key="m/model.tar.gz")
        with pytest.raises(ReferenceNotFoundError):  # the object is gone: its ETag cannot be read
            load_reference(s3, sm, group="g", override_uri="s3://models/m/model.tar.gz", cache_dir=tmp_path)
        s3.put_object(Bucket="models", Key="m/empty.tar.gz", Body=sy.model_tar({"other": 1}))
        with pytest.raises(ReferenceNotFoundError, match="not a reference_stats.json"):
            load_reference(s3, sm, group="g", override_uri="s3://models/m/empty.tar.gz", cache_dir=tmp_path)
        s3.put_object(Bucket="models", Key="m/garbage.tar.gz", Body=base64.b64encode(b"x" * 100))
        with pytest.raises(ReferenceNotFoundError, match="unreadable"):
            load_reference(s3, sm, group="g", override_uri="s3://models/m/garbage.tar.gz", cache_dir=tmp_path)


def test_ground_truth_parsing_and_metrics() -> None:
    gt = parse_ground_truth("\ufeffInference_ID,Diagnosis,inference_time\na,MEL,2026-11-29T10:00:00Z\nb,nv,\n"
                            "a,bkl,\n,nv,\nc,unk,\n", CLASSES)
    assert gt.labels == {"a": "bkl", "b": "nv"} and gt.rows == 5 and gt.rejected == 2 and len(gt.times) == 1
    with pytest.raises(GroundTruthFormatError):
        parse_ground_truth("", CLASSES)
    rows = [{"truth": "mel", "predicted_class": "nv", "melanoma_at_risk": True},
            {"truth": "mel", "predicted_class": "mel", "melanoma_at_risk": False},
            {"truth": "mel", "predicted_class": "mel", "melanoma_at_risk": None},
            {"truth": "nv", "predicted_class": "nv", "melanoma_at_risk": False}]
    q = quality_metrics(rows, CLASSES)
    # mel recall 2/3, nv recall 1 -> balanced 5/6; found melanomas: flag, no flag, fallback to the class -> 2/3.
    assert q["balanced_accuracy"] == pytest.approx(5 / 6) and q["melanoma_sensitivity"] == pytest.approx(2 / 3)
    assert q["accuracy"] == pytest.approx(3 / 4) and q["melanoma_cases"] == 3
