"""EventBridge as local mode needs it: rule patterns matched as EventBridge matches them, input transformers,
and delivery to the targets the template names (Lambda functions and state machines)."""

from __future__ import annotations

import ipaddress
import json
import logging
import queue
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("localmode.events")


_TEXT_MATCHERS = ("prefix", "suffix", "equals-ignore-case", "wildcard")


def _match_text(op: str, arg: Any, value: str) -> bool:
    """The matchers that apply to strings only (``op`` is one of :data:`_TEXT_MATCHERS`)."""
    if op == "prefix":
        if isinstance(arg, dict):  # {"prefix": {"equals-ignore-case": "x"}}
            return value.lower().startswith(str(arg["equals-ignore-case"]).lower())
        return value.startswith(arg)
    if op == "suffix":
        if isinstance(arg, dict):
            return value.lower().endswith(str(arg["equals-ignore-case"]).lower())
        return value.endswith(arg)
    if op == "equals-ignore-case":
        return value.lower() == str(arg).lower()
    regex = "^" + ".*".join(re.escape(part) for part in str(arg).split("*")) + "$"  # wildcard
    return re.match(regex, value, re.DOTALL) is not None


def _match_value(matcher: Any, value: Any, present: bool) -> bool:
    """Does one element of a pattern's list match the event's value?"""
    if isinstance(matcher, dict):
        (op, arg), = matcher.items()
        if op == "exists":
            return present == bool(arg)
        if not present:
            return False
        if op in _TEXT_MATCHERS:
            return isinstance(value, str) and _match_text(op, arg, value)
        if op == "anything-but":
            if isinstance(arg, dict):
                return not _match_value(arg, value, present)
            excluded = arg if isinstance(arg, list) else [arg]
            return value not in excluded
        if op == "numeric":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            ops = {"=": float.__eq__, "<": float.__lt__, "<=": float.__le__, ">": float.__gt__, ">=": float.__ge__}
            return all(ops[arg[i]](float(value), float(arg[i + 1])) for i in range(0, len(arg), 2))
        if op == "cidr":
            try:
                return ipaddress.ip_address(str(value)) in ipaddress.ip_network(arg, strict=False)
            except ValueError:
                return False
        raise ValueError(f"unsupported EventBridge matcher {op!r}")
    return present and value == matcher


def pattern_matches(pattern: dict[str, Any], event: Any) -> bool:
    """EventBridge's matching: every key must match; a list means any of; an event array matches if any item does.

    Parameters
    ----------
    pattern : dict
        An event pattern (``source``, ``detail-type``, ``detail``..., with ``$or`` supported).
    event : dict
        The event (or a nested part of it).
    """
    if not isinstance(event, dict):
        return False
    for key, expected in pattern.items():
        if key == "$or":
            if not any(pattern_matches(alternative, event) for alternative in expected):
                return False
            continue
        present = key in event
        value = event.get(key)
        if isinstance(expected, dict):
            if not present or not pattern_matches(expected, value):
                return False
            continue
        if not isinstance(expected, list):
            raise ValueError(f"pattern value for {key!r} must be a list or an object")
        values = value if isinstance(value, list) and value else [value]
        if not any(_match_value(m, v, present) for m in expected for v in values):
            return False
    return True


def _json_path(document: Any, path: str) -> Any:
    """Resolve the simple ``$.a.b[0]`` paths InputPath and InputPathsMap use."""
    if path == "$":
        return document
    current = document
    for part in re.findall(r"\.([^.\[\]]+)|\[(\d+)\]", path[1:]):
        name, index = part
        if current is None:
            return None
        current = current.get(name) if name else (current[int(index)] if int(index) < len(current) else None)
    return current


def transform_input(transformer: dict[str, Any], event: dict[str, Any]) -> str:
    """Apply an InputTransformer: a placeholder inside a JSON string takes the raw text, outside it the JSON value."""
    values = {name: _json_path(event, path) for name, path in transformer.get("InputPathsMap", {}).items()}
    template: str = transformer["InputTemplate"]
    out: list[str] = []
    in_string = False
    i = 0
    while i < len(template):
        ch = template[i]
        match = re.match(r"<([A-Za-z0-9_.-]+)>", template[i:]) if ch == "<" else None
        if match and match.group(1) in values:
            value = values[match.group(1)]
            if in_string:
                text = value if isinstance(value, str) else json.dumps(value)
                out.append(json.dumps(text)[1:-1])
            else:
                out.append(json.dumps(value))
            i += match.end()
            continue
        if ch == '"' and (i == 0 or template[i - 1] != "\\"):
            in_string = not in_string
        out.append(ch)
        i += 1
    return "".join(out)


@dataclass
class Rule:
    """One rule with one target, as SAM's ``Events`` or an ``AWS::Events::Rule`` declares it."""

    name: str
    target_kind: str  # "lambda" | "states"
    target: str  # function name or state machine ARN
    pattern: dict[str, Any] | None = None
    schedule: str | None = None
    enabled: bool = True
    input: str | None = None
    input_path: str | None = None
    input_transformer: dict[str, Any] | None = None
    deliveries: list[dict[str, Any]] = field(default_factory=list)

    def payload(self, event: dict[str, Any]) -> str:
        """What the target receives for this event."""
        if self.input is not None:
            return self.input
        if self.input_transformer is not None:
            return transform_input(self.input_transformer, event)
        if self.input_path is not None:
            return json.dumps(_json_path(event, self.input_path))
        return json.dumps(event)


def envelope(source: str, detail_type: str, detail: dict[str, Any], *, account: str, region: str,
             resources: list[str] | None = None) -> dict[str, Any]:
    """An event as EventBridge delivers it."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": source,
        "account": account,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": resources or [],
        "detail": detail,
    }


class LocalEventBus:
    """The default bus: events are queued and delivered by one worker thread, asynchronously as on AWS.

    Parameters
    ----------
    deliver : callable
        ``deliver(rule, payload_json)`` runs the target; an exception is logged and counted as a failed delivery.
    """

    def __init__(self, deliver: Callable[[Rule, str], None]):
        self.rules: list[Rule] = []
        self.history: list[dict[str, Any]] = []
        self._deliver = deliver
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="local-eventbridge", daemon=True)
        self._worker.start()

    def put(self, event: dict[str, Any]) -> None:
        """Accept an event for asynchronous delivery."""
        self._queue.put(json.loads(json.dumps(event, default=str)))

    def matching_rules(self, event: dict[str, Any]) -> list[Rule]:
        """The enabled pattern rules this event matches."""
        return [r for r in self.rules if r.enabled and r.pattern is not None and pattern_matches(r.pattern, event)]

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                self._queue.task_done()
                return
            try:
                self.history.append(event)
                for rule in self.matching_rules(event):
                    self.dispatch(rule, event)
            finally:
                self._queue.task_done()

    def dispatch(self, rule: Rule, event: dict[str, Any]) -> None:
        """Deliver one event to one rule's target, recording the outcome."""
        record: dict[str, Any] = {"event_id": event.get("id"), "detail-type": event.get("detail-type")}
        try:
            self._deliver(rule, rule.payload(event))
            record["ok"] = True
        except Exception as err:  # noqa: BLE001 - a failed target must not stop the bus
            log.exception("delivery of %s to %s failed", event.get("detail-type"), rule.name)
            record.update(ok=False, error=f"{type(err).__name__}: {err}")
        rule.deliveries.append(record)

    def fire_schedule(self, rule_name: str, *, account: str, region: str) -> None:
        """Deliver a ``Scheduled Event`` to a schedule rule now (local mode has no clock-driven scheduler)."""
        rule = next(r for r in self.rules if r.name == rule_name and r.schedule)
        if not rule.enabled:
            raise RuntimeError(f"schedule {rule_name} is disabled")
        event = envelope("aws.events", "Scheduled Event", {}, account=account, region=region,
                         resources=[f"arn:aws:events:{region}:{account}:rule/{rule_name}"])
        self.dispatch(rule, event)

    def drain(self, timeout: float = 600.0) -> None:
        """Wait until every queued event has been delivered."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        if not done.wait(timeout):
            raise TimeoutError(f"events still pending after {timeout:.0f} s")

    def close(self) -> None:
        """Stop the worker after the queued events."""
        self._queue.put(None)
        self._worker.join(timeout=60)
