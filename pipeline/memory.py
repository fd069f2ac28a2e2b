"""Give freed memory back to the system (glibc only; a no-op elsewhere).

A long build in one process frees most of what each partition's task allocates, but glibc's
allocator keeps it: its mmap threshold rises to the largest block freed so far (up to 32 MiB),
so later blocks below it come from the heap, and the heap's free pages stay resident.  Measured
at 1M judgments in one process (``benchmarks/scale.py``, docs/benchmarks.md): after the checks the
heap held 0.53 GB free of 0.79 GB, and the build peaked at 2.1 GB.

* :func:`bound_heap` fixes the threshold at :data:`MMAP_THRESHOLD` (blocks from 4 MiB up are
  mapped and unmapped on their own; below it the dynamic rise no longer applies).  A smaller
  threshold (256 KiB) freed more but made the checks ~45 % slower (each EM iteration's arrays
  mapped and faulted in again).  A larger one (16 MiB) made a 1M partitioned build ~7 % faster
  (~51.5 s vs ~55.5 s) but raised the 10M peak from 3.64-3.74 to 3.96 GB, next to issue 15's 4 GB
  bound, for a time within the 10M runs' spread (docs/scale-out.md, session 25).
* :func:`release` returns the heap's free pages (``malloc_trim``): called after every
  partition's task and at the end of every stage of a partitioned build.

Polars' own allocator (jemalloc, configured only through ``_RJEM_MALLOC_CONF`` before it loads)
is left as it is: faster decay freed little and cost time (docs/scale-out.md).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["bound_heap", "release", "MMAP_THRESHOLD"]

MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # (glibc's malloc.h)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None


@functools.cache
def bound_heap() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (once per process).  True if set."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release(arrow: bool = False) -> None:
    """Return the heap's free pages to the system (a few ms).  ``arrow``: Arrow's pool's too (it keeps freed
    pages ``MIMALLOC_PURGE_DELAY`` ms, 5 s by the CLI's default in :mod:`flows`, for the next read; a curate
    gives them back at its ingest's end, where they otherwise raised the checks' peak)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    pa = sys.modules.get("pyarrow") if arrow else None
    if pa is not None:
        pa.default_memory_pool().release_unused()
