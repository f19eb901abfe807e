"""localmode.report: the local stand-in for the dashboard writes Markdown and PNGs from plain dicts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lesion_monitoring.drift import DriftBatch, compute_drift
from lesion_monitoring.records import from_container_record
from localmode.report import write_report
from tests.monitoring import synthetic as sy
from tests.monitoring.realdata import capture_records

PNG = b"\x89PNG\r\n\x1a\n"


def _drift(shift: float, end: datetime) -> dict:
    world = sy.World()
    reference = world.reference(300)
    preds = [from_container_record(r) for r in capture_records(world.sample(150, 3, shift), reference)]
    result = compute_drift(DriftBatch().extend(preds), reference)
    result.update(status="evaluated", window={"start": (end - timedelta(hours=24)).isoformat(),
                                              "end": end.isoformat()}, model_version="1")
    return json.loads(json.dumps(result))  # plain JSON, as the Lambda returns it


def test_report_with_everything(tmp_path: Path) -> None:
    end = datetime(2026, 11, 29, 10, tzinfo=UTC)
    drift = _drift(2.0, end)
    quality = {"model_version": "1", "quality": {
        "n": 80, "balanced_accuracy": 0.71, "accuracy": 0.8, "melanoma_cases": 12, "melanoma_sensitivity": 0.58,
        "recall": {"mel": 0.58, "nv": 0.9, "bcc": 0.65}, "support": {"mel": 12, "nv": 50, "bcc": 18}},
        "ground_truth": {"rows": 80, "matched": 78, "unmatched": 2, "rejected": 0}, "not_published": []}
    executions = [
        {"executionArn": "arn:aws:states:us-east-1:1:execution:skinlesion-local-RetrainingStateMachine:Drift-1",
         "status": "SUCCEEDED", "startDate": end, "stopDate": end + timedelta(seconds=130),
         "input": json.dumps({"trigger": {"type": "drift-alarm"}})},
        {"name": "Quality-2", "stateMachineArn": "arn:aws:states:us-east-1:1:stateMachine:retraining",
         "status": "FAILED", "startDate": end.isoformat(), "trigger": {"type": "quality-alarm"},
         "error": "TrainingJobFailedError"},
    ]
    path = write_report(tmp_path / "report", drift_result=drift, quality_result=quality, executions=executions,
                        drift_history=[_drift(0.0, end - timedelta(hours=1)), drift],
                        quality_thresholds={"balanced_accuracy": 0.75, "melanoma_sensitivity": 0.7})
    text = path.read_text()
    assert f"DriftScore **{drift['drift_score']:.3f}**" in text and "**DRIFT**" in text
    assert "| melanoma sensitivity | 0.580 | 0.700 |" in text
    assert "| skinlesion-local-RetrainingStateMachine | Drift-1 | SUCCEEDED | drift-alarm |" in text
    assert "| retraining | Quality-2 | FAILED | quality-alarm |" in text and "TrainingJobFailedError" in text
    for name in ("drift_scores.png", "drift_tests.png", "class_distribution.png", "drift_history.png",
                 "quality.png"):
        assert f"]({name})" in text
        assert (tmp_path / "report" / name).read_bytes().startswith(PNG)


def test_report_of_a_skipped_window_and_nothing_else(tmp_path: Path) -> None:
    skipped = {"status": "skipped", "reason": "12 predictions in the window, MIN_RECORDS is 100",
               "drift_score": None, "n_records": 12, "window": {"start": "a", "end": "b"}}
    text = write_report(tmp_path, drift_result=skipped, quality_result=None, executions=[]).read_text()
    assert "**Skipped**: 12 predictions in the window, MIN_RECORDS is 100." in text
    assert "No ground truth was evaluated." in text and "## State machine executions\n\nNone." in text
    assert not list(tmp_path.glob("*.png"))
