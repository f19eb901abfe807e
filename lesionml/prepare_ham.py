"""Build training-job manifests from a HAM10000 folder, outside the pipeline.

Splits by ``lesion_id`` (all images of a lesion land in one split), stratified by diagnosis, with a fixed seed,
70/15/15 by default. Writes the ``manifests`` channel of docs/contracts.md and, with ``--job-dir``, a complete
fake ``/opt/ml`` tree (manifests + a symlink to the images + ``hyperparameters.json``) that
``training_image/train.py`` can run on via ``SM_BASE_DIR``::

    python -m lesionml.prepare_ham --metadata /data/ham10000/HAM10000_metadata.csv \\
        --images /data/ham10000/images --job-dir /tmp/job --hp epochs=3 --hp arch=efficientnet_lite0
    SM_BASE_DIR=/tmp/job python training_image/train.py train
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from lesion_common.labels import parse_metadata_csv
from lesion_common.splits import DATASET_COLUMNS
from lesionml.labels import classes_document, classes_for

SPLITS = ("train", "validation", "test")
MANIFEST_HEADER = DATASET_COLUMNS


def read_ham_metadata(metadata: Path, images: Path, label_set: str = "ham7") -> list[dict[str, str]]:
    """Rows ``{image_id, path, label, lesion_id}`` for metadata entries whose image file exists."""
    valid = set(classes_for(label_set))
    rows = []
    with open(metadata, newline="") as f:
        for rec in csv.DictReader(f):
            label = rec["dx"].strip().lower()
            if label not in valid:
                continue
            for ext in (".jpg", ".jpeg", ".png"):
                if (images / f"{rec['image_id']}{ext}").is_file():
                    rows.append(
                        {
                            "image_id": rec["image_id"],
                            "path": f"{rec['image_id']}{ext}",
                            "label": label,
                            "lesion_id": rec.get("lesion_id") or rec["image_id"],
                            "source": "ham10000",
                        }
                    )
                    break
    return rows


def read_labelled_source(
    labels: Path, images: Path, source: str, label_set: str = "ham7"
) -> list[dict[str, str]]:
    """Rows of any label file :func:`lesion_common.labels.parse_metadata_csv` reads (as uploads' label files are
    read), for the images found in ``images`` as ``<image_id>.jpg|.jpeg|.png``; ``path`` is ``<source>/<file>``.

    The lesion is the file's grouping (``lesion_group``, else ``lesion_id``), else the image itself.
    """
    rows = []
    for rec in parse_metadata_csv(labels.read_text(encoding="utf-8"), label_set=label_set):
        if not rec.ok or rec.label is None:
            continue
        for ext in (".jpg", ".jpeg", ".png"):
            if (images / f"{rec.image_id}{ext}").is_file():
                rows.append({"image_id": rec.image_id, "path": f"{source}/{rec.image_id}{ext}", "label": rec.label,
                             "lesion_id": rec.lesion_id or rec.image_id, "source": source})
                break
    return rows


def merge_splits(*parts: dict[str, list[dict[str, str]]]) -> dict[str, list[dict[str, str]]]:
    """Several sources' splits (each made by :func:`split_by_lesion` on its own) as one dataset."""
    out: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for part in parts:
        for split in SPLITS:
            out[split].extend(part[split])
    for split in SPLITS:
        out[split].sort(key=lambda r: r["image_id"])
    return out


def split_by_lesion(
    rows: Sequence[dict[str, str]], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 42
) -> dict[str, list[dict[str, str]]]:
    """Assign whole lesions to splits, stratified by each lesion's (first) label.

    Parameters
    ----------
    rows : sequence of dict
        Manifest rows with ``lesion_id`` and ``label``.
    fractions : (float, float, float)
        Train, validation and test fractions of lesions per class.
    seed : int
        Shuffling seed; the same rows and seed always give the same split.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError("fractions must be three non-negative numbers summing to 1")
    by_lesion: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_lesion[r["lesion_id"]].append(r)
    lesions_by_label: dict[str, list[str]] = defaultdict(list)
    for lesion, items in by_lesion.items():
        lesions_by_label[items[0]["label"]].append(lesion)
    rng = random.Random(seed)
    out: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for label in sorted(lesions_by_label):
        lesions = sorted(lesions_by_label[label])
        rng.shuffle(lesions)
        n = len(lesions)
        n_train = round(n * fractions[0])
        n_val = round(n * fractions[1])
        parts = (lesions[:n_train], lesions[n_train : n_train + n_val], lesions[n_train + n_val :])
        for split, part in zip(SPLITS, parts, strict=True):
            for lesion in part:
                out[split].extend(by_lesion[lesion])
    for split in SPLITS:
        out[split].sort(key=lambda r: r["image_id"])
    return out


def write_manifests(splits: dict[str, list[dict[str, str]]], out_dir: Path, label_set: str = "ham7") -> None:
    """Write ``train.csv``, ``validation.csv``, ``test.csv`` and ``classes.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with open(out_dir / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_HEADER)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in MANIFEST_HEADER} for r in splits[split])
    (out_dir / "classes.json").write_text(json.dumps(classes_document(label_set)) + "\n")


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        if not link.is_symlink():
            raise FileExistsError(f"{link} exists and is not a symlink")
        link.unlink()
    os.symlink(target.resolve(), link, target_is_directory=True)


def make_job_dir(
    job_dir: Path, splits: dict[str, list[dict[str, str]]], images: Path | Mapping[str, Path],
    hyperparameters: dict[str, str],
) -> None:
    """Lay out a fake ``/opt/ml``: ``input/data/{manifests,images}`` and ``input/config/hyperparameters.json``.

    ``images`` is one folder (the channel is a link to it), or one folder per source (the channel is a folder of
    links named by source, as the rows' ``<source>/<file>`` paths expect).
    """
    data = job_dir / "input" / "data"
    write_manifests(splits, data / "manifests")
    link = data / "images"
    if isinstance(images, Path):
        _link(link, images)
    else:
        if link.is_symlink():
            link.unlink()
        link.mkdir(parents=True, exist_ok=True)
        for source, folder in images.items():
            _link(link / source, folder)
    config = job_dir / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    # SageMaker writes every hyperparameter value as a string.
    (config / "hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hyperparameters.items()}) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metadata", type=Path, required=True, help="HAM10000_metadata.csv")
    p.add_argument("--images", type=Path, required=True, help="folder of <image_id>.jpg")
    p.add_argument("--out", type=Path, help="write the manifests channel here")
    p.add_argument("--job-dir", type=Path, help="write a fake /opt/ml tree here")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fractions", default="0.7,0.15,0.15")
    p.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE", help="hyperparameter (repeatable)")
    args = p.parse_args(argv)
    if not args.out and not args.job_dir:
        p.error("give --out and/or --job-dir")
    rows = read_ham_metadata(args.metadata, args.images)
    if not rows:
        p.error(f"no images of {args.metadata} found in {args.images}")
    splits = split_by_lesion(rows, [float(x) for x in args.fractions.split(",")], args.seed)
    if args.out:
        write_manifests(splits, args.out)
    if args.job_dir:
        hps = dict(h.split("=", 1) for h in args.hp)
        make_job_dir(args.job_dir, splits, args.images, hps)
    print(" ".join(f"{s}={len(splits[s])}" for s in SPLITS), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
