"""Send the events in the stack's failed-events queue to their targets again, once the cause is fixed.

Two kinds of message land in that queue:

* Lambda's on-failure destination records (an asynchronous invocation whose retries ran out): the body holds
  ``requestContext.functionArn`` and ``requestPayload``; the payload is invoked again asynchronously.
* EventBridge dead-letter messages (a rule could not deliver to its target): the body is the event, and the
  message attributes ``RULE_ARN`` and ``TARGET_ARN`` name the rule and its target (a function or a state machine).
  The target's input is rebuilt from the event with the rule's own ``Input``/``InputPath``/``InputTransformer``
  (read with ListTargetsByRule), as EventBridge would have built it.

A message is deleted only after its target accepted it again; anything else stays in the queue and is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError


class RedriveError(Exception):
    """A message that cannot be sent again (unknown shape or target)."""


@dataclass
class Redrive:
    """One message's way back: which service, which target, what input."""

    kind: str  # "lambda" | "states"
    target: str
    payload: str
    rule_arn: str | None = None  # set for a dead letter: its payload is the event, before the target's input


@dataclass
class Report:
    """What a run did."""

    sent: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def parse_message(message: dict[str, Any]) -> Redrive:
    """Where one queue message goes back to.

    Raises
    ------
    RedriveError
        When the message is neither a Lambda destination record nor an EventBridge dead letter.
    """
    body = message.get("Body", "")
    attributes = message.get("MessageAttributes", {})
    target = attributes.get("TARGET_ARN", {}).get("StringValue")
    if target:
        service = target.split(":")[2] if target.count(":") >= 5 else ""
        rule = attributes.get("RULE_ARN", {}).get("StringValue")
        if service in ("lambda", "states"):
            return Redrive(service, target, body, rule)
        raise RedriveError(f"dead letter for a {service or 'unknown'} target ({target}) is not supported")
    try:
        record = json.loads(body)
    except json.JSONDecodeError as err:
        raise RedriveError("body is neither JSON nor an EventBridge dead letter") from err
    function_arn = record.get("requestContext", {}).get("functionArn") if isinstance(record, dict) else None
    if not function_arn or "requestPayload" not in record:
        raise RedriveError("body is not a Lambda on-failure record (no requestContext.functionArn/requestPayload)")
    # The record names the version that ran ("...:$LATEST"); invoke the function itself.
    parts = function_arn.split(":")
    return Redrive("lambda", ":".join(parts[:7]), json.dumps(record["requestPayload"]))


def target_input(events: Any, rule_arn: str, target_arn: str, event: str) -> str:
    """What the rule gives its target for this event (Input, InputPath or InputTransformer applied).

    Raises
    ------
    RedriveError
        When the rule no longer has that target.
    """
    from localmode.eventbridge import Rule

    rule_name = rule_arn.split("/")[-1]
    if rule_arn.count("/") > 1:  # a rule on a custom bus: rule/<bus>/<name>
        targets = events.list_targets_by_rule(Rule=rule_name, EventBusName=rule_arn.split("/")[-2])["Targets"]
    else:
        targets = events.list_targets_by_rule(Rule=rule_name)["Targets"]
    spec = next((t for t in targets if t["Arn"] == target_arn), None)
    if spec is None:
        raise RedriveError(f"rule {rule_name} no longer targets {target_arn}")
    rule = Rule(name=rule_name, target_kind="", target=target_arn, input=spec.get("Input"),
                input_path=spec.get("InputPath"), input_transformer=spec.get("InputTransformer"))
    return rule.payload(json.loads(event))


def send(redrive: Redrive, lambda_client: Any, sfn_client: Any, events: Any = None) -> None:
    """Hand one event to its target again (asynchronously, as the original delivery was)."""
    payload = redrive.payload
    if redrive.rule_arn:
        payload = target_input(events, redrive.rule_arn, redrive.target, payload)
    if redrive.kind == "lambda":
        lambda_client.invoke(FunctionName=redrive.target, InvocationType="Event", Payload=payload.encode())
    else:
        sfn_client.start_execution(stateMachineArn=redrive.target, input=payload,
                                   name=f"redrive-{uuid.uuid4().hex[:20]}")


def redrive_queue(sqs: Any, lambda_client: Any, sfn_client: Any, queue_url: str, *, events: Any = None,
                  dry_run: bool = False, limit: int = 1000) -> Report:
    """Receive up to ``limit`` messages, send each back to its target, delete those that were accepted."""
    report = Report()
    seen = 0
    while seen < limit:
        batch = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=min(10, limit - seen),
                                    MessageAttributeNames=["All"], WaitTimeSeconds=1,
                                    VisibilityTimeout=60).get("Messages", [])
        if not batch:
            break
        for message in batch:
            seen += 1
            try:
                redrive = parse_message(message)
                if not dry_run:
                    send(redrive, lambda_client, sfn_client, events)
                    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
                report.sent.append(f"{message['MessageId']} -> {redrive.target}")
            except (RedriveError, ClientError, ValueError) as err:
                report.kept.append(f"{message['MessageId']}: {err}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue-url", required=True, help="the stack's FailedEventsQueueUrl output")
    parser.add_argument("--dry-run", action="store_true", help="list where each message would go; send nothing")
    parser.add_argument("--limit", type=int, default=1000, help="most messages to handle in this run")
    args = parser.parse_args(argv)
    try:
        report = redrive_queue(boto3.client("sqs"), boto3.client("lambda"), boto3.client("stepfunctions"),
                               args.queue_url, events=boto3.client("events"), dry_run=args.dry_run,
                               limit=args.limit)
    except NoCredentialsError:
        print("error: no AWS credentials: run `aws configure` or `aws sso login`, or set AWS_PROFILE",
              file=sys.stderr)
        return 2
    except (ClientError, BotoCoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    verb = "would send" if args.dry_run else "sent"
    for line in report.sent:
        print(f"{verb} {line}")
    for line in report.kept:
        print(f"kept {line}", file=sys.stderr)
    print(f"{verb} {len(report.sent)}, kept {len(report.kept)}")
    return 1 if report.kept else 0


if __name__ == "__main__":
    raise SystemExit(main())
