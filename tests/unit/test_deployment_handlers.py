"""The deployment handlers: moto where it implements the API, botocore's Stubber where it does not
(UpdateEndpoint and its blue/green deployment configuration)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from tests.unit.handlers import Context, load_handler

ROLE = "arn:aws:iam::123456789012:role/sm"
KEY = "arn:aws:kms:us-east-1:123456789012:key/abc"
CREATE_ENV = {
    "PROJECT_NAME": "skinlesion", "SAGEMAKER_ROLE_ARN": ROLE, "KMS_KEY_ARN": KEY,
    "ENDPOINT_INSTANCE_TYPE": "ml.c5.xlarge", "ENDPOINT_INITIAL_INSTANCE_COUNT": "1",
    "DATA_CAPTURE_PERCENT": "20", "DATA_CAPTURE_S3_URI": "s3://artifacts/capture/", "SUBNET_IDS": "",
    "SECURITY_GROUP_IDS": "",
}
UPDATE_ENV = {"ENDPOINT_NAME": "skin-lesion", "DEPLOYMENT_POLICY": "CANARY", "CANARY_PERCENT": "10",
              "BAKE_SECONDS": "600", "ROLLBACK_ALARMS": "skin-5xx,skin-p99", "POLL_SECONDS": "30"}
SCALING_ENV = {"MIN_INSTANCES": "1", "MAX_INSTANCES": "5", "TARGET_INVOCATIONS_PER_INSTANCE": "200",
               "SCALE_OUT_COOLDOWN_SECONDS": "60", "SCALE_IN_COOLDOWN_SECONDS": "600"}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield


def _approved_package() -> dict[str, Any]:
    sm = boto3.client("sagemaker")
    sm.create_model_package_group(ModelPackageGroupName="skin-lesion-models")
    arn = sm.create_model_package(
        ModelPackageGroupName="skin-lesion-models", ModelApprovalStatus="Approved",
        InferenceSpecification={"Containers": [{"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/infer:1",
                                                "ModelDataUrl": "s3://artifacts/job/output/model.tar.gz"}],
                                "SupportedContentTypes": ["image/jpeg"],
                                "SupportedResponseMIMETypes": ["application/json"]},
    )["ModelPackageArn"]
    return {"ModelPackageArn": arn, "ModelPackageGroupName": "skin-lesion-models", "ModelPackageVersion": 1,
            "ModelApprovalStatus": "Approved"}


def test_model_and_config_capture_data_encrypted_and_repeat_safely(aws: None, monkeypatch) -> None:
    app = load_handler("create_model_config", CREATE_ENV, monkeypatch)
    sent: dict[str, Any] = {}
    app.sagemaker.meta.events.register("provide-client-params.sagemaker.CreateModel",
                                       lambda params, **_: sent.update(params))
    detail = _approved_package()
    first = app.lambda_handler(detail, Context())
    assert first == app.lambda_handler(detail, Context())  # the same approval event twice
    assert first["endpointConfigName"] == "skinlesion-skin-lesion-models-v1"
    sm = boto3.client("sagemaker")
    config = sm.describe_endpoint_config(EndpointConfigName=first["endpointConfigName"])
    assert config["KmsKeyId"] == KEY
    assert config["DataCaptureConfig"]["InitialSamplingPercentage"] == 20
    assert config["DataCaptureConfig"]["DestinationS3Uri"] == "s3://artifacts/capture/"
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.c5.xlarge"
    model = sm.describe_model(ModelName=first["modelName"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == "s3://artifacts/job/output/model.tar.gz"
    assert sent["EnableNetworkIsolation"] is True and sent["ExecutionRoleArn"] == ROLE


def test_first_deployment_creates_the_endpoint(aws: None, monkeypatch) -> None:
    create = load_handler("create_model_config", CREATE_ENV, monkeypatch)
    model = create.lambda_handler(_approved_package(), Context())
    app = load_handler("update_endpoint", UPDATE_ENV, monkeypatch)
    out = app.lambda_handler(model, Context())
    assert out["action"] == "created" and out["previousConfig"] is None and out["pollSeconds"] == 30
    assert boto3.client("sagemaker").describe_endpoint(EndpointName="skin-lesion")["EndpointConfigName"] == \
        model["endpointConfigName"]
    again = app.lambda_handler(model, Context())
    assert again["action"] == "unchanged"


def _stubbed(app: Any, old_type: str) -> tuple[Any, Stubber, Any, Stubber]:
    sm = boto3.client("sagemaker", region_name="us-east-1")
    aas = boto3.client("application-autoscaling", region_name="us-east-1")
    sm_stub, aas_stub = Stubber(sm), Stubber(aas)
    sm_stub.add_response("describe_endpoint", {
        "EndpointName": "skin-lesion", "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/skin-lesion",
        "EndpointConfigName": "skinlesion-models-v1", "EndpointStatus": "InService",
        "CreationTime": "2026-11-01T00:00:00Z", "LastModifiedTime": "2026-11-01T00:00:00Z"},
        {"EndpointName": "skin-lesion"})
    sm_stub.add_response("describe_endpoint_config", {
        "EndpointConfigName": "skinlesion-models-v1", "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:x",
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "m1", "InstanceType": old_type,
                                "InitialInstanceCount": 1}], "CreationTime": "2026-11-01T00:00:00Z"},
        {"EndpointConfigName": "skinlesion-models-v1"})
    return sm, sm_stub, aas, aas_stub


def test_update_uses_canary_with_rollback_alarms(monkeypatch) -> None:
    app = load_handler("update_endpoint", UPDATE_ENV, monkeypatch)
    sm, sm_stub, aas, aas_stub = _stubbed(app, "ml.c5.xlarge")
    expected = {
        "EndpointName": "skin-lesion", "EndpointConfigName": "skinlesion-models-v2",
        "DeploymentConfig": {
            "BlueGreenUpdatePolicy": {
                "TrafficRoutingConfiguration": {"Type": "CANARY", "WaitIntervalInSeconds": 600,
                                                "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10}},
                "TerminationWaitInSeconds": 600, "MaximumExecutionTimeoutInSeconds": ANY},
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "skin-5xx"}, {"AlarmName": "skin-p99"}]}},
    }
    sm_stub.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/skin-lesion"},
                         expected)
    with sm_stub, aas_stub:
        req = app.UpdateRequest.model_validate({"endpointConfigName": "skinlesion-models-v2",
                                                "instanceType": "ml.c5.xlarge"})
        out = app.deploy(sm, aas, req)
        sm_stub.assert_no_pending_responses()
    assert out["action"] == "updated" and out["previousConfig"] == "skinlesion-models-v1"
    assert out["deregisteredScaling"] is False


def test_instance_type_change_deregisters_scaling_first(monkeypatch) -> None:
    app = load_handler("update_endpoint", {**UPDATE_ENV, "DEPLOYMENT_POLICY": "LINEAR"}, monkeypatch)
    sm, sm_stub, aas, aas_stub = _stubbed(app, "ml.c5.xlarge")
    aas_stub.add_response("deregister_scalable_target", {}, {
        "ServiceNamespace": "sagemaker", "ResourceId": "endpoint/skin-lesion/variant/AllTraffic",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"})
    ENDPOINT_ARN = "arn:aws:sagemaker:us-east-1:1:endpoint/skin-lesion"
    sm_stub.add_response("update_endpoint", {"EndpointArn": ENDPOINT_ARN}, {
        "EndpointName": "skin-lesion", "EndpointConfigName": "skinlesion-models-v2", "DeploymentConfig": ANY})
    with sm_stub, aas_stub:
        req = app.UpdateRequest.model_validate({"endpointConfigName": "skinlesion-models-v2",
                                                "instanceType": "ml.g4dn.xlarge"})
        out = app.deploy(sm, aas, req)
        aas_stub.assert_no_pending_responses()
        sm_stub.assert_no_pending_responses()
    assert out["deregisteredScaling"] is True
    assert app.deployment_config()["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["Type"] == "LINEAR"


def test_rollback_detected_by_the_config_check(monkeypatch) -> None:
    app = load_handler("check_endpoint", {"ROLLBACK_ALARMS": "skin-5xx,skin-p99"}, monkeypatch)
    sm = boto3.client("sagemaker", region_name="us-east-1")
    cw = boto3.client("cloudwatch", region_name="us-east-1")
    with Stubber(sm) as sm_stub, Stubber(cw) as cw_stub:
        sm_stub.add_response("describe_endpoint", {
            "EndpointName": "skin-lesion", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/x",
            "EndpointConfigName": "skinlesion-models-v1",
            "EndpointStatus": "InService", "CreationTime": "2026-11-01T00:00:00Z",
            "LastModifiedTime": "2026-11-01T00:00:00Z"})
        cw_stub.add_response("describe_alarms", {"MetricAlarms": [
            {"AlarmName": "skin-5xx", "StateValue": "ALARM", "StateReason": "Threshold Crossed: 12 5XX errors"},
            {"AlarmName": "skin-p99", "StateValue": "OK", "StateReason": "fine"}]})
        req = app.CheckRequest.model_validate({"endpointName": "skin-lesion", "targetConfig": "skinlesion-models-v2",
                                               "previousConfig": "skinlesion-models-v1"})
        with pytest.raises(Exception) as info:
            app.check(sm, cw, req)
    assert type(info.value).__name__ == "EndpointRolledBackError"
    assert "skin-5xx" in str(info.value) and "skin-p99" not in str(info.value)


def test_settling_and_settled(aws: None, monkeypatch) -> None:
    app = load_handler("check_endpoint", {"ROLLBACK_ALARMS": ""}, monkeypatch)
    sm = boto3.client("sagemaker", region_name="us-east-1")
    with Stubber(sm) as stub:
        for status, config in (("Updating", "v2"), ("InService", "v2")):
            stub.add_response("describe_endpoint", {
                "EndpointName": "e", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/e",
                "EndpointConfigName": config, "EndpointStatus": status,
                "CreationTime": "2026-11-01T00:00:00Z", "LastModifiedTime": "2026-11-01T00:00:00Z"})
        req = app.CheckRequest.model_validate({"endpointName": "e", "targetConfig": "v2"})
        assert app.check(sm, None, req)["settled"] is False
        assert app.check(sm, None, req)["settled"] is True


def test_autoscaling_registered_with_bounds_and_cooldowns(aws: None, monkeypatch) -> None:
    app = load_handler("configure_autoscaling", SCALING_ENV, monkeypatch)
    out = app.lambda_handler({"endpointName": "skin-lesion"}, Context())
    assert (out["minCapacity"], out["maxCapacity"]) == (1, 5)
    aas = boto3.client("application-autoscaling")
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert target["ResourceId"] == "endpoint/skin-lesion/variant/AllTraffic"
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 5)
    (policy,) = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    config = policy["TargetTrackingScalingPolicyConfiguration"]
    assert config["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"
    assert config["ScaleInCooldown"] > config["ScaleOutCooldown"]
    app.lambda_handler({"endpointName": "skin-lesion"}, Context())  # a repeat is an upsert
    assert len(aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]) == 1
