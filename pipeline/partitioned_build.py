"""A first version built over partitions (issue 15; docs/scale-out.md, "The flow the bricks add up
to", rows 1-6): the driver holds states, per-pair narrow tables and one part's rows at a time,
never the judgments' texts.

:func:`build_first` writes the version :func:`pipeline.curate._build_version` writes for the same
input and no parent -- every table, the manifest's ledger and checks, the report -- from a
:class:`pipeline.partition.PartitionSet`:

1. facts per partition (each comparison id's hash and input position, the given pair ids' content
   keys, reviews, dimension verdicts); a comparison id used twice keeps its first row in input
   order (the partitions that hold a later copy are written again without it); a given pair id
   naming contents in several partitions has them put in one (:func:`_together`); reviews whose
   texts differ from the pair they name get their own pair id (:func:`_attach_reviews`); with
   ``dimensions.train_on`` the partitions are relabelled with that dimension's verdicts (the
   judgments table keeps them as given);
2. :func:`pipeline.partitioned.analyze` (the preliminary consensus and the checks; the near
   duplicates through the state tables a version keeps); the annotator registry's check per
   partition (:func:`pipeline.partition_checks.registry_check`);
3. :func:`pipeline.partition_select.select` (drops, the final fit, select, split), each partition's
   rows in this version's table layout;
4. the pair tables merged part by part from the partitions' rows
   (:func:`pipeline.partition_write.merge_grouped`); the judgments in input order, merged from
   the partitions (each in input order) and written as they stream; the per-pair state tables,
   flags and the review state from the driver's narrow frames; the manifest and the report.

Every first version is built here (:func:`pipeline.curate.curate`; tested equal to the one-process
reference build: a registry, reviews, dimension verdicts, ``train_on``).  Not covered: a parent (a
child is built in one process).  The partition rewrites of step 1 are tasks (:func:`_rewrite`): a
worker reads its partition and writes the new one next to it.
"""
from __future__ import annotations

import heapq
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import aggregate as agg
from pipeline import incremental as inc
from pipeline import memory
from pipeline import partition_checks as pk
from pipeline import partition_select as ps
from pipeline import reviews_resolve as rr
from pipeline import select as sel
from pipeline.checks import CHECKS, all_flags, run_checks
from pipeline.delta import PAIR_ROWS
from pipeline.distributed import PartitionRef, State, Step, iter_table, map_partitions, read_ipc, refs_of, state_compression
from pipeline.hashing import pair_id_expr
from pipeline.partition import PartitionSet, content_key_hash, partition_of_key, read_partition
from pipeline.partition_stats import given_id_keys
from pipeline.partition_write import Output, merge_grouped, merge_into
from pipeline.partition_consensus import input_order
from pipeline.partitioned import analyze
from pipeline.parts import (FINGERPRINTS, GROUPS, OTHER_KEY, PartReuse, TableWriter, appended_key, bucket_counts,
                            drop_columns, generation_groups, part_keys, share)
from pipeline.split import PLACEMENT, SPLITS, _stats_of_counts, assignments, leakage
from pipeline.store import Store, sha256_file, sync_file
from schemas.arrow import empty_frame
from schemas.manifest import Ledger, Manifest, SplitInfo, TableInfo
from schemas.policy import Policy
from schemas.records import Judgment
from schemas.version import code_version

__all__ = ["build_first"]

_ID_SEED = 0x1D5
ROW_GROUP_ROWS = 65_536  # of a table streamed into one part (the judgments)


# ---------------------------------------------------------------- 1. facts: repeated comparison ids, reviews, dimensions
def _facts_run(paths: list[str]) -> State:
    part = read_partition(paths, ["comparison_id", "review_of", "dimensions", "source_file", "source_line", "pair_id",
                                  "prompt_hash", "a_hash", "b_hash"])
    # (each comparison id's hash alone: the driver looks for repeated hashes among every judgment's -- 8 bytes a
    # judgment; with each row's file and line as well the driver held ~1.4 GB more at 10M judgments)
    return {"ids": part.select(h=pl.col("comparison_id").hash(_ID_SEED)),
            "given": given_id_keys(part),
            "facts": pl.DataFrame({"reviews": [part.height - part["review_of"].null_count()],
                                   "dimensions": [part.height - part["dimensions"].null_count()]})}


FACTS = Step("build-facts", f"3-{pl.__version__}", _facts_run, lambda states: states[0])


def _ids_run(hashes: tuple[int, ...], paths: list[str]) -> State:
    part = read_partition(paths, ["comparison_id", "source_file", "source_line"])
    h = pl.Series(hashes, dtype=pl.UInt64)
    return {"rows": part.filter(pl.col("comparison_id").hash(_ID_SEED).is_in(h.implode()))}


def _ids_step(hashes: list[int]) -> Step:
    import functools
    import hashlib

    key = hashlib.sha256(np.array(sorted(hashes), np.uint64).tobytes()).hexdigest()[:16]
    return Step("build-repeated-ids", f"1-{pl.__version__}-{key}", functools.partial(_ids_run, tuple(sorted(hashes))),
                lambda states: states[0])


# rows in input order: by place, and the rows of one place (a rated row's judgments) as the ingest orders them
# (pipeline.ingest.IN_ROW_ORDER)
_IN_PLACE = ("_o", "pair_id", "comparison_id")


def _order(_frame: pl.DataFrame, sources: list[str]) -> pl.Expr:
    """A row's place in the input (:func:`pipeline.partition_consensus.input_order`)."""
    return input_order(sources)


def _without_repeated_ids(refs: list[PartitionRef], sources: list[str], work: Path, client: Any) -> tuple[list[PartitionRef], int, dict[str, int]]:
    """(the partitions without the later copies of a repeated comparison id and with every given
    pair id in one (:func:`_together`), how many were left out, the input's facts)."""
    states, _ = map_partitions(FACTS, refs, work / "states", client=client)
    facts = {k: int(sum(s["facts"][k][0] for s in states)) for k in ("reviews", "dimensions")}
    given = [s.pop("given") for s in states]
    ids = pl.concat([s["ids"] for s in states])
    del states
    cand = ids.filter(pl.col("h").is_duplicated())["h"].unique()
    del ids
    if cand.len() == 0:
        return _together(refs, given, sources, work, client), 0, facts
    step = _ids_step(cand.to_list())
    found, _ = map_partitions(step, refs, work / "states", client=client)
    rows = pl.concat([s["rows"].with_columns(_p=pl.lit(r.index, pl.Int32)) for r, s in zip(refs, found, strict=True)])
    rows = rows.with_columns(_o=_order(rows, sources)).sort("_o")
    later = rows.filter(~pl.col("comparison_id").is_first_distinct())
    if later.height == 0:  # (only hash collisions)
        return _together(refs, given, sources, work, client), 0, facts
    out, _ = _rewrite("drop-places", later.select("_o", "comparison_id"), sources, refs, set(later["_p"].to_list()), work, client)
    return _together(out, given, sources, work, client), later.height, facts


def _together(refs: list[PartitionRef], given: list[pl.DataFrame], sources: list[str], work: Path, client: Any
              ) -> list[PartitionRef]:
    """The partitions with every given pair id's judgments in one: a given id that names contents
    in several partitions (a ``pair_id_conflict``) would have its pair decided from part of its
    judgments.  The contents such ids link (closed: an id among them naming yet another content
    brings that one) move, every judgment of them, into the first of their partitions, in input
    order -- every content key's judgments and every pair id's stay in one partition."""
    c = pl.col
    keys = pl.concat([g.with_columns(_p=pl.lit(r.index, pl.Int32)) for r, g in zip(refs, given, strict=True)])
    keys = pl.concat([keys, _derived_homes(keys, len(refs))])
    across = keys.group_by("pair_id").agg(c("_p").n_unique().alias("n")).filter(c("n") > 1)["pair_id"]
    if across.len() == 0:
        return refs
    linked = keys.filter(c("pair_id").is_in(across.implode()))["content_key"].unique()
    while True:
        ids = keys.filter(c("content_key").is_in(linked.implode()))["pair_id"].unique()
        grown = keys.filter(c("pair_id").is_in(ids.implode()))["content_key"].unique()
        if grown.len() == linked.len():
            break
        linked = grown
    where = keys.filter(c("content_key").is_in(linked.implode())).select("content_key", "_p").unique()
    target = int(where["_p"].min())  # type: ignore[arg-type]
    moving = linked.to_frame("content_key")
    movers = set(where["_p"].to_list()) - {target}
    # the rows that move (a few: those of the linked contents), gathered from their partitions, then each
    # partition written again: without them, or (the target) with them in input order
    found, _ = map_partitions(_rows_step(moving), [r for r in refs if r.index in movers], work / "states", client=client)
    moved = pl.concat([f["rows"] for f in found])
    out, _ = _rewrite("without-contents", moving, sources, refs, movers, work, client)
    out, _ = _rewrite("with-rows", moved, sources, out, {target}, work, client)
    return out


def _derived_homes(keys: pl.DataFrame, n: int) -> pl.DataFrame:
    """A given id of the derived form (``p-<16 hex>``) also names the content whose key it is:
    those rows carry no given id (no key lists them), so each such id gets a key of its own --
    (id, that content key, the partition that content's rows are in).  An id that names no content
    moves nothing: its partition holds no rows of that key."""
    c = pl.col
    ids = keys.filter(c("pair_id").str.contains(r"^p-[0-9a-f]{16}$")).select("pair_id").unique()
    return ids.select("pair_id", content_key=c("pair_id"), _p=partition_of_key(c("pair_id"), n).cast(pl.Int32))


# ---------------------------------------------------------------- partitions written again, as tasks
# (a worker reads its partition and writes the new file next to it, on the shared filesystem: the driver never reads
# a partition's rows for these)
def _drop_places(part: pl.DataFrame, arg: pl.DataFrame, sources: list[str]) -> pl.DataFrame:
    # a judgment is its place and its comparison id: a rated row's judgments share its place (one of them a later
    # copy of an id leaves the others)
    return part.with_columns(_o=_order(part, sources)).join(arg.select("_o", "comparison_id"), on=["_o", "comparison_id"],
                                                            how="anti", maintain_order="left").drop("_o")


def _without_contents(part: pl.DataFrame, arg: pl.DataFrame, _sources: list[str]) -> pl.DataFrame:
    return part.filter(~content_key_hash().is_in(arg["content_key"].implode()))


def _with_rows(part: pl.DataFrame, arg: pl.DataFrame, sources: list[str]) -> pl.DataFrame:
    return pl.concat([part, arg.select(part.columns)]).sort(_order(part, sources), "pair_id", "comparison_id",
                                                            maintain_order=True)


def _new_pair_ids(part: pl.DataFrame, arg: pl.DataFrame, _sources: list[str]) -> pl.DataFrame:
    return part.join(arg, on="comparison_id", how="left", maintain_order="left") \
        .with_columns(pair_id=pl.coalesce("_pid", "pair_id")).drop("_pid")


def _train_on(part: pl.DataFrame, arg: pl.DataFrame, _sources: list[str]) -> pl.DataFrame:
    from pipeline import dimensions as dims
    from schemas.policy import DimensionsConfig

    return dims.for_training(part, DimensionsConfig.model_validate_json(arg["config"][0]))[0]


_CHANGES: dict[str, Callable[[pl.DataFrame, pl.DataFrame, list[str]], pl.DataFrame]] = {
    "drop-places": _drop_places, "without-contents": _without_contents, "with-rows": _with_rows,
    "new-pair-ids": _new_pair_ids, "train-on": _train_on}


def _rewrite_run(kind: str, arg_ipc: bytes, sources: tuple[str, ...], directory: str, compression: str | None,
                 paths: list[str]) -> State:
    import io

    part = read_partition(paths)
    before = part.height
    part = _CHANGES[kind](part, read_ipc(arg_ipc), list(sources))
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".part.{os.getpid()}.{threading.get_ident()}.tmp"
    # (compressed as ingest compresses partitions: none unless PREFPIPE_STATE_COMPRESSION says, the driver's setting)
    part.write_parquet(tmp, compression=compression or "uncompressed", statistics=True, row_group_size=8_192)
    sha = sha256_file(tmp)
    import re

    # (named by its partition -- its first file's name says which -- and its content: a re-run writes the same name)
    index = re.match(r"part-\d{5}", Path(paths[0]).name)
    path = d / f"{index.group(0) if index else 'part'}-{sha[:16]}.parquet"
    os.replace(tmp, path)
    return {"file": pl.DataFrame({"path": [str(path.resolve())], "sha256": [sha], "left_out": [before - part.height]})}


def _rewrite(kind: str, arg: pl.DataFrame, sources: list[str], refs: list[PartitionRef], which: Collection[int],
             work: Path, client: Any) -> tuple[list[PartitionRef], int]:
    """The partitions ``which`` of ``refs`` written again by ``_CHANGES[kind]`` with ``arg`` (the
    others as they are), each by a task; (the partitions, the rows the change left out)."""
    import functools
    import hashlib
    import io

    todo = [r for r in refs if r.index in set(which)]
    if not todo:
        return refs, 0
    buf = io.BytesIO()
    arg.write_ipc_stream(buf, compat_level=pl.CompatLevel.oldest())
    blob = buf.getvalue()
    key = hashlib.sha256(blob + "\n".join(sources).encode()).hexdigest()[:16]
    step = Step(f"rewrite-{kind}", f"1-{pl.__version__}-{key}",
                functools.partial(_rewrite_run, kind, blob, tuple(sources), str((work / "rewritten").resolve()),
                                  state_compression()),
                lambda states: states[0])
    states, _ = map_partitions(step, todo, work / "states", client=client)
    files = {r.index: s["file"].row(0, named=True) for r, s in zip(todo, states, strict=True)}
    out = [PartitionRef(r.index, (files[r.index]["path"],), (files[r.index]["sha256"],)) if r.index in files else r
           for r in refs]
    return out, int(sum(f["left_out"] for f in files.values()))


def _rows_run(keys: tuple[str, ...], paths: list[str]) -> State:
    part = read_partition(paths)
    return {"rows": part.filter(content_key_hash().is_in(pl.Series(keys, dtype=pl.String).implode()))}


def _rows_step(keys: pl.DataFrame) -> Step:
    import functools
    import hashlib

    k = tuple(sorted(keys["content_key"].to_list()))
    return Step("build-linked-rows", f"1-{pl.__version__}-{hashlib.sha256(chr(10).join(k).encode()).hexdigest()[:16]}",
                functools.partial(_rows_run, k), lambda states: states[0])


# ---------------------------------------------------------------- 1b. reviews: attached to the pairs they name, or not
_REVIEW_COLUMNS = ["comparison_id", "pair_id", "review_of", "annotator_id", "annotator_kind", "label", "strength",
                   "prompt_hash", "a_hash", "b_hash", "locale", "rubric", "created_at", "source_file", "source_line"]


def _reviews_run(paths: list[str]) -> State:
    part = read_partition(paths, _REVIEW_COLUMNS)
    return {"reviews": part.filter(pl.col("review_of").is_not_null())}


REVIEWS = Step("build-reviews", f"1-{pl.__version__}", _reviews_run, lambda states: states[0])


def _named_run(ids: tuple[str, ...], paths: list[str]) -> State:
    part = read_partition(paths, ["pair_id", "review_of", "prompt_hash", "a_hash", "b_hash", "source_file", "source_line",
                                  "comparison_id"])
    named = pl.Series(ids, dtype=pl.String)
    return {"rows": part.filter(pl.col("review_of").is_null() & pl.col("pair_id").is_in(named.implode())).drop("review_of")}


def _named_step(ids: list[str]) -> Step:
    import functools
    import hashlib

    ids_ = tuple(sorted(set(ids)))
    key = hashlib.sha256("\n".join(ids_).encode()).hexdigest()[:16]
    return Step("build-reviewed-pairs", f"2-{pl.__version__}-{key}", functools.partial(_named_run, ids_),
                lambda states: states[0])


def _review_rows(refs: list[PartitionRef], sources: list[str], work: Path, client: Any) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(every review row in input order with its partition ``_p``; per pair a review names, the
    content of its first non-review judgment in input order: ``_ph``, ``_lo``, ``_hi``)."""
    c = pl.col
    states, _ = map_partitions(REVIEWS, refs, work / "states", client=client)
    rows = pl.concat([s["reviews"].with_columns(_p=pl.lit(r.index, pl.Int32)) for r, s in zip(refs, states, strict=True)])
    rows = rows.with_columns(_o=_order(rows, sources)).sort(*_IN_PLACE)
    found, _ = map_partitions(_named_step(rows["review_of"].unique().to_list()), refs, work / "states", client=client)
    named = pl.concat([f["rows"] for f in found])
    ref = named.with_columns(_o=_order(named, sources)).sort(*_IN_PLACE).group_by("pair_id", maintain_order=True).agg(
        _ph=c("prompt_hash").first(), _lo=pl.min_horizontal("a_hash", "b_hash").first(),
        _hi=pl.max_horizontal("a_hash", "b_hash").first())
    return rows, ref


def _attach_reviews(refs: list[PartitionRef], sources: list[str], work: Path, client: Any) -> list[PartitionRef]:
    """:func:`pipeline.reviews_resolve.attach` over partitions: a review whose prompt or responses
    differ from the first non-review judgment (in input order) of the pair it names takes its own
    content-derived pair_id -- its partition (the partition key is the content) is written again
    with it."""
    c = pl.col
    rows, ref = _review_rows(refs, sources, work, client)
    joined = rows.join(ref, left_on="review_of", right_on="pair_id", how="left", maintain_order="left")
    bad = c("_ph").is_not_null() & ((c("prompt_hash") != c("_ph")) | (pl.min_horizontal("a_hash", "b_hash") != c("_lo"))
                                    | (pl.max_horizontal("a_hash", "b_hash") != c("_hi")))
    rows = joined.filter(bad).select("comparison_id", "_p", _pid=pair_id_expr(c("prompt_hash"), c("a_hash"), c("b_hash")))
    return _rewrite("new-pair-ids", rows.drop("_p"), sources, refs, set(rows["_p"].to_list()), work, client)[0]


def _review_frame(refs: list[PartitionRef], sources: list[str], work: Path, client: Any) -> pl.DataFrame:
    """What :func:`pipeline.reviews_resolve.classify` reads of the partitions (reviews attached): the
    review rows and one row per named pair that a non-review judgment has."""
    rows, ref = _review_rows(refs, sources, work, client)
    known = ref.select("pair_id", review_of=pl.lit(None, pl.String))
    return pl.concat([rows.select(_REVIEW_COLUMNS), known], how="diagonal")


def _for_training(refs: list[PartitionRef], sources: list[str], cfg: Any, work: Path, client: Any
                  ) -> tuple[list[PartitionRef], dict[str, int]]:
    """``dimensions.train_on``: every partition written again with its judgments' verdicts on that
    dimension as their labels (:func:`pipeline.dimensions.for_training`; those without one left
    out and counted)."""
    out, off = _rewrite("train-on", pl.DataFrame({"config": [cfg.model_dump_json()]}), sources, refs,
                        {r.index for r in refs}, work, client)
    return out, ({f"no_verdict_on_{cfg.train_on}": off} if off else {})


# ---------------------------------------------------------------- 4. the judgments in input order
def _input_order_batches(refs: list[PartitionRef], sources: list[str], columns: list[str] | None,
                         batch_rows: int = 8_192, read_rows: int | None = None) -> Iterator[pa.Table]:
    """Every partition's rows merged in input order (each partition is in input order), in
    batches of ``batch_rows``, as Arrow tables (never converted: a conversion copies every string);
    each partition read ``read_rows`` (default: ``batch_rows``) rows at a time.
    Each row's place in the input is read first (8 bytes a row); the places sorted say how many
    rows of each partition the next batch takes, so every partition is then read once, front to
    back, and each batch is one sort of its own rows."""
    import pyarrow.compute as pc

    keys = [_places(r, sources) for r in refs]
    every = np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    # rows sharing a place (a rated row's judgments, in one partition or in several): ordered by their pair ids, then
    # their comparison ids, as the ingest gave them
    tied = bool((np.diff(every) == 0).any())
    read = None if columns is None else list(dict.fromkeys([*columns, "source_file", "source_line",
                                                            *(["pair_id", "comparison_id"] if tied else [])]))
    readers = [_batches(r, read, read_rows or batch_rows) for r in refs]
    held: list[list[pa.RecordBatch]] = [[] for _ in refs]
    taken = np.zeros(len(refs), np.int64)
    names = pa.array(sources, pa.string())
    try:
        for end in range(batch_rows, every.size + batch_rows, batch_rows):
            last = every[min(end, every.size) - 1]
            upto = np.array([np.searchsorted(k, last, side="right") for k in keys], np.int64)
            pieces = []
            for i, n in enumerate((upto - taken).tolist()):
                while n > 0:
                    if not held[i]:
                        held[i].append(next(readers[i]))
                    b = held[i][0]
                    pieces.append(b.slice(0, n))
                    held[i][0] = b.slice(n)
                    n -= min(n, b.num_rows)
                    if held[i][0].num_rows == 0:
                        held[i].pop(0)
            taken = upto
            if not pieces:  # (a place's rows past a batch's end: taken whole by the batch before)
                continue
            batch = pa.Table.from_batches(pieces)
            idx = pc.index_in(pc.cast(batch["source_file"], pa.string()), value_set=names)
            place = pc.add(pc.multiply(pc.cast(idx, pa.int64()), 1 << 40), pc.cast(batch["source_line"], pa.int64()))
            if tied:  # (pipeline.ingest.IN_ROW_ORDER)
                order = pa.table({"o": place, "p": pc.cast(batch["pair_id"], pa.string()),
                                  "c": pc.cast(batch["comparison_id"], pa.string())})
                batch = batch.take(pc.sort_indices(order, sort_keys=[(k, "ascending") for k in ("o", "p", "c")]))
            else:
                batch = batch.take(pc.sort_indices(place))
            yield batch if columns is None else batch.select(columns)
    finally:  # (each reader holds an open file: closed now, also when the consumer stops early)
        for r in readers:
            r.close()


def _places(ref: PartitionRef, sources: list[str]) -> np.ndarray:
    """Each row's place in the input.  Rows of one place -- a rated row's judgments -- are in the order of their
    pair ids, then comparison ids (the ingest's, :data:`pipeline.ingest.IN_ROW_ORDER`): checked where a partition
    holds some."""
    f = read_partition(list(ref.paths), ["source_file", "source_line"])
    o = f.select(_order(f, sources)).to_series().to_numpy()
    d = np.diff(o)
    if (d > 0).all():
        return o
    if (d < 0).any():
        raise ValueError(f"partition {ref.index}: its rows are not in input order")
    ids = read_partition(list(ref.paths), ["pair_id", "comparison_id"]).with_columns(_o=pl.Series(o))
    tied = ids.filter(pl.col("_o").is_duplicated())
    if not tied.equals(tied.sort(*_IN_PLACE, maintain_order=True)) or tied.is_duplicated().any():
        raise ValueError(f"partition {ref.index}: the rows of one input line are not in the order of their pair and "
                         "comparison ids")
    return o


def _batches(ref: PartitionRef, columns: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
    for path in ref.paths:
        # a buffered read of one page at a time, decoded on this thread: reading every partition at once holds only
        # a batch of each (pre-buffered column chunks and read-ahead held ~0.1 GB per partition at 1M judgments)
        with pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20) as f:
            yield from f.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)


class _Streamed:
    """A table that only grows, first version: its rows in parts of at most ``cap`` rows (in input order;
    :func:`pipeline.parts.appended_slices`), written as the batches come, in row groups of
    :data:`ROW_GROUP_ROWS` (a part's last one may be shorter): the file layout is the rows', whatever the
    batches' sizes."""

    def __init__(self, store: Store, stage: Path, name: str, version_id: str, schema: pl.Schema,
                 cap: int | None = None) -> None:
        self.store, self.writer = store, TableWriter(store, stage, name, arrival_order=True)
        self.stage, self.name, self.version_id, self.cap = stage, name, version_id, cap
        self.schema = pl.DataFrame(schema=schema).to_arrow().schema
        self.rows = 0  # rows added
        self.held: list[pa.Table] = []  # rows added, not yet written
        self._fh: Any = None  # the part being written (None: none open)
        self._out: pq.ParquetWriter | None = None
        self._rel, self._part_rows = "", 0

    def _open(self) -> pq.ParquetWriter:
        if self._out is None:
            self._rel = f"{self.name}/part-{appended_key(self.version_id, len(self.writer.parts))}.parquet"
            path = self.stage / self._rel
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "wb")  # noqa: SIM115 - closed by _seal() / close()
            self._out = pq.ParquetWriter(self._fh, self.schema, compression="zstd", compression_level=1,
                                         write_statistics=True)
            self._part_rows = 0
        return self._out

    def _seal(self) -> None:
        """The open part finished: closed, synced, its row count read back, hashed, shared."""
        assert self._out is not None
        self._out.close()
        self._fh.flush()
        path = self.stage / self._rel
        sync_file(self._fh.fileno(), path)
        self._fh.close()
        if pq.ParquetFile(path).metadata.num_rows != self._part_rows:
            raise OSError(f"{path}: wrote {self._part_rows} rows, read back another count")
        sha = sha256_file(path)
        share(self.store, path, sha)
        self.writer.parts.append(SplitInfo(path=self._rel, rows=self._part_rows, sha256=sha, bytes=path.stat().st_size))
        self._out = self._fh = None

    def _drain(self, final: bool) -> None:
        """Write the held rows in full row groups (``final``: all of them), a part sealed when it holds ``cap`` rows."""
        held = sum(t.num_rows for t in self.held)
        while held:
            room = self.cap - self._part_rows if self.cap is not None and self._out is not None else self.cap
            take = ROW_GROUP_ROWS if room is None else min(ROW_GROUP_ROWS, room)
            if held < take and not final:
                return
            take = min(take, held)
            rows = pa.concat_tables(self.held)
            self.held = [rows.slice(take)] if take < held else []
            self._open().write_table(rows.slice(0, take), row_group_size=take)
            self._part_rows += take
            held -= take
            if self.cap is not None and self._part_rows >= self.cap:
                self._seal()

    def add(self, batch: pa.Table) -> None:
        self.held.append(batch.select(self.schema.names).cast(self.schema))
        self.rows += batch.num_rows
        self._drain(final=False)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
        if self._fh is not None:
            self._fh.close()

    def finish(self) -> TableInfo:
        self._drain(final=True)
        if self._out is not None or not self.writer.parts:  # (no rows at all: one empty part with the schema)
            if self._out is None:
                self._open().write_table(self.schema.empty_table())
            self._seal()
        if sum(p.rows for p in self.writer.parts) != self.rows:
            raise OSError(f"{self.name}: wrote {sum(p.rows for p in self.writer.parts)} rows of {self.rows}")
        return self.writer.info()


def _streamed_tables(store: Store, stage: Path, version_id: str, batches: Iterator[pa.Table],
                     schemas: dict[str, pl.Schema], stop: threading.Event | None = None,
                     cap: int | None = None) -> dict[str, TableInfo]:
    """Tables that only grow (the judgments and the columns a child reads of every row), written from
    one pass over ``batches`` (each table takes its columns of every batch), in parts of at most ``cap``
    rows.  ``stop``: set by another thread to end the pass early (the build failed; nothing is returned)."""
    outs = [_Streamed(store, stage, name, version_id, schema, cap) for name, schema in schemas.items()]
    try:
        for b in batches:
            if stop is not None and stop.is_set():
                raise _Stopped
            for o in outs:
                o.add(b)
        return {name: o.finish() for name, o in zip(schemas, outs, strict=True)}
    finally:
        for o in outs:
            o.close()


class _Stopped(Exception):
    """The build stopped the background write (it failed elsewhere)."""


class _Background:
    """``fn(stop)`` on a thread of its own: :meth:`result` joins it and re-raises its error;
    :meth:`cancel` asks it to stop (``stop`` is set) and waits for it."""

    def __init__(self, fn: Callable[[threading.Event], Any], name: str) -> None:
        self._stop = threading.Event()
        self._out: Any = None
        self._err: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[threading.Event], Any]) -> None:
        try:
            self._out = fn(self._stop)
        except BaseException as err:  # noqa: BLE001 - handed to the joining thread
            self._err = err

    def result(self) -> Any:
        self._thread.join()
        if self._err is not None:
            raise self._err
        return self._out

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- the build
def build_first(store: Store, stage: Path, version_id: str, pset: PartitionSet, policy: Policy, *, work: Path,
                client: Any = None, on_stage: Callable[[str, float], None] | None = None,
                timings: dict[str, float] | None = None) -> Manifest:
    """The first version (no parent) of the partitioned input ``pset``, staged in ``stage``
    (:meth:`pipeline.store.Store.write_version` publishes it)."""
    from pipeline.curate import FLAG_ORDER, _annotator_summary, _grouped_table, _split_check, _stability_check

    timings = timings if timings is not None else {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        memory.release()
        now = time.perf_counter()
        timings[name] = round(now - t, 3)
        if on_stage is not None:
            on_stage(name, now - t)
        t = now

    created_at = datetime.now(UTC)
    sources = [s.path for s in pset.sources]
    refs, n_dup_ids, facts = _without_repeated_ids(refs_of(pset), sources, work, client)
    if facts["reviews"]:
        refs = _attach_reviews(refs, sources, work, client)
    given_refs, no_verdict = refs, {}  # (the judgments as given: judgments.parquet keeps them so)
    if policy.dimensions.train_on:
        refs, no_verdict = _for_training(refs, sources, policy.dimensions, work, client)
    review_rows = _review_frame(refs, sources, work, client) if facts["reviews"] else empty_frame(Judgment)
    lap("partitions:facts")
    schemas = {"judgments": empty_frame(Judgment).schema, inc.JUDGMENT_ROWS: inc.judgment_rows(empty_frame(Judgment)).schema}
    # the judgments (and the columns a child reads of every row) in input order, written on a thread of their own
    # while the checks (after the near-duplicate index) and select run: the partitions without the repeated ids are
    # all they read
    # (the merge holds a read batch of every partition: 32k rows in all, at least 1,024 a partition -- at 3M judgments,
    # 16 partitions, the write peaked 0.23 GB lower with 2,048-row reads than with 8,192, in the same time)
    read_rows = max(1_024, min(4_096, 32_768 // max(1, len(refs))))
    background: list[_Background] = []

    def write_judgments() -> None:
        background.append(_Background(lambda stop: _streamed_tables(store, stage, version_id, _input_order_batches(
            given_refs, sources, None, read_rows=read_rows), schemas, stop, cap=policy.ingest.partition_rows),
            "prefpipe-judgments"))

    try:
        nd_tables: dict[str, TableInfo] = {}

        def write_near_dup_state(state: Any) -> None:  # (as soon as it exists: the driver then lets go of the index)
            nd_tables.update(state.write_state(store, stage))
            # the judgments' merge starts once the index is gone: beside it (the driver's largest statistic) the two
            # peaked together (10M judgments: 4.87 GB)
            write_judgments()

        a = analyze(refs, work, policy.checks, sources, client=client, version_id=version_id, near_dup_sink=write_near_dup_state,
                    dimension_rule=policy.dimensions)
        assert a.lengths is not None
        lap("partitions:checks")
        timings.update({f"partitions:checks/{k}": v for k, v in a.seconds.items()})  # (where the stage's time went)
        # the registry check per partition (without a registry it only counts the judgments); the reviews check on
        # the review rows and the pairs they name (a first version: no pair was routed before, none is resolved)
        review_ctx = rr.context(None, mode=policy.reviews.mode, registry=policy.annotators)
        from pipeline.checks import registry
        from pipeline.checks import reviews as reviews_check

        reg = registry.result(None, a.n_judgments) if policy.annotators is None else \
            pk.registry_check(refs, work / "states", policy.annotators, client=client)
        results = {**a.results, "registry": reg,
                   "reviews": reviews_check.run(review_rows, policy.checks, reviews=review_ctx)}
        results = run_checks(empty_frame(Judgment), policy.checks, pairs=a.pairs,
                             extra_kwargs={"reviews": {"reviews": review_ctx}}, given=results)
        results = {c.name: results[c.name] for c in CHECKS}  # (registry order, as run_checks gives them)
        flags = all_flags(results)
        n_pairs = a.pairs.height
        groups = generation_groups(None, version_id, n_pairs)
        my_group = groups.filter(pl.col("generation") == version_id)["group"][0]
        buckets = bucket_counts(None, "pairs", {my_group: n_pairs})

        def keyed(frame: pl.DataFrame) -> pl.DataFrame:
            keys = part_keys(frame.select("pair_id").unique().with_columns(_gen=pl.lit(my_group)), buckets)
            return frame.join(keys, on="pair_id", how="left", maintain_order="left")

        reuse = PartReuse.of(None)
        # the per-pair state tables (the checks' and the preliminary consensus's) written now, before select's tasks
        # run: the driver then lets go of the preliminary pairs, their lengths and places and the pair-scoped checks'
        # state rows (~0.25 GB per million judgments together; the near-duplicate state went as soon as it existed)
        early: dict[str, TableInfo] = {}
        assert a.layout == (my_group, buckets[my_group]) and a.prelim is not None and a.first_seen is not None
        seen = _Seen(a.prelim, a.first_seen)
        # (merged part by part from the partitions' caches, where the tasks left them: the preliminary pairs' rows
        # and the language check's; the others are small)
        in_caches = {inc.state_table(check): (rows, None) for check, rows in a.cached.items()}
        in_caches[inc.PRELIM_TABLE] = (a.prelim, seen.rows)
        # (two tables at a time: each merge reads on its own thread and writes on another; one after the other the
        # language rows' and the preliminary rows' merges left a core idle)
        with ThreadPoolExecutor(2, thread_name_prefix="prefpipe-early") as pool:
            writes = {name: pool.submit(_merged_table, reuse, store, stage, name, *in_caches[name]) if name in in_caches
                      else pool.submit(_grouped_table, reuse, store, stage, name, keyed(frame))
                      for name, frame in {**inc.state_frames(results), inc.PRELIM_TABLE: None}.items()}
            early = {name: w.result() for name, w in writes.items()}
        del writes
        for check, spec in inc.PAIR_SCOPED.items():  # (written; nothing later reads them)
            results[check].tables.pop(spec.table, None)
        a.pairs = a.pairs.clear()
        a.lengths = a.seen = None
        memory.release()
        clusters = results["near_duplicates"].tables.get("clusters")
        # (a sub-lap of its own: select's laps follow it, so that each sub-lap starts where the one before ended)
        before_select = round(time.perf_counter() - t, 3)
        s = ps.select(refs, work, policy, a.params, flags, clusters, client=client, version_id=version_id,
                      layout=(my_group, buckets[my_group]), texts=a.texts)
        assert s.prompts is not None and s.flagged_pairs is not None and s.label_counts is not None
        lap("partitions:select")
        timings["partitions:select/state tables"] = before_select
        timings.update({f"partitions:select/{k}": v for k, v in s.seconds.items()})

        tables: dict[str, TableInfo] = {}
        if not background:  # (analyze gave no near-duplicate state)
            write_judgments()
        tables.update(background[0].result())
        lap("write_judgments (wait)")
        # the pair tables, part by part from every partition's rows
        order = ("pair_id",)
        # the pairs and their narrow rows from one pass over the pairs (the narrow rows are the pairs without texts)
        pair_schema = _schema_of(s, refs[0], "pairs")
        pw, rw = TableWriter(store, stage, "pairs"), TableWriter(store, stage, PAIR_ROWS)
        # ... and every split's DPO rows from the same pass: made from each merged part's kept pairs, each row tagged
        # with its split (the DPO rows are a function of a pair's row: select's tasks do not keep them)
        writers = {split: TableWriter(store, stage, f"data/{split}") for split in SPLITS}
        tagged = _dpo_tagger(s.splits)

        def of_split(code: int) -> Callable[[pl.DataFrame], pl.DataFrame]:
            return lambda part: tagged(part)[code]

        dpo_schema = sel.dpo_of(pl.DataFrame(schema=pair_schema)).schema
        # two writer threads: the pairs and their narrow rows on one, the DPO splits on the other (they share the
        # tagger's cache of the last part; at 10M judgments the narrow rows beside the DPO rows kept one thread busy
        # 82 s while the other worked 35 s)
        counts = merge_into([Output(pw, None, pair_schema),
                             Output(rw, lambda part: drop_columns(part, agg.PAIR_TEXT_COLUMNS),
                                    {k: v for k, v in pair_schema.items() if k not in agg.PAIR_TEXT_COLUMNS}),
                             *[Output(writers[split], of_split(code), dpo_schema) for code, split in enumerate(SPLITS)]],
                            [iter_table(s.step, r, s.cache_dir, "pairs") for r in refs], reuse=reuse, order_by=order,
                            lanes=[[0, 1], [2, 3, 4]])[2:]
        tables["pairs"], tables[PAIR_ROWS] = pw.info(), rw.info()
        w = TableWriter(store, stage, "routed")
        merge_grouped(w, [iter_table(s.step, r, s.cache_dir, "routed") for r in refs], reuse=reuse, order_by=order,
                      schema=_schema_of(s, refs[0], "routed"))
        tables["routed"] = w.info()
        sizes = dict(zip(SPLITS, counts, strict=True))
        tables.update({f"data/{split}": writers[split].info() for split in SPLITS})
        splits = {sp: SplitInfo(path=ti.path, rows=ti.rows, sha256=ti.sha256) for sp in SPLITS for ti in [tables[f"data/{sp}"]]}
        # every kept pair's split, its prompt: assignments, leakage, placement
        c = pl.col
        kept = s.fate.filter(c("decision") == "keep").select("pair_id", "near_dup_cluster")
        now = kept.with_columns(_cl=c("near_dup_cluster").fill_null(c("pair_id"))).join(s.splits, on="_cl", how="left").drop("_cl")
        assigned = assignments(now, None, version_id)
        tables["split_assignments"] = _grouped_table(reuse, store, stage, "split_assignments", keyed(assigned))
        leaks = leakage({sp: now.filter(c("split") == sp) for sp in SPLITS}, s.prompts)
        assert s.cluster_counts is not None
        placed = _stats_of_counts(s.cluster_counts).join(s.splits, on="_cl").group_by("_stratum", "split") \
            .agg(c("n").sum().cast(pl.Int64)).sort("_stratum", "split")
        lap("write_pairs")
        # nothing reads the tasks' states (nor the rewritten partitions, nor the broadcast tables) from here on: they
        # are removed on a thread of their own while the small tables and the report are written (at 10M judgments
        # ~12 GB, 5-6 s of the kernel freeing blocks, most of the work directory's removal); a failure in what is
        # left computes the checks again on a retry, not the ingest (the partition set stays until the version is in)
        background.append(_Background(lambda _stop: _remove_states(work), "prefpipe-cleanup"))
        # the state tables (per pair, narrow), written before select: in the manifest in their place
        tables.update(early)
        routed_all = s.routed
        reviews = rr.classify(review_rows, review_ctx)
        review_state, review_ledger = rr.finish(
            review_ctx, version_id=version_id, created_at=created_at, pairs=s.fate.drop("_p"), routed=routed_all, reviews=reviews,
            decided_by_reviews=rr.votes(reviews, s.fate.clear(), None), n_review_judgments=reviews.height)

        def pair_keys_of(pid: pl.Series) -> pl.Series:
            f = pid.to_frame("pair_id")
            u = f.drop_nulls().unique()
            k = keyed(u).select("pair_id", "_part") if u.height else u.with_columns(_part=pl.lit(None, pl.String))
            return f.join(k, on="pair_id", how="left", maintain_order="left")["_part"].fill_null(OTHER_KEY)

        def flag_keys(fl: pl.DataFrame) -> pl.Series:
            kind = c("subject_kind")
            sub = fl.select("subject_kind", "subject_id").join(s.flagged_pairs, on="subject_id", how="left", maintain_order="left")
            return pair_keys_of(sub.select(pl.when(kind == "pair").then(c("subject_id"))
                                           .when(kind == "judgment").then(c("_jp")))["subject_id"])

        for name, frame, key_of, fl_order, printed in (("flags", flags, flag_keys, FLAG_ORDER, True),
                                                       (rr.STATE, review_state, lambda f: pair_keys_of(f["pair_id"]),
                                                        ("pair_id",), False)):
            w = TableWriter(store, stage, name)
            w.write_grouped(frame.with_columns(_part=key_of(frame)), "_part", reuse if printed else None, order_by=fl_order)
            tables[name] = w.info()
        quarantine = pset.read_quarantine()
        w = TableWriter(store, stage, "quarantine", arrival_order=True)
        w.write(version_id, quarantine)
        tables["quarantine"] = w.info()
        used = s.kept_annotators.to_frame() if s.kept_annotators is not None else pl.DataFrame(schema={"annotator_id": pl.String})
        used = used.join(s.params, on="annotator_id", how="left")
        annotators = agg.annotator_table(results, used.select(
            "annotator_id", "ds_accuracy", accuracy_better_first="oa_alpha", accuracy_better_second="oa_beta",
            order_engagement="oa_engaged"))
        from pipeline.report import LABEL_COUNTS

        for name, frame in (("annotators", annotators), (FINGERPRINTS, reuse.frame()), (LABEL_COUNTS, s.label_counts),
                            (PLACEMENT, placed), (inc.PARAMS_TABLE, s.params), (inc.PRELIM_PARAMS, a.params),
                            (GROUPS, groups), *inc.sums_frames(results).items()):
            w = TableWriter(store, stage, name)
            w.write("all", frame)
            tables[name] = w.info()
        tables.update(nd_tables)
        lap("write")

        n_judgments = a.n_judgments + sum(no_verdict.values())  # (every valid judgment as given)
        checks = [r.manifest_entry() for r in results.values()]
        checks.append(_split_check(leaks, sizes))
        checks.append(_stability_check(pl.DataFrame(schema={"pair_id": pl.String, "from": pl.String, "to": pl.String}), None))
        pre_check = {"duplicate_comparison_id": n_dup_ids} if n_dup_ids else {}
        ledger = Ledger(
            rows_in=pset.ledger.rows_in, quarantined=pset.ledger.quarantined,
            judgments_valid=n_judgments + n_dup_ids,
            judgments_dropped={**s.judgments_dropped, **pre_check, **no_verdict},
            pairs=n_pairs, pairs_kept=sum(sizes.values()), routed=s.routed_by_label, dropped=s.dropped_by_reason,
            splits=sizes, reviews=review_ledger)
        manifest = Manifest(
            version_id=version_id, created_at=created_at, parent_version=None, code_version=code_version(),
            policy_hash=policy.policy_hash(), policy=policy.model_dump(mode="json"), ledger=ledger, ingest=pset.ledger,
            sources=list(pset.sources), splits=splits, files={}, tables=tables, checks=checks,
            annotators=_annotator_summary(annotators),
            lineage={"parent_version": None, "new_sources": [x.model_dump() for x in pset.sources], "timings_s": timings,
                     "preliminary_format": inc.PRELIM_FORMAT,
                     "check_sums": {"mode": "counted", "formats": inc.sums_formats(),
                                    "fitted_on": inc.fitted_on(None, (), a.n_judgments)},
                     "pair_table_parts": {"linked": reuse.linked, "written": reuse.written},
                     "partitions": {"n": len(refs), "judgments": [p.judgments for p in pset.partitions]}})
        from pipeline.report import ReportInputs, write_report

        fate_of = s.fate.drop("_p")

        def rows_of(name: str, ids: pl.Series, schema: pl.Schema) -> pl.DataFrame:
            """The rows of a few pairs of the version's table ``name`` (keyed by pair): from the parts that hold
            them (written above, checked against their sha256) -- not every partition's cached rows (at 10M
            judgments ~70 MB a partition, read and hashed whole for a few rows; and gone by now)."""
            written = {part.path: part for part in tables[name].parts}
            want = ids.to_frame("pair_id").unique()
            frames = []
            for key in keyed(want)["_part"].unique().sort().to_list():
                part = written.get(f"{name}/part-{key}.parquet")
                if part is None:  # (no pair in that bucket)
                    continue
                path = stage / part.path
                if sha256_file(path) != part.sha256:
                    raise RuntimeError(f"{path}: changed since it was written (sha256)")
                frames.append(pl.read_parquet(path, glob=False).join(want, on="pair_id", how="semi"))
            frames = [f for f in frames if f.height]
            return pl.concat(frames) if frames else pl.DataFrame(schema=schema)

        def pair_rows(ids: pl.Series) -> pl.DataFrame:
            """The report's few pairs with their texts."""
            return rows_of("pairs", ids, pair_schema)

        def seen_of(ids: pl.Series) -> pl.DataFrame:
            """(pair_id, ``_seen``) of the report's few pairs (their first-seen ranks, as the preliminary rows keep them)."""
            return rows_of(inc.PRELIM_TABLE, ids, pl.Schema({"pair_id": pl.String, "seen": pl.Int64})) \
                .select("pair_id", _seen="seen")

        narrow = empty_frame(Judgment).select("pair_id", "prompt_hash", "label", "locale", "annotator_kind")
        inputs = ReportInputs(manifest=manifest, judgments=narrow, pairs=fate_of, pair_rows=pair_rows, pair_prompts=s.prompts,
                              flags=flags, annotators=annotators, routed=routed_all, quarantine=quarantine, results=results,
                              pair_order=seen_of, label_counts=s.label_counts,
                              graph_clusters=results["near_duplicates"].tables.get("graph_clusters"))
        from pipeline.store import file_info

        for path in write_report(inputs, stage):
            manifest.files[path.name] = file_info(path, path.name)
        background[-1].result()  # (the states' removal: done before the store syncs the version)
        lap("report")
        return manifest
    except BaseException:
        for b in background:
            b.cancel()
        raise


def _remove_states(work: Path) -> None:
    """The tasks' states, then what only they name (rewritten partitions, broadcast tables): a state left by an
    interrupted removal never names a file that is gone -- a retry reads it or computes it again."""
    import shutil

    for name in ("states", "rewritten", "broadcast"):
        shutil.rmtree(work / name, ignore_errors=True)


def _merged_table(reuse: PartReuse, store: Store, stage: Path, name: str, rows: pk.CachedRows,
                  transform: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> TableInfo:
    """A state table written from the partitions' cached rows, one part at a time (``transform``: of
    each merged part): the parts :func:`pipeline.curate._grouped_table` writes from the whole frame
    (rows in the same order: pair_id, then its other flat columns)."""
    from pipeline.curate import _state_order

    cached = pl.DataFrame(schema=rows.schema())
    schema = (cached if transform is None else transform(cached)).drop("_part", strict=False).schema
    w = TableWriter(store, stage, name)
    merge_into([Output(w, transform, schema)], rows.streams(), reuse=reuse,
               order_by=_state_order(pl.DataFrame(schema=schema)))
    return w.info()


class _Seen:
    """Each pair's ``seen`` (its rank in first-seen order) from its place in the input (``_o``, which
    the preliminary rows carry in its stead) and every pair's place, sorted (``keys``).  Pairs whose
    first judgments share a place (one input line giving several) rank by pair_id, as a stable sort
    of the pairs in pair_id order by place does; their ids are read back from the caches (a few)."""

    def __init__(self, rows: pk.CachedRows, keys: np.ndarray) -> None:
        self.keys = keys
        shared = np.unique(keys[1:][keys[1:] == keys[:-1]]) if keys.size > 1 else keys[:0]
        self.ties = pl.DataFrame(schema={"pair_id": pl.String, "_t": pl.Int64})
        if shared.size:
            tied = rows.where("_o", pl.Series("_o", shared, pl.Int64)).select("pair_id", "_o").sort("_o", "pair_id")
            self.ties = tied.select("pair_id", _t=pl.Series(np.searchsorted(keys, tied["_o"].to_numpy(), "left"), dtype=pl.Int64)
                                    + pl.int_range(pl.len(), dtype=pl.Int64).over("_o"))

    def ranks(self, frame: pl.DataFrame) -> pl.Series:
        """``seen`` of the rows of ``frame`` (pair_id, ``_o``)."""
        at = pl.Series("seen", np.searchsorted(self.keys, frame["_o"].to_numpy(), "left"), dtype=pl.Int64)
        if self.ties.height == 0:
            return at
        t = frame.select("pair_id").join(self.ties, on="pair_id", how="left", maintain_order="left")["_t"]
        return t.fill_null(at).rename("seen")

    def rows(self, part: pl.DataFrame) -> pl.DataFrame:
        """A merged part of the preliminary rows with ``seen`` in place of ``_o``."""
        return part.with_columns(_o=self.ranks(part)).rename({"_o": "seen"})


def _schema_of(s: ps.Selection, ref: PartitionRef, table: str) -> pl.Schema:
    """A table's columns as the partitions' rows have them (for an empty table's one part)."""
    from pipeline.distributed import table_schema

    schema = table_schema(s.step, ref, s.cache_dir, table)
    return pl.Schema({k: v for k, v in schema.items() if k != "_part"})


def _dpo_tagger(splits: pl.DataFrame) -> Callable[[pl.DataFrame], list[pl.DataFrame]]:
    """``tagged(part)``: the DPO rows of a merged part of the pair table's kept pairs
    (:func:`pipeline.select.dpo_of`, with the part key), one frame per split (in :data:`SPLITS`'
    order, rows in the part's order), each row's split looked up by its cluster (else its pair) in
    ``splits`` (``_cl``, ``split``: sorted once, searched per part; a join would hash every cluster for
    each part).  The frames of the part last asked for are kept: the three splits' outputs ask for the
    same part in turn.  (One ``partition_by``, not a filter per split: from a writer thread each Polars
    call waits for Polars' pool while the merge's other threads use it.)"""
    by_cl = splits.select("_cl", _split=pl.col("split").replace_strict(list(SPLITS), list(range(len(SPLITS))),
                                                                       return_dtype=pl.UInt8)).sort("_cl")
    keys, codes = by_cl["_cl"], by_cl["_split"]
    last: list[Any] = [None, None]

    def tagged(part: pl.DataFrame) -> list[pl.DataFrame]:
        if last[0] is part:
            return last[1]
        kept = part.filter(pl.col("decision") == "keep")
        rows = sel.dpo_of(kept).with_columns(_part=kept["_part"])
        cl = rows.select(pl.col("near_dup_cluster").fill_null(pl.col("pair_id"))).to_series()
        if rows.height == 0:  # (no kept pair in this part)
            at = pl.Series([], dtype=pl.UInt32)
        else:
            at = keys.search_sorted(cl).clip(0, max(keys.len() - 1, 0)) if keys.len() else None
            if at is None or not (keys.gather(at) == cl).all():
                raise ValueError(f"part {part['_part'][0]}: a kept pair without a split")
        by = rows.with_columns(_split=codes.gather(at)).partition_by("_split", as_dict=True, include_key=False,
                                                                       maintain_order=True)
        last[0], last[1] = part, [by.get((code,), rows.clear()) for code in range(len(SPLITS))]
        return last[1]

    return tagged
