"""Start ``python -m localmode up`` as a subprocess and talk to it as an operator would."""

from __future__ import annotations

import csv
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from localmode.server import descendants

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
# Small and fast: the point is the loop through the HTTP API, not the model (as tests/e2e/test_local_mode.py).
FAST_HPS = json.dumps({"arch": "efficientnet_lite0", "pretrained": "true", "epochs": "1", "freeze_epochs": "1",
                       "image_size": "96x72", "batch_size": "32", "num_workers": "0", "threads": "1"})
FAST_PARAMETERS = {
    "MinNewImages": "50", "MinImagesPerClass": "10", "MinBalancedAccuracy": "0.0", "MinMelanomaSensitivity": "0.0",
    "MinMacroAuc": "0.0", "MaxRegression": "1.0", "TrainingHyperparameters": FAST_HPS,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def small_dataset(dest: Path, quota: dict[str, int] | None = None) -> Path:
    """A few images per class and split from the bundled sample, with their metadata rows."""
    from lesion_common.splits import assign_split

    quota = quota or {"train": 12, "validation": 4, "test": 4}
    (dest / "images").mkdir(parents=True)
    rows = list(csv.DictReader((SAMPLE / "HAM10000_metadata.csv").open()))
    chosen: list[dict[str, str]] = []
    for dx in sorted({r["dx"] for r in rows}):
        for split, n in quota.items():
            chosen += [r for r in rows if r["dx"] == dx and assign_split(r["lesion_id"]) == split][:n]
    with (dest / "HAM10000_metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    for r in chosen:
        shutil.copy(SAMPLE / "images" / f"{r['image_id']}.jpg", dest / "images")
    return dest


class Up:
    """One ``up`` process: started on a free port, its ready line and exports parsed."""

    def __init__(self, work_dir: Path, *args: str, parameters: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        command = [sys.executable, "-m", "localmode", "up", "--port", str(self.port), "--work-dir", str(work_dir),
                   "--no-schedules", *args]
        for key, value in (parameters or {}).items():
            command += ["--parameter", f"{key}={value}"]
        self.stderr_path = work_dir.parent / f"up-{self.port}.stderr"
        work_dir.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = self.stderr_path.open("w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.env: dict[str, str] = {}
        self.ready_line = ""
        self.started = time.monotonic()
        self.ready_after_s: float | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_ready(self, timeout: float = 180.0) -> Up:
        """Read stdout up to the last export; raise with the server's stderr if it never gets there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"up exited ({self.proc.wait()}) before ready:\n{self.stderr()}")
            if line.startswith("ready: "):
                self.ready_line = line
                self.ready_after_s = time.monotonic() - self.started
            elif line.startswith("export "):
                key, _, value = line.removeprefix("export ").partition("=")
                self.env[key] = value
                if key == "FAILED_EVENTS_QUEUE_URL":  # the last output of the template
                    return self
        raise AssertionError(f"up not ready after {timeout:.0f} s:\n{self.stderr()}")

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-5000:]

    @property
    def url(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def children(self) -> list[int]:
        return descendants(self.proc.pid)

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM; the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._stderr.close()

    def kill(self) -> None:
        """Last resort in a failed test: the process and whatever it started."""
        if self.proc.poll() is None:
            for pid in self.children():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait()


def alive(pids: list[int]) -> list[int]:
    """The PIDs among ``pids`` still running (zombies count as gone)."""
    running = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if not stat[stat.rfind(")") + 2:].startswith("Z"):
            running.append(pid)
    return running


def wait_for(predicate: Any, timeout: float, interval: float = 1.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached after {timeout:.0f} s")
