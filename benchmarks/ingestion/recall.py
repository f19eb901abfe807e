"""Recall of the banded near-duplicate index against today's exhaustive search.

Usage::

    python -m benchmarks.ingestion.recall [--variants-of N] [--cache PATH]

Hashes every shared HAM10000 image (the archive) and ``N`` of them in each realistic variant (the queries) with
the validation code itself, then for every query compares the exhaustive answer (nearest archive hash within
``max_bits``, as the old ``find_duplicate`` did) with the banded one (only archive hashes sharing a band with the
query), for several band counts. Prints a JSON report; the figures are written down in RESULTS.md.
The hashes are cached (``--cache``) because hashing ~18k images takes minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.ingestion.variants import VARIANTS, clean_hashes, image_paths, make_variant

MAX_BITS = 24


def compute_hashes(n_variants_of: int, cache: Path) -> dict[str, Any]:
    """``{"archive": {id: phash}, "queries": [[id, variant, phash], ...]}``, from the cache when present."""
    if cache.is_file():
        cached: dict[str, Any] = json.loads(cache.read_text())
        if cached.get("variants_of") == n_variants_of:
            return cached
    paths = image_paths()
    archive: dict[str, str] = {}
    queries: list[list[str]] = []
    step = max(1, len(paths) // max(1, n_variants_of))
    chosen = {p.stem for p in paths[::step][:n_variants_of]}
    t0 = time.time()
    for i, path in enumerate(paths):
        data = path.read_bytes()
        archive[path.stem] = clean_hashes(data)[1]
        if path.stem in chosen:
            for name in VARIANTS:
                queries.append([path.stem, name, clean_hashes(make_variant(data, name))[1]])
        if i % 1000 == 0:
            print(f"{i}/{len(paths)} hashed, {time.time() - t0:.0f} s", file=sys.stderr)
    out = {"variants_of": n_variants_of, "archive": archive, "queries": queries}
    cache.write_text(json.dumps(out))
    return out


def _bits(phash: str) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(phash), dtype=np.uint8))


def _band_keys(bits: np.ndarray, bands: int) -> list[tuple[int, int]]:
    """``(band, slice value)`` of contiguous slices of (nearly) equal width, most significant first, as
    lesion_imaging.bands cuts them (for the band counts that divide 64 hex digits)."""
    edges = np.linspace(0, bits.size, bands + 1).round().astype(int)
    return [(i, int("".join("1" if x else "0" for x in bits[a:b]), 2))
            for i, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True))]


def _probe_keys(bits: np.ndarray, bands: int, probe: bool) -> list[tuple[int, int]]:
    """The buckets looked up: each band's own slice, and with ``probe`` every slice one bit away."""
    keys = _band_keys(bits, bands)
    if not probe:
        return keys
    width = bits.size // bands
    return keys + [(i, v ^ (1 << j)) for i, v in keys for j in range(width)]


def study(data: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """Exhaustive vs banded answers per query, and bucket occupancy of the archive, per band count."""
    ids = sorted(data["archive"])
    matrix = np.stack([_bits(data["archive"][i]) for i in ids])  # n x 256
    report: dict[str, Any] = {"archive_images": len(ids), "queries": len(data["queries"]), "max_bits": MAX_BITS}
    exhaustive: list[tuple[int, int] | None] = []  # (distance, archive index) of the nearest within MAX_BITS
    own_distance: list[int] = []
    index_of = {image_id: k for k, image_id in enumerate(ids)}
    for origin, _name, phash in data["queries"]:
        dist = (matrix != _bits(phash)).sum(axis=1)
        own_distance.append(int(dist[index_of[origin]]))
        k = int(np.lexsort((np.arange(len(ids)), dist))[0])
        exhaustive.append((int(dist[k]), k) if dist[k] <= MAX_BITS else None)
    by_variant: dict[str, list[int]] = defaultdict(list)
    for (_o, name, _p), d in zip(data["queries"], own_distance, strict=True):
        by_variant[name].append(d)
    report["distance_to_original"] = {
        name: {"max": max(v), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)),
               "within_max_bits": sum(x <= MAX_BITS for x in v) / len(v)}
        for name, v in by_variant.items()
    }
    results = {}
    for config in configs:
        probe = config.endswith("p")
        bands = int(config.rstrip("p"))
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for k in range(len(ids)):
            for key in _band_keys(matrix[k], bands):
                buckets[key].append(k)
        sizes = [len(v) for v in buckets.values()]
        radius = (2 if probe else 1) * bands - 1
        agree_in: list[bool] = []
        by_distance: dict[int, list[bool]] = defaultdict(list)
        per_variant: dict[str, list[bool]] = defaultdict(list)
        for (_origin, name, phash), exh in zip(data["queries"], exhaustive, strict=True):
            if exh is None:
                continue
            qbits = _bits(phash)
            candidates = {k for key in _probe_keys(qbits, bands, probe) for k in buckets.get(key, [])}
            found = None
            for k in sorted(candidates):
                d = int((matrix[k] != qbits).sum())
                if d <= MAX_BITS and (found is None or (d, k) < found):
                    found = (d, k)
            same = found == exh
            by_distance[exh[0]].append(same)
            per_variant[name].append(same)
            if exh[0] <= radius:
                agree_in.append(same)
        band_bits = 256 // bands
        results[config] = {
            "band_bits": band_bits,
            "lookups_per_upload": len(_probe_keys(matrix[0], bands, probe)),
            "guaranteed_radius": radius,
            "recall_within_radius": (sum(agree_in) / len(agree_in)) if agree_in else None,
            "queries_within_radius": len(agree_in),
            "recall_radius_to_max_bits": _ratio([s for d, v in by_distance.items() if d > radius for s in v]),
            "recall_by_distance": {str(d): [sum(v), len(v)] for d, v in sorted(by_distance.items())},
            "recall_by_variant": {n: _ratio(v) for n, v in per_variant.items()},
            "overall_recall": _ratio([s for v in by_distance.values() for s in v]),
            "bucket_size_max": max(sizes),
            "candidates_per_lookup_mean": float(np.mean(
                [sum(len(buckets.get(key, [])) for key in _probe_keys(matrix[k], bands, probe)) - bands
                 for k in range(0, len(ids), 10)])),
            "bucket_size_histogram": dict(sorted(Counter(min(s, 10) for s in sizes).items())),
        }
    report["bands"] = results
    return report


def _ratio(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants-of", type=int, default=1000, help="archive images to make variants of")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ingestion_phash_cache.json"))
    parser.add_argument("--bands", default="8,16,8p",
                        help="band counts to compare; a trailing p also looks up the slices one bit away")
    args = parser.parse_args(argv)
    data = compute_hashes(args.variants_of, args.cache)
    print(json.dumps(study(data, args.bands.split(",")), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
