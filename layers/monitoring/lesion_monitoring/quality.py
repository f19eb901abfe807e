"""Model quality from late ground truth: parse the confirmed diagnoses, join them to captured predictions, score.

Ground truth CSV (docs/contracts.md, "Ground truth"): a header row with an id column (``inference_id``,
``image_id`` or ``event_id``), a label column (``diagnosis``, ``label`` or ``dx``; class codes of the label set,
any case) and optionally ``inference_time`` (ISO-8601), which narrows the capture hours searched.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lesion_common.labels import MELANOMA
from lesion_monitoring.records import Prediction, parse_time

ID_COLUMNS = ("inference_id", "inferenceid", "image_id", "event_id", "eventid")
LABEL_COLUMNS = ("diagnosis", "label", "dx")
TIME_COLUMNS = ("inference_time", "inferencetime")


class GroundTruthFormatError(ValueError):
    """The ground-truth file is not a CSV with an id and a label column."""


@dataclass
class GroundTruth:
    """Confirmed diagnoses by id."""

    labels: dict[str, str] = field(default_factory=dict)
    times: list[datetime] = field(default_factory=list)
    rows: int = 0
    rejected: int = 0
    rejected_examples: list[str] = field(default_factory=list)


def parse_ground_truth(text: str, classes: Sequence[str]) -> GroundTruth:
    """Parse a ground-truth CSV; rows with an empty id or a label outside ``classes`` are counted and skipped.

    Raises
    ------
    GroundTruthFormatError
        No header, or no recognised id or label column.
    """
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    if not reader.fieldnames:
        raise GroundTruthFormatError("empty file: expected a header row")
    columns = {name.strip().lower(): name for name in reader.fieldnames if name}
    id_col = next((columns[c] for c in ID_COLUMNS if c in columns), None)
    label_col = next((columns[c] for c in LABEL_COLUMNS if c in columns), None)
    time_col = next((columns[c] for c in TIME_COLUMNS if c in columns), None)
    if id_col is None or label_col is None:
        raise GroundTruthFormatError(
            f"columns {reader.fieldnames}: need one of {', '.join(ID_COLUMNS)} and one of {', '.join(LABEL_COLUMNS)}")
    known = set(classes)
    gt = GroundTruth()
    for number, row in enumerate(reader, 2):
        gt.rows += 1
        identifier = (row.get(id_col) or "").strip()
        label = (row.get(label_col) or "").strip().lower()
        if not identifier or label not in known:
            gt.rejected += 1
            if len(gt.rejected_examples) < 5:
                gt.rejected_examples.append(f"line {number}: id {identifier!r}, label {label!r}")
            continue
        gt.labels[identifier] = label  # a later correction of the same id wins
        when = parse_time(row.get(time_col)) if time_col else None
        if when is not None:
            gt.times.append(when)
    return gt


def join(gt: GroundTruth, predictions: Iterable[Prediction]) -> dict[str, dict[str, Any]]:
    """Joined rows by id: each ground-truth id matched to the prediction whose inference id or event id it is."""
    found: dict[str, dict[str, Any]] = {}
    for p in predictions:
        for key in (p.inference_id, p.event_id):
            if key is not None and key in gt.labels and key not in found:
                found[key] = {
                    "id": key, "truth": gt.labels[key], "predicted_class": p.predicted_class,
                    "melanoma_at_risk": p.melanoma_at_risk, "model_version": p.model_version,
                    "inference_time": p.time.isoformat() if p.time else None,
                }
    return found


def matches(gt: GroundTruth) -> Any:
    """A predicate for :func:`lesion_monitoring.records.iter_s3_predictions` that keeps ground-truth ids only."""
    labels = gt.labels

    def keep(p: Prediction) -> bool:
        return (p.inference_id is not None and p.inference_id in labels) or (
            p.event_id is not None and p.event_id in labels)

    return keep


def current_model_rows(rows: Iterable[Mapping[str, Any]]) -> tuple[str | None, list[Mapping[str, Any]]]:
    """The model version of the most recent prediction, and the rows of that version.

    A retrained model must not be judged on its predecessor's mistakes.
    """
    items = list(rows)
    if not items:
        return None, []
    latest = max(items, key=lambda r: r.get("inference_time") or "")
    version = latest.get("model_version")
    return version, [r for r in items if r.get("model_version") == version]


def quality_metrics(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """Balanced accuracy (mean recall over the classes present in the truth), accuracy and melanoma sensitivity.

    A melanoma counts as found when the answer flagged it (``melanoma.at_risk``: the probability reached the
    model's operating threshold, as the gate measures it); answers without the flag fall back to the top class.
    """
    recall: dict[str, float] = {}
    support: dict[str, int] = {}
    for c in classes:
        of_class = [r for r in rows if r["truth"] == c]
        if of_class:
            support[c] = len(of_class)
            recall[c] = sum(r["predicted_class"] == c for r in of_class) / len(of_class)
    mel = [r for r in rows if r["truth"] == MELANOMA]
    found = sum(bool(r["melanoma_at_risk"]) if r.get("melanoma_at_risk") is not None
                else r["predicted_class"] == MELANOMA for r in mel)
    n = len(rows)
    return {
        "n": n,
        "balanced_accuracy": sum(recall.values()) / len(recall) if recall else None,
        "accuracy": sum(r["predicted_class"] == r["truth"] for r in rows) / n if n else None,
        "melanoma_cases": len(mel),
        "melanoma_sensitivity": found / len(mel) if mel else None,
        "recall": recall,
        "support": support,
    }
