"""The deployment handlers: moto with local mode's hosting (which answers as SageMaker does) where the API is
emulated, botocore's Stubber with SageMaker's real error codes and messages where it is not."""

from __future__ import annotations

import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from tests.unit.handlers import Context, load_handler

ROLE = "arn:aws:iam::123456789012:role/sm"
ARN = "arn:aws:sagemaker:us-east-1:123456789012"
KEY = "arn:aws:kms:us-east-1:123456789012:key/abc"
CREATE_ENV = {
    "PROJECT_NAME": "skinlesion", "SAGEMAKER_ROLE_ARN": ROLE, "KMS_KEY_ARN": KEY,
    "ENDPOINT_INSTANCE_TYPE": "ml.c5.xlarge", "ENDPOINT_INITIAL_INSTANCE_COUNT": "1",
    "DATA_CAPTURE_PERCENT": "20", "DATA_CAPTURE_S3_URI": "s3://artifacts/capture/", "SUBNET_IDS": "",
    "SECURITY_GROUP_IDS": "", "INFERENCE_AMI_VERSION": "",
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


class FakeHost:
    """Stands in for the model servers: records what hosting asks of them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.ready = threading.Event()  # cleared: a starting endpoint stays Creating until it is set
        self.ready.set()

    def start(self, name: str, model_dir: Path, version: str | None = None, env: Any = None) -> None:
        self.ready.wait(30)
        self.calls.append(("start", name))

    def swap(self, name: str, model_dir: Path, version: str | None = None, env: Any = None) -> None:
        self.calls.append(("swap", name))

    def stop(self, name: str) -> None:
        self.calls.append(("stop", name))


@pytest.fixture
def hosted(aws: None, tmp_path: Path) -> Iterator[Any]:
    """moto with local mode's SageMaker hosting installed (AWS's answers), serving nothing."""
    from localmode.hosting import LocalHosting

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo("classes.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    boto3.client("s3").create_bucket(Bucket="artifacts")
    boto3.client("s3").put_object(Bucket="artifacts", Key="job/output/model.tar.gz", Body=archive.getvalue())
    events: list[tuple[str, dict[str, Any], list[str]]] = []
    hosting = LocalHosting(FakeHost(), tmp_path / "hosting", emit=lambda *event: events.append(event))
    hosting.events = events  # type: ignore[attr-defined]
    undo = hosting.install()
    yield hosting
    for thread in hosting.threads:
        thread.join(timeout=30)
    undo()


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


def test_model_and_config_capture_data_encrypted_and_repeat_safely(hosted: Any, monkeypatch) -> None:
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


@pytest.mark.parametrize(("instance_type", "volume_key"), [("ml.c5.xlarge", True), ("ml.g5.xlarge", False),
                                                        ("ml.g4dn.xlarge", False), ("ml.p4d.24xlarge", False)])
def test_volume_key_only_where_sagemaker_accepts_one(monkeypatch, instance_type: str, volume_key: bool) -> None:
    """Defect 2: SageMaker refuses KmsKeyId for instance types with local NVMe storage (g4dn, g5, p4d, ...).

    (moto's own instance-type list predates g5, so the request is checked here; local mode's hosting test sends it.)
    """
    app = load_handler("create_model_config", {**CREATE_ENV, "ENDPOINT_INSTANCE_TYPE": instance_type}, monkeypatch)
    request = app.endpoint_config_request("skinlesion-skin-lesion-models-v1")
    assert ("KmsKeyId" in request) is volume_key
    assert request["DataCaptureConfig"]["KmsKeyId"] == KEY  # captured data is always encrypted with the stack's key
    assert request["ProductionVariants"][0]["InstanceType"] == instance_type


@pytest.mark.parametrize("ami", ["", "al2-ami-sagemaker-inference-gpu-3-1"])
def test_hosting_ami_only_when_the_stack_chooses_one(monkeypatch, ami: str) -> None:
    """A CUDA 12 GPU image needs a newer driver than the default AMI of g4dn/g5/p4d: the stack's choice reaches the
    production variant, and no choice leaves SageMaker's default."""
    app = load_handler("create_model_config", {**CREATE_ENV, "ENDPOINT_INSTANCE_TYPE": "ml.g5.xlarge",
                                               "INFERENCE_AMI_VERSION": ami}, monkeypatch)
    variant = app.endpoint_config_request("skinlesion-m-v1")["ProductionVariants"][0]
    assert variant.get("InferenceAmiVersion") == (ami or None)


def test_first_deployment_creates_the_endpoint(hosted: Any, monkeypatch) -> None:
    create = load_handler("create_model_config", CREATE_ENV, monkeypatch)
    model = create.lambda_handler(_approved_package(), Context())
    app = load_handler("update_endpoint", UPDATE_ENV, monkeypatch)
    out = app.lambda_handler(model, Context())
    assert out["action"] == "created" and out["previousConfig"] is None and out["pollSeconds"] == 30
    assert out["maxPolls"] * out["pollSeconds"] >= 3600  # a first creation gets its own budget
    assert boto3.client("sagemaker").describe_endpoint(EndpointName="skin-lesion")["EndpointConfigName"] == \
        model["endpointConfigName"]
    again = app.lambda_handler(model, Context())
    assert again["action"] == "unchanged"


def _endpoint(config: str = "skinlesion-models-v1", status: str = "InService", instances: int = 1,
              **extra: Any) -> dict[str, Any]:
    return {"EndpointName": "skin-lesion", "EndpointArn": f"{ARN}:endpoint/skin-lesion",
            "EndpointConfigName": config, "EndpointStatus": status,
            "ProductionVariants": [{"VariantName": "AllTraffic", "CurrentInstanceCount": instances,
                                    "DesiredInstanceCount": instances}],
            "CreationTime": "2026-11-01T00:00:00Z", "LastModifiedTime": "2026-11-01T00:00:00Z", **extra}


def _config(name: str, instance_type: str, instances: int = 1) -> dict[str, Any]:
    return {"EndpointConfigName": name, "EndpointConfigArn": f"arn:aws:sagemaker:us-east-1:1:endpoint-config/{name}",
            "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": name, "InstanceType": instance_type,
                                    "InitialInstanceCount": instances}], "CreationTime": "2026-11-01T00:00:00Z"}


def _stubbed(app: Any, old_type: str, new_type: str = "ml.c5.xlarge",
             instances: int = 1) -> tuple[Any, Stubber, Any, Stubber]:
    """DescribeEndpoint (v1 in service), then the new configuration v2 and the running v1 described."""
    sm = boto3.client("sagemaker", region_name="us-east-1")
    aas = boto3.client("application-autoscaling", region_name="us-east-1")
    sm_stub, aas_stub = Stubber(sm), Stubber(aas)
    sm_stub.add_response("describe_endpoint", _endpoint(instances=instances), {"EndpointName": "skin-lesion"})
    sm_stub.add_response("describe_endpoint_config", _config("skinlesion-models-v2", new_type, instances),
                         {"EndpointConfigName": "skinlesion-models-v2"})
    sm_stub.add_response("describe_endpoint_config", _config("skinlesion-models-v1", old_type, instances),
                         {"EndpointConfigName": "skinlesion-models-v1"})
    return sm, sm_stub, aas, aas_stub


def _update(app: Any, sm: Any, aas: Any, new_type: str = "ml.c5.xlarge") -> dict[str, Any]:
    req = app.UpdateRequest.model_validate({"endpointConfigName": "skinlesion-models-v2", "instanceType": new_type})
    return dict(app.deploy(sm, aas, req))


def test_update_uses_canary_with_rollback_alarms(monkeypatch) -> None:
    """Four instances: a one-instance canary (<= 50 % of the fleet), and a timeout above the policy's waits."""
    app = load_handler("update_endpoint", UPDATE_ENV, monkeypatch)
    sm, sm_stub, aas, aas_stub = _stubbed(app, "ml.c5.xlarge", instances=4)
    expected = {
        "EndpointName": "skin-lesion", "EndpointConfigName": "skinlesion-models-v2",
        "DeploymentConfig": {
            "BlueGreenUpdatePolicy": {
                "TrafficRoutingConfiguration": {"Type": "CANARY", "WaitIntervalInSeconds": 600,
                                                "CanarySize": {"Type": "INSTANCE_COUNT", "Value": 1}},
                "TerminationWaitInSeconds": 600, "MaximumExecutionTimeoutInSeconds": 600 + 600 + 1800},
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "skin-5xx"}, {"AlarmName": "skin-p99"}]}},
    }
    sm_stub.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/skin-lesion"},
                         expected)
    with sm_stub, aas_stub:
        out = _update(app, sm, aas)
        sm_stub.assert_no_pending_responses()
    assert out["action"] == "updated" and out["previousConfig"] == "skinlesion-models-v1"
    assert out["deregisteredScaling"] is False
    assert out["trafficRouting"] == "CANARY" and out["deployment"]["note"] == ""
    assert out["maxPolls"] * out["pollSeconds"] > out["deployment"]["maxExecutionTimeoutSeconds"]


def test_one_instance_canary_falls_back_to_all_at_once_and_says_so(monkeypatch) -> None:
    """Defect 6: with the default fleet of one instance, a 10 % canary is invalid on SageMaker (canary <= 50 %)."""
    app = load_handler("update_endpoint", UPDATE_ENV, monkeypatch)
    sm, sm_stub, aas, aas_stub = _stubbed(app, "ml.c5.xlarge", instances=1)
    sent: dict[str, Any] = {}
    sm_stub.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/skin-lesion"},
                         {"EndpointName": "skin-lesion", "EndpointConfigName": "skinlesion-models-v2",
                          "DeploymentConfig": ANY})
    sm.meta.events.register("provide-client-params.sagemaker.UpdateEndpoint", lambda params, **_: sent.update(params))
    with sm_stub, aas_stub:
        out = _update(app, sm, aas)
    policy = sent["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"] == {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 600}
    assert policy["MaximumExecutionTimeoutInSeconds"] > 600 + policy["TerminationWaitInSeconds"]
    assert out["deployment"]["requested"] == "CANARY" and out["deployment"]["applied"] == "ALL_AT_ONCE"
    assert "at least 2 instances" in out["deployment"]["note"]
    assert sent["DeploymentConfig"]["AutoRollbackConfiguration"]["Alarms"]  # still guarded by the alarms


def test_linear_timeout_covers_every_step(monkeypatch) -> None:
    """Defect 6: LINEAR with 10 % steps of ten instances waits 10 x 600 + 600 s; the old fixed 4200 s was short."""
    app = load_handler("update_endpoint", {**UPDATE_ENV, "DEPLOYMENT_POLICY": "LINEAR"}, monkeypatch)
    sm, sm_stub, aas, aas_stub = _stubbed(app, "ml.c5.xlarge", instances=10)
    sent: dict[str, Any] = {}
    sm_stub.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/skin-lesion"},
                         {"EndpointName": "skin-lesion", "EndpointConfigName": "skinlesion-models-v2",
                          "DeploymentConfig": ANY})
    sm.meta.events.register("provide-client-params.sagemaker.UpdateEndpoint", lambda params, **_: sent.update(params))
    with sm_stub, aas_stub:
        out = _update(app, sm, aas)
    policy = sent["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"]["LinearStepSize"] == {"Type": "INSTANCE_COUNT", "Value": 1}
    assert out["deployment"]["totalWaitSeconds"] == 6600
    assert 6600 < policy["MaximumExecutionTimeoutInSeconds"] <= 28800
    # the state machine keeps polling past SageMaker's own timeout
    assert out["maxPolls"] * out["pollSeconds"] > policy["MaximumExecutionTimeoutInSeconds"]


def test_instance_type_change_deregisters_scaling_first(monkeypatch) -> None:
    app = load_handler("update_endpoint", {**UPDATE_ENV, "DEPLOYMENT_POLICY": "LINEAR"}, monkeypatch)
    sm, sm_stub, aas, aas_stub = _stubbed(app, "ml.c5.xlarge", new_type="ml.g4dn.xlarge", instances=2)
    aas_stub.add_response("deregister_scalable_target", {}, {
        "ServiceNamespace": "sagemaker", "ResourceId": "endpoint/skin-lesion/variant/AllTraffic",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"})
    endpoint_arn = "arn:aws:sagemaker:us-east-1:1:endpoint/skin-lesion"
    sm_stub.add_response("update_endpoint", {"EndpointArn": endpoint_arn}, {
        "EndpointName": "skin-lesion", "EndpointConfigName": "skinlesion-models-v2", "DeploymentConfig": ANY})
    with sm_stub, aas_stub:
        out = _update(app, sm, aas, new_type="ml.g4dn.xlarge")
        aas_stub.assert_no_pending_responses()
        sm_stub.assert_no_pending_responses()
    assert out["deregisteredScaling"] is True
    assert out["trafficRouting"] == "LINEAR"


@pytest.mark.parametrize("instances", range(1, 25))
@pytest.mark.parametrize("policy", ["CANARY", "LINEAR", "ALL_AT_ONCE"])
@pytest.mark.parametrize("percent", [1, 10, 25, 50])
def test_every_plan_is_valid_for_sagemaker_and_fits_the_wait_budget(policy: str, percent: int,
                                                                    instances: int) -> None:
    """The plan passes the rules local mode enforces for UpdateEndpoint, and the state machine outwaits it."""
    from lesion_common.deployment import SETTLE_MARGIN_SECONDS, max_polls, plan_traffic
    from localmode.hosting import check_deployment_config

    for bake in (0, 600, 1800):
        plan = plan_traffic(policy, percent, bake, instances)
        check_deployment_config({"BlueGreenUpdatePolicy": plan.blue_green_policy()}, instances)
        assert 600 <= plan.max_execution_timeout <= 28800
        assert plan.max_execution_timeout > plan.total_wait
        assert max_polls(plan.max_execution_timeout + SETTLE_MARGIN_SECONDS, 30) * 30 > plan.max_execution_timeout
        size = plan.routing.get("CanarySize") or plan.routing.get("LinearStepSize")
        if size:
            assert 2 * size["Value"] <= instances
        assert (plan.applied == policy) == (policy == "ALL_AT_ONCE" or instances >= 2)


def test_a_policy_beyond_sagemakers_timeout_is_refused_by_name() -> None:
    from lesion_common.deployment import plan_traffic
    from lesion_common.errors import DeploymentPolicyError

    with pytest.raises(DeploymentPolicyError, match="28800"):
        plan_traffic("LINEAR", 10, 3600, 10)  # 11 bakes of an hour
    with pytest.raises(DeploymentPolicyError, match="3600"):
        plan_traffic("CANARY", 10, 4000, 4)  # WaitIntervalInSeconds is at most 3600


# ------------------------------------------------------------------ AWS's answers, by name (defect 9)
def _client_error(code: str, message: str, status: int = 400) -> dict[str, Any]:
    return {"service_error_code": code, "service_message": message, "http_status_code": status}


def test_create_right_after_the_config_is_a_named_retryable_error(monkeypatch) -> None:
    """AWS documents that CreateEndpoint may not see a configuration just created (eventual consistency)."""
    app = load_handler("update_endpoint", UPDATE_ENV, monkeypatch)
    sm = boto3.client("sagemaker", region_name="us-east-1")
    missing = 'Could not find endpoint "arn:aws:sagemaker:us-east-1:123456789012:endpoint/skin-lesion".'
    not_yet = ('Could not find endpoint configuration '
               '"arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/skinlesion-models-v2".')
    with Stubber(sm) as stub:
        stub.add_client_error("describe_endpoint", **_client_error("ValidationException", missing))
        stub.add_response("describe_endpoint_config", _config("skinlesion-models-v2", "ml.c5.xlarge"))
        stub.add_client_error("create_endpoint", **_client_error("ValidationException", not_yet))
        with pytest.raises(Exception) as info:
            _update(app, sm, None)
    assert type(info.value).__name__ == "EndpointConfigNotVisibleError"


def test_missing_endpoint_is_matched_on_awss_answer_not_on_a_config_message() -> None:
    from botocore.exceptions import ClientError

    from lesion_common.deployment import is_missing_endpoint, is_missing_endpoint_config

    def err(code: str, message: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": message}}, "DescribeEndpoint")

    assert is_missing_endpoint(err("ValidationException", f'Could not find endpoint "{ARN}:endpoint/e".'))
    assert is_missing_endpoint(err("ValidationException", 'Could not find endpoint "e".'))
    assert not is_missing_endpoint(err("ValidationException", 'Could not find endpoint configuration "c".'))
    assert not is_missing_endpoint(err("AccessDeniedException", 'Could not find endpoint "e".'))
    assert is_missing_endpoint_config(err("ValidationException", 'Could not find endpoint configuration "c".'))


@pytest.mark.parametrize(("handler", "env", "call", "event", "code", "expected"), [
    ("update_endpoint", UPDATE_ENV, "describe_endpoint", None, "ThrottlingException", "SageMakerThrottledError"),
    ("check_endpoint", {"ROLLBACK_ALARMS": ""}, "describe_endpoint", None, "ThrottlingException",
     "SageMakerThrottledError"),
])
def test_sagemaker_throttling_is_named(monkeypatch, handler: str, env: dict[str, str], call: str, event: Any,
                                       code: str, expected: str) -> None:
    app = load_handler(handler, env, monkeypatch)
    sm = boto3.client("sagemaker", region_name="us-east-1")
    with Stubber(sm) as stub:
        stub.add_client_error(call, **_client_error(code, "Rate exceeded"))
        with pytest.raises(Exception) as info:
            if handler == "update_endpoint":
                _update(app, sm, None)
            else:
                app.check(sm, None, app.CheckRequest.model_validate({"endpointName": "e", "targetConfig": "v2"}))
    assert type(info.value).__name__ == expected


def test_update_of_a_changing_endpoint_is_busy_not_failed(monkeypatch) -> None:
    app = load_handler("update_endpoint", UPDATE_ENV, monkeypatch)
    sm, sm_stub, aas, aas_stub = _stubbed(app, "ml.c5.xlarge", instances=1)
    sm_stub.add_client_error("update_endpoint", **_client_error(
        "ValidationException", f'Cannot update in-progress endpoint "{ARN}:endpoint/skin-lesion".'))
    with sm_stub, aas_stub, pytest.raises(Exception) as info:
        _update(app, sm, aas)
    assert type(info.value).__name__ == "EndpointBusyError"
    # An endpoint that reports it is updating is not even asked.
    sm = boto3.client("sagemaker", region_name="us-east-1")
    with Stubber(sm) as stub:
        stub.add_response("describe_endpoint", _endpoint(status="Updating"))
        stub.add_response("describe_endpoint_config", _config("skinlesion-models-v2", "ml.c5.xlarge"))
        with pytest.raises(Exception) as info:
            _update(app, sm, None)
    assert type(info.value).__name__ == "EndpointBusyError"


@pytest.mark.parametrize(("code", "expected"), [("ConcurrentUpdateException", "AutoScalingConflictError"),
                                                ("ThrottlingException", "AutoScalingThrottledError")])
def test_autoscaling_conflicts_and_throttling_are_named(monkeypatch, code: str, expected: str) -> None:
    app = load_handler("configure_autoscaling", SCALING_ENV, monkeypatch)
    aas = boto3.client("application-autoscaling", region_name="us-east-1")
    with Stubber(aas) as stub:
        stub.add_client_error("register_scalable_target", **_client_error(code, "try again"))
        with pytest.raises(Exception) as info:
            app.configure(aas, "skin-lesion")
    assert type(info.value).__name__ == expected


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


# ------------------------------------------------------------------ local mode's hosting answers as SageMaker does
def _sm_error(call: Any) -> dict[str, str]:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as info:
        call()
    return dict(info.value.response["Error"])


def _model(name: str = "m1") -> None:
    boto3.client("sagemaker").create_model(
        ModelName=name, ExecutionRoleArn=ROLE,
        PrimaryContainer={"Image": "img:1", "ModelDataUrl": "s3://artifacts/job/output/model.tar.gz"})


def _wait_in_service(name: str = "skin-lesion") -> None:
    import time

    sm = boto3.client("sagemaker")
    deadline = time.monotonic() + 30
    while sm.describe_endpoint(EndpointName=name)["EndpointStatus"] != "InService":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_local_hosting_refuses_a_volume_key_on_nvme_instances(hosted: Any, monkeypatch) -> None:
    """Defect 2 in local mode: the old request (KmsKeyId with ml.g5.xlarge) fails as it would on AWS."""
    _model()
    sm = boto3.client("sagemaker")
    variant = {"VariantName": "AllTraffic", "ModelName": "m1", "InstanceType": "ml.g5.xlarge",
               "InitialInstanceCount": 1}
    error = _sm_error(lambda: sm.create_endpoint_config(EndpointConfigName="c1", ProductionVariants=[variant],
                                                        KmsKeyId=KEY))
    assert error["Code"] == "ValidationException" and "KmsKeyId" in error["Message"]
    sm.create_endpoint_config(EndpointConfigName="c2", ProductionVariants=[{**variant, "InstanceType": "ml.c5.xlarge"}],
                              KmsKeyId=KEY)
    sm.create_endpoint_config(EndpointConfigName="c3", ProductionVariants=[variant])  # g5 without a key: accepted
    error = _sm_error(lambda: sm.create_endpoint_config(
        EndpointConfigName="c4", ProductionVariants=[{**variant, "InstanceType": "ml.nope.xlarge"}]))
    assert error["Message"].startswith("1 validation error detected: Value 'ml.nope.xlarge' at "
                                       "'productionVariants.1.member.instanceType' failed to satisfy constraint")
    # and the handler's request for a g5 endpoint goes through
    app = load_handler("create_model_config", {**CREATE_ENV, "ENDPOINT_INSTANCE_TYPE": "ml.g5.xlarge"}, monkeypatch)
    out = app.lambda_handler(_approved_package(), Context())
    config = sm.describe_endpoint_config(EndpointConfigName=out["endpointConfigName"])
    assert "KmsKeyId" not in config and config["ProductionVariants"][0]["InstanceType"] == "ml.g5.xlarge"


def test_local_hosting_answers_missing_and_existing_with_awss_messages(hosted: Any) -> None:
    sm = boto3.client("sagemaker")
    arn = "arn:aws:sagemaker:us-east-1:123456789012"
    assert _sm_error(lambda: sm.describe_endpoint(EndpointName="nope")) == {
        "Code": "ValidationException", "Message": f'Could not find endpoint "{arn}:endpoint/nope".'}
    assert _sm_error(lambda: sm.describe_endpoint_config(EndpointConfigName="nope"))["Message"] == \
        f'Could not find endpoint configuration "{arn}:endpoint-config/nope".'
    assert _sm_error(lambda: sm.create_endpoint(EndpointName="e", EndpointConfigName="nope"))["Message"] == \
        f'Could not find endpoint configuration "{arn}:endpoint-config/nope".'
    _model()
    assert _sm_error(_model)["Message"] == f'Cannot create already existing model "{arn}:model/m1".'
    variant = {"VariantName": "AllTraffic", "ModelName": "m1", "InstanceType": "ml.c5.xlarge",
               "InitialInstanceCount": 1}
    sm.create_endpoint_config(EndpointConfigName="c1", ProductionVariants=[variant])
    assert _sm_error(lambda: sm.create_endpoint_config(EndpointConfigName="c1", ProductionVariants=[variant])) == {
        "Code": "ValidationException",
        "Message": f'Cannot create already existing endpoint configuration "{arn}:endpoint-config/c1".'}
    hosted.host.ready.clear()
    sm.create_endpoint(EndpointName="skin-lesion", EndpointConfigName="c1")
    assert _sm_error(lambda: sm.update_endpoint(EndpointName="skin-lesion", EndpointConfigName="c1"))[
        "Message"] == f'Cannot update in-progress endpoint "{arn}:endpoint/skin-lesion".'
    hosted.host.ready.set()
    _wait_in_service()
    assert _sm_error(lambda: sm.create_endpoint(EndpointName="skin-lesion", EndpointConfigName="c1"))[
        "Message"] == f'Cannot create already existing endpoint "{arn}:endpoint/skin-lesion".'


def _blue_green(routing: dict[str, Any], termination: int = 600, timeout: int = 4200) -> dict[str, Any]:
    return {"BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": routing, "TerminationWaitInSeconds": termination,
                                      "MaximumExecutionTimeoutInSeconds": timeout}}


@pytest.mark.parametrize(("instances", "config", "message"), [
    # the old handler's request for the default one-instance fleet
    (1, _blue_green({"Type": "CANARY", "WaitIntervalInSeconds": 600,
                     "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10}}), "CanarySize"),
    (4, _blue_green({"Type": "CANARY", "WaitIntervalInSeconds": 600,
                     "CanarySize": {"Type": "INSTANCE_COUNT", "Value": 3}}), "CanarySize"),
    (1, _blue_green({"Type": "LINEAR", "WaitIntervalInSeconds": 600,
                     "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 10}}), "LinearStepSize"),
    (20, _blue_green({"Type": "LINEAR", "WaitIntervalInSeconds": 600,
                      "LinearStepSize": {"Type": "INSTANCE_COUNT", "Value": 1}}), "LinearStepSize"),
    # the old handler's timeout for LINEAR 10 % of ten instances: 4200 s against 6600 s of waits
    (10, _blue_green({"Type": "LINEAR", "WaitIntervalInSeconds": 600,
                      "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 10}}),
     "MaximumExecutionTimeoutInSeconds"),
    (1, _blue_green({"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 600}, timeout=30000),
     "1 validation error detected: Value '30000' at 'deploymentConfig.blueGreenUpdatePolicy."
     "maximumExecutionTimeoutInSeconds' failed to satisfy constraint: Member must have value less than or equal to "
     "28800"),
    (1, _blue_green({"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 4000}),
     "Member must have value less than or equal to 3600"),
])
def test_local_hosting_enforces_the_blue_green_rules(hosted: Any, instances: int, config: dict[str, Any],
                                                     message: str) -> None:
    """Defect 6 in local mode: UpdateEndpoint refuses what SageMaker refuses, with a ValidationException."""
    sm = boto3.client("sagemaker")
    _model()
    variant = {"VariantName": "AllTraffic", "ModelName": "m1", "InstanceType": "ml.c5.xlarge",
               "InitialInstanceCount": instances}
    sm.create_endpoint_config(EndpointConfigName="c1", ProductionVariants=[variant])
    sm.create_endpoint_config(EndpointConfigName="c2", ProductionVariants=[variant])
    sm.create_endpoint(EndpointName="skin-lesion", EndpointConfigName="c1")
    _wait_in_service()
    error = _sm_error(lambda: sm.update_endpoint(EndpointName="skin-lesion", EndpointConfigName="c2",
                                                 DeploymentConfig=config))
    assert error["Code"] == "ValidationException" and message in error["Message"]


def test_handlers_deploy_and_update_against_local_hosting(hosted: Any, monkeypatch) -> None:
    """The whole handler path on the default one-instance fleet: created, then a valid blue/green update."""
    sm = boto3.client("sagemaker")
    create = load_handler("create_model_config", CREATE_ENV, monkeypatch)
    update = load_handler("update_endpoint", UPDATE_ENV, monkeypatch)
    first = create.lambda_handler(_approved_package(), Context())
    assert update.lambda_handler(first, Context())["action"] == "created"
    _wait_in_service()
    group = "skin-lesion-models"
    spec = sm.describe_model_package(ModelPackageName=first["modelPackageArn"])["InferenceSpecification"]
    arn = sm.create_model_package(ModelPackageGroupName=group, InferenceSpecification=spec,
                                  ModelApprovalStatus="Approved")["ModelPackageArn"]
    second = create.lambda_handler({"ModelPackageArn": arn, "ModelPackageGroupName": group, "ModelPackageVersion": 2,
                                    "ModelApprovalStatus": "Approved"}, Context())
    out = update.lambda_handler(second, Context())
    assert out["action"] == "updated" and out["trafficRouting"] == "ALL_AT_ONCE"
    _wait_in_service()
    assert sm.describe_endpoint(EndpointName="skin-lesion")["EndpointConfigName"] == second["endpointConfigName"]
    assert [c for c, _ in hosted.host.calls] == ["start", "swap"]


def test_a_config_not_yet_visible_is_retryable_in_local_mode(hosted: Any, monkeypatch) -> None:
    """Defect 9 in local mode: CreateEndpoint right after CreateEndpointConfig may not see it (AWS documents it)."""
    import time

    hosted.config_visible_after_s = 0.5
    create = load_handler("create_model_config", CREATE_ENV, monkeypatch)
    update = load_handler("update_endpoint", UPDATE_ENV, monkeypatch)
    model = create.lambda_handler(_approved_package(), Context())
    # (DescribeEndpointConfig, a strongly consistent read here, sees it: the failure comes from CreateEndpoint)
    with pytest.raises(Exception) as info:
        update.lambda_handler(model, Context())
    assert type(info.value).__name__ == "EndpointConfigNotVisibleError"
    time.sleep(0.6)
    assert update.lambda_handler(model, Context())["action"] == "created"  # the state machine's retry


def test_a_later_edit_of_an_approved_package_stays_approved_and_is_announced(hosted: Any) -> None:
    """UpdateModelPackage changes what it names only (moto dropped the approval), so the edit's event matches the
    deployment rule again: the reason the deployment takes a per-version lock (defect 5)."""
    sm = boto3.client("sagemaker")
    arn = _approved_package()["ModelPackageArn"]
    sm.update_model_package(ModelPackageArn=arn, CustomerMetadataProperties={"note": "edited"})
    package = sm.describe_model_package(ModelPackageName=arn)
    assert package["ModelApprovalStatus"] == "Approved"
    detail_type, detail, resources = hosted.events[-1]
    assert detail_type == "SageMaker Model Package State Change" and resources == [arn]
    assert (detail["ModelApprovalStatus"], detail["ModelPackageStatus"]) == ("Approved", "Completed")
