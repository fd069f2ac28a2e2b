"""Inbox logic for scheduled runs (pure; the Prefect flow in ``flows/`` wires it).

A producer drops ``batch.jsonl`` into the inbox and, when the file is complete, creates
``batch.jsonl.done`` (an empty marker).  Only files with their marker are picked up, so a
half-copied or still-growing file is never read.  Every marked file is a batch: one of a type
the readers take (``pipeline.readers.container_of``: ``.jsonl``, ``.json``, ``.ndjson``, their
``.gz``, ``.parquet``, ``.pq``, ``.csv``) is curated, one of another type fails with that reason
(a marked file is never passed over without a word).  A batch is identified by its sha256: one
already among the sources of any version in the store is never processed again (this also
makes a killed run resume correctly: the next tick redoes only what has no version yet).
A batch that failed is recorded in ``STORE/inbox/failed.jsonl`` and skipped until its
content changes (or the record is removed).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.ingest import file_sha256
from pipeline.readers import UnreadableFile, container_of
from pipeline.store import Store

log = logging.getLogger(__name__)
MARKER = ".done"


@dataclass(frozen=True)
class Batch:
    path: Path
    sha256: str  # "" when the file could not be read to hash it
    # why the batch cannot be curated, known before trying: a type the readers do not take (recorded as
    # failed like any other failure), or a file that could not be hashed (vanished, unreadable: no sha256
    # to record it under, so it is reported and looked at again on the next tick)
    error: str | None = None  # (without the path)


def processed_hashes(store: Store) -> set[str]:
    """sha256 of the batches some version of the store was built from (from the store's listing:
    one ``stat`` per version, no manifest parsed twice)."""
    return store.source_hashes()


def failed_hashes(store: Store) -> set[str]:
    """sha256 of the batches recorded as failed.  A damaged line (not JSON, no sha256) is skipped
    (with a warning), so one bad line cannot stop every later tick."""
    p = store.root / "inbox" / "failed.jsonl"
    if not p.exists():
        return set()
    out: set[str] = set()
    for n, line in enumerate(p.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            sha = rec["sha256"] if isinstance(rec, dict) else None
        except (ValueError, KeyError):
            sha = None
        if isinstance(sha, str) and len(sha) == 64:
            out.add(sha)
        else:
            log.warning("%s:%d: damaged failure record skipped (not a JSON object with a sha256)", p, n)
    return out


def pending_batches(inbox: Path, store: Store) -> list[Batch]:
    """Finished batch files not yet processed, oldest name first."""
    if not inbox.is_dir():
        raise FileNotFoundError(f"inbox {inbox} does not exist")
    done = processed_hashes(store) | failed_hashes(store)
    out: list[Batch] = []
    seen_now: set[str] = set()
    for p in sorted(inbox.iterdir()):
        if p.name.endswith(MARKER) or not p.with_name(p.name + MARKER).exists():
            continue  # a marker, or still being written: no .done marker yet
        if p.is_dir():
            continue
        try:
            sha = file_sha256(p)
        except UnreadableFile as err:  # one file that cannot be read must not stop the others
            out.append(Batch(p, "", err.why))
            continue
        if sha in done or sha in seen_now:
            continue
        seen_now.add(sha)
        try:
            container_of(p)
        except UnreadableFile as err:
            out.append(Batch(p, sha, err.why))
            continue
        out.append(Batch(p, sha))
    return out


def record_failure(store: Store, batch: Batch, reason: str) -> None:
    d = store.root / "inbox"
    d.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"file": str(batch.path), "sha256": batch.sha256, "reason": reason,
                       "at": datetime.now(UTC).isoformat()}) + "\n"
    with store.lock("inbox-failed"), open(d / "failed.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line)
