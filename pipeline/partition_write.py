"""A version's grouped tables written from partitions (issue 15; docs/scale-out.md, "The flow the
bricks add up to", row 6).

A table of a version is written in parts keyed by pair (``_part``: the pair's generation, or a
bucket of it, :func:`pipeline.parts.part_keys`), so a part holds pairs of every partition.  Each
partition's task leaves its rows of the table in its cached state, **sorted by** ``_part``
(stable); the driver then merges the partitions' streams key by key
(:func:`merge_grouped`): every partition's rows of the smallest key, in partition order, go to
:meth:`pipeline.parts.TableWriter.write_grouped` -- which sorts a part's rows by its order and
fingerprints them -- so each part has the bytes that ``write_grouped`` over the whole table gives
(tested), whatever the partition count.  The driver holds one record batch per partition and two
parts' rows at a time -- one being written (on two threads, :func:`merge_into`'s outputs split
between them) while the next is merged (:data:`pipeline.distributed.BATCH_ROWS`, ~4,096 pairs a
part) -- never the table.

Rows of one part that are equal in every column the order reads (a state table's nested columns
are not ordered) keep partition order, which may differ from the one-process frame's: no
table written today has such rows.
"""
from __future__ import annotations

import heapq
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import polars as pl

from pipeline.parts import PartReuse, TableWriter

__all__ = ["Output", "keyed_by_part", "merge_grouped", "merge_into", "runs", "sorted_by_part"]


def sorted_by_part(frame: pl.DataFrame, key_column: str = "_part") -> pl.DataFrame:
    """What a task leaves in its state: its rows sorted by the part key (stable)."""
    return frame.sort(key_column, maintain_order=True, nulls_last=True)


def keyed_by_part(frame: pl.DataFrame, layout: tuple[str, int]) -> pl.DataFrame:
    """``frame`` with the ``_part`` of each row's pair (a first version: every pair in this version's
    generation group ``layout[0]`` of ``layout[1]`` buckets, :func:`pipeline.parts.part_keys`), sorted by it."""
    from pipeline.parts import part_keys

    group, k = layout
    keys = part_keys(frame.select("pair_id").unique().with_columns(_gen=pl.lit(group)), {group: k})
    return sorted_by_part(frame.join(keys, on="pair_id", how="left", maintain_order="left"))


def runs(batches: Iterable[pl.DataFrame], key_column: str = "_part") -> Iterator[tuple[str, pl.DataFrame]]:
    """(key, rows) of a stream of batches sorted by ``key_column``: each key's rows together,
    also when they span batches.  Raises ValueError when the stream is not sorted."""
    pending: list[pl.DataFrame] = []
    current: str | None = None
    for batch in batches:
        if batch.height == 0:
            continue
        keys = batch[key_column]
        if keys.null_count():
            raise ValueError(f"{key_column}: a row without a part key")
        bounds = (keys != keys.shift(1)).fill_null(True).arg_true().to_list() + [batch.height]
        for a, z in zip(bounds[:-1], bounds[1:]):
            key = keys[a]
            if key != current:
                if current is not None:
                    if key < current:
                        raise ValueError(f"{key_column}: rows not sorted by their part key ({key!r} after {current!r})")
                    yield current, pl.concat(pending)
                current, pending = key, []
            pending.append(batch.slice(a, z - a))
    if current is not None:
        yield current, pl.concat(pending)


def merge_grouped(writer: TableWriter, streams: list[Iterable[pl.DataFrame]], *, key_column: str = "_part",
                  reuse: PartReuse | None = None, order_by: tuple[str, ...] = (),
                  schema: pl.Schema | dict | None = None) -> int:
    """Write the parts of one table from every partition's stream (sorted by ``key_column``; in
    partition order), one key at a time.  ``schema``: the table's (for an empty table, which gets
    the one empty part :meth:`TableWriter.write_grouped` gives it).  Returns the rows written."""
    return merge_into([Output(writer, None, schema)], streams, key_column=key_column, reuse=reuse, order_by=order_by)[0]


@dataclass(frozen=True)
class Output:
    """One table :func:`merge_into` writes: its writer, its rows of a merged part (``rows(part)``;
    None: all of them), its schema (for the one empty part of a table without rows)."""

    writer: TableWriter
    rows: Callable[[pl.DataFrame], pl.DataFrame] | None = None
    schema: pl.Schema | dict | None = None


def merge_into(outputs: list[Output], streams: list[Iterable[pl.DataFrame]], *, key_column: str = "_part",
               reuse: PartReuse | None = None, order_by: tuple[str, ...] = (),
               lanes: Sequence[Sequence[int]] | None = None) -> list[int]:
    """:func:`merge_grouped` for several tables from one pass over the streams: each merged part
    goes to every output (its ``rows`` of it, when there are any) -- e.g. the pairs and their narrow
    rows, or the DPO rows of each split.  ``lanes``: the outputs each writer thread writes, every output
    in one lane (default: the first output on one thread, the others on a second; outputs whose ``rows``
    share a cache belong in one lane).  Returns each output's rows written."""
    if lanes is None:
        lanes = [lane for lane in ([0], list(range(1, len(outputs)))) if lane]
    if sorted(k for lane in lanes for k in lane) != list(range(len(outputs))) or not all(lanes):
        raise ValueError(f"lanes {lanes}: every output of {len(outputs)} in exactly one lane")
    its = [runs(s, key_column) for s in streams]
    try:
        return _merge(outputs, its, key_column, reuse, order_by, [list(lane) for lane in lanes])
    finally:  # a stream holds an open file until it is closed: closed now, also on an error (a full disk)
        for it in its:
            it.close()
        for st in streams:
            close = getattr(st, "close", None)
            if close is not None:
                close()


IN_FLIGHT = 2  # merged parts queued a writer lane (each part held until its lanes wrote it)


def _merge(outputs: list[Output], its: list[Iterator[tuple[str, pl.DataFrame]]], key_column: str,
           reuse: PartReuse | None, order_by: tuple[str, ...], lanes: list[list[int]]) -> list[int]:
    heap: list[tuple[str, int, pl.DataFrame]] = []
    for i, it in enumerate(its):
        first = next(it, None)
        if first is not None:
            heap.append((first[0], i, first[1]))
    heapq.heapify(heap)
    rows = [0] * len(outputs)

    failed = threading.Event()  # (a lane's write failed: no lane writes another part)

    def write(lane: list[int], part: pl.DataFrame) -> None:
        if failed.is_set():
            return
        try:
            for k in lane:
                out = outputs[k]
                mine = part if out.rows is None else out.rows(part)
                if mine.height:
                    out.writer.write_grouped(mine, key_column, reuse, order_by=order_by)
                    rows[k] += mine.height
        except BaseException:
            failed.set()
            raise

    # each merged part written while the next ones are read and merged, on a thread per lane (the writes -- sort,
    # Parquet, sha256 -- release the GIL; an output's parts are written by one thread, in key order); up to
    # IN_FLIGHT parts queued a lane, so a lane whose part is quick runs ahead of one whose part is slow instead of
    # waiting for it
    pools = [ThreadPoolExecutor(1, thread_name_prefix="prefpipe-merge-write") for _ in lanes]
    queued: list[list[Future[None]]] = [[] for _ in lanes]
    try:
        while heap:
            key = heap[0][0]
            taken: list[tuple[int, pl.DataFrame]] = []
            while heap and heap[0][0] == key:
                _, i, frame = heapq.heappop(heap)
                taken.append((i, frame))
                nxt = next(its[i], None)
                if nxt is not None:
                    heapq.heappush(heap, (nxt[0], i, nxt[1]))
            part = pl.concat([f for _, f in sorted(taken, key=lambda t: t[0])], how="vertical")
            del taken
            for q, pool, lane in zip(queued, pools, lanes, strict=True):
                while len(q) >= IN_FLIGHT:
                    q.pop(0).result()
                q.append(pool.submit(write, lane, part))
            del part
        for q in queued:
            for fut in q:
                fut.result()
    finally:
        for q in queued:
            for fut in q:
                fut.cancel()
        for pool in pools:
            pool.shutdown(wait=True)
    for k, out in enumerate(outputs):
        if rows[k] == 0:  # no rows at all: one empty part with the table's schema
            if out.schema is None:
                raise ValueError(f"{out.writer.name}: an empty table needs its schema")
            out.writer.write_grouped(pl.DataFrame(schema={**dict(out.schema), key_column: pl.String}), key_column, reuse,
                                     order_by=order_by)
    return rows
