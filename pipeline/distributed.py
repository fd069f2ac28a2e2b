"""Map a step over partition files, in process or on a Dask cluster; reduce in partition order.

The unit of work of issue 15: a *step* is a pure function from one partition file's path to a
few small tables (its state: per-annotator sums, duplicate groups, ...), and a reduce that merges
those states in partition order.  A worker reads its partition itself -- the driver sends a path
and receives the state, never the judgments -- so the partitions must live where every worker
can read them (a shared mount; ``docs/scale-out.md``).

Where the tasks run (``PREFPIPE_DASK``, or ``runner=`` explicitly):

* unset / empty: in this process, one partition after another;
* ``local``: a ``dask.distributed.LocalCluster`` of 2 worker *processes* (1 thread each);
* ``tcp://host:8786``: an existing Dask scheduler.

Results are byte-identical whichever runs them: a task writes its state into the cache itself, as
Arrow IPC files (no pickle of data; Dask ships the function and a few names and sha256s, never
rows -- so on a cluster ``cache_dir`` is on the shared storage the partitions are on), and the
driver reads back the tables it keeps, checked against those sha256s, in partition order.

Failure and retry: every task runs to its end; the states of the tasks that finished are cached
under ``cache_dir`` by (step name, step version, code version, partition sha256), each table with its sha256
(checked when read back); if any failed,
:class:`PartitionTaskError` names every failed partition (index, file, cause) and nothing is
reduced.  Running again computes only the partitions without a cached state.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import memory
from pipeline.store import sha256_file

__all__ = ["Step", "PartitionRef", "PartitionTaskError", "RunStats", "map_partitions", "run_step", "open_runner",
           "refs_of", "partition_progress", "cached_table", "cached_file", "read_cached_file", "table_schema", "iter_table", "iter_batches", "BATCH_ROWS", "encode_state", "decode_state", "PartitionChanged", "ENV"]

ENV = "PREFPIPE_DASK"
BATCH_ROWS = 8_192  # rows per record batch of a state table (a merge holds one of every partition)
State = dict[str, pl.DataFrame]


@dataclass(frozen=True)
class Step:
    """A pair-scoped computation: ``run(paths) -> state`` per partition (its part files, see
    :class:`PartitionRef`), ``reduce([state, ...]) -> state``
    over the states in partition order.  ``version`` is part of the cache key: bump it when
    ``run`` changes what it returns, and include any parameter bound into ``run`` (a config's
    hash).  ``run`` must be importable by workers (a module-level
    function, or a ``functools.partial`` of one)."""

    name: str
    version: str
    run: Callable[[list[str]], State]
    reduce: Callable[[list[State]], State]


@dataclass(frozen=True)
class PartitionRef:
    """Partition ``index``: its part file(s) (one per input file partitioned on its own, in input
    order) and their sha256s."""

    index: int
    paths: tuple[str, ...]
    sha256s: tuple[str, ...]

    @property
    def sha256(self) -> str:
        """The partition's content: its file's sha256, or a digest of its files' sha256s in order."""
        if len(self.sha256s) == 1:
            return self.sha256s[0]
        return hashlib.sha256(("partition-files\n" + "\n".join(self.sha256s)).encode()).hexdigest()


@dataclass
class RunStats:
    computed: list[int] = field(default_factory=list)  # partitions whose task ran in this call
    cached: list[int] = field(default_factory=list)  # partitions whose state was cached before
    runner: str = "process"


class PartitionTaskError(RuntimeError):
    """One or more partitions' tasks failed; ``failed`` maps partition index -> message."""

    def __init__(self, step: str, failed: dict[int, str], refs: dict[int, PartitionRef], finished: int) -> None:
        self.step, self.failed = step, failed
        lines = [f"partition {i} ({', '.join(Path(p).name for p in refs[i].paths)}, sha256 {refs[i].sha256[:12]}): {msg}" for i, msg in sorted(failed.items())]
        super().__init__(
            f"step {step!r}: {len(failed)} of {len(refs)} partition task(s) failed -- " + "; ".join(lines)
            + f". {finished} finished and are cached; run again to compute only the missing partition(s).")


# ---------------------------------------------------------------- state <-> Arrow IPC bytes
STATE_COMPRESSION_ENV = "PREFPIPE_STATE_COMPRESSION"


def state_compression() -> str | None:
    """The compression of the tasks' cached states (``PREFPIPE_STATE_COMPRESSION``: ``none``, the
    default, ``lz4`` or ``zstd``).  At 1M judgments the states are 1.24 GB uncompressed, 0.77 GB with
    lz4 and 0.52 GB with zstd, for +1.5 s and +2 s of a 55 s build (docs/scale-out.md): worth it where
    the states cross a network (a cluster's shared storage) or the work directory's disk is short."""
    raw = os.environ.get(STATE_COMPRESSION_ENV, "none").strip().lower() or "none"
    if raw not in ("none", "lz4", "zstd"):
        raise ValueError(f"{STATE_COMPRESSION_ENV}={raw!r}: expected none, lz4 or zstd")
    return None if raw == "none" else raw


def _write_stream(frame: pl.DataFrame, sink: Any, compression: str | None = None) -> None:
    """``frame`` as one Arrow IPC stream into ``sink`` (a binary file object).

    The oldest compat level writes strings as offsets + bytes: canonical bytes for equal frames
    (Polars' string views point into buffers whose layout depends on the history).  Record batches
    of at most :data:`BATCH_ROWS` rows, each converted on its own from a slice of the frame (never
    the whole table as Arrow at once: a task's text tables would be held twice); a reader can
    stream a big table (:func:`iter_table`), and the cut does not depend on how the frame was built.
    ``compression``: of the record batches' buffers (None, ``lz4`` or ``zstd``; a reader needs no option)."""
    import pyarrow as pa

    if not isinstance(frame, pl.DataFrame):
        raise TypeError(f"state table is a {type(frame).__name__}; a step returns Polars DataFrames")
    schema = frame.head(0).to_arrow(compat_level=pl.CompatLevel.oldest()).schema
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, schema, options=options) as writer:
        for start in range(0, frame.height, BATCH_ROWS):
            piece = frame.slice(start, BATCH_ROWS).rechunk().to_arrow(compat_level=pl.CompatLevel.oldest())
            for batch in piece.to_batches():  # (one: the slice is one chunk)
                writer.write_batch(batch)


def encode_state(state: State) -> dict[str, bytes]:
    """A state as Arrow IPC (stream) bytes per table (the bytes :func:`map_partitions` caches)."""
    out = {}
    for name, frame in state.items():
        buf = io.BytesIO()
        try:
            _write_stream(frame, buf)
        except TypeError as err:
            raise TypeError(f"state table {name!r}: {err}") from None
        out[name] = buf.getvalue()
    return out


def read_ipc(blob: bytes) -> pl.DataFrame:
    """``pl.read_ipc_stream`` of bytes in memory, without a copy of them: the public reader wraps bytes (and
    a ``BytesIO`` shares them) in a ``BytesIO`` whose ``getbuffer`` -- its emptiness check -- copies the whole
    buffer into fresh memory (~4 % of a 1M-judgment build's page faults; docs/scale-out.md, "Session 42")."""
    try:
        from polars.io.ipc.functions import _read_ipc_stream_impl
    except ImportError:  # (another Polars: its public reader)
        return pl.read_ipc_stream(io.BytesIO(blob))
    return _read_ipc_stream_impl(bytes(blob))


def decode_state(blobs: dict[str, bytes]) -> State:
    return {name: read_ipc(b) for name, b in sorted(blobs.items())}


class PartitionChanged(ValueError):
    """A partition file's bytes are not those its ledger names (damaged, replaced, half-copied)."""


# files this process has hashed: (path, inode, size, mtime, ctime) -> sha256.  A build maps ~7 steps over the same
# partitions; each task checks its files, but a file this process read unchanged is not hashed again (at 1M
# judgments in one process: ~3 s of hashing)
_HASHED: dict[tuple[str, int, int, int, int], str] = {}
_HASHED_LOCK = threading.Lock()


def _sha256_of(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    got = _HASHED.get(key)
    if got is None:
        got = sha256_file(path)
        with _HASHED_LOCK:  # (tasks run on threads)
            _HASHED[key] = got
            if len(_HASHED) > 4096:  # (a long-lived worker: forget the oldest)
                _HASHED.pop(next(iter(_HASHED)))
    return got


# unset PREFPIPE_TASK_THREADS: two tasks at once from this many partitions on (measured on 2 cores, one build each way,
# back to back: 10M judgments, 64 partitions, 614.5 -> 558.1 s at the same peak, 3.66 / 3.68 GB; 3M, 16 partitions:
# 161.5 -> 159.8 s for 0.33 GB more; 1M, 4 partitions: no gain, 0.3 GB more -- there the tasks' working sets set the
# peak, at 64 partitions the driver's statistics do; between 16 and 64 not measured)
AUTO_THREADS_FROM = 32


def task_threads(partitions: int = 0, light: bool = False) -> int:
    """Partition tasks run at once in this process (``PREFPIPE_TASK_THREADS``; unset: 1, or 2 on a machine with two
    cores or more for a map over at least :data:`AUTO_THREADS_FROM` ``partitions``, or for any ``light`` map -- tasks
    whose working set is a few columns, while the driver waits): a task's Polars and NumPy work releases the GIL,
    and one task alone leaves a core idle part of the time."""
    raw = os.environ.get("PREFPIPE_TASK_THREADS")
    if raw is None:
        return 2 if (light or partitions >= AUTO_THREADS_FROM) and (os.cpu_count() or 1) >= 2 else 1
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"PREFPIPE_TASK_THREADS={raw!r}: expected a whole number >= 1") from None
    if n < 1:
        raise ValueError(f"PREFPIPE_TASK_THREADS={raw!r}: expected a whole number >= 1")
    return n


def _task(run: Callable[[list[str]], State], paths: tuple[str, ...], sha256s: tuple[str, ...], cache_dir: str,
          key: str, compression: str | None = None) -> dict[str, str]:
    """What runs on a worker: check the partition's files against their sha256 (the cache key
    must describe what was read), run the step on them, write the state into the cache (shared
    storage on a cluster, as the partitions are) and return its tables' sha256s -- a few bytes
    travel back, never the rows."""
    for path, want in zip(paths, sha256s, strict=True):
        got = _sha256_of(path)
        if got != want:
            raise PartitionChanged(f"{path}: sha256 {got[:12]}..., the partition ledger says {want[:12]}...")
    memory.bound_heap()
    state = run(list(paths))
    digests = _cache_write(Path(cache_dir), key, state, compression)
    del state
    memory.release()  # (what the task freed, given back before the next task: pipeline/memory.py)
    return digests


# ---------------------------------------------------------------- the cache of states
def _cache_key(step: Step, ref: PartitionRef) -> str:
    from schemas.version import code_version

    doc = json.dumps({"step": step.name, "version": step.version, "code": code_version(), "partition_sha256": ref.sha256},
                     sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def _cache_read(cache_dir: Path, key: str, wanted: Callable[[str], bool] = lambda _n: True) -> dict[str, bytes] | None:
    """The ``wanted`` tables' bytes of a cached state; every table is checked against the sha256
    its DONE file lists (the others streamed through the hash, not held).  A state that is missing,
    partial or altered counts as not cached (its task runs again)."""
    d = cache_dir / key
    try:
        digests = json.loads((d / "DONE").read_text(encoding="utf-8"))
        if not isinstance(digests, dict):
            return None
        blobs = {}
        for n, want in digests.items():
            if wanted(n):
                blobs[n] = (d / f"{n}.arrow").read_bytes()
                got = hashlib.sha256(blobs[n]).hexdigest()
            else:
                got = sha256_file(d / f"{n}.arrow")
            if got != want:
                return None
    except (OSError, ValueError):
        return None
    return blobs


def _cache_write(cache_dir: Path, key: str, state: State, compression: str | None = None) -> dict[str, str]:
    """A state directory: each table streamed into its file (then hashed), staged and
    renamed into place (a reader sees all of it or nothing).  Returns the tables' sha256s."""
    import pyarrow as pa

    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / key
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        digests = {}
        for name, frame in sorted(state.items()):
            if "/" in name or name.startswith("."):
                raise ValueError(f"state table name {name!r}: expected a plain name")
            with pa.OSFile(str(tmp / f"{name}.arrow"), "wb") as sink:  # (Arrow's own writes: no Python bytes per buffer)
                try:
                    _write_stream(frame, sink, compression)
                except TypeError as err:
                    raise TypeError(f"state table {name!r}: {err}") from None
            digests[name] = sha256_file(tmp / f"{name}.arrow")
        (tmp / "DONE").write_text(json.dumps(digests, sort_keys=True), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _cache_read(cache_dir, key, lambda _n: False) is not None:  # cached meanwhile (another run, a re-run task)
        shutil.rmtree(tmp, ignore_errors=True)
        return digests
    if final.exists():  # a damaged earlier copy (no valid DONE): replace it
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:  # another driver cached the same state first
        shutil.rmtree(tmp, ignore_errors=True)
    return digests


# ---------------------------------------------------------------- runners
@contextmanager
def open_runner(spec: str | None = None) -> Iterator[Any]:
    """``None``/``""``: in process (yields None); ``local``: a 2-process LocalCluster; ``tcp://...``: that
    scheduler.  Yields a ``distributed.Client`` (closed, with its cluster, on exit)."""
    spec = (os.environ.get(ENV, "") if spec is None else spec).strip()
    if not spec:
        yield None
        return
    from distributed import Client, LocalCluster

    if spec == "local":
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=40) as cluster, Client(cluster) as client:
            yield client
    elif spec.startswith(("tcp://", "tls://")):
        with Client(spec) as client:
            yield client
    else:
        raise ValueError(f"{ENV}={spec!r}: expected 'local' or a scheduler address tcp://host:port")


_PROGRESS: ContextVar[Callable[[str, int, int], None] | None] = ContextVar("prefpipe_partition_progress", default=None)


@contextmanager
def partition_progress(report: Callable[[str, int, int], None]) -> Iterator[None]:
    """While inside, every :func:`map_partitions` calls ``report(step name, partitions done,
    partitions)`` as each partition's state is ready (a progress bar's partitions; the CLI's
    ``curate`` shows them on a terminal)."""
    token = _PROGRESS.set(report)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def map_partitions(step: Step, refs: Sequence[PartitionRef], cache_dir: str | Path, *, client: Any = None,
                   on_partition: Callable[[int], None] | None = None,
                   keep: Collection[str] | Callable[[str], bool] | None = None,
                   light: bool = False) -> tuple[list[State], RunStats]:
    """Every partition's state, in partition order (cached ones read back, the others computed
    in this process or on ``client``'s cluster).  Raises :class:`PartitionTaskError` after all
    tasks ended if any failed (the finished ones are cached).  ``on_partition(index)``: called
    on the driver as each partition's state is ready, cached or computed (a progress bar's
    partitions).  ``keep``: the state tables returned (names, or a test of a name; None: all); the others stay in the cache,
    read one partition at a time with :func:`cached_table` (rows with texts a later stage writes:
    the driver never holds every partition's).  ``light``: tasks of a few columns each, two at a time in this
    process on two cores whatever the partition count (:func:`task_threads`)."""
    report = _PROGRESS.get()
    n_done = 0

    def done(i: int) -> None:
        nonlocal n_done
        n_done += 1
        if on_partition is not None:
            on_partition(i)
        if report is not None:
            report(step.name, n_done, len(refs))

    wanted: Callable[[str], bool] = (lambda _n: True) if keep is None else keep if callable(keep) else set(keep).__contains__
    cache_dir = Path(cache_dir)
    refs = sorted(refs, key=lambda r: r.index)
    by_index = {r.index: r for r in refs}
    if len(by_index) != len(refs):
        raise ValueError("partition indexes must be unique")
    stats = RunStats(runner="process" if client is None else "dask")
    blobs: dict[int, dict[str, bytes]] = {}
    todo: list[PartitionRef] = []
    for r in refs:
        got = _cache_read(cache_dir, _cache_key(step, r), wanted)
        if got is None:
            todo.append(r)
        else:
            blobs[r.index] = got
            stats.cached.append(r.index)
            done(r.index)
    failed: dict[int, str] = {}
    first_error: BaseException | None = None

    def finished(r: PartitionRef, digests: dict[str, str]) -> None:
        """The task of ``r`` wrote its state: read back the tables the driver keeps."""
        d = cache_dir / _cache_key(step, r)
        blobs[r.index] = {}
        for n in sorted(digests):
            if wanted(n):
                b = (d / f"{n}.arrow").read_bytes()
                if hashlib.sha256(b).hexdigest() != digests[n]:
                    raise PartitionChanged(f"{d / (n + '.arrow')}: not the bytes its task wrote")
                blobs[r.index][n] = b
        stats.computed.append(r.index)
        done(r.index)

    where = str(cache_dir.resolve())
    comp = state_compression()  # (the driver's setting, sent with each task: a worker's environment may differ)
    if client is None:
        from concurrent.futures import ThreadPoolExecutor

        threads = min(task_threads(len(refs), light), len(todo))
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="prefpipe-task") as pool:
            running = [(r, pool.submit(_task, step.run, r.paths, r.sha256s, where, _cache_key(step, r), comp)) for r in todo] \
                if threads > 1 else [(r, None) for r in todo]
            for r, fut in running:  # (in partition order: the tasks run while earlier ones are read back)
                try:
                    digests = fut.result() if fut is not None else _task(step.run, r.paths, r.sha256s, where,
                                                                         _cache_key(step, r), comp)
                except Exception as err:  # noqa: BLE001 - every partition runs; all failures are reported
                    failed[r.index] = f"{type(err).__name__}: {err}"
                    first_error = first_error or err
                    continue
                finished(r, digests)
    elif todo:
        from distributed import as_completed

        futures = {client.submit(_task, step.run, r.paths, r.sha256s, where, _cache_key(step, r), comp,
                                 key=f"{step.name}-{r.index}-{uuid.uuid4().hex[:8]}", pure=False, retries=0): r
                   for r in todo}
        for fut in as_completed(list(futures)):
            r = futures[fut]
            if fut.status == "error":
                err = fut.exception()
                failed[r.index] = f"{type(err).__name__}: {err}"
                first_error = first_error or err
                continue
            digests = fut.result()
            fut.release()
            finished(r, digests)
    stats.computed.sort()
    if failed:
        raise PartitionTaskError(step.name, failed, by_index, len(blobs)) from first_error
    return [decode_state(blobs[r.index]) for r in refs], stats


def cached_table(step: Step, ref: PartitionRef, cache_dir: str | Path, name: str) -> pl.DataFrame:
    """One table of a partition's cached state (checked against its sha256), after
    :func:`map_partitions` ran ``step`` over it."""
    d = Path(cache_dir) / _cache_key(step, ref)
    try:
        digests = json.loads((d / "DONE").read_text(encoding="utf-8"))
        blob = (d / f"{name}.arrow").read_bytes()
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"step {step.name!r}, partition {ref.index}: no cached table {name!r} ({err})") from err
    if not isinstance(digests, dict) or hashlib.sha256(blob).hexdigest() != digests.get(name):
        raise PartitionChanged(f"{d / (name + '.arrow')}: its sha256 is not the one its DONE file lists")
    return read_ipc(blob)


def iter_table(step: Step, ref: PartitionRef, cache_dir: str | Path, name: str) -> Iterator[pl.DataFrame]:
    """:func:`cached_table` one record batch at a time (at most :data:`BATCH_ROWS` rows held);
    the bytes are hashed as they are read and checked against the DONE file's sha256 at the end
    (:class:`PartitionChanged` then: a caller writing from these rows must discard what it wrote)."""
    for batch in iter_batches(step, ref, cache_dir, name):
        yield pl.from_arrow(batch)  # type: ignore[misc]


def iter_batches(step: Step, ref: PartitionRef, cache_dir: str | Path, name: str) -> Iterator[Any]:
    """:func:`iter_table` as Arrow record batches (filter one in Arrow to keep a few rows: a
    Polars filter keeps the batch's whole string buffers alive behind the rows' views)."""
    import pyarrow as pa

    d = Path(cache_dir) / _cache_key(step, ref)
    try:
        digests = json.loads((d / "DONE").read_text(encoding="utf-8"))
        fh = open(d / f"{name}.arrow", "rb")  # noqa: SIM115 - closed below
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"step {step.name!r}, partition {ref.index}: no cached table {name!r} ({err})") from err
    h = hashlib.sha256()

    class _Hashed(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            n = fh.readinto(b)
            h.update(memoryview(b)[:n])
            return n

    with fh:
        reader = pa.ipc.open_stream(pa.PythonFile(io.BufferedReader(_Hashed()), mode="r"))
        yield from reader
        while rest := fh.read(1 << 20):  # what the reader did not pull (its buffer's bytes were hashed when read)
            h.update(rest)
    if not isinstance(digests, dict) or h.hexdigest() != digests.get(name):
        raise PartitionChanged(f"{d / (name + '.arrow')}: its sha256 is not the one its DONE file lists")


def cached_file(step: Step, ref: PartitionRef, cache_dir: str | Path, name: str) -> tuple[str, str]:
    """(path, sha256) of one table of a partition's cached state: a later step's task of the same
    partition reads it with :func:`read_cached_file` (on a cluster the cache must be on shared storage)."""
    d = Path(cache_dir) / _cache_key(step, ref)
    try:
        digests = json.loads((d / "DONE").read_text(encoding="utf-8"))
        return str((d / f"{name}.arrow").resolve()), str(digests[name])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FileNotFoundError(f"step {step.name!r}, partition {ref.index}: no cached table {name!r} ({err})") from err


def read_cached_file(path: str, sha256: str) -> pl.DataFrame:
    blob = Path(path).read_bytes()
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise PartitionChanged(f"{path}: its sha256 is not the one the driver read")
    return read_ipc(blob)


def table_schema(step: Step, ref: PartitionRef, cache_dir: str | Path, name: str) -> pl.Schema:
    """The columns of one table of a partition's cached state, from its stream's header (no row is read)."""
    import pyarrow as pa

    path = Path(cache_dir) / _cache_key(step, ref) / f"{name}.arrow"
    try:
        with open(path, "rb") as fh:
            schema = pa.ipc.open_stream(fh).schema
    except (OSError, pa.ArrowInvalid) as err:
        raise FileNotFoundError(f"step {step.name!r}, partition {ref.index}: no cached table {name!r} ({err})") from err
    return pl.from_arrow(schema.empty_table()).schema  # type: ignore[union-attr]


def run_step(step: Step, refs: Sequence[PartitionRef], cache_dir: str | Path, *, client: Any = None,
             on_partition: Callable[[int], None] | None = None) -> tuple[State, RunStats]:
    """:func:`map_partitions`, then ``step.reduce`` over the states in partition order."""
    states, stats = map_partitions(step, refs, cache_dir, client=client, on_partition=on_partition)
    return step.reduce(states), stats


def refs_of(*partition_sets: Any) -> list[PartitionRef]:
    """The tasks of one :class:`pipeline.partition.PartitionSet`, or of several with the same
    partition count (one per input file, in input order): partition ``i`` is every set's
    partition ``i``.  Paths are absolute: workers open them."""
    if not partition_sets:
        raise ValueError("refs_of: no partition set")
    ns = {ps.n_partitions for ps in partition_sets}
    if len(ns) != 1:
        raise ValueError(f"refs_of: partition sets with different partition counts {sorted(ns)}")
    return [PartitionRef(i, tuple(str((Path(ps.directory) / ps.partitions[i].path).resolve()) for ps in partition_sets),
                         tuple(ps.partitions[i].sha256 for ps in partition_sets))
            for i in range(ns.pop())]
