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
file, sha256, reason, time, whether it was transient, which attempt, the version written from the batch
when a later step failed, and the ``kind`` of failure -- see :func:`record_failure`).  A failure of the input
itself (a file that cannot be read as a batch, a record format it does not have: the same
content fails the same way) is final: the batch is skipped until its content changes (a new
sha256) or its records are removed.  A transient one -- an error of the operating system
(:func:`is_transient`: disk full, permission denied on the store, a network filesystem's I/O
error) -- is tried again on the next ticks, ``TRANSIENT_ATTEMPTS`` tries in all; the failure of
the last one is final too.  A try that failed after its version was written counts like any other
(the version stays, uncertified, when the last one fails).  A failure because a version in the store is
damaged (kind ``damaged_version``: the batch's unfinished version, verified before it is finished, or the
version it would build, or its parent) is final only while that damaged copy is there: once it is removed
(``prefpipe gc --delete V --apply``, as the error says) the next tick curates the batch anew.

Training (the policy's ``certify.train_after_certify``) is a step of its own: a batch whose version is
certified under a policy that says so (the certification record's) is pending again, to train that version
(:attr:`Batch.train`), until a finished training run of the version exists (:func:`finished_run`) -- when the
training failed (kind ``train``: transient failures tried ``TRANSIENT_ATTEMPTS`` times, counted apart from the
batch's other failures; any other failure final) or the run was killed.  A version certified before the
setting was on is not trained by a later tick (``prefpipe train`` trains it).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from pipeline.ingest import file_sha256
from pipeline.readers import UnreadableFile, container_of
from pipeline.store import Store, StoreError
from schemas.ids import is_safe_id

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
    # this try finishes its remaining steps on it (never curates the batch again); with ``train``: its certified version
    version: str | None = None
    # this try trains ``version`` -- certified on an earlier try, no finished training run of it yet -- and only that
    # (``failed_tries``: its training's transient failures so far)
    train: bool = False

    def for_training(self, version: str) -> Batch:
        """This batch as the first try of training ``version`` (certified on this try)."""
        return replace(self, version=version, train=True, failed_tries=0, error=None)


@dataclass(frozen=True)
class FailureHistory:
    """What ``failed.jsonl`` says of one batch content (or of training one version: :func:`train_failure_histories`)."""
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


def _batch_versions(store: Store) -> tuple[dict[str, str], dict[str, str]]:
    """(unfinished, finished): per batch sha256, the newest version that added it without a certification record,
    and the newest that added it with one.  A batch that some certified version added is finished."""
    unfinished: dict[str, str] = {}
    finished: dict[str, str] = {}
    for e in store.list_versions():  # oldest first: the newest version of a batch wins
        if e.damaged is not None:
            continue
        into = finished if is_finished(store, e.version_id) else unfinished
        for sha in e.new_sources:
            into[sha] = e.version_id
    return {sha: vid for sha, vid in unfinished.items() if sha not in finished}, finished


def unfinished_versions(store: Store) -> dict[str, str]:
    """The batches (by sha256) whose version is written but not certified: the version's id (the newest
    version that added the batch, when several did).  A batch that some certified version added is
    finished.  One ``stat`` per version beside the listing's."""
    return _batch_versions(store)[0]


# the kinds of failure a failed.jsonl record has (a record without one, from before kinds: "curate")
CURATE, DAMAGED_VERSION, TRAIN = "curate", "damaged_version", "train"


def _manifest_stat(store: Store, version_id: str) -> list[int]:
    """(inode, size, mtime_ns) of the version's ``manifest.json``: which copy of the version is there (the key the
    listing's cache keeps a manifest by).  Raises ``FileNotFoundError`` when there is none (removed)."""
    st = os.stat(store.versions_dir / version_id / "manifest.json")
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _damage_still_there(store: Store, rec: dict) -> bool:
    """Whether the damaged version a ``damaged_version`` record names is still the copy that failed: the same
    ``manifest.json`` (a record that does not say which copy: one written before the record's time).  Removed, or
    built anew since: the record no longer counts.  A record that names no valid version counts (as a failure of
    the batch always did)."""
    d = rec.get("damaged")
    vid = d.get("version") if isinstance(d, dict) else None
    if not is_safe_id(vid):
        return True
    try:
        now = _manifest_stat(store, vid)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:  # (cannot look now: it counts, as it did when recorded)
        return True
    want = d.get("manifest_stat")
    if want is not None:
        return want == now
    try:
        at = datetime.fromisoformat(str(rec.get("at")))
    except ValueError:
        return True
    return now[2] <= at.timestamp() * 1e9 if at.tzinfo else True


def _legacy_damaged(rec: dict) -> dict:
    """A record from before kinds whose reason is ``existing_version``'s for the batch's own version ("version V is
    in the store (...) but damaged: ...") is read as the ``damaged_version`` record it would be now (the copy not
    known: the one older than the record), so a batch an older inbox left failed for good is curated anew once
    that version is removed."""
    vid, reason = rec.get("version"), rec.get("reason")
    if "kind" in rec or rec.get("transient") is True or not (is_safe_id(vid) and isinstance(reason, str)):
        return rec
    if reason.startswith(f"version {vid} is in the store (") and ") but damaged: " in reason:
        return {**rec, "kind": DAMAGED_VERSION, "damaged": {"version": vid, "manifest_stat": None}}
    return rec


def _failure_records(store: Store) -> list[dict]:
    """The records of ``failed.jsonl``.  A damaged line (not JSON, no sha256) is skipped (with a warning), so one
    bad line cannot stop every later tick."""
    p = store.root / "inbox" / "failed.jsonl"
    if not p.exists():
        return []
    out: list[dict] = []
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
        out.append(_legacy_damaged(rec))
    return out


def _histories(records: list[dict], key: str) -> dict[str, FailureHistory]:
    out: dict[str, FailureHistory] = {}
    for rec in records:
        k = rec.get(key)
        if not isinstance(k, str):
            continue
        was = out.get(k, FailureHistory())
        out[k] = FailureHistory(was.transient + 1, was.bad_input) if rec.get("transient") is True \
            else FailureHistory(was.transient, True)
    return out


def _curate_histories(store: Store, records: list[dict]) -> dict[str, FailureHistory]:
    kept = [r for r in records if r.get("kind", CURATE) != TRAIN
            and (r.get("kind") != DAMAGED_VERSION or _damage_still_there(store, r))]
    return _histories(kept, "sha256")


def failure_histories(store: Store) -> dict[str, FailureHistory]:
    """The failures recorded for each batch content (by sha256), its training's aside (:func:`train_failure_histories`);
    a failure because of a damaged version counts while that damaged copy is there.  A damaged line (not JSON, no
    sha256) is skipped (with a warning), so one bad line cannot stop every later tick."""
    return _curate_histories(store, _failure_records(store))


def _train_histories(records: list[dict]) -> dict[str, FailureHistory]:
    return _histories([r for r in records if r.get("kind") == TRAIN], "version")


def train_failure_histories(store: Store) -> dict[str, FailureHistory]:
    """The failures recorded for training each version (by version id)."""
    return _train_histories(_failure_records(store))


def failed_hashes(store: Store) -> set[str]:
    """sha256 of the batches whose failure is final (never tried again)."""
    return {sha for sha, h in failure_histories(store).items() if h.final}


def finished_run(store: Store, version_id: str) -> Path | None:
    """The run directory of a finished training run of ``version_id`` (``trainer.train``: STORE/runs/RUN/), or None.

    Read as data, verified, never taken on its word: the trainer's lineage of the version
    (STORE/lineage/V.jsonl) names the runs that finished (``event: finished``; a ``run_id`` that is a safe id --
    the ``run_dir`` the line also gives is not used); a run counts when its ``run.json`` says ``status: finished``,
    names that run id and version, was trained under a ``certified`` record, and trained on exactly the splits
    (``split_sha256``) of the version's certified manifest -- certificate -> manifest verified
    (:meth:`~pipeline.store.VersionHandle.verify_chain` without hashing the data files), so a run of another
    content under the same id (a version removed and built anew, a run directory copied) is not one.  Costs a
    read of the lineage and, when it names a finished run, of the certificate, the manifest and the run's
    ``run.json``: no data file is read."""
    try:
        lines = (store.root / "lineage" / f"{version_id}.jsonl").read_bytes().splitlines()
    except OSError:  # (none: never trained; unreadable now: a later tick looks again)
        return None
    run_ids: list[str] = []
    for line in reversed(lines):  # newest first
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("event") == "finished" and is_safe_id(ev.get("run_id")) \
                and ev["run_id"] not in run_ids:
            run_ids.append(ev["run_id"])
    if not run_ids:
        return None
    try:
        h = store.get(version_id)
        if not h.verify_chain(files=False).ok:
            return None
        splits = {name: info.sha256 for name, info in h.manifest().splits.items()}
    except (OSError, StoreError):
        return None
    for run_id in run_ids:
        run_dir = store.root / "runs" / run_id
        try:
            run = json.loads((run_dir / "run.json").read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(run, dict) and run.get("status") == "finished" and run.get("run_id") == run_id \
                and run.get("version_id") == version_id and run.get("split_sha256") == splits \
                and isinstance(run.get("certification"), dict) and run["certification"].get("verdict") == "certified":
            return run_dir
    return None


def needs_training(store: Store, version_id: str) -> bool:
    """Whether the inbox still has to train ``version_id``: its latest certification record says ``certified``, under
    a policy with ``certify.train_after_certify`` (the record's: a version certified before the setting was turned
    on is not trained by a later tick), and no finished run of it exists (:func:`finished_run`).  Training verifies
    the whole chain again (the trainer's way in)."""
    try:
        rec = store.latest_certification(version_id)
    except (OSError, StoreError):  # (a damaged record: nothing to train on; `prefpipe versions` says why)
        return False
    if not (isinstance(rec, dict) and rec.get("verdict") == "certified"):
        return False
    pol = rec.get("policy")
    cert = pol.get("certify") if isinstance(pol, dict) else None
    if not (isinstance(cert, dict) and cert.get("train_after_certify") is True):
        return False
    return finished_run(store, version_id) is None


def pending_batches(inbox: Path, store: Store, *, train: bool = False) -> list[Batch]:
    """Finished batch files not yet processed, oldest name first: new ones, and those whose version was
    written but not certified (with :attr:`Batch.version`), unless their failure is final.  ``train`` (the policy's
    ``certify.train_after_certify``): also those whose certified version still needs training
    (:func:`needs_training`; :attr:`Batch.train`), unless the training's failure is final."""
    if not inbox.is_dir():
        raise FileNotFoundError(f"inbox {inbox} does not exist")
    records = _failure_records(store)
    failures = _curate_histories(store, records)
    train_failures = _train_histories(records) if train else {}
    unfinished, certified = _batch_versions(store)
    final = {sha for sha, h in failures.items() if h.final}
    done = (processed_hashes(store) - unfinished.keys()) | final
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
        if sha in seen_now:
            continue
        if sha in done:
            vid = certified.get(sha)  # (its version certified: still to train on, when the policy says so?)
            tried = train_failures.get(vid, FailureHistory()) if vid else FailureHistory()
            if train and vid and sha not in final and not tried.final and needs_training(store, vid):
                seen_now.add(sha)
                out.append(Batch(p, sha, failed_tries=tried.transient, version=vid, train=True))
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


def record_failure(store: Store, batch: Batch, reason: str, *, transient: bool, version: str | None = None,
                   damaged: str | None = None) -> dict:
    """Append the failure of this try of ``batch`` to ``failed.jsonl``; the record, with ``retry``: whether
    a later tick tries the batch again (a transient failure with tries left).  ``version``: the version
    written from the batch (a later step failed), recorded when there is one.  ``kind``: ``train`` for a try that
    trained (:attr:`Batch.train`; counted apart), ``damaged_version`` when ``damaged`` names the damaged version the
    try failed on (with its ``manifest.json``'s stat: the record counts while that copy is there), else ``curate``."""
    attempt = batch.failed_tries + 1
    kind = TRAIN if batch.train else DAMAGED_VERSION if damaged else CURATE
    rec = {"file": str(batch.path), "sha256": batch.sha256, "reason": reason, "at": datetime.now(UTC).isoformat(),
           "transient": transient, "attempt": attempt, "kind": kind, **({"version": version} if version else {})}
    if kind == DAMAGED_VERSION:
        try:
            stat = _manifest_stat(store, damaged)
        except OSError:  # (gone already, or cannot be looked at: the record counts while any copy is there)
            stat = None
        rec["damaged"] = {"version": damaged, "manifest_stat": stat}
    d = store.root / "inbox"
    d.mkdir(parents=True, exist_ok=True)
    with store.lock("inbox-failed"), open(d / "failed.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    return {**rec, "retry": transient and attempt < TRANSIENT_ATTEMPTS}
