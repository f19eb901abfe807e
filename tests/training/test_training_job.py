"""The training entry point under the SageMaker contract (docs/contracts.md), with real PyTorch on tiny data."""

from __future__ import annotations

import json
import re
import signal
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from training_helpers import FAST_HPS, ROOT, SAMPLE, run_train

from lesionml.labels import LABEL_SETS
from lesionml.models import build_model, load_torchscript
from lesionml.preprocessing import preprocess_batch, read_spec

METRIC_DEFINITIONS = ROOT / "layers" / "common" / "lesion_common" / "metric_definitions.json"
SPLIT_KEYS = {
    "balanced_accuracy", "accuracy", "macro_auc", "melanoma_sensitivity", "melanoma_specificity",
    "melanoma_sensitivity_at_spec90", "ece", "per_class", "confusion_matrix",
}
TOP_KEYS = {
    "label_set", "classes", "architecture", "melanoma_threshold", "n_train", "n_validation", "n_test",
    "validation", "test", "baseline",
}


def _fail(proc: Any) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def dry_run_job(job_factory: Callable[..., Path]) -> tuple[Path, Any]:
    # The command line overrides hyperparameters.json: the malformed epochs value must never be parsed.
    base = job_factory("dry", {**FAST_HPS, "epochs": "abc"})
    proc = run_train(base, args=["--epochs", "5", "--dry_run=true"])
    assert proc.returncode == 0, _fail(proc)
    return base, proc


@pytest.fixture(scope="module")
def full_job(
    job_factory: Callable[..., Path], dry_run_job: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Any, Path]:
    """The default architecture (EfficientNet-Lite0, real ImageNet weights), small images, with a baseline."""
    hps = {**FAST_HPS, "arch": "efficientnet_lite0", "pretrained": "true", "patience": "0"}
    base = job_factory("full", hps)
    baseline = base / "input" / "data" / "baseline"
    baseline.mkdir()
    with tarfile.open(baseline / "model.tar.gz", "w:gz") as tar:
        for f in (dry_run_job[0] / "model").iterdir():
            tar.add(f, arcname=f.name)
    out_data = tmp_path_factory.mktemp("out-data")
    proc = run_train(base, env={"SM_OUTPUT_DATA_DIR": str(out_data)})
    assert proc.returncode == 0, _fail(proc)
    return base, proc, out_data


def test_dry_run_writes_every_output_after_one_batch(dry_run_job: tuple[Path, Any]) -> None:
    base, proc = dry_run_job
    model_dir = base / "model"
    for name in ("model.pt", "model.ts", "classes.json", "preprocessing.json", "metrics.json", "reference_stats.json"):
        assert (model_dir / name).is_file(), name
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["dry_run"] is True
    assert metrics["hyperparameters"]["epochs"] == "5"  # from the command line
    assert metrics["epochs_run"] == 1  # dry_run runs one epoch whatever epochs says
    assert "step 1/1" in proc.stdout
    assert not (base / "checkpoints").exists()  # dry runs neither read nor write checkpoints


def test_model_directory_follows_the_contract(full_job: tuple[Path, Any, Path]) -> None:
    base, _, _ = full_job
    model_dir = base / "model"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics.keys() >= TOP_KEYS
    assert metrics["label_set"] == "ham7" and metrics["classes"] == list(LABEL_SETS["ham7"])
    assert metrics["architecture"] == "efficientnet_lite0"
    for split in ("validation", "test"):
        block = metrics[split]
        assert block.keys() >= SPLIT_KEYS
        assert set(block["per_class"]) == set(LABEL_SETS["ham7"])
        assert {"precision", "recall", "f1", "support"} == set(block["per_class"]["mel"])
        cm = np.array(block["confusion_matrix"])
        assert cm.shape == (7, 7) and cm.sum() == metrics[f"n_{split}"]
        assert 0.0 <= block["balanced_accuracy"] <= 1.0
    assert metrics["n_train"] == 42 and metrics["n_test"] == 21
    # The decision offsets chosen on validation are recorded and never lower validation balanced accuracy.
    assert set(metrics["decision_offsets"]) == set(LABEL_SETS["ham7"])
    scores = metrics["decision_offsets_validation_balanced_accuracy"]
    assert scores["after"] >= scores["before"]
    assert metrics["validation"]["balanced_accuracy"] == pytest.approx(scores["after"])
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["history"][0]["frozen_backbone"] and not metrics["history"][1]["frozen_backbone"]
    for epoch in metrics["history"]:  # what an operator reads a slow job by
        assert 0.0 <= epoch["data_wait_seconds"] <= epoch["epoch_seconds"]
        assert epoch["cpu_seconds"] > 0.0
    classes_doc = json.loads((model_dir / "classes.json").read_text())
    assert classes_doc == {"label_set": "ham7", "classes": list(LABEL_SETS["ham7"])}
    for png in ("confusion_matrix.png", "roc.png", "reliability.png"):
        assert (model_dir / "evaluation" / png).read_bytes()[:4] == b"\x89PNG"


def test_the_melanoma_threshold_holds_under_the_acquisition_shifts(full_job: tuple[Path, Any, Path]) -> None:
    # Issue 20: threshold_policy=shifted (the default) lowers the clean choice until the shifted validation
    # melanomas are caught as often as the clean ones, above the specificity floor.
    from lesionml.acquisition import SHIFTS

    metrics = json.loads((full_job[0] / "model" / "metrics.json").read_text())
    choice = metrics["melanoma_threshold_choice"]
    assert choice["policy"] == "shifted" and choice["shifts"] == list(SHIFTS)
    chosen = choice["tradeoff"]["chosen"]
    assert metrics["melanoma_threshold"] == chosen["threshold"] <= choice["validation_threshold"]
    assert {f"{s}_sensitivity" for s in SHIFTS} <= chosen.keys()
    at_floor = chosen["threshold"] == pytest.approx(choice["floor_threshold"])
    held = all(chosen[f"{s}_sensitivity"] >= choice["clean_validation_sensitivity"] for s in SHIFTS)
    assert held or at_floor or chosen["threshold"] == choice["validation_threshold"]
    assert choice["below_floor"] == (chosen["clean_specificity"] < choice["specificity_floor"])
    assert metrics["baseline"]["melanoma_threshold"] <= 1.0
    spec = read_spec(full_job[0] / "model" / "preprocessing.json")
    assert spec.version == 3 and spec.color_constancy == "shades_of_gray" and spec.tone == "none"
    assert (spec.detail_width, spec.detail_height) == (200, 150)  # the bundled images' size (detail_size=auto)


def test_output_data_dir_gets_metrics_and_report(full_job: tuple[Path, Any, Path]) -> None:
    base, _, out = full_job
    assert json.loads((out / "metrics.json").read_text()) == json.loads((base / "model" / "metrics.json").read_text())
    assert (out / "evaluation" / "roc.png").is_file()
    assert not (base / "output" / "failure").exists()


def test_baseline_channel_is_evaluated_on_the_same_test_split(full_job: tuple[Path, Any, Path]) -> None:
    base, proc, _ = full_job
    metrics = json.loads((base / "model" / "metrics.json").read_text())
    baseline = metrics["baseline"]
    assert baseline is not None, metrics.get("baseline_error")
    assert baseline["architecture"] == "mobilenet_v3_small"
    assert baseline.keys() >= SPLIT_KEYS
    assert np.array(baseline["confusion_matrix"]).sum() == metrics["n_test"]
    assert "baseline_balanced_accuracy=" in proc.stdout


def test_torchscript_model_serves_probabilities_and_embeddings(full_job: tuple[Path, Any, Path]) -> None:
    model_dir = full_job[0] / "model"
    spec = read_spec(model_dir / "preprocessing.json")
    assert (spec.width, spec.height) == (64, 48)
    assert spec.mean == (0.498, 0.498, 0.498)  # EfficientNet-Lite normalisation
    images = sorted((SAMPLE / "images").glob("*.jpg"))[:5]
    x = torch.from_numpy(preprocess_batch(list(images), spec))
    ts = load_torchscript(model_dir / "model.ts")
    with torch.no_grad():
        logits = ts(x)
        probs, emb = ts.predict(x)
        emb2 = ts.embed(x)
    assert logits.shape == probs.shape == (5, 7)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1))
    torch.testing.assert_close(emb, emb2)
    # tta=dihedral (the default): model.ts averages the flips and the 180-degree turn, so a mirrored image gets the
    # same answer, and metrics.json describes that model.
    assert json.loads((model_dir / "metrics.json").read_text())["hyperparameters"]["tta"] == "dihedral"
    with torch.no_grad():
        torch.testing.assert_close(ts.predict(x.flip(3))[0], probs, atol=1e-5, rtol=0)
        torch.testing.assert_close(ts.predict(x.flip([2, 3]))[1], emb, atol=1e-4, rtol=1e-4)
    reference = json.loads((model_dir / "reference_stats.json").read_text())
    assert emb.shape == (5, reference["embedding"]["dim"])
    # model.pt is the state dict of the same network.
    state = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    assert state["head.1.weight"].shape == (7, reference["embedding"]["dim"])


def test_reference_stats_keys(full_job: tuple[Path, Any, Path]) -> None:
    ref = json.loads((full_job[0] / "model" / "reference_stats.json").read_text())
    assert {"schema_version", "n", "classes", "class_prior", "embedding", "confidence", "image"} <= ref.keys()
    assert ref["n"] == 42  # validation (21) + test (21)
    assert {"train", "reference_true", "reference_predicted"} == set(ref["class_prior"])
    assert sum(ref["class_prior"]["train"].values()) == pytest.approx(1.0, abs=1e-5)
    pca = ref["embedding"]["pca"]
    assert len(pca["components"]) == pca["k"] and len(pca["components"][0]) == ref["embedding"]["dim"]
    assert len(ref["embedding"]["projections_sample"]) == 42
    for name in ("brightness", "contrast", "red_mean", "green_mean", "blue_mean", "saturation"):
        assert 0.0 < ref["image"][name]["mean"] < 1.0
    assert ref["image"]["width"]["mean"] > 64  # statistics describe the original files, not the model input


def test_metric_regexes_match_the_job_output(full_job: tuple[Path, Any, Path]) -> None:
    _, proc, _ = full_job
    definitions = json.loads(METRIC_DEFINITIONS.read_text())
    assert len(definitions) <= 40 and all(len(d["Regex"]) <= 500 for d in definitions)  # SageMaker limits
    values: dict[str, list[float]] = {}
    for d in definitions:
        values[d["Name"]] = [float(m) for m in re.findall(d["Regex"], proc.stdout)]
        assert values[d["Name"]], f"{d['Name']} never matched"
    assert values["epoch"] == [1.0, 2.0]
    assert len(values["validation:balanced_accuracy"]) == 2
    metrics = json.loads((full_job[0] / "model" / "metrics.json").read_text())
    assert values["test:balanced_accuracy"] == [pytest.approx(metrics["test"]["balanced_accuracy"], rel=1e-5)]
    assert values["test:macro_auc"] == [pytest.approx(metrics["test"]["macro_auc"], rel=1e-5)]
    # test:accuracy must not pick up test_balanced_accuracy and vice versa.
    assert values["test:accuracy"] == [pytest.approx(metrics["test"]["accuracy"], rel=1e-5)]


@pytest.mark.parametrize(
    ("hps", "fragment"),
    [
        ({"epochs": "abc"}, "epochs"),
        ({"lr": "-1"}, "lr"),
        ({"arch": "vgg99"}, "arch"),
        ({"no_such_thing": "1"}, "unknown hyperparameter 'no_such_thing'"),
        ({"trainable_from": "net blocks"}, "trainable_from"),
        ({"trainable_from": "net._blocks.99"}, "trainable_from='net._blocks.99' names no backbone layer"),
    ],
)
def test_bad_hyperparameter_fails_cleanly(job_factory: Callable[..., Path], hps: dict[str, str], fragment: str) -> None:
    base = job_factory("bad", {**FAST_HPS, **hps}, per_class=(1, 1, 1))
    proc = run_train(base, timeout=60)
    assert proc.returncode == 2, _fail(proc)
    lines = (base / "output" / "failure").read_text().splitlines()
    assert len(lines) == 1 and fragment in lines[0]
    assert not (base / "model" / "model.ts").exists()


def test_missing_channel_fails_cleanly(job_factory: Callable[..., Path]) -> None:
    base = job_factory("nochannel", FAST_HPS, per_class=(1, 1, 1))
    (base / "input" / "data" / "images").unlink()
    proc = run_train(base, timeout=120)
    assert proc.returncode == 2, _fail(proc)
    assert "channel 'images' not found" in (base / "output" / "failure").read_text()


def test_killed_job_resumes_from_the_latest_checkpoint(job_factory: Callable[..., Path]) -> None:
    # Class-balanced sampling here, so that path runs too (the other jobs use plain cross-entropy).
    # And a weight average, which must carry on across the restart rather than start over.
    hps = {**FAST_HPS, "epochs": "3", "imbalance": "sampler", "ema_decay": "0.9"}
    base = job_factory("resume", hps, per_class=(3, 2, 2))
    first = run_train(base, env={"LESIONML_STOP_AFTER_EPOCH": "1"})
    assert first.returncode == -signal.SIGKILL, _fail(first)
    ckpt = torch.load(base / "checkpoints" / "checkpoint-last.pt", map_location="cpu", weights_only=False)
    assert ckpt["state"]["epoch"] == 1
    assert ckpt["ema"]["updates"] == 1  # 21 images, batches of 16, the last one dropped: one step per epoch
    assert not (base / "model" / "model.ts").exists()

    second = run_train(base)
    assert second.returncode == 0, _fail(second)
    assert "continuing at epoch 2" in second.stdout
    epochs = [int(e) for e in re.findall(r"\bepoch=(\d+);", second.stdout)]
    assert epochs == [2, 3]
    metrics = json.loads((base / "model" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    # Epoch 1's record came from the checkpoint, not from a rerun.
    assert metrics["history"][0]["train_loss"] == pytest.approx(ckpt["state"]["history"][0]["train_loss"])
    last = torch.load(base / "checkpoints" / "checkpoint-last.pt", map_location="cpu", weights_only=False)
    assert last["ema"]["updates"] == 3


def test_the_weight_average_is_validated_and_exported(job_factory: Callable[..., Path]) -> None:
    hps = {**FAST_HPS, "epochs": "1", "freeze_epochs": "0", "ema_decay": "0.5", "class_bias": "none"}
    base = job_factory("ema", hps, per_class=(4, 2, 2))
    proc = run_train(base)
    assert proc.returncode == 0, _fail(proc)
    ckpt = torch.load(base / "checkpoints" / "checkpoint-last.pt", map_location="cpu", weights_only=False)
    exported = torch.load(base / "model" / "model.pt", map_location="cpu", weights_only=True)
    average, raw = ckpt["ema"]["module"], ckpt["model"]
    assert ckpt["ema"]["updates"] == 1 and set(exported) == set(average)
    assert all(torch.equal(exported[k], average[k]) for k in exported)
    # After one step the average is still 18 % the initial weights: not the raw weights that trained.
    assert any(not torch.equal(exported[k], raw[k]) for k in exported if exported[k].is_floating_point())


def test_weight_average_follows_its_decay_ramp() -> None:
    from training_image.ema import WeightEma

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEma(net, 0.9)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(4, 3))  # moves the BatchNorm statistics and its integer step counter
    decay = ema.current_decay()
    assert decay == pytest.approx(2 / 11)
    ema.update()
    torch.testing.assert_close(ema.module[0].weight, decay * w0 + (1 - decay) * (w0 + 1))
    assert int(ema.module[1].num_batches_tracked) == 1 and not ema.module[0].weight.requires_grad
    assert not torch.equal(ema.module[1].running_mean, torch.zeros(2))
    for _ in range(100):
        ema.update()
    assert ema.current_decay() == 0.9
    torch.testing.assert_close(ema.module[0].weight, net[0].weight)  # constant weights: the average converges


def test_two_processes_under_torchrun_rank0_writes(job_factory: Callable[..., Path]) -> None:
    # SM_NUM_GPUS=2 without CUDA: torchrun starts two CPU (gloo) ranks; only rank 0 logs metrics and writes.
    # With trainable_from, DDP must be built after the early layers are frozen, or the ranks wait for gradients
    # that never come.
    hps = {**FAST_HPS, "epochs": "2", "freeze_epochs": "0", "arch": "efficientnet_lite0", "pretrained": "true",
           "trainable_from": "net._blocks.3"}
    base = job_factory("ddp", hps, per_class=(4, 2, 2))
    proc = run_train(base, env={"SM_NUM_GPUS": "2", "SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1"})
    assert proc.returncode == 0, _fail(proc)
    assert "torch.distributed.run --nproc_per_node=2 --standalone" in proc.stdout
    assert "rank 0 of 2" in proc.stdout
    assert [int(e) for e in re.findall(r"\bepoch=(\d+);", proc.stdout)] == [1, 2]  # once, not once per rank
    metrics = json.loads((base / "model" / "metrics.json").read_text())
    assert metrics["n_train"] == 28 and metrics["epochs_run"] == 2

    # The layers before trainable_from kept their ImageNet values, BatchNorm statistics included; the rest trained.
    trained = torch.load(base / "model" / "model.pt", map_location="cpu", weights_only=True)
    pretrained = build_model("efficientnet_lite0", 7, True, (32, 32))[0].state_dict()
    frozen = [k for k in trained if k.startswith(("backbone.net._conv_stem", "backbone.net._bn0",
                                                  "backbone.net._blocks.0.", "backbone.net._blocks.2."))]
    tuned = [k for k in trained if k.startswith("backbone.net._blocks.3.") and k.endswith("weight")]
    assert frozen and tuned
    assert all(torch.equal(trained[k], pretrained[k]) for k in frozen if "num_batches" not in k)
    assert not any(torch.equal(trained[k], pretrained[k]) for k in tuned)
