"""Local mode evaluates CloudWatch alarms as CloudWatch documents it, and a state change does what it does on AWS:
an EventBridge event the template's rules match, and a message to the action topics."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from localmode import alarms, eventbridge
from localmode.template import Resolver, load_template, samconfig_parameters

REPO = Path(__file__).resolve().parents[2]
ACCOUNT, REGION = "123456789012", "us-east-1"
NOW = datetime(2026, 12, 6, 10, 30, tzinfo=UTC)

DRIFT = {"ComparisonOperator": "GreaterThanOrEqualToThreshold", "Threshold": 1.0, "EvaluationPeriods": 1,
         "Period": 3600, "Statistic": "Maximum", "TreatMissingData": "notBreaching"}


def periods(*values: float | None) -> list[tuple[datetime, float | None]]:
    start = NOW - timedelta(hours=len(values))
    return [(start + timedelta(hours=i), v) for i, v in enumerate(values)]


def test_a_breaching_datapoint_sets_alarm_with_cloudwatchs_reason() -> None:
    state, reason, data = alarms.evaluate(DRIFT, periods(2.4)) or ("", "", {})
    assert state == "ALARM"
    assert reason.startswith("Threshold Crossed: 1 out of the last 1 datapoints [2.4 (")
    assert "was greater than or equal to the threshold (1.0)" in reason
    assert data["recentDatapoints"] == [2.4] and data["threshold"] == 1.0 and data["statistic"] == "Maximum"


def test_a_datapoint_under_the_threshold_is_ok() -> None:
    state, reason, _ = alarms.evaluate(DRIFT, periods(0.4)) or ("", "", {})
    assert state == "OK" and "was not greater than or equal to the threshold" in reason


@pytest.mark.parametrize(("treat", "expected"), [
    ("missing", "INSUFFICIENT_DATA"), (None, "INSUFFICIENT_DATA"), ("notBreaching", "OK"), ("breaching", "ALARM"),
    ("ignore", None)])
def test_missing_data_is_treated_as_configured(treat: str | None, expected: str | None) -> None:
    verdict = alarms.evaluate({**DRIFT, "TreatMissingData": treat}, periods(None))
    assert (verdict[0] if verdict else None) == expected


def test_m_out_of_n_needs_m_breaching_periods() -> None:
    alarm = {**DRIFT, "EvaluationPeriods": 3, "DatapointsToAlarm": 2}
    assert alarms.evaluate(alarm, periods(2.0, 0.1, 0.2))[0] == "OK"  # type: ignore[index]
    assert alarms.evaluate(alarm, periods(2.0, 0.1, 3.0))[0] == "ALARM"  # type: ignore[index]


def test_less_than_alarms_and_percentiles() -> None:
    quality = {**DRIFT, "ComparisonOperator": "LessThanThreshold", "Threshold": 0.5, "Statistic": "Minimum"}
    assert alarms.evaluate(quality, periods(0.3))[0] == "ALARM"  # type: ignore[index]
    assert alarms.statistic([float(v) for v in range(1, 101)], "p99") == 99.0
    assert alarms.statistic([1.0, 5.0, 3.0], "Minimum") == 1.0


def _drift_rule() -> dict[str, Any]:
    """The template's drift-alarm rule (pattern and input transformer), resolved as local mode deploys it."""
    template = load_template(REPO / "template.yaml")
    pseudo = {"AWS::Region": REGION, "AWS::AccountId": ACCOUNT, "AWS::StackName": "stack", "AWS::Partition": "aws",
              "AWS::URLSuffix": "amazonaws.com"}
    resolver = Resolver(template, samconfig_parameters(REPO / "samconfig.toml", "local"), pseudo)
    events = template["Resources"]["RetrainingStateMachine"]["Properties"]["Events"]
    props = events["DriftAlarm"]["Properties"]
    return {"Pattern": {k: v for k, v in props["Pattern"].items() if k != "resources"},
            "InputTransformer": resolver.resolve(props["InputTransformer"])}


@mock_aws
def test_a_state_change_reaches_the_rule_and_the_topic() -> None:
    sns, sqs, cw = (boto3.client(s, region_name=REGION) for s in ("sns", "sqs", "cloudwatch"))
    topic = sns.create_topic(Name="notify")["TopicArn"]
    queue = sqs.create_queue(QueueName="inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    cw.put_metric_alarm(AlarmName="stack-image-drift", Namespace="SkinLesion/Monitoring", MetricName="DriftScore",
                        Statistic="Maximum", Period=3600, EvaluationPeriods=1, Threshold=1.0,
                        ComparisonOperator="GreaterThanOrEqualToThreshold", TreatMissingData="notBreaching",
                        AlarmActions=[topic], AlarmDescription="drift")
    events: list[dict[str, Any]] = []
    undo = alarms.install(events.append, ACCOUNT, REGION)
    try:
        evaluator = alarms.AlarmEvaluator(ACCOUNT, REGION, clock=lambda: datetime.now(UTC))
        cw.put_metric_data(Namespace="SkinLesion/Monitoring", MetricData=[{"MetricName": "DriftScore", "Value": 0.3}])
        # moto creates the alarm OK; the first evaluation agrees, so nothing is sent
        assert evaluator.evaluate_all() == [] and events == []
        cw.put_metric_data(Namespace="SkinLesion/Monitoring", MetricData=[{"MetricName": "DriftScore", "Value": 4.2}])
        # another metric of the same name but other dimensions is another metric
        cw.put_metric_data(Namespace="SkinLesion/Monitoring", MetricData=[
            {"MetricName": "DriftScore", "Value": 99.0, "Dimensions": [{"Name": "service", "Value": "x"}]}])
        assert evaluator.evaluate_all() == [("stack-image-drift", "ALARM")]
        assert evaluator.evaluate_all() == []  # no change, no second event
        described = cw.describe_alarms(AlarmNames=["stack-image-drift"])["MetricAlarms"][0]
        assert described["StateValue"] == "ALARM" and "[4.2 (" in described["StateReason"]

        (event,) = events
        assert event["source"] == "aws.cloudwatch" and event["detail-type"] == "CloudWatch Alarm State Change"
        assert event["detail"]["previousState"]["value"] == "OK"
        rule = _drift_rule()
        pattern = {**rule["Pattern"], "resources": [described["AlarmArn"]]}  # the template's GetAtt, resolved
        assert eventbridge.pattern_matches(pattern, event)
        trigger = json.loads(eventbridge.transform_input(rule["InputTransformer"], event))["trigger"]
        assert trigger["type"] == "drift-alarm" and trigger["alarm"] == "stack-image-drift"
        assert trigger["reason"] == described["StateReason"]

        (message,) = sqs.receive_message(QueueUrl=queue)["Messages"]
        body = json.loads(message["Body"])
        assert body["Subject"] == 'ALARM: "stack-image-drift" in US East (N. Virginia)'
        alarm_message = json.loads(body["Message"])
        assert alarm_message["NewStateValue"] == "ALARM" and alarm_message["OldStateValue"] == "OK"
        assert alarm_message["Trigger"]["MetricName"] == "DriftScore"

        # An operator's set-alarm-state does the same (rehearsing the drift path without drift).
        cw.set_alarm_state(AlarmName="stack-image-drift", StateValue="OK", StateReason="rehearsal over")
        assert [e["detail"]["state"]["value"] for e in events] == ["ALARM", "OK"]
        assert "Messages" not in sqs.receive_message(QueueUrl=queue)  # no OKActions configured
    finally:
        undo()
