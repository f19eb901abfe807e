"""Evaluation: the exported model's figures, its decision rule, the baseline, and the model directory they go in.

After training, the main rank exports the selected weights (``model.ts``, ``model.pt``, ``classes.json``,
``preprocessing.json``), evaluates the exported ``model.ts`` itself in float32 on validation and test, chooses its
decision rule on validation (:func:`lesionml.metrics.decide_on_validation`), does the same for the ``baseline``
channel's model, and writes ``metrics.json``, the drift reference, the known answers, the report and, last, the
manifest that seals the directory (:mod:`lesionml.model_dir`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from lesionml.acquisition import SHIFTS
from lesionml.labels import classes_document, melanoma_index, parse_classes_document
from lesionml.metrics import (
    RobustThreshold,
    ValidationDecision,
    choose_robust_threshold,
    decide,
    decide_on_validation,
    evaluate_split,
)
from lesionml.model_dir import MANIFEST_NAME, record_known_answers, write_manifest
from lesionml.models import LesionNet, export_torchscript, load_torchscript, view_count
from lesionml.preprocessing import PreprocessingSpec, read_spec, write_spec
from lesionml.reference_stats import build_reference_stats
from training_image.checkpoints import TrainState
from training_image.config import Config, Paths
from training_image.data import Data, EvalDataset, EvalImages, make_loader
from training_image.report import write_report
from training_image.runtime import Runtime, autocast, emit_metrics, eval_batch_size, fmt_eta

log = logging.getLogger("train")

Predictor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Predictions:
    """Model outputs over one split."""

    probs: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray | None
    loss: float


@torch.no_grad()
def predict(
    fn: Predictor,
    loader: DataLoader[tuple[torch.Tensor, int]],
    device: torch.device,
    channels_last: bool,
    dtype: torch.dtype | None,
    keep_embeddings: bool,
    max_batches: int = 0,
) -> Predictions:
    """Run ``fn`` (returning probabilities and embeddings) over ``loader``."""
    probs, labels, embs = [], [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for i, (x, y) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast(device, dtype):
            p, e = fn(x)
        probs.append(p.float().cpu().numpy())
        labels.append(y.numpy())
        if keep_embeddings:
            embs.append(e.float().cpu().numpy())
    p_all = np.concatenate(probs).astype(np.float64)
    y_all = np.concatenate(labels).astype(np.int64)
    # Plain NLL, whatever the training loss weighting: comparable across runs.
    loss = float(-np.log(np.clip(p_all[np.arange(len(y_all)), y_all], 1e-12, None)).mean())
    return Predictions(p_all, y_all, np.concatenate(embs) if keep_embeddings else None, loss)


def torchscript_predict(ts: torch.jit.ScriptModule) -> Predictor:
    """Probabilities and embeddings of a loaded ``model.ts`` (logits and their softmax for one without ``predict``)."""
    if hasattr(ts, "predict"):
        return ts.predict

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = ts(x)
        return torch.softmax(logits, dim=1), logits

    return fn


def offset_start(cfg: Config, counts: np.ndarray) -> np.ndarray | None:
    """Where the decision offsets' fit starts: ``-log(training prior)`` (centred) after plain cross-entropy.

    Plain cross-entropy learns the training prior; dividing it out (post-hoc logit adjustment) is where the fit for
    balanced accuracy starts. With class-balanced sampling the model has not learnt the prior: start from 0.
    """
    if cfg.imbalance != "none":
        return None
    present = counts > 0
    start = np.where(present, -np.log(np.maximum(counts, 1) / counts.sum()), 0.0)
    start[present] -= start[present].mean()
    return start


def _choose(cfg: Config, preds: Predictions, mel: int, start: np.ndarray | None) -> ValidationDecision:
    """The exported model's decision rule (no offsets for a dry run's single batch)."""
    fit = cfg.class_bias != "none" and not cfg.dry_run
    return decide_on_validation(preds.labels, preds.probs, mel, fit, start, cfg.melanoma_target_sensitivity)


def robust_threshold(
    cfg: Config, fn: Predictor, decision: ValidationDecision, val: Predictions, val_images: EvalImages,
    spec: PreprocessingSpec, mel: int, rt: Runtime, workers: int, batch: int,
) -> RobustThreshold | None:
    """``threshold_policy=shifted``: the validation melanomas under every acquisition shift, and the threshold that
    catches them as often as the clean ones (:func:`lesionml.metrics.choose_robust_threshold`).

    Only the melanomas are shifted (the floor is on clean specificity): about one more validation pass for the
    nine shifts of a split with HAM10000's share of melanoma.
    """
    if cfg.threshold_policy != "shifted" or cfg.dry_run:
        return None
    melanomas = [s for s in val_images.samples if s.label == mel]
    if not melanomas:
        return None
    threads = max(1, torch.get_num_threads())
    shifted = {}
    for name, shift in SHIFTS.items():
        images = EvalImages(melanomas, spec, threads, shift=shift)
        loader = make_loader(EvalDataset(images, spec), batch, None, workers, rt.device)
        shifted[name] = predict(fn, loader, rt.device, cfg.channels_last, None, False).probs[:, mel]
    choice = choose_robust_threshold(val.labels == mel, val.probs[:, mel], shifted, decision.melanoma_threshold,
                                     cfg.melanoma_specificity_floor)
    log.info("melanoma threshold %.4f (clean validation's %.4f, specificity floor at %.4f): %s", choice.threshold,
             choice.validation_threshold, choice.floor_threshold,
             {k: round(v, 3) for k, v in choice.tradeoff.get("chosen", {}).items()})
    if choice.below_floor:
        log.warning("the clean validation threshold %.4f already has a specificity under the floor %.2f; it stands "
                    "(sensitivity first): set melanoma_target_sensitivity to choose another", choice.threshold,
                    choice.specificity_floor)
    return choice


def _by_source(
    p: Predictions, images: EvalImages, classes: tuple[str, ...], threshold: float, mel: int, offsets: np.ndarray,
) -> dict[str, Any] | None:
    """A split's figures per source (the manifest's ``source`` column), when it holds more than one."""
    sources = np.array([s.source or "unknown" for s in images.samples])
    if len(set(sources.tolist())) < 2:
        return None
    return {str(src): evaluate_split(p.labels[sources == src], p.probs[sources == src], classes, threshold, mel,
                                     offsets) | {"n": int((sources == src).sum())}
            for src in sorted(set(sources.tolist()))}


def _threshold_block(choice: RobustThreshold | None, cfg: Config) -> dict[str, Any]:
    """``metrics.json``'s ``melanoma_threshold_choice``: how the threshold was chosen, and what it trades."""
    if choice is None:
        return {"policy": "validation"}
    return {
        "policy": cfg.threshold_policy, "validation_threshold": choice.validation_threshold,
        "clean_validation_sensitivity": choice.clean_sensitivity, "specificity_floor": choice.specificity_floor,
        "floor_threshold": choice.floor_threshold, "below_floor": choice.below_floor, "shifts": list(SHIFTS),
        "tradeoff": choice.tradeoff,
    }


def _json_dump(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def _find_baseline(channel: Path) -> Path:
    """Directory holding the baseline's model.ts, extracting model.tar.gz if needed."""
    if (channel / "model.ts").is_file():
        return channel
    archives = sorted(channel.rglob("*.tar.gz"))
    if not archives:
        raise FileNotFoundError("baseline channel holds neither model.ts nor a .tar.gz")
    out = Path(tempfile.mkdtemp(prefix="baseline-"))
    with tarfile.open(archives[0]) as tar:
        try:
            tar.extractall(out, filter="data")
        except TypeError:  # Python without extraction filters: refuse unsafe members ourselves
            for m in tar.getmembers():
                if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts or m.issym() or m.islnk():
                    raise ValueError(f"unsafe member {m.name!r} in {archives[0].name}") from None
            tar.extractall(out)
    hits = sorted(out.rglob("model.ts"))
    if not hits:
        raise FileNotFoundError(f"{archives[0].name} has no model.ts")
    return hits[0].parent


def recorded_offsets(metrics_path: Path, classes: tuple[str, ...]) -> np.ndarray:
    """The ``decision_offsets`` a model directory's ``metrics.json`` records (0 where absent or unreadable)."""
    try:
        recorded = json.loads(metrics_path.read_text()).get("decision_offsets") or {}
        return np.array([float(recorded.get(c, 0.0)) for c in classes])
    except (OSError, ValueError, AttributeError, TypeError):
        return np.zeros(len(classes))


def evaluate_baseline(
    channel: Path, data: Data, val_images: EvalImages, test_images: EvalImages, rt: Runtime, cfg: Config,
    workers: int,
) -> dict[str, Any]:
    """Evaluate an earlier model.tar.gz on the same validation (decision rule) and test split.

    Its decision rule is chosen the same way as the new model's, on the same validation split, the offsets
    starting from the ones it was served with.
    """
    root = _find_baseline(channel)
    label_set, classes = parse_classes_document(json.loads((root / "classes.json").read_text()))
    if classes != data.classes:
        raise ValueError(f"baseline classes {list(classes)} differ from this job's {list(data.classes)}")
    spec = read_spec(root / "preprocessing.json")
    fn = torchscript_predict(load_torchscript(root / "model.ts", rt.device))
    threads = max(1, torch.get_num_threads())
    out = {}
    for name, images in (("validation", val_images), ("test", test_images)):
        if not images.same_geometry(spec):
            images = EvalImages(images.samples, spec, threads)
        loader = make_loader(EvalDataset(images, spec), eval_batch_size(cfg, rt.device), None, workers, rt.device)
        out[name] = predict(fn, loader, rt.device, False, None, False, 1 if cfg.dry_run else 0)
    mel = melanoma_index(label_set)
    decision = _choose(cfg, out["validation"], mel, recorded_offsets(root / "metrics.json", classes))
    # The same threshold policy as the new model's, so that the gate compares like with like (only the samples are
    # read: the shifted copies are decoded afresh under the baseline's own spec).
    choice = robust_threshold(cfg, fn, decision, out["validation"], val_images, spec, mel, rt, workers,
                              eval_batch_size(cfg, rt.device))
    threshold = choice.threshold if choice else decision.melanoma_threshold
    test = out["test"]
    block = evaluate_split(test.labels, test.probs, classes, threshold, mel, decision.offsets)
    block["architecture"] = spec.arch
    block["melanoma_threshold"] = threshold
    block["decision_offsets"] = dict(zip(classes, decision.offsets.tolist(), strict=True))
    return block


def _try_baseline(
    paths: Paths, data: Data, val_images: EvalImages, test_images: EvalImages, rt: Runtime, cfg: Config, workers: int
) -> tuple[dict[str, Any] | None, str | None]:
    """The baseline's block, or why there is none: a broken baseline must not lose the new model."""
    channel = paths.channel("baseline")
    if channel is None or not any(channel.iterdir()):
        return None, None
    try:
        return evaluate_baseline(channel, data, val_images, test_images, rt, cfg, workers), None
    except Exception as e:  # reported in metrics.json instead
        error = f"{type(e).__name__}: {e}"
        log.warning("baseline evaluation failed: %s", error)
        return None, error


def export(model: LesionNet, spec: PreprocessingSpec, cfg: Config, label_set: str, model_dir: Path) -> int:
    """Write ``model.pt``, ``model.ts``, ``classes.json`` and ``preprocessing.json``; returns the views of model.ts."""
    cpu_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(cpu_state, model_dir / "model.pt")
    example = torch.zeros(1, 3, spec.height, spec.width)
    views = view_count(spec.height, spec.width) if cfg.tta == "dihedral" else 1
    export_torchscript(model, example, str(model_dir / "model.ts"), tta=views > 1)
    if views > 1:
        log.info("model.ts averages %d views of each image (tta=dihedral)", views)
    _json_dump(model_dir / "classes.json", classes_document(label_set))
    write_spec(spec, model_dir / "preprocessing.json")
    return views


def write_known_answers(model_dir: Path, spec: PreprocessingSpec, classes: tuple[str, ...]) -> None:
    """``known_answers.json``: synthetic images and the exported ``model.ts``'s probabilities for them, on the CPU
    in float32 (what serving reproduces before it answers; lesionml/model_dir.py)."""
    ts = load_torchscript(model_dir / "model.ts", "cpu")

    def probabilities(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return ts.predict(torch.from_numpy(x))[0].float().numpy()

    record_known_answers(model_dir, spec, classes, probabilities)


def reference_stats(
    cfg: Config, data: Data, val: Predictions, test: Predictions, val_images: EvalImages, test_images: EvalImages,
    offsets: np.ndarray,
) -> dict[str, Any]:
    """The drift reference from held-out images (validation + test), capped at ``reference_max_images``."""
    assert val.embeddings is not None and test.embeddings is not None
    ref_emb = np.concatenate([val.embeddings, test.embeddings])
    ref_probs = np.concatenate([val.probs, test.probs])
    ref_labels = np.concatenate([val.labels, test.labels])
    ref_stats = val_images.stats[: len(val.labels)] + test_images.stats[: len(test.labels)]
    if len(ref_labels) > cfg.reference_max_images:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(ref_labels), cfg.reference_max_images, False))
        ref_emb, ref_probs, ref_labels = ref_emb[keep], ref_probs[keep], ref_labels[keep]
        ref_stats = [ref_stats[i] for i in keep]
    return build_reference_stats(
        ref_emb, ref_probs, ref_labels, ref_stats, np.array([s.label for s in data.train]), data.label_set,
        data.classes, seed=cfg.seed, predicted=decide(ref_probs, offsets),
    )


def _final_metrics(test: dict[str, Any], threshold: float, baseline: dict[str, Any] | None) -> dict[str, Any]:
    """The job's last ``name=value;`` line (SageMaker MetricDefinitions)."""
    final: dict[str, Any] = {
        "melanoma_threshold": threshold,
        "test_balanced_accuracy": test["balanced_accuracy"],
        "test_accuracy": test["accuracy"],
        "test_macro_auc": test["macro_auc"],
        "test_melanoma_sensitivity": test["melanoma_sensitivity"],
        "test_melanoma_specificity": test["melanoma_specificity"],
        "test_melanoma_sensitivity_at_spec90": test["melanoma_sensitivity_at_spec90"],
        "test_ece": test["ece"],
    }
    if baseline is not None:
        final.update({
            "baseline_balanced_accuracy": baseline["balanced_accuracy"],
            "baseline_macro_auc": baseline["macro_auc"],
            "baseline_melanoma_sensitivity": baseline["melanoma_sensitivity"],
        })
    return final


def finish(
    cfg: Config, rt: Runtime, paths: Paths, model: LesionNet, spec: PreprocessingSpec, data: Data,
    val_images: EvalImages, test_images: EvalImages, state: TrainState, workers: int, start: np.ndarray | None,
    t_start: float,
) -> dict[str, Any]:
    """Export, evaluate the exported model, write the model and output directories; returns metrics.json."""
    model_dir, out_dir = paths.model_dir, paths.output_data_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A directory being written has no manifest: serving refuses it until the manifest comes, last.
    (model_dir / MANIFEST_NAME).unlink(missing_ok=True)
    views = export(model, spec, cfg, data.label_set, model_dir)

    # Evaluate the artefact serving will load, in float32, so metrics.json describes exactly model.ts.
    fn = torchscript_predict(load_torchscript(model_dir / "model.ts", rt.device))
    batch = eval_batch_size(cfg, rt.device, views)
    preds = {}
    for name, images in (("validation", val_images), ("test", test_images)):
        loader = make_loader(EvalDataset(images, spec), batch, None, workers, rt.device)
        preds[name] = predict(fn, loader, rt.device, cfg.channels_last, None, True, 1 if cfg.dry_run else 0)
    val, test = preds["validation"], preds["test"]
    # Decision offsets, not a change to the classifier: model.ts keeps its calibrated probabilities (adding the
    # offsets to the logits would cost ROC-AUC and calibration), and the predicted class is the arg-max of
    # log p + offsets, in these metrics as in serving, which reads them from metrics.json.
    mel = melanoma_index(data.label_set)
    decision = _choose(cfg, val, mel, start)
    if decision.fitted:
        log.info("decision offsets %s: validation balanced accuracy %.4f -> %.4f",
                 np.round(decision.offsets, 2).tolist(), decision.balanced_accuracy_before,
                 decision.balanced_accuracy_after)
    choice = robust_threshold(cfg, fn, decision, val, val_images, spec, mel, rt, workers, batch)
    threshold = choice.threshold if choice else decision.melanoma_threshold
    offsets = decision.offsets
    blocks = {n: evaluate_split(p.labels, p.probs, data.classes, threshold, mel, offsets) for n, p in preds.items()}
    by_source = {n: _by_source(p, images, data.classes, threshold, mel, offsets)
                 for (n, p), images in zip(preds.items(), (val_images, test_images), strict=True)}
    baseline, baseline_error = _try_baseline(paths, data, val_images, test_images, rt, cfg, workers)

    metrics: dict[str, Any] = {
        "label_set": data.label_set,
        "classes": list(data.classes),
        "architecture": cfg.arch,
        "melanoma_threshold": threshold,
        "melanoma_threshold_choice": _threshold_block(choice, cfg),
        "decision_offsets": dict(zip(data.classes, offsets.tolist(), strict=True)),
        "decision_offsets_validation_balanced_accuracy": {
            "before": decision.balanced_accuracy_before, "after": decision.balanced_accuracy_after,
        } if decision.fitted else None,
        "n_train": len(data.train),
        "n_validation": len(val.labels),
        "n_test": len(test.labels),
        "validation": blocks["validation"],
        "test": blocks["test"],
        "validation_by_source": by_source["validation"],
        "test_by_source": by_source["test"],
        "baseline": baseline,
        "baseline_error": baseline_error,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "history": state.history,
        "hyperparameters": cfg.as_strings(),
        "pretrained_weights": bool(cfg.pretrained),
        "dry_run": cfg.dry_run,
        "training_seconds": round(state.train_seconds, 1),
        "job_seconds": None,
    }
    reference = reference_stats(cfg, data, val, test, val_images, test_images, offsets)
    _json_dump(model_dir / "reference_stats.json", reference)
    write_known_answers(model_dir, spec, data.classes)

    eval_dir = model_dir / "evaluation"
    write_report(eval_dir, test.labels, test.probs, data.classes, blocks["test"]["ece"], state.history)
    metrics["job_seconds"] = round(time.time() - t_start, 1)
    _json_dump(model_dir / "metrics.json", metrics)
    _json_dump(out_dir / "metrics.json", metrics)
    # The last file of the model directory: every other file's digest. Its own digest identifies the model; the
    # byte-identical copy in the small output.tar.gz is where the pipeline reads it for the model package.
    manifest_sha256 = write_manifest(model_dir)
    shutil.copyfile(model_dir / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    log.info("model directory sealed: %s sha256 %s", MANIFEST_NAME, manifest_sha256)
    shutil.copytree(eval_dir, out_dir / "evaluation", dirs_exist_ok=True)

    emit_metrics(_final_metrics(blocks["test"], threshold, baseline))
    log.info("done in %s; model directory %s", fmt_eta(time.time() - t_start), model_dir)
    return metrics
