"""Create the endpoint, or move it to the new configuration with a guarded blue/green update.

The update shifts a canary (or linear steps, or all at once) of traffic to the new fleet, bakes, and rolls back
on its own when one of the stack's alarms (variant 5XX errors, p99 model latency) fires. The policy is sized for
the fleet (``lesion_common.deployment.plan_traffic``): SageMaker accepts a canary or linear step of at most half
the instances, so a one-instance fleet is updated all at once (with the same bake), and the update's timeout and
the state machine's wait budget follow from the policy's waits. Application Auto Scaling must let go of the
variant before an update that changes its instance type, so that case deregisters first.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

from lesion_common.deployment import (
    CREATE_BUDGET_SECONDS,
    SETTLE_MARGIN_SECONDS,
    autoscaling_errors,
    error_message,
    first_variant,
    is_in_progress,
    is_missing_endpoint,
    is_missing_endpoint_config,
    max_polls,
    plan_traffic,
    sagemaker_errors,
    scalable_resource_id,
    variant_instance_type,
)
from lesion_common.errors import EndpointBusyError, EndpointConfigNotVisibleError
from lesion_common.parsing import parse_event

logger = Logger()

ENDPOINT_NAME = os.environ["ENDPOINT_NAME"]
DEPLOYMENT_POLICY = os.environ["DEPLOYMENT_POLICY"]  # CANARY | LINEAR | ALL_AT_ONCE
CANARY_PERCENT = int(os.environ["CANARY_PERCENT"])
BAKE_SECONDS = int(os.environ["BAKE_SECONDS"])
ROLLBACK_ALARMS = [a for a in os.environ["ROLLBACK_ALARMS"].split(",") if a]
POLL_SECONDS = int(os.environ["POLL_SECONDS"])

sagemaker = boto3.client("sagemaker")
autoscaling = boto3.client("application-autoscaling")

# Statuses in which SageMaker refuses UpdateEndpoint ("Cannot update in-progress endpoint").
CHANGING = {"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"}


class UpdateRequest(BaseModel):
    """create_model_config's output."""

    endpoint_config_name: str = Field(alias="endpointConfigName", min_length=1)
    instance_type: str = Field(alias="instanceType", min_length=1)
    rollback: bool = False


def rollback_config() -> dict[str, Any]:
    """After a failed smoke test: back all at once, not guarded by the alarms (they may fire because of the model
    being removed)."""
    return {"BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE",
                                                                      "WaitIntervalInSeconds": 0},
                                      "TerminationWaitInSeconds": 0}}


def deployment_config(instances: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The blue/green policy for a fleet of ``instances`` with the alarms that roll it back, and its summary."""
    plan = plan_traffic(DEPLOYMENT_POLICY, CANARY_PERCENT, BAKE_SECONDS, instances)
    if plan.note:
        logger.warning("deployment policy adapted to the fleet", extra=plan.summary())
    config = {"BlueGreenUpdatePolicy": plan.blue_green_policy(),
              "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": a} for a in ROLLBACK_ALARMS]}}
    return config, plan.summary()


def describe(sm: Any, endpoint: str) -> dict[str, Any] | None:
    """DescribeEndpoint, or None when there is no endpoint yet."""
    try:
        with sagemaker_errors("DescribeEndpoint"):
            return dict(sm.describe_endpoint(EndpointName=endpoint))
    except ClientError as err:
        if is_missing_endpoint(err):
            return None
        raise


def current_config(sm: Any, endpoint: str) -> str | None:
    """The endpoint's configuration, or None when there is no endpoint yet."""
    desc = describe(sm, endpoint)
    return None if desc is None else str(desc["EndpointConfigName"])


def target_variant(sm: Any, config_name: str) -> dict[str, Any]:
    """The new configuration's variant; AWS recommends this read before CreateEndpoint (eventual consistency)."""
    try:
        with sagemaker_errors("DescribeEndpointConfig"):
            return first_variant(sm, config_name)
    except ClientError as err:
        if is_missing_endpoint_config(err):
            raise EndpointConfigNotVisibleError(f"{config_name}: {error_message(err)}") from err
        raise


def fleet_size(endpoint: dict[str, Any], variant: dict[str, Any]) -> int:
    """The instances the update's steps are sized for: the smaller of the running and the new fleet."""
    counts = [int(variant.get("InitialInstanceCount") or 1)]
    running = endpoint.get("ProductionVariants") or []
    if running and running[0].get("CurrentInstanceCount"):
        counts.append(int(running[0]["CurrentInstanceCount"]))
    return min(counts)


def release_scaling(aas: Any, endpoint: str) -> bool:
    """Deregister the variant from Application Auto Scaling; False when it was not registered."""
    try:
        with autoscaling_errors("DeregisterScalableTarget"):
            aas.deregister_scalable_target(
                ServiceNamespace="sagemaker", ResourceId=scalable_resource_id(endpoint),
                ScalableDimension="sagemaker:variant:DesiredInstanceCount",
            )
        return True
    except ClientError as err:
        if err.response["Error"]["Code"] == "ObjectNotFoundException":
            return False
        raise


def _change(call: Any, action: str, config_name: str, **kwargs: Any) -> None:
    """CreateEndpoint / UpdateEndpoint with SageMaker's transient answers raised by name."""
    try:
        with sagemaker_errors(action):
            call(**kwargs)
    except ClientError as err:
        if is_missing_endpoint_config(err):
            raise EndpointConfigNotVisibleError(f"{action} {config_name}: {error_message(err)}") from err
        if is_in_progress(err):
            raise EndpointBusyError(f"{action}: {error_message(err)}") from err
        raise


def deploy(sm: Any, aas: Any, req: UpdateRequest) -> dict[str, Any]:
    """Create or update; say which, what the endpoint ran before, and how long the state machine may wait."""
    endpoint = describe(sm, ENDPOINT_NAME)
    variant = target_variant(sm, req.endpoint_config_name)
    previous = None if endpoint is None else str(endpoint["EndpointConfigName"])
    result: dict[str, Any] = {"endpointName": ENDPOINT_NAME, "targetConfig": req.endpoint_config_name,
                              "previousConfig": previous, "deregisteredScaling": False,
                              "pollSeconds": POLL_SECONDS, "maxPolls": max_polls(CREATE_BUDGET_SECONDS, POLL_SECONDS),
                              "trafficRouting": "none"}
    if endpoint is None:
        _change(sm.create_endpoint, "CreateEndpoint", req.endpoint_config_name,
                EndpointName=ENDPOINT_NAME, EndpointConfigName=req.endpoint_config_name)
        return {**result, "action": "created", "trafficRouting": "new endpoint"}
    if previous == req.endpoint_config_name:
        return {**result, "action": "unchanged"}
    if endpoint.get("EndpointStatus") in CHANGING:
        pending = (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
        if pending == req.endpoint_config_name:  # a repeated invocation: the update it started is under way
            return {**result, "action": "rolled-back" if req.rollback else "updated"}
        raise EndpointBusyError(f"{ENDPOINT_NAME} is {endpoint.get('EndpointStatus')}; it cannot be updated now")
    summary: dict[str, Any]
    if req.rollback:
        config, summary = rollback_config(), {"applied": "ALL_AT_ONCE", "maxExecutionTimeoutSeconds": 0}
    else:
        config, summary = deployment_config(fleet_size(endpoint, variant))
        result["deployment"] = summary
        result["maxPolls"] = max_polls(summary["maxExecutionTimeoutSeconds"] + SETTLE_MARGIN_SECONDS, POLL_SECONDS)
    result["trafficRouting"] = summary["applied"]
    if variant.get("InstanceType", req.instance_type) != _running_instance_type(sm, previous):
        result["deregisteredScaling"] = release_scaling(aas, ENDPOINT_NAME)
    _change(sm.update_endpoint, "UpdateEndpoint", req.endpoint_config_name, EndpointName=ENDPOINT_NAME,
            EndpointConfigName=req.endpoint_config_name, DeploymentConfig=config)
    return {**result, "action": "rolled-back" if req.rollback else "updated"}


def _running_instance_type(sm: Any, config_name: str | None) -> str | None:
    if config_name is None:
        return None
    with sagemaker_errors("DescribeEndpointConfig"):
        return variant_instance_type(sm, config_name)


@logger.inject_lambda_context(log_event=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Start the endpoint change; the state machine waits for it to settle."""
    req = parse_event(UpdateRequest, event, "invalid update request")
    result = deploy(sagemaker, autoscaling, req)
    logger.info("endpoint change started", extra=result)
    return result
