"""Build a complete serving model directory without training, for the inference tests and benchmarks.

The directory has every file the training job writes (docs/contracts.md, "Training job outputs"): an
EfficientNet-Lite0 backbone with its packaged ImageNet weights (or random weights when the package is absent)
and a seeded random linear head, traced to ``model.ts``; ``preprocessing.json``; ``classes.json``;
``metrics.json``; and a ``reference_stats.json`` built by :func:`lesionml.reference_stats.build_reference_stats`
from real dermoscopy images (``data/sample/images``), exactly as training builds it from its held-out split.
The head is untrained, so the predicted classes are meaningless, but the embedding (what out-of-distribution
detection reads) is a real ImageNet feature space, which is what makes the OOD tests meaningful. Like the training
job, it seals the directory with :mod:`lesionml.model_dir`: ``known_answers.json`` from ``model.ts``, then
``manifest.json`` last. :func:`reseal` does it again after a test changed a file on purpose (what someone who
regenerates the manifest over a changed directory does).

Run as a script to write one: ``python -m tests.inference.model_factory DEST``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
MODEL_FILES = ("model.ts", "model.pt", "preprocessing.json", "classes.json", "metrics.json", "reference_stats.json",
               "known_answers.json", "manifest.json")


def _sample_rows(limit: int, seed: int) -> list[tuple[Path, str]]:
    """``(path, label)`` of up to ``limit`` sample images, a fixed random subset."""
    with open(SAMPLE / "HAM10000_metadata.csv", newline="") as f:
        rows = [(SAMPLE / "images" / f"{r['image_id']}.jpg", r["dx"]) for r in csv.DictReader(f)]
    rows = [r for r in rows if r[0].is_file()]
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(rows), size=min(limit, len(rows)), replace=False))
    return [rows[i] for i in keep]


def build_model_dir(
    dest: str | Path,
    arch: str = "efficientnet_lite0",
    height: int = 150,
    width: int = 200,
    n_reference: int = 160,
    seed: int = 0,
    melanoma_threshold: float = 0.3,
) -> Path:
    """Write a serving model directory to ``dest`` and return it.

    Parameters
    ----------
    dest : str or Path
        Directory to create (may exist).
    arch : str
        A :data:`lesionml.archs.ARCHITECTURES` name.
    height, width : int
        Model input size.
    n_reference : int
        Sample images the drift/OOD reference is built from.
    seed : int
        Seed of the head's weights and of the reference subset.
    melanoma_threshold : float
        Written to ``metrics.json``.
    """
    import torch

    from lesionml.labels import classes_for
    from lesionml.models import build_model, export_torchscript
    from lesionml.preprocessing import PreprocessingSpec, load_image, normalise, resize_for_model, write_spec
    from lesionml.reference_stats import build_reference_stats, image_statistics

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    classes = list(classes_for("ham7"))
    torch.manual_seed(seed)
    model, info = build_model(arch, len(classes), pretrained=True, image_size=(height, width))
    model.eval()
    spec = PreprocessingSpec(arch=arch, height=height, width=width, mean=info.mean, std=info.std)

    rows = _sample_rows(n_reference, seed)
    tensors, stats, labels = [], [], []
    for path, label in rows:
        img = load_image(path, exif_transpose=spec.exif_transpose)
        stats.append(image_statistics(img))
        tensors.append(normalise(np.asarray(resize_for_model(img, spec)), spec))
        labels.append(classes.index(label))
    x = torch.from_numpy(np.stack(tensors))
    probs, embs = [], []
    threads = torch.get_num_threads()
    # One thread and small batches: several times faster than the defaults on a small, shared CPU.
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for i in range(0, len(x), 8):
                p, e = model.predict(x[i : i + 8])
                probs.append(p.numpy())
                embs.append(e.numpy())
    finally:
        torch.set_num_threads(threads)
    y = np.asarray(labels)
    reference = build_reference_stats(
        np.concatenate(embs), np.concatenate(probs), y, stats, y, "ham7", classes, source="validation+test", seed=seed
    )

    export_torchscript(model, x[:1], str(dest / "model.ts"))
    torch.save(model.state_dict(), dest / "model.pt")
    write_spec(spec, dest / "preprocessing.json")
    (dest / "classes.json").write_text(json.dumps({"label_set": "ham7", "classes": classes}, indent=2))
    metrics = {
        "label_set": "ham7", "classes": classes, "architecture": arch, "melanoma_threshold": melanoma_threshold,
        "n_train": 0, "n_validation": len(rows), "n_test": 0, "validation": {}, "test": {}, "baseline": None,
        "pretrained_weights": info.weights != "random", "note": "untrained head, built by tests/inference",
    }
    (dest / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (dest / "reference_stats.json").write_text(json.dumps(reference))
    reseal(dest, answers=True)
    return dest


def reseal(model_dir: str | Path, answers: bool = False) -> str:
    """Write ``manifest.json`` over the directory as it is now (with ``answers``, first record the known answers
    again from its ``model.ts``: :func:`lesionml.model_dir.seal`); returns the manifest's digest."""
    from lesionml.model_dir import seal, write_manifest

    return seal(model_dir) if answers else write_manifest(model_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.inference.model_factory DEST")
    print(build_model_dir(sys.argv[1]))
