"""prepare_training (the request the createTrainingJob.sync state runs) and evaluate_model's S3 errors.

Where AWS's answer differs from moto's, botocore's Stubber gives the answer AWS gives (code, message, status).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto import mock_aws

from lesion_common.instances import EBS_ONLY_FAMILIES, has_local_nvme, instance_family
from lesion_common.training_jobs import is_unknown_training_job, job_name_for_execution, metric_definitions
from tests.unit.handlers import Context, load_handler

REPO = Path(__file__).resolve().parents[2]
ENV = {
    "TRAINING_IMAGE_URI": "123456789012.dkr.ecr.us-east-1.amazonaws.com/train:1",
    "TRAINING_INSTANCE_TYPE": "ml.g5.xlarge",
    "TRAINING_INSTANCE_COUNT": "1",
    "TRAINING_VOLUME_GB": "50",
    "MAX_RUNTIME_SECONDS": "3600",
    "MAX_WAIT_SECONDS": "7200",
    "USE_SPOT": "true",
    "SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/sm",
    "ARTIFACTS_BUCKET": "artifacts",
    "KMS_KEY_ARN": "arn:aws:kms:us-east-1:123456789012:key/abc",
    "MODEL_PACKAGE_GROUP": "grp",
    "JOB_NAME_PREFIX": "skinlesion",
    "HYPERPARAMETERS": json.dumps({"arch": "efficientnet_b0", "epochs": "30"}),
    "SUBNET_IDS": "",
    "SECURITY_GROUP_IDS": "",
}
JOB = "skinlesion-manual-2026-11-29"
# What SageMaker answers DescribeTrainingJob for a name no job has (boto/boto3#2808, aws/aws-sdk#165).
AWS_UNKNOWN_JOB = {"service_error_code": "ValidationException", "service_message": "Requested resource not found.",
                   "http_status_code": 400}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """moto, with local mode's SageMaker answers: plain moto words an unknown job differently from SageMaker."""
    from localmode import sagemaker

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        undo = sagemaker.install(tmp_path, REPO, lambda detail: None, [])
        try:
            yield
        finally:
            undo()


def _event() -> dict[str, Any]:
    return json.loads((REPO / "events" / "prepare_training" / "event.json").read_text())


def _describe(name: str, status: str) -> dict[str, Any]:
    """A DescribeTrainingJob response (the fields botocore requires, and those the state reads)."""
    now = datetime(2026, 11, 29, tzinfo=UTC)
    return {
        "TrainingJobName": name,
        "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{name}",
        "TrainingJobStatus": status,
        "SecondaryStatus": status,
        "ModelArtifacts": {"S3ModelArtifacts": f"s3://artifacts/training-jobs/{name}/output/model.tar.gz"},
        "AlgorithmSpecification": {"TrainingInputMode": "File"},
        "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "CreationTime": now,
    }


def _stub_packages(stub: Stubber) -> None:
    stub.add_response("list_model_packages", {"ModelPackageSummaryList": []}, {
        "ModelPackageGroupName": "grp", "ModelApprovalStatus": "Approved", "SortBy": "CreationTime",
        "SortOrder": "Descending", "MaxResults": 1})


# ------------------------------------------------------------------ naming and SageMaker's "no such job"
def test_job_names_are_valid_and_deterministic() -> None:
    long = "Manual-20261129T080000-" + "x" * 60
    name = job_name_for_execution("skinlesion", long)
    assert len(name) <= 63 and name == job_name_for_execution("skinlesion", long)
    assert name.startswith("skinlesion-") and all(c.isalnum() or c == "-" for c in name)
    assert job_name_for_execution("skinlesion", "a_b__c") == "skinlesion-a-b-c"
    retry = job_name_for_execution("skinlesion", long, attempt=12)
    assert len(retry) <= 63 and retry.endswith("-r12") and retry != name
    assert job_name_for_execution("skinlesion", "a_b__c", attempt=2) == "skinlesion-a-b-c-r2"


def test_unknown_job_is_recognised_by_what_sagemaker_sends() -> None:
    """Defect 1: AWS's answer (ValidationException, "Requested resource not found.") means "no job yet"."""
    client = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        stub.add_client_error("describe_training_job", **AWS_UNKNOWN_JOB)
        stub.add_client_error("describe_training_job", service_error_code="ValidationException",
                              service_message="1 validation error detected: Value 'a_b' at 'trainingJobName' "
                                              "failed to satisfy constraint", http_status_code=400)
        stub.add_client_error("describe_training_job", service_error_code="ThrottlingException",
                              service_message="Rate exceeded", http_status_code=400)
        answers = []
        for _ in range(3):
            with pytest.raises(ClientError) as info:
                client.describe_training_job(TrainingJobName="skinlesion-x")
            answers.append(is_unknown_training_job(info.value))
    assert answers == [True, False, False]


def test_first_preparation_on_aws_builds_a_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 1 end to end: with AWS's answer for the unknown name the first run prepares its job (it raised)."""
    app = load_handler("prepare_training", ENV, monkeypatch)
    with Stubber(app.sagemaker) as stub:
        stub.add_client_error("describe_training_job", expected_params={"TrainingJobName": JOB}, **AWS_UNKNOWN_JOB)
        _stub_packages(stub)
        out = app.lambda_handler(_event(), Context())
        stub.assert_no_pending_responses()
    assert out["trainingJobName"] == JOB and out["request"]["TrainingJobName"] == JOB


# ------------------------------------------------------------------ the request
def test_request_is_a_spot_job_with_checkpoints_and_merged_hyperparameters(aws: None, monkeypatch) -> None:
    app = load_handler("prepare_training", ENV, monkeypatch)
    out = app.lambda_handler(_event(), Context())
    request = out["request"]
    assert out["trainingJobName"] == JOB and request["TrainingJobName"] == JOB
    assert out["timeoutSeconds"] == 3600 + 7200 + 3600  # above MaxRuntime + MaxWait
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert request["CheckpointConfig"]["S3Uri"] == f"s3://artifacts/checkpoints/{JOB}/"
    assert request["HyperParameters"] == {"arch": "efficientnet_b0", "epochs": "40", "label_set": "ham7"}
    assert request["OutputDataConfig"]["KmsKeyId"] == ENV["KMS_KEY_ARN"]
    assert request["EnableNetworkIsolation"] is True
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["manifests", "images"]
    assert request["InputDataConfig"][1]["DataSource"]["S3DataSource"]["S3DataType"] == "ManifestFile"
    assert request["AlgorithmSpecification"]["MetricDefinitions"] == metric_definitions()
    assert "VpcConfig" not in request
    assert boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []  # it creates nothing


def test_request_is_valid_for_create_training_job(aws: None, monkeypatch) -> None:
    """botocore's own validation of the request (what Step Functions would send) finds nothing wrong."""
    app = load_handler("prepare_training", {**ENV, "SUBNET_IDS": "subnet-1", "SECURITY_GROUP_IDS": "sg-1"},
                       monkeypatch)
    request = app.lambda_handler(_event(), Context())["request"]
    client = boto3.client("sagemaker")
    with Stubber(client) as stub:
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:x"}, request)
        client.create_training_job(**request)


@pytest.mark.parametrize(("instance_type", "has_key"), [("ml.g5.xlarge", False), ("ml.p4d.24xlarge", False),
                                                        ("ml.g4dn.xlarge", False), ("ml.m5.xlarge", True),
                                                        ("ml.c5.2xlarge", True)])
def test_volume_key_only_where_an_ebs_volume_is_attached(aws: None, monkeypatch, instance_type: str,
                                                         has_key: bool) -> None:
    """Defect 2: SageMaker rejects VolumeKmsKeyId for instances with NVMe instance storage (the default g5)."""
    app = load_handler("prepare_training", {**ENV, "TRAINING_INSTANCE_TYPE": instance_type}, monkeypatch)
    resource = app.lambda_handler(_event(), Context())["request"]["ResourceConfig"]
    assert ("VolumeKmsKeyId" in resource) is has_key
    assert resource["InstanceType"] == instance_type


def test_request_with_vpc_and_baseline(aws: None, monkeypatch) -> None:
    app = load_handler("prepare_training", {**ENV, "SUBNET_IDS": "subnet-1,subnet-2", "SECURITY_GROUP_IDS": "sg-1"},
                       monkeypatch)
    request = app.training_job_request("j", app.PrepareEvent.model_validate(_event()), "s3://b/model.tar.gz")
    assert request["VpcConfig"] == {"Subnets": ["subnet-1", "subnet-2"], "SecurityGroupIds": ["sg-1"]}
    assert request["InputDataConfig"][-1]["ChannelName"] == "baseline"


def test_baseline_is_the_newest_approved_package(aws: None, monkeypatch) -> None:
    sm = boto3.client("sagemaker")
    sm.create_model_package_group(ModelPackageGroupName="grp")
    for url, status in (("s3://b/old.tar.gz", "Approved"), ("s3://b/new.tar.gz", "Approved"),
                        ("s3://b/pending.tar.gz", "PendingManualApproval")):
        sm.create_model_package(ModelPackageGroupName="grp", ModelApprovalStatus=status, InferenceSpecification={
            "Containers": [{"Image": "i", "ModelDataUrl": url}], "SupportedContentTypes": ["image/jpeg"],
            "SupportedResponseMIMETypes": ["application/json"]})
    app = load_handler("prepare_training", ENV, monkeypatch)
    channels = app.lambda_handler(_event(), Context())["request"]["InputDataConfig"]
    assert channels[-1]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://b/new.tar.gz"


# ------------------------------------------------------------------ a retried state or a redriven execution
def test_a_completed_job_of_this_execution_is_reused(monkeypatch) -> None:
    app = load_handler("prepare_training", ENV, monkeypatch)
    with Stubber(app.sagemaker) as stub:
        stub.add_response("describe_training_job", _describe(JOB, "Completed"), {"TrainingJobName": JOB})
        out = app.lambda_handler(_event(), Context())
    assert "request" not in out
    assert out["existingJob"] == {
        "TrainingJobName": JOB, "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{JOB}",
        "TrainingJobStatus": "Completed",
        "ModelArtifacts": {"S3ModelArtifacts": f"s3://artifacts/training-jobs/{JOB}/output/model.tar.gz"}}


@pytest.mark.parametrize("ended", ["Failed", "Stopped"])
def test_after_a_failed_or_stopped_job_a_fresh_name(monkeypatch, ended: str) -> None:
    app = load_handler("prepare_training", ENV, monkeypatch)
    with Stubber(app.sagemaker) as stub:
        stub.add_response("describe_training_job", _describe(JOB, ended), {"TrainingJobName": JOB})
        stub.add_response("describe_training_job", _describe(f"{JOB}-r2", "Failed"), {"TrainingJobName": f"{JOB}-r2"})
        stub.add_client_error("describe_training_job", expected_params={"TrainingJobName": f"{JOB}-r3"},
                              **AWS_UNKNOWN_JOB)
        _stub_packages(stub)
        out = app.lambda_handler(_event(), Context())
    assert out["trainingJobName"] == f"{JOB}-r3" and out["request"]["TrainingJobName"] == f"{JOB}-r3"
    assert out["request"]["CheckpointConfig"]["S3Uri"].endswith(f"/{JOB}-r3/")


@pytest.mark.parametrize("running", ["InProgress", "Stopping"])
def test_a_running_job_is_a_named_error_the_state_retries(monkeypatch, running: str) -> None:
    app = load_handler("prepare_training", ENV, monkeypatch)
    with Stubber(app.sagemaker) as stub:
        stub.add_response("describe_training_job", _describe(JOB, running), {"TrainingJobName": JOB})
        with pytest.raises(Exception) as info:
            app.lambda_handler(_event(), Context())
    assert type(info.value).__name__ == "TrainingJobStillRunningError"
    asl = json.loads((REPO / "statemachines" / "retraining.asl.json").read_text())
    retried = [r for r in asl["States"]["PrepareTraining"]["Retry"]
               if "TrainingJobStillRunningError" in r["ErrorEquals"]]
    assert retried and retried[0]["IntervalSeconds"] >= 300


def test_other_describe_errors_are_raised(monkeypatch) -> None:
    app = load_handler("prepare_training", ENV, monkeypatch)
    with Stubber(app.sagemaker) as stub:
        stub.add_client_error("describe_training_job", service_error_code="AccessDeniedException",
                              service_message="not authorized", http_status_code=400)
        with pytest.raises(ClientError):
            app.lambda_handler(_event(), Context())


def test_invalid_request_is_a_named_error(monkeypatch) -> None:
    app = load_handler("prepare_training", ENV, monkeypatch)
    with pytest.raises(Exception) as info:
        app.lambda_handler({"executionName": "x"}, Context())
    assert type(info.value).__name__ == "InvalidRequestError"


# ------------------------------------------------------------------ metric definitions (defect 10)
def test_metric_definitions_come_from_the_layer_not_the_environment() -> None:
    definitions = metric_definitions()
    assert {"test:balanced_accuracy", "test:macro_auc", "validation:balanced_accuracy"} <= {
        d["Name"] for d in definitions}
    assert (REPO / "layers" / "common" / "lesion_common" / "metric_definitions.json").is_file()
    assert not (REPO / "training_image" / "metric_definitions.json").exists()  # one source
    source = (REPO / "functions" / "prepare_training" / "app.py").read_text()
    assert 'os.environ["METRIC_DEFINITIONS"]' not in source


# ------------------------------------------------------------------ instance storage (defect 2)
def test_nvme_families() -> None:
    for t in ("ml.g5.xlarge", "ml.g6.xlarge", "ml.g6e.xlarge", "ml.g4dn.xlarge", "ml.p4d.24xlarge",
              "ml.p4de.24xlarge", "ml.p5.48xlarge", "ml.trn1.2xlarge", "ml.m5d.large", "ml.c5d.xlarge",
              "ml.r5d.large", "ml.p3dn.24xlarge", "g5.xlarge"):
        assert has_local_nvme(t), t
    for t in ("ml.m5.xlarge", "ml.c5.xlarge", "ml.p3.2xlarge", "ml.c6i.xlarge", "ml.inf2.xlarge", "ml.t2.medium"):
        assert not has_local_nvme(t), t
    assert not has_local_nvme("local") and not has_local_nvme("local_gpu")  # local mode (samconfig)
    with pytest.raises(ValueError):
        has_local_nvme("g5")


def test_every_family_sagemaker_offers_is_classified_explicitly() -> None:
    """A family botocore adds must be decided: the naming rule alone is not trusted for it."""
    from lesion_common import instances

    path = next((Path(boto3.__file__).parents[1] / "botocore" / "data" / "sagemaker").glob("*/service-2.json.gz"))
    shapes = json.loads(gzip.decompress(path.read_bytes()))["shapes"]
    offered = {instance_family(t) for name in ("TrainingInstanceType", "ProductionVariantInstanceType")
               for t in shapes[name]["enum"]}
    explicit = instances._NVME_WITHOUT_D | EBS_ONLY_FAMILIES
    by_rule = {f for f in offered if f not in explicit}
    assert all("d" in instances._FAMILY.match(f)["attributes"] for f in by_rule), sorted(by_rule)


# ------------------------------------------------------------------ evaluate_model's S3 answers (defect 8)
EVAL_EVENT = {"trainingJobName": JOB,
              "modelDataUrl": f"s3://artifacts/training-jobs/{JOB}/output/model.tar.gz"}


@pytest.mark.parametrize(("code", "message", "status", "expected"), [
    ("NoSuchKey", "The specified key does not exist.", 404, "TrainingOutputMissingError"),
    ("AccessDenied", "Access Denied", 403, "TrainingOutputAccessDeniedError"),
])
def test_evaluate_tells_a_missing_output_from_a_denied_read(monkeypatch, code: str, message: str, status: int,
                                                            expected: str) -> None:
    app = load_handler("evaluate_model", {"ARTIFACTS_BUCKET": "artifacts"}, monkeypatch)
    with Stubber(app.s3) as stub:
        stub.add_client_error("get_object", service_error_code=code, service_message=message, http_status_code=status,
                              expected_params={"Bucket": "artifacts",
                                               "Key": f"training-jobs/{JOB}/output/output.tar.gz"})
        with pytest.raises(Exception) as info:
            app.lambda_handler(EVAL_EVENT, Context())
    assert type(info.value).__name__ == expected


def test_evaluate_role_may_list_job_outputs_so_s3_says_404() -> None:
    """Without s3:ListBucket S3 answers a missing key with 403; the role lists only the job outputs' prefix."""
    from localmode.template import load_template

    resources = load_template(REPO / "template.yaml")["Resources"]
    statements = resources["EvaluateModelFunction"]["Properties"]["Policies"][0]["Statement"]
    (listing,) = [s for s in statements if "s3:ListBucket" in s["Action"]]
    assert listing["Resource"] == {"Fn::GetAtt": ["ArtifactsBucket", "Arn"]}
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["training-jobs/*"]}}
    assert not any("sagemaker:DescribeTrainingJob" in s["Action"] for s in statements)


def test_evaluate_reads_the_output_next_to_the_model(aws: None, monkeypatch) -> None:
    import tarfile

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="artifacts")
    metrics = {"classes": ["a"], "n_test": 3, "test": {"balanced_accuracy": 0.5, "macro_auc": 0.6,
                                                         "melanoma_sensitivity": 0.7, "melanoma_specificity": 0.8,
                                                         "accuracy": 0.9, "confusion_matrix": [[3]]}}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = json.dumps(metrics).encode()
        info = tarfile.TarInfo("metrics.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    s3.put_object(Bucket="artifacts", Key=f"training-jobs/{JOB}/output/output.tar.gz", Body=buf.getvalue())
    app = load_handler("evaluate_model", {"ARTIFACTS_BUCKET": "artifacts"}, monkeypatch)
    out = app.lambda_handler(EVAL_EVENT, Context())
    assert out["modelDataUrl"] == EVAL_EVENT["modelDataUrl"] and out["metrics"]["accuracy"] == 0.9
