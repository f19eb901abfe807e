"""Startup time and memory of ``python -m localmode up`` (without the sample) against a bare moto server.

Both run as fresh processes, interleaved, on free ports; "ready" is the first 200 from the health URL (``up``:
``GET /_localmode/health``, which answers once the whole stack is deployed; moto: ``GET /moto-api/``). Memory is
the process's resident set at ready and its peak (``VmHWM``); ``up`` starts no child process before a job or an
endpoint does. The baseline is what any emulator costs before a stack exists, so the ratio is what deploying
template.yaml (handlers imported lazily, IAM policies compiled, rules and state machines created) adds.

Run: ``.venv/bin/python -m benchmarks.localmode.startup --repeats 3`` (writes benchmarks/localmode/RESULTS.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "RESULTS.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _measure(command: list[str], url: str, timeout: float = 300.0) -> dict[str, float]:
    t0 = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[2:4]} exited with {process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{url} not ready after {timeout:.0f} s")
            time.sleep(0.05)
        ready = time.monotonic() - t0
        rss, peak = _memory_mib(process.pid)
        return {"ready_s": round(ready, 2), "rss_mib": round(rss, 1), "peak_mib": round(peak, 1)}
    finally:
        process.terminate()
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes of each (default 3)")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"moto_server": [], "localmode_up": []}
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.repeats):
            port = _free_port()
            runs["moto_server"].append(_measure(
                [sys.executable, "-m", "moto.server", "-p", str(port)], f"http://127.0.0.1:{port}/moto-api/"))
            port = _free_port()
            runs["localmode_up"].append(_measure(
                [sys.executable, "-m", "localmode", "up", "--no-sample", "--port", str(port), "--work-dir",
                 f"{work}/up{i}"], f"http://127.0.0.1:{port}/_localmode/health"))
            print(f"run {i + 1}: moto {runs['moto_server'][-1]}  up {runs['localmode_up'][-1]}", flush=True)

    def median(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[name]), 2)

    summary = {key: {"moto_server": median("moto_server", key), "localmode_up": median("localmode_up", key),
                     "ratio": round(median("localmode_up", key) / median("moto_server", key), 2)}
               for key in ("ready_s", "rss_mib", "peak_mib")}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.python_version()}",
              "repeats": args.repeats, "median": summary, "runs": runs}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
