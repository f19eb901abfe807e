"""Reads per upload of the validation path, at archive sizes: ``python -m benchmarks.ingestion --count N``.

Runs the real ValidateImage handler (functions/validate_image/app.py) against moto, with the manifest and hash
index tables created exactly as template.yaml declares them, on ``N`` uploads: shared HAM10000 images (then,
past 10,015, their mirror images, which are other pictures to the hash), with about 10 % realistic near copies
(benchmarks/ingestion/variants.py) of earlier uploads mixed in. Every DynamoDB request the handler makes is
counted through a botocore event hook on its client. The reference is today's exhaustive search (every earlier
VALIDATED hash compared), run beside it on the same clean hashes: ``duplicates_expected``.

``--legacy`` runs the handler as committed before issue 16 (``git show HEAD:...``; its by-status index, its
scan of every VALIDATED hash), for the before figures.

The last line printed is one JSON object: count, reads_per_upload_mean, reads_per_upload_p99,
read_items_per_upload_mean, seconds_per_upload, duplicates_found, duplicates_expected, missed, unreconciled, ...
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import yaml

from benchmarks.ingestion.variants import REPO, VARIANTS, image_paths, make_variant
from lesion_common.reconcile import reconcile
from lesion_common.uploads import INCOMING

BUCKET = "bench-data"
READ_OPS = {"GetItem", "BatchGetItem", "Query", "Scan", "TransactGetItems"}
MAX_BITS = 24


class _Loader(yaml.SafeLoader):
    """Reads template.yaml's short-form intrinsics as plain values."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: (
    loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode)
    else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node)))


def _table_specs(legacy: bool) -> dict[str, dict[str, Any]]:
    if legacy:
        return {"manifest": {
            "AttributeDefinitions": [{"AttributeName": n, "AttributeType": "S"}
                                     for n in ("image_id", "status", "validated_at")],
            "KeySchema": [{"AttributeName": "image_id", "KeyType": "HASH"}],
            "GlobalSecondaryIndexes": [{"IndexName": "by-status", "Projection": {"ProjectionType": "ALL"},
                                        "KeySchema": [{"AttributeName": "status", "KeyType": "HASH"},
                                                      {"AttributeName": "validated_at", "KeyType": "RANGE"}]}],
        }}
    template = yaml.load((REPO / "template.yaml").read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    out = {}
    for name, logical in (("manifest", "ManifestTable"), ("hashes", "HashIndexTable")):
        props = template["Resources"][logical]["Properties"]
        out[name] = {k: props[k] for k in ("AttributeDefinitions", "KeySchema", "GlobalSecondaryIndexes")
                     if k in props}
    return out


def _load_handler(legacy: bool) -> ModuleType:
    path = REPO / "functions" / "validate_image" / "app.py"
    if legacy:
        source = subprocess.run(["git", "show", "HEAD:functions/validate_image/app.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        path = Path(tempfile.mkdtemp()) / "app.py"
        path.write_text(source)
    spec = importlib.util.spec_from_file_location("_bench_validate_image", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Counter:
    """DynamoDB requests and the items they read, per operation, from a client's botocore events."""

    def __init__(self, client: Any) -> None:
        self.requests = 0
        self.items = 0
        client.meta.events.register("before-parameter-build.dynamodb", self._before)
        client.meta.events.register("after-call.dynamodb", self._after)

    def _before(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        if model.name in READ_OPS:
            self.requests += 1
            if model.name == "GetItem":
                self.items += 1
            elif model.name == "BatchGetItem":
                self.items += sum(len(t["Keys"]) for t in params["RequestItems"].values())

    def _after(self, model: Any, parsed: dict[str, Any], **_: Any) -> None:
        if model.name in ("Query", "Scan"):
            self.items += int(parsed.get("ScannedCount", parsed.get("Count", 0)))


def _mirror(data: bytes, kind: int) -> bytes:
    """Another picture to the hash: the image mirrored (kind 1), flipped (2) or both (3)."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    if kind & 1:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if kind & 2:
        im = im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def plan(count: int, near_fraction: float, seed: int) -> list[tuple[str, str, int, str | None]]:
    """``(upload name, source path, mirror kind, variant or None)`` in upload order: each near copy comes at a
    random place after its original."""
    rng = random.Random(seed)
    paths = image_paths()
    n_near = round(count * near_fraction)
    originals = [(p, k) for k in range(4) for p in paths][: count - n_near]
    names = list(VARIANTS)
    order: list[tuple[float, tuple[str, str, int, str | None]]] = [
        (float(i), (f"{p.stem}{'_m' + str(k) if k else ''}", str(p), k, None)) for i, (p, k) in enumerate(originals)]
    for j in range(n_near):
        src = rng.randrange(len(originals))
        at = rng.randrange(src + 1, len(originals) + 1) - 0.5
        p, k = originals[src]
        variant = names[j % len(names)]
        order.append((at, (f"{p.stem}{'_m' + str(k) if k else ''}_{variant}_{j}", str(p), k, variant)))
    return [u for _, u in sorted(order, key=lambda x: x[0])]


def _bits(phash: str) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(phash), dtype=np.uint8))


def run(count: int, near_fraction: float, seed: int, legacy: bool) -> dict[str, Any]:
    from moto import mock_aws

    env = {
        "DATA_BUCKET": BUCKET, "MANIFEST_TABLE": "manifest", "HASH_INDEX_TABLE": "hashes", "STATUS_SHARDS": "16",
        "LABEL_SET": "ham7", "MIN_IMAGE_SIDE": "64", "MAX_IMAGE_SIDE": "8192", "MAX_IMAGE_PIXELS": "40000000",
        "MAX_ASPECT_RATIO": "4.0", "MAX_UPLOAD_BYTES": "52428800", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "POWERTOOLS_SERVICE_NAME": "bench",
        "POWERTOOLS_METRICS_NAMESPACE": "Bench", "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_LOG_LEVEL": "ERROR", "POWERTOOLS_METRICS_DISABLED": "true",
    }
    os.environ.update(env)
    uploads = plan(count, near_fraction, seed)
    with mock_aws():
        app = _load_handler(legacy)
        ddb, s3 = app.dynamodb, app.s3
        for name, spec in _table_specs(legacy).items():
            ddb.create_table(TableName=name, BillingMode="PAY_PER_REQUEST", **spec)
        s3.create_bucket(Bucket=BUCKET)
        counter = Counter(ddb)

        class Ctx:
            function_name, function_version, memory_limit_in_mb = "bench", "$LATEST", 1024
            invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"
            aws_request_id = "bench"

            def get_remaining_time_in_millis(self) -> int:
                return 120_000

        reads: list[int] = []
        items: list[int] = []
        seconds: list[float] = []
        found = expected = missed = extra = 0
        reference = np.zeros((0, 256), dtype=np.uint8)
        reference_sha: set[str] = set()
        keys: list[str] = []
        for name, path, kind, variant in uploads:
            data = Path(path).read_bytes()
            if kind:
                data = _mirror(data, kind)
            if variant:
                data = make_variant(data, variant)
            key = f"{INCOMING}bench/{name}.jpg"
            keys.append(key)
            etag = s3.put_object(Bucket=BUCKET, Key=key, Body=data)["ETag"].strip('"')
            event = {"source": "aws.s3", "detail-type": "Object Created",
                     "detail": {"bucket": {"name": BUCKET}, "object": {"key": key, "size": len(data), "etag": etag}}}
            before_requests, before_items = counter.requests, counter.items
            t0 = time.perf_counter()
            out = app.lambda_handler(event, Ctx())
            seconds.append(time.perf_counter() - t0)
            reads.append(counter.requests - before_requests)
            items.append(counter.items - before_items)
            is_dup = out["outcome"] == "duplicate"
            found += is_dup
            # Today's exhaustive search on the same hashes: any earlier reference-VALIDATED one within MAX_BITS.
            if out["outcome"] in ("validated", "duplicate"):
                bits = _bits(out["phash"])
                ref_dup = out["sha256"] in reference_sha or bool(
                    reference.shape[0] and int((reference != bits).sum(axis=1).min()) <= MAX_BITS)
                expected += ref_dup
                missed += ref_dup and not is_dup
                extra += is_dup and not ref_dup
                if not ref_dup:
                    reference = np.vstack([reference, bits[None, :]])
                    reference_sha.add(out["sha256"])
        # Every upload ends in exactly one of the three statuses: what tools.reconcile and the hourly check see.
        report = reconcile(s3, ddb, BUCKET, "manifest", grace=timedelta(0))
        unreconciled = len(report.unreconciled)
        assert report.images == len(keys), (report.images, len(keys))

    def tail(values: list[float], start: float) -> list[float]:
        return values[int(len(values) * start):] or values

    return {
        "count": len(uploads),
        "implementation": "legacy (scan of by-status)" if legacy else "sha256 claim + pHash bands",
        "reads_per_upload_mean": round(float(np.mean(reads)), 3),
        "reads_per_upload_p99": float(np.percentile(reads, 99)),
        "reads_per_upload_max": int(max(reads)),
        "read_items_per_upload_mean": round(float(np.mean(items)), 2),
        "read_items_per_upload_last_10pct_mean": round(float(np.mean(tail([float(x) for x in items], 0.9))), 2),
        "read_items_per_upload_p99": float(np.percentile(items, 99)),
        "seconds_per_upload": round(float(np.mean(seconds)), 4),
        "seconds_per_upload_last_10pct": round(float(np.mean(tail(seconds, 0.9))), 4),
        "near_variants_uploaded": sum(1 for u in uploads if u[3]),
        "duplicates_found": found,
        "duplicates_expected": expected,
        "missed": missed,
        "extra": extra,
        "unreconciled": unreconciled,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--near-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--legacy", action="store_true", help="the handler before issue 16, for comparison")
    args = parser.parse_args(argv)
    result = run(args.count, args.near_fraction, args.seed, args.legacy)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
