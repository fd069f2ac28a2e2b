"""Compiled loops for the few per-character hot spots (numba, compiled on first use).

A kernel is written as a plain Python function over NumPy arrays and scalars and compiled by
:func:`compiled` the first time a process needs it (``nogil``: threads that call it run in
parallel; no ``cache``: numba's on-disk cache is pickled and holds machine code, and nothing
prefpipe reads is executed -- a process compiles each kernel once, ~1 s).  ``numba`` is imported
only then, so a process that never runs such a kernel does not pay its import.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["compiled"]

_LOCK = threading.Lock()
_DONE: dict[Callable[..., Any], Callable[..., Any]] = {}


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled (once per process; concurrent first callers wait for the one compile)."""
    done = _DONE.get(fn)
    if done is not None:
        return done
    with _LOCK:
        if fn not in _DONE:
            import numba

            _DONE[fn] = numba.njit(nogil=True, cache=False)(fn)
        return _DONE[fn]
