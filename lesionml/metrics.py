"""Classification metrics for ``metrics.json`` (numpy only, so Lambdas and tests can use them).

Conventions: ``y_true`` is an int array of class indices, ``probs`` an ``(N, C)`` array of probabilities. Class-wise
quantities that are undefined (a class absent from the split) are ``nan`` here and ``null`` in JSON; macro means
skip them. Melanoma decisions use a probability threshold on ``P(mel)`` chosen on the validation split; the
predicted class is the arg-max of ``log(probs) + offsets`` (:func:`decide`), where the per-class decision offsets are
chosen on the validation split too (:func:`fit_class_offsets`; all 0 gives the plain arg-max).
:func:`decide_on_validation` is the one procedure that chooses both for a model. Probability-based figures (ROC-AUC,
calibration) use the probabilities themselves: the offsets move decisions, not probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts, rows = truth, columns = prediction."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def per_class_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix (``nan`` where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        # A class that is present but never predicted has precision 0, not undefined.
        precision = np.where(predicted > 0, tp / predicted, np.where(support > 0, 0.0, np.nan))
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, np.where(np.isnan(denom), np.nan, 0.0))
    return precision, recall, f1, support.astype(np.int64)


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in the truth."""
    _, recall, _, support = per_class_prf(cm)
    present = support > 0
    return float(recall[present].mean()) if present.any() else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(y_binary: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); ``nan`` without both classes."""
    y = np.asarray(y_binary, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(np.asarray(scores, dtype=np.float64))
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_binary: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate and thresholds (predict positive when ``score >= threshold``).

    The first point is ``(0, 0)`` at threshold ``+inf``.
    """
    y = np.asarray(y_binary, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tps = np.cumsum(y)[last_of_run].astype(np.float64)
    fps = (last_of_run + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s[last_of_run]]
    return fpr, tpr, thresholds


def macro_auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> tuple[float, np.ndarray]:
    """Macro one-vs-rest ROC-AUC over classes with positives and negatives, and the per-class AUCs."""
    per_class = np.array([roc_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])])
    valid = ~np.isnan(per_class)
    return (float(per_class[valid].mean()) if valid.any() else float("nan")), per_class


def at_risk(melanoma_probability: Any, threshold: float) -> Any:
    """The melanoma decision: ``P(mel) >= threshold`` (a bool for a number, a boolean array for an array).

    ``threshold`` is ``metrics.json``'s ``melanoma_threshold``, chosen on validation data (:func:`choose_threshold`);
    serving (``inference_image.predictor``) flags an image with this rule, evaluation scores it with the same one.
    """
    return melanoma_probability >= threshold


def sensitivity_specificity(y_binary: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity of ``score >= threshold`` (:func:`at_risk`)."""
    y = np.asarray(y_binary, dtype=bool)
    pred = at_risk(np.asarray(scores), threshold)
    sens = float((pred & y).sum() / y.sum()) if y.any() else float("nan")
    spec = float((~pred & ~y).sum() / (~y).sum()) if (~y).any() else float("nan")
    return sens, spec


def sensitivity_at_specificity(y_binary: np.ndarray, scores: np.ndarray, specificity: float = 0.9) -> float:
    """Best sensitivity among thresholds whose specificity is at least ``specificity``."""
    y = np.asarray(y_binary, dtype=bool)
    if not y.any() or y.all():
        return float("nan")
    fpr, tpr, _ = roc_curve(y, scores)
    ok = fpr <= (1.0 - specificity) + 1e-12
    return float(tpr[ok].max())


def choose_threshold(y_binary: np.ndarray, scores: np.ndarray, target_sensitivity: float = 0.0) -> float:
    """Pick the melanoma threshold on validation data.

    Parameters
    ----------
    y_binary, scores : np.ndarray
        Validation truth (melanoma or not) and ``P(mel)``.
    target_sensitivity : float
        0 maximises Youden's J (sensitivity + specificity - 1); otherwise the highest threshold whose
        sensitivity reaches the target (screening favours catching melanomas).

    Returns
    -------
    float
        The threshold, 0.5 when the validation split lacks positives or negatives.
    """
    y = np.asarray(y_binary, dtype=bool)
    if not y.any() or y.all():
        return 0.5
    fpr, tpr, thr = roc_curve(y, scores)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # drop the +inf point
    if target_sensitivity > 0:
        idx = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])
    else:
        idx = int(np.argmax(tpr - fpr))
    return float(thr[idx])


def highest_threshold_reaching(scores_of_positives: np.ndarray, sensitivity: float) -> float:
    """The highest threshold at which at least ``sensitivity`` of these positives score ``>=`` it."""
    s = np.sort(np.asarray(scores_of_positives, dtype=np.float64))[::-1]
    if len(s) == 0:
        return float("inf")
    k = max(1, int(np.ceil(sensitivity * len(s) - 1e-9)))
    return float(s[min(k, len(s)) - 1])


def lowest_threshold_keeping(scores_of_negatives: np.ndarray, specificity: float) -> float:
    """The lowest threshold at which at least ``specificity`` of these negatives score below it."""
    s = np.sort(np.asarray(scores_of_negatives, dtype=np.float64))
    if len(s) == 0 or specificity <= 0:
        return 0.0
    k = int(np.ceil(specificity * len(s) - 1e-9))  # negatives that must fall below the threshold
    return float(np.nextafter(s[k - 1], np.inf)) if k >= 1 else 0.0


@dataclass(frozen=True)
class RobustThreshold:
    """The melanoma threshold chosen so that sensitivity holds under acquisition shift (``threshold_policy=shifted``).

    Attributes
    ----------
    threshold : float
        The chosen threshold.
    validation_threshold : float
        The clean validation split's own choice (:func:`choose_threshold`), and the clean sensitivity it reaches,
        ``clean_sensitivity``: the level every shift is held to.
    floor_threshold : float
        The lowest threshold keeping the clean validation specificity at the floor. The shift policy never lowers the
        threshold below it; a clean choice already below it stands (sensitivity first), and ``below_floor`` says so.
    tradeoff : dict
        Clean sensitivity and specificity, and each shift's sensitivity, at both thresholds.
    """

    threshold: float
    validation_threshold: float
    clean_sensitivity: float
    floor_threshold: float
    specificity_floor: float
    tradeoff: dict[str, dict[str, float]]

    @property
    def below_floor(self) -> bool:
        """Whether the chosen threshold's clean validation specificity is under the floor: the clean choice was
        already there, and raising it would give up sensitivity the validation split showed."""
        return self.threshold < self.floor_threshold


def choose_robust_threshold(
    y_binary: np.ndarray, scores: np.ndarray, shifted_positive_scores: dict[str, np.ndarray],
    validation_threshold: float, specificity_floor: float,
) -> RobustThreshold:
    """Lower the validation threshold until every shift's melanomas are caught as often as the clean ones.

    Parameters
    ----------
    y_binary, scores : np.ndarray
        Clean validation truth (melanoma or not) and ``P(mel)``.
    shifted_positive_scores : dict
        ``P(mel)`` of the validation melanomas under each shift (:data:`lesionml.acquisition.SHIFTS`).
    validation_threshold : float
        The clean choice (:func:`choose_threshold`).
    specificity_floor : float
        Sensitivity comes first, but not below this clean validation specificity.
    """
    y = np.asarray(y_binary, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    clean_sens, _ = sensitivity_specificity(y, s, validation_threshold)
    floor = lowest_threshold_keeping(s[~y], specificity_floor)
    if not y.any() or not (~y).any():
        return RobustThreshold(validation_threshold, validation_threshold, clean_sens, floor, specificity_floor, {})
    needed = min([validation_threshold] + [highest_threshold_reaching(v, clean_sens)
                                          for v in shifted_positive_scores.values()])
    threshold = float(max(needed, min(floor, validation_threshold)))

    def row(t: float) -> dict[str, float]:
        sens, spec = sensitivity_specificity(y, s, t)
        out = {"threshold": t, "clean_sensitivity": sens, "clean_specificity": spec}
        for name, v in shifted_positive_scores.items():
            out[f"{name}_sensitivity"] = float(np.mean(np.asarray(v) >= t)) if len(v) else float("nan")
        return out

    tradeoff = {"validation_threshold": row(validation_threshold), "chosen": row(threshold)}
    return RobustThreshold(threshold, validation_threshold, clean_sens, floor, specificity_floor, tradeoff)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    """``log(probs)`` in float64, with zeros clipped to 1e-30 (a finite score for the offsets to move)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-30, None))


def _decided_balanced_accuracy(y: np.ndarray, logp: np.ndarray, offsets: np.ndarray) -> float:
    """Balanced accuracy of the arg-max of ``logp + offsets`` (the search loops call this thousands of times)."""
    return balanced_accuracy(confusion_matrix(y, np.argmax(logp + offsets, axis=1), logp.shape[1]))


def decide(probs: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
    """Predicted class indices: the arg-max of ``log(probs) + offsets`` (the plain arg-max without offsets).

    The one implementation of the class decision: evaluation calls it, and so does serving
    (``inference_image.predictor``) with ``metrics.json``'s ``decision_offsets``. Ties go to the first class.
    """
    if offsets is None or not np.any(offsets):
        return np.asarray(np.asarray(probs).argmax(axis=1), dtype=np.int64)
    scores = _log_probs(probs) + np.asarray(offsets, dtype=np.float64)
    return np.asarray(scores.argmax(axis=1), dtype=np.int64)


def apply_class_bias(probs: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """softmax(logits + bias) from softmax(logits): the output of a model whose classifier bias grew by ``bias``."""
    z = _log_probs(probs) + bias
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_class_offsets(
    y_true: np.ndarray,
    probs: np.ndarray,
    start: np.ndarray | None = None,
    max_iter: int = 50,
    min_support: int = 10,
) -> tuple[np.ndarray, float, float]:
    """Per-class logit offsets that minimise the class-balanced cross-entropy on held-out data.

    The offsets ``b`` minimise ``sum_c mean_{i in c} -log softmax(log p_i + b)_c`` over the classes present in
    ``y_true`` (every class weighs the same, whatever its size): the prior correction that turns the model's
    posterior into one for balanced classes, fitted rather than assumed (``start``, e.g. ``-log(training prior)``,
    is where the fit starts). A smooth, convex fit of one number per class, so unlike a search on balanced accuracy
    itself it does not chase a few borderline images of a small class (measured on HAM10000 by two-fold cross-
    validation within the validation split: benchmarks/training/RESULTS.md). At the optimum, the class-balanced
    mean probability of every present class is the same. Classes absent from ``y_true`` or with fewer than
    ``min_support`` images keep their starting offset (a handful of images would set theirs by chance); the others
    count in the loss all the same. Newton steps with backtracking; when every present class is fitted, the
    offsets are centred on them like ``start``.

    Returns
    -------
    (np.ndarray, float, float)
        The ``(C,)`` offsets, and the balanced accuracy of the arg-max of ``log p + offsets`` at ``start`` and at
        the fitted offsets.
    """
    y = np.asarray(y_true, dtype=np.int64)
    num_classes = probs.shape[1]
    logp = _log_probs(probs)
    b = np.zeros(num_classes) if start is None else np.asarray(start, dtype=np.float64).copy()

    def score(offsets: np.ndarray) -> float:
        return _decided_balanced_accuracy(y, logp, offsets)

    initial = score(b)
    counts = np.bincount(y, minlength=num_classes)
    present = np.flatnonzero(counts > 0)
    if len(y) == 0 or len(present) < 2:
        return b, initial, initial
    free = np.flatnonzero(counts >= max(1, min_support))
    if len(free) == 0:
        return b, initial, initial
    w = 1.0 / (len(present) * counts[y])
    target = np.bincount(y, weights=w, minlength=num_classes)

    def loss_grad_hess(offsets: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        z = logp + offsets
        z -= z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        soft = np.exp(z - lse[:, None])
        loss = float(w @ (lse - z[np.arange(len(y)), y]))
        ws = soft * w[:, None]
        hess = np.diag(ws.sum(axis=0)) - ws.T @ soft
        return loss, ws.sum(axis=0) - target, hess

    loss, grad, hess = loss_grad_hess(b)
    for _ in range(max_iter):
        g, h = grad[free], hess[np.ix_(free, free)]
        if float(np.abs(g).max()) < 1e-9:
            break
        # The loss is flat along "add the same constant to every offset": the pseudo-inverse ignores that direction.
        step = np.zeros(num_classes)
        step[free] = -np.linalg.pinv(h) @ g
        t = 1.0
        while t > 1e-4:
            trial = b + t * step
            new_loss, new_grad, new_hess = loss_grad_hess(trial)
            if new_loss <= loss:
                break
            t *= 0.5
        else:
            break
        b, loss, grad, hess = trial, new_loss, new_grad, new_hess
    if len(free) == len(present):
        b[present] -= b[present].mean() - (0.0 if start is None else float(np.mean(np.asarray(start)[present])))
    return b, initial, score(b)


@dataclass(frozen=True)
class ValidationDecision:
    """The decision rule chosen for one model on its validation split (what ``metrics.json`` records).

    Attributes
    ----------
    melanoma_threshold : float
        Threshold on ``P(mel)`` (:func:`at_risk`).
    offsets : np.ndarray
        ``(C,)`` decision offsets (:func:`decide`), rounded to 4 decimals as recorded and served; all 0 when none
        were fitted.
    balanced_accuracy_before, balanced_accuracy_after : float
        Validation balanced accuracy of the decision at the starting offsets and at the fitted ones (equal when
        none were fitted).
    fitted : bool
        Whether offsets were fitted.
    """

    melanoma_threshold: float
    offsets: np.ndarray
    balanced_accuracy_before: float
    balanced_accuracy_after: float
    fitted: bool


def decide_on_validation(
    y_true: np.ndarray,
    probs: np.ndarray,
    mel_index: int,
    fit_offsets: bool,
    start: np.ndarray | None = None,
    target_sensitivity: float = 0.0,
) -> ValidationDecision:
    """Choose a model's decision rule on its validation split: the melanoma threshold and the class offsets.

    The one procedure behind epoch selection, the new model's ``metrics.json`` and the baseline's figures, so
    that all of them judge a model by the rule serving will apply to it.

    Parameters
    ----------
    y_true, probs : np.ndarray
        Validation truth ``(N,)`` and probabilities ``(N, C)``.
    mel_index : int
        Index of the melanoma class.
    fit_offsets : bool
        Fit the offsets (:func:`fit_class_offsets`, from ``start``); otherwise the plain arg-max.
    start : np.ndarray, optional
        Where the fit starts (e.g. ``-log(training prior)``, or the offsets a model was served with).
    target_sensitivity : float
        The threshold policy of :func:`choose_threshold`.
    """
    y = np.asarray(y_true, dtype=np.int64)
    threshold = choose_threshold(y == mel_index, probs[:, mel_index], target_sensitivity)
    if not fit_offsets:
        plain = balanced_accuracy(confusion_matrix(y, decide(probs), probs.shape[1]))
        return ValidationDecision(threshold, np.zeros(probs.shape[1]), plain, plain, False)
    offsets, before, after = fit_class_offsets(y, probs, start=start)
    return ValidationDecision(threshold, np.round(offsets, 4), before, after, True)


def reliability_bins(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy (``nan`` if empty) and count."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    # Bin i holds (i/n, (i+1)/n]; confidence 0 falls in bin 0.
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return mean_conf, acc, count.astype(np.int64)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-label confidence with ``n_bins`` equal-width bins."""
    if len(y_true) == 0:
        return float("nan")
    mean_conf, acc, count = reliability_bins(y_true, probs, n_bins)
    nonempty = count > 0
    return float(np.sum(np.abs(acc[nonempty] - mean_conf[nonempty]) * count[nonempty]) / count.sum())


def _clean(x: float) -> float | None:
    """JSON has no NaN: undefined values become None."""
    return None if math.isnan(x) else float(x)


def evaluate_split(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], melanoma_threshold: float, mel_index: int,
    offsets: np.ndarray | None = None,
) -> dict[str, Any]:
    """The ``metrics.json`` block of one split (JSON-ready; undefined values are None).

    Parameters
    ----------
    y_true : np.ndarray
        True class indices ``(N,)``.
    probs : np.ndarray
        Probabilities ``(N, C)``.
    classes : sequence of str
        Class codes in output order.
    melanoma_threshold : float
        Threshold on ``P(mel)`` chosen on validation.
    mel_index : int
        Index of the melanoma class.
    offsets : np.ndarray, optional
        Per-class decision offsets (:func:`decide`): they set the predicted class behind the confusion matrix,
        balanced accuracy, accuracy and per-class figures; ROC-AUC, ECE and the melanoma figures use ``probs``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = len(classes)
    cm = confusion_matrix(y_true, decide(probs, offsets), num_classes)
    precision, recall, f1, support = per_class_prf(cm)
    macro_auc, auc = macro_auc_ovr(y_true, probs)
    is_mel = y_true == mel_index
    sens, spec = sensitivity_specificity(is_mel, probs[:, mel_index], melanoma_threshold)
    n = int(len(y_true))
    return {
        "n": n,
        "balanced_accuracy": _clean(balanced_accuracy(cm)),
        "accuracy": _clean(float(np.trace(cm) / n) if n else float("nan")),
        "macro_auc": _clean(macro_auc),
        "melanoma_sensitivity": _clean(sens),
        "melanoma_specificity": _clean(spec),
        "melanoma_sensitivity_at_spec90": _clean(sensitivity_at_specificity(is_mel, probs[:, mel_index], 0.9)),
        "melanoma_auc": _clean(float(auc[mel_index])),
        "ece": _clean(expected_calibration_error(y_true, probs)),
        "per_class": {
            code: {
                "precision": _clean(float(precision[i])),
                "recall": _clean(float(recall[i])),
                "f1": _clean(float(f1[i])),
                "support": int(support[i]),
            }
            for i, code in enumerate(classes)
        },
        "per_class_auc": {code: _clean(float(auc[i])) for i, code in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
    }
