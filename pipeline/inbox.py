"""Inbox logic for scheduled runs (pure; the Prefect flow in ``flows/`` wires it).

A producer drops ``batch.jsonl`` into the inbox and, when the file is complete, creates
``batch.jsonl.done`` (an empty marker).  Only files with their marker are picked up, so a
half-copied or still-growing file is never read.  Every marked file is a batch: one of a type
the readers take (``pipeline.readers.container_of``: ``.jsonl``, ``.json``, ``.ndjson``, their
``.gz``, ``.parquet``, ``.pq``, ``.csv``) is curated, one of another type fails with that reason
(a marked file is never passed over without a word).  A batch is identified by its sha256: one
already among the sources of any version in the store is never curated again.  A batch is done
when its version is certified (a certification record of either verdict); one whose version was
written but not certified -- a later step failed (the report, the certification), or the run was
killed between writing the version and certifying it -- is picked up again with that version
(:attr:`Batch.version`, :func:`unfinished_versions`): the next tick verifies it is intact and
finishes the remaining steps on it, never building or writing over it.

A batch that failed is recorded in ``STORE/inbox/failed.jsonl`` (one JSON line per failed try:
file, sha256, reason, time, whether it was transient, which attempt, and the version written
from the batch when a later step failed).  A failure of the input
itself (a file that cannot be read as a batch, a record format it does not have: the same
content fails the same way) is final: the batch is skipped until its content changes (a new
sha256) or its records are removed.  A transient one -- an error of the operating system
(:func:`is_transient`: disk full, permission denied on the store, a network filesystem's I/O
error) -- is tried again on the next ticks, ``TRANSIENT_ATTEMPTS`` tries in all; the failure of
the last one is final too.  A try that failed after its version was written counts like any other
(the version stays, uncertified, when the last one fails).  Training (the policy's
``certify.train_after_certify``) is not a step a later tick redoes: a version with its certification
is done.
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
TRANSIENT_ATTEMPTS = 3  # tries of a batch whose failures are transient, before its failure is final


@dataclass(frozen=True)
class Batch:
    path: Path
    sha256: str  # "" when the file could not be read to hash it
    # why the batch cannot be curated, known before trying: a type the readers do not take (recorded as
    # failed like any other failure), or a file that could not be hashed (vanished, unreadable: no sha256
    # to record it under, so it is reported and looked at again on the next tick)
    error: str | None = None  # (without the path)
    failed_tries: int = 0  # its transient failures on earlier ticks (this is try failed_tries + 1)
    # the version an earlier try (or a run killed after writing it) built from this batch, not certified yet:
    # this try finishes its remaining steps on it (never curates the batch again)
    version: str | None = None


@dataclass(frozen=True)
class FailureHistory:
    """What ``failed.jsonl`` says of one batch content."""
    transient: int = 0  # transient failures so far
    bad_input: bool = False  # failed for a reason of its own (a record without ``transient``: one of those)

    @property
    def final(self) -> bool:
        return self.bad_input or self.transient >= TRANSIENT_ATTEMPTS


def is_transient(err: BaseException) -> bool:
    """Whether a batch's failure may not happen again: an ``OSError`` of the operating system (it has an
    errno: ENOSPC, EACCES, EIO, ESTALE...), raised as such or the cause of the error raised.  An error that
    says what is wrong with the input (:class:`UnreadableFile` for damaged gzip or Parquet data, a
    bad record format, a file too large) is not, nor is an ``OSError`` without an errno (pyarrow's for a
    damaged Parquet file)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return True
        seen = seen.__cause__
    return False


def processed_hashes(store: Store) -> set[str]:
    """sha256 of the batches some version of the store was built from (from the store's listing:
    one ``stat`` per version, no manifest parsed twice)."""
    return store.source_hashes()


def is_finished(store: Store, version_id: str) -> bool:
    """Whether the inbox is done with a version it wrote: the version has a certification record (either
    verdict; a ``stat``)."""
    return store.certification_path(version_id).exists()


def unfinished_versions(store: Store) -> dict[str, str]:
    """The batches (by sha256) whose version is written but not certified: the version's id (the newest
    version that added the batch, when several did).  A batch that some certified version added is
    finished.  One ``stat`` per version beside the listing's."""
    out: dict[str, str] = {}
    finished: set[str] = set()
    for e in store.list_versions():  # oldest first: the newest version of a batch wins
        if e.damaged is not None:
            continue
        done = is_finished(store, e.version_id)
        for sha in e.new_sources:
            if done:
                finished.add(sha)
            else:
                out[sha] = e.version_id
    return {sha: vid for sha, vid in out.items() if sha not in finished}


def failure_histories(store: Store) -> dict[str, FailureHistory]:
    """The failures recorded for each batch content (by sha256).  A damaged line (not JSON, no sha256)
    is skipped (with a warning), so one bad line cannot stop every later tick."""
    p = store.root / "inbox" / "failed.jsonl"
    if not p.exists():
        return {}
    out: dict[str, FailureHistory] = {}
    for n, line in enumerate(p.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            sha = rec["sha256"] if isinstance(rec, dict) else None
        except (ValueError, KeyError):
            sha = None
        if not (isinstance(sha, str) and len(sha) == 64):
            log.warning("%s:%d: damaged failure record skipped (not a JSON object with a sha256)", p, n)
            continue
        was = out.get(sha, FailureHistory())
        out[sha] = FailureHistory(was.transient + 1, was.bad_input) if rec.get("transient") is True \
            else FailureHistory(was.transient, True)
    return out


def failed_hashes(store: Store) -> set[str]:
    """sha256 of the batches whose failure is final (never tried again)."""
    return {sha for sha, h in failure_histories(store).items() if h.final}


def pending_batches(inbox: Path, store: Store) -> list[Batch]:
    """Finished batch files not yet processed, oldest name first: new ones, and those whose version was
    written but not certified (with :attr:`Batch.version`), unless their failure is final."""
    if not inbox.is_dir():
        raise FileNotFoundError(f"inbox {inbox} does not exist")
    failures = failure_histories(store)
    unfinished = unfinished_versions(store)
    done = (processed_hashes(store) - unfinished.keys()) | {sha for sha, h in failures.items() if h.final}
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
        tries = failures[sha].transient if sha in failures else 0
        try:
            container_of(p)
        except UnreadableFile as err:
            out.append(Batch(p, sha, err.why, tries))
            continue
        out.append(Batch(p, sha, failed_tries=tries, version=unfinished.get(sha)))
    return out


def record_failure(store: Store, batch: Batch, reason: str, *, transient: bool, version: str | None = None) -> dict:
    """Append the failure of this try of ``batch`` to ``failed.jsonl``; the record, with ``retry``: whether
    a later tick tries the batch again (a transient failure with tries left).  ``version``: the version
    written from the batch (a later step failed), recorded when there is one."""
    attempt = batch.failed_tries + 1
    rec = {"file": str(batch.path), "sha256": batch.sha256, "reason": reason, "at": datetime.now(UTC).isoformat(),
           "transient": transient, "attempt": attempt, **({"version": version} if version else {})}
    d = store.root / "inbox"
    d.mkdir(parents=True, exist_ok=True)
    with store.lock("inbox-failed"), open(d / "failed.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    return {**rec, "retry": transient and attempt < TRANSIENT_ATTEMPTS}
