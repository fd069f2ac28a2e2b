"""The export log: which routed pairs ``prefpipe review export`` sent out, per version.

One small JSON record per export in ``STORE/reviews/exports/`` (beside the versions, never inside
one: versions stay immutable), written atomically under a unique name, so concurrent exports never
share a file.  A child version counts the routed pairs of its lineage that were exported before it
was built (``ledger.reviews.exported``: the funnel routed -> exported -> reviewed -> resolved).
A record that cannot be read is skipped with a warning: the log is bookkeeping, not data.
"""
from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from pipeline.store import Store, VersionHandle, atomic_write_bytes
from schemas.ids import is_safe_id

log = logging.getLogger(__name__)
EXPORTS_DIR = ("reviews", "exports")


class ExportRecord(BaseModel):
    version_id: str
    format: str
    exported_at: datetime
    tasks: int
    pair_ids: list[str]
    out: str


def exports_dir(store: Store) -> Path:
    return store.root.joinpath(*EXPORTS_DIR)


def record_export(store: Store, *, version_id: str, fmt: str, pair_ids: list[str], out: Path) -> Path:
    """Write one export record (atomic; a unique name per export)."""
    now = datetime.now(UTC)
    rec = ExportRecord(version_id=version_id, format=fmt, exported_at=now, tasks=len(pair_ids), pair_ids=pair_ids,
                       out=str(out))
    name = f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{version_id}-{uuid.uuid4().hex[:8]}.json"
    path = exports_dir(store) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(rec.model_dump(mode="json"), ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def read_exports(store: Store) -> list[ExportRecord]:
    d = exports_dir(store)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        try:
            rec = ExportRecord.model_validate_json(p.read_bytes())
        except (OSError, ValidationError) as err:
            log.warning("%s: export record skipped (%s)", p, type(err).__name__)
            continue
        if is_safe_id(rec.version_id):
            out.append(rec)
    return out


def lineage(handle: VersionHandle | None) -> list[str]:
    """The version and its ancestors, newest first (stops at a parent the store does not have)."""
    ids: list[str] = []
    while handle is not None and handle.version_id not in ids:
        ids.append(handle.version_id)
        parent = handle.manifest().parent_version
        if parent is None or not handle.store.exists(parent):
            break
        handle = handle.store.get(parent)
    return ids


def exported_pairs(store: Store, versions: list[str]) -> frozenset[str]:
    """Pair ids exported for review from any of ``versions``."""
    want = set(versions)
    return frozenset(pid for rec in read_exports(store) if rec.version_id in want for pid in rec.pair_ids)


__all__ = ["ExportRecord", "exported_pairs", "exports_dir", "lineage", "read_exports", "record_export"]
