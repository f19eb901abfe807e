"""Time and memory of one drift evaluation against the number of captured records.

Usage::

    python -m benchmarks.monitoring.bench_drift [--sizes 1000 10000 100000] [--repeats 3] [--records-per-file 1000]

What is timed is the detect_drift Lambda's work after S3 has answered: listing, reading the Data Capture files
(realistic lines: a ~5.5 KB base64 JPEG input, the JSON answer with its monitoring block), parsing them on the
Lambda's 8 threads, the compact columns, and every drift test. S3 is replaced by an in-memory client serving a
pool of pre-built files, so the figures are the CPU cost, not the network's. Each size runs in a fresh process;
memory is the peak resident set of that run (Linux ``VmHWM``, reset before the run), i.e. what the Lambda's
memory setting must hold, interpreter and NumPy included.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

HOUR = datetime(2026, 11, 29, 9, tzinfo=UTC)
POOL_FILES = 8


class _Paginator:
    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def paginate(self, Bucket: str, Prefix: str) -> list[dict[str, Any]]:  # noqa: N803 - boto3's names
        found = [{"Key": k} for k in self.keys if k.startswith(Prefix)]
        return [{"Contents": found[i:i + 1000]} for i in range(0, len(found), 1000)] or [{}]


class MemoryS3:
    """Serves ``n_files`` capture files in one hour, cycling through a pool of pre-built contents."""

    def __init__(self, pool: list[bytes], n_files: int) -> None:
        self.pool = pool
        self.keys = [f"capture/ep/AllTraffic/{HOUR:%Y/%m/%d/%H}/part-{i:05d}.jsonl" for i in range(n_files)]

    def get_paginator(self, name: str) -> _Paginator:
        return _Paginator(self.keys)

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803 - boto3's names
        index = int(Key.rsplit("-", 1)[1].split(".")[0])
        return {"Body": io.BytesIO(self.pool[index % len(self.pool)])}


def _status_mb(field: str) -> float:
    """``VmHWM`` (peak resident set) or ``VmRSS`` of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def run_one(n_records: int, per_file: int, repeats: int) -> dict[str, Any]:
    """Build the file pool, then time the evaluation ``repeats`` times (in this process)."""
    from lesion_monitoring.drift import DriftBatch, compute_drift
    from lesion_monitoring.records import ReadStats, iter_s3_predictions
    from tests.monitoring import synthetic as sy
    from tests.monitoring.realdata import capture_records

    world = sy.World()
    reference = world.reference(500)
    time_str = (HOUR + timedelta(minutes=30)).isoformat()
    per_file = min(per_file, n_records)
    pool = []
    for seed in range(POOL_FILES):
        records = capture_records(world.sample(per_file, seed), reference, timestamp=time_str)
        pool.append("".join(sy.data_capture_line([r], r["inference_id"], time_str) + "\n"
                            for r in records).encode())
    s3 = MemoryS3(pool, n_records // per_file)
    line_bytes = sum(len(p) for p in pool) / (POOL_FILES * per_file)
    times, peaks, result = [], [], {}
    before = _status_mb("VmRSS")  # interpreter, NumPy, the pool of files (not in the Lambda)
    for _ in range(repeats):
        _reset_peak()
        t0 = time.perf_counter()
        stats = ReadStats()
        batch = DriftBatch().extend(iter_s3_predictions(s3, ["s3://artifacts/capture/ep/AllTraffic/"], HOUR,
                                                        HOUR + timedelta(hours=1), stats))
        t1 = time.perf_counter()
        result = compute_drift(batch, reference)
        t2 = time.perf_counter()
        times.append((t1 - t0, t2 - t1))
        peaks.append(_status_mb("VmHWM"))
        assert batch.n == n_records and stats.bad_lines == 0, stats
    best = min(times, key=sum)
    return {"records": n_records, "files": len(s3.keys), "bytes_per_line": round(line_bytes),
            "read_parse_s": round(best[0], 3), "tests_s": round(best[1], 3), "total_s": round(sum(best), 3),
            "peak_rss_mb": round(max(peaks), 1), "rss_before_mb": round(before, 1),
            "pool_mb": round(sum(len(p) for p in pool) / 2**20, 1), "drift_score": result["drift_score"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--records-per-file", type=int, default=1000)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.records_per_file, args.repeats)))
        return
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load {os.getloadavg()[0]:.1f}")
    print("| records | files | bytes/line | read+parse s | tests s | total s | s per 10k | peak RSS MB | "
          "RSS before MB (of it, file pool) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in args.sizes:
        out = subprocess.run([sys.executable, "-m", "benchmarks.monitoring.bench_drift", "--one", str(n), "--repeats",
                              str(args.repeats), "--records-per-file", str(args.records_per_file)],
                             cwd=REPO, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['records']:,} | {r['files']} | {r['bytes_per_line']:,} | {r['read_parse_s']:.2f} | "
              f"{r['tests_s']:.2f} | {r['total_s']:.2f} | {r['total_s'] / n * 10_000:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['rss_before_mb']:.0f} ({r['pool_mb']:.0f}) |",
              flush=True)


if __name__ == "__main__":
    main()
