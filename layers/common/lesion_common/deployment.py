"""Names, shapes, AWS answers and deployment arithmetic the deployment handlers share.

Names derive from the model package version, so a repeated approval event finds what the first one created.

The blue/green limits below are botocore's sagemaker service model (``MaximumExecutionTimeoutInSeconds`` 600 to
28800, ``WaitIntervalInSeconds`` and ``TerminationWaitInSeconds`` 0 to 3600) and the documentation of
``TrafficRoutingConfig``: ``CanarySize`` at most 50 % of the variant's instances, ``LinearStepSize`` 10 to 50 %.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from lesion_common.aws_errors import error_code, error_message
from lesion_common.errors import (
    AutoScalingConflictError,
    AutoScalingThrottledError,
    DeploymentPolicyError,
    SageMakerThrottledError,
)

VARIANT = "AllTraffic"

MAX_EXECUTION_TIMEOUT_MIN = 600
MAX_EXECUTION_TIMEOUT_MAX = 28800
WAIT_INTERVAL_MAX = 3600
TERMINATION_WAIT_MAX = 3600
# Time SageMaker needs before the first traffic shift (green instances start, pull the image, load the model and
# pass the health check), counted into MaximumExecutionTimeoutInSeconds on top of the policy's waits.
PROVISIONING_MARGIN_SECONDS = 1800
# How long the state machine keeps polling past SageMaker's own timeout: a timed-out or alarmed update still has
# to roll back and terminate a fleet before the endpoint settles.
SETTLE_MARGIN_SECONDS = 1800
# A first CreateEndpoint (no blue/green policy applies): instances, image, model, health check.
CREATE_BUDGET_SECONDS = 3600

# Throttling codes as botocore's standard retry mode knows them (botocore/retries/standard.py).
THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "RequestThrottled", "RateExceeded",
})


def versioned_name(prefix: str, group: str, version: int) -> str:
    """A SageMaker model / endpoint-config name for one package version (at most 63 characters)."""
    base = re.sub(r"[^A-Za-z0-9-]", "-", f"{prefix}-{group}")[:50].strip("-")
    return f"{base}-v{version}"


def scalable_resource_id(endpoint_name: str, variant: str = VARIANT) -> str:
    """Application Auto Scaling's id for an endpoint variant."""
    return f"endpoint/{endpoint_name}/variant/{variant}"


def first_variant(sagemaker: Any, config_name: str) -> dict[str, Any]:
    """The first production variant of an endpoint configuration (empty when it has none)."""
    config = sagemaker.describe_endpoint_config(EndpointConfigName=config_name)
    variants = config.get("ProductionVariants", [])
    return dict(variants[0]) if variants else {}


def variant_instance_type(sagemaker: Any, config_name: str) -> str | None:
    """The instance type of an endpoint configuration's first variant."""
    return first_variant(sagemaker, config_name).get("InstanceType")


# ------------------------------------------------------------------ what AWS answers
def _validation(err: ClientError, prefix: str) -> bool:
    # SageMaker gives these cases no error code of their own: every one is a ValidationException (botocore's model
    # lists no error shapes for DescribeEndpoint/DescribeEndpointConfig/UpdateEndpoint), so the code is checked and
    # then the start of the message as AWS sends it (quoted in docs/local-mode.md with its source); local mode
    # answers with the same text, not moto's.
    return error_code(err) == "ValidationException" and error_message(err).startswith(prefix)


def is_missing_endpoint(err: ClientError) -> bool:
    """SageMaker's answer for an endpoint that does not exist.

    ``ValidationException`` with ``Could not find endpoint "<endpoint ARN>".`` (the quote keeps it apart from
    ``Could not find endpoint configuration ...``).
    """
    return _validation(err, 'Could not find endpoint "')


def is_missing_endpoint_config(err: ClientError) -> bool:
    """SageMaker's answer for an endpoint configuration it does not find (or does not see yet).

    ``ValidationException`` with ``Could not find endpoint configuration "<ARN>".``: the text AWS sends from
    DescribeEndpointConfig (aws/amazon-sagemaker-examples#2339 quotes it); the CreateEndpoint API reference says a
    validation error can also come right after CreateEndpointConfig, an eventual-consistency window.
    """
    return _validation(err, "Could not find endpoint configuration")


def is_already_existing(err: ClientError) -> bool:
    """SageMaker's answer to a Create* for a name in use: ``Cannot create already existing <kind> "<ARN>".``."""
    return _validation(err, "Cannot create already existing")


def is_in_progress(err: ClientError) -> bool:
    """SageMaker's answer to UpdateEndpoint while the endpoint changes: ``Cannot update in-progress endpoint``."""
    return _validation(err, "Cannot update in-progress endpoint")


@contextmanager
def sagemaker_errors(action: str) -> Iterator[None]:
    """Raise SageMaker throttling as :class:`SageMakerThrottledError` (the state machine retries it)."""
    try:
        yield
    except ClientError as err:
        if error_code(err) in THROTTLING_CODES:
            raise SageMakerThrottledError(f"{action}: {error_code(err)}: {error_message(err)}") from err
        raise


@contextmanager
def autoscaling_errors(action: str) -> Iterator[None]:
    """Raise Application Auto Scaling throttling and concurrent updates as named, retryable errors."""
    try:
        yield
    except ClientError as err:
        if error_code(err) in THROTTLING_CODES:
            raise AutoScalingThrottledError(f"{action}: {error_code(err)}: {error_message(err)}") from err
        if error_code(err) == "ConcurrentUpdateException":
            raise AutoScalingConflictError(f"{action}: {error_message(err)}") from err
        raise


# ------------------------------------------------------------------ blue/green arithmetic
@dataclass(frozen=True)
class TrafficPlan:
    """The blue/green policy chosen for one update, and how long it may take.

    Attributes
    ----------
    requested, applied : str
        The stack's policy, and the one used (they differ when the fleet is too small for the requested one).
    routing : dict
        ``TrafficRoutingConfiguration``.
    termination_wait : int
        ``TerminationWaitInSeconds`` (the final bake before the old fleet goes).
    total_wait : int
        Every bake of the policy, in seconds.
    max_execution_timeout : int
        ``MaximumExecutionTimeoutInSeconds``: the waits plus provisioning, within SageMaker's range.
    instances : int
        The fleet size the steps were sized for.
    note : str
        Why ``applied`` differs from ``requested`` (empty when it does not).
    """

    requested: str
    applied: str
    routing: dict[str, Any]
    termination_wait: int
    total_wait: int
    max_execution_timeout: int
    instances: int
    note: str = ""

    def blue_green_policy(self) -> dict[str, Any]:
        """The ``BlueGreenUpdatePolicy`` of UpdateEndpoint's ``DeploymentConfig``."""
        return {"TrafficRoutingConfiguration": self.routing, "TerminationWaitInSeconds": self.termination_wait,
                "MaximumExecutionTimeoutInSeconds": self.max_execution_timeout}

    def summary(self) -> dict[str, Any]:
        """What update_endpoint reports (and the notification quotes)."""
        size = self.routing.get("CanarySize") or self.routing.get("LinearStepSize")
        return {"requested": self.requested, "applied": self.applied, "instances": self.instances,
                "stepInstances": size["Value"] if size else self.instances, "totalWaitSeconds": self.total_wait,
                "maxExecutionTimeoutSeconds": self.max_execution_timeout, "note": self.note}


def plan_traffic(policy: str, percent: int, bake_seconds: int, instances: int) -> TrafficPlan:
    """Choose the traffic routing for a blue/green update of a fleet of ``instances``, and its timeout.

    Step sizes are sent as ``INSTANCE_COUNT``, so the rules SageMaker applies to the variant's instance count
    (canary at most 50 %, linear steps 10 to 50 %) are checked here exactly. A fleet of one instance cannot
    have a canary or a linear step of at most 50 %: it is updated ``ALL_AT_ONCE``, still baking ``bake_seconds``
    under the rollback alarms, and the plan's ``note`` says so.

    Parameters
    ----------
    policy : str
        ``CANARY``, ``LINEAR`` or ``ALL_AT_ONCE``.
    percent : int
        Canary size (CANARY) or step size (LINEAR), in percent of the fleet.
    bake_seconds : int
        Wait after each traffic shift, and before the old fleet is terminated.
    instances : int
        Instances of the variant.

    Raises
    ------
    DeploymentPolicyError
        Unknown policy, a bake outside 0..3600 s, or waits that do not fit SageMaker's 28800 s timeout.
    """
    if policy not in ("CANARY", "LINEAR", "ALL_AT_ONCE"):
        raise DeploymentPolicyError(f"deployment policy {policy!r} is not CANARY, LINEAR or ALL_AT_ONCE")
    if not 0 <= bake_seconds <= min(WAIT_INTERVAL_MAX, TERMINATION_WAIT_MAX):
        raise DeploymentPolicyError(f"bake of {bake_seconds} s is outside SageMaker's 0..{WAIT_INTERVAL_MAX} s")
    if not 1 <= percent <= 100:
        raise DeploymentPolicyError(f"step size {percent} % is outside 1..100 %")
    n = max(int(instances), 1)
    applied, note = policy, ""
    if policy != "ALL_AT_ONCE" and n < 2:
        applied = "ALL_AT_ONCE"
        note = (f"{policy} needs at least 2 instances (a canary or linear step is at most 50 % of the fleet); "
                f"the fleet has {n}, so the update shifts all traffic at once and bakes {bake_seconds} s under the "
                "rollback alarms")
    routing: dict[str, Any] = {"Type": applied, "WaitIntervalInSeconds": bake_seconds}
    if applied == "CANARY":
        canary = min(max(1, n * percent // 100), n // 2)
        routing["CanarySize"] = {"Type": "INSTANCE_COUNT", "Value": canary}
        shifts = 1  # the canary bakes; the rest then shifts and the final bake is the termination wait
    elif applied == "LINEAR":
        step = min(max(1, math.ceil(n / 10), round(n * percent / 100)), n // 2)
        routing["LinearStepSize"] = {"Type": "INSTANCE_COUNT", "Value": step}
        shifts = math.ceil(n / step)  # counted with a bake after each step, the last one included
    else:
        shifts = 1
    total = shifts * bake_seconds + bake_seconds
    timeout = max(MAX_EXECUTION_TIMEOUT_MIN, total + PROVISIONING_MARGIN_SECONDS)
    if timeout > MAX_EXECUTION_TIMEOUT_MAX:
        raise DeploymentPolicyError(
            f"{applied} over {n} instances with {bake_seconds} s bakes waits {total} s; with "
            f"{PROVISIONING_MARGIN_SECONDS} s to provision that exceeds SageMaker's {MAX_EXECUTION_TIMEOUT_MAX} s "
            "MaximumExecutionTimeoutInSeconds: shorten BakeSeconds or use larger steps")
    return TrafficPlan(requested=policy, applied=applied, routing=routing, termination_wait=bake_seconds,
                       total_wait=total, max_execution_timeout=timeout, instances=n, note=note)


def max_polls(budget_seconds: int, poll_seconds: int) -> int:
    """How many checks the state machine makes before it gives up on a change (its wait budget)."""
    return max(1, math.ceil(budget_seconds / max(poll_seconds, 1)))
