"""Per-prediction capture records for drift monitoring (format: docs/contracts.md, "Inference capture records").

Each worker appends JSON lines to its own hourly file, ``<CAPTURE_DIR>/capture-<YYYYmmddTHH>-<host>-<pid>.jsonl``
(UTC), so writers never interleave and a reader can take every closed hour. The request bytes are kept only when
``CAPTURE_RAW_IMAGES`` is true (``<CAPTURE_DIR>/raw/<request_id>-<index>.<ext>``); on AWS the endpoint's Data
Capture keeps the raw payloads, and these records are what drift detection reads. A failing disk is logged once
and never fails a request.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("inference.capture")
SCHEMA_VERSION = 1
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


class CaptureWriter:
    """Appends capture records; thread-safe within one worker process.

    Parameters
    ----------
    directory : Path
        ``CAPTURE_DIR``; created if missing.
    raw : bool
        Also keep the request bytes.
    """

    def __init__(self, directory: Path, raw: bool = False) -> None:
        self.directory = Path(directory)
        self.raw = raw
        self._lock = threading.Lock()
        self._hour = ""
        self._file: IO[str] | None = None
        self._failed = False
        self._host = socket.gethostname().split(".")[0] or "host"

    def _open(self, hour: str) -> IO[str]:
        if self._file is not None and hour == self._hour:
            return self._file
        if self._file is not None:
            self._file.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"capture-{hour}-{self._host}-{os.getpid()}.jsonl"
        # Kept open across requests (closed on rotation); line-buffered, so each record reaches the file whole even
        # if the worker is killed right after.
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._hour = hour
        return self._file

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append records (one line each)."""
        if not records:
            return
        lines = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records)
        hour = time.strftime("%Y%m%dT%H", time.gmtime())
        try:
            with self._lock:
                self._open(hour).write(lines)
        except (OSError, ValueError) as e:
            if not self._failed:
                log.error("capture to %s failed (further failures not logged): %s", self.directory, e)
                self._failed = True

    def write_raw(self, request_id: str, index: int, data: bytes, image_format: str) -> str | None:
        """Keep one request image; returns its path relative to the capture directory (None when off or failed)."""
        if not self.raw:
            return None
        name = f"raw/{request_id}-{index}.{_EXTENSIONS.get(image_format, 'bin')}"
        try:
            (self.directory / "raw").mkdir(parents=True, exist_ok=True)
            (self.directory / name).write_bytes(data)
        except OSError as e:
            if not self._failed:
                log.error("raw capture to %s failed: %s", self.directory, e)
                self._failed = True
            return None
        return name

    def close(self) -> None:
        """Close the current file."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
