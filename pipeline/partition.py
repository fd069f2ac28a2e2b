"""Hash partitions of the ingested judgments by content key, spilled to Parquet with bounded memory.

Issue 15's unit of work: every stage that is *pair-scoped* (its result for a pair depends only
on that pair's judgments) runs per partition, on a worker that reads its partition file itself;
global statistics are reduced from small per-partition states (``pipeline/distributed.py``).

The partition key is the **content key** -- ``prompt_hash | min(a_hash, b_hash) | max(a_hash,
b_hash)`` -- hashed with blake2b (:func:`schemas.text.derive_pair_id_expr`, the very digest a
derived ``pair_id`` is made of), not the ``pair_id`` column:

* exact duplicates are keyed by prompt and the unordered response pair (plus annotator, order
  and verdict), and a re-delivery may carry another given ``pair_id``; keyed by ``pair_id``,
  two copies could land in different partitions and neither would be flagged;
* a derived ``pair_id`` *is* the content hash, so for derived ids (nearly all rows) "all
  judgments of a pair" and "all judgments of a content key" are the same set;
* a *given* ``pair_id`` (or ``review_of``) names one content key unless it is a
  ``pair_id_conflict``; a conflicting id may span partitions.  Its judgments are all dropped,
  and finding it needs only the small table of (given pair_id, content key) rows whose id is not
  the derived one, reduced on the driver (``pipeline/partition_stats.py``, ``given_id_keys``);
* blake2b, unlike Polars' ``hash``, is stable across library versions, so a partition's
  content -- and the cache key of its task -- does not move when Polars is upgraded.

Layout of a partition set (one directory, published by one ``rename(2)``)::

    DIR/partitions.json        n, key, per partition: path, judgments, bytes, sha256; the quarantine's bytes and
                               sha256; ingest ledger, sources
    DIR/part-00000.parquet     the judgments of partition 0, in input order (Judgment schema)
    ...
    DIR/quarantine.parquet     the rows ingest quarantined (no content key: they belong to none)

Memory: ingest reads one block at a time (``ingest_files(on_judgments=...)``); its valid rows are
split by partition into buffers; when the buffers hold ``flush_rows`` rows together, each is
spilled as a small chunk file (an Arrow IPC stream, its texts dictionary-encoded, uncompressed unless
``PREFPIPE_STATE_COMPRESSION`` says otherwise: 10M judgments in 64 partitions spill ~6,400 chunks of ~1,600
rows, 7.5 GB, and a chunk that small is ~3x cheaper to write and ~6x to read back as IPC than as Parquet;
each chunk is deleted once it is compacted), and at the end each partition's chunks are compacted, in order,
into its file (row groups of :data:`ROW_GROUP_ROWS` rows).  The peak is one ingest block plus
about ``2 * flush_rows`` rows, whatever the input size and the partition count.  The same input
with the same ``n_partitions`` and compression gives the same bytes (``flush_rows`` and the block size do not
change them: row groups are cut at fixed row counts; the writer's other options are fixed here).
"""
from __future__ import annotations

import atexit
import hashlib
import io
import json
import math
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute
import pyarrow.ipc
import pyarrow.parquet as pq

from pipeline.hashing import pair_id_expr
from pipeline.readers import UnreadableFile
from schemas.arrow import empty_frame
from schemas.manifest import IngestLedger, SourceInfo
from schemas.policy import DimensionsConfig, IngestConfig
from schemas.records import Judgment

if TYPE_CHECKING:
    from pipeline.ingest import FileHash

__all__ = ["PartitionSet", "PartitionInfo", "partition_files", "partition_inputs", "partition_index", "content_key_hash",
           "partition_count", "read_partition", "merged_ledger", "DEFAULT_PARTITION_ROWS", "DEFAULT_FLUSH_ROWS"]

LEDGER = "partitions.json"
KEY = "first 60 bits of blake2b-64(prompt_hash|min(a_hash,b_hash)|max(a_hash,b_hash)) mod n"
DEFAULT_PARTITION_ROWS = 250_000  # target judgments per partition (~250 MB of 1 KB judgments as JSONL)
DEFAULT_FLUSH_ROWS = 100_000  # rows buffered across all partitions before they are spilled
FROM_ENV = "env"  # partition_files(compression=...): PREFPIPE_STATE_COMPRESSION's
MAX_PARTITIONS = 4096
_COMPRESSION = "zstd"
ROW_GROUP_ROWS = 8_192  # rows per row group of a compacted partition file (a merge of every partition in input order holds one of each)
_FORMAT_VERSION = 2  # 2: the quarantine file's bytes and sha256 in partitions.json
QUARANTINE = "quarantine.parquet"
# min/max statistics only where a reader filters (ids, hashes, time): long texts' statistics
# would sit in every row group's footer entry, which the writer keeps in memory until it closes
_STATS_COLUMNS = ["comparison_id", "batch_id", "pair_id", "prompt_hash", "a_hash", "b_hash", "annotator_id",
                  "created_at", "source_line"]


def content_key_hash() -> pl.Expr:
    """``p-<16 hex>``: the blake2b digest of the content key (equal to a derived ``pair_id``)."""
    return pair_id_expr(pl.col("prompt_hash"), pl.col("a_hash"), pl.col("b_hash"))


def partition_index(frame: pl.DataFrame, n_partitions: int) -> pl.Series:
    """The partition (0..n-1) of every row of a judgments frame: the content key's digest, its
    first 60 bits as an integer, modulo ``n_partitions``."""
    if not 1 <= n_partitions <= MAX_PARTITIONS:
        raise ValueError(f"n_partitions={n_partitions}: expected 1..{MAX_PARTITIONS}")
    if frame.height == 0:
        return pl.Series("_partition", [], dtype=pl.UInt32)
    return frame.select(partition_of_key(content_key_hash(), n_partitions).alias("_partition")).to_series()


def partition_of_key(key: pl.Expr, n_partitions: int) -> pl.Expr:
    """The partition of a content key (``p-<16 hex>``): its first 60 bits modulo ``n_partitions``."""
    return (key.str.slice(2, 15).str.to_integer(base=16, dtype=pl.UInt64) % n_partitions).cast(pl.UInt32)


def partition_count(rows: int, partition_rows: int = DEFAULT_PARTITION_ROWS) -> int:
    """Partitions for about ``rows`` judgments: the power of two that keeps each near ``partition_rows``."""
    if partition_rows < 1:
        raise ValueError(f"partition_rows={partition_rows}: expected >= 1")
    n = 1
    while n * partition_rows < rows and n < MAX_PARTITIONS:
        n *= 2
    return n


def estimate_rows(paths: Iterable[Path], bytes_per_row: int = 1000) -> int:
    """A rough judgment count from file sizes (compressed files counted 4x); it only sizes the
    partition count, which changes memory and parallelism, never results."""
    total = 0
    for p in paths:
        size = Path(p).stat().st_size
        total += size * 4 if str(p).lower().endswith(".gz") else size
    return max(1, math.ceil(total / bytes_per_row))


@dataclass(frozen=True)
class PartitionInfo:
    index: int
    path: str  # relative to the partition set's directory
    judgments: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "path": self.path, "judgments": self.judgments, "bytes": self.bytes, "sha256": self.sha256}


@dataclass
class PartitionSet:
    """A published partition directory (read back from its ``partitions.json``)."""

    directory: Path
    n_partitions: int
    partitions: list[PartitionInfo]
    ledger: IngestLedger
    sources: list[SourceInfo] = field(default_factory=list)
    flush_rows: int = DEFAULT_FLUSH_ROWS
    quarantine: PartitionInfo | None = None  # the quarantine file (index -1; judgments: its rows)

    def path(self, index: int) -> Path:
        return self.directory / self.partitions[index].path

    @property
    def quarantine_path(self) -> Path:
        return self.directory / QUARANTINE

    def read_quarantine(self) -> pl.DataFrame:
        """The quarantined rows, checked against the sha256 ``partitions.json`` names (a changed file would put
        other rows into a version whose id names the inputs)."""
        from pipeline.distributed import PartitionChanged

        blob = self.quarantine_path.read_bytes()
        if self.quarantine is not None and hashlib.sha256(blob).hexdigest() != self.quarantine.sha256:
            raise PartitionChanged(f"{self.quarantine_path}: sha256 {hashlib.sha256(blob).hexdigest()[:12]}..., "
                                   f"the partition ledger says {self.quarantine.sha256[:12]}...")
        return pl.read_parquet(io.BytesIO(blob))

    @classmethod
    def load(cls, directory: str | Path) -> PartitionSet:
        directory = Path(directory)
        meta = json.loads((directory / LEDGER).read_text(encoding="utf-8"))
        if meta.get("format") != _FORMAT_VERSION or meta.get("key") != KEY:
            raise ValueError(f"{directory / LEDGER}: format {meta.get('format')!r} / key {meta.get('key')!r}; "
                             f"expected {_FORMAT_VERSION} / {KEY!r}")
        return cls(directory, meta["n_partitions"], [PartitionInfo(**p) for p in meta["partitions"]],
                   IngestLedger(**meta["ledger"]), [SourceInfo(**s) for s in meta["sources"]], meta["flush_rows"],
                   PartitionInfo(**meta["quarantine"]))

    def changed(self) -> list[str]:
        """The files (partitions, the quarantine) missing or not the bytes ``partitions.json`` names (size, then
        sha256): a set an earlier run left is checked before it is reused, since every task of a changed
        partition fails on it (:class:`pipeline.distributed.PartitionChanged`) however often the run is retried."""
        from pipeline.distributed import _sha256_of  # (memoized by file: a task in this process does not hash it again)

        out = []
        for p in [*self.partitions, *([self.quarantine] if self.quarantine is not None else [])]:
            path = self.directory / p.path
            try:
                if path.stat().st_size != p.bytes or _sha256_of(str(path)) != p.sha256:
                    out.append(p.path)
            except OSError:
                out.append(p.path)
        return out


def read_partition(paths: str | Path | Sequence[str | Path], columns: list[str] | None = None) -> pl.DataFrame:
    """One partition's judgments (what a worker reads; ``columns`` to read narrow).  A partition
    of several input files is the list of their part files, read in input order."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    frames = [pl.read_parquet(p, columns=columns, glob=False) for p in paths]
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")


def merged_ledger(sets: Sequence[PartitionSet]) -> IngestLedger:
    """The ingest ledger of several partition sets (one per input file) together."""
    ledger = IngestLedger()
    for ps in sets:
        ledger = ledger.merged(ps.ledger)
    return ledger


_MEMORY_KNOBS = frozenset({"flush_rows", "batch_rows"})  # change memory, never rows or bytes


def _set_name(file_sha: str, n_partitions: int, options: dict[str, Any]) -> str:
    """A per-file set's directory name: the file's content, the partition count, the ingest
    options (they change the rows) and the code version (so does the code)."""
    from schemas.version import code_version

    opts = {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in sorted(options.items())
            if k not in _MEMORY_KNOBS}
    doc = json.dumps({"options": opts, "code": code_version(), "key": KEY, "format": _FORMAT_VERSION},
                     sort_keys=True, default=str)
    return f"{file_sha}-n{n_partitions}-{hashlib.sha256(doc.encode()).hexdigest()[:12]}"


def _partition_one(path: str, work_dir: str, n_partitions: int, options: dict[str, Any]) -> str:
    """One input file into ``WORK/<file sha256>-n<N>-<options>`` (kept if it is there already): a task."""
    from pipeline.ingest import file_sha256

    out = Path(work_dir) / _set_name(file_sha256(path), n_partitions, options)
    if not (out / LEDGER).exists():
        partition_files([path], out, n_partitions=n_partitions, **options)
    return str(out)


def partition_inputs(paths: Iterable[str | Path], work_dir: str | Path, *, n_partitions: int, client: Any = None,
                     **options: Any) -> list[PartitionSet]:
    """Partition every input file on its own (in this process, or in parallel on ``client``'s Dask
    workers, which read the file and write its set themselves), one set per file under
    ``work_dir`` named by the file's sha256, ``n_partitions``, the options and the code version:
    a retry or a later run with the same file reuses the set.  Partition ``i`` of the input is partition ``i`` of every set, in
    input order (``pipeline.distributed.refs_of(*sets)``); its rows are those
    :func:`partition_files` of all files would put in partition ``i``, in the same order.
    ``options``: the ingest options of :func:`partition_files`.  Raises ``UnreadableFile`` (the
    first in input order) or an error naming the file, after every file's task has ended."""
    paths = [str(Path(p).resolve()) for p in paths]
    work = str(Path(work_dir).resolve())
    Path(work).mkdir(parents=True, exist_ok=True)
    if options.get("compression", FROM_ENV) == FROM_ENV:  # the driver's setting, not each worker's
        from pipeline.distributed import state_compression

        options["compression"] = state_compression()
    if client is None:
        dirs = [_partition_one(p, work, n_partitions, options) for p in paths]
    else:
        from distributed import wait

        futures = [client.submit(_partition_one, p, work, n_partitions, options, pure=False) for p in paths]
        wait(futures)  # every file's task ends (finished sets stay for a retry) before an error is raised
        for p, fut in zip(paths, futures, strict=True):
            if fut.status == "error":
                err = fut.exception()
                if isinstance(err, UnreadableFile):
                    raise err
                raise RuntimeError(f"partitioning {p} failed on a worker: {type(err).__name__}: {err}") from err
        dirs = [fut.result() for fut in futures]
    return [PartitionSet.load(d) for d in dirs]


class _Spill:
    """Per-partition buffers spilled as small chunk files, then compacted into one file each.

    A block is sorted by partition once (stable: input order within a partition) and cut into
    zero-copy slices.  When the buffers hold ``flush_rows`` rows, each non-empty one is written
    as a chunk file (closed at once: an open Parquet writer would keep every row group's footer
    entry in memory, which grows with rows x partitions / flush_rows).  Writing runs on one
    background thread while ingest reads on; at most one flush is in flight, so the buffers
    hold at most ``2 * flush_rows`` rows plus the block being added.

    :meth:`close` compacts each partition's chunks, in order, into ``part-NNNNN.parquet`` with
    row groups of exactly :data:`ROW_GROUP_ROWS` rows (the last one shorter): memory one row
    group per thread, and the bytes depend on the input and the partition count only, not on
    ``flush_rows`` or the block size."""

    def __init__(self, stage: Path, n: int, flush_rows: int, compression: str | None = None) -> None:
        self.stage, self.n, self.flush_rows, self.compression = stage, n, flush_rows, compression
        self.chunks_dir = stage / "chunks"
        self.chunks_dir.mkdir()
        self.buffers: list[list[pa.Table]] = [[] for _ in range(n)]
        self.chunks: list[list[Path]] = [[] for _ in range(n)]
        self.buffered = 0
        self.rows = [0] * n
        self.schema = empty_frame(Judgment).to_arrow().schema
        self.pool = ThreadPoolExecutor(1)
        self.pending: Future[None] | None = None
        self.flushes = 0
        self.sha256s: list[str] = []  # each partition file's, once compacted

    def add(self, frame: pl.DataFrame) -> None:
        if frame.height == 0:
            return
        part = partition_index(frame, self.n)
        counts = np.bincount(part.to_numpy(), minlength=self.n)
        table = frame.with_columns(part).sort("_partition", maintain_order=True).drop("_partition").to_arrow()
        if table.schema != self.schema:
            table = table.cast(self.schema)
        offset = 0
        for p in np.flatnonzero(counts).tolist():
            k = int(counts[p])
            self.buffers[p].append(table.slice(offset, k))
            offset += k
        self.buffered += frame.height
        if self.buffered >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        batch = []
        for p, tables in enumerate(self.buffers):
            if tables:
                path = self.chunks_dir / f"p{p:05d}-c{self.flushes:06d}.arrows"
                batch.append((path, pa.concat_tables(tables)))
                self.chunks[p].append(path)
                self.rows[p] += batch[-1][1].num_rows
        self.buffers = [[] for _ in range(self.n)]
        self.buffered = 0
        self.flushes += 1
        self._wait()
        self.pending = self.pool.submit(_write_chunks, batch, self.compression)

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # a write error surfaces here

    def close(self) -> None:
        self.flush()
        self._wait()
        self.pool.shutdown()
        with ThreadPoolExecutor(2) as pool:  # Arrow's Parquet reader and writer release the GIL
            futs = [pool.submit(_compact, self.chunks[p], self.stage / _part_name(p), self.schema, self.compression)
                    for p in range(self.n)]
            self.sha256s = [fut.result() for fut in futs]
        # the chunks out of the set at once, removed on a thread of their own: on a filesystem mounted with
        # ``discard`` (ext4 here) a file's blocks are discarded synchronously by whoever drops its last reference --
        # at 10M judgments ~6,400 chunks, one compaction thread or the other waiting in the device for seconds
        # (kernel stacks: ``ext4_evict_inode`` -> ``blkdev_issue_discard``); the compaction no longer unlinks them
        trash = self.stage.parent / f".{self.stage.name}.chunks"
        os.rename(self.chunks_dir, trash)
        remove_later(trash)

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _write_chunks(batch: list[tuple[Path, pa.Table]], compression: str | None = None) -> None:
    for path, table in batch:
        table = _dictionary_texts(table)
        # through a file object of our own: Arrow may keep its file open when a write fails (a full disk)
        with open(path, "wb") as fh, pa.ipc.new_stream(fh, table.schema, options=_spill_options(compression)) as out:
            out.write_table(table)


# the columns a spilled chunk stores dictionary-encoded: a pair's judgments repeat its texts, and all of them are in
# one partition (0.75 instead of 1.17 GB of chunks for 1M judgments in 64 partitions; the compaction decodes them)
_DICTIONARY_COLUMNS = ("prompt_text", "response_a", "response_b")


def _dictionary_texts(table: pa.Table) -> pa.Table:
    table = table.combine_chunks()  # one dictionary per column (the slices of a flush window, concatenated)
    for name in _DICTIONARY_COLUMNS:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pa.compute.dictionary_encode(table.column(i)))
    return table


def _spill_options(compression: str | None) -> pa.ipc.IpcWriteOptions:
    """Uncompressed by default: LZ4 over the chunks was a fifth of a partitioning's time (3M judgments in 64
    partitions: 35.6 / 34.2 s with LZ4 chunks without dictionaries, 27.7 / 27.0 s with dictionaries and no
    compression, 30.5 s with both; docs/scale-out.md, "Session 31").  ``PREFPIPE_STATE_COMPRESSION`` (lz4,
    zstd) compresses them too, where the work directory's disk is short or remote."""
    return pa.ipc.IpcWriteOptions(compression=compression)


_REMOVALS: list[threading.Thread] = []


def remove_later(path: Path) -> None:
    """``path`` (a directory nothing reads any more) removed on a thread of its own; a process waits for what is
    left of it before it exits (:func:`wait_removals`), so none is left behind by a finished run."""
    t = threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
                         name="prefpipe-remove", daemon=True)
    t.start()
    _REMOVALS.append(t)


@atexit.register
def wait_removals() -> None:
    while _REMOVALS:
        _REMOVALS.pop().join()


def _compact(chunks: list[Path], out: Path, schema: pa.Schema, compression: str | None = None) -> str:
    """Chunks, in order, into one file with row groups of exactly ROW_GROUP_ROWS rows (Parquet's
    ``compression``: none by default -- every step reads its partition again, and an uncompressed one decodes in
    half the time of zstd's; its texts are dictionary-encoded either way).  Returns the file's sha256.

    The file is built in memory (one partition: ~50 MB at the default partition size) and then hashed and written
    in one call each: Arrow's writer hands a Python file object every page and header on its own (~180k calls at
    10M judgments), each taking the GIL back from the other compaction thread -- at 10M the two threads kept 1.1
    of two cores busy that way."""
    import hashlib

    buf = pa.BufferOutputStream()
    _compact_into(chunks, buf, schema, compression)
    data = buf.getvalue()
    with open(out, "wb") as fh:
        fh.write(data)
    return hashlib.sha256(data).hexdigest()


def _compact_into(chunks: list[Path], sink: Any, schema: pa.Schema, compression: str | None) -> None:
    with pq.ParquetWriter(sink, schema, compression=compression or "none", write_statistics=_STATS_COLUMNS) as writer:
        pending: list[pa.Table] = []
        held = 0
        for chunk in chunks:
            with pa.memory_map(str(chunk)) as src:
                table = pa.ipc.open_stream(src).read_all()
            if table.schema != _spilled_schema(schema):
                raise ValueError(f"{chunk}: a spilled chunk of another schema")
            table = table.cast(schema)  # the texts decoded (the other columns still map the chunk)
            pending.append(table)
            held += table.num_rows
            while held >= ROW_GROUP_ROWS:
                whole = pa.concat_tables(pending)
                writer.write_table(whole.slice(0, ROW_GROUP_ROWS), row_group_size=ROW_GROUP_ROWS)
                rest = whole.slice(ROW_GROUP_ROWS)
                pending, held = [rest], rest.num_rows
        if held or not chunks:
            writer.write_table(pa.concat_tables(pending) if pending else schema.empty_table(), row_group_size=max(held, 1))


def _spilled_schema(schema: pa.Schema) -> pa.Schema:
    for name in _DICTIONARY_COLUMNS:
        i = schema.get_field_index(name)
        schema = schema.set(i, schema.field(i).with_type(pa.dictionary(pa.int32(), schema.field(i).type)))
    return schema


def _part_name(p: int) -> str:
    return f"part-{p:05d}.parquet"


def partition_files(
    paths: Iterable[str | Path],
    directory: str | Path,
    *,
    n_partitions: int | None = None,
    partition_rows: int = DEFAULT_PARTITION_ROWS,
    flush_rows: int = DEFAULT_FLUSH_ROWS,
    fmt: str | None = None,
    batch_id: str | None = None,
    annotator_id: str | None = None,
    annotator_kind: str | None = None,
    batch_rows: int = 50_000,
    limits: IngestConfig | None = None,
    dimensions: DimensionsConfig | None = None,
    on_progress: Callable[[int], None] | None = None,
    hashed: Mapping[str, FileHash | Future[FileHash]] | None = None,
    compression: str | None = FROM_ENV,
) -> PartitionSet:
    """Ingest ``paths`` straight into ``n_partitions`` hash partitions under ``directory``.

    ``n_partitions`` defaults to :func:`partition_count` of :func:`estimate_rows`.  The set is
    staged in a sibling directory and published with one rename; when ``directory`` exists
    already (the same input partitioned before, e.g. by a retried task) it is kept and the
    staged copy removed.  Raises ``UnreadableFile`` like :func:`pipeline.ingest.ingest_files`
    (nothing published).  Every valid judgment lands in exactly one partition: the
    partitions' judgments sum to the ingest ledger's (checked before publishing).
    ``on_progress(rows)``: input rows read, per block (a progress bar's rows).  ``hashed``: inputs
    hashed already (:func:`pipeline.ingest.ingest_files`).  ``compression``: of the chunks spilled while
    partitioning and of the partition files (``none``, ``lz4``, ``zstd``; default ``PREFPIPE_STATE_COMPRESSION``'s,
    itself ``none`` by default): it changes the files' bytes, not their rows.
    """
    from pipeline.ingest import ingest_files

    if flush_rows < 1:
        raise ValueError(f"flush_rows={flush_rows}: expected >= 1")
    paths = [Path(p) for p in paths]
    directory = Path(directory)
    n = n_partitions if n_partitions is not None else partition_count(estimate_rows(paths), partition_rows)
    if not 1 <= n <= MAX_PARTITIONS:
        raise ValueError(f"n_partitions={n}: expected 1..{MAX_PARTITIONS}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    stage = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    stage.mkdir()
    if compression == FROM_ENV:
        from pipeline.distributed import state_compression

        compression = state_compression()
    spill = _Spill(stage, n, flush_rows, None if compression in (None, "none") else compression)
    try:
        res = ingest_files(paths, fmt=fmt, batch_id=batch_id, annotator_id=annotator_id, annotator_kind=annotator_kind,
                           batch_rows=batch_rows, limits=limits, dimensions=dimensions, on_judgments=spill.add,
                           on_progress=on_progress, hashed=hashed)
        spill.close()
        if sum(spill.rows) != res.ledger.judgments:
            raise RuntimeError(f"partitioning lost rows: {sum(spill.rows)} judgments in partitions, "
                               f"{res.ledger.judgments} in the ingest ledger")
        res.quarantine.write_parquet(stage / QUARANTINE, compression=_COMPRESSION)
        blob = (stage / QUARANTINE).read_bytes()  # (re-read what was written: its rows, sha256)
        quarantine = PartitionInfo(-1, QUARANTINE, pl.read_parquet(io.BytesIO(blob)).height, len(blob),
                                   hashlib.sha256(blob).hexdigest())
        infos = []
        for p in range(n):
            f = stage / _part_name(p)
            rows = pq.ParquetFile(f).metadata.num_rows  # re-read what was written
            if rows != spill.rows[p]:
                raise RuntimeError(f"partition {p}: {rows} rows in {f.name}, {spill.rows[p]} written")
            infos.append(PartitionInfo(p, f.name, rows, f.stat().st_size, spill.sha256s[p]))
        meta = {"format": _FORMAT_VERSION, "key": KEY, "n_partitions": n, "flush_rows": flush_rows,
                "partitions": [i.to_dict() for i in infos], "quarantine": quarantine.to_dict(),
                "ledger": res.ledger.model_dump(),
                "sources": [s.model_dump() for s in res.sources]}
        (stage / LEDGER).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
        try:
            os.rename(stage, directory)
        except OSError:
            if not (directory / LEDGER).exists():
                raise
            shutil.rmtree(stage, ignore_errors=True)  # published before us (same input): keep theirs
    except BaseException:
        spill.abort()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return PartitionSet.load(directory)
