"""``/ping`` under the heaviest admitted load, and slow senders (issue 19, item 4).

Starts the real entry point (``python -m inference_image.serve serve``, default workers: one per CPU) on a loopback
port and, for ``--duration`` seconds:

* ``--clients`` threads (16) each post, back to back on a keep-alive connection, the largest image the server
  admits: a 16-bit grey PNG of 6300 x 6300 = 39.7 M pixels (the pixel limit is 40 M; 1.5 MB, under the 6 MiB body
  limit), decoded in full and scaled to 8 bits by the server;
* one thread posts a normal 600 x 450 HAM10000 JPEG, one at a time (what an ordinary caller sees meanwhile);
* one thread asks ``GET /ping`` every 50 ms on a fresh connection, as a health checker does, with a 10 s timeout
  (``--ping-timeout``; a timeout counts as that long).

It prints and writes (``--out``) p50/p95/p99/max of each. ``--slow`` instead opens ``--slow-connections``
connections that send their request one byte a second, and counts how many the server still holds open after
``--slow-seconds``.

``--light`` instead compares one client's latency, one normal JPEG at a time, against ``--baseline-root`` (blocks
alternating between the two servers): what the hand-off to the model thread costs an unloaded server.

``--server-root`` runs another copy of the server code (a directory holding ``inference_image/`` and
``lesionml/``), e.g. the code before a change, against the same model directory and load. Only loopback traffic;
every loop is bounded by its duration.

Run: ``.venv/bin/python -m benchmarks.robustness.ping_under_load [--server-root DIR] [--label before]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.inference.helpers import largest_admitted_png

REPO = Path(__file__).resolve().parents[2]

SAMPLE_JPEG = REPO / "data" / "sample" / "images" / "ISIC_0024323.jpg"
RESULTS = Path(__file__).resolve().parent / "results"
PING_TIMEOUT = 10.0  # --ping-timeout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pcts(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    a = np.asarray(samples) * 1000
    return {"p50": round(float(np.percentile(a, 50)), 1), "p95": round(float(np.percentile(a, 95)), 1),
            "p99": round(float(np.percentile(a, 99)), 1), "max": round(float(a.max()), 1), "n": len(samples)}


def default_model_dir() -> Path:
    """A model directory built by tests/inference/model_factory.py (kept between runs)."""
    dest = Path(os.environ.get("TMPDIR", "/tmp")) / "lesion-robustness" / "model"
    if not (dest / "manifest.json").is_file():
        from tests.inference.model_factory import build_model_dir

        build_model_dir(dest)
    return dest


class ServerProcess:
    """``serve`` from ``root`` on a free loopback port."""

    def __init__(self, root: Path, model_dir: Path, cache_dir: Path, log_path: Path, extra: dict[str, str]) -> None:
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SAGEMAKER_", "CAPTURE_", "MODEL_"))}
        env.update({"SM_MODEL_DIR": str(model_dir), "SAGEMAKER_BIND_TO_PORT": str(self.port),
                    "SERVING_BIND_HOST": "127.0.0.1", "SERVING_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(root),
                    "PYTHONDONTWRITEBYTECODE": "1", **extra})
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "inference_image.serve", "serve"], cwd=root, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                timeout: float = 60.0) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if self.request("GET", "/ping", timeout=2.0) == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("server never became healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_load(server: ServerProcess, clients: int, duration: float, ping_timeout: float = PING_TIMEOUT
             ) -> dict[str, Any]:
    """Heavy clients + one normal client + the /ping prober for ``duration`` seconds."""
    heavy = largest_admitted_png()
    normal = SAMPLE_JPEG.read_bytes()
    stop = threading.Event()
    heavy_lat: list[float] = []
    heavy_status: dict[int, int] = {}
    normal_lat: list[float] = []
    ping_lat: list[float] = []
    ping_fail = [0]
    lock = threading.Lock()

    def post_loop(body: bytes, ctype: str, out: list[float], statuses: dict[int, int] | None) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/invocations", body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
                status = 0
            with lock:
                out.append(time.perf_counter() - t0)
                if statuses is not None:
                    statuses[status] = statuses.get(status, 0) + 1
        conn.close()

    def ping_loop() -> None:
        time.sleep(2.0)  # let the heavy clients fill the server first
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = server.request("GET", "/ping", timeout=ping_timeout) == 200
            except OSError:
                ok = False
            elapsed = time.perf_counter() - t0
            ping_lat.append(elapsed if ok else max(elapsed, ping_timeout))
            if not ok:
                ping_fail[0] += 1
            time.sleep(max(0.0, 0.05 - elapsed))

    threads = [threading.Thread(target=post_loop, args=(heavy, "image/png", heavy_lat, heavy_status))
               for _ in range(clients)]
    threads.append(threading.Thread(target=post_loop, args=(normal, "image/jpeg", normal_lat, None)))
    threads.append(threading.Thread(target=ping_loop))
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(150)
    return {"ping_ms": _pcts(ping_lat), "ping_failures": ping_fail[0], "heavy_ms": _pcts(heavy_lat),
            "heavy_status": heavy_status, "heavy_per_s": round(len(heavy_lat) / duration, 2),
            "normal_jpeg_ms": _pcts(normal_lat), "heavy_png_bytes": len(heavy)}


def run_slow(server: ServerProcess, connections: int, seconds: float) -> dict[str, Any]:
    """Open ``connections`` that trickle one byte a second; how many are still open after ``seconds``."""
    request = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
               + b"\xff" * 1000)
    socks = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.setblocking(False)
        socks.append(s)
    closed_at: dict[int, float] = {}
    t0 = time.monotonic()
    pos = 0
    while time.monotonic() - t0 < seconds and len(closed_at) < connections:
        for i, s in enumerate(socks):
            if i in closed_at:
                continue
            try:
                s.send(request[pos:pos + 1])
                if s.recv(4096) == b"":
                    closed_at[i] = time.monotonic() - t0
            except BlockingIOError:
                pass
            except OSError:
                closed_at[i] = time.monotonic() - t0
        pos = (pos + 1) % len(request)
        time.sleep(1.0)
    for s in socks:
        s.close()
    times = sorted(closed_at.values())
    return {"connections": connections, "seconds": seconds, "still_open": connections - len(closed_at),
            "closed_after_s": {"min": round(times[0], 1), "max": round(times[-1], 1)} if times else None}


def run_light(servers: dict[str, ServerProcess], rounds: int = 10, per_block: int = 25) -> dict[str, Any]:
    """One client, one normal JPEG at a time, in alternating blocks on each server (same machine load for each):
    the cost of handing each request to the model thread."""
    body = SAMPLE_JPEG.read_bytes()
    lat: dict[str, list[float]] = {name: [] for name in servers}
    conns = {name: http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60) for name, srv in servers.items()}
    for _ in range(rounds):
        for name, conn in conns.items():
            for _ in range(per_block):
                t0 = time.perf_counter()
                conn.request("POST", "/invocations", body=body, headers={"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200
                lat[name].append(time.perf_counter() - t0)
    for conn in conns.values():
        conn.close()
    return {f"{name}_c1_ms": _pcts(v) for name, v in lat.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server-root", type=Path, default=REPO)
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--label", default="current")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--slow", action="store_true", help="the slow-sender test instead of the load test")
    ap.add_argument("--slow-connections", type=int, default=50)
    ap.add_argument("--slow-seconds", type=float, default=20.0)
    ap.add_argument("--ping-timeout", type=float, default=PING_TIMEOUT, help="a /ping slower than this counts as it")
    ap.add_argument("--read-timeout", default="5", help="SERVING_REQUEST_READ_TIMEOUT given to the server (--slow)")
    ap.add_argument("--light", action="store_true", help="sequential normal requests, this code against --baseline")
    ap.add_argument("--baseline-root", type=Path, help="the other server code for --light")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    model_dir = args.model_dir or default_model_dir()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "lesion-robustness"
    work.mkdir(parents=True, exist_ok=True)
    extra = {"SERVING_REQUEST_READ_TIMEOUT": args.read_timeout} if args.slow else {}
    if args.light:
        assert args.baseline_root, "--light needs --baseline-root"
        servers = {name: ServerProcess(root.resolve(), model_dir, work / f"cache-{name}", work / f"serve-{name}.log",
                                       {"SAGEMAKER_MODEL_SERVER_WORKERS": "1"})
                   for name, root in (("baseline", args.baseline_root), (args.label, args.server_root))}
        try:
            for srv in servers.values():
                srv.wait_healthy()
            light = run_light(servers)
        finally:
            for srv in servers.values():
                srv.stop()
        doc = {"label": args.label, "baseline_root": str(args.baseline_root), "workers": 1,
               "load_average_1m": round(os.getloadavg()[0], 2), **light}
        print(json.dumps(doc, indent=2))
        out = args.out or RESULTS / f"light-{args.label}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        return
    server = ServerProcess(args.server_root.resolve(), model_dir, work / f"cache-{args.label}",
                           work / f"serve-{args.label}.log", extra)
    try:
        server.wait_healthy()
        if args.slow:
            result = run_slow(server, args.slow_connections, args.slow_seconds)
        else:
            result = run_load(server, args.clients, args.duration, args.ping_timeout)
    finally:
        server.stop()
    doc = {"label": args.label, "server_root": str(args.server_root), "clients": args.clients,
           "duration_s": args.duration, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
           "load_average_1m": round(os.getloadavg()[0], 2), **result}
    print(json.dumps(doc, indent=2))
    out = args.out or RESULTS / f"{'slow' if args.slow else 'ping'}-{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
