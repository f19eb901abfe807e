"""The command-line tools' progress bar: files, bytes, rate and time left, on one line of stderr."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

# Redraw at most this often: a bar redrawn for every 8 KB upload callback would cost more than the upload.
_REDRAW_S = 0.2


def human_bytes(n: float) -> str:
    """``1.5 MB`` style, powers of 1024 as the AWS CLI prints them."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover - the loop returns


def human_duration(seconds: float) -> str:
    """``1:05`` or ``2:03:04``."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A one-line progress bar on stderr, safe to step from worker threads.

    Parameters
    ----------
    total : int
        Steps (files) expected.
    enabled : bool, optional
        Draw it; by default only when stderr is a terminal (logs and CI stay clean).
    total_bytes : int, optional
        Bytes expected; with it the bar, the rate and the time left follow bytes rather than files.
    stream : file, optional
        Where to draw (stderr).
    clock : callable, optional
        Monotonic seconds; tests pass a fake one.
    """

    def __init__(self, total: int, enabled: bool | None = None, *, total_bytes: int | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.done = total, 0
        self.total_bytes, self.bytes = total_bytes, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._clock = clock
        self._started = clock()
        self._drawn_at = float("-inf")
        self._lock = threading.Lock()

    def add_bytes(self, n: int) -> None:
        """Count ``n`` bytes moved (a boto3 transfer ``Callback`` can be this method)."""
        with self._lock:
            self.bytes += n
            self._maybe_draw(False)

    def step(self, nbytes: int = 0) -> None:
        """Count one finished file and, if given, its ``nbytes`` not counted through :meth:`add_bytes`."""
        with self._lock:
            self.done += 1
            self.bytes += nbytes
            self._maybe_draw(self.done >= self.total)

    def skip(self, nbytes: int = 0) -> None:
        """Count one file that needed no transfer; its ``nbytes`` leave the total instead of inflating the rate."""
        with self._lock:
            self.done += 1
            if self.total_bytes:
                self.total_bytes = max(self.total_bytes - nbytes, 0)
            self._maybe_draw(self.done >= self.total)

    def line(self) -> str:
        """The bar's text: ``[####....] 12/40 files  3.1 MB/9.8 MB  1.2 MB/s  ETA 0:06``."""
        elapsed = max(self._clock() - self._started, 1e-9)
        by_bytes = bool(self.total_bytes)
        fraction = (self.bytes / self.total_bytes if by_bytes and self.total_bytes
                    else self.done / max(self.total, 1))
        fraction = min(max(fraction, 0.0), 1.0)
        width = 24
        filled = int(width * fraction)
        parts = [f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} files"]
        parts.append(human_bytes(self.bytes) + (f"/{human_bytes(self.total_bytes or 0)}" if by_bytes else ""))
        parts.append(f"{human_bytes(self.bytes / elapsed)}/s")
        if self.done >= self.total:
            parts.append(f"in {human_duration(elapsed)}")
        elif fraction > 0:
            parts.append(f"ETA {human_duration(elapsed * (1 - fraction) / fraction)}")
        else:
            parts.append("ETA --:--")
        return "  ".join(parts)

    def _maybe_draw(self, final: bool) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if not final and now - self._drawn_at < _REDRAW_S:
            return
        self._drawn_at = now
        # Pad to erase a longer previous line.
        self.stream.write("\r  " + self.line().ljust(90) + ("\n" if final else ""))
        self.stream.flush()
