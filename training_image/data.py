"""The job's data: channels and manifests, image loading, dermoscopy augmentation, datasets and loaders."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from lesion_common.splits import DATASET_COLUMNS
from lesionml.acquisition import random_acquisition, random_squash
from lesionml.labels import class_index, classes_for, melanoma_index, parse_classes_document
from lesionml.preprocessing import (
    PreprocessingSpec,
    crop_box_for_aspect,
    load_image,
    model_input,
    normalise,
    reduce_to_detail,
    resize_for_model,
)
from lesionml.reference_stats import image_statistics
from training_image.config import Config, ConfigError, Paths

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

SPLITS = ("train", "validation", "test")
# The columns every split's CSV has; ``source`` (the dataset an image came from) is optional.
MANIFEST_COLUMNS = DATASET_COLUMNS[:4]
# Up to this fraction of a split may be missing on disk (logged and dropped); more means a broken channel.
MAX_MISSING_FRACTION = 0.01


@dataclass(frozen=True)
class Sample:
    """One manifest row, resolved."""

    image_id: str
    path: Path
    label: int
    lesion_id: str
    source: str = ""


def read_classes(manifests: Path, label_set_hp: str) -> tuple[str, tuple[str, ...]]:
    """Label set and classes from ``classes.json``, checked against the ``label_set`` hyperparameter."""
    path = manifests / "classes.json"
    if path.is_file():
        try:
            label_set, classes = parse_classes_document(json.loads(path.read_text()))
        except ValueError as e:
            raise ConfigError(f"manifests/classes.json: {e}") from None
        if label_set_hp and label_set_hp != label_set:
            raise ConfigError(f"hyperparameter label_set={label_set_hp} but manifests/classes.json says {label_set}")
        return label_set, classes
    if not label_set_hp:
        raise ConfigError("manifests channel has no classes.json and no label_set hyperparameter was given")
    return label_set_hp, classes_for(label_set_hp)


def read_manifest(path: Path, images_root: Path, label_set: str) -> list[Sample]:
    """Rows of one split's CSV whose image exists; unknown labels and too many missing files are errors."""
    if not path.is_file():
        raise ConfigError(f"manifest {path.name} is missing from the manifests channel")
    index = class_index(label_set)
    samples: list[Sample] = []
    missing: list[str] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(MANIFEST_COLUMNS) <= set(reader.fieldnames):
            raise ConfigError(f"{path.name} must have the header {','.join(MANIFEST_COLUMNS)}, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            label = (row["label"] or "").strip().lower()
            if label not in index:
                raise ConfigError(f"{path.name} line {line}: label {row['label']!r} is not in {label_set}")
            rel = (row["path"] or "").strip()
            if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
                raise ConfigError(f"{path.name} line {line}: path {rel!r} must be relative to the images channel")
            image_path = images_root / rel
            if not image_path.is_file():
                missing.append(rel)
                continue
            samples.append(Sample(row["image_id"], image_path, index[label], row["lesion_id"] or row["image_id"],
                                  (row.get("source") or "").strip()))
    total = len(samples) + len(missing)
    if missing:
        msg = f"{len(missing)} of {total} images of {path.name} are missing from the images channel (e.g. {missing[0]})"
        if len(missing) > MAX_MISSING_FRACTION * total:
            raise ConfigError(msg)
        log.warning("%s; skipping them", msg)
    if not samples:
        raise ConfigError(f"{path.name} lists no usable images")
    return samples


def stratified_cap(samples: Sequence[Sample], cap: int, seed: int) -> list[Sample]:
    """At most ``cap`` samples keeping class proportions (deterministic for a seed)."""
    if cap <= 0 or cap >= len(samples):
        return list(samples)
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    keep: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, round(cap * len(idx) / len(samples)))
        keep.extend(rng.choice(idx, size=min(n, len(idx)), replace=False).tolist())
    return [samples[i] for i in sorted(keep)]


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _map_threads(fn: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """Decode in threads: Pillow releases the GIL while decoding."""
    if threads <= 1 or len(items) < 16:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items, chunksize=16))


def median_crop_size(samples: Sequence[Sample], height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` of the median training image's centred crop of the model's aspect (``detail_size=auto``).

    Reads the image headers only. The median, not the smallest: one low-resolution source among several must not
    blur the others, and the resolution augmentation covers pictures below it.
    """
    widths = []
    for s in samples:
        try:
            with Image.open(s.path) as img:
                w, h = img.size
        except OSError:
            continue
        left, top, right, bottom = crop_box_for_aspect(w, h, width, height)
        widths.append(right - left)
    if not widths:
        return 0, 0
    w = int(np.median(widths))
    return max(1, round(w * height / width)), w


class TrainImages:
    """Decoded training images, cached in memory when they fit.

    Each image is first reduced to the spec's detail cap (:func:`lesionml.preprocessing.reduce_to_detail`), as
    serving reduces it, so a sharper source trains at the detail it will be served at. Cached copies are then shrunk
    to at most twice the model input per side: random crops never need more detail, and it bounds memory for large
    uploads.
    """

    def __init__(self, samples: Sequence[Sample], spec: PreprocessingSpec, cache: str, threads: int) -> None:
        self.samples = list(samples)
        self.spec = spec
        self.max_side = (2 * spec.width, 2 * spec.height)
        self.cache: list[np.ndarray] | None = None
        if cache == "true" or (cache == "auto" and self._fits()):
            self.cache = _map_threads(self._decode, self.samples, threads)

    def _fits(self) -> bool:
        per_image = self.max_side[0] * self.max_side[1] * 3
        return len(self.samples) * per_image < min(8 << 30, _mem_available() // 4)

    def _decode(self, s: Sample) -> np.ndarray:
        img = reduce_to_detail(load_image(s.path, exif_transpose=self.spec.exif_transpose), self.spec)
        if img.width > self.max_side[0] or img.height > self.max_side[1]:
            img.thumbnail(self.max_side, Image.Resampling.BILINEAR)
        return np.asarray(img)

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, i: int) -> Image.Image:
        pixels = self.cache[i] if self.cache is not None else self._decode(self.samples[i])
        return Image.fromarray(pixels)


# ITU-R BT.601 luma (what PIL's "L" conversion and ImageEnhance use) and the RGB <-> YIQ transform; a hue shift is
# a rotation of the (I, Q) chroma plane, so with brightness, contrast and saturation it makes one affine colour map.
_LUMA = np.array([0.299, 0.587, 0.114])
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)


def colour_transform(rng: np.random.Generator, mean_luma: float) -> tuple[np.ndarray, np.ndarray]:
    """A random colour jitter as ``rgb' = M @ rgb + t`` (0-255 scale).

    Brightness, contrast (around the image's mean luma) and saturation in [0.8, 1.2], and half the time a hue
    rotation of up to +-3 % of the circle: the dermatoscope and lighting differences seen across HAM10000's
    sources. The same operations as PIL's ``ImageEnhance`` chain, composed into one 3x3 map instead of four passes
    over the pixels (and one HSV round trip): about 10x cheaper per image, which is data loading the CPU no longer
    does between training steps.
    """
    brightness, contrast, saturation = rng.uniform(0.8, 1.2, size=3)
    m = np.eye(3) * saturation + (1 - saturation) * np.outer(np.ones(3), _LUMA)
    if rng.random() < 0.5:
        angle = 2 * np.pi * rng.uniform(-0.03, 0.03)
        cos, sin = np.cos(angle), np.sin(angle)
        rotation = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
        m = _YIQ_INV @ rotation @ _YIQ @ m
    # Saturation and hue keep greys grey (M @ 1 = 1), so contrast's grey level passes through them unchanged.
    matrix = contrast * brightness * m
    offset = np.full(3, (1 - contrast) * brightness * mean_luma)
    return matrix, offset


def augment(img: Image.Image, rng: np.random.Generator, height: int, width: int, min_scale: float) -> Image.Image:
    """Dermoscopy geometry augmentation: dihedral symmetry and a random resized crop.

    Lesions have no canonical orientation, so flips and rotations are label-preserving. For a non-square input only
    the four that keep the aspect ratio are used (flips and 180 degrees): a 90-degree turn of a 4:3 picture leaves
    a 3:4 one, from which a 4:3 crop keeps barely half of the lesion's surroundings. Colour jitter comes after, on
    the model input (:func:`colour_transform`).
    """
    k = int(rng.integers(4)) if width == height else 2 * int(rng.integers(2))
    if k:
        img = img.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[k - 1])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Random resized crop around the target aspect ratio.
    w0, h0 = img.size
    target = width / height
    box = None
    for _ in range(10):
        area = w0 * h0 * rng.uniform(min_scale, 1.0)
        aspect = target * float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w0 and 0 < ch <= h0:
            left, top = int(rng.integers(0, w0 - cw + 1)), int(rng.integers(0, h0 - ch + 1))
            box = (left, top, left + cw, top + ch)
            break
    if box is None:
        box = crop_box_for_aspect(w0, h0, width, height)
    return img.resize((width, height), Image.Resampling.BILINEAR, box=box)


def jitter_and_normalise(pixels: np.ndarray, rng: np.random.Generator, spec: PreprocessingSpec) -> np.ndarray:
    """``(H, W, 3)`` uint8 pixels to the normalised float32 ``(3, H, W)`` model input after a random colour jitter.

    The result is clipped to the 0-255 range, as a jittered 8-bit image would be, then goes through the serving
    transform's last steps (:func:`lesionml.preprocessing.model_input`: colour constancy, normalisation).
    """
    h, w, _ = pixels.shape
    planes = pixels.reshape(-1, 3).T.astype(np.float32)  # (3, H*W)
    mean_luma = float(_LUMA @ planes.mean(axis=1))
    matrix, offset = colour_transform(rng, mean_luma)
    out = matrix.astype(np.float32) @ planes
    out += offset.astype(np.float32)[:, None]
    np.clip(out, 0.0, 255.0, out=out)
    return model_input(out, h, w, spec)


class TrainDataset(Dataset[tuple[torch.Tensor, int]]):
    """Augmented training samples; randomness depends only on (seed, epoch, index), not on workers.

    With ``acquisition`` > 0, that fraction of the samples also goes through a random acquisition: sometimes a
    squash before the crop, then resolution, sharpening, tone, colour cast, vignetting and JPEG on the model-sized
    crop (:mod:`lesionml.acquisition`).
    """

    def __init__(
        self, images: TrainImages, spec: PreprocessingSpec, seed: int, min_scale: float, acquisition: float = 0.0
    ) -> None:
        self.images = images
        self.spec = spec
        self.seed = seed
        self.min_scale = min_scale
        self.acquisition = acquisition
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        img = self.images.get(i)
        shifted = self.acquisition > 0 and rng.random() < self.acquisition
        if shifted:
            img = random_squash(img, rng)
        img = augment(img, rng, self.spec.height, self.spec.width, self.min_scale)
        if shifted:
            img = random_acquisition(img, rng)
        x = jitter_and_normalise(np.asarray(img), rng, self.spec)
        return torch.from_numpy(x), self.images.samples[i].label


class EvalImages:
    """Validation/test images after the serving resize (uint8), plus image statistics of the originals.

    With ``shift`` (one of :data:`lesionml.acquisition.SHIFTS`), each picture is first changed by it: the same
    images as another camera or clinic would have taken them.
    """

    def __init__(
        self, samples: Sequence[Sample], spec: PreprocessingSpec, threads: int,
        shift: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.spec = spec
        self.shift = shift
        decoded = _map_threads(self._load, self.samples, threads)
        self.pixels: list[np.ndarray] = [d[0] for d in decoded]
        self.stats: list[dict[str, float]] = [d[1] for d in decoded]
        self.labels = np.array([s.label for s in self.samples], dtype=np.int64)

    def _load(self, s: Sample) -> tuple[np.ndarray, dict[str, float]]:
        img = load_image(s.path, exif_transpose=self.spec.exif_transpose)
        if self.shift is not None:
            img = self.shift(img)
        return np.asarray(resize_for_model(img, self.spec)), image_statistics(img)

    def same_geometry(self, spec: PreprocessingSpec) -> bool:
        """Whether ``spec`` resizes exactly like this cache (so only normalisation differs)."""
        a, b = self.spec, spec
        return (a.height, a.width, a.resize, a.interpolation, a.exif_transpose, a.detail_width, a.detail_height) == (
            b.height, b.width, b.resize, b.interpolation, b.exif_transpose, b.detail_width, b.detail_height,
        )


class EvalDataset(Dataset[tuple[torch.Tensor, int]]):
    """Normalised evaluation tensors, exactly what serving computes from the same file."""

    def __init__(self, images: EvalImages, spec: PreprocessingSpec) -> None:
        if not images.same_geometry(spec):
            raise ValueError("EvalDataset needs images resized with the same geometry as spec")
        self.images = images
        self.spec = spec

    def __len__(self) -> int:
        return len(self.images.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(normalise(self.images.pixels[i], self.spec)), int(self.images.labels[i])


def class_counts(samples: Sequence[Sample], num_classes: int) -> np.ndarray:
    """Number of samples per class."""
    return np.bincount([s.label for s in samples], minlength=num_classes).astype(np.int64)


def balanced_weights(counts: np.ndarray) -> np.ndarray:
    """Per-class weights ``N / (K * n_c)`` over the K present classes (0 for absent ones): mean weight 1."""
    present = counts > 0
    w = np.zeros(len(counts), dtype=np.float64)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


@dataclass
class Data:
    """Everything read from the channels."""

    label_set: str
    classes: tuple[str, ...]
    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]


def load_data(cfg: Config, paths: Paths) -> Data:
    """Read and validate the manifests and images channels."""
    manifests = paths.channel("manifests")
    images = paths.channel("images")
    if manifests is None:
        raise ConfigError(f"channel 'manifests' not found (SM_CHANNEL_MANIFESTS or {paths.data_dir / 'manifests'})")
    if images is None:
        raise ConfigError(f"channel 'images' not found (SM_CHANNEL_IMAGES or {paths.data_dir / 'images'})")
    label_set, classes = read_classes(manifests, cfg.label_set)
    splits = {s: read_manifest(manifests / f"{s}.csv", images, label_set) for s in SPLITS}
    train = stratified_cap(splits["train"], cfg.max_train_images, cfg.seed)
    counts = class_counts(train, len(classes))
    absent = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if absent:
        log.warning("no training images for class(es) %s", ", ".join(absent))
    if int(counts[melanoma_index(label_set)]) == 0:
        log.warning("no melanoma in the training split: melanoma metrics will be meaningless")
    return Data(label_set, classes, train, splits["validation"], splits["test"])


def make_loader(
    dataset: Dataset[tuple[torch.Tensor, int]], batch_size: int, sampler: Sampler[int] | None,
    workers: int, device: torch.device, drop_last: bool = False,
) -> DataLoader[tuple[torch.Tensor, int]]:
    """The job's DataLoader: pinned memory on CUDA, workers started afresh each pass."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        drop_last=drop_last, persistent_workers=False,
    )


class ShardedSampler(Sampler[int]):
    """Per-epoch sampler, identical for a given (seed, epoch) and split across DDP ranks.

    With ``weights`` (``imbalance=sampler``) it draws with replacement in proportion to them; otherwise it shuffles.
    """

    def __init__(self, n: int, weights: np.ndarray | None, seed: int, rank: int, world: int) -> None:
        self.n, self.weights, self.seed, self.rank, self.world = n, weights, seed, rank, world
        self.epoch = 0
        self.per_rank = math.ceil(n / world)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.per_rank * self.world
        if self.weights is not None:
            idx = torch.multinomial(torch.as_tensor(self.weights, dtype=torch.double), total, True, generator=g)
        else:
            perm = torch.randperm(self.n, generator=g)
            idx = torch.cat([perm, perm[: total - self.n]])
        return iter(idx[self.rank :: self.world].tolist())
