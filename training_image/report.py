"""Evaluation report PNGs (matplotlib, Agg backend: the job has no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lesionml.metrics import confusion_matrix, reliability_bins, roc_auc, roc_curve  # noqa: E402


def plot_confusion_matrix(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """Row-normalised confusion matrix (rows = truth) annotated with counts."""
    cm = confusion_matrix(y_true, probs.argmax(axis=1), len(classes))
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(classes), 0.8 + 0.8 * len(classes)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Test confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """One-vs-rest ROC curve per class."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for c, code in enumerate(classes):
        positives = y_true == c
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, c])
        ax.plot(fpr, tpr, label=f"{code} (AUC {roc_auc(positives, probs[:, c]):.3f})", lw=1.4)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Test ROC, one-vs-rest")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(y_true: np.ndarray, probs: np.ndarray, ece: float | None, path: Path, n_bins: int = 15) -> None:
    """Reliability diagram of the top-label confidence, with the confidence histogram below."""
    mean_conf, acc, count = reliability_bins(y_true, probs, n_bins)
    edges = np.linspace(0, 1, n_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5.5, 6), height_ratios=(3, 1), sharex=True)
    ok = count > 0
    ax.bar(centres[ok], acc[ok], width=1 / n_bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfect calibration")
    ax.plot(mean_conf[ok], acc[ok], "o", c="darkred", ms=3, label="bin mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Test reliability (ECE {ece:.3f})" if ece is not None else "Test reliability")
    ax.legend(loc="upper left", fontsize=8)
    axh.bar(centres, count, width=1 / n_bins, edgecolor="black", color="grey")
    axh.set_xlabel("confidence (max probability)")
    axh.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Training/validation loss and validation balanced accuracy per epoch."""
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(epochs, [h["val_balanced_accuracy"] for h in history], "o-", c="green")
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation balanced accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out_dir: Path,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    ece: float | None,
    history: Sequence[Mapping[str, Any]],
) -> list[Path]:
    """Write every PNG into ``out_dir`` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / "confusion_matrix.png",
        out_dir / "roc.png",
        out_dir / "reliability.png",
    ]
    plot_confusion_matrix(y_true, probs, classes, paths[0])
    plot_roc(y_true, probs, classes, paths[1])
    plot_reliability(y_true, probs, ece, paths[2])
    if history:
        paths.append(out_dir / "training_curves.png")
        plot_history(history, paths[-1])
    return paths
