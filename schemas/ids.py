"""Ids that become file or directory names (version ids, run ids, tags): validated before any path is built.

A safe id is 1-128 characters of ``[A-Za-z0-9._-]``, does not start with ``.`` or ``-`` and
contains no ``..``: it can never name a parent directory, an absolute path, a hidden file, a
command-line option or a glob pattern.  Everything that joins user input onto a store path
goes through :func:`safe_id` first.
"""
from __future__ import annotations

import re

_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class UnsafeId(ValueError):
    """An id that would not be a plain file name; the message says which id and why."""


def is_safe_id(value: object) -> bool:
    return isinstance(value, str) and _SAFE.fullmatch(value) is not None and ".." not in value


def safe_id(value: object, *, what: str = "id") -> str:
    """Return ``value`` unchanged if it is a safe id, else raise :class:`UnsafeId` naming it."""
    if is_safe_id(value):
        return value  # type: ignore[return-value]
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise UnsafeId(f"{what} {shown} is not allowed: use 1-128 characters of A-Z a-z 0-9 . _ - "
                   "(not starting with '.' or '-', no '..', no path separators)")


__all__ = ["UnsafeId", "is_safe_id", "safe_id"]
