"""Check the endpoint: has the change settled, and does the endpoint run the configuration that was asked for?

SageMaker can roll a blue/green update back and end ``InService`` on the old configuration without failing the
update, so "InService" alone does not mean the new model serves.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field

from lesion_common.deployment import sagemaker_errors
from lesion_common.errors import EndpointRolledBackError, EndpointUpdateError
from lesion_common.parsing import parse_event

logger = Logger()

ROLLBACK_ALARMS = [a for a in os.environ["ROLLBACK_ALARMS"].split(",") if a]

sagemaker = boto3.client("sagemaker")
cloudwatch = boto3.client("cloudwatch")

SETTLING = {"Creating", "Updating", "SystemUpdating", "RollingBack", "UpdateRollbackFailed"}


class CheckRequest(BaseModel):
    """update_endpoint's output."""

    endpoint_name: str = Field(alias="endpointName", min_length=1)
    target_config: str = Field(alias="targetConfig", min_length=1)
    previous_config: str | None = Field(alias="previousConfig", default=None)


def alarms_in_alarm(cw: Any) -> list[str]:
    """The rollback alarms that are firing now (the likely cause of a rollback)."""
    if not ROLLBACK_ALARMS:
        return []
    found = cw.describe_alarms(AlarmNames=ROLLBACK_ALARMS).get("MetricAlarms", [])
    return [f"{a['AlarmName']}: {a.get('StateReason', '')}" for a in found if a.get("StateValue") == "ALARM"]


def check(sm: Any, cw: Any, req: CheckRequest) -> dict[str, Any]:
    """``settled`` False while SageMaker works; raise when it ended anywhere but on the target."""
    with sagemaker_errors("DescribeEndpoint"):
        desc = sm.describe_endpoint(EndpointName=req.endpoint_name)
    status = desc["EndpointStatus"]
    if status in SETTLING and status != "UpdateRollbackFailed":
        return {"settled": False, "status": status}
    if status == "InService" and desc["EndpointConfigName"] == req.target_config:
        return {"settled": True, "status": status, "endpointConfigName": req.target_config}
    if status == "InService":
        alarms = alarms_in_alarm(cw)
        cause = "; ".join(alarms) if alarms else desc.get("FailureReason") or "no alarm is firing now"
        raise EndpointRolledBackError(
            f"{req.endpoint_name} rolled back to {desc['EndpointConfigName']} instead of {req.target_config}: {cause}"
        )
    raise EndpointUpdateError(f"{req.endpoint_name} is {status}: {desc.get('FailureReason', 'no reason given')}")


@logger.inject_lambda_context(log_event=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Report whether the endpoint change has settled on the target configuration."""
    req = parse_event(CheckRequest, event, "invalid check request")
    return check(sagemaker, cloudwatch, req)
