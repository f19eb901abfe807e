"""lesionml.metrics against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lesionml import metrics as M


def test_confusion_matrix_precision_recall_f1_balanced_accuracy() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    cm = M.confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    precision, recall, f1, support = M.per_class_prf(cm)
    np.testing.assert_allclose(recall, [0.5, 1.0, 0.5])
    np.testing.assert_allclose(precision, [0.5, 2 / 3, 1.0])
    np.testing.assert_allclose(f1, [0.5, 0.8, 2 / 3])
    assert support.tolist() == [2, 2, 2]
    assert M.balanced_accuracy(cm) == pytest.approx(2 / 3)


def test_absent_class_is_undefined_and_skipped() -> None:
    cm = M.confusion_matrix(np.array([0, 0, 1]), np.array([0, 2, 1]), 3)
    precision, recall, _, _ = M.per_class_prf(cm)
    assert np.isnan(recall[2]) and precision[2] == 0.0  # predicted once, never right
    assert M.balanced_accuracy(cm) == pytest.approx((0.5 + 1.0) / 2)


def test_roc_auc_counts_ties_as_half() -> None:
    assert M.roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert M.roc_auc(np.array([0, 0, 1]), np.array([0.2, 0.5, 0.5])) == pytest.approx(0.75)
    assert M.roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(M.roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_roc_curve_points_and_thresholds() -> None:
    fpr, tpr, thr = M.roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_melanoma_operating_points() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert M.sensitivity_at_specificity(y, s, 0.9) == pytest.approx(0.5)
    # Youden's J is 0.5 at thresholds 0.8 and 0.4; the higher threshold wins.
    assert M.choose_threshold(y, s) == pytest.approx(0.8)
    assert M.choose_threshold(y, s, target_sensitivity=1.0) == pytest.approx(0.35)
    assert M.sensitivity_specificity(y, s, 0.35) == (1.0, 0.5)
    assert M.choose_threshold(np.array([0, 0]), np.array([0.2, 0.3])) == 0.5


def test_macro_auc_skips_classes_without_positives() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.7, 0.3, 0.0], [0.2, 0.8, 0.0]])
    macro, per_class = M.macro_auc_ovr(y, probs)
    # Class 0: positives 0.9, 0.6 vs negatives 0.7, 0.2 -> 3 of 4 pairs; class 1 mirrors it; class 2 absent.
    np.testing.assert_allclose(per_class[:2], [0.75, 0.75])
    assert np.isnan(per_class[2]) and macro == pytest.approx(0.75)


def test_expected_calibration_error_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    y = np.array([0, 1])
    # Bin of 0.9: accuracy 1, confidence 0.9; bin of 0.6: accuracy 0, confidence 0.6.
    assert M.expected_calibration_error(y, probs) == pytest.approx((0.1 + 0.6) / 2)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert M.expected_calibration_error(y, perfect) == pytest.approx(0.0)


def test_evaluate_split_is_json_ready() -> None:
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    rng = np.random.default_rng(0)
    y = np.array([4, 4, 5, 5, 5, 1])
    probs = rng.dirichlet(np.ones(7), size=len(y))
    block = M.evaluate_split(y, probs, classes, melanoma_threshold=0.2, mel_index=4)
    text = json.dumps(block, allow_nan=False)  # NaN would break the evaluate Lambda's JSON parser
    assert block["per_class"]["akiec"]["recall"] is None and block["per_class"]["akiec"]["support"] == 0
    assert np.array(block["confusion_matrix"]).sum() == len(y)
    sens, spec = M.sensitivity_specificity(y == 4, probs[:, 4], 0.2)
    assert block["melanoma_sensitivity"] == sens and block["melanoma_specificity"] == spec
    assert "NaN" not in text


def test_class_bias_raises_balanced_accuracy_and_matches_a_shifted_softmax() -> None:
    rng = np.random.default_rng(0)
    y = rng.choice(4, 2000, p=[0.7, 0.15, 0.1, 0.05])
    logits = rng.normal(0.0, 1.0, (2000, 4))
    logits[np.arange(2000), y] += 1.5
    logits[:, 0] += 1.2  # a model leaning towards the majority class: rare classes lose recall
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    bias, before, after = M.fit_class_offsets(y, probs)
    assert after >= before + 0.05
    assert bias[0] < 0  # the majority class gives way
    adjusted = M.apply_class_bias(probs, bias)
    shifted = np.exp(logits + bias) / np.exp(logits + bias).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(adjusted, shifted, atol=1e-12)
    cm = M.confusion_matrix(y, adjusted.argmax(axis=1), 4)
    assert M.balanced_accuracy(cm) == pytest.approx(after)


def _skewed_validation() -> tuple[np.ndarray, np.ndarray]:
    """2,000 labels of 4 imbalanced classes and probabilities leaning towards class 0."""
    rng = np.random.default_rng(0)
    y = rng.choice(4, 2000, p=[0.7, 0.15, 0.1, 0.05])
    logits = rng.normal(0.0, 1.0, (2000, 4))
    logits[np.arange(2000), y] += 1.5
    logits[:, 0] += 1.2
    return y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_decision_offsets_move_class_figures_not_probability_figures() -> None:
    y, probs = _skewed_validation()
    offsets, _, after = M.fit_class_offsets(y, probs)
    np.testing.assert_array_equal(M.decide(probs, offsets), M.apply_class_bias(probs, offsets).argmax(axis=1))
    np.testing.assert_array_equal(M.decide(probs, np.zeros(4)), probs.argmax(axis=1))
    classes = ["a", "b", "c", "mel"]
    plain = M.evaluate_split(y, probs, classes, 0.2, 3)
    decided = M.evaluate_split(y, probs, classes, 0.2, 3, offsets)
    assert decided["balanced_accuracy"] == pytest.approx(after)
    assert decided["balanced_accuracy"] > plain["balanced_accuracy"] + 0.05
    assert decided["confusion_matrix"] != plain["confusion_matrix"]
    for key in ("macro_auc", "ece", "melanoma_sensitivity", "melanoma_specificity", "per_class_auc"):
        assert decided[key] == plain[key]


def test_fitted_offsets_give_every_class_the_same_balanced_mean_probability() -> None:
    rng = np.random.default_rng(0)
    y = rng.choice(4, 2000, p=[0.7, 0.15, 0.1, 0.05])
    logits = rng.normal(0.0, 1.0, (2000, 4))
    logits[np.arange(2000), y] += 1.5
    logits[:, 0] += 1.2  # a model leaning towards the majority class
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    offsets, before, after = M.fit_class_offsets(y, probs)
    assert after >= before + 0.05
    assert offsets[0] < offsets[1:].min() and abs(offsets.mean()) < 1e-9
    # The optimum of the class-balanced cross-entropy: averaged class by class, each class gets probability 1/4.
    adjusted = M.apply_class_bias(probs, offsets)
    balanced_mean = np.mean([adjusted[y == c].mean(axis=0) for c in range(4)], axis=0)
    np.testing.assert_allclose(balanced_mean, 0.25, atol=1e-6)
    # A class absent from the held-out split, or with too few images, keeps its starting offset.
    kept, _, _ = M.fit_class_offsets(y[y != 3], probs[y != 3], start=np.array([0.0, 0.0, 0.0, 0.7]))
    assert kept[3] == 0.7 and kept[0] < kept[1]
    few = np.r_[np.flatnonzero(y != 3), np.flatnonzero(y == 3)[:5]]
    kept, _, _ = M.fit_class_offsets(y[few], probs[few], start=np.array([0.0, 0.0, 0.0, 0.7]), min_support=10)
    assert kept[3] == 0.7 and kept[0] < kept[1]


def test_decide_on_validation_chooses_threshold_and_offsets_as_recorded() -> None:
    y, probs = _skewed_validation()
    start = np.array([-0.5, 0.2, 0.3, 0.0])
    fitted = M.decide_on_validation(y, probs, 3, fit_offsets=True, start=start, target_sensitivity=0.8)
    offsets, before, after = M.fit_class_offsets(y, probs, start=start)
    assert fitted.fitted and (fitted.balanced_accuracy_before, fitted.balanced_accuracy_after) == (before, after)
    np.testing.assert_array_equal(fitted.offsets, np.round(offsets, 4))  # as metrics.json records them
    assert fitted.melanoma_threshold == M.choose_threshold(y == 3, probs[:, 3], 0.8)
    # Without a fit: the plain arg-max, whatever the start.
    plain = M.decide_on_validation(y, probs, 3, fit_offsets=False, start=start)
    assert not plain.fitted and not plain.offsets.any()
    assert plain.balanced_accuracy_before == plain.balanced_accuracy_after == pytest.approx(
        M.balanced_accuracy(M.confusion_matrix(y, probs.argmax(axis=1), 4))
    )
    assert plain.melanoma_threshold == M.choose_threshold(y == 3, probs[:, 3])
