"""The command-line tools' progress bar."""

from __future__ import annotations

import sys
import threading


class Progress:
    """A one-line progress bar on stderr, safe to step from worker threads.

    Parameters
    ----------
    total : int
        Steps expected.
    enabled : bool, optional
        Draw it; by default only when stderr is a terminal (logs and CI stay clean).
    """

    def __init__(self, total: int, enabled: bool | None = None):
        self.total, self.done = total, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._lock = threading.Lock()

    def step(self) -> None:
        """Count one finished step, redrawing every tenth and the last."""
        with self._lock:
            self.done += 1
            if self.enabled and (self.done == self.total or self.done % 10 == 0):
                width = 30
                filled = int(width * self.done / max(self.total, 1))
                sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
                if self.done == self.total:
                    sys.stderr.write("\n")
                sys.stderr.flush()
