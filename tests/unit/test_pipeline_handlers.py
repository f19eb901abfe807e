"""check_data, evaluate_model, gate_model and register_model against moto."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from lesion_common.splits import assign_split
from tests.unit.handlers import Context, load_handler, tar_gz

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
CHECK_ENV = {
    "MANIFEST_TABLE": "manifest",
    "DATA_BUCKET": "data",
    "ARTIFACTS_BUCKET": "artifacts",
    "MODEL_PACKAGE_GROUP": "grp",
    "LABEL_SET": "ham7",
    "MIN_NEW_IMAGES": "50",
    "MIN_IMAGES_PER_CLASS": "10",
    "STATUS_SHARDS": "1",  # items here are written as <status>#0 (sharding itself: test_issue16_sharding.py)
    "HASH_INDEX_TABLE": "hashes",  # the class counts
}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        ddb = boto3.client("dynamodb")
        ddb.create_table(
            TableName="manifest", BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in ("image_id", "status_shard",
                                                                                      "validated_at")],
            KeySchema=[{"AttributeName": "image_id", "KeyType": "HASH"}],
            GlobalSecondaryIndexes=[{"IndexName": "by-status-shard", "Projection": {"ProjectionType": "ALL"},
                                     "KeySchema": [{"AttributeName": "status_shard", "KeyType": "HASH"},
                                                   {"AttributeName": "validated_at", "KeyType": "RANGE"}]}],
        )
        ddb.create_table(
            TableName="hashes", BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in ("pk", "sk")],
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        )
        ddb.create_table(
            TableName="idem", BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        )
        for bucket in ("data", "artifacts"):
            boto3.client("s3").create_bucket(Bucket=bucket)
        boto3.client("sagemaker").create_model_package_group(ModelPackageGroupName="grp")
        yield


def _fill_manifest(per_class: int, status: str = "VALIDATED", classes: list[str] = CLASSES, tag: str = "") -> None:
    table = boto3.resource("dynamodb").Table("manifest")
    with table.batch_writer() as batch:
        for c in classes:
            for i in range(per_class):
                lesion = f"HAM_{c}_{i // 2}"  # two images per lesion
                image = f"ISIC_{c}{tag}_{i:04d}"
                batch.put_item(Item={"image_id": image, "label": c, "lesion_id": lesion, "status": status,
                                     "status_shard": f"{status}#0",
                                     "split": assign_split(lesion), "key": f"validated/{image}.jpg",
                                     "validated_at": "2026-11-29T06:00:00+00:00"})


def _check(app: Any, force: bool = False) -> dict[str, Any]:
    return app.lambda_handler({"executionName": "run-1", "request": {"trigger": {"type": "manual"}, "force": force}},
                              Context())


def test_not_enough_new_data_says_why(aws: None, monkeypatch) -> None:
    _fill_manifest(5)
    app = load_handler("check_data", CHECK_ENV, monkeypatch)
    out = _check(app)
    assert out["enough"] is False
    assert "35 new validated images since the last model, 50 needed" in out["summary"]
    assert any("class akiec has 5 validated images, 10 needed" in r for r in out["reasons"])
    assert "manifestsUri" not in out


def test_enough_data_writes_manifests_split_by_lesion(aws: None, monkeypatch) -> None:
    _fill_manifest(40)
    _fill_manifest(3, status="QUARANTINED", classes=["mel"], tag="q")
    app = load_handler("check_data", CHECK_ENV, monkeypatch)
    out = _check(app)
    assert out["enough"] is True, out["reasons"]
    assert out["totalImages"] == 280 and out["counts"]["mel"] == 40
    s3 = boto3.client("s3")
    lesion_split: dict[str, str] = {}
    total = 0
    for split in ("train", "validation", "test"):
        body = s3.get_object(Bucket="artifacts", Key=f"datasets/run-1/{split}.csv")["Body"].read().decode()
        rows = list(csv.DictReader(io.StringIO(body)))
        total += len(rows)
        for row in rows:
            assert lesion_split.setdefault(row["lesion_id"], split) == split, "a lesion crosses splits"
            assert row["path"] == f"{row['image_id']}.jpg"
    assert total == 280
    manifest = json.loads(s3.get_object(Bucket="artifacts", Key="datasets/run-1/images.manifest")["Body"].read())
    assert manifest[0] == {"prefix": "s3://data/validated/"} and len(manifest) == 281
    classes = json.loads(s3.get_object(Bucket="artifacts", Key="datasets/run-1/classes.json")["Body"].read())
    assert classes == {"label_set": "ham7", "classes": CLASSES}
    assert _check(app) == out  # a retried state writes the same dataset


def test_force_skips_only_the_new_data_minimum(aws: None, monkeypatch) -> None:
    _fill_manifest(40)
    app = load_handler("check_data", {**CHECK_ENV, "MIN_NEW_IMAGES": "1000"}, monkeypatch)
    assert _check(app)["enough"] is False
    assert _check(app, force=True)["enough"] is True


def test_invalid_request_is_a_named_error(aws: None, monkeypatch) -> None:
    app = load_handler("check_data", CHECK_ENV, monkeypatch)
    with pytest.raises(Exception) as info:
        app.lambda_handler({"executionName": "x", "request": {"forse": True}}, Context())
    assert type(info.value).__name__ == "InvalidRequestError" and "forse" in str(info.value)


# ------------------------------------------------------------------ evaluate
METRICS = {
    "label_set": "ham7", "classes": CLASSES, "architecture": "efficientnet_lite0", "n_test": 70,
    "test": {"balanced_accuracy": 0.61, "macro_auc": 0.9, "melanoma_sensitivity": 0.7,
             "melanoma_specificity": 0.8, "accuracy": 0.7, "per_class": {},
             "confusion_matrix": [[6 if i == j else (4 if j == (i + 1) % 7 else 0) for j in range(7)]
                                  for i in range(7)][:len(CLASSES)]},
    "baseline": None,
}


def _put_job_output(files: dict[str, bytes]) -> dict[str, str]:
    """The job's output.tar.gz in S3, and the evaluate input the .sync state's output gives for that job."""
    boto3.client("s3").put_object(Bucket="artifacts", Key="training-jobs/skinlesion-run-1/output/output.tar.gz",
                                  Body=tar_gz(files))
    return {"trainingJobName": "skinlesion-run-1",
            "modelDataUrl": "s3://artifacts/training-jobs/skinlesion-run-1/output/model.tar.gz"}


def test_evaluate_reads_metrics_from_output_tar(aws: None, monkeypatch) -> None:
    event = _put_job_output({"metrics.json": json.dumps(METRICS).encode(), "evaluation/confusion.png": b"png"})
    app = load_handler("evaluate_model", {"ARTIFACTS_BUCKET": "artifacts"}, monkeypatch)
    out = app.lambda_handler(event, Context())
    assert out["metrics"]["balanced_accuracy"] == 0.61 and out["baseline"] is None
    assert out["metricsS3Uri"] == "s3://artifacts/evaluations/skinlesion-run-1/metrics.json"
    assert out["modelDataUrl"] == event["modelDataUrl"]
    key = "evaluations/skinlesion-run-1/metrics.json"
    stored = json.loads(boto3.client("s3").get_object(Bucket="artifacts", Key=key)["Body"].read())
    assert stored["architecture"] == "efficientnet_lite0"
    # SageMaker's model-quality statistics, for the registry's ModelQuality, from the same confusion matrix
    assert out["modelQualityS3Uri"] == "s3://artifacts/evaluations/skinlesion-run-1/model_quality.json"
    quality = json.loads(boto3.client("s3").get_object(
        Bucket="artifacts", Key="evaluations/skinlesion-run-1/model_quality.json")["Body"].read())
    block = quality["multiclass_classification_metrics"]
    assert quality["dataset"]["item_count"] == 70
    assert block["confusion_matrix"][CLASSES[0]][CLASSES[0]] == 6 and block["accuracy"]["value"] == 0.6
    assert block["accuracy"]["standard_deviation"] == "NaN"  # under 200 samples, as Model Monitor writes it


def test_evaluate_sample_event_is_valid(monkeypatch) -> None:
    app = load_handler("evaluate_model", {"ARTIFACTS_BUCKET": "artifacts"}, monkeypatch)
    event = json.loads((REPO / "events" / "evaluate_model" / "event.json").read_text())
    assert app.EvaluateEvent.model_validate(event).model_data_url.endswith("/output/model.tar.gz")
    with pytest.raises(Exception) as info:
        app.lambda_handler({"trainingJobName": "j"}, Context())
    assert type(info.value).__name__ == "InvalidRequestError"


@pytest.mark.parametrize("files", [{"metrics.json": b"{not json"}, {"metrics.json": b'{"classes": []}'}, {"x": b""}])
def test_evaluate_missing_or_bad_metrics_is_a_named_error(aws: None, monkeypatch, files: dict) -> None:
    event = _put_job_output(files)
    app = load_handler("evaluate_model", {"ARTIFACTS_BUCKET": "artifacts"}, monkeypatch)
    with pytest.raises(Exception) as info:
        app.lambda_handler(event, Context())
    assert type(info.value).__name__ == "MetricsMissingError"


# ------------------------------------------------------------------ gate
GATE_ENV = {"MIN_BALANCED_ACCURACY": "0.75", "MIN_MELANOMA_SENSITIVITY": "0.70", "MIN_MACRO_AUC": "0.90",
            "MAX_REGRESSION": "0.01"}


def test_gate_passes_a_good_model(monkeypatch) -> None:
    app = load_handler("gate_model", GATE_ENV, monkeypatch)
    event = json.loads((REPO / "events" / "gate_model" / "event.json").read_text())
    assert app.lambda_handler(event, Context())["passed"] is True


def test_gate_names_each_failing_metric(monkeypatch) -> None:
    app = load_handler("gate_model", GATE_ENV, monkeypatch)
    out = app.lambda_handler({"metrics": {"balanced_accuracy": 0.70, "melanoma_sensitivity": 0.9, "macro_auc": 0.95}},
                             Context())
    assert out["passed"] is False
    assert [f["metric"] for f in out["failures"]] == ["balanced_accuracy"]
    assert "balanced_accuracy 0.700 < 0.750" in out["summary"]


def test_gate_rejects_a_regression_against_the_current_model(monkeypatch) -> None:
    app = load_handler("gate_model", GATE_ENV, monkeypatch)
    good = {"balanced_accuracy": 0.80, "melanoma_sensitivity": 0.75, "macro_auc": 0.95}
    out = app.lambda_handler({"metrics": good, "baseline": {**good, "melanoma_sensitivity": 0.80}}, Context())
    assert out["passed"] is False
    assert out["failures"][0]["metric"] == "melanoma_sensitivity"
    assert out["failures"][0]["check"] == "vs-current-model"


# ------------------------------------------------------------------ register
REGISTER_ENV = {"MODEL_PACKAGE_GROUP": "grp", "INFERENCE_IMAGE_URI": "img:1", "AUTO_APPROVE": "false",
                "IDEMPOTENCY_TABLE": "idem", "ENDPOINT_INSTANCE_TYPE": "ml.c5.xlarge"}


def _register_event() -> dict[str, Any]:
    return json.loads((REPO / "events" / "register_model" / "event.json").read_text())


def test_register_attaches_metrics_and_waits_for_approval(aws: None, monkeypatch) -> None:
    app = load_handler("register_model", REGISTER_ENV, monkeypatch)
    out = app.lambda_handler(_register_event(), Context())
    assert out["approvalStatus"] == "PendingManualApproval"
    pkg = boto3.client("sagemaker").describe_model_package(ModelPackageName=out["modelPackageArn"])
    # the console shows ModelQuality in SageMaker's format; our own report is named beside it
    assert pkg["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"].endswith("/model_quality.json")
    assert pkg["CustomerMetadataProperties"]["MetricsS3Uri"].endswith("/metrics.json")
    assert pkg["CustomerMetadataProperties"]["test_balanced_accuracy"] == "0.7800"
    assert pkg["InferenceSpecification"]["Containers"][0]["Image"] == "img:1"
    # One source of truth: the package supports exactly the type the endpoint is deployed on.
    assert pkg["InferenceSpecification"]["SupportedRealtimeInferenceInstanceTypes"] == ["ml.c5.xlarge"]


def test_register_twice_gives_one_package(aws: None, monkeypatch) -> None:
    app = load_handler("register_model", {**REGISTER_ENV, "AUTO_APPROVE": "true"}, monkeypatch)
    first = app.lambda_handler(_register_event(), Context())
    second = app.lambda_handler(_register_event(), Context())
    assert first == second and first["approvalStatus"] == "Approved"
    packages = boto3.client("sagemaker").list_model_packages(ModelPackageGroupName="grp")["ModelPackageSummaryList"]
    assert len(packages) == 1
