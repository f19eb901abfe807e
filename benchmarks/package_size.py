"""Size of each function's built package and of each layer, from a real ``sam build``.

Targets: every function under 1 MB (layers aside), the shared layer under 30 MB. Needs the SAM CLI (`.venv-sam`,
installed by ``make test``) and Python 3.12 on PATH (pyenv: ``PYENV_VERSION=3.11.7:3.12.1``).

Run: ``.venv/bin/python -m benchmarks.package_size`` (writes benchmarks/results/package_size.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FUNCTION_LIMIT = 1_000_000
SHARED_LAYER_LIMIT = 30_000_000


def dir_size(path: Path) -> int:
    """Bytes of all files below ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sam_build(build_dir: Path) -> None:
    """Run ``sam build`` into ``build_dir``."""
    sam = shutil.which("sam") or str(REPO / ".venv-sam" / "bin" / "sam")
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0"}
    env.setdefault("PYENV_VERSION", "3.11.7:3.12.1")
    subprocess.run([sam, "build", "--build-dir", str(build_dir), "--cached", "--cache-dir",
                    str(REPO / ".aws-sam" / "cache")], cwd=REPO, env=env, check=True, capture_output=True,
                   text=True, timeout=1200)


def measure(build_dir: Path) -> dict:
    """Sizes per built artifact, with the verdicts."""
    sizes = {p.name: dir_size(p) for p in sorted(build_dir.iterdir()) if p.is_dir()}
    rows = {}
    for name, size in sizes.items():
        limit = SHARED_LAYER_LIMIT if name == "CommonLayer" else (None if name.endswith("Layer") else FUNCTION_LIMIT)
        rows[name] = {"bytes": size, "limit": limit, "ok": limit is None or size < limit}
    return {"date": time.strftime("%Y-%m-%d"), "artifacts": rows}


def main() -> int:
    """Build, measure, print and write the result."""
    with tempfile.TemporaryDirectory() as tmp:
        sam_build(Path(tmp))
        result = measure(Path(tmp))
    for name, row in result["artifacts"].items():
        limit = f"< {row['limit'] / 1e6:.0f} MB" if row["limit"] else "(no target)"
        print(f"{name:30s} {row['bytes'] / 1e6:8.2f} MB  {limit}  {'ok' if row['ok'] else 'OVER'}")
    out = REPO / "benchmarks" / "results" / "package_size.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["ok"] for r in result["artifacts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
