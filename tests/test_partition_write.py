"""pipeline/partition_write.py: a grouped table merged from partitions' sorted streams has the
parts (bytes, sha256s, fingerprints) that one write_grouped over the whole table gives."""
from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pytest

import pipeline.distributed as dist
from pipeline.distributed import PartitionRef, Step, _cache_key, _cache_write, encode_state, iter_table
from pipeline.partition_write import Output, merge_grouped, merge_into, runs, sorted_by_part
from pipeline.parts import PartReuse, TableWriter
from pipeline.store import Store

STEP = Step("rows", "1", None, None)  # (only its cache key is used)


def _table(n: int, seed: int) -> pl.DataFrame:
    rng = random.Random(seed)
    ids = [f"p{rng.randrange(4 * n):06d}" for _ in range(n)]
    return pl.DataFrame({
        "pair_id": ids,
        "x": [rng.random() for _ in range(n)],
        "text": [rng.choice(["", "short", "a longer text " * rng.randrange(1, 20), "日本語のテキスト"]) for _ in range(n)],
        "msg": [[{"role": "user", "content": str(rng.random())}] for _ in range(n)],
        # a few big parts (several batches of a partition) and many small ones
        "_part": [f"v1.b{rng.randrange(3):02d}of64" if rng.random() < 0.5 else f"v1.b{rng.randrange(3, 64):02d}of64"
                  for _ in range(n)],
    })


def _written(store: Store, stage: Path, name: str, write) -> tuple[list[tuple[str, int, str]], dict[str, str]]:
    reuse = PartReuse()
    w = TableWriter(store, stage, name)
    write(w, reuse)
    return [(p.path, p.rows, p.sha256) for p in w.info().parts], dict(reuse.seen)


@pytest.mark.parametrize("n_parts", [1, 3, 7])
def test_merged_parts_are_the_whole_tables(tmp_path, monkeypatch, n_parts):
    monkeypatch.setattr(dist, "BATCH_ROWS", 97)  # runs that span batches
    frame = _table(3000, n_parts)
    store = Store(tmp_path / "store")
    want = _written(store, tmp_path / "a", "pairs",
                    lambda w, r: w.write_grouped(frame, "_part", r, order_by=("pair_id", "x")))
    refs = []
    for i in range(n_parts):
        ref = PartitionRef(i, (f"part-{i}",), (f"{i:064d}",))
        mine = frame.filter(pl.col("pair_id").hash(3) % n_parts == i)
        _cache_write(tmp_path / "cache", _cache_key(STEP, ref), {"pairs": sorted_by_part(mine)})
        refs.append(ref)
    got = _written(store, tmp_path / "b", "pairs", lambda w, r: merge_grouped(
        w, [iter_table(STEP, ref, tmp_path / "cache", "pairs") for ref in refs], reuse=r, order_by=("pair_id", "x")))
    assert got == want
    assert len(want[0]) == 64


def _cached_streams(tmp_path: Path, frame: pl.DataFrame, n_parts: int) -> list:
    refs = []
    for i in range(n_parts):
        ref = PartitionRef(i, (f"part-{i}",), (f"{i:064d}",))
        _cache_write(tmp_path / "cache", _cache_key(STEP, ref), {"pairs": sorted_by_part(frame.filter(pl.col("pair_id").hash(3) % n_parts == i))})
        refs.append(ref)
    return [iter_table(STEP, ref, tmp_path / "cache", "pairs") for ref in refs]


@pytest.mark.parametrize("lanes", [None, [[0, 1], [2]], [[2], [0], [1]]], ids=["default", "two-one", "three"])
def test_several_outputs_written_at_once_are_each_table_alone(tmp_path, monkeypatch, lanes):
    """merge_into writes its outputs on a thread per lane (default: the first on one, the others in turn
    on the other) while it reads the next part: each table's parts, and the reuse counters and
    fingerprints they share, are what each table written alone gives."""
    monkeypatch.setattr(dist, "BATCH_ROWS", 97)
    frame = _table(3000, 5)
    store = Store(tmp_path / "store")
    tables = {"pairs": None, "narrow": lambda f: f.drop("text", "msg"), "small": lambda f: f.filter(pl.col("x") < 0.3)}
    want, seen = {}, {}
    for name, rows in tables.items():
        reuse = PartReuse()
        w = TableWriter(store, tmp_path / "a", name)
        w.write_grouped(frame if rows is None else rows(frame), "_part", reuse, order_by=("pair_id", "x"))
        want[name] = [(p.path, p.rows, p.sha256) for p in w.info().parts]
        seen.update(reuse.seen)
    reuse = PartReuse()
    writers = {name: TableWriter(store, tmp_path / "b", name) for name in tables}
    outputs = [Output(writers[n], rows, frame.schema) for n, rows in tables.items()]
    counts = merge_into(outputs, _cached_streams(tmp_path, frame, 3), reuse=reuse, order_by=("pair_id", "x"), lanes=lanes)
    assert {n: [(p.path, p.rows, p.sha256) for p in w.info().parts] for n, w in writers.items()} == want
    assert counts == [3000, 3000, frame.filter(pl.col("x") < 0.3).height]
    assert reuse.seen == seen and (reuse.written, reuse.linked) == (len(seen), 0)
    for bad in ([[0], [1]], [[0, 1], [1, 2]], [[0, 1, 2], []]):  # an output in no lane, in two, an empty lane
        with pytest.raises(ValueError, match="every output of 3 in exactly one lane"):
            merge_into(outputs, [], lanes=bad)


def test_a_failed_write_fails_the_merge_and_closes_the_streams(tmp_path, monkeypatch):
    """A write that fails on a writer thread (a full disk) is raised by merge_into, no part is
    written after it, and every partition's stream is closed."""
    import pipeline.parts as parts

    monkeypatch.setattr(dist, "BATCH_ROWS", 97)  # (batches left in every stream when the write fails)
    frame = _table(2000, 6)
    streams = _cached_streams(tmp_path, frame, 3)
    real, calls = parts.write_parquet, []

    def flaky(frame: pl.DataFrame, path: Path):
        calls.append(path)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(frame, path)

    monkeypatch.setattr(parts, "write_parquet", flaky)
    w = TableWriter(Store(tmp_path / "store"), tmp_path / "b", "pairs")
    with pytest.raises(OSError, match="No space left"):
        merge_into([Output(w, None, frame.schema)], streams, order_by=("pair_id",))
    assert len(calls) == 5 and len(w.parts) == 4
    for st in streams:  # closed (each had batches left to read)
        assert next(st, None) is None


def test_an_empty_table_gets_its_one_empty_part(tmp_path):
    store = Store(tmp_path / "store")
    empty = _table(10, 1).clear()
    want = _written(store, tmp_path / "a", "routed", lambda w, r: w.write_grouped(empty, "_part", r, order_by=("pair_id",)))
    got = _written(store, tmp_path / "b", "routed", lambda w, r: merge_grouped(w, [[empty], []], reuse=r, order_by=("pair_id",),
                                                                               schema=empty.schema))
    assert got == want and want[0][0][1] == 0
    with pytest.raises(ValueError, match="needs its schema"):
        merge_grouped(TableWriter(store, tmp_path / "c", "routed"), [[]])


def test_a_stream_not_sorted_by_its_part_key_is_refused():
    f = pl.DataFrame({"_part": ["b", "a"], "x": [1, 2]})
    with pytest.raises(ValueError, match="not sorted"):
        list(runs([f]))
    assert [(k, v.height) for k, v in runs([f.head(1), f.head(1), pl.DataFrame({"_part": ["c"], "x": [3]})])] == [("b", 2), ("c", 1)]


def test_write_grouped_parts_hold_the_rows_of_one_stable_sort_by_key_then_order(tmp_path):
    """Each part is sorted on its own (the whole table is sorted by its part key only): the rows, and
    so the bytes, are those of one stable sort of every row by (key, *order_by), ties and nulls included."""
    rng = random.Random(7)
    n = 4000
    frame = pl.DataFrame({
        "_part": [rng.choice(["b00", "b01", "b02", "other"]) for _ in range(n)],
        "pair_id": [rng.choice(["p1", "p2", "p3", None]) for _ in range(n)],
        "locale": [rng.choice(["en", "de", None]) for _ in range(n)],
        "row": list(range(n)),  # (not sorted by: ties keep their input order)
    })
    store = Store(tmp_path / "store")
    w = TableWriter(store, tmp_path / "stage", "state/language")
    w.write_grouped(frame, "_part", order_by=("pair_id", "locale"))
    want = frame.sort("_part", "pair_id", "locale", nulls_last=True, maintain_order=True)
    got = {p.path: pl.read_parquet(tmp_path / "stage" / p.path) for p in w.info().parts}
    assert len(got) == 4
    for key, rows in want.group_by("_part", maintain_order=True):
        part = got[f"state/language/part-{key[0]}.parquet"]
        assert part.equals(rows.drop("_part")), key


def test_a_quick_lane_runs_ahead_of_a_slow_one(tmp_path, monkeypatch):
    """Each writer lane has up to ``IN_FLIGHT`` merged parts queued: a lane whose parts are quick writes the
    next part while a slow lane is still on the one before (with one part in flight it waited for it);
    the tables are what they are written alone.  The slow lane's first part waits until the quick lane has
    reached its second part (or 10 s: then the quick lane did not run ahead and the test fails) -- an event,
    not a fixed pause, so a loaded machine cannot reorder them."""
    import threading

    from pipeline import partition_write as pw

    monkeypatch.setattr(dist, "BATCH_ROWS", 97)
    frame = _table(3000, 8)
    store = Store(tmp_path / "store")
    done: list[tuple[str, int]] = []
    lock = threading.Lock()
    seen = {"slow": 0, "quick": 0}
    quick_ahead = threading.Event()

    def rows_of(name: str):
        def rows(part: pl.DataFrame) -> pl.DataFrame:
            if name == "slow":
                quick_ahead.wait(timeout=10)
            with lock:
                seen[name] += 1
                done.append((name, seen[name]))
                if name == "quick" and seen[name] == 2:
                    quick_ahead.set()
            return part
        return rows

    writers = {n: TableWriter(store, tmp_path / "b", n) for n in ("slow", "quick")}
    outputs = [Output(writers["slow"], rows_of("slow"), frame.schema), Output(writers["quick"], rows_of("quick"), frame.schema)]
    counts = merge_into(outputs, _cached_streams(tmp_path, frame, 3), order_by=("pair_id", "x"), lanes=[[0], [1]])
    assert counts == [3000, 3000] and pw.IN_FLIGHT == 2
    assert seen["slow"] == seen["quick"] >= 4
    # the quick lane finished its second part before the slow lane its first
    assert done.index(("quick", 2)) < done.index(("slow", 1))
    want = _written(store, tmp_path / "a", "quick", lambda w, r: w.write_grouped(frame, "_part", r, order_by=("pair_id", "x")))
    assert [(p.path, p.rows, p.sha256) for p in writers["quick"].info().parts] == want[0]
