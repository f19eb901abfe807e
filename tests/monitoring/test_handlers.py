"""detect_drift and evaluate_quality against moto: capture files in S3 -> CloudWatch metrics, skips, the join."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import boto3
import pytest
from moto import mock_aws

from tests.monitoring import synthetic as sy
from tests.monitoring.realdata import capture_records
from tests.unit.handlers import Context, load_handler

NAMESPACE = "SkinLesion/Monitoring"
CAPTURE = "s3://artifacts/capture/skin-lesion-classifier/AllTraffic/"
RECORDS = "s3://artifacts/monitoring/records/"
GROUP = "skin-lesion-models"
DRIFT_ENV = {
    "CAPTURE_S3_URI": CAPTURE, "RECORDS_S3_URI": RECORDS, "RESULTS_S3_URI": "s3://artifacts/monitoring/drift/",
    "MODEL_PACKAGE_GROUP": GROUP, "REFERENCE_S3_URI": "", "METRIC_NAMESPACE": NAMESPACE, "MIN_RECORDS": "100",
    "WINDOW_HOURS": "24", "DRIFT_ALPHA": "0.001",
}
QUALITY_ENV = {
    "DATA_BUCKET": "data", "CAPTURE_S3_URI": CAPTURE, "RECORDS_S3_URI": RECORDS,
    "RESULTS_S3_URI": "s3://artifacts/monitoring/quality/", "LABEL_SET": "ham7", "METRIC_NAMESPACE": NAMESPACE,
    "LOOKBACK_HOURS": "48", "QUALITY_WINDOW_DAYS": "30", "MIN_QUALITY_SAMPLES": "20", "MIN_MELANOMA_CASES": "5",
}
HOUR = datetime(2026, 11, 29, 9, tzinfo=UTC)
WORLD = sy.World()
REFERENCE = WORLD.reference()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="artifacts")
        s3.create_bucket(Bucket="data")
        yield


def _register(version_reference: dict[str, Any], job: str) -> None:
    """An approved model package whose model.tar.gz holds ``version_reference``."""
    s3, sm = boto3.client("s3"), boto3.client("sagemaker")
    key = f"training-jobs/{job}/output/model.tar.gz"
    s3.put_object(Bucket="artifacts", Key=key, Body=sy.model_tar(version_reference))
    try:
        sm.create_model_package_group(ModelPackageGroupName=GROUP)
    except sm.exceptions.ClientError:
        pass
    sm.create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus="Approved",
        InferenceSpecification={"Containers": [{"Image": "1.dkr.ecr.us-east-1.amazonaws.com/i:1",
                                                "ModelDataUrl": f"s3://artifacts/{key}"}],
                                "SupportedContentTypes": ["image/jpeg"],
                                "SupportedResponseMIMETypes": ["application/json"]})


def _capture(n: int, seed: int, shift: float = 0.0, hour: datetime = HOUR, version: str = "1",
             encoding: str = "JSON", name: str = "part-0") -> None:
    """A Data Capture file of ``n`` single-image requests in ``hour``."""
    time = (hour + timedelta(minutes=30)).isoformat().replace("+00:00", "Z")
    body = sy.data_capture_file(WORLD.sample(n, seed, shift), REFERENCE, time, model_version=version,
                                encoding=encoding)
    boto3.client("s3").put_object(Bucket="artifacts", Key=f"capture/skin-lesion-classifier/AllTraffic/"
                                  f"{hour:%Y/%m/%d/%H}/{name}.jsonl", Body=body)


def _metrics() -> dict[str, float]:
    """The latest value of every metric in the monitoring namespace (what the alarms would see)."""
    cw = boto3.client("cloudwatch")
    names = [m["MetricName"] for m in cw.list_metrics(Namespace=NAMESPACE)["Metrics"]]
    if not names:
        return {}
    now = datetime.now(UTC)
    resp = cw.get_metric_data(
        MetricDataQueries=[{"Id": f"m{i}", "Label": name, "MetricStat": {
            "Metric": {"Namespace": NAMESPACE, "MetricName": name}, "Period": 60, "Stat": "Maximum"}}
            for i, name in enumerate(names)],
        StartTime=now - timedelta(hours=1), EndTime=now + timedelta(minutes=5))
    return {r["Label"]: r["Values"][0] for r in resp["MetricDataResults"] if r["Values"]}


def _drift(monkeypatch: pytest.MonkeyPatch, **env: str) -> ModuleType:
    return load_handler("detect_drift", {**DRIFT_ENV, **env}, monkeypatch)


def _scheduled(at: datetime) -> dict[str, Any]:
    return json.loads((sy_events() / "drift_schedule.json").read_text()) | {"time": at.isoformat()}


def sy_events() -> Any:
    from tests.unit.handlers import REPO

    return REPO / "events" / "monitoring"


# ------------------------------------------------------------------ detect_drift
def test_capture_files_give_drift_metrics_under_the_threshold(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(REFERENCE, "job-1")
    _capture(80, seed=1)
    _capture(80, seed=2, hour=HOUR - timedelta(hours=5), encoding="BASE64")
    app = _drift(monkeypatch)
    result = app.lambda_handler(_scheduled(HOUR + timedelta(hours=1, minutes=10)), Context())
    assert result["status"] == "evaluated", result
    assert result["n_records"] == 160 and result["read"]["files"] == 2 and result["read"]["bad_lines"] == 0
    assert result["families_run"] == ["confidence", "embedding", "image", "prediction"]
    assert result["reference"]["uri"] == "s3://artifacts/training-jobs/job-1/output/model.tar.gz"
    assert 0 <= result["drift_score"] < 1 and not result["drifted"]
    published = _metrics()
    assert published["DriftScore"] == pytest.approx(result["drift_score"])
    assert published["DriftSampleSize"] == 160
    for family in ("Embedding", "Prediction", "Confidence", "Image"):
        assert published[f"DriftScore{family}"] == pytest.approx(result["tests"][family.lower()]["score"])
    stored = boto3.client("s3").get_object(Bucket="artifacts", Key="monitoring/drift/2026/11/29/101000.json")
    assert json.loads(stored["Body"].read())["drift_score"] == result["drift_score"]


def test_shifted_capture_raises_the_drift_score(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(REFERENCE, "job-1")
    _capture(150, seed=3, shift=2.0)
    result = _drift(monkeypatch).lambda_handler(_scheduled(HOUR + timedelta(hours=1)), Context())
    assert result["drifted"] and result["drift_score"] >= 1.0
    assert _metrics()["DriftScore"] >= 1.0


def test_too_few_records_skip_with_a_logged_reason(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _capture(40, seed=4)
    _capture(200, seed=5, hour=HOUR - timedelta(hours=30))  # outside the 24 h window
    app = _drift(monkeypatch)
    logged: list[tuple[str, dict[str, Any]]] = []
    # Powertools binds its stream once per process, so the call is recorded rather than stdout read.
    monkeypatch.setattr(app.logger, "info", lambda msg, *a, extra=None, **k: logged.append((msg, extra or {})))
    result = app.lambda_handler(_scheduled(HOUR + timedelta(hours=1)), Context())
    assert result["status"] == "skipped" and result["drift_score"] is None
    assert "40 predictions in the window, MIN_RECORDS is 100" in result["reason"]
    published = _metrics()
    assert "DriftScore" not in published and published["DriftSampleSize"] == 40
    assert any(msg == "drift window skipped" and "MIN_RECORDS" in extra["reason"] for msg, extra in logged)


def test_window_uses_the_reference_of_the_serving_model_version(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of version 2 are compared with package 2's reference; the minority of version 1 is left out."""
    _register(WORLD.reference(), "job-1")
    shifted_world_reference = sy.build_reference(WORLD.sample(500, seed=20_000, shift=2.0))
    _register(shifted_world_reference, "job-2")
    _capture(30, seed=6, version="1", name="old")
    data = WORLD.sample(150, seed=7, shift=2.0)
    time = (HOUR + timedelta(minutes=5)).isoformat()
    records = capture_records(data, shifted_world_reference, model_version="2", timestamp=time)
    body = "".join(json.dumps(r) + "\n" for r in records)
    # The container's own record files, as local mode uploads them.
    boto3.client("s3").put_object(Bucket="artifacts", Key=f"monitoring/records/capture-{HOUR:%Y%m%dT%H}-host-1.jsonl",
                                  Body=body.encode())
    result = _drift(monkeypatch).lambda_handler({"windowEnd": (HOUR + timedelta(hours=1)).isoformat(),
                                                 "windowHours": 2}, Context())
    assert result["model_versions"] == {"1": 30, "2": 150}
    assert result["model_version"] == "2" and result["n_records"] == 150
    assert result["reference"]["uri"].endswith("job-2/output/model.tar.gz")
    assert not result["drifted"], result["tests"]


def test_reference_override_and_malformed_lines(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = boto3.client("s3")
    s3.put_object(Bucket="artifacts", Key="monitoring/reference/reference_stats.json", Body=json.dumps(REFERENCE))
    _capture(120, seed=8)
    s3.put_object(Bucket="artifacts", Key=f"capture/skin-lesion-classifier/AllTraffic/{HOUR:%Y/%m/%d/%H}/bad.jsonl",
                  Body=b'{"captureData": {}}\nnot json\n{"captureData": {"endpointOutput": '
                       b'{"data": "{\\"error\\": \\"invalid_base64\\", \\"status\\": 400}", "encoding": "JSON"}}}\n')
    app = _drift(monkeypatch, REFERENCE_S3_URI="s3://artifacts/monitoring/reference/reference_stats.json")
    result = app.lambda_handler(_scheduled(HOUR + timedelta(hours=1)), Context())
    assert result["status"] == "evaluated" and result["n_records"] == 120
    assert result["read"]["bad_lines"] == 2 and result["read"]["lines"] == 123  # a refused request is not bad
    assert result["reference"]["uri"] == "s3://artifacts/monitoring/reference/reference_stats.json"


def test_missing_reference_fails_loudly(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _capture(120, seed=9)
    boto3.client("sagemaker").create_model_package_group(ModelPackageGroupName=GROUP)
    app = _drift(monkeypatch)
    from lesion_monitoring.reference import ReferenceNotFoundError

    with pytest.raises(ReferenceNotFoundError, match="has no approved model package"):
        app.lambda_handler(_scheduled(HOUR + timedelta(hours=1)), Context())


# ------------------------------------------------------------------ evaluate_quality
def _ground_truth_event(key: str, at: datetime) -> dict[str, Any]:
    event = json.loads((sy_events() / "ground_truth_uploaded.json").read_text())
    event["time"] = at.isoformat()
    event["detail"]["bucket"]["name"] = "data"
    event["detail"]["object"]["key"] = key
    return event


def _captured_predictions(n: int, seed: int) -> list[dict[str, Any]]:
    """Capture ``n`` predictions (one Data Capture file) and return their records."""
    time = (HOUR + timedelta(minutes=20)).isoformat()
    records = capture_records(WORLD.sample(n, seed), REFERENCE, timestamp=time)
    body = "".join(sy.data_capture_line([r], r["inference_id"], time) + "\n" for r in records)
    boto3.client("s3").put_object(Bucket="artifacts", Key=f"capture/skin-lesion-classifier/AllTraffic/"
                                  f"{HOUR:%Y/%m/%d/%H}/gt.jsonl", Body=body.encode())
    return records


def test_ground_truth_join_publishes_quality(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _captured_predictions(60, seed=11)
    # The truth: what the model said for the first 40, "mel" for the other 20 (so some are missed).
    rows = ["inference_id,diagnosis"]
    truth = {}
    for i, r in enumerate(records):
        truth[r["inference_id"]] = r["predicted_class"] if i < 40 else "mel"
        rows.append(f"{r['inference_id']},{truth[r['inference_id']].upper()}")
    rows += ["unknown-id,nv", "img-x,not-a-class"]
    boto3.client("s3").put_object(Bucket="data", Key="ground-truth/batch-1.csv", Body="\n".join(rows).encode())
    app = load_handler("evaluate_quality", QUALITY_ENV, monkeypatch)
    result = app.lambda_handler(_ground_truth_event("ground-truth/batch-1.csv", HOUR + timedelta(days=1)), Context())

    gt = result["ground_truth"]
    assert (gt["rows"], gt["usable"], gt["rejected"], gt["matched"], gt["unmatched"]) == (62, 61, 1, 60, 1)
    q = result["quality"]
    # Expected values computed independently of the handler's code.
    classes = sorted(set(truth.values()))
    recalls = []
    for c in classes:
        ids = [i for i, t in truth.items() if t == c]
        recalls.append(sum(next(r for r in records if r["inference_id"] == i)["predicted_class"] == c
                           for i in ids) / len(ids))
    mel_ids = [i for i, t in truth.items() if t == "mel"]
    sensitivity = sum(next(r for r in records if r["inference_id"] == i)["melanoma"]["at_risk"]
                      for i in mel_ids) / len(mel_ids)
    assert q["n"] == 60 and q["balanced_accuracy"] == pytest.approx(sum(recalls) / len(recalls))
    assert q["melanoma_sensitivity"] == pytest.approx(sensitivity) and q["melanoma_cases"] == len(mel_ids)
    published = _metrics()
    assert published["ModelBalancedAccuracy"] == pytest.approx(q["balanced_accuracy"])
    assert published["ModelMelanomaSensitivity"] == pytest.approx(sensitivity)
    assert published["QualitySampleSize"] == 60 and published["GroundTruthUnmatched"] == 1


def test_quality_is_rolling_and_needs_a_minimum_sample(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _captured_predictions(30, seed=12)
    s3 = boto3.client("s3")
    app = load_handler("evaluate_quality", QUALITY_ENV, monkeypatch)
    # Two uploads of 15 each, with image_id naming the prediction and its time narrowing the search.
    for part in (0, 1):
        lines = ["image_id,label,inference_time"] + [
            f"{r['inference_id']},{r['predicted_class']},{r['timestamp']}" for r in records[part * 15:(part + 1) * 15]]
        s3.put_object(Bucket="data", Key=f"ground-truth/part-{part}.csv", Body="\n".join(lines).encode())
        result = app.lambda_handler(_ground_truth_event(f"ground-truth/part-{part}.csv", HOUR + timedelta(days=3)),
                                    Context())
        if part == 0:
            assert "ModelBalancedAccuracy" not in result["published"]
            assert "15 labelled predictions, MIN_QUALITY_SAMPLES is 20" in result["not_published"]
    assert result["rows_in_window"] == 30 and result["quality"]["balanced_accuracy"] == 1.0
    assert "ModelBalancedAccuracy" in result["published"]
    assert result["read"]["files"] == 1  # only the hours around the given inference times were listed
    # Re-uploading a file replaces its own rows instead of adding to them.
    app.lambda_handler(_ground_truth_event("ground-truth/part-1.csv", HOUR + timedelta(days=3)), Context())
    assert len(list(s3.list_objects_v2(Bucket="artifacts", Prefix="monitoring/quality/joined/")["Contents"])) == 2


def test_ground_truth_without_the_columns_is_refused(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3.client("s3").put_object(Bucket="data", Key="ground-truth/bad.csv", Body=b"id,class\n1,mel\n")
    app = load_handler("evaluate_quality", QUALITY_ENV, monkeypatch)
    with pytest.raises(app.GroundTruthError, match="need one of inference_id"):
        app.lambda_handler(_ground_truth_event("ground-truth/bad.csv", HOUR), Context())
