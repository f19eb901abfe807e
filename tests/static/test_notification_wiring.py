"""The notification states and their function: each composes, publishes, and falls back to a plain message; the
function can name every failing function's log group and read both machines' histories."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from localmode.template import Resolver, load_template
from tests.unit.handlers import load_handler

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "template.yaml")
RESOURCES = TEMPLATE["Resources"]
COMPOSE = RESOURCES["ComposeNotificationFunction"]["Properties"]
MACHINES = {lid: r["Properties"] for lid, r in RESOURCES.items() if r["Type"] == "AWS::Serverless::StateMachine"}
PSEUDO = {"AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012", "AWS::StackName": "skin-lesion",
          "AWS::Partition": "aws"}


def _states(props: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return json.loads((REPO / props["DefinitionUri"]).read_text())["States"]


def _kinds(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    app = load_handler("compose_notification", {"STACK_NAME": "s", "ARTIFACTS_BUCKET": "b",
                                                "DEPLOYMENT_LOCK_TABLE": "t", "LAMBDA_LOG_GROUPS": "{}"}, monkeypatch)
    return set(typing.get_args(app.Kind))


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_every_notification_composes_then_publishes_with_a_plain_fallback(machine: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    states = _states(MACHINES[machine])
    kinds = _kinds(monkeypatch)
    publishes = {n for n, s in states.items() if s.get("Resource") == "arn:aws:states:::sns:publish"}
    composers = {n for n, s in states.items()
                 if s.get("Parameters", {}).get("FunctionName") == "${ComposeNotificationFunctionArn}"}
    assert composers and all(n.startswith("Notify") for n in composers)
    for name in composers:
        state = states[name]
        base = name.removeprefix("Notify")
        rich, plain = states[state["Next"]], states[f"{state['Next']}Plain"]
        assert state["Parameters"]["Payload"]["kind"] in kinds
        assert state["Parameters"]["Payload"]["stateName.$"] == "$$.State.Name"
        assert state["ResultPath"] == "$.notification" and state["Next"].startswith("Publish")
        assert rich["Parameters"]["Subject.$"] == "$.notification.subject"
        assert rich["Parameters"]["Message.$"] == "$.notification.message"
        # Composing or publishing the composed text fails: the plain message goes out, and $.error stays intact.
        for catcher in state["Catch"] + rich["Catch"]:
            assert catcher["Next"] == f"{state['Next']}Plain" and catcher["ResultPath"] != "$.error"
        assert "Subject" in plain["Parameters"] and "Message.$" in plain["Parameters"]
        assert plain["Next"] == rich["Next"], base
    # Every publish is one of those pairs: no notification skips the composed text.
    assert publishes == {states[n]["Next"] for n in composers} | {f"{states[n]['Next']}Plain" for n in composers}


def test_compose_knows_the_log_group_of_every_function_a_machine_invokes() -> None:
    pairs = dict(re.findall(r'"\$\{(\w+)\}": "\$\{(\w+)\}"', COMPOSE["Environment"]["Variables"]
                            ["LAMBDA_LOG_GROUPS"]["Fn::Sub"]))
    invoked = {v["Fn::GetAtt"][0] if isinstance(v["Fn::GetAtt"], list) else v["Fn::GetAtt"].split(".")[0]
               for props in MACHINES.values() for k, v in props["DefinitionSubstitutions"].items()
               if k.endswith("FunctionArn")}
    assert set(pairs) == invoked - {"ComposeNotificationFunction"}
    for function, group in pairs.items():
        assert RESOURCES[function]["Properties"]["LoggingConfig"]["LogGroup"] == {"Ref": group}


def test_compose_may_read_the_history_of_both_machines_and_nothing_else() -> None:
    resolver = Resolver(TEMPLATE, {"TrainingImageUri": "x", "InferenceImageUri": "y"}, PSEUDO)
    (statement,) = [s for p in COMPOSE["Policies"] for s in p.get("Statement", [])
                    if "states:GetExecutionHistory" in s["Action"]]
    assert statement["Action"] == ["states:GetExecutionHistory"]
    names = {resolver.resolve(props["Name"]) for props in MACHINES.values()}
    assert set(resolver.resolve(statement["Resource"])) == {
        f"arn:aws:states:eu-west-1:123456789012:execution:{n}:*" for n in names}
