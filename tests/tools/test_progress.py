"""The tools' progress bar: files, bytes, rate and time left."""

from __future__ import annotations

import io

from tools.progress import Progress, human_bytes, human_duration


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_line_shows_files_bytes_rate_and_eta() -> None:
    clock, stream = _Clock(), io.StringIO()
    bar = Progress(4, True, total_bytes=4 * 1024 * 1024, stream=stream, clock=clock)
    clock.now += 2.0
    bar.add_bytes(1024 * 1024)
    bar.step()
    line = bar.line()
    assert "1/4 files" in line
    assert "1.0 MB/4.0 MB" in line
    assert "512.0 KB/s" in line
    assert "ETA 0:06" in line  # a quarter in 2 s: 6 s left
    clock.now += 6.0
    for _ in range(3):
        bar.step(1024 * 1024)
    assert stream.getvalue().endswith("\n")
    assert "4/4 files" in stream.getvalue() and "in 0:08" in stream.getvalue()


def test_skipped_files_leave_the_total() -> None:
    bar = Progress(2, False, total_bytes=300)
    bar.skip(100)
    assert (bar.done, bar.bytes, bar.total_bytes) == (1, 0, 200)


def test_disabled_bar_writes_nothing() -> None:
    stream = io.StringIO()
    bar = Progress(1, False, stream=stream)
    bar.step(10)
    assert stream.getvalue() == ""


def test_units() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KB"
    assert human_bytes(3 * 1024 ** 3) == "3.0 GB"
    assert human_duration(65) == "1:05"
    assert human_duration(7384) == "2:03:04"
