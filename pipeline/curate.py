"""Curate: ingest -> checks -> select -> split -> store, as plain functions (no Prefect here).

The version id is computed first, from the sha256 of every input file, the parent version
id, the policy hash, the ingest options and the code version; if that version exists (and its
files still match its manifest: :func:`existing_version`), nothing is read or written
(idempotent re-runs).  ``flows/`` wraps these steps in Prefect
tasks; the CLI calls :func:`curate` directly or through the flow.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import aggregate as agg
from pipeline import delta
from pipeline import dimensions as dims
from pipeline import incremental as inc
from pipeline import reviews_resolve as rr
from pipeline import select as sel
from pipeline.certify_parts import load_prior_facts, stat_facts
from pipeline.checks import CHECK_MODULES, all_flags, judgment_columns, pair_columns, resolve_policy, run_checks
from pipeline.checks.agreement import ratings
from pipeline.ingest import FileHash, IngestResult, file_hash, ingest_files, quarantine_line
from pipeline.readers import UnreadableFile
from schemas.records import ROUTED_LABELS
from pipeline.split import (PLACEMENT, SPLITS, assign_splits, assignment_changes, assignments, counted, leakage, placement,
                            prior_assignments, split_moves)
from pipeline.incremental import Totals, has_state, run_touched, state_frames
from pipeline.parts import (FINGERPRINTS, GROUPS, OTHER_KEY, PartReuse, TableWriter, appended_key, appended_slices,
                            bucket_counts, generation_groups, grouped_generations, parent_keys, parent_parts, part_keys,
                            parts_to_merge)
from pipeline.store import DamagedVersion, StageMark, Store, StoreError, VersionHandle, VersionNotFound, file_info, verify_files
from schemas.check import CheckResult
from schemas.manifest import IngestLedger, Ledger, Manifest, SourceInfo, SplitInfo, TableInfo
from schemas.policy import Policy

from schemas.version import ROOT, __version__, code_version  # noqa: F401 - re-exported (one code version)


@dataclass
class CurateOptions:
    fmt: str | None = None
    batch_id: str | None = None
    annotator_id: str | None = None
    annotator_kind: str | None = None
    # how a first version is built: None (the default) or True -- over partitions (pipeline/partitioned_build.py,
    # the one path of a first version); False -- the reference build in one process, which holds every judgment in
    # memory (tests and benchmarks compare the two).  A child is built in one process (the field is not used).
    # The two first-version builds are two version ids: the partitioned one records its partitions, and its language
    # check spends its langdetect budget per partition
    partitioned: bool | None = None

    def key(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def settled(self, has_parent: bool) -> CurateOptions:
        """The options as a version's id records them: ``partitioned`` True or False for a first
        version, unset for a child."""
        return dataclasses.replace(self, partitioned=None if has_parent else self.partitioned is not False)


def plan_version_id(source_shas: list[str], parent: str | None, policy: Policy, options: CurateOptions,
                    *, full: bool = False) -> str:
    """``full``: a child recomputed from all its judgments (``curate --full``) is another version
    than the incremental child of the same inputs (docs/incremental.md: the two may differ by rule)."""
    key = {"sources": sorted(source_shas), "parent": parent, "policy": policy.policy_hash(),
           "code": code_version(), "options": options.settled(parent is not None).key()}
    if full and parent is not None:
        key["full"] = True
    key = json.dumps(key, sort_keys=True)
    return "v-" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class CurateResult:
    version_id: str
    created: bool
    store: Store
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def handle(self) -> VersionHandle:
        return self.store.get(self.version_id)


class NoValidJudgments(Exception):
    """The inputs hold no valid judgment (every row quarantined): bad input, refused before a version is written --
    a version of nothing would pass every check.  ``ledger``, ``sources``: the ingest's; ``quarantine``: the first
    :attr:`SHOWN` quarantined rows; ``path``, ``line``, ``field``: the first of them (where the error is);
    ``summary``: the message without the rows (the CLI lists them as ``validate`` does)."""

    SHOWN = 5

    def __init__(self, ledger: IngestLedger, sources: list[SourceInfo], quarantine: pl.DataFrame) -> None:
        self.ledger, self.sources, self.quarantine = ledger, sources, quarantine.head(self.SHOWN)
        first = self.quarantine.row(0, named=True) if self.quarantine.height else {}
        self.path = first.get("source_file", sources[0].path if sources else None)
        self.line, self.field = first.get("line"), first.get("field")
        self.summary = (f"{', '.join(s.path for s in sources)}: no valid judgment to curate (rows in {ledger.rows_in:,} = "
                        f"valid {ledger.rows_valid:,} + quarantined {ledger.quarantined:,} {ledger.quarantined_by_reason}, "
                        f"judgments {ledger.judgments:,}); nothing written -- fix the rows (`prefpipe validate` lists "
                        "every one) and curate again")
        rows = [f"  {quarantine_line(r)}" for r in self.quarantine.iter_rows(named=True)]
        super().__init__("\n".join([self.summary, *(["first quarantined rows:", *rows] if rows else [])]))

    @classmethod
    def check(cls, ledger: IngestLedger, sources: list[SourceInfo], quarantine: Callable[[], pl.DataFrame]) -> None:
        """Raise when the ingest produced no judgment (``quarantine``: reads the quarantined rows, then only)."""
        if ledger.judgments == 0:
            raise cls(ledger, sources, quarantine())


def existing_version(store: Store, version_id: str) -> bool:
    """Whether ``version_id`` is in the store, intact: a re-run's idempotent answer ("already there", nothing
    written) is given for a version whose files match its manifest only.  One that is there but damaged (a file
    changed, missing or truncated; the manifest unreadable, or not the one its certification bound) raises
    :class:`DamagedVersion` naming the file and what to do -- never "already there", never written over.

    The manifest must be one the store published as ``version_id`` (a version published before the store kept
    publication records has nothing to compare with: the CLI says so).  Every file is hashed against the manifest
    (:func:`pipeline.store.verify_files`), except the parts a verified certification hashed that still have the
    inode, size and mtime they had then: certify's own rule for what it takes from an earlier certification
    (pipeline/certify_parts.py), so a certified version costs a ``stat`` per part.  Readers verify again: the trainer hashes every file it reads."""
    if not store.exists(version_id):
        return False
    h = store.get(version_id)
    try:
        problems = _damage(h)
    except DamagedVersion as err:  # (its manifest: unreadable, or not this version's)
        problems = [str(err)]
    if not problems:
        return True
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    err = DamagedVersion(f"version {version_id} is in the store ({h.path}) but damaged: {problems[0]}{more}; nothing written. Remove "
                         f"it (`prefpipe gc --delete {version_id} --apply`) and curate again, which builds it anew")
    err.path = str(h.path)  # (the place a --json failure names)
    raise err


def _damage(h: VersionHandle) -> list[str]:
    """How version ``h`` differs from what the store published (:meth:`pipeline.store.Store.publication`), from its
    manifest and from its latest certification (empty: intact)."""
    m = h.manifest()
    facts, _, rec = load_prior_facts(h.store, [h])
    problems = verify_files(m, h.path, known=stat_facts(facts))
    pub = h.store.publication(h)
    if pub.ok is False:  # (a part edited and the manifest rewritten to match: the files agree with the manifest)
        problems.insert(0, pub.reason)
    if rec is None:  # no facts taken: is there a record of this version that bound another manifest?
        try:
            rec = h.store.latest_certification(h.version_id)
        except StoreError:  # (a damaged record is not a damaged version)
            rec = None
        if rec and rec.get("version_id") == h.version_id and rec.get("manifest_sha256") not in (None, h.manifest_sha256()):
            problems.insert(0, f"{h.path / 'manifest.json'}: not the manifest its certification bound (changed after "
                               "the version was certified)")
    return problems


def check_parent_published(parent: VersionHandle | None) -> None:
    """A child is built on its parent's manifest (its parts are linked, its rows read against it): one rewritten after
    publication would pass its edits on to a child the store then publishes as its own.  Raises
    :class:`DamagedVersion` naming the manifest (a parent from before publication records is taken as it is)."""
    if parent is None:
        return
    pub = parent.store.publication(parent)
    if pub.ok is False:
        err = DamagedVersion(f"parent version {parent.version_id} is damaged: {pub.reason}; nothing written. Build on "
                             "another parent, or remove it (`prefpipe gc --delete "
                             f"{parent.version_id} --apply`) and curate its inputs again")
        err.path = str(parent.path)
        raise err


class _Timer:
    def __init__(self, cb: Callable[[str, float], None] | None):
        self.t: dict[str, float] = {}
        self.cb = cb
        self.last = time.perf_counter()  # when the last lap ended

    def lap(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.t[name] = round(now - t0, 3)
        self.last = now
        if self.cb:
            self.cb(name, now - t0)
        return now

    def stage(self, name: str, seconds: float) -> None:
        """A lap timed elsewhere (``build_first``'s ``on_stage``)."""
        self.last = time.perf_counter()
        if self.cb:
            self.cb(name, seconds)


def curate(
    paths: list[str | Path],
    store: Store,
    policy: Policy,
    *,
    parent: str | None = None,
    options: CurateOptions | None = None,
    on_stage: Callable[[str, float], None] | None = None,
    full: bool = False,
    on_rows: Callable[[int], None] | None = None,
    hashed: dict[str, FileHash] | None = None,
) -> CurateResult:
    """Build (or find) the version for these inputs.  Raises ``UnreadableFile`` before writing,
    :class:`NoValidJudgments` when no input row is a valid judgment (nothing written), and
    :class:`pipeline.store.DamagedVersion` when the version is there but damaged (:func:`existing_version`), or the
    parent's manifest is not the one the store published (:func:`check_parent_published`).

    ``full``: a child recomputes everything from its judgments instead of extending its parent's
    state (still a child: lineage, sticky splits; ``prefpipe curate --full``).  ``on_stage(name,
    seconds)``: after each stage; ``on_rows(n)``: input rows read, per ingest block (progress).  ``paths``: local
    files or URLs (:mod:`pipeline.remote`); ``hashed``: local files already hashed (a copy of a URL the caller made:
    :class:`pipeline.ingest.FileHash` with its ``source``)."""
    from pipeline import remote

    # (under .staging with this process's id: `prefpipe gc` leaves it while this process lives)
    staged = remote.Staged(store.root / ".staging" / f"inputs.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        return _curate(paths, store, policy, parent, options, on_stage, full, on_rows, staged, hashed or {})
    except UnreadableFile as err:  # a URL input's local copy: named by its URL
        named = staged.named(err)
        if named is err:
            raise
        raise named from err
    finally:
        staged.remove()


def _curate(paths: list[str | Path], store: Store, policy: Policy, parent: str | None, options: CurateOptions | None,
            on_stage: Callable[[str, float], None] | None, full: bool, on_rows: Callable[[int], None] | None,
            staged: Any, given: dict[str, FileHash]) -> CurateResult:
    options = options or CurateOptions()
    policy = resolve_policy(policy)  # parsed once by the caller, resolved once here; recorded as resolved
    timer = _Timer(on_stage)
    t = time.perf_counter()
    paths, hashed = staged.inputs(paths)  # URLs copied into the store, hashed on the way (pipeline/remote.py)
    hashed = {**given, **hashed}  # (files the caller copied and hashed: the curate flow's URL inputs)
    parent_handle = store.resolve(parent) if parent else None
    if parent_handle is None:
        return _curate_on(paths, store, policy, None, options, timer, full, on_rows, hashed, t)
    with store.in_use(parent_handle.version_id):  # `prefpipe gc` leaves the parent while the child reads and links it
        if not store.exists(parent_handle.version_id):  # (removed between its lookup and the hold)
            raise VersionNotFound(f"parent version {parent_handle.version_id} was removed (`prefpipe gc`) before the "
                                  "build could use it; nothing written")
        return _curate_on(paths, store, policy, parent_handle, options, timer, full, on_rows, hashed, t)


def _curate_on(paths: list[Path], store: Store, policy: Policy, parent_handle: VersionHandle | None,
               options: CurateOptions, timer: _Timer, full: bool, on_rows: Callable[[int], None] | None,
               hashed: dict[str, FileHash], t: float) -> CurateResult:
    """:func:`_curate` once the inputs are local and the parent (if any) is held."""
    check_parent_published(parent_handle)
    parent_id = parent_handle.version_id if parent_handle else None
    # a first version over partitions (unless the one-process reference is asked for); a child: in one process
    options = options.settled(parent_handle is not None)
    if options.partitioned:  # a first version built over partitions (pipeline/partitioned_build.py)
        return _partitioned_first(paths, store, policy, options, timer, on_rows, hashed, t)
    hashed.update({str(p): file_hash(p) for p in paths if str(p) not in hashed})  # (ingest takes them: hashed once)
    version_id = plan_version_id([hashed[str(p)].sha256 for p in paths], parent_id, policy, options, full=full)
    t = timer.lap("hash_inputs", t)
    if existing_version(store, version_id):
        return CurateResult(version_id, False, store, timer.t)

    # the parent's near-duplicate state: read on a thread of its own while the batch is ingested (one core parses
    # the batch, the other reads the state)
    early = _Handover(_early_state(parent_handle, policy) if not full else None)
    ingest = ingest_source(paths, options, policy, on_rows=on_rows, hashed=hashed)
    t = timer.lap("ingest", t)
    return build_version(store, version_id, ingest, parent_handle, policy, timer, full=full, near_state=early)


# input bytes from which a first version's inputs are hashed while they are partitioned (below, first: ~0.2 s of
# hashing, and a re-run of an existing version then writes nothing at all -- above, a re-run stages partitions until
# the hashes are in, then removes them)
OVERLAP_HASH_FROM = 256 << 20


def _damaged_set(directory: Path) -> bool:
    """Whether an earlier run's partition set cannot be reused: its ``partitions.json`` unreadable, or a
    partition file missing or changed (:meth:`pipeline.partition.PartitionSet.changed`)."""
    from pipeline.partition import PartitionSet

    try:
        return bool(PartitionSet.load(directory).changed())
    except (OSError, ValueError, KeyError, TypeError):
        return True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # (the ingest says what is wrong with it)
        return 0


class _Planned(Exception):
    """The inputs' hashes are in and name a version that exists, or partitions left by an earlier run of it: the
    partitioning stops (what it staged is removed)."""


def _partitioned_first(paths: list[Path], store: Store, policy: Policy, options: CurateOptions, timer: _Timer,
                       on_rows: Callable[[int], None] | None, hashed: dict[str, FileHash], t: float) -> CurateResult:
    """A first version built over partitions, in this process or on the Dask cluster ``PREFPIPE_DASK``
    names (every input: a registry, reviews, dimension verdicts, ``train_on``).  Its partitions and task states live
    under ``<store>/.work/<version_id>/`` while it runs (on the store's filesystem: a cluster's
    workers read them there); a failed run leaves them, so a retry computes only what is missing (the task
    states go once the pair tables are written: a failure after that keeps the partitions, not the checks).

    Inputs of :data:`OVERLAP_HASH_FROM` bytes or more are hashed on a thread of their own while they are
    partitioned (the version id is their hashes'; at 10M judgments the hash alone took 8-13 s before the
    partitioning began): into a staging directory of this process, moved to ``.work/<version_id>/`` under the
    version's lock once the id is known.  As soon as the hashes are in, an existing version (a re-run) or an earlier
    run's complete partitions stop the partitioning."""
    import shutil

    from pipeline import memory
    from pipeline.distributed import open_runner
    from pipeline.partition import LEDGER, PartitionSet, partition_files
    from pipeline.partitioned_build import build_first

    work_root = store.ensure().root / ".work"
    todo = [p for p in paths if str(p) not in hashed]
    if sum(_size(p) for p in todo) < OVERLAP_HASH_FROM:  # (hashed first: a re-run writes nothing at all)
        hashed.update({str(p): file_hash(p) for p in todo})
        todo = []
    pool = ThreadPoolExecutor(1, thread_name_prefix="prefpipe-hash")
    pending = {str(p): pool.submit(file_hash, p) for p in todo}  # (one file after another, on one thread)
    pool.shutdown(wait=False)
    planned: list[str] = []

    def plan() -> str:
        if not planned:
            for key, fut in pending.items():
                hashed[key] = fut.result()
            planned.append(plan_version_id([hashed[str(p)].sha256 for p in paths], None, policy, options))
        return planned[0]

    def known(vid: str) -> bool:
        return store.exists(vid) or (work_root / vid / "set" / LEDGER).is_file()

    if not pending:  # (every input hashed already: a URL's copy)
        t = timer.lap("hash_inputs", t)
        if existing_version(store, plan()):
            return CurateResult(plan(), False, store, timer.t)
    else:
        t = timer.lap("hash_inputs", t)  # (the hash runs on; its time is in the ingest's)

    def progress(rows: int) -> None:
        if on_rows is not None:
            on_rows(rows)
        if not planned and all(f.done() for f in pending.values()) and known(plan()):
            raise _Planned

    memory.bound_heap()  # (freed blocks go back to the system as each task ends: pipeline/memory.py)
    # (under .staging with this process's id: `prefpipe gc` leaves it while this process lives)
    staging = store.root / ".staging" / f"partitions.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    mark = StageMark(staging)
    staging.mkdir(parents=True)
    try:
        def partition(directory: Path) -> PartitionSet:
            return partition_files(paths, directory, partition_rows=policy.ingest.partition_rows, fmt=options.fmt,
                                   batch_id=options.batch_id, annotator_id=options.annotator_id,
                                   annotator_kind=options.annotator_kind, batch_rows=policy.ingest.batch_rows,
                                   limits=policy.ingest, dimensions=policy.dimensions, on_progress=progress,
                                   hashed={**hashed, **pending})

        try:
            partition(staging / "set")
        except _Planned:
            pass
        version_id = plan()
        # the JSON reader's Arrow pages, kept 5 s for the next block (flows/__init__.py), given back now: kept into the
        # near-duplicate index they raised the 1M build's peak to 1.25-1.61 GB over 22 runs, several above goal 1's 1.5 GB
        # (1.26-1.29 GB with this, ~3 % slower: docs/scale-out.md "Session 43")
        memory.release(arrow=True)
        t = timer.lap("ingest", t)
        if existing_version(store, version_id):
            return CurateResult(version_id, False, store, timer.t)
        work = work_root / version_id

        def build(stage: Path) -> Manifest:
            target = work / "set"
            if (target / LEDGER).is_file() and _damaged_set(target):  # an earlier run's, changed since: its tasks
                shutil.rmtree(target)  # would fail at every retry; the same inputs partition into the same bytes
            if not (target / LEDGER).is_file():  # (under the version's lock: moved in, or partitioned again)
                work.mkdir(parents=True, exist_ok=True)
                if (staging / "set" / LEDGER).is_file():
                    os.rename(staging / "set", target)
                else:  # (stopped for an earlier run's partitions, removed since)
                    partition(target)
            pset = PartitionSet.load(target)
            try:
                NoValidJudgments.check(pset.ledger, pset.sources, pset.read_quarantine)
            except NoValidJudgments:  # bad input: no partition of it is kept for a retry
                shutil.rmtree(work, ignore_errors=True)
                raise
            with open_runner() as client:
                manifest = build_first(store, stage, version_id, pset, policy, work=work, client=client,
                                       on_stage=timer.stage, timings=timer.t)
            # the version is staged whole: its partitions and task states are removed before the store syncs it --
            # the sync (syncfs) then has none of their pages still to write (should the publish fail, a retry
            # computes everything again)
            shutil.rmtree(work, ignore_errors=True)
            timer.lap("work_cleanup", timer.last)  # (the manifest's own laps: it is written after this)
            return manifest

        vid, created = store.write_version(version_id, build)
        timer.lap("publish", timer.last)  # (in the result's timings, not the version's: its manifest is written)
        shutil.rmtree(work, ignore_errors=True)  # (no build here -- the version was there -- so what is left is garbage)
        return CurateResult(vid, created, store, timer.t)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        mark.release()


class _Handover:
    """A value passed down through frames that keep their arguments: the one who takes it holds
    the only reference (the near-duplicate state's read, ~0.3 GB at 3M judgments, is released by
    the check that used it, not kept by the callers' frames to the end of the build)."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def take(self) -> Any:
        value, self._value = self._value, None
        return value


def _early_state(parent: VersionHandle | None, policy: Policy) -> Future[Any] | None:
    """The parent's near-duplicate state (every prompt's bands and sketches, ~0.7 s at 3M judgments)
    depends on the parent only: its read starts at once, on a thread of its own (its result, or
    its error, is taken by the check; unused when the child recomputes everything)."""
    if parent is None:
        return None
    pool = ThreadPoolExecutor(1, thread_name_prefix="prefpipe-state")
    try:
        return pool.submit(inc.nds.load_state, parent, policy.checks)
    finally:
        pool.shutdown(wait=False)  # (the read runs on; the pool takes no more work)


def ingest_source(paths: list[Path], options: CurateOptions, policy: Policy,
                  on_rows: Callable[[int], None] | None = None, hashed: dict[str, FileHash] | None = None) -> IngestResult:
    """Ingest one or more files with the curate options (a flow maps this over files; ``hashed``: inputs hashed
    already, :func:`pipeline.ingest.ingest_files`)."""
    return ingest_files(paths, fmt=options.fmt, batch_id=options.batch_id, annotator_id=options.annotator_id,
                        annotator_kind=options.annotator_kind, batch_rows=policy.ingest.batch_rows,
                        limits=policy.ingest, dimensions=policy.dimensions, on_progress=on_rows, hashed=hashed)


def build_version(store: Store, version_id: str, ingest: IngestResult, parent: VersionHandle | None,
                  policy: Policy, timer: _Timer | None = None, *, full: bool = False,
                  near_state: _Handover | None = None) -> CurateResult:
    """Checks -> select -> split -> write, atomically, unless the version exists; :class:`NoValidJudgments`
    when the ingest holds no judgment (nothing written).

    Takes the rows out of ``ingest`` (:meth:`IngestResult.take_judgments`): the wide
    judgments frame is written first and released after the checks.  ``near_state``: the
    parent's near-duplicate state being read (:func:`_early_state`, handed over; None: read from here)."""
    timer = timer or _Timer(None)
    policy = resolve_policy(policy)
    NoValidJudgments.check(ingest.ledger, ingest.sources, lambda: ingest.quarantine)  # (before the store is touched)
    check_parent_published(parent)

    # a child's passes over its parent's parts (pipeline/parent_rows.py): their states under <store>/.work/<version_id>/,
    # their tasks in this process or on the Dask cluster PREFPIPE_DASK names
    work = store.ensure().root / ".work" / version_id

    def build(stage: Path) -> Manifest:
        if parent is None:
            return _build_version(store, stage, version_id, ingest, parent, policy, timer, full, near_state)
        from pipeline.distributed import open_runner

        with open_runner() as client:
            return _build_version(store, stage, version_id, ingest, parent, policy, timer, full, near_state, work=work,
                                  client=client)

    vid, created = store.write_version(version_id, build)
    if parent is not None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return CurateResult(vid, created, store, timer.t)


# valid judgments removed before the checks see them (counted in judgments_valid and
# judgments_dropped, absent from judgments.parquet); a child carries its parent's counts
PRE_CHECK_DROPS = ("duplicate_comparison_id", "already_in_parent")
# the order of the flags in a part: every column (equal rows are equal bytes)
FLAG_ORDER = ("subject_kind", "subject_id", "check", "reason", "detail", "severity")


def _union_with_parent(new: pl.DataFrame, parent: VersionHandle | None, *, narrow: bool = False,
                       defer: tuple[str, ...] = ()) -> tuple[pl.DataFrame, int, pl.DataFrame | None, pl.DataFrame | None]:
    """Parent judgments first, then the new batch; judgments whose comparison_id is already
    known (a batch delivered twice) are not added again.  Returns (union, repeated count, the
    batch's rows, the parent's rows near the batch).  ``narrow``: the union without
    :data:`pipeline.incremental.NARROW_DROP` (the parent's texts are not decoded); the batch's rows
    keep every column, and so do the parent's rows of the batch's pairs and prompts
    (:func:`pipeline.incremental.read_parent_narrow`); ``defer``: columns left out of every row too
    (:class:`pipeline.incremental.Completer`)."""
    if parent is None:
        return new, 0, None, None
    near = None
    if narrow:
        old, near = inc.read_parent_narrow(parent, new.columns, new, defer)
    else:
        old = inc.parent_judgments(parent, None, new.columns)
    # the parent's ids the batch repeats: a scan of its ids against the batch's (a join would hash every id)
    known = old.select("comparison_id").filter(pl.col("comparison_id").is_in(new["comparison_id"].unique().implode()))
    # always through the join, also with nothing to drop: it gives the batch's rows one chunk per column.
    # The ingest frame has several; concatenated as they were, the 3M child's later stages took 1.1 GB
    # more and 30 % longer (measured at e407e33)
    fresh = new.join(known, on="comparison_id", how="anti", maintain_order="left")
    union = pl.concat([old, fresh.select(old.columns) if narrow else fresh], how="vertical_relaxed")
    return union, new.height - fresh.height, fresh, near


def _near_union(parent: VersionHandle | None, new: pl.DataFrame, policy: Policy, *, narrow: bool, defer: tuple[str, ...],
                full: bool, same_policy: bool, work: Path | None, client: Any
                ) -> tuple[Any, pl.DataFrame, int, pl.DataFrame, pl.DataFrame] | None:
    """A child's union of the parent's rows its stages read (:class:`pipeline.parent_rows.ParentUnion`) and its
    batch: (the loader, the union so far, the batch's rows the parent has, the batch's other rows, the parent's rows of
    the batch's pairs and prompts with every column) -- or None where some stage reads every parent row: a registry
    (the check reads every judgment), dimension verdicts (the dimensions check), a check whose sums are counted again
    (more judgments than ``refit_growth`` allows over its parameters' fit), a check that reads judgment columns it
    does not declare, a parent without the state a child under the rule merges with (then the union holds every
    parent row, :func:`_union_with_parent`)."""
    from pipeline.report import LABEL_COUNTS

    if parent is None or work is None or not narrow or not defer or full or not same_policy \
            or policy.annotators is not None or dims.has_dimensions(new) or not delta.applies(parent) \
            or parent.table("pairs") is None or not has_state(parent) or not inc.preliminary_applies(parent) \
            or not inc.has_sums(parent) or not parent.has(LABEL_COUNTS):
        return None
    # the checks run over the union (not merged from state, sums or counts) read no judgment row but the dimension
    # verdicts, which no row has (below); a check that reads any column, or others, reads every parent row
    merged = {*inc.PAIR_SCOPED, "near_duplicates", *inc.declared_sums(), "reviews", "routing", "registry"}
    reading = judgment_columns(skip=merged)
    if reading is None or set(reading) - {"dimensions", "label_derived"}:
        return None
    table = parent.table("judgments")
    n_parent = table.rows if table is not None else 0
    fitted_on = inc.params_fitted_on(parent)
    if any(spec.params and n_parent + new.height > (1 + policy.checks.refit_growth) * fitted_on.get(name, 0)
           for name, spec in inc.declared_sums().items()):
        return None
    from pipeline import parent_rows as pr

    columns = [c for c in new.columns if c not in inc.NARROW_DROP and c not in defer]
    pu = pr.ParentUnion(parent, new, columns, work, client)
    if pu.dimension_verdicts or pu.n_parent != n_parent:
        return None
    # the batch without the rows its parent has: always through the join (one chunk per column, _union_with_parent)
    fresh = new.join(pu.repeated.unique().to_frame("comparison_id"), on="comparison_id", how="anti", maintain_order="left")
    union, _ = pu.union(fresh)
    return pu, union, new.height - fresh.height, fresh, pu.wide(new, new.columns)


def _closed(pu: Any, judgments: pl.DataFrame, n_local: int, complete: Callable[[pl.DataFrame], pl.DataFrame]
            ) -> tuple[pl.DataFrame, int]:
    """``judgments`` (the parent's rows ``pu`` loaded, then the batch's) with every parent row of the touched pairs'
    closure (:func:`pipeline.incremental.touched_pairs`) and of their prompts: loaded until a closure over them
    asks for no other -- then it is the closure over every row."""
    while True:
        pairs = inc.touched_pairs(judgments, n_local, complete)
        prompts = judgments.filter(pl.col("pair_id").is_in(pairs.implode()))["prompt_hash"]
        if not pu.load(pairs=pairs, prompts=prompts):
            return judgments, n_local
        judgments, n_local = pu.union(judgments.slice(n_local))


def _more(pu: Any, judgments: pl.DataFrame, n_local: int) -> Callable[[pl.Series], tuple[pl.DataFrame, int]]:
    """For the checks' sums: the union with every row of the pairs ``annotators`` judged (loaded)."""
    tail = judgments.slice(n_local)

    def more(annotators: pl.Series) -> tuple[pl.DataFrame, int]:
        pu.load(annotators=annotators)
        pu.load(pairs=pu.rows.filter(pl.col("annotator_id").is_in(annotators.implode()))["pair_id"])
        return pu.union(tail)

    return more


def _quarantine_with_parent(new: pl.DataFrame, parent: VersionHandle | None) -> pl.DataFrame:
    """A version's quarantine holds every quarantined row its ledger counts: the parent's, then the new ones."""
    if parent is None:
        return new
    return pl.concat([parent.read("quarantine.parquet"), new], how="vertical_relaxed")


def _build_version(store: Store, stage: Path, version_id: str, ingest: IngestResult, parent: VersionHandle | None,
                   policy: Policy, timer: _Timer, full: bool = False, early: _Handover | None = None, *,
                   work: Path | None = None, client: Any = None) -> Manifest:
    t = time.perf_counter()
    created_at = datetime.now(UTC)
    same_policy = parent is not None and parent.manifest().policy_hash == policy.policy_hash()
    near_state = early.take() if early is not None else None
    if near_state is None and not full:  # (curate starts it before the batch is ingested)
        near_state = _early_state(parent, policy)
    # a child under the rule reads its parent's judgments without their texts: only its touched pairs' have them
    narrow = parent is not None and not full and same_policy and not policy.dimensions.train_on and inc.narrow_applies(parent)
    # ... and without the columns only the stages that aggregate or select some pairs read (taken for those rows)
    defer = inc.DEFERRED if narrow and inc.defers(parent) else ()  # type: ignore[arg-type]
    new = ingest.take_judgments()
    # a child under the rule whose stages all read some parent rows only: those rows (of the batch's pairs and prompts,
    # the reviews, and what the touched pairs' closure and the checks' sums ask for), not every parent row
    # (pipeline/parent_rows.py); ``n_local``: the parent's rows in ``judgments`` (all of them: ``n_parent_judgments``)
    near_union = _near_union(parent, new, policy, narrow=narrow, defer=defer, full=full, same_policy=same_policy,
                             work=work, client=client)
    if near_union is not None:
        pu, judgments, repeated, batch, near = near_union
        n_parent_judgments, n_local = pu.n_parent, pu.rows.height
    else:
        pu = None
        judgments, repeated, batch, near = _union_with_parent(new, parent, narrow=narrow, defer=defer)
        n_parent_judgments = judgments.height - (ingest.ledger.judgments - repeated) if parent else 0
        n_local = n_parent_judgments
    del new, near_union
    complete: Callable[[pl.DataFrame], pl.DataFrame] = lambda rows: rows  # noqa: E731 - every column held
    quarantine = _quarantine_with_parent(ingest.quarantine, parent)
    # a comparison_id used twice inside the input: keep the first, count the rest.  Only the new rows
    # can repeat one: the parent's ids are unique (this filter ran before its judgments were written)
    # and a new row with a parent's id is not in the union (already_in_parent)
    tail = judgments.slice(n_local)
    dup_ids = tail.select(pl.col("comparison_id").is_duplicated() & ~pl.col("comparison_id").is_first_distinct()).to_series()
    n_dup_ids = int(dup_ids.sum())
    if n_dup_ids:  # a filter copies every column: only when there is something to remove
        judgments = pl.concat([judgments.slice(0, n_local), tail.filter(~dup_ids)])
        batch = batch.filter(~dup_ids) if batch is not None else None
    del tail
    if defer:  # (the batch's rows as the union has them: after the repeated ids are left out)
        assert batch is not None and parent is not None
        complete = inc.Completer(parent, batch, [c for c in batch.columns if c in judgments.columns or c in defer], near)
    # a new review whose texts differ from its pair's is never merged into it (the parent's rows are as stored); as
    # in a first version, the repeated ids are gone first
    judgments = inc.aligned(rr.attach(judgments, from_row=n_local, complete=complete if defer else None))
    if narrow:
        assert batch is not None and parent is not None
        batch = batch.with_columns(pair_id=judgments.slice(n_local)["pair_id"])
    else:
        batch = None
    parent_drops = parent.manifest().ledger.judgments_dropped if parent else {}
    pre_check = {"duplicate_comparison_id": parent_drops.get("duplicate_comparison_id", 0) + n_dup_ids,
                 "already_in_parent": parent_drops.get("already_in_parent", 0) + repeated}
    pre_check = {k: v for k, v in pre_check.items() if v}

    n_judgments = judgments.height - n_local + n_parent_judgments  # (the union's)
    extra: dict[str, dict[str, Any]] = {"registry": {"registry": policy.annotators}}  # None: the check does nothing
    review_ctx = _review_context(store, parent, policy)
    extra["reviews"] = {"reviews": review_ctx}
    # judgments.parquet is written on a second thread while the checks run (Polars releases
    # the GIL while it encodes); leaving the block waits for it, also on an error
    tables: dict[str, TableInfo] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="prefpipe-write") as pool:
        # (in parts of at most a partition's rows: a child reads its parent's one part at a time)
        cap = policy.ingest.partition_rows
        written = pool.submit(_appended_table, store, stage, "judgments", parent, judgments, n_parent_judgments, version_id,
                              fresh=batch, cap=cap)
        # ... and the columns a child reads of every row, in parts of the same rows (pipeline/incremental.py); a
        # parent written before it has none: every row is written (the union has these columns of every row)
        has_rows = parent is not None and parent.table(inc.JUDGMENT_ROWS) is not None
        written_rows = pool.submit(_appended_table, store, stage, inc.JUDGMENT_ROWS, parent, inc.judgment_rows(judgments),
                                   n_parent_judgments, version_id,
                                   fresh=inc.judgment_rows(batch) if batch is not None and has_rows else None, cap=cap)
        # train_on: the version is built on one dimension's verdicts (judgments.parquet keeps them as given)
        judgments, no_verdict = dims.for_training(judgments, policy.dimensions)
        # the union starts with the parent's judgments as they are (train_on may drop some: then everything is rerun)
        # --full: the parent's state is not used (everything recomputed from the union)
        intact = parent is not None and not full and not no_verdict and parent_judgments_intact(parent, n_parent_judgments)
        # the touched pairs' rows with their texts (the union has none when narrow)
        if pu is not None:  # the rows of the touched pairs' closure (pairs, prompts) loaded, until it is closed
            judgments, n_local = _closed(pu, judgments, n_local, complete)
        hydrated = inc.hydrate(judgments, n_local, parent, batch, near, complete if defer else None) \
            if batch is not None and near is not None and parent is not None else None
        del near
        wide, n_wide_parent = (hydrated.rows, hydrated.n_parent_rows) if hydrated is not None else (judgments, n_parent_judgments)
        # what the child read of its parent's judgments: every column, or the texts of the touched pairs' rows only
        union_rule = {"texts": "touched pairs", "parent_rows_with_texts": n_wide_parent,
                      "touched_pairs": hydrated.pairs.len(), "read_again": hydrated.read_again} \
            if hydrated is not None else {"texts": "all"}
        if pu is not None:  # (the parent's rows it held: those its stages read, not every one)
            union_rule.update(rows="near the batch", parent_rows_held=n_local, parent_row_passes=pu.passes)
        t = timer.lap("union_inputs", t)
        parent_flags = parent.read("flags.parquet") if intact else None
        # near duplicates through the state tables (a child hashes and bands only its new prompts): first, before
        # the preliminary state is read, so that their memory peaks do not add up (the step reads the batch's
        # rows only; without a usable parent state it runs over every judgment, below)
        near_dup_run = inc.near_duplicates(wide, parent, policy.checks, version_id=version_id, parent_flags=parent_flags,
                                           n_parent_rows=n_wide_parent, state=near_state) if intact else None
        near_state = None
        if near_dup_run is not None:
            t = timer.lap("check:near_duplicates", t)
        texts_source: inc.TextsSource | None = None
        # the rule (docs/incremental.md): the batch's pairs aggregated with the parent's parameters fixed
        # (of the parent's rows of every pair, the columns the checks and the review resolution read)
        check_columns = pair_columns()
        ruled = inc.preliminary(wide, n_wide_parent, parent, policy.checks.aggregation, policy.dimensions, version_id,
                                None if check_columns is None else (*check_columns, *rr.RESOLVE_COLUMNS)) \
            if intact and same_policy and parent is not None and inc.preliminary_applies(parent) else None
        if hydrated is not None and ruled is None:  # the parent's state lacks a column: recomputed from every text
            assert parent is not None and batch is not None
            judgments = pl.concat([inc.parent_judgments(parent, None, batch.columns).cast(batch.schema), batch])  # type: ignore[arg-type]
            hydrated, wide, n_wide_parent = None, judgments, n_parent_judgments
            pu, n_local = None, n_parent_judgments
            union_rule = {"texts": "all", "why": "the parent's preliminary state lacks a column"}
        under_rule, prelim_changed = ruled is not None, None
        if ruled is not None:
            prelim, prelim_rows, pair_order, prelim_touched = ruled.aggregation, ruled.rows, ruled.order, ruled.touched
            prelim_rule, prelim_changed = ruled.figures, ruled.changed
            del ruled  # it would keep every preliminary row alive after they are narrowed (below): ~0.4 GB at 3M
            prelim_rule = {"mode": "incremental", **prelim_rule}
            if hydrated is not None:  # the touched pairs' texts; any other pair's read from the parent when asked for
                texts_of = texts_source = inc.TextsSource(hydrated, parent)
            else:
                # every pair's texts, copied now: holding the wide union until the final aggregation instead, to
                # take the texts of the pairs it needs only, raised the 3M child's peak by 1 GB (measured)
                every = inc.first_texts(judgments)
        else:
            prelim = agg.aggregate(judgments, policy.checks.aggregation, dimensions=policy.dimensions,
                                   rated=ratings(judgments))  # (a re-delivered copy is no second vote)
            every, pair_order, prelim_touched = prelim.texts(), prelim.pairs["pair_id"], None
            # every pair of the union gets the version where it was first seen (the parent's record of it)
            known = inc.parent_first_versions(parent) if parent is not None else None
            prelim_rows = inc.preliminary_rows(prelim, first_versions(parent, pair_order, version_id, known)["first_version"])
            prelim_rule = {"mode": "full" if parent is not None and full else "recomputed"}

        if hydrated is None:
            def texts_of(pairs: pl.Series | None) -> pl.DataFrame:
                return every if pairs is None else every.filter(pl.col("pair_id").is_in(pairs.implode()))
        assert prelim.params is not None
        prelim_params = prelim.params.sort("annotator_id")  # what a child's preliminary consensus starts from
        reviews = rr.classify(judgments, review_ctx, complete=complete)
        extra["reviews"]["classified"] = reviews  # (the check reads no judgment column then)
        prelim = rr.resolve(prelim, reviews, review_ctx)  # reviews decide routed pairs (pipeline/reviews_resolve.py)
        t = timer.lap("aggregate_preliminary", t)
        given: dict[str, CheckResult] = {}
        # the pairs' lengths (length bias); the aggregation's accuracies, fitted over every judgment unless under
        # the rule (then they are the parent's: reliability fits them again unless its state is merged, below)
        lengths = inc.pair_lengths(prelim_rows)
        for name in ("length_bias", "dimensions"):
            extra.setdefault(name, {})["lengths"] = lengths
        accuracies = {"ds_accuracy": prelim_params.select("annotator_id", "ds_accuracy")}
        if not under_rule:
            extra.setdefault("reliability", {}).update(accuracies)
        sums_rule = None
        if under_rule and parent is not None and prelim_touched is not None and inc.has_sums(parent):
            # the checks with mergeable state count only the batch's pairs (pipeline/checks/spec.py: Sums)
            merged = inc.merged_sums(judgments, n_local, parent, prelim_touched, policy.checks, complete,
                                     {"reliability": accuracies, "length_bias": {"lengths": lengths}},
                                     n_judgments=judgments.height - n_local + n_parent_judgments,
                                     more=_more(pu, judgments, n_local) if pu is not None else None)
            for name, ins in merged.items():
                extra.setdefault(name, {}).update(ins)
            sums_rule = {"mode": "incremental", "checks": sorted(merged), "pairs_counted": prelim_touched.len(),
                         "counted_again": sorted(set(inc.declared_sums()) - set(merged))}
            t = timer.lap("checks:sums", t)
        touched = None  # the pairs whose pair-scoped state rows changed (None: not known, all written)
        partial: set[str] = set()  # checks whose state table holds the touched pairs' rows only
        if intact and has_state(parent):
            # pair-scoped checks over the touched pairs only, merged with the parent's (pipeline/incremental.py)
            given, touched, partial = run_touched(judgments, n_local, parent, policy.checks,
                                         Totals(judgments=judgments.height - n_local + n_parent_judgments, pairs=prelim.pairs.height),
                                         parent_flags=parent_flags, hydrated=hydrated,
                                         first=prelim_rows.select("pair_id", "first_version"))
            t = timer.lap("checks:touched_pairs", t)
        if near_dup_run is None:
            near_dup_run = inc.near_duplicates(wide, parent, policy.checks, version_id=version_id, parent_flags=parent_flags,
                                               n_parent_rows=None)
            t = timer.lap("check:near_duplicates", t)
        given["near_duplicates"], near_dup = near_dup_run
        del wide, hydrated, near_dup_run
        # the generation (version where it was first seen) of every pair of the union
        first = prelim_rows.select("pair_id", "first_version")
        # the preliminary rows a child under the rule writes are its changed ones (the others are its parent's, read
        # again if every row is written after all); of its pairs the checks left read the columns they declare: the
        # other rows and columns are released before the checks run
        prelim_partial = prelim_changed is not None
        if prelim_changed is not None:
            prelim_rows = prelim_changed
        # a check that counts every judgment itself and may read a deferred column (one without mergeable sums, or
        # whose sums are counted again; the dimensions check with dimension verdicts): every row completed first
        from pipeline.report import LABEL_COUNTS, label_counts

        # the report's label distribution: a child adds its batch's counts to its parent's (the routing check's
        # judgments per label: the union's, a child's union lacks the labels of its parent's rows)
        base_counts = parent.read(LABEL_COUNTS) if intact and same_policy and parent is not None \
            and parent.has(LABEL_COUNTS) else None
        counts = label_counts(complete(judgments) if base_counts is None
                              else batch if defer else judgments.slice(n_local), base_counts)
        if defer:
            labels = counts.group_by("label").agg(pl.col("n").sum())
            extra.setdefault("routing", {})["label_counts"] = dict(labels.iter_rows())
        # the checks given what they read (the registry check reads nothing without a registry)
        skip = {*given, *(sums_rule["checks"] if sums_rule is not None else ()), "reviews",
                *(("routing",) if defer else ()), *(("registry",) if policy.annotators is None else ())}
        reading = judgment_columns(skip=skip)
        if reading is None or set(reading) & set(inc.DEFERRED) or dims.has_dimensions(judgments):
            judgments = complete(judgments)
        if pu is not None:  # (the union's count: the checks read no other row of it -- _near_union's conditions)
            from pipeline.checks import registry

            given["registry"] = registry.result(None, judgments.height - n_local + n_parent_judgments)
        results = run_checks(judgments, policy.checks, pairs=prelim.pairs, extra_kwargs=extra, given=given,
                             on_check=lambda n, s: timer.t.__setitem__(f"check:{n}", round(s, 3)))
        t = time.perf_counter()
        tables["judgments"] = written.result()
        tables[inc.JUDGMENT_ROWS] = written_rows.result()
        files: dict[str, SplitInfo] = {}
        t = timer.lap("write_judgments (wait)", t)
    flags = all_flags(results)
    n_union = judgments.height - n_local + n_parent_judgments  # (train_on: the judgments with its verdict)
    # the rule of a child (docs/incremental.md): pairs whose judgments, judgment flags and annotators'
    # status are unchanged keep their parent's consensus; same policy only (else everything is recomputed)
    recompute = None
    ruled_child = parent_flags is not None and parent.table("pairs") is not None and same_policy
    # a child under the rule that selects its dirty pairs only lets go of its union here: its drops, changed pairs and
    # flagged judgments' pairs come from a pass over its parent's parts, select's rows of the pairs it reads from
    # those parts (pipeline/parent_rows.py)
    parted: Any = None  # (pipeline.parent_rows.PartedSelection)
    parted_rows: Callable[[pl.Series | None], pl.DataFrame] | None = None
    if ruled_child and defer and delta.applies(parent) and work is not None:
        from pipeline import parent_rows as pr

        assert parent is not None and parent_flags is not None
        tail, like = judgments.slice(n_local), complete(judgments.clear())
        del judgments
        found = pr.scan(parent, tail, n_parent_judgments, flags, pr.changed_subjects(parent_flags, flags),
                        policy.select, work, client)
        flagged_pairs = found.flagged.sort(pr.ROW).select(subject_id="comparison_id", _jp="pair_id") \
            .unique("subject_id", keep="first", maintain_order=True)
        jsel = pr.PartedSelection(parent, complete(tail), n_parent_judgments, found, dict(like.schema),
                                  [c for c in like.columns if c not in sel.SELECTION_DROP], policy.select, flags, work,
                                  client)
        recompute = pl.concat([tail["pair_id"], found.hit]).unique().sort()
        # what the final aggregation reads first, in one pass: the recomputed pairs' rows, and which pairs with a
        # dropped judgment have none kept
        jsel.prefetch(recompute, found.dropped["pair_id"])
        parted, parted_rows = jsel, jsel.rows_of
        judgments = None  # (read again by pair: below)
        del tail, like, found
        t = timer.lap("parent_scan", t)
    else:
        assert pu is None  # (every parent row is in the union)
        # the pair of each flagged judgment: its flags are kept in that pair's part (below)
        jids = flags.filter(pl.col("subject_kind") == "judgment")["subject_id"]
        flagged_pairs = judgments.filter(pl.col("comparison_id").is_in(jids.implode())).select(
            subject_id="comparison_id", _jp="pair_id").unique("subject_id", keep="first", maintain_order=True)
        del jids

        jsel = sel.filter_judgments(judgments, flags, policy.select, complete=complete)
        if ruled_child:
            recompute = inc.pairs_to_recompute(judgments, n_parent_judgments, parent_flags, flags)
        # from here on only these columns are read (split leakage, the report's clusters): release the wide frame
        judgments = judgments.select("pair_id", "prompt_hash")
    clusters = results["near_duplicates"].tables.get("clusters")
    # a child whose parent leaked nothing counts leakage over its dirty pairs (below)
    dirty_leakage = clusters is not None and _no_leaks(parent)
    all_pair_ids, n_pairs = pair_order, prelim.pairs.height  # first-seen order (prelim.pairs: any order)
    kept_reviews = reviews.filter(~pl.col("comparison_id").is_in(jsel.dropped_ids().implode()))

    def planner(rows: pl.DataFrame, kept_pairs: pl.Series, no_kept: pl.Series) -> delta.Plan:
        assert recompute is not None
        return delta.plan(rows.select(delta.PLAN_COLUMNS), kept_pairs, recompute, flags, clusters, no_kept,
                          moved=near_dup.clusters if str(near_dup.stats.get("origin")).startswith("state of ") else None,
                          fresh=first.filter(pl.col("first_version") == version_id)["pair_id"])

    if prelim_partial:  # of its pairs the final aggregation reads the ids and a_hash
        prelim = agg.Aggregation(prelim.pairs.select("pair_id"), prelim.annotators, prelim.a_hash, prelim.params)
    # select, split and write over the dirty pairs only when the parent keeps its pair tables as parts (pipeline/delta.py)
    final, decided, rule, params, parent_rows, plan = _final_aggregation(
        jsel, prelim, all_pair_ids, texts_of, kept_reviews, review_ctx, parent, recompute, policy, full=full,
        planner=planner if delta.applies(parent) else None)
    if texts_source is not None:  # the texts a child read for pairs its batch does not touch
        union_rule.update(texts_read=texts_source.reads, pairs_texts_read=texts_source.pairs_read)
    del prelim, texts_of
    used_ids = jsel.kept_annotators().to_frame()  # the annotators with kept judgments
    prior = prior_assignments(parent, columns=["pair_id", "split"] if plan is not None else None)  # (what a child reads)
    if plan is not None:  # the dirty pairs through select; the others are their parent's rows (pipeline/delta.py)
        assert parent_rows is not None
        rule.update(pairs_selected=plan.dirty.len(), pairs_removed=plan.removed.len())
        final_pairs = final.pairs.join(plan.dirty.to_frame("pair_id"), on="pair_id", how="semi")
        mine = jsel.kept_of(plan.dirty)  # per-pair figures of the dirty pairs
        psel = sel.select_pairs(final_pairs, flags, policy.select, clusters=clusters, judgments=mine,
                                downweight_share=sel.downweight_shares(mine, jsel.downweighted_annotators),
                                checks=policy.checks)
        del mine, final_pairs, final  # (the aggregation's rows: select's are what the later stages read)
        judgments_dropped = jsel.dropped_by_reason
        del jsel  # every judgment's row: no stage after select reads it (freed before split's work)
        assert plan.order is not None
        # every pair with a row: the clean ones in their parent's order, then the dirty ones (the report
        # takes first-seen order from plan.order for the few pairs it shows; no stage needs the rows in it)
        fate = pl.concat([plan.clean.select("pair_id", "decision", "reason", "near_dup_cluster"),
                          psel.pairs.select("pair_id", "decision", "reason", "near_dup_cluster")])
        routed_all = pl.concat([plan.clean.filter(pl.col("decision") == "route").select("pair_id", route="reason"),
                                psel.routed.select("pair_id", "route")])
        dropped_by_reason = dict(fate.filter(pl.col("decision") == "drop").group_by("reason").len().sort("reason").iter_rows())
        if all_pair_ids.len() > fate.height:
            dropped_by_reason["all_judgments_dropped"] = all_pair_ids.len() - fate.height
        routed_by_label = {lab: 0 for lab in ROUTED_LABELS}
        routed_by_label.update(dict(routed_all.group_by("route").len().iter_rows()) if routed_all.height else {})
        graph = results["near_duplicates"].tables.get("graph_clusters")
        if dirty_leakage and graph is not None:
            # what split and the report still read of the judgments: the rows of the dirty pairs (leakage) and of the
            # pairs in the near-duplicate graph's clusters (the report's clusters of several prompts); the rest of
            # every judgment's rows is released before the split's work
            shown = fate.filter(pl.col("near_dup_cluster").is_in(graph["near_dup_cluster"].implode()))["pair_id"]
            judgments = parted_rows(pl.concat([plan.dirty, shown])).select("pair_id", "prompt_hash") \
                if parted_rows is not None else \
                _own_buffers(judgments.filter(pl.col("pair_id").is_in(pl.concat([plan.dirty, shown]).implode())))
            del shown
        t = timer.lap("select", t)
        if dirty_leakage and prior is not None and parent.has(PLACEMENT):
            # the clean clusters counted as placed: the parent's placement minus its rows of the dirty clusters (a
            # cluster is all clean or all dirty, and none of the parent's was in two splits), not a row of every kept pair
            old_kept = parent_rows.filter(pl.col("pair_id").is_in(pl.concat([plan.dirty, plan.removed]).implode())
                                          & (pl.col("decision") == "keep")) \
                .select("pair_id", "near_dup_cluster", "locale", "annotator_kind")
            old_kept = old_kept.join(prior.filter(pl.col("pair_id").is_in(old_kept["pair_id"].implode())), on="pair_id",
                                     how="left")  # (every pair's split filtered by the few first: a join hashes both)
            if old_kept["split"].null_count():
                raise ValueError(f"{parent.path}: {old_kept['split'].null_count()} kept pairs have no split assignment")
            base_counts = counted((1, parent.read(PLACEMENT)), (-1, placement(old_kept)))
            dpo = assign_splits(psel.dpo, policy.split, prior=prior, clusters=clusters, base_counts=base_counts).sort("pair_id")
            placed = counted((1, base_counts), (1, placement(dpo)))
            # rows by split: the parent's, less its rows of the dirty pairs, plus theirs now
            split_sizes = {s: parent.manifest().ledger.splits.get(s, 0) - int((old_kept["split"] == s).sum())
                           + int((dpo["split"] == s).sum()) for s in SPLITS}
            now = None
            del old_kept
        else:
            base = plan.clean.filter(pl.col("decision") == "keep").select("pair_id", "near_dup_cluster", "locale", "annotator_kind") \
                .join(prior.select("pair_id", "split"), on="pair_id", how="left") if prior is not None else None
            if base is not None and base["split"].null_count():
                raise ValueError(f"{parent.path}: {base['split'].null_count()} kept pairs have no split assignment")
            dpo = assign_splits(psel.dpo, policy.split, prior=prior, clusters=clusters, base=base).sort("pair_id")
            placed = counted((1, placement(base)), (1, placement(dpo))) if base is not None else placement(dpo)
            now = pl.concat([x.select("pair_id", "near_dup_cluster", "split") for x in ([base] if base is not None else []) + [dpo]])
    else:
        kept = jsel.kept
        psel = sel.select_pairs(final.pairs, flags, policy.select, all_pair_ids=all_pair_ids, clusters=clusters,
                                downweight_share=sel.downweight_shares(kept, jsel.downweighted_annotators), judgments=kept,
                                checks=policy.checks)
        del kept, final  # (the aggregation's rows of every pair, with texts: select's are what the later stages read)
        judgments_dropped = jsel.dropped_by_reason
        del jsel  # every judgment's row: no stage after select reads it (freed before split's work)
        fate = psel.pairs.select("pair_id", "decision", "reason", "near_dup_cluster")
        routed_all = psel.routed.select("pair_id", "route")
        dropped_by_reason, routed_by_label = psel.dropped_by_reason, psel.routed_by_label
        everything = psel.pairs.with_columns(flag_reasons=psel.pairs["_reasons"])

        def pair_rows(ids: pl.Series) -> pl.DataFrame:
            return everything.join(ids.to_frame("pair_id"), on="pair_id", how="semi")

        t = timer.lap("select", t)
        # rows in pair_id order: the same version id gives the same bytes whatever the order of the input
        # files; one sort (a gather), then filters, which share the string buffers
        dpo = assign_splits(psel.dpo, policy.split, prior=prior, clusters=clusters).sort("pair_id")
        placed = placement(dpo)  # what a child counts its clean clusters from
        now = dpo.select("pair_id", "near_dup_cluster", "split")
    if now is not None:
        split_sizes = {s: now.filter(pl.col("split") == s).height for s in SPLITS}
    n_kept = sum(split_sizes.values())
    # a child that selected its dirty pairs only: the others keep their split, their rows are the parent's
    assigned = assignments(now, prior, version_id) if plan is None else assignment_changes(dpo, prior, version_id)
    moves = split_moves(prior, (now if plan is None else dpo).select("pair_id", "split"))
    # each pair's prompt (its first judgment's), for the leakage check and the report's clusters
    if judgments is None:  # (a child that let go of its union, but needs more than its dirty pairs' rows)
        assert parted_rows is not None
        judgments = parted_rows(None).select("pair_id", "prompt_hash")
    pair_prompts: pl.DataFrame | None
    if plan is not None and dirty_leakage:
        # a child whose parent leaked nothing: its clean pairs keep their splits and clusters, and a cluster is
        # all clean or all dirty (the plan takes whole clusters), as is a prompt (pairs of one prompt share a
        # near-duplicate cluster): a leak has dirty pairs only (docs/incremental.md).  The report looks up
        # the prompts of the few pairs it shows in the judgments.
        mine = judgments.filter(pl.col("pair_id").is_in(dpo["pair_id"].implode()))
        leaks = leakage({s: dpo.filter(pl.col("split") == s) for s in SPLITS},
                        mine.filter(pl.col("pair_id").is_first_distinct()).select("pair_id", "prompt_hash"))
        pair_prompts = None
        del mine
    else:
        pair_prompts = judgments.lazy().filter(pl.col("pair_id").is_first_distinct()).select("pair_id", "prompt_hash").collect()
        leaks = leakage({s: now.filter(pl.col("split") == s) for s in SPLITS}, pair_prompts)
    del now
    psel.dpo = psel.dpo.clear()  # from here the split frames hold the rows
    split_frames = {s: dpo.filter(pl.col("split") == s).drop("split") for s in SPLITS}
    del dpo
    t = timer.lap("split", t)

    # pair tables in parts by the version where each pair first appeared: a child rewrites only
    # the generations whose rows changed and links the others (pipeline/parts.py)
    # in pair_id order: a generation's part has the same bytes however its rows were computed
    pairs_out = psel.pairs.drop("_reasons").with_columns(flag_reasons=psel.pairs["_reasons"]).sort("pair_id")
    pairs_out = pairs_out.join(first if 4 * pairs_out.height > first.height
                               else first.filter(pl.col("pair_id").is_in(pairs_out["pair_id"].implode())), on="pair_id", how="left")
    # a big generation is split into buckets by a hash of the pair id: a changed pair rewrites its bucket only
    gens = first.rename({"first_version": "_gen"})
    if plan is not None and plan.removed.len():  # their parent rows leave the parts they are in
        gone_rows = parent_rows.join(plan.removed.to_frame("pair_id"), on="pair_id", how="semi") \
            .join(gens, on="pair_id", how="anti")  # (pairs of the union have theirs already)
        gens = pl.concat([gens, gone_rows.select("pair_id", _gen="first_version")])
    # small generations share a tail group's part (pipeline/parts.py: GROUPS)
    groups = generation_groups(parent, version_id, int((first["first_version"] == version_id).sum()))
    gens = grouped_generations(gens, groups)
    my_group = groups.filter(pl.col("generation") == version_id)["group"][0]  # this version's group
    sizes = dict(gens.group_by("_gen").len().iter_rows())
    buckets = bucket_counts(parent, "pairs", {**sizes, my_group: sizes.get(my_group, 0)})
    if plan is not None:
        # a child writes the rows of a few pairs: their part keys only (a key is a function of the pair;
        # formatting every pair's took ~0.3 s at 3M judgments); another pair's is computed when asked
        need = pl.concat([plan.dirty, plan.removed, *(x for x in (touched, prelim_touched) if x is not None)])
        gen = part_keys(gens.filter(pl.col("pair_id").is_in(need.unique().implode())), buckets)
    else:
        gen = part_keys(gens, buckets)

    def keys_of(ids: pl.DataFrame) -> pl.DataFrame:  # pair_id -> _part of the pairs of ``ids`` with a generation
        return part_keys(gens.join(ids, on="pair_id", how="semi"), buckets)

    def keyed(frame: pl.DataFrame) -> pl.DataFrame:  # pairs absent from the pairs table: this version's generation
        g = gen if 4 * frame.height > gen.height else gen.join(frame.select("pair_id"), on="pair_id", how="semi")
        k = frame.join(g, on="pair_id", how="left", maintain_order="left")
        if k["_part"].null_count():
            missing = k.filter(pl.col("_part").is_null()).select("pair_id").unique()
            found = keys_of(missing) if plan is not None else gen.clear()  # (with every key made: none to find)
            fill = part_keys(missing.join(found, on="pair_id", how="anti").with_columns(_gen=pl.lit(my_group)), buckets)
            k = k.join(pl.concat([found, fill]).rename({"_part": "_fill"}), on="pair_id", how="left", maintain_order="left") \
                .with_columns(_part=pl.coalesce("_part", "_fill")).drop("_fill")
        return k

    if plan is not None:  # the report's texts of clean pairs: from the parent's parts that hold them
        pair_rows = delta.parent_texts(parent, psel.pairs.with_columns(flag_reasons=psel.pairs["_reasons"]), keys_of)
    reuse = PartReuse.of(parent)  # a part whose rows are the parent's is linked, not written again
    routed_out = psel.routed.drop("_reasons", strict=False)
    pair_rows_out = pairs_out.drop(agg.PAIR_TEXT_COLUMNS, strict=False)  # what a child reads (no texts)
    if plan is not None:
        gone = keyed(pl.concat([plan.dirty, plan.removed]).to_frame("pair_id"))
        for s, f in split_frames.items():
            tables[f"data/{s}"] = delta.write_table(reuse, store, stage, f"data/{s}", keyed(f), gone)
        tables["pairs"] = delta.write_table(reuse, store, stage, "pairs", keyed(pairs_out), gone)
        tables[delta.PAIR_ROWS] = delta.write_table(reuse, store, stage, delta.PAIR_ROWS, keyed(pair_rows_out), gone)
        tables["routed"] = delta.write_table(reuse, store, stage, "routed", keyed(routed_out), gone)
    else:
        for s, f in split_frames.items():
            tables[f"data/{s}"] = _grouped_table(reuse, store, stage, f"data/{s}", keyed(f))
        tables["pairs"] = _grouped_table(reuse, store, stage, "pairs", keyed(pairs_out))
        tables[delta.PAIR_ROWS] = _grouped_table(reuse, store, stage, delta.PAIR_ROWS, keyed(pair_rows_out))
        tables["routed"] = _grouped_table(reuse, store, stage, "routed", keyed(routed_out))
    splits = {s: SplitInfo(path=t.path, rows=t.rows, sha256=t.sha256) for s in SPLITS for t in [tables[f"data/{s}"]]}
    tables["split_assignments"] = _grouped_table(reuse, store, stage, "split_assignments", keyed(assigned)) if plan is None \
        else delta.write_table(reuse, store, stage, "split_assignments", keyed(assigned), keyed(assigned.select("pair_id")))
    # the state tables: a child under the rule rewrites only the parts of the pairs whose rows changed
    # (every pair keeps its part: its generation is the version where it was first seen)
    state = {**state_frames(results), inc.PRELIM_TABLE: prelim_rows}
    changed = {inc.PRELIM_TABLE: prelim_touched, **({name: touched for name in state if name != inc.PRELIM_TABLE}
                                                    if touched is not None else {})}
    for name, frame in state.items():  # what a child's checks and preliminary consensus start from
        ids = changed.get(name) if plan is not None and prelim_touched is not None else None
        if ids is not None and parent.table(name) is not None:
            mine = frame.filter(pl.col("pair_id").is_in(ids.implode()))
            tables[name] = delta.write_table(reuse, store, stage, name, keyed(mine), keyed(ids.to_frame("pair_id")),
                                             order_by=_state_order(frame))
        else:
            if name == inc.PRELIM_TABLE and prelim_partial:  # every pair's rows, the parent's but the changed
                assert parent is not None and prelim_touched is not None
                frame = inc.merged_state(parent, name.removeprefix(inc.STATE_PREFIX), prelim_touched, frame)
            elif name.removeprefix(inc.STATE_PREFIX) in partial:  # every pair's rows, the parent's but the touched
                assert parent is not None and touched is not None
                frame = inc.merged_state(parent, name.removeprefix(inc.STATE_PREFIX), touched, frame)
            tables[name] = _grouped_table(reuse, store, stage, name, keyed(frame))
    review_state, review_ledger = rr.finish(
        review_ctx, version_id=version_id, created_at=created_at, pairs=fate, routed=routed_all,
        reviews=reviews, decided_by_reviews=decided, n_review_judgments=reviews.height)

    def pair_keys_of(pid: pl.Series) -> pl.Series:  # pair ids -> part keys (none: the part of other subjects)
        f = pid.to_frame("pair_id")
        u = f.drop_nulls().unique()
        k = keyed(u).select("pair_id", "_part") if u.height else u.with_columns(_part=pl.lit(None, pl.String))
        return f.join(k, on="pair_id", how="left", maintain_order="left")["_part"].fill_null(OTHER_KEY)

    def flag_keys(fl: pl.DataFrame) -> pl.Series:  # a flag's pair: its subject's, or its judgment's
        kind = pl.col("subject_kind")
        sub = fl.select("subject_kind", "subject_id").join(flagged_pairs, on="subject_id", how="left", maintain_order="left")
        return pair_keys_of(sub.select(pl.when(kind == "pair").then(pl.col("subject_id"))
                                       .when(kind == "judgment").then(pl.col("_jp")))["subject_id"])

    # the flags and the review state by the part of the pair each row is about (flags of annotators and other
    # subjects: a part of their own): a child rewrites the parts where a row changed and links the others
    # (the review state stamps the build's time on newly routed pairs: its parts are not fingerprinted)
    for name, frame, before, key_of, order, printed in (
            ("flags", flags, parent_flags, flag_keys, FLAG_ORDER, True),
            (rr.STATE, review_state, review_ctx.before if parent is not None else None,
             lambda f: pair_keys_of(f["pair_id"]), ("pair_id",), False)):
        tags = delta.part_tags(parent, name, before.height) if plan is not None and before is not None else None
        if tags is not None:
            assert before is not None
            tables[name] = delta.write_changed(reuse, store, stage, name, frame, before, tags, key_of, order,
                                               fingerprinted=printed)
        else:
            w = TableWriter(store, stage, name)
            w.write_grouped(frame.with_columns(_part=key_of(frame)), "_part", reuse if printed else None, order_by=order)
            tables[name] = w.info()
    tables["quarantine"] = _appended_table(store, stage, "quarantine", parent, quarantine,
                                           quarantine.height - ingest.quarantine.height if parent else 0, version_id)
    # the parameters the consensus used, for the annotators with kept judgments (docs/incremental.md)
    used = used_ids.join(params, on="annotator_id", how="left")
    annotators = agg.annotator_table(results, used.select(
        "annotator_id", "ds_accuracy", accuracy_better_first="oa_alpha", accuracy_better_second="oa_beta",
        order_engagement="oa_engaged"))
    for name, frame in (("annotators", annotators), (FINGERPRINTS, reuse.frame()), (LABEL_COUNTS, counts),
                        (PLACEMENT, placed),
                        (inc.PARAMS_TABLE, params), (inc.PRELIM_PARAMS, prelim_params), (GROUPS, groups),
                        *inc.sums_frames(results).items()):
        w = TableWriter(store, stage, name)
        w.write("all", frame)
        tables[name] = w.info()
    # the near-duplicate state: a child links these parts and adds its own (pipeline/checks/near_duplicates_state.py)
    tables.update(near_dup.write_state(store, stage))
    t = timer.lap("write", t)

    checks = [r.manifest_entry() for r in results.values()]
    checks.append(_split_check(leaks, split_sizes))
    checks.append(_stability_check(moves, parent))
    ledger = Ledger(
        rows_in=ingest.ledger.rows_in + (parent.manifest().ledger.rows_in if parent else 0),
        quarantined=ingest.ledger.quarantined + (parent.manifest().ledger.quarantined if parent else 0),
        # every valid judgment that came in: used + dropped with a reason (pre-check drops included)
        judgments_valid=n_judgments + sum(pre_check.values()),
        judgments_dropped={**judgments_dropped, **pre_check, **no_verdict},
        pairs=n_pairs,
        pairs_kept=n_kept,
        routed=routed_by_label,
        dropped=dropped_by_reason,
        splits=split_sizes,
        reviews=review_ledger,
    )
    sources = list(ingest.sources)
    if parent:
        pm = parent.manifest()
        sources = [SourceInfo(**{**s.model_dump(), "path": s.path}) for s in pm.sources] + sources
    if parted is not None:  # after the checks: the parent's rows of the pairs select and split read, by pair
        union_rule.update(after_checks="parent parts by pair", parent_rows_read=parted.rows_read,
                          parent_row_passes=parted.reads)
    if isinstance(complete, inc.Completer):  # the columns held for some rows only, and the reads that completed them
        union_rule.update(deferred=list(complete.columns), completed_reads=complete.reads, rows_completed=complete.rows_read)
    manifest = Manifest(
        version_id=version_id,
        created_at=created_at,
        parent_version=parent.version_id if parent else None,
        code_version=code_version(),
        policy_hash=policy.policy_hash(),
        policy=policy.model_dump(mode="json"),
        ledger=ledger,
        ingest=ingest.ledger if not parent else parent.manifest().ingest.merged(ingest.ledger),
        sources=sources,
        splits=splits,
        files=files,
        tables=tables,
        checks=checks,
        annotators=_annotator_summary(annotators),
        lineage={"parent_version": parent.version_id if parent else None,
                 "new_sources": [s.model_dump() for s in ingest.sources],
                 "timings_s": dict(timer.t),
                 **({"union": union_rule, "consensus": rule, "preliminary": prelim_rule} if parent else {}),
                 "preliminary_format": inc.PRELIM_FORMAT,
                 "check_sums": {**(sums_rule or {"mode": "counted"}), "formats": inc.sums_formats(),
                                "fitted_on": inc.fitted_on(parent, (sums_rule or {}).get("checks", ()), n_union)},
                 "pair_table_parts": {"linked": reuse.linked, "written": reuse.written}},
    )
    t = time.perf_counter()
    from pipeline.report import ReportInputs, write_report

    inputs = ReportInputs(manifest=manifest, judgments=judgments, pairs=fate, pair_rows=pair_rows, pair_prompts=pair_prompts,
                          flags=flags, annotators=annotators, routed=routed_all, quarantine=quarantine, results=results,
                          pair_order=plan.order if plan is not None else None, label_counts=counts,
                          graph_clusters=results["near_duplicates"].tables.get("graph_clusters"))
    for path in write_report(inputs, stage):
        manifest.files[path.name] = file_info(path, path.name)
    timer.lap("report", t)
    return manifest


def _final_aggregation(jsel: sel.JudgmentSelection, prelim: agg.Aggregation, all_pair_ids: pl.Series,
                       texts_of: Callable[[pl.Series | None], pl.DataFrame],
                       kept_reviews: pl.DataFrame,
                       review_ctx: rr.ReviewContext, parent: VersionHandle | None, recompute: pl.Series | None,
                       policy: Policy, *, full: bool,
                       planner: Callable[[pl.DataFrame, pl.Series, pl.Series], delta.Plan] | None = None,
                       ) -> tuple[agg.Aggregation, pl.DataFrame, dict[str, Any], pl.DataFrame, pl.DataFrame | None,
                                  delta.Plan | None]:
    """The consensus of the version's pairs from the kept judgments: (aggregation, pairs decided
    by reviews, the rule's record, the annotator parameters to keep in ``state/annotator_params``,
    the parent's pairs rows without texts when they were read: the rule's columns,
    :data:`pipeline.delta.PLAN_COLUMNS`; the child's :class:`~pipeline.delta.Plan` when
    ``planner`` made one: then only the dirty pairs' rows carry texts, the clean ones never
    go through select).

    The rule of a child (docs/incremental.md): only the pairs in ``recompute`` are aggregated,
    with the parent's annotator parameters fixed (annotators the parent has no parameters for
    are fitted on those judgments); every other pair keeps its parent's row.  Without
    ``recompute`` (a first version, ``--full``, another policy) everything is aggregated and
    every parameter fitted.  The kept judgments carry no texts: the aggregation takes them from
    ``texts_of(pair_ids)`` (:meth:`~pipeline.aggregate.Aggregation.texts` of those pairs; None: of
    every pair), asked only for the pairs it needs.  ``all_pair_ids``: the
    preliminary pairs in first-seen order (``prelim.pairs`` may have them in another)."""
    cfg = policy.checks.aggregation
    rule: dict[str, Any] = {"mode": "full" if parent is not None and full else "incremental" if recompute is not None
                            else "recomputed"}
    given = inc.parent_params(parent) if recompute is not None and parent is not None else None
    if recompute is not None and given is None:
        rule = {"mode": "recomputed", "why": "the parent keeps no annotator parameters"}
    if given is not None:
        assert parent is not None and recompute is not None
        mine = jsel.kept_of(recompute)
        final = agg.aggregate(mine, cfg, texts=texts_of(recompute), dimensions=policy.dimensions, params=given)
        assert final.params is not None and final.a_hash is not None
        fitted = final.params
        final = rr.resolve(final, kept_reviews, review_ctx)
        try:
            columns = [*final.pairs.columns, *delta.PLAN_COLUMNS]
            # with a planner every pair's row in the plan's columns, the dirty pairs' in all of them
            old = inc.parent_pair_rows(parent, list(delta.PLAN_COLUMNS) if planner is not None else columns)
            # the pairs with kept judgments: every pair but the few whose judgments are all dropped
            no_kept = jsel.pairs_without_kept()
            kept_ids = all_pair_ids.filter(~all_pair_ids.is_in(no_kept.implode())) if no_kept.len() else all_pair_ids
            plan = planner(old, kept_ids, no_kept) if planner is not None else None
            if plan is None:
                pairs, figures = inc.with_parent_pairs(final.pairs, old, recompute, jsel.kept_rows(columns=["pair_id", "a_hash"]),
                                                       all_pair_ids, texts_of(None))
            else:  # the rows of the dirty pairs only (pipeline/delta.py); the others stay their parent's, unread
                # read from the parts that hold them (a pair's part in the parent's pair tables is known)
                dirty = pl.col("pair_id").is_in(plan.dirty.implode())
                keys = parent_keys(parent, old.filter(dirty).select("pair_id", "first_version"))
                dirty_old = inc.parent_pair_rows(parent, columns, where=dirty, keys=keys["_part"].unique().to_list())
                pairs, figures = _dirty_rows(final.pairs, old, dirty_old, recompute, jsel, kept_ids, all_pair_ids,
                                             _parent_row_texts(parent, dirty_old, recompute, jsel, keys, texts_of), plan)
        except pl.exceptions.ColumnNotFoundError as err:  # a parent written before a consensus column existed
            rule = {"mode": "recomputed", "why": f"the parent's pairs lack a column: {err}"}
        else:
            n_new = fitted.join(given, on="annotator_id", how="anti").height
            rule.update(figures, annotators_from_parent=given.height, annotators_fitted=n_new)
            # each pair's canonical a: the child's own for the pairs it aggregated, else the preliminary's
            ah = pl.DataFrame({"pair_id": prelim.pairs["pair_id"], "a_hash": prelim.a_hash})
            mine_ah = pl.DataFrame({"pair_id": final.pairs["pair_id"], "a_hash": final.a_hash})
            # the reviews' votes need the pairs they name (all of them, also clean ones)
            voted = pairs.select("pair_id") if plan is None else plan.order.to_frame("pair_id").join(
                kept_reviews.select("pair_id").unique(), on="pair_id", how="semi", maintain_order="left")
            if plan is not None:
                need = pl.concat([pairs["pair_id"], voted["pair_id"]]).implode()
                ah = ah.filter(pl.col("pair_id").is_in(need))
            ah = pl.concat([mine_ah, ah.join(mine_ah, on="pair_id", how="anti")])

            def canon_a(ids: pl.DataFrame) -> pl.Series:
                return ids.join(ah, on="pair_id", how="left", maintain_order="left")["a_hash"]

            final = agg.Aggregation(pairs, final.annotators, canon_a(pairs.select("pair_id")))
            if plan is not None:  # what the build reads of the parent's rows after this: the dirty and removed pairs'
                old = old.filter(pl.col("pair_id").is_in(pl.concat([plan.dirty, plan.removed]).implode()))
            return (final, rr.votes(kept_reviews, voted, canon_a(voted)), rule, inc.merge_params(given, fitted), old,
                    plan)
    final = agg.aggregate(jsel.kept, cfg, texts=texts_of(None), dimensions=policy.dimensions)
    assert final.params is not None
    params = final.params.sort("annotator_id")
    final = rr.resolve(final, kept_reviews, review_ctx)
    return final, rr.votes(kept_reviews, final.pairs, final.a_hash), rule, params, None, None


def _dirty_rows(fresh: pl.DataFrame, old: pl.DataFrame, dirty_old: pl.DataFrame, recompute: pl.Series,
                jsel: sel.JudgmentSelection, kept_ids: pl.Series,
                order: pl.Series, texts: pl.DataFrame, plan: delta.Plan) -> tuple[pl.DataFrame, dict[str, int]]:
    """:func:`pipeline.incremental.with_parent_pairs` for the dirty pairs of ``plan`` only (``old``:
    every parent row in the plan's columns, ``dirty_old``: the dirty pairs' in all of them): their
    rows (the recomputed ones' fresh, the others' their parent's with texts) in first-seen order,
    and the rule's figures; ``plan.order`` is set to the first-seen order of every pair with a row
    (what the merge of all pairs would have had)."""
    if plan.new is not None and plan.new.is_in(recompute.implode()).all():
        # every pair with kept judgments is the parent's or recomputed (the usual case: a pair the parent's
        # pairs table lacks has new judgments, or judgments whose drop changed, so it is recomputed):
        # the pairs with a row are the kept ones, ``kept_ids`` in first-seen order, and the parent's
        # rows are those that are not recomputed (one count instead of two joins of every pair)
        plan.order = kept_ids
        n_from_parent = kept_ids.len() - fresh.height
    else:
        from_parent = old.select("pair_id").join(recompute.to_frame("pair_id"), on="pair_id", how="anti") \
            .join(kept_ids.to_frame("pair_id"), on="pair_id", how="semi")["pair_id"]
        # (a semi join: is_in of a million ids in a million is ~4x slower)
        plan.order = order.to_frame("pair_id").join(pl.concat([from_parent, fresh["pair_id"]]).to_frame("pair_id"),
                                                    on="pair_id", how="semi", maintain_order="left")["pair_id"]
        n_from_parent = from_parent.len()
    dirty = plan.dirty.implode()
    mine = jsel.kept_of(plan.dirty, ["pair_id", "a_hash"])
    pairs, _ = inc.with_parent_pairs(fresh, dirty_old, recompute, mine,
                                     plan.order.filter(plan.order.is_in(dirty)), texts, texts_for=plan.dirty)
    return pairs, {"pairs_recomputed": fresh.height, "pairs_from_parent": n_from_parent}


def _parent_row_texts(parent: VersionHandle, rows: pl.DataFrame, recompute: pl.Series, jsel: sel.JudgmentSelection,
                      keys: pl.DataFrame, texts_of: Callable[[pl.Series | None], pl.DataFrame]) -> pl.DataFrame:
    """The texts (:meth:`~pipeline.aggregate.Aggregation.texts`) of the parent's ``rows`` that keep
    their parent's row (not in ``recompute``), from the parent's pairs table: such a pair's
    judgments, their flags and its annotators' status are unchanged, so its first judgment and its
    first kept judgment are its parent's, and the parent's row has the texts in the orientation a
    merge gives them (``a_hash``: the first kept judgment's).  Only the parts that hold them are
    read (``keys``); a pair the table lacks is read by ``texts_of``."""
    from pipeline.aggregate import PAIR_TEXT_COLUMNS

    need = rows.select("pair_id").join(recompute.to_frame("pair_id"), on="pair_id", how="anti")
    canon = jsel.kept_of(need["pair_id"], ["pair_id", "a_hash"]) \
        .unique("pair_id", keep="first", maintain_order=True)
    got = parent.read("pairs", columns=["pair_id", *PAIR_TEXT_COLUMNS], where=pl.col("pair_id").is_in(canon["pair_id"].implode()),
                      keys=keys.join(canon, on="pair_id", how="semi")["_part"].unique().to_list()).join(canon, on="pair_id")
    missing = canon.join(got, on="pair_id", how="anti")["pair_id"]
    return pl.concat([got, texts_of(missing).select(got.columns)], how="diagonal_relaxed") if missing.len() else got


def _review_context(store: Store, parent: VersionHandle | None, policy: Policy) -> rr.ReviewContext:
    """What the build knows of reviews: the lineage's routed pairs and which of them were exported."""
    from pipeline.review.exports import exported_pairs, lineage

    return rr.context(parent, mode=policy.reviews.mode, registry=policy.annotators,
                      exported=exported_pairs(store, lineage(parent)) if parent is not None else frozenset())


def parent_judgments_intact(parent: VersionHandle, n_parent_rows: int) -> bool:
    """The union starts with all of the parent's judgments (the child's merge relies on it)."""
    t = parent.table("judgments")
    return t is not None and t.rows == n_parent_rows


def first_versions(parent: VersionHandle | None, pair_ids: pl.Series, version_id: str,
                   known: pl.DataFrame | None = None) -> pl.DataFrame:
    """pair_id -> first_version: the version where each pair first appeared (the parent's record,
    else this version).  A parent without the column (older layout) counts as its pairs' first.
    ``known``: the parent's pair_id -> first_version, when the build has read it already."""
    ids = pair_ids.to_frame("pair_id")
    if parent is None:
        return ids.with_columns(first_version=pl.lit(version_id))
    if known is not None:
        pass
    elif parent.table("pairs") is not None:  # written with tables: carries first_version
        known = inc.parent_pair_rows(parent, ["pair_id"])
    else:
        known = parent.read("pairs.parquet", columns=["pair_id"]).with_columns(first_version=pl.lit(parent.version_id))
    return ids.join(known, on="pair_id", how="left").with_columns(pl.col("first_version").fill_null(version_id))


def _state_order(frame: pl.DataFrame) -> tuple[str, ...]:
    """The order of a state table's rows in a part: pair_id, then its flat columns (the order
    :func:`_grouped_table` gives: with one row a pair the other keys never decide)."""
    return ("pair_id", *(c for c, t in frame.schema.items() if c not in ("pair_id", "_part") and not t.is_nested()))


def _grouped_table(reuse: PartReuse, store: Store, stage: Path, name: str, frame: pl.DataFrame) -> TableInfo:
    """One part per ``_part`` value, rows in a canonical order (pair_id, then the other flat
    columns): a part has the same bytes however its rows were computed or joined."""
    keys = ["pair_id"]
    if frame["pair_id"].is_duplicated().any():  # state tables: several rows a pair
        keys += [c for c, t in frame.schema.items() if c not in (*keys, "_part") and not t.is_nested()]
    w = TableWriter(store, stage, name)
    w.write_grouped(frame, "_part", reuse, order_by=tuple(keys))
    return w.info()


def _appended_table(store: Store, stage: Path, name: str, parent: VersionHandle | None, frame: pl.DataFrame,
                    n_parent_rows: int, version_id: str, *, fresh: pl.DataFrame | None = None,
                    cap: int | None = None) -> TableInfo:
    """A table that only grows (judgments, quarantine): the parent's parts as they are, plus one
    part with the rows after the first ``n_parent_rows`` (the parent's rows come first in ``frame``;
    ``fresh``: those rows, when ``frame`` lacks some of their columns),
    into which the parent's trailing parts are merged while it is at least half their size.
    ``cap``: no part of this version holds more rows (merges stop there; more rows are several parts),
    so that a reader holds one part's bytes at a time, whatever the history's size.
    The manifest lists the parts in arrival order, so that a child's union has the rows in the
    order its parent's had (first-seen orders, a pair's canonical orientation, its list of
    comparison ids do not depend on how version ids sort)."""
    w = TableWriter(store, stage, name, arrival_order=True)
    inherited = parent_parts(parent, name)
    if inherited and sum(p.rows for p in inherited) == n_parent_rows:
        assert parent is not None
        fresh = frame.slice(n_parent_rows) if fresh is None else fresh
        # level compaction: the trailing parts are merged into this version's part while it holds at
        # least half the rows of the part before it -- O(log N) parts after N batches, a row rewritten
        # O(log N) times (a binary counter), the parts' order and every row's place kept
        keep = list(inherited)
        for _ in range(parts_to_merge([p.rows for p in keep], fresh.height, cap)):
            old = parent.read(keep[-1].path)
            if set(old.columns) != set(fresh.columns):  # a part of an older layout stays as it is
                break
            fresh = pl.concat([old.select(fresh.columns).cast(fresh.schema), fresh])  # type: ignore[arg-type]
            keep.pop()
        for part in keep:
            w.inherit(parent, part)
    else:  # first version, or a parent of the older single-file layout: everything in this version's part
        if fresh is not None:
            raise RuntimeError(f"{name}: the parent's parts do not hold the union's first {n_parent_rows} rows")
        fresh = frame
    if fresh.height or not w.parts:
        for k, (a, n) in enumerate(appended_slices(fresh.height, cap)):
            w.write(appended_key(version_id, k), fresh.slice(a, n))
    return w.info()


def _own_buffers(frame: pl.DataFrame) -> pl.DataFrame:
    """A small frame taken from a big one, copied into buffers of its own: a filter of a string
    column shares the big column's data buffers (its views point into them), so it would keep
    all of them alive (measured: the 3M union's ~0.6 GB after the build kept 90k of its rows)."""
    return pl.from_arrow(frame.to_arrow(compat_level=pl.CompatLevel.oldest())).cast(frame.schema)  # type: ignore[return-value]


def _no_leaks(parent: VersionHandle | None) -> bool:
    """The parent measured its splits' leakage, and found none of any kind."""
    m = parent.manifest().check("split_leakage").metrics if parent is not None else {}
    kinds = ("clusters_in_several_splits", "pairs_in_several_splits", "prompts_in_several_splits")
    return all(m.get(k) == 0 for k in kinds)


def _split_check(leaks: dict[str, int], sizes: dict[str, int]) -> dict[str, Any]:
    bad = any(v for v in leaks.values())
    return {"name": "split_leakage", "status": "fail" if bad else "pass", "metrics": {**leaks, "rows": sizes},
            "flag_counts": {}, "summary": "near-duplicate clusters never straddle splits" if not bad else "LEAK between splits"}


def _stability_check(moves: pl.DataFrame, parent: VersionHandle | None) -> dict[str, Any]:
    """Split moves against the ancestors' assignments (sticky splits: only ever towards test)."""
    by = {f"{a}->{b}": n for a, b, n in moves.group_by("from", "to").len().sort("from", "to").iter_rows()}
    into_train = moves.filter((pl.col("to") == "train") & (pl.col("from") != "train")).height
    return {"name": "split_stability", "status": "fail" if into_train else "pass",
            "metrics": {"parent_version": parent.version_id if parent else None, "moved": moves.height, "moves": by,
                        "into_train_from_held_out": into_train, "moved_pair_ids": moves["pair_id"].head(50).to_list()},
            "flag_counts": {}, "summary": f"{moves.height} pairs changed split ({by or 'none'})" if parent
            else "first version: nothing to compare"}


def _annotator_summary(ann: pl.DataFrame) -> dict[str, Any]:
    if ann.height == 0:
        return {"n": 0}
    return {
        "n": ann.height,
        "by_kind": dict(ann.group_by("annotator_kind").len().sort("annotator_kind").iter_rows()),
        "flagged": ann.filter(pl.col("status") == "flagged")["annotator_id"].to_list(),
        "insufficient_data": ann.filter(pl.col("status") == "insufficient_data")["annotator_id"].to_list(),
    }


__all__ = ["CHECK_MODULES", "CheckResult", "CurateOptions", "CurateResult", "IngestLedger", "code_version", "curate",
           "plan_version_id"]
