"""glibc ``malloc`` settings that keep a long CPU training run's resident memory at its live tensors' size.

PyTorch's CPU tensors come from ``malloc``. glibc serves a request above its mmap threshold (128 KiB at start) with
its own ``mmap``, returned to the system on ``free``, but it raises that threshold to the size of every such block
freed, up to 32 MiB. After the first few rollouts, then, every activation and latent of a training step is carved
out of the heap arenas, and what is freed there stays resident wherever a live block sits above it: peak RSS climbs
over the first epochs although the live tensors do not (measured on the tiny side-by-side shape: 838-844 MB after one
epoch, 906-946 MB after six). Fixing the thresholds turns the dynamic adjustment off, so large blocks keep their own
mappings and the heap is trimmed back as it empties.

Trimming only returns the heap's top. Free chunks below a live block stay resident until :func:`release_free_heap`
(glibc's ``malloc_trim(0)``) hands their pages back. The trainer calls it before every rollout batch, after a full
garbage collection (reference cycles of a training step keep their tensors' memory until Python's rare oldest-
generation pass). Tiny side-by-side shape, peak RSS growth from epoch 5 to 30: +26.6 MB with the trim alone, +4.3 MB
with the collection alone, +0.0 MB with both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "release_free_heap", "tune_malloc"]

MMAP_THRESHOLD: int = 1 << 20
"""Blocks of at least this many bytes (1 MiB) get a mapping of their own, unmapped on ``free``."""

TRIM_THRESHOLD: int = 1 << 22
"""Free memory at the top of the heap beyond this many bytes (4 MiB) is returned to the system."""

# mallopt parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_tuned: bool | None = None


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once; later calls return the first result).

    Returns whether the settings took: False where the C library is not glibc (macOS, musl, Windows), which then
    keeps its own policy. Settings are process-wide; memory already allocated is not moved.
    """
    global _tuned
    if _tuned is None:
        libc = _glibc()
        _tuned = (
            libc is not None
            and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        )
    return _tuned


def release_free_heap() -> bool:
    """Collect garbage cycles, then return the pages of every free chunk in glibc's heap arenas (``malloc_trim(0)``).

    The full collection comes first because a training step's reference cycles keep their tensors' memory until
    Python's rare oldest-generation pass. Live memory is untouched. Returns whether anything was released; False also
    where the C library is not glibc.
    """
    gc.collect()
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
