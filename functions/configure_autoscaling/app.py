"""Auto-scaling: register the variant as a scalable target and track invocations per instance."""

from __future__ import annotations

import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field

from lesion_common.deployment import autoscaling_errors, scalable_resource_id
from lesion_common.parsing import parse_event

logger = Logger()

MIN_INSTANCES = int(os.environ["MIN_INSTANCES"])
MAX_INSTANCES = int(os.environ["MAX_INSTANCES"])
TARGET_INVOCATIONS = float(os.environ["TARGET_INVOCATIONS_PER_INSTANCE"])
SCALE_OUT_COOLDOWN = int(os.environ["SCALE_OUT_COOLDOWN_SECONDS"])
SCALE_IN_COOLDOWN = int(os.environ["SCALE_IN_COOLDOWN_SECONDS"])

autoscaling = boto3.client("application-autoscaling")


class ScalingRequest(BaseModel):
    """Which endpoint to scale."""

    endpoint_name: str = Field(alias="endpointName", min_length=1)


def configure(aas: Any, endpoint: str) -> dict[str, Any]:
    """Register (or re-register: the call is an upsert) the target and its tracking policy."""
    if not 1 <= MIN_INSTANCES <= MAX_INSTANCES:
        raise ValueError(f"instance bounds {MIN_INSTANCES}..{MAX_INSTANCES} are not 1 <= min <= max")
    if SCALE_IN_COOLDOWN <= SCALE_OUT_COOLDOWN:
        raise ValueError("scale-in cool-down must be longer than scale-out: capacity is removed more carefully")
    resource = scalable_resource_id(endpoint)
    dimension = "sagemaker:variant:DesiredInstanceCount"
    with autoscaling_errors("RegisterScalableTarget"):
        aas.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=dimension,
                                     MinCapacity=MIN_INSTANCES, MaxCapacity=MAX_INSTANCES)
    with autoscaling_errors("PutScalingPolicy"):
        policy = aas.put_scaling_policy(
            PolicyName=f"{endpoint}-invocations-per-instance", ServiceNamespace="sagemaker", ResourceId=resource,
            ScalableDimension=dimension, PolicyType="TargetTrackingScaling",
            TargetTrackingScalingPolicyConfiguration={
                "TargetValue": TARGET_INVOCATIONS,
                "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                "ScaleOutCooldown": SCALE_OUT_COOLDOWN,
                "ScaleInCooldown": SCALE_IN_COOLDOWN,
            },
        )
    return {"resourceId": resource, "minCapacity": MIN_INSTANCES, "maxCapacity": MAX_INSTANCES,
            "policyArn": policy["PolicyARN"]}


@logger.inject_lambda_context(log_event=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Keep the endpoint between its bounds as traffic changes."""
    req = parse_event(ScalingRequest, event, "invalid scaling request")
    return configure(autoscaling, req.endpoint_name)
