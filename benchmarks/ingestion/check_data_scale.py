"""CheckData at archive scale: time, peak memory and reads on a synthetic manifest of N VALIDATED items.

The handler's own functions run against a fake table that pages like DynamoDB (1 MB of ~0.7 KB items a page,
counted) and a fake S3 client that keeps only part sizes. Two paths:

- ``full``: the manifest read (the projected attributes), :func:`assess` (one row per picture, linked splits),
  :func:`write_dataset` streaming the split CSVs and the ManifestFile in 8 MB parts. It runs when the class
  counts say "enough" (or are over a week old).
- ``counts``: :func:`quick_check` from the class counts and a COUNT query of the items newer than the last model:
  what an execution costs when there is not enough new data (the usual monthly/drift case).

Each size runs in a fresh process (peak RSS is the process's ``ru_maxrss`` less the same process's RSS before the
run). Lambda cost is extrapolated at the memory size the peak needs, arm64, $0.0000133334 per GB-s, and DynamoDB at
$0.125 per million read request units (eventually consistent index reads: 0.5 per 4 KB of items read).

Run: ``.venv/bin/python -m benchmarks.ingestion.check_data_scale --sizes 100000,1000000``
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "check_data_scale.json"
ITEM_BYTES = 700  # a VALIDATED manifest item as validate_image writes it (all attributes)
PAGE_BYTES = 1024 * 1024  # a Query page: 1 MB of items read
SHARDS = 16
# HAM10000's class shares
SHARES = {"nv": 0.669, "mel": 0.111, "bkl": 0.110, "bcc": 0.051, "akiec": 0.033, "vasc": 0.014, "df": 0.012}


def _load_check_data() -> ModuleType:
    os.environ.update({
        "MANIFEST_TABLE": "manifest", "HASH_INDEX_TABLE": "hashes", "DATA_BUCKET": "data",
        "ARTIFACTS_BUCKET": "artifacts", "MODEL_PACKAGE_GROUP": "grp", "LABEL_SET": "ham7",
        "MIN_NEW_IMAGES": "100", "MIN_IMAGES_PER_CLASS": "10", "STATUS_SHARDS": str(SHARDS),
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
        "POWERTOOLS_METRICS_DISABLED": "true", "POWERTOOLS_LOG_LEVEL": "ERROR",
    })
    spec = importlib.util.spec_from_file_location("_bench_check_data", REPO / "functions" / "check_data" / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _items(n: int, shard: int) -> Iterator[dict[str, Any]]:
    """The projected attributes of the VALIDATED items of one shard (deterministic)."""
    from lesion_common.splits import assign_split

    labels = list(SHARES)
    bounds = []
    total = 0.0
    for label in labels:
        total += SHARES[label]
        bounds.append(total)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(shard, n, SHARDS):
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        u = int(digest[:8], 16) / 0xFFFFFFFF
        label = labels[next((k for k, b in enumerate(bounds) if u <= b), len(labels) - 1)]
        lesion = f"HAM_{i // 2:07d}" if i % 5 else f"HAM_{i:07d}x"  # most lesions photographed twice
        yield {"image_id": f"ISIC_{i:08d}", "label": label, "lesion_id": lesion, "split": assign_split(lesion),
               "sha256": digest, "key": f"validated/{digest}.jpg",
               "validated_at": (start + timedelta(seconds=30 * i)).isoformat(timespec="milliseconds")}


class FakeTable:
    """Pages the items of each ``VALIDATED#<n>`` shard as DynamoDB would (1 MB read a page); counts the reads."""

    name = "manifest"

    def __init__(self, n: int):
        self.n = n
        self.pages = self.items_read = 0
        self._cursors: dict[int, Iterator[dict[str, Any]]] = {}

    def query(self, **kwargs: Any) -> dict[str, Any]:
        condition = kwargs["KeyConditionExpression"].get_expression()
        if condition["operator"] == "AND":  # shard = ... AND validated_at > since
            condition = condition["values"][0].get_expression()
        status, shard = str(condition["values"][1]).split("#")
        self.pages += 1
        if status != "VALIDATED":
            return {"Items": [], "Count": 0}
        if kwargs.get("Select") == "COUNT":  # the new-items count: a tenth of the archive is new
            new = len(range(int(shard), self.n, SHARDS)) // 10
            self.items_read += new
            return {"Count": new}
        if "ExclusiveStartKey" not in kwargs:
            self._cursors[int(shard)] = _items(self.n, int(shard))
        page = []
        for item in self._cursors[int(shard)]:
            page.append(item)
            if len(page) * ITEM_BYTES >= PAGE_BYTES:
                break
        self.items_read += len(page)
        more = len(page) * ITEM_BYTES >= PAGE_BYTES
        return {"Items": page, **({"LastEvaluatedKey": {"image_id": page[-1]["image_id"]}} if more else {})}


class FakeS3:
    """Keeps the size of every part and object written."""

    def __init__(self) -> None:
        self.bytes = 0
        self.parts = 0

    def put_object(self, Body: bytes, **_: Any) -> dict[str, Any]:  # noqa: N803 - boto3's parameter names
        self.bytes += len(Body)
        return {}

    def create_multipart_upload(self, **_: Any) -> dict[str, Any]:
        return {"UploadId": "u"}

    def upload_part(self, Body: bytes, PartNumber: int, **_: Any) -> dict[str, Any]:  # noqa: N803
        self.bytes += len(Body)
        self.parts += 1
        return {"ETag": f'"{PartNumber}"'}

    def complete_multipart_upload(self, **_: Any) -> dict[str, Any]:
        return {}

    def abort_multipart_upload(self, **_: Any) -> dict[str, Any]:
        return {}


class FakeCounts:
    """The class counts as read_counts finds them: recent, and short of one class (so: not enough)."""

    def __init__(self, n: int):
        self.n = n
        self.requests = 0

    def batch_get_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:  # noqa: N803
        from lesion_common.class_counts import RECONCILED_ID

        self.requests += 1
        (table, request), = RequestItems.items()
        items = []
        for key in request["Keys"]:
            pk = key["pk"]["S"]
            if pk == RECONCILED_ID:
                items.append({"pk": key["pk"], "at": {"S": datetime.now(UTC).isoformat()}})
            elif pk.endswith("#0") and "#df#" not in pk:
                items.append({"pk": key["pk"], "n": {"N": str(self.n // 50)}})
        return {"Responses": {table: items}}


def measure(path: str, n: int) -> dict[str, Any]:
    """One path at one size, in this process."""
    app = _load_check_data()
    classes = app.classes_for("ham7")
    since = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=30 * int(0.9 * n))  # the last tenth is new
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    table = FakeTable(n)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"path": path, "items": n}
    if path == "full":
        s3 = FakeS3()
        result = app.assess(app.validated_images(table), classes, since, False, [])
        rows = result.pop("rows")
        app.write_dataset(s3, rows, classes, "datasets/bench/")
        out.update(enough=result["enough"], rows=len(rows), dropped=result["droppedCopies"], s3_bytes=s3.bytes,
                   s3_parts=s3.parts)
    else:
        counts = FakeCounts(n)
        app.STATUS_SHARDS = SHARDS
        result = app.quick_check(counts, table, classes, since, False, datetime.now(UTC))
        assert result is not None and result["enough"] is False
        out.update(counter_requests=counts.requests)
    seconds = time.perf_counter() - t0
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    memory_gb = max(0.128, math.ceil((peak_mib + 150) / 64) * 64 / 1024)  # + the runtime and imports
    rru = table.items_read * ITEM_BYTES / 4096 * 0.5
    out.update(seconds=round(seconds, 2), peak_mib_over_imports=round(peak_mib, 1), query_pages=table.pages,
               items_read=table.items_read, lambda_memory_gb=memory_gb,
               lambda_usd=round(seconds * memory_gb * 0.0000133334, 5), dynamodb_rru=round(rru),
               dynamodb_usd=round(rru / 1e6 * 0.125, 4))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated manifest sizes")
    parser.add_argument("--one", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return 0
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        for path in ("counts", "full"):
            answer = subprocess.run([sys.executable, "-m", "benchmarks.ingestion.check_data_scale", "--one", path,
                                     str(n)], cwd=REPO, capture_output=True, text=True, check=True)
            results.append(json.loads(answer.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    OUT.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
