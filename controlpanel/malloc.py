"""glibc malloc settings for daphne, which copies every log message once per viewer.

Each message of up to 2,000 log lines (~190 KB) is copied per socket by daphne (UTF-8 encoding) and
autobahn (the frame) and freed at once.  With glibc's defaults, blocks this size are mmap'd or trim the
heap when freed, so every copy page-faults fresh memory: on the panel's 2-CPU VM a 190 KB copy ran at
~1 GB/s instead of ~15 GB/s, which made 50 viewers of one log cost daphne several CPU seconds more.
Keeping such blocks on the heap (mmap only from 16 MB, trim only beyond 64 MB) removes that; the cost is
up to 64 MB of freed heap kept by the process.  Other C libraries (musl): nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 16 * 2**20, trim_threshold: int = 64 * 2**20) -> bool:
    """Apply the settings above; True if the C library took them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
