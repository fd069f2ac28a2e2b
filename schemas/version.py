"""The one code version: package version + a hash of the sources a result depends on.

``code_version()`` (schemas/ and pipeline/) is part of every version id, certification and
cache key of the data pipeline; the trainer records ``code_version(("schemas", "trainer"))``
in its runs.  One function, so that "which code made this" has one answer everywhere.
"""
from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
__version__ = "0.1.0"


@cache
def code_version(parts: tuple[str, ...] = ("schemas", "pipeline")) -> str:
    """``<package version>+<10 hex>``: sha256 over the path and bytes of every ``*.py`` under ``parts``."""
    h = hashlib.sha256()
    for sub in parts:
        for p in sorted((ROOT / sub).rglob("*.py")):
            h.update(p.relative_to(ROOT).as_posix().encode())
            h.update(p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:10]}"


__all__ = ["ROOT", "__version__", "code_version"]
