"""Throughput of upload validation against the bare minimum any pipeline pays (decode + re-encode).

Usage::

    python -m benchmarks.validation.bench_validate [--images N] [--repeats R] [--phash-study]

Single core: BLAS threads are pinned to one before NumPy loads, and Pillow decodes/encodes on the calling thread.
Both loops run over the same in-memory bytes, alternating in chunks, timed in process CPU seconds, best of R
rounds (development machines and CI are shared: wall time would measure the neighbours).
``--phash-study`` also recomputes the near-duplicate threshold evidence over all of HAM10000.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from lesion_imaging.validation import (  # noqa: E402
    NEAR_DUPLICATE_BITS,
    ValidationLimits,
    hamming,
    phash,
    validate_image_bytes,
)

REPO = Path(__file__).resolve().parents[2]

SHARED = REPO.parent / "shared" / "data"
HAM = SHARED / "ham10000"
SAMPLE = REPO / "data" / "sample" / "images"
LIMITS = ValidationLimits()
TARGET_RATIO = 0.8


def load_images(n: int) -> tuple[list[bytes], str]:
    """Up to ``n`` real HAM10000 JPEGs (the shared set where present, else the bundled sample)."""
    folder = HAM / "images" if (HAM / "images").is_dir() else SAMPLE
    paths = sorted(folder.glob("*.jpg"))[:n]
    return [p.read_bytes() for p in paths], str(folder.relative_to(REPO.parent) if SHARED in folder.parents else
                                                folder.relative_to(REPO))


def bare(data: bytes) -> bytes:
    """What any pipeline pays: open, fully decode, re-encode (same quality as validation; the inputs are RGB)."""
    im = Image.open(io.BytesIO(data))
    im.load()
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def validate(data: bytes) -> bytes:
    return validate_image_bytes(data, limits=LIMITS).jpeg


def cpu_seconds(fn: Callable[[bytes], bytes], images: list[bytes]) -> float:
    """CPU time of this process for one pass (wall time would count the other tenants of a shared machine)."""
    start = time.process_time()
    for data in images:
        fn(data)
    return time.process_time() - start


def throughput(images: list[bytes], repeats: int, chunk: int = 100) -> dict[str, float]:
    """Images per CPU-second of each loop, best of ``repeats``; the loops alternate chunk by chunk so that both
    see the same cache and frequency conditions."""
    for data in images[:50]:  # warm caches and lazy imports
        bare(data)
        validate(data)
    bare_rates, val_rates = [], []
    for _ in range(repeats):
        bare_s = val_s = 0.0
        for i in range(0, len(images), chunk):
            part = images[i : i + chunk]
            bare_s += cpu_seconds(bare, part)
            val_s += cpu_seconds(validate, part)
        bare_rates.append(len(images) / bare_s)
        val_rates.append(len(images) / val_s)
    return {"bare_per_s": max(bare_rates), "validate_per_s": max(val_rates),
            "ratio": max(val_rates) / max(bare_rates)}


def big_images() -> dict[str, bytes]:
    """A 600x450 and a 4000x3000 JPEG of real dermoscopy content."""
    negatives = SHARED / "negatives"
    if (negatives / "odd_png_named_jpg.jpg").is_file():
        base = Image.open(negatives / "odd_png_named_jpg.jpg").convert("RGB")  # the original 600x450 ISIC_0024306
    else:
        base = Image.open(sorted(SAMPLE.glob("*.jpg"))[0]).convert("RGB").resize((600, 450), Image.Resampling.LANCZOS)
    out = {}
    for label, size in (("600x450", (600, 450)), ("4000x3000", (4000, 3000))):
        buf = io.BytesIO()
        base.resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=90)
        out[label] = buf.getvalue()
    return out


def latency(data: bytes, fn: Callable[[bytes], bytes], repeats: int) -> float:
    """Best CPU time of one call, in ms."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn(data)
        times.append(time.process_time() - start)
    return 1000 * min(times)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def phash_study() -> dict[str, Any]:
    """Distances that set NEAR_DUPLICATE_BITS: nearest different lesion vs edits of the same image."""
    with (HAM / "HAM10000_metadata.csv").open(newline="") as f:
        lesion = {r["image_id"]: r["lesion_id"] for r in csv.DictReader(f)}
    ids = sorted(lesion)
    images = [Image.open(HAM / "images" / f"{i}.jpg").convert("RGB") for i in ids]
    bits = np.stack([np.frombuffer(bytes.fromhex(phash(im)), dtype=np.uint8) for im in images])
    lesions = np.array([lesion[i] for i in ids])
    nearest_other = np.empty(len(ids), dtype=np.int64)
    same_within = 0
    for k in range(len(ids)):
        d = np.unpackbits(bits[k] ^ bits, axis=1).sum(axis=1)
        same = lesions == lesions[k]
        same_within += int(((d <= NEAR_DUPLICATE_BITS) & same).sum()) - 1
        d[same] = 10_000
        nearest_other[k] = d.min()

    def reencode(im: Image.Image, quality: int) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    edits: dict[str, Callable[[Image.Image], Image.Image]] = {
        "jpeg_q75": lambda im: reencode(im, 75),
        "brightness_+10%": lambda im: im.point(lambda v: min(255, int(v * 1.1))),
        "half_size": lambda im: im.resize((im.width // 2, im.height // 2)),
        "half_size_q50": lambda im: reencode(im.resize((im.width // 2, im.height // 2)), 50),
        "3x_upscale": lambda im: im.resize((im.width * 3, im.height * 3), Image.Resampling.LANCZOS),
        "png_roundtrip": lambda im: Image.open(io.BytesIO(_png(im))).convert("RGB"),
    }
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(ids), 300, replace=False)
    edit_stats = {}
    for name, edit in edits.items():
        d = np.array([hamming(phash(images[k]), phash(edit(images[k]))) for k in chosen])
        edit_stats[name] = {"max": int(d.max()), "p99": float(np.percentile(d, 99)),
                            "caught": float((d <= NEAR_DUPLICATE_BITS).mean())}
    return {
        "images": len(ids),
        "threshold_bits": NEAR_DUPLICATE_BITS,
        "nearest_other_lesion_percentiles_0_0.1_1_5": np.percentile(nearest_other, [0, 0.1, 1, 5]).tolist(),
        "images_with_other_lesion_within_threshold": int((nearest_other <= NEAR_DUPLICATE_BITS).sum()),
        "same_lesion_pairs_within_threshold": same_within // 2,
        "edits_of_the_same_image": edit_stats,
    }


def upscaled(images: list[bytes], size: tuple[int, int] = (600, 450)) -> list[bytes]:
    """The same real images at the HAM10000 originals' size (the shared copies are 1/3 scale)."""
    out = []
    for data in images:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.Resampling.LANCZOS).save(
            buf, format="JPEG", quality=90
        )
        out.append(buf.getvalue())
    return out


def run(n_images: int = 2000, repeats: int = 3, study: bool = False) -> dict[str, Any]:
    """All figures, as a dict (``benchmarks.run_all`` may call this)."""
    images, source = load_images(n_images)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"Python {platform.python_version()}, Pillow {Image.__version__}, NumPy {np.__version__}",
        "source": source,
        "target_ratio": TARGET_RATIO,
        "as_shipped": {"images": len(images), "size": "200x150", **throughput(images, repeats)},
    }
    big = upscaled(images[: max(1, n_images // 5)])
    result["upscaled_600x450"] = {"images": len(big), "size": "600x450", **throughput(big, repeats)}
    result["latency_ms"] = {
        label: {"validate": latency(data, validate, 5), "bare": latency(data, bare, 5)}
        for label, data in big_images().items()
    }
    if study and (HAM / "HAM10000_metadata.csv").is_file():
        result["phash_study"] = phash_study()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phash-study", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.images, args.repeats, args.phash_study)
    print(json.dumps(result, indent=2))
    for key in ("as_shipped", "upscaled_600x450"):
        ratio = result[key]["ratio"]
        verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
        print(f"{key}: ratio {ratio:.2f} {verdict} target {TARGET_RATIO}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
