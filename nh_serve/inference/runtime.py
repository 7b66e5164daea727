"""Process-level settings for low-latency CPU inference.

The forward pass allocates a few tensors of 0.1-4 MB per call (keys and values
of every spike token, the head's ``(U, T, H)`` hidden layer). With glibc's
default thresholds each such buffer is ``mmap``-ed and released again and its
pages fault in on every call: about half of the CPU time at 300 units.
:func:`tune_malloc` raises the thresholds so freed buffers are reused. The
Predictor applies it once per process; ``NH_SERVE_TUNE_MALLOC=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

_TUNED: bool | None = None


def tune_malloc(*, mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Raise glibc's mmap / trim thresholds (bytes) for this process; True if applied.

    Buffers below ``mmap_threshold`` come from the heap and freed memory up to
    ``trim_threshold`` is kept for reuse instead of being returned to the OS, so
    repeated forward passes stop page-faulting. No-op (False) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(
        libc.mallopt(m_trim_threshold, trim_threshold)
    )


def tune_malloc_once() -> bool:
    """:func:`tune_malloc` the first time it is called in a process (unless NH_SERVE_TUNE_MALLOC=0)."""
    global _TUNED
    if _TUNED is None:
        _TUNED = os.environ.get("NH_SERVE_TUNE_MALLOC", "1") != "0" and tune_malloc()
    return _TUNED
