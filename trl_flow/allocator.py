"""glibc ``malloc`` settings that keep a long CPU training run's resident memory at its live tensors' size.

PyTorch's CPU tensors come from ``malloc``. glibc serves a request above its mmap threshold (128 KiB at start) with
its own ``mmap``, returned to the system on ``free``, but it raises that threshold to the size of every such block
freed, up to 32 MiB. After the first few rollouts, then, every activation and latent of a training step is carved
out of the heap arenas, and what is freed there stays resident wherever a live block sits above it: peak RSS climbs
over the first epochs although the live tensors do not (measured on the tiny side-by-side shape: 838-844 MB after one
epoch, 906-946 MB after six). Fixing the thresholds turns the dynamic adjustment off, so large blocks keep their own
mappings and the heap is trimmed back as it empties.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

MMAP_THRESHOLD: int = 1 << 20
"""Blocks of at least this many bytes (1 MiB) get a mapping of their own, unmapped on ``free``."""

TRIM_THRESHOLD: int = 1 << 22
"""Free memory at the top of the heap beyond this many bytes (4 MiB) is returned to the system."""

# mallopt parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_tuned: bool | None = None


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once; later calls return the first result).

    Returns whether the settings took: False where the C library is not glibc (macOS, musl, Windows), which then
    keeps its own policy. Settings are process-wide; memory already allocated is not moved.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
