"""Service rules that a real deployment enforces, enforced by local mode too, and the template's own guards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from localmode import LocalCloud
from localmode.cloud import REGION
from localmode.lambdas import ENVIRONMENT_LIMIT_BYTES, check_environment_size, environment_size
from localmode.template import Resolver, TemplateRuleError, function_environment, load_template
from tools.redrive_failed_events import main as redrive_main
from tools.redrive_failed_events import parse_message, redrive_queue, send

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "template.yaml")
PSEUDO = {"AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012", "AWS::StackName": "s",
          "AWS::Partition": "aws"}
IMAGES = {"TrainingImageUri": "t", "InferenceImageUri": "i"}
FUNCTIONS = sorted(k for k, v in TEMPLATE["Resources"].items() if v["Type"] == "AWS::Serverless::Function")


# ------------------------------------------------------------------ Rules (defect 11)
@pytest.mark.parametrize(("subnets", "groups", "ok"), [
    ("", "", True),
    ("subnet-1,subnet-2", "sg-1", True),
    ("subnet-1", "", False),
])
def test_subnets_without_security_groups_fail_before_anything_is_created(subnets: str, groups: str, ok: bool) -> None:
    resolver = Resolver(TEMPLATE, {**IMAGES, "SubnetIds": subnets, "SecurityGroupIds": groups}, PSEUDO)
    if ok:
        resolver.check_rules()
    else:
        with pytest.raises(TemplateRuleError, match="SecurityGroupIds must name at least one security group"):
            resolver.check_rules()


def test_local_cloud_refuses_the_same_combination(tmp_path: Path) -> None:
    with pytest.raises(TemplateRuleError):
        LocalCloud(work_dir=tmp_path, parameters={"SubnetIds": "subnet-1", "SecurityGroupIds": ""})


# ------------------------------------------------------------------ Lambda's 4 KB environment (defect 10)
def test_environment_limit_is_lambdas_error() -> None:
    check_environment_size("f", {"A": "x" * 4000})
    with pytest.raises(ClientError) as info:
        check_environment_size("f", {"A": "x" * 4100})
    assert info.value.response["Error"]["Code"] == "InvalidParameterValueException"
    assert "exceeded the 4KB limit" in info.value.response["Error"]["Message"]


@pytest.mark.parametrize("logical_id", FUNCTIONS)
def test_every_environment_leaves_room_under_4_kb(logical_id: str) -> None:
    """With long real-world values (a long stack name, ECR URIs with digests, three subnets and groups), every
    function's environment stays under Lambda's limit with a quarter to spare."""
    long = {
        "TrainingImageUri": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/skin-lesion-training@sha256:" + "a" * 64,
        "InferenceImageUri": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/skin-lesion-inference@sha256:" + "b" * 64,
        "SubnetIds": ",".join(f"subnet-{i:017x}" for i in range(3)),
        "SecurityGroupIds": ",".join(f"sg-{i:017x}" for i in range(3)),
    }
    env = function_environment(TEMPLATE, logical_id, long, stack_name="hospital-dermatology-production-stack")
    assert environment_size(env) < 0.75 * ENVIRONMENT_LIMIT_BYTES, (logical_id, environment_size(env))


# ------------------------------------------------------------------ stateful resources are kept (cfn-lint I3011)
def test_stateful_resources_are_retained() -> None:
    kinds = {"AWS::KMS::Key", "AWS::S3::Bucket", "AWS::DynamoDB::Table", "AWS::SQS::Queue"}
    stateful = {k: v for k, v in TEMPLATE["Resources"].items() if v["Type"] in kinds}
    assert {"DataKey", "DataBucket", "ArtifactsBucket", "ManifestTable"} <= set(stateful)
    for name, res in stateful.items():
        assert res.get("DeletionPolicy") == "Retain", name
        assert res.get("UpdateReplacePolicy") == "Retain", name


def test_cfn_lint_informational_checks_pass() -> None:
    cfn_lint = str(Path(sys.executable).parent / "cfn-lint")
    result = subprocess.run([cfn_lint, "--include-checks", "I", "--", str(REPO / "template.yaml")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ lost events become visible (defect 14)
def _async_functions() -> list[str]:
    """Functions that an EventBridge rule or schedule invokes (asynchronously, by Lambda's definition)."""
    return [k for k in FUNCTIONS if any(e["Type"] in ("EventBridgeRule", "Schedule", "ScheduleV2", "CloudWatchEvent")
                                       for e in TEMPLATE["Resources"][k]["Properties"].get("Events", {}).values())]


@pytest.mark.parametrize("logical_id", _async_functions())
def test_every_async_function_has_an_on_failure_destination_and_dead_letter(logical_id: str) -> None:
    props = TEMPLATE["Resources"][logical_id]["Properties"]
    on_failure = props["EventInvokeConfig"]["DestinationConfig"]["OnFailure"]
    assert on_failure == {"Type": "SQS", "Destination": {"Fn::GetAtt": ["FailedEventsQueue", "Arn"]}}
    for event in props["Events"].values():
        assert event["Properties"]["DeadLetterConfig"] == {"Arn": {"Fn::GetAtt": ["FailedEventsQueue", "Arn"]}}


def test_failed_events_queue_is_encrypted_and_alarmed() -> None:
    resources = TEMPLATE["Resources"]
    assert resources["FailedEventsQueue"]["Properties"]["KmsMasterKeyId"] == {"Ref": "DataKey"}
    alarm = resources["FailedEventsAlarm"]["Properties"]
    assert alarm["Dimensions"][0]["Value"] == {"Fn::GetAtt": ["FailedEventsQueue", "QueueName"]}
    assert alarm["AlarmActions"] == [{"Ref": "NotificationTopic"}]


class _Recorder:
    """Stands in for the Lambda and Step Functions clients: records what would be sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def invoke(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("invoke", kwargs))
        return {"StatusCode": 202}

    def start_execution(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("start_execution", kwargs))
        return {"executionArn": "arn"}


def test_failed_async_invocation_lands_in_the_queue_and_is_redriven(tmp_path: Path) -> None:
    """Local mode retries a failing asynchronous invocation twice, as Lambda does, then sends Lambda's on-failure
    record to the queue; the re-drive tool invokes the function again with the original event."""
    with LocalCloud(work_dir=tmp_path / "local") as cloud:
        rule = next(r for r in cloud.bus.rules if r.name == "ValidateImageFunctionUpload")
        bad_event = {"detail-type": "Object Created", "detail": {"not": "an s3 event"}}
        with pytest.raises(RuntimeError, match="InvalidRequestError"):
            cloud._deliver(rule, json.dumps(bad_event))
        spec = cloud.runtime.find("ValidateImageFunction")
        assert len(spec.invocations) == 3
        queue_url = cloud.output("FailedEventsQueueUrl")
        sqs = boto3.client("sqs", region_name=REGION)
        recorder = _Recorder()
        report = redrive_queue(sqs, recorder, recorder, queue_url)
        assert len(report.sent) == 1 and not report.kept
        (kind, call), = recorder.calls
        assert kind == "invoke" and call["InvocationType"] == "Event"
        assert call["FunctionName"] == spec.arn
        assert json.loads(call["Payload"]) == bad_event
        assert sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0).get("Messages", []) == []


def test_dead_letter_of_a_state_machine_target_starts_an_execution_with_the_rules_input() -> None:
    """A dead letter holds the event; the target's input is rebuilt with the rule's InputTransformer."""
    from moto import mock_aws

    machine = "arn:aws:states:eu-west-1:123456789012:stateMachine:s-retraining"
    with mock_aws():
        events = boto3.client("events", region_name="eu-west-1")
        rule_arn = events.put_rule(Name="s-Manual-X", EventPattern='{"source": ["p.pipeline"]}')["RuleArn"]
        events.put_targets(Rule="s-Manual-X", Targets=[{"Id": "t", "Arn": machine, "InputTransformer": {
            "InputPathsMap": {"reason": "$.detail.reason"},
            "InputTemplate": '{"trigger": {"type": "manual", "reason": <reason>}}'}}])
        event = {"source": "p.pipeline", "detail-type": "RetrainingRequested", "detail": {"reason": "new data"}}
        message = {"MessageId": "m1", "Body": json.dumps(event), "MessageAttributes": {
            "TARGET_ARN": {"StringValue": machine, "DataType": "String"},
            "RULE_ARN": {"StringValue": rule_arn, "DataType": "String"}}}
        redrive = parse_message(message)
        assert (redrive.kind, redrive.target, redrive.rule_arn) == ("states", machine, rule_arn)
        recorder = _Recorder()
        send(redrive, recorder, recorder, events)
    (kind, call), = recorder.calls
    assert kind == "start_execution" and call["stateMachineArn"] == machine
    assert json.loads(call["input"]) == {"trigger": {"type": "manual", "reason": "new data"}}


def test_unknown_message_is_kept_and_reported(capsys: pytest.CaptureFixture[str]) -> None:
    from moto import mock_aws

    with mock_aws():
        sqs = boto3.client("sqs", region_name="eu-west-1")
        url = sqs.create_queue(QueueName="q")["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="not json")
        recorder = _Recorder()
        report = redrive_queue(sqs, recorder, recorder, url)
        assert report.sent == [] and len(report.kept) == 1 and recorder.calls == []
        assert len(sqs.receive_message(QueueUrl=url, VisibilityTimeout=0).get("Messages", [])) == 0  # still in flight


def test_redrive_cli_without_credentials_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    code = redrive_main(["--queue-url", "https://sqs.eu-west-1.amazonaws.com/123456789012/q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: no AWS credentials")


@pytest.mark.parametrize("logical_id", sorted(k for k, v in TEMPLATE["Resources"].items()
                                              if v["Type"] == "AWS::Serverless::StateMachine"))
def test_every_rule_that_starts_an_execution_has_a_dead_letter_queue(logical_id: str) -> None:
    """A trigger EventBridge cannot deliver (throttled StartExecution, a role problem) waits in the queue."""
    events = TEMPLATE["Resources"][logical_id]["Properties"].get("Events", {})
    assert events
    for name, event in events.items():
        assert event["Properties"]["DeadLetterConfig"] == {"Arn": {"Fn::GetAtt": ["FailedEventsQueue", "Arn"]}}, name
