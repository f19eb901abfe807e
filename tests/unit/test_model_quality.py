"""The registry's model-quality file: SageMaker Model Monitor's multiclass statistics, computed by hand here."""

from __future__ import annotations

import pytest

from lesion_common.model_quality import sagemaker_statistics


def test_values_match_a_hand_computation() -> None:
    stats = sagemaker_statistics([[3, 1], [2, 4]], ["a", "b"], "2026-12-06T10:00:00Z")
    block = stats["multiclass_classification_metrics"]
    assert stats["version"] == 0.0 and stats["dataset"] == {"item_count": 10, "evaluation_time": "2026-12-06T10:00:00Z"}
    assert block["confusion_matrix"] == {"a": {"a": 3, "b": 1}, "b": {"a": 2, "b": 4}}
    value = {name: m["value"] for name, m in block.items() if name != "confusion_matrix"}
    assert value["accuracy"] == pytest.approx(0.7)
    assert value["weighted_recall"] == pytest.approx(0.4 * 0.75 + 0.6 * 4 / 6)
    assert value["weighted_precision"] == pytest.approx(0.4 * 0.6 + 0.6 * 0.8)
    f1_a, f1_b = 2 * 0.6 * 0.75 / 1.35, 2 * 0.8 * (4 / 6) / (0.8 + 4 / 6)
    assert value["weighted_f1"] == pytest.approx(0.4 * f1_a + 0.6 * f1_b)
    # the best constant classifier always answers the majority class, b
    assert value["accuracy_best_constant_classifier"] == pytest.approx(0.6)
    assert value["weighted_precision_best_constant_classifier"] == pytest.approx(0.36)
    assert set(value) == {f"{m}{suffix}" for m in ("accuracy", "weighted_recall", "weighted_precision",
                                                   "weighted_f0_5", "weighted_f1", "weighted_f2")
                          for suffix in ("", "_best_constant_classifier")}
    assert all(m["standard_deviation"] == "NaN" for n, m in block.items() if n != "confusion_matrix")


def test_standard_deviation_from_200_samples_on_and_reproducible() -> None:
    big = [[90, 30], [60, 120]]
    first = sagemaker_statistics(big, ["a", "b"], "t")["multiclass_classification_metrics"]
    again = sagemaker_statistics(big, ["a", "b"], "t")["multiclass_classification_metrics"]
    assert first == again
    assert 0 < first["accuracy"]["standard_deviation"] < 0.05


@pytest.mark.parametrize("matrix", [[[1, 2]], [[0, 0], [0, 0]]])
def test_a_malformed_matrix_is_refused(matrix: list[list[int]]) -> None:
    with pytest.raises(ValueError):
        sagemaker_statistics(matrix, ["a", "b"], "t")
