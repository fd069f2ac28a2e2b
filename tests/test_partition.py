"""pipeline/partition.py: hash partitions by content key, spilled with bounded memory."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.checks.duplicates import exact_duplicates
from pipeline.ingest import ingest_files
from pipeline.partition import (PartitionSet, content_key_hash, partition_count, partition_files, partition_index,
                                read_partition)
from tests.conftest import ROOT, canonical, write_jsonl

sys.path.insert(0, str(ROOT / "benchmarks"))
from gen_judgments import generate  # noqa: E402


def _planted(tmp_path: Path) -> Path:
    """Given pair ids that cross content keys: a re-delivery under another id (and with a/b
    swapped), a pair id naming two contents (a conflict), plus plain rows and a malformed line."""
    rows = [canonical(i, annotator_id=f"rev-{i % 3}") for i in range(40)]
    same = canonical(100, pair_id="given-1", annotator_id="rev-9")
    again = {**same, "comparison_id": "c-again", "pair_id": "given-2"}  # the same delivery, another given id
    swapped = {**same, "comparison_id": "c-swapped", "pair_id": "given-3", "response_a": same["response_b"],
               "response_b": same["response_a"]["text"], "shown_first": "b", "label": "b"}
    conflict = [canonical(200, pair_id="given-x"), canonical(201, pair_id="given-x")]
    return write_jsonl(tmp_path / "planted.jsonl", rows + [same, again, swapped] + conflict,
                       raw_lines={7: '{"truncated": '})


def _all(ps: PartitionSet) -> pl.DataFrame:
    return pl.concat([read_partition(ps.path(i)).with_columns(_p=pl.lit(i)) for i in range(ps.n_partitions)])


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "gen.jsonl"
    generate(path, 6000, 700, seed=3)
    return path


def test_every_row_lands_in_exactly_one_partition(tmp_path, bench_file):
    planted = _planted(tmp_path)
    read: list[int] = []
    ps = partition_files([bench_file, planted], tmp_path / "parts", n_partitions=5, flush_rows=700, on_progress=read.append)
    whole = ingest_files([bench_file, planted])
    parts = _all(ps)
    assert ps.n_partitions == 5 and len(ps.partitions) == 5
    assert sum(p.judgments for p in ps.partitions) == ps.ledger.judgments == whole.ledger.judgments == parts.height
    assert ps.ledger == whole.ledger and ps.ledger.quarantined > 0 and sum(read) == ps.ledger.rows_in
    assert pl.read_parquet(ps.quarantine_path).height == ps.ledger.quarantined
    assert parts["comparison_id"].n_unique() == parts.height  # no row twice
    # the same rows, values and dtypes as a plain ingest; within a partition in input order
    key = ["source_file", "source_line", "comparison_id"]
    assert parts.drop("_p").sort(key).equals(whole.judgments.sort(key))
    for i in range(ps.n_partitions):
        one = read_partition(ps.path(i))
        files = {str(bench_file): 0, str(planted): 1}
        pos = one.select(pl.col("source_file").replace_strict(files, return_dtype=pl.Int64) * 10**9 + pl.col("source_line"))
        assert pos.to_series().is_sorted()
        assert partition_index(one, 5).unique().to_list() in ([i], [])
    assert all(p.judgments > 0 for p in ps.partitions)


def test_pairs_and_duplicates_stay_together(tmp_path, bench_file):
    planted = _planted(tmp_path)
    ps = partition_files([bench_file, planted], tmp_path / "parts", n_partitions=7, flush_rows=500)
    parts = _all(ps).with_columns(_key=content_key_hash())
    # every content key in one partition; every pair_id naming one content in one partition
    assert parts.group_by("_key").agg(pl.col("_p").n_unique()).get_column("_p").max() == 1
    per_id = parts.group_by("pair_id").agg(pl.col("_key").n_unique().alias("keys"), pl.col("_p").n_unique().alias("parts"))
    assert per_id.filter(pl.col("keys") == 1)["parts"].max() == 1
    # the planted re-deliveries under other given ids share a partition; the conflicting id names two keys
    planted_ids = parts.filter(pl.col("comparison_id").is_in(["c-00100", "c-again", "c-swapped"]))
    assert planted_ids["_p"].n_unique() == 1 and planted_ids["pair_id"].n_unique() == 3
    assert per_id.filter(pl.col("pair_id") == "given-x")["keys"].item() == 2
    # a pair-scoped check per partition finds exactly what it finds on the whole input
    whole = ingest_files([bench_file, planted]).judgments
    want = exact_duplicates(whole).sort("comparison_id")
    got = pl.concat([exact_duplicates(read_partition(ps.path(i))) for i in range(ps.n_partitions)]).sort("comparison_id")
    assert want.height > 10 and {"c-again", "c-swapped"} <= set(want["comparison_id"])
    assert got.equals(want)


def test_same_input_same_bytes(tmp_path, bench_file):
    a = partition_files([bench_file], tmp_path / "a", n_partitions=4, flush_rows=900)
    b = partition_files([bench_file], tmp_path / "b", n_partitions=4, flush_rows=900)
    for pa_, pb in zip(a.partitions, b.partitions, strict=True):
        assert pa_ == pb
        assert hashlib.sha256((a.directory / pa_.path).read_bytes()).hexdigest() == pa_.sha256
    assert (a.directory / "partitions.json").read_bytes() == (b.directory / "partitions.json").read_bytes()
    # the bytes depend on the input and the partition count, not on how often buffers were spilled
    c = partition_files([bench_file], tmp_path / "c", n_partitions=4, flush_rows=97, batch_rows=500)
    assert [p.sha256 for p in c.partitions] == [p.sha256 for p in a.partitions]
    # compressed (chunks and files; none by default, PREFPIPE_STATE_COMPRESSION's otherwise): other bytes, the same rows
    for comp in ("lz4", "zstd"):
        z = partition_files([bench_file], tmp_path / f"z-{comp}", n_partitions=4, flush_rows=97, compression=comp)
        assert [p.judgments for p in z.partitions] == [p.judgments for p in a.partitions]
        assert [p.sha256 for p in z.partitions] != [p.sha256 for p in a.partitions]
        assert pq.ParquetFile(z.path(0)).metadata.row_group(0).column(0).compression == comp.upper()
        for i in range(4):
            assert read_partition(z.path(i)).equals(read_partition(a.path(i)))
    assert pq.ParquetFile(a.path(0)).metadata.row_group(0).column(0).compression == "UNCOMPRESSED"
    # publishing again into an existing set keeps it (a retried task), and reads back the same
    again = partition_files([bench_file], tmp_path / "a", n_partitions=4, flush_rows=900)
    assert again.partitions == a.partitions
    # no staging directory left, once the spilled chunks' removals (threads of their own) are done: a loaded machine
    # (three pytest-xdist workers on two cores) listed one still being removed
    import pipeline.partition as part

    part.wait_removals()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "z-lz4", "z-zstd"]


def test_a_failed_run_publishes_nothing(tmp_path):
    with pytest.raises(Exception, match="no such file"):
        partition_files([tmp_path / "missing.jsonl"], tmp_path / "parts", n_partitions=2)
    assert list(tmp_path.iterdir()) == []


def test_partition_count_and_bad_values():
    assert [partition_count(n, 1000) for n in (1, 1000, 1001, 5000, 10**9)] == [1, 1, 2, 8, 4096]
    with pytest.raises(ValueError, match="n_partitions=0"):
        partition_index(pl.DataFrame({"prompt_hash": ["x"], "a_hash": ["y"], "b_hash": ["z"]}), 0)
    with pytest.raises(ValueError, match="partition_rows=0"):
        partition_count(10, 0)


_PEAK = ("import atexit, sys\n"
         "def _hwm():\n"
         "    for ln in open('/proc/self/status'):\n"
         "        if ln.startswith('VmHWM:'): return int(ln.split()[1])\n"
         "atexit.register(lambda: print('PEAK_RSS_KB', _hwm(), flush=True))\n"
         "from pipeline.partition import partition_files\n"
         "ps = partition_files([sys.argv[1]], sys.argv[2], n_partitions=int(sys.argv[3]), flush_rows=5_000, batch_rows=5_000)\n"
         "print('PARTS', ps.n_partitions, ps.ledger.judgments)\n")


def _partition_peak(src: Path, out: Path, n: int) -> tuple[int, int, int]:
    """(VmHWM MiB, partitions, judgments) of a fresh process partitioning ``src`` (VmHWM: the
    child's own peak; ru_maxrss would carry pytest's over across exec)."""
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(out), str(n)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = [int(ln.split()[1]) for ln in proc.stdout.splitlines() if ln.startswith("PEAK_RSS_KB")]
    parts = [ln.split()[1:] for ln in proc.stdout.splitlines() if ln.startswith("PARTS")][0]
    return peak[0] // 1024, int(parts[0]), int(parts[1])


@pytest.mark.slow  # ~25 s: generates and partitions 330k judgments in two fresh processes
def test_memory_does_not_grow_with_the_input(tmp_path):
    small, big = tmp_path / "30k.jsonl", tmp_path / "300k.jsonl"
    generate(small, 30_000, 700, seed=1)
    generate(big, 300_000, 700, seed=1)
    # partitions of ~10k judgments each (partition_count(rows, 10_000)): 4 and 32
    peak_small, n_small, j_small = _partition_peak(small, tmp_path / "ps", partition_count(30_000, 10_000))
    peak_big, n_big, j_big = _partition_peak(big, tmp_path / "pb", partition_count(300_000, 10_000))
    assert (n_small, n_big) == (4, 32) and j_big > 9 * j_small
    meta = json.loads((tmp_path / "pb" / "partitions.json").read_text())
    assert sum(p["judgments"] for p in meta["partitions"]) == j_big
    # 10x the input (and 8x the partitions): the peak is one block + the flush buffers + one row group per
    # compaction thread either way (imports dominate); it grew 1.3x before chunks replaced open writers
    print(f"VmHWM: 30k -> {peak_small} MiB, 300k -> {peak_big} MiB")
    assert peak_big < 1.2 * peak_small, (peak_small, peak_big)


def test_the_spilled_chunks_are_removed_off_the_compaction_and_none_is_left(tmp_path, bench_file, monkeypatch):
    """The chunks are renamed out of the set once compacted and removed on a thread of their own (on a filesystem
    mounted with ``discard`` a file's blocks are discarded synchronously by whoever drops it): the compaction
    unlinks nothing, the set holds no chunk, and once the removals are waited for nothing is left beside it."""
    import pipeline.partition as part

    unlinked: list[str] = []
    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: unlinked.append(self.name) or real_unlink(self, *a, **k))
    s = partition_files([bench_file], tmp_path / "set", n_partitions=4, flush_rows=500)
    assert not [n for n in unlinked if n.endswith(".arrows")]
    part.wait_removals()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert not list((tmp_path / "set").glob("**/*.arrows")) and sum(p.judgments for p in s.partitions) > 0
