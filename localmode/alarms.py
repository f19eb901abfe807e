"""CloudWatch metric alarms, evaluated: moto 5.2.5 stores alarms and datapoints but never evaluates one.

:func:`evaluate` decides an alarm's state from the statistic of each of its last ``EvaluationPeriods`` periods, as
CloudWatch documents it ("Evaluating an alarm", "Configuring how CloudWatch alarms treat missing data"): a state
change needs ``DatapointsToAlarm`` (default ``EvaluationPeriods``) breaching periods for ALARM; ``TreatMissingData``
``missing`` (the default) gives INSUFFICIENT_DATA when no period has data, ``ignore`` keeps the current state,
``breaching``/``notBreaching`` count empty periods as such. :class:`AlarmEvaluator` runs it over every metric alarm.

:func:`install` makes every state change do what CloudWatch does on one, whoever made it (the evaluator or
``aws cloudwatch set-alarm-state``): a ``CloudWatch Alarm State Change`` event on the default bus, and a message to
each action topic of the new state (``AlarmActions``, ``OKActions``, ``InsufficientDataActions``) in the JSON
CloudWatch sends to SNS. Differences from CloudWatch are listed in docs/local-mode.md.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger("localmode.alarms")

_WORDS = {
    "GreaterThanOrEqualToThreshold": ("greater than or equal to", lambda v, t: v >= t),
    "GreaterThanThreshold": ("greater than", lambda v, t: v > t),
    "LessThanThreshold": ("less than", lambda v, t: v < t),
    "LessThanOrEqualToThreshold": ("less than or equal to", lambda v, t: v <= t),
}
_REGION_NAMES = {"us-east-1": "US East (N. Virginia)", "us-east-2": "US East (Ohio)",
                 "us-west-2": "US West (Oregon)", "eu-west-1": "EU (Ireland)", "eu-central-1": "EU (Frankfurt)"}


def _utc(t: datetime) -> datetime:
    """moto keeps naive UTC datetimes in some places and aware ones in others."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _stamp(t: datetime) -> str:
    """CloudWatch's timestamp in alarm events and messages: ``2019-10-02T17:04:40.985+0000``."""
    return _utc(t).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}+0000"


def statistic(values: Sequence[float], name: str) -> float:
    """One CloudWatch statistic (``Maximum``, ``Minimum``, ``Average``, ``Sum``, ``SampleCount``, ``pNN``)."""
    if name == "Maximum":
        return max(values)
    if name == "Minimum":
        return min(values)
    if name == "Sum":
        return float(sum(values))
    if name == "SampleCount":
        return float(len(values))
    if name == "Average":
        return float(sum(values)) / len(values)
    if name.startswith("p"):
        # nearest rank, as CloudWatch computes percentiles over raw values
        ordered = sorted(values)
        rank = max(1, math.ceil(float(name[1:]) / 100 * len(ordered)))
        return ordered[rank - 1]
    raise ValueError(f"statistic {name} is not evaluated locally")


def evaluate(alarm: dict[str, Any], periods: Sequence[tuple[datetime, float | None]],
             ) -> tuple[str, str, dict[str, Any]] | None:
    """The state an alarm should be in, with CloudWatch's reason and reason data; None to keep the current one.

    Parameters
    ----------
    alarm : dict
        The alarm as ``DescribeAlarms`` returns it (``MetricAlarms`` item).
    periods : sequence of (datetime, float or None)
        Each evaluated period's start and statistic (None: no data), oldest first; ``EvaluationPeriods`` of them.
    """
    words, breaches = _WORDS[alarm["ComparisonOperator"]]
    threshold = float(alarm["Threshold"])
    needed = int(alarm.get("DatapointsToAlarm") or alarm["EvaluationPeriods"])
    treat = alarm.get("TreatMissingData") or "missing"
    stat = alarm.get("ExtendedStatistic") or alarm.get("Statistic")
    present = [(t, v) for t, v in periods if v is not None]
    data = {"version": "1.0", "queryDate": _stamp(datetime.now(UTC)),
            "startDate": _stamp(periods[0][0]) if periods else None, "statistic": stat,
            "period": int(alarm["Period"]), "recentDatapoints": [v for _, v in present], "threshold": threshold,
            "evaluatedDatapoints": [{"timestamp": _stamp(t), "value": v} for t, v in reversed(present)]}
    missing = len(periods) - len(present)
    if not present and treat in ("missing", "ignore"):
        if treat == "ignore":
            return None
        return ("INSUFFICIENT_DATA",
                f"Insufficient Data: {len(periods)} datapoint{'s' if len(periods) != 1 else ''} "
                f"{'were' if len(periods) != 1 else 'was'} unknown.", data)
    breaching = sum(1 for _, v in present if breaches(v, threshold)) + (missing if treat == "breaching" else 0)
    shown = ", ".join(f"{v} ({_utc(t):%d/%m/%y %H:%M:%S})" for t, v in reversed(present))
    if breaching >= needed:
        return ("ALARM",
                f"Threshold Crossed: {breaching} out of the last {len(periods)} datapoints [{shown}] was {words} "
                f"the threshold ({threshold}) (minimum {needed} datapoint{'s' if needed != 1 else ''} for "
                f"OK -> ALARM transition).", data)
    return ("OK",
            f"Threshold Crossed: {len(periods) - breaching} out of the last {len(periods)} datapoints [{shown}] "
            f"was not {words} the threshold ({threshold}) (minimum 1 datapoint for ALARM -> OK transition).", data)


def _dimensions(items: Sequence[Any]) -> dict[str, str]:
    return {d.name: d.value for d in items}


class AlarmEvaluator:
    """Evaluates every metric alarm of moto's CloudWatch against the datapoints put so far.

    Parameters
    ----------
    account, region : str
        Whose alarms.
    clock : callable, optional
        ``clock() -> datetime`` (UTC); tests pass a fixed one.
    """

    def __init__(self, account: str, region: str, clock: Callable[[], datetime] | None = None):
        self.account, self.region = account, region
        self.clock = clock or (lambda: datetime.now(UTC))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def backend(self) -> Any:
        from moto.cloudwatch.models import cloudwatch_backends

        return cloudwatch_backends[self.account][self.region]

    def periods(self, alarm: Any, now: datetime) -> list[tuple[datetime, float | None]]:
        """Each of the alarm's last ``EvaluationPeriods`` periods (ending now) and its statistic."""
        period = timedelta(seconds=int(alarm.period))
        wanted = _dimensions(alarm.dimensions)
        stat = alarm.extended_statistic or alarm.statistic
        start = now - period * int(alarm.evaluation_periods)
        # CloudWatch matches a metric on its exact set of dimensions (a metric with more is another metric)
        values = [(_utc(d.timestamp), d.value) for d in self.backend.get_all_metrics()
                  if d.namespace == alarm.namespace and d.name == alarm.metric_name and hasattr(d, "value")
                  and _dimensions(d.dimensions) == wanted]
        values = [(t, v) for t, v in values if start <= t < now]
        out: list[tuple[datetime, float | None]] = []
        for i in range(int(alarm.evaluation_periods)):
            low, high = start + period * i, start + period * (i + 1)
            inside = [v for t, v in values if low <= t < high]
            out.append((low, statistic(inside, stat) if inside else None))
        return out

    def evaluate_all(self) -> list[tuple[str, str]]:
        """Evaluate every metric alarm now; set the state of each that changes. Returns (alarm, new state)."""
        now = _utc(self.clock())
        changed: list[tuple[str, str]] = []
        for alarm in list(self.backend.alarms.values()):
            if alarm.metric_data_queries or not alarm.metric_name:
                continue  # metric-math alarms are not evaluated locally (docs/local-mode.md)
            described = {"ComparisonOperator": alarm.comparison_operator, "Threshold": alarm.threshold,
                         "EvaluationPeriods": alarm.evaluation_periods, "Period": alarm.period,
                         "DatapointsToAlarm": alarm.datapoints_to_alarm, "TreatMissingData": alarm.treat_missing_data,
                         "Statistic": alarm.statistic, "ExtendedStatistic": alarm.extended_statistic}
            verdict = evaluate(described, self.periods(alarm, now))
            if verdict is None or verdict[0] == alarm.state_value:
                continue
            state, reason, data = verdict
            self.backend.set_alarm_state(alarm.name, reason, json.dumps(data), state)
            changed.append((alarm.name, state))
        return changed

    def start(self, interval_s: float = 60.0) -> None:
        """Evaluate every ``interval_s`` seconds in a daemon thread (CloudWatch evaluates every minute)."""
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    for name, state in self.evaluate_all():
                        log.info("alarm %s is now %s", name, state)
                except Exception:  # noqa: BLE001 - one bad evaluation must not stop the next
                    log.exception("alarm evaluation failed")

        self._thread = threading.Thread(target=loop, name="localmode-alarms", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the evaluation thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def state_change_event(alarm: Any, previous: tuple[str, str, str, datetime], account: str,
                       region: str) -> dict[str, Any]:
    """The ``CloudWatch Alarm State Change`` event of a single-metric alarm, as EventBridge delivers it."""
    from localmode import eventbridge

    old_value, old_reason, old_data, old_time = previous
    metric = {"metric": {"namespace": alarm.namespace, "name": alarm.metric_name,
                         "dimensions": _dimensions(alarm.dimensions)},
              "period": int(alarm.period), "stat": alarm.extended_statistic or alarm.statistic}
    detail = {
        "alarmName": alarm.name,
        "state": {"value": alarm.state_value, "reason": alarm.state_reason,
                  "reasonData": alarm.state_reason_data, "timestamp": _stamp(alarm.state_updated_timestamp)},
        "previousState": {"value": old_value, "reason": old_reason, "reasonData": old_data,
                          "timestamp": _stamp(old_time)},
        "configuration": {"description": alarm.description or "",
                          "metrics": [{"id": "m1", "metricStat": metric, "returnData": True}]},
    }
    return eventbridge.envelope("aws.cloudwatch", "CloudWatch Alarm State Change", detail, account=account,
                                region=region, resources=[alarm.alarm_arn])


def sns_message(alarm: Any, old_value: str, account: str, region: str) -> tuple[str, str]:
    """(subject, message) CloudWatch publishes to an alarm's action topic."""
    region_name = _REGION_NAMES.get(region, region)
    subject = f'{alarm.state_value}: "{alarm.name}" in {region_name}'
    message = {
        "AlarmName": alarm.name, "AlarmDescription": alarm.description, "AWSAccountId": account,
        "AlarmConfigurationUpdatedTimestamp": _stamp(alarm.configuration_updated_timestamp),
        "NewStateValue": alarm.state_value, "NewStateReason": alarm.state_reason,
        "StateChangeTime": _stamp(alarm.state_updated_timestamp), "Region": region_name,
        "AlarmArn": alarm.alarm_arn, "OldStateValue": old_value,
        "Trigger": {"MetricName": alarm.metric_name, "Namespace": alarm.namespace,
                    "StatisticType": "ExtendedStatistic" if alarm.extended_statistic else "Statistic",
                    "Statistic": (alarm.statistic or "").upper() or None,
                    "ExtendedStatistic": alarm.extended_statistic,
                    "Unit": alarm.unit, "Dimensions": [{"value": d.value, "name": d.name} for d in alarm.dimensions],
                    "Period": int(alarm.period), "EvaluationPeriods": int(alarm.evaluation_periods),
                    "DatapointsToAlarm": alarm.datapoints_to_alarm,
                    "ComparisonOperator": alarm.comparison_operator, "Threshold": float(alarm.threshold),
                    "TreatMissingData": alarm.treat_missing_data or "missing"},
    }
    return subject, json.dumps(message)


def install(put_event: Callable[[dict[str, Any]], None], account: str, region: str) -> Callable[[], None]:
    """Make every alarm state change emit its event and notify its action topics; returns the undo."""
    from moto.cloudwatch.models import CloudWatchBackend
    from moto.sns.models import sns_backends

    original = CloudWatchBackend.set_alarm_state

    def set_alarm_state(backend: Any, alarm_name: str, reason: str, reason_data: str, state_value: str) -> None:
        alarm = backend.alarms.get(alarm_name)
        previous = ((alarm.state_value, alarm.state_reason, alarm.state_reason_data, alarm.state_updated_timestamp)
                    if alarm is not None else None)
        original(backend, alarm_name, reason, reason_data, state_value)
        if previous is None or previous[0] == state_value:
            return  # CloudWatch sends events and runs actions on state changes only
        put_event(state_change_event(alarm, previous, account, region))
        actions = {"ALARM": alarm.alarm_actions, "OK": alarm.ok_actions,
                   "INSUFFICIENT_DATA": alarm.insufficient_data_actions}[state_value] or []
        if not alarm.actions_enabled:
            return
        subject, message = sns_message(alarm, previous[0], account, region)
        topics = sns_backends[account][region].topics
        for arn in actions:
            if arn in topics:
                topics[arn].publish(message, subject=subject)
            else:
                log.warning("alarm %s: action %s is not a topic of this stack; not run locally", alarm_name, arn)

    CloudWatchBackend.set_alarm_state = set_alarm_state  # type: ignore[method-assign,assignment]

    def undo() -> None:
        CloudWatchBackend.set_alarm_state = original  # type: ignore[method-assign]

    return undo
