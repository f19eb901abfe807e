"""Publishing monitoring metrics to CloudWatch.

The alarms watch dimensionless metrics in one namespace (one endpoint per stack), so the metrics are sent with
``PutMetricData`` rather than through Powertools' embedded metric format, which always adds a ``service``
dimension and only reaches CloudWatch asynchronously through the logs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

_BATCH = 1000  # PutMetricData's limit of metric data items per call


def put_metrics(cloudwatch: Any, namespace: str, values: Mapping[str, tuple[float, str]],
                timestamp: datetime | None = None) -> list[str]:
    """Publish ``name -> (value, unit)``; non-finite values are left out. Returns the names sent."""
    data: list[dict[str, Any]] = []
    for name, (value, unit) in values.items():
        if value is None or not math.isfinite(value):
            continue
        item: dict[str, Any] = {"MetricName": name, "Value": float(value), "Unit": unit}
        if timestamp is not None:
            item["Timestamp"] = timestamp
        data.append(item)
    for i in range(0, len(data), _BATCH):
        cloudwatch.put_metric_data(Namespace=namespace, MetricData=data[i:i + _BATCH])
    return [d["MetricName"] for d in data]
