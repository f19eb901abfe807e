"""Cold start of every handler: import and module-level initialisation in a fresh process.

Baseline, in the same run: a fresh process that imports boto3 and creates one client. Each figure is the median
of ``--repeats`` fresh processes. Target: handler / baseline <= 1.3.

Run: ``.venv/bin/python -m benchmarks.cold_start`` (writes benchmarks/results/cold_start.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from localmode.template import function_environment, load_template

REPO = Path(__file__).resolve().parent.parent
TARGET = 1.3

_TIMER = """
import time, sys
t0 = time.perf_counter()
{body}
sys.stdout.write(repr(time.perf_counter() - t0))
"""
BASELINE = "import boto3\nboto3.client('s3')"


def _env_for(logical_id: str | None) -> dict[str, str]:
    """The process environment plus, for a handler, the variables the template gives it."""
    env = dict(os.environ)
    if logical_id is not None:
        env.update(function_environment(load_template(REPO / "template.yaml"), logical_id))
    env.update(AWS_DEFAULT_REGION="eu-west-1", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def _once(body: str, env: dict[str, str], cwd: Path, path: list[str]) -> float:
    env = {**env, "PYTHONPATH": os.pathsep.join(path)}
    out = subprocess.run([sys.executable, "-c", _TIMER.format(body=body)], env=env, cwd=cwd, capture_output=True,
                         text=True, check=True)
    return float(out.stdout)


def measure(repeats: int) -> dict:
    """Median seconds per handler and for the baseline, interleaved so drift hits both alike."""
    template = load_template(REPO / "template.yaml")
    layers = [str(p) for p in sorted((REPO / "layers").iterdir()) if p.is_dir()]
    functions = {k: v["Properties"] for k, v in template["Resources"].items()
                 if v["Type"] == "AWS::Serverless::Function"}
    base_env = _env_for(None)
    samples: dict[str, list[float]] = {"baseline": [], **{k: [] for k in functions}}
    for _ in range(repeats):
        samples["baseline"].append(_once(BASELINE, base_env, REPO, []))
        for logical_id, props in functions.items():
            code = REPO / props["CodeUri"]
            samples[logical_id].append(_once("import app", _env_for(logical_id), code, [str(code), *layers]))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    base = medians["baseline"]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "repeats": repeats,
        "baseline_seconds": round(base, 4),
        "handlers": {k: {"seconds": round(v, 4), "ratio": round(v / base, 3), "ok": v / base <= TARGET}
                     for k, v in medians.items() if k != "baseline"},
    }


def main() -> int:
    """Measure, print a table and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    result = measure(args.repeats)
    print(f"baseline (import boto3 + one client): {result['baseline_seconds'] * 1000:.0f} ms")
    for name, row in result["handlers"].items():
        print(f"{name:32s} {row['seconds'] * 1000:7.0f} ms  ratio {row['ratio']:.2f}  {'ok' if row['ok'] else 'OVER'}")
    out = REPO / "benchmarks" / "results" / "cold_start.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["ok"] for r in result["handlers"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
