"""Names and shapes the deployment handlers share.

Names derive from the model package version, so a repeated approval event finds what the first one created.
"""

from __future__ import annotations

import re
from typing import Any

VARIANT = "AllTraffic"


def versioned_name(prefix: str, group: str, version: int) -> str:
    """A SageMaker model / endpoint-config name for one package version (at most 63 characters)."""
    base = re.sub(r"[^A-Za-z0-9-]", "-", f"{prefix}-{group}")[:50].strip("-")
    return f"{base}-v{version}"


def scalable_resource_id(endpoint_name: str, variant: str = VARIANT) -> str:
    """Application Auto Scaling's id for an endpoint variant."""
    return f"endpoint/{endpoint_name}/variant/{variant}"


def variant_instance_type(sagemaker: Any, config_name: str) -> str | None:
    """The instance type of an endpoint configuration's first variant."""
    config = sagemaker.describe_endpoint_config(EndpointConfigName=config_name)
    variants = config.get("ProductionVariants", [])
    return variants[0].get("InstanceType") if variants else None
