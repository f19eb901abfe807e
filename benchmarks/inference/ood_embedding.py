"""Which embedding distance tells non-dermoscopic pictures from lesions, for a given model (exploratory).

The server flags a picture when its embedding's diagonal Mahalanobis distance from ``reference_stats.json`` is far
(:mod:`inference_image.ood`). This compares that distance with the same distance taken on embeddings scaled to unit
length, whose reference (mean and spread per dimension) is built here from half of the HAM10000 pictures drawn; the
other half and the non-dermoscopic rows of ``../shared/data/negatives`` are scored. Each distance is judged by its
AUROC (negatives against lesions) and by how many negatives lie past the lesions' 99th percentile (what a threshold
giving 1 % false flags would catch)::

    python -m benchmarks.inference.ood_embedding --model-dir h42=/tmp/h42/job/model --ham 300 --out F

The pictures go through the serving path's decoding and model input, and ``model.ts``'s embedding.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.inference.bench_ood import OOD_ROW, SHARED, held_out_ham
from inference_image.imaging import ImageRequestError, decode_image
from inference_image.transform import ModelInputBuilder
from lesionml.preprocessing import read_spec

FLOOR = 0.25  # of the RMS reference spread, as inference_image.ood floors it


def embeddings(model_dir: Path, files: list[Path]) -> np.ndarray:
    """``model.ts``'s embedding of each readable file, through the serving path's model input."""
    spec = read_spec(model_dir / "preprocessing.json")
    builder = ModelInputBuilder(spec)
    ts = torch.jit.load(str(model_dir / "model.ts"), map_location="cpu").eval()
    out = []
    for f in files:
        try:
            decoded = decode_image(f.read_bytes(), 100_000_000, (spec.width, spec.height))
        except ImageRequestError:
            continue  # refused before the model (the server answers 4xx)
        with torch.no_grad():
            out.append(ts.predict(torch.from_numpy(builder.model_input(decoded)[0][None]))[1][0].numpy())
    return np.array(out, dtype=np.float64)


def diagonal_distance(e: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Diagonal Mahalanobis distance with each variance floored at ``(FLOOR * RMS std)^2``."""
    var = np.maximum(std**2, (FLOOR * np.sqrt(np.mean(std**2))) ** 2)
    return np.asarray(np.sqrt((((e - mean) ** 2) / var).sum(1)))


def unit(e: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length."""
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def separation(neg: np.ndarray, ham: np.ndarray) -> dict[str, Any]:
    """AUROC of ``neg`` against ``ham`` scores and the negatives past the lesions' 99th percentile."""
    cut = float(np.percentile(ham, 99))
    auroc = (neg[:, None] > ham[None, :]).mean() + 0.5 * (neg[:, None] == ham[None, :]).mean()
    return {"auroc": round(float(auroc), 4), "caught_past_ham_p99": int((neg > cut).sum()), "negatives": int(neg.size)}


def evaluate(model_dir: Path, ham: int) -> dict[str, Any]:
    """Both distances for one model directory."""
    rows = list(csv.DictReader((SHARED / "negatives" / "negatives.csv").read_text().splitlines()))
    neg_files = [SHARED / "negatives" / r["file"] for r in rows if r["expected_behaviour"] == OOD_ROW]
    picked = held_out_ham(ham)
    neg, lesions = embeddings(model_dir, neg_files), embeddings(model_dir, picked)
    ref, held = lesions[: ham // 2], lesions[ham // 2 :]
    served = json.loads((model_dir / "reference_stats.json").read_text())["embedding"]
    mean, std = np.array(served["mean"]), np.array(served["std"])
    u_mean, u_std = unit(ref).mean(0), unit(ref).std(0)
    return {
        "served_distance": separation(diagonal_distance(neg, mean, std), diagonal_distance(held, mean, std)),
        "unit_length_distance": separation(diagonal_distance(unit(neg), u_mean, u_std),
                                           diagonal_distance(unit(held), u_mean, u_std)),
        "ham_embedding_norm_p01_p50_p99": [round(float(v), 2) for v in np.percentile(np.linalg.norm(lesions, axis=1),
                                                                                   [1, 50, 99])],
        "negative_embedding_norm_p50": round(float(np.median(np.linalg.norm(neg, axis=1))), 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Evaluate each ``--model-dir`` and print (and write) the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", action="append", required=True, help="NAME=DIR (repeatable)")
    ap.add_argument("--ham", type=int, default=300, help="HAM10000 pictures: half build the reference, half are scored")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not (SHARED / "negatives" / "negatives.csv").is_file():
        print("error: ../shared/data is not present", file=sys.stderr)
        return 1
    result = {name: evaluate(Path(d), args.ham) for name, _, d in (s.partition("=") for s in args.model_dir)}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
