"""A version's grouped tables written from partitions (issue 15; docs/scale-out.md, "The flow the
bricks add up to", row 6).

A table of a version is written in parts keyed by pair (``_part``: the pair's generation, or a
bucket of it, :func:`pipeline.parts.part_keys`), so a part holds pairs of every partition.  Each
partition's task leaves its rows of the table in its cached state, **sorted by** ``_part``
(stable); the driver then merges the partitions' streams key by key
(:func:`merge_grouped`): every partition's rows of the smallest key, in partition order, go to
:meth:`pipeline.parts.TableWriter.write_grouped` -- which sorts a part's rows by its order and
fingerprints them -- so each part has the bytes that ``write_grouped`` over the whole table gives
(tested), whatever the partition count.  The driver holds one record batch per partition and one
part's rows at a time (:data:`pipeline.distributed.BATCH_ROWS`, ~4,096 pairs a part), never the
table.

Rows of one part that are equal in every column the order reads (a state table's nested columns
are not ordered) keep partition order, which may differ from the one-process frame's: no
table written today has such rows.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

import polars as pl

from pipeline.parts import PartReuse, TableWriter

__all__ = ["runs", "merge_grouped", "sorted_by_part"]


def sorted_by_part(frame: pl.DataFrame, key_column: str = "_part") -> pl.DataFrame:
    """What a task leaves in its state: its rows sorted by the part key (stable)."""
    return frame.sort(key_column, maintain_order=True, nulls_last=True)


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
    its = [runs(s, key_column) for s in streams]
    try:
        return _merge(writer, its, key_column, reuse, order_by, schema)
    finally:  # a stream holds an open file until it is closed: closed now, also on an error (a full disk)
        for it in its:
            it.close()
        for st in streams:
            close = getattr(st, "close", None)
            if close is not None:
                close()


def _merge(writer: TableWriter, its: list[Iterator[tuple[str, pl.DataFrame]]], key_column: str,
           reuse: PartReuse | None, order_by: tuple[str, ...], schema: pl.Schema | dict | None) -> int:
    heap: list[tuple[str, int, pl.DataFrame]] = []
    for i, it in enumerate(its):
        first = next(it, None)
        if first is not None:
            heap.append((first[0], i, first[1]))
    heapq.heapify(heap)
    rows = 0
    empty: pl.DataFrame | None = None
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
        empty = part.clear() if empty is None else empty
        writer.write_grouped(part, key_column, reuse, order_by=order_by)
        rows += part.height
    if empty is None:  # no rows at all: one empty part with the table's schema
        if schema is None:
            raise ValueError(f"{writer.name}: an empty table needs its schema")
        writer.write_grouped(pl.DataFrame(schema={**dict(schema), key_column: pl.String}), key_column, reuse,
                             order_by=order_by)
    return rows
