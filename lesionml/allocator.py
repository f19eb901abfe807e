"""The C allocator's settings for image pipelines that allocate and free the same large arrays many times a second.

A model-sized float32 image is 0.6 MB. glibc returns such blocks to the system when they are freed and
faults fresh zeroed pages in at the next allocation, so each training sample or request pays for page faults
rather than arithmetic: measured on the training data pipeline, 6.0 ms per image against 3.6 ms with freed
memory kept for reuse (benchmarks/training/RESULTS.md, "Data pipeline cost").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Serve blocks under 16 MB from the heap and keep up to 64 MB of freed heap for reuse (glibc only).

    Returns whether the settings were applied: elsewhere (musl, macOS, Windows) the process runs as before. Call it
    before worker processes start, which inherit it. The cost is up to 64 MB of memory held between allocations.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.info("mallopt refused the allocator settings; running with the defaults")
    return ok
