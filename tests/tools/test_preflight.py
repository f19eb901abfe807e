"""``python -m tools.preflight`` against botocore's Stubber: what each answer of AWS makes of each check."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from tests.tools.helpers import assert_all_flags_have_help
from tools import preflight
from tools.preflight import Settings, check_image, check_quotas, check_subscription

ACCOUNT = "123456789012"
TRAIN_URI = f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com/skin-lesion-training:abc1234"
INFER_URI = f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com/skin-lesion-inference@sha256:" + "a" * 64
TOPIC = f"arn:aws:sns:eu-west-1:{ACCOUNT}:skin-lesion-NotificationTopic-X"


def _client(name: str) -> Any:
    return boto3.client(name, region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x")


class FakeSession:
    """A boto3 Session whose clients are stubbed; ``stubs[name]`` queues their answers."""

    def __init__(self, region: str | None = "eu-west-1"):
        self.region_name = region
        self.clients: dict[str, Any] = {}
        self.stubs: dict[str, Stubber] = {}

    def stub(self, name: str) -> Stubber:
        if name not in self.stubs:
            self.clients[name] = _client(name)
            self.stubs[name] = Stubber(self.clients[name])
            self.stubs[name].activate()
        return self.stubs[name]

    def client(self, name: str, region_name: str | None = None) -> Any:
        self.stub(name)
        return self.clients[name]


def _quota(name: str, code: str, value: float) -> dict[str, Any]:
    return {"ServiceCode": "sagemaker", "QuotaName": name, "QuotaCode": code, "Value": value}


def _settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {"region": "eu-west-1", "training_instance_type": "ml.g5.xlarge",
                            "training_instance_count": 1, "spot": True, "endpoint_instance_type": "ml.c5.xlarge",
                            "endpoint_instances": 5}
    return Settings(**{**base, **kw})


def _stub_quotas(stub: Stubber, applied: list[dict[str, Any]], defaults: list[dict[str, Any]]) -> None:
    stub.add_response("list_service_quotas", {"Quotas": applied}, {"ServiceCode": "sagemaker"})
    stub.add_response("list_aws_default_service_quotas", {"Quotas": defaults}, {"ServiceCode": "sagemaker"})


def _stub_all_good(session: FakeSession) -> None:
    session.stub("sts").add_response("get_caller_identity", {
        "UserId": "AIDA", "Account": ACCOUNT, "Arn": f"arn:aws:iam::{ACCOUNT}:user/jane"})
    _stub_quotas(session.stub("service-quotas"),
                 [_quota("ml.g5.xlarge for spot training job usage", "L-SPOT", 2)],
                 [_quota("ml.g5.xlarge for spot training job usage", "L-SPOT", 0),
                  _quota("ml.c5.xlarge for endpoint usage", "L-EP", 20)])
    for _ in range(2):
        session.stub("ecr").add_response("describe_images", {"imageDetails": []})


def test_every_flag_has_help() -> None:
    assert_all_flags_have_help(preflight.build_parser())


def test_all_good_exits_zero(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    session = FakeSession()
    _stub_all_good(session)
    code = preflight.main(["--training-image-uri", TRAIN_URI, "--inference-image-uri", INFER_URI],
                          session=session)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert f"ok    credentials account {ACCOUNT}" in out
    # The applied value (2) wins over the default (0); the endpoint quota is only among the defaults.
    assert "'ml.g5.xlarge for spot training job usage' is 2 (training needs 1)" in out
    assert "'ml.c5.xlarge for endpoint usage' is 20" in out
    assert out.count("exists") == 2
    assert "skip  e-mail" in out  # no stack yet
    for stub in session.stubs.values():
        stub.assert_no_pending_responses()


def test_no_credentials(capsys: pytest.CaptureFixture[str], no_credentials: None) -> None:
    code = preflight.main([], session=boto3.Session(region_name="eu-west-1"))
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAIL  credentials no AWS credentials found" in out and "aws sso login" in out
    assert len(out.splitlines()) == 1  # nothing else is tried without credentials
    assert err.startswith("error: 1 check(s) failed")


def test_no_region(capsys: pytest.CaptureFixture[str]) -> None:
    assert preflight.main([], session=FakeSession(region=None)) == 1
    assert "FAIL  region      no AWS region: set AWS_REGION" in capsys.readouterr().out


def test_zero_quota_says_how_to_request_it() -> None:
    quotas = _client("service-quotas")
    with Stubber(quotas) as stub:
        _stub_quotas(stub, [], [_quota("ml.g5.xlarge for spot training job usage", "L-SPOT", 0),
                                _quota("ml.c5.xlarge for endpoint usage", "L-EP", 2)])
        checks = check_quotas(quotas, _settings())
    assert [c.status for c in checks] == ["FAIL", "FAIL"]
    assert ("request-service-quota-increase --service-code sagemaker --quota-code L-SPOT --desired-value 1"
            in checks[0].detail)
    assert "is 2 but endpoint" in checks[1].detail and "--quota-code L-EP --desired-value 5" in checks[1].detail


def test_on_demand_training_checks_the_on_demand_quota() -> None:
    quotas = _client("service-quotas")
    with Stubber(quotas) as stub:
        _stub_quotas(stub, [], [_quota("ml.g5.xlarge for spot training job usage", "L-SPOT", 0),
                                _quota("ml.g5.xlarge for training job usage", "L-OD", 1),
                                _quota("ml.c5.xlarge for endpoint usage", "L-EP", 5)])
        checks = check_quotas(quotas, _settings(spot=False))
    assert [c.status for c in checks] == ["ok", "ok"]


def test_unknown_instance_type() -> None:
    quotas = _client("service-quotas")
    with Stubber(quotas) as stub:
        _stub_quotas(stub, [], [_quota("ml.c5.xlarge for endpoint usage", "L-EP", 5)])
        checks = check_quotas(quotas, _settings(training_instance_type="ml.g5.xlargee"))
    assert checks[0].status == "FAIL" and "no SageMaker quota named 'ml.g5.xlargee for spot" in checks[0].detail


@pytest.mark.parametrize(("code", "expected"), [
    ("RepositoryNotFoundException",
     "ECR repository skin-lesion-training does not exist in eu-west-1: run `make images`"),
    ("ImageNotFoundException", "is not in ECR: run `make images`"),
])
def test_missing_image(code: str, expected: str) -> None:
    ecr = _client("ecr")
    with Stubber(ecr) as stub:
        stub.add_client_error("describe_images", code, "x", 400, expected_params={
            "registryId": ACCOUNT, "repositoryName": "skin-lesion-training", "imageIds": [{"imageTag": "abc1234"}]})
        check = check_image(lambda region: ecr, "training", TRAIN_URI, "eu-west-1")
    assert check.status == "FAIL" and expected in check.detail


def test_image_uri_shape_and_region() -> None:
    def never(region: str) -> Any:
        raise AssertionError("no ECR call for a URI that cannot work")

    assert "is not an ECR image URI" in check_image(never, "training", "docker.io/me/img:1", "eu-west-1").detail
    assert "is in eu-west-1, the stack deploys to us-east-1" in check_image(never, "training", TRAIN_URI,
                                                                            "us-east-1").detail
    assert check_image(never, "training", None, "eu-west-1").status == "skip"


def test_pending_subscription_fails() -> None:
    sns = _client("sns")
    with Stubber(sns) as stub:
        stub.add_response("list_subscriptions_by_topic", {"Subscriptions": [
            {"SubscriptionArn": "PendingConfirmation", "Protocol": "email", "Endpoint": "jane@example.org",
             "TopicArn": TOPIC, "Owner": ACCOUNT}]}, {"TopicArn": TOPIC})
        check = check_subscription(sns, TOPIC)
    assert check.status == "FAIL"
    assert "jane@example.org is pending: click 'Confirm subscription'" in check.detail


def test_stack_supplies_image_uris_and_topic(capsys: pytest.CaptureFixture[str]) -> None:
    session = FakeSession()
    _stub_all_good(session)
    session.stub("cloudformation").add_response("describe_stacks", {"Stacks": [{
        "StackName": "skin-lesion", "CreationTime": "2024-01-01T00:00:00Z", "StackStatus": "CREATE_COMPLETE",
        "Parameters": [{"ParameterKey": "TrainingImageUri", "ParameterValue": TRAIN_URI},
                       {"ParameterKey": "InferenceImageUri", "ParameterValue": INFER_URI}],
        "Outputs": [{"OutputKey": "NotificationTopicArn", "OutputValue": TOPIC}]}]}, {"StackName": "skin-lesion"})
    session.stub("sns").add_response("list_subscriptions_by_topic", {"Subscriptions": [
        {"SubscriptionArn": f"{TOPIC}:1111", "Protocol": "email", "Endpoint": "jane@example.org",
         "TopicArn": TOPIC, "Owner": ACCOUNT}]}, {"TopicArn": TOPIC})
    code = preflight.main(["--stack", "skin-lesion"], session=session)
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"ok    training    {TRAIN_URI} exists" in out
    assert "ok    e-mail      jane@example.org confirmed" in out


def test_missing_stack_is_a_failed_check(capsys: pytest.CaptureFixture[str]) -> None:
    session = FakeSession()
    _stub_all_good(session)
    session.stub("cloudformation").add_client_error("describe_stacks", "ValidationError",
                                                    "Stack with id nope does not exist", 400)
    code = preflight.main(["--stack", "nope", "--training-image-uri", TRAIN_URI, "--inference-image-uri",
                           INFER_URI], session=session)
    assert code == 1
    assert "FAIL  stack       stack nope does not exist in region eu-west-1" in capsys.readouterr().out


def test_defaults_come_from_the_template() -> None:
    defaults = preflight.template_defaults()
    args = preflight.build_parser(defaults).parse_args([])
    settings = preflight.settings_from(args, "eu-west-1", defaults, {})
    assert settings.training_instance_type == defaults["TrainingInstanceType"]
    assert settings.endpoint_instance_type == defaults["EndpointInstanceType"]
    assert settings.spot == (defaults["UseSpotTraining"] == "true")
    args = preflight.build_parser(defaults).parse_args(["--spot", "false", "--endpoint-instance-type", "ml.m5.large"])
    settings = preflight.settings_from(args, "eu-west-1", defaults, {"TrainingInstanceType": "ml.g4dn.xlarge"})
    assert (settings.spot, settings.endpoint_instance_type, settings.training_instance_type) == (
        False, "ml.m5.large", "ml.g4dn.xlarge")
