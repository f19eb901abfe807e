"""Create the endpoint, or move it to the new configuration with a guarded blue/green update.

The update shifts a canary (or linear steps, or all at once) of traffic to the new fleet, bakes, and rolls back
on its own when one of the stack's alarms (variant 5XX errors, p99 model latency) fires. Application Auto Scaling
must let go of the variant before an update that changes its instance type, so that case deregisters first.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field, ValidationError

from lesion_common.deployment import scalable_resource_id, variant_instance_type
from lesion_common.errors import InvalidRequestError

logger = Logger()

ENDPOINT_NAME = os.environ["ENDPOINT_NAME"]
DEPLOYMENT_POLICY = os.environ["DEPLOYMENT_POLICY"]  # CANARY | LINEAR | ALL_AT_ONCE
CANARY_PERCENT = int(os.environ["CANARY_PERCENT"])
BAKE_SECONDS = int(os.environ["BAKE_SECONDS"])
ROLLBACK_ALARMS = [a for a in os.environ["ROLLBACK_ALARMS"].split(",") if a]
POLL_SECONDS = int(os.environ["POLL_SECONDS"])

sagemaker = boto3.client("sagemaker")
autoscaling = boto3.client("application-autoscaling")


class UpdateRequest(BaseModel):
    """create_model_config's output."""

    endpoint_config_name: str = Field(alias="endpointConfigName", min_length=1)
    instance_type: str = Field(alias="instanceType", min_length=1)
    rollback: bool = False


def deployment_config(rollback: bool = False) -> dict[str, Any]:
    """The blue/green policy and the alarms that roll it back.

    A rollback (after a failed smoke test) goes back all at once and is not itself guarded by the alarms, which
    may be firing because of the model being removed.
    """
    if rollback:
        return {"BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE",
                                                                          "WaitIntervalInSeconds": 0},
                                          "TerminationWaitInSeconds": 0}}
    if DEPLOYMENT_POLICY == "ALL_AT_ONCE":
        routing: dict[str, Any] = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": BAKE_SECONDS}
    elif DEPLOYMENT_POLICY == "LINEAR":
        routing = {"Type": "LINEAR", "WaitIntervalInSeconds": BAKE_SECONDS,
                   "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": CANARY_PERCENT}}
    elif DEPLOYMENT_POLICY == "CANARY":
        routing = {"Type": "CANARY", "WaitIntervalInSeconds": BAKE_SECONDS,
                   "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": CANARY_PERCENT}}
    else:
        raise ValueError(f"DEPLOYMENT_POLICY {DEPLOYMENT_POLICY!r} is not CANARY, LINEAR or ALL_AT_ONCE")
    return {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": routing,
            "TerminationWaitInSeconds": BAKE_SECONDS,
            "MaximumExecutionTimeoutInSeconds": max(600, 4 * BAKE_SECONDS + 1800),
        },
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": a} for a in ROLLBACK_ALARMS]},
    }


def current_config(sm: Any, endpoint: str) -> str | None:
    """The endpoint's configuration, or None when there is no endpoint yet."""
    try:
        return str(sm.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"])
    except ClientError as err:
        if "Could not find endpoint" in err.response["Error"].get("Message", ""):
            return None
        raise


def release_scaling(aas: Any, endpoint: str) -> bool:
    """Deregister the variant from Application Auto Scaling; False when it was not registered."""
    try:
        aas.deregister_scalable_target(
            ServiceNamespace="sagemaker", ResourceId=scalable_resource_id(endpoint),
            ScalableDimension="sagemaker:variant:DesiredInstanceCount",
        )
        return True
    except ClientError as err:
        if err.response["Error"]["Code"] == "ObjectNotFoundException":
            return False
        raise


def deploy(sm: Any, aas: Any, req: UpdateRequest) -> dict[str, Any]:
    """Create or update; say which, and what the endpoint ran before."""
    previous = current_config(sm, ENDPOINT_NAME)
    result: dict[str, Any] = {"endpointName": ENDPOINT_NAME, "targetConfig": req.endpoint_config_name,
                              "previousConfig": previous, "deregisteredScaling": False,
                              "pollSeconds": POLL_SECONDS}
    if previous is None:
        sm.create_endpoint(EndpointName=ENDPOINT_NAME, EndpointConfigName=req.endpoint_config_name)
        return {**result, "action": "created"}
    if previous == req.endpoint_config_name:
        return {**result, "action": "unchanged"}
    if variant_instance_type(sm, previous) != req.instance_type:
        result["deregisteredScaling"] = release_scaling(aas, ENDPOINT_NAME)
    sm.update_endpoint(EndpointName=ENDPOINT_NAME, EndpointConfigName=req.endpoint_config_name,
                       DeploymentConfig=deployment_config(req.rollback))
    return {**result, "action": "rolled-back" if req.rollback else "updated"}


@logger.inject_lambda_context(log_event=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Start the endpoint change; the state machine waits for it to settle."""
    try:
        req = UpdateRequest.model_validate(event)
    except ValidationError as err:
        raise InvalidRequestError(f"invalid update request: {err}") from err
    result = deploy(sagemaker, autoscaling, req)
    logger.info("endpoint change started", extra=result)
    return result
