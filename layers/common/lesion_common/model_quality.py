"""Test-split quality in SageMaker Model Monitor's model-quality statistics format.

The Model Registry shows ``ModelMetrics.ModelQuality.Statistics`` in the console and in Studio when the file has
the shape a model-quality monitoring job writes ("Model quality metrics" in the SageMaker Developer Guide): a
``multiclass_classification_metrics`` block of ``{"value", "standard_deviation"}`` pairs and a confusion matrix
keyed actual -> predicted. Everything is derived from the decided confusion matrix in ``metrics.json`` (the test
block), so the figures agree with ours. As Model Monitor does, the standard deviation is that of the metric over 5
random 80 % samples, given only from 200 samples on ("NaN" below). Pure Python: the Lambdas import it.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import Any

MIN_SAMPLES_FOR_DEVIATION = 200
_RESAMPLES, _FRACTION = 5, 0.8


def _fbeta(precision: float, recall: float, beta: float) -> float:
    b2 = beta * beta
    denominator = b2 * precision + recall
    return (1 + b2) * precision * recall / denominator if denominator else 0.0


def _metrics(pairs: Sequence[tuple[int, int]], n_classes: int) -> dict[str, float]:
    """Accuracy and support-weighted precision, recall, F0.5/F1/F2 of (actual, predicted) pairs."""
    n = len(pairs)
    support = [0] * n_classes
    predicted = [0] * n_classes
    correct = [0] * n_classes
    for actual, guess in pairs:
        support[actual] += 1
        predicted[guess] += 1
        correct[actual] += actual == guess
    out = {"accuracy": sum(correct) / n}
    weighted = {"weighted_recall": 0.0, "weighted_precision": 0.0, "weighted_f0_5": 0.0, "weighted_f1": 0.0,
                "weighted_f2": 0.0}
    for c in range(n_classes):
        if not support[c]:
            continue
        recall = correct[c] / support[c]
        precision = correct[c] / predicted[c] if predicted[c] else 0.0
        w = support[c] / n
        weighted["weighted_recall"] += w * recall
        weighted["weighted_precision"] += w * precision
        for name, beta in (("weighted_f0_5", 0.5), ("weighted_f1", 1.0), ("weighted_f2", 2.0)):
            weighted[name] += w * _fbeta(precision, recall, beta)
    out.update(weighted)
    return out


def _with_constant(pairs: Sequence[tuple[int, int]], n_classes: int) -> dict[str, float]:
    """The metrics, and the same for the best constant classifier (always the most frequent actual class)."""
    out = _metrics(pairs, n_classes)
    counts = [0] * n_classes
    for actual, _ in pairs:
        counts[actual] += 1
    majority = max(range(n_classes), key=lambda c: counts[c])
    constant = _metrics([(actual, majority) for actual, _ in pairs], n_classes)
    out.update({f"{k}_best_constant_classifier": v for k, v in constant.items()})
    return out


def sagemaker_statistics(confusion: Sequence[Sequence[int]], classes: Sequence[str], evaluated_at: str,
                         seed: int = 0) -> dict[str, Any]:
    """Model Monitor's multiclass model-quality statistics for a confusion matrix (rows actual, columns predicted).

    Parameters
    ----------
    confusion : sequence of sequences of int
        ``confusion[i][j]``: test images of class ``classes[i]`` predicted as ``classes[j]``.
    classes : sequence of str
        Class names, in the matrix's order (they key the confusion matrix, as labels would in Model Monitor).
    evaluated_at : str
        ISO 8601 time of the evaluation (``dataset.evaluation_time``).
    seed : int
        Seed of the 80 % samples behind the standard deviations.
    """
    k = len(classes)
    if len(confusion) != k or any(len(row) != k for row in confusion):
        raise ValueError(f"confusion matrix is not {k}x{k}")
    pairs = [(i, j) for i in range(k) for j in range(k) for _ in range(int(confusion[i][j]))]
    if not pairs:
        raise ValueError("empty confusion matrix")
    values = _with_constant(pairs, k)
    deviations: dict[str, Any] = dict.fromkeys(values, "NaN")
    if len(pairs) >= MIN_SAMPLES_FOR_DEVIATION:
        rng = random.Random(seed)
        samples = [_with_constant(rng.sample(pairs, int(len(pairs) * _FRACTION)), k) for _ in range(_RESAMPLES)]
        deviations = {name: statistics.stdev(s[name] for s in samples) for name in values}
    block: dict[str, Any] = {"confusion_matrix": {classes[i]: {classes[j]: int(confusion[i][j]) for j in range(k)}
                                                  for i in range(k)}}
    block.update({name: {"value": value, "standard_deviation": deviations[name]} for name, value in values.items()})
    return {"version": 0.0, "dataset": {"item_count": len(pairs), "evaluation_time": evaluated_at},
            "multiclass_classification_metrics": block}
