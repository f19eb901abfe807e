"""`python -m localmode up` refusing to start: one line, a non-zero status, nothing left running."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from localmode.server import Schedule, env_name

from .helpers import REPO, Up, alive, free_port


def run_up(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "localmode", "up", "--no-schedules", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert proc.stdout == "", "nothing is announced"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        line = one_error_line(run_up("--port", str(port), "--no-sample", "--work-dir", str(tmp_path / "w")))
    assert f"port {port}" in line and "already in use" in line and "--port" in line
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "w").exists(), "refused before anything was deployed"


def test_missing_data_folder(tmp_path: Path) -> None:
    line = one_error_line(run_up("--port", str(free_port()), "--data", str(tmp_path / "nowhere"),
                                 "--work-dir", str(tmp_path / "w")))
    assert "does not exist" in line and "nowhere" in line


def test_template_that_does_not_load(tmp_path: Path) -> None:
    broken = tmp_path / "template.yaml"
    broken.write_text("Resources:\n  Bucket: [unclosed\n")
    port = free_port()
    line = one_error_line(run_up("--port", str(port), "--no-sample", "--template", str(broken),
                                 "--work-dir", str(tmp_path / "w")))
    assert "failed to load" in line and str(broken) in line
    with socket.socket() as again:  # the port was released
        again.bind(("127.0.0.1", port))


@pytest.mark.e2e
def test_sigterm_during_training_leaves_no_process(tmp_path: Path) -> None:
    """A training job in progress and its subprocess are stopped with up; the data loaded at start trains."""
    from .helpers import FAST_PARAMETERS, small_dataset, wait_for

    slow = {**FAST_PARAMETERS, "TrainingHyperparameters": FAST_PARAMETERS["TrainingHyperparameters"].replace(
        '"epochs": "1"', '"epochs": "50"')}
    # Loaded at start with --data (the label CSV found in the folder, as `run` finds it): enough to train on.
    data = small_dataset(tmp_path / "data", {"train": 10, "validation": 2, "test": 2})
    server = Up(tmp_path / "work", "--data", str(data), parameters=slow)
    try:
        server.wait_ready(timeout=300)
        sm = server.client("sagemaker")
        server.client("events").put_events(Entries=[{
            "Source": "skinlesion.pipeline", "DetailType": "RetrainingRequested", "Detail": '{"reason": "test"}'}])
        wait_for(lambda: [j for j in sm.list_training_jobs()["TrainingJobSummaries"]
                          if j["TrainingJobStatus"] == "InProgress"], timeout=120, what="a training job")
        children = wait_for(server.children, timeout=60, what="the training subprocess")
        assert server.terminate() == 0, server.stderr()
        assert alive(children) == [], f"left running: {alive(children)}"
    finally:
        server.kill()


def test_schedule_expressions() -> None:
    start = datetime(2026, 3, 31, 23, 59, 30, tzinfo=UTC)
    hourly = Schedule("cron(10 * * * ? *)", start)
    assert hourly.next == datetime(2026, 4, 1, 0, 10, tzinfo=UTC)
    monthly = Schedule("cron(0 3 1 * ? *)", start)
    assert monthly.next == datetime(2026, 4, 1, 3, 0, tzinfo=UTC)
    assert not monthly.due(datetime(2026, 4, 1, 2, 59, tzinfo=UTC))
    assert monthly.due(datetime(2026, 4, 1, 3, 0, 4, tzinfo=UTC))
    assert monthly.next == datetime(2026, 5, 1, 3, 0, tzinfo=UTC)
    weekdays = Schedule("cron(0 8 ? * MON-FRI *)", start)  # 2026-04-01 is a Wednesday
    assert weekdays.next == datetime(2026, 4, 1, 8, 0, tzinfo=UTC)
    rate = Schedule("rate(5 minutes)", start)
    assert rate.next == datetime(2026, 4, 1, 0, 4, 30, tzinfo=UTC)
    with pytest.raises(ValueError):
        Schedule("cron(0 0 L * ? *)", start)


def test_output_names_as_shell_variables() -> None:
    assert env_name("DataBucketName") == "DATA_BUCKET_NAME"
    assert env_name("RetrainingStateMachineArn") == "RETRAINING_STATE_MACHINE_ARN"
