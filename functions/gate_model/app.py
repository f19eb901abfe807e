"""Gate: does the candidate meet the absolute thresholds, and is it no worse than the model it would replace?

Plain accuracy is not gated: on HAM10000 predicting "nv" everywhere scores 0.67.
"""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field

from lesion_common.parsing import parse_event

logger = Logger()

THRESHOLDS = {
    "balanced_accuracy": float(os.environ["MIN_BALANCED_ACCURACY"]),
    "melanoma_sensitivity": float(os.environ["MIN_MELANOMA_SENSITIVITY"]),
    "macro_auc": float(os.environ["MIN_MACRO_AUC"]),
}
MAX_REGRESSION = float(os.environ["MAX_REGRESSION"])


class GatedMetrics(BaseModel):
    """The metrics the gate reads, for the candidate or the baseline."""

    balanced_accuracy: float = Field(ge=0, le=1)
    melanoma_sensitivity: float = Field(ge=0, le=1)
    macro_auc: float = Field(ge=0, le=1)


class GateEvent(BaseModel):
    """What the state machine passes in (evaluate_model's output)."""

    metrics: GatedMetrics
    baseline: GatedMetrics | None = None


def judge(candidate: GatedMetrics, baseline: GatedMetrics | None) -> dict[str, Any]:
    """Compare against the thresholds and the baseline.

    Returns
    -------
    dict
        ``passed``, ``failures`` (one entry per failed check, naming the metric), a one-line ``summary``, and the
        rules applied (``thresholds``, ``maxRegression``), which the reviewer's notification shows.
    """
    failures: list[dict[str, Any]] = []
    for name, minimum in THRESHOLDS.items():
        value = getattr(candidate, name)
        if value < minimum:
            failures.append({"metric": name, "check": "threshold", "value": value, "required": minimum})
    if baseline is not None:
        for name in THRESHOLDS:
            value, current = getattr(candidate, name), getattr(baseline, name)
            if value < current - MAX_REGRESSION:
                failures.append(
                    {"metric": name, "check": "vs-current-model", "value": value, "required": current - MAX_REGRESSION}
                )
    if failures:
        summary = "; ".join(
            f"{f['metric']} {f['value']:.3f} < {f['required']:.3f} ({f['check']})" for f in failures
        )
    else:
        summary = ", ".join(f"{n} {getattr(candidate, n):.3f}" for n in THRESHOLDS) + " meet the gate"
    return {"passed": not failures, "failures": failures, "summary": summary, "thresholds": dict(THRESHOLDS),
            "maxRegression": MAX_REGRESSION}


@logger.inject_lambda_context(log_event=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Decide whether the candidate may be registered."""
    req = parse_event(GateEvent, event, "invalid gate request")
    verdict = judge(req.metrics, req.baseline)
    logger.info("gate verdict", extra=verdict)
    return verdict
