"""pipeline/distributed.py: a step mapped over partitions, in process and on a 2-process LocalCluster."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from pipeline import partition_stats
from pipeline.checks import agreement
from pipeline.aggregate import encode
from pipeline.checks.duplicates import exact_duplicates, identical_response_pairs
from pipeline.checks.position_bias import order_consistency
from pipeline.checks.pair_id_conflict import conflicts
from pipeline.distributed import (AUTO_THREADS_FROM, PartitionRef, PartitionTaskError, encode_state, map_partitions,
                                  open_runner, refs_of, run_step, task_threads)
from pipeline.ingest import ingest_files, judgments_from_records
from pipeline.partition import partition_files
from pipeline.readers import UnreadableFile
from schemas.policy import ChecksConfig
from tests.conftest import ROOT, canonical, redelivered, write_jsonl

sys.path.insert(0, str(ROOT / "benchmarks"))
from gen_judgments import generate  # noqa: E402

N_PARTS = 6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("in")
    gen = d / "gen.jsonl"
    generate(gen, 8000, 700, seed=5)
    same = canonical(100, pair_id="given-1", annotator_id="rev-9")
    rows = [same, {**same, "comparison_id": "c-again", "pair_id": "given-2"},  # a re-delivery under another id
            canonical(200, pair_id="given-x"), canonical(201, pair_id="given-x"),  # one id, two contents
            canonical(300, pair_id="given-y"), canonical(300, pair_id="given-y", comparison_id="c-300b", annotator_id="rev-2"),
            canonical(400, response_b="Mix flour, water, yeast and salt, then knead (400)."),  # identical responses
            canonical(401, response_b="MIX flour,  water, yeast and salt, then knead (401).")]  # the same up to case/space
    return [gen, write_jsonl(d / "planted.jsonl", rows)]


@pytest.fixture(scope="module")
def parts(inputs, tmp_path_factory):
    return partition_files(inputs, tmp_path_factory.mktemp("parts") / "set", n_partitions=N_PARTS, flush_rows=1000)


def _bytes(state) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in encode_state(state).items()}


def test_annotator_sums_count_each_delivery_once():
    """A re-delivered copy (``exact_duplicate``) is not another judgment of its annotator, as in the
    bias checks: the first-shown and longer-chosen sums of a batch with copies are the batch's without."""
    rows = [canonical(i, annotator_id=f"rev-{i % 3}", label="ab"[i % 2], shown_first="ab"[i // 2 % 2]) for i in range(30)]
    want = partition_stats.annotator_sums(judgments_from_records(rows))
    assert want["judgments"].sum() == len(rows) and want["first_chosen"].sum() > 0
    assert partition_stats.annotator_sums(judgments_from_records(redelivered(rows, 3))).equals(want)


def test_reduce_equals_the_whole_input_computation(inputs, parts, tmp_path):
    out, stats = run_step(partition_stats.STEP, refs_of(parts), tmp_path / "cache")
    assert stats.computed == list(range(N_PARTS)) and stats.cached == [] and stats.runner == "process"
    whole = ingest_files(inputs).judgments
    assert out["exact_duplicates"].equals(exact_duplicates(whole).sort("comparison_id"))
    assert out["exact_duplicates"].height > 20 and "c-again" in out["exact_duplicates"]["comparison_id"].to_list()
    want = partition_stats.annotator_sums(whole)
    assert out["annotator_sums"].select(want.columns).equals(want)
    assert out["pair_id_conflicts"]["pair_id"].to_list() == conflicts(whole)["pair_id"].to_list() == ["given-x"]
    assert out["counts"].row(0) == (whole.height, whole.select(partition_stats.content_key_hash().n_unique()).item())
    assert out["identical_response_pairs"]["pair_id"].equals(identical_response_pairs(whole))
    assert out["identical_response_pairs"].height == 2
    e = encode(whole)
    n, same = order_consistency(e)
    nd, samed = order_consistency(e, decisive=True)
    want_order = pl.DataFrame({"annotator_id": e.ann_ids, "order_pairs": n.astype(int), "order_same": same.astype(int),
                               "decisive_order_pairs": nd.astype(int), "decisive_order_same": samed.astype(int)})
    want_order = want_order.filter(pl.col("order_pairs") > 0).sort("annotator_id")
    assert want_order.height >= 4  # the AI judges judge in both orders
    assert out["order_consistency"].select(want_order.columns).equals(want_order)
    # alpha, kappa and their bootstrap CIs from merged count profiles: exactly the agreement check's on the whole input
    check = agreement.run(whole, ChecksConfig()).metrics
    for row in out["agreement"].iter_rows(named=True):
        want_k = check[row["kind"]]
        assert row["n_pairs"] == want_k["n_pairs"] > 0 or row["kind"] == "unknown"
        if row["n_pairs"]:
            assert (row["krippendorff_alpha"], [row["alpha_lo"], row["alpha_hi"]]) == \
                (want_k["krippendorff_alpha"], want_k["krippendorff_alpha_ci"])
            assert (row["fleiss_kappa"], [row["kappa_lo"], row["kappa_hi"]], row["fleiss_m"]) == \
                (want_k["fleiss_kappa"], want_k["fleiss_kappa_ci"], want_k["fleiss_m"])
    # the same figures from another partition count (states merge; nothing depends on the cut)
    other = partition_files(inputs, tmp_path / "p3", n_partitions=3, flush_rows=4000)
    out3, _ = run_step(partition_stats.STEP, refs_of(other), tmp_path / "cache3")
    assert _bytes(out3) == _bytes(out)
    # a second run reads every state from the cache; progress is reported per partition either way
    seen: list[int] = []
    again, stats = run_step(partition_stats.STEP, refs_of(parts), tmp_path / "cache", on_partition=seen.append)
    assert stats.computed == [] and stats.cached == list(range(N_PARTS)) and _bytes(again) == _bytes(out)
    assert seen == list(range(N_PARTS))


def test_tasks_on_threads_give_the_same_states_and_report_a_failure_the_same_way(parts, tmp_path, monkeypatch):
    """``PREFPIPE_TASK_THREADS=2``: two partitions' tasks at once in this process -- the same bytes
    in partition order, progress for every partition, a failed task named as in one thread."""
    one, _ = run_step(partition_stats.STEP, refs_of(parts), tmp_path / "one")
    monkeypatch.setenv("PREFPIPE_TASK_THREADS", "2")
    seen: list[int] = []
    two, stats = run_step(partition_stats.STEP, refs_of(parts), tmp_path / "two", on_partition=seen.append)
    assert _bytes(two) == _bytes(one) and stats.computed == list(range(N_PARTS)) and sorted(seen) == list(range(N_PARTS))
    refs = refs_of(parts)
    good = _damage(Path(refs[2].paths[0]))
    try:
        with pytest.raises(PartitionTaskError, match=r"partition 2 .*PartitionChanged") as err:
            map_partitions(partition_stats.STEP, refs, tmp_path / "three")
        assert set(err.value.failed) == {2}
    finally:
        Path(refs[2].paths[0]).write_bytes(good)
    monkeypatch.delenv("PREFPIPE_TASK_THREADS")  # unset: one at a time, two from AUTO_THREADS_FROM partitions (2 cores)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert (task_threads(0), task_threads(AUTO_THREADS_FROM - 1), task_threads(AUTO_THREADS_FROM)) == (1, 1, 2)
    assert task_threads(3, light=True) == 2  # (a few columns a task: two at a time whatever the count)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert task_threads(AUTO_THREADS_FROM) == 1 and task_threads(3, light=True) == 1
    monkeypatch.setenv("PREFPIPE_TASK_THREADS", "1")
    assert task_threads(10 * AUTO_THREADS_FROM) == 1 and task_threads(3, light=True) == 1
    monkeypatch.setenv("PREFPIPE_TASK_THREADS", "zero")
    with pytest.raises(ValueError, match="PREFPIPE_TASK_THREADS='zero': expected a whole number >= 1"):
        map_partitions(partition_stats.STEP, refs, tmp_path / "four")


def test_compressed_states_read_back_the_same_and_a_bad_setting_is_refused(parts, tmp_path, monkeypatch):
    """``PREFPIPE_STATE_COMPRESSION``: the driver's setting, sent with every task; the states read
    back equal to uncompressed ones (their files smaller); anything but none/lz4/zstd is refused,
    by ``curate`` with exit 2 before any work."""
    from typer.testing import CliRunner

    from flows.cli import app

    plain, _ = run_step(partition_stats.STEP, refs_of(parts), tmp_path / "plain")
    monkeypatch.setenv("PREFPIPE_STATE_COMPRESSION", "zstd")
    packed, _ = run_step(partition_stats.STEP, refs_of(parts), tmp_path / "packed")
    assert packed.keys() == plain.keys() and all(packed[k].equals(plain[k]) for k in plain)
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*.arrow"))  # noqa: E731
    assert size(tmp_path / "packed") < 0.8 * size(tmp_path / "plain")
    monkeypatch.setenv("PREFPIPE_STATE_COMPRESSION", "gzip")
    with pytest.raises(ValueError, match="PREFPIPE_STATE_COMPRESSION='gzip': expected none, lz4 or zstd"):
        map_partitions(partition_stats.STEP, refs_of(parts), tmp_path / "bad")
    res = CliRunner().invoke(app, ["curate", str(ROOT / "data" / "samples" / "batch-2026-11-02.jsonl"),
                                   "--store", str(tmp_path / "s")])
    assert res.exit_code == 2 and "PREFPIPE_STATE_COMPRESSION" in res.output and not (tmp_path / "s" / "versions").exists()


def _damage(path: Path) -> bytes:
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    return good


def test_a_failed_partition_fails_the_run_and_a_retry_computes_only_it(parts, tmp_path):
    refs = refs_of(parts)
    target = Path(refs[4].paths[0])
    good = _damage(target)
    try:
        with pytest.raises(PartitionTaskError, match=r"partition 4 \(part-00004\.parquet, sha256 [0-9a-f]{12}\): PartitionChanged") as err:
            map_partitions(partition_stats.STEP, refs, tmp_path / "cache")
        assert set(err.value.failed) == {4} and "5 finished and are cached" in str(err.value)
    finally:
        target.write_bytes(good)
    _, stats = map_partitions(partition_stats.STEP, refs, tmp_path / "cache")
    assert stats.computed == [4] and stats.cached == [0, 1, 2, 3, 5]
    # a cached state altered on disk is not trusted: that partition is computed again
    state_dir = next(d for d in (tmp_path / "cache").iterdir() if (d / "counts.arrow").exists())
    (state_dir / "counts.arrow").write_bytes(b"not arrow")
    _, stats = map_partitions(partition_stats.STEP, refs, tmp_path / "cache")
    assert len(stats.computed) == 1 and len(stats.cached) == N_PARTS - 1
    _, stats = map_partitions(partition_stats.STEP, refs, tmp_path / "cache")
    assert stats.computed == []


def test_bad_runner_spec_and_refs():
    with pytest.raises(ValueError, match="PREFPIPE_DASK='udp://x'"), open_runner("udp://x"):
        pass
    ref = PartitionRef(0, ("/nonexistent",), ("0" * 64,))
    with pytest.raises(ValueError, match="unique"):
        map_partitions(partition_stats.STEP, [ref, ref], "/tmp/unused")


def test_two_worker_local_cluster_is_byte_identical_fails_visibly_and_retries(parts, tmp_path):
    """A real LocalCluster of 2 worker processes: same reduce bytes as in process; one damaged
    partition fails the run naming it; the retry computes only that partition."""
    local, _ = run_step(partition_stats.STEP, refs_of(parts), tmp_path / "local-cache")
    copy = tmp_path / "copy"  # a copy of the set, so the damage below does not touch the shared fixture
    shutil.copytree(parts.directory, copy)
    from pipeline.partition import PartitionSet

    refs = refs_of(PartitionSet.load(copy))
    t0 = time.perf_counter()
    with open_runner("local") as client:
        info = client.scheduler_info()
        workers = info["workers"].values()
        assert len(workers) == 2 and all(w["nthreads"] == 1 for w in workers)
        pids = set(client.run(lambda: __import__("os").getpid()).values())
        assert len(pids) == 2 and __import__("os").getpid() not in pids  # processes, not threads
        seen: list[int] = []
        dist, stats = run_step(partition_stats.STEP, refs, tmp_path / "dask-cache", client=client, on_partition=seen.append)
        assert stats.runner == "dask" and stats.computed == list(range(N_PARTS)) and sorted(seen) == stats.computed
        assert _bytes(dist) == _bytes(local)
        for name in local:
            assert dist[name].equals(local[name])

        good = _damage(Path(refs[2].paths[0]))
        with pytest.raises(PartitionTaskError, match=r"partition 2 \(part-00002\.parquet") as err:
            run_step(partition_stats.STEP, refs, tmp_path / "dask-cache-2", client=client)
        assert set(err.value.failed) == {2}
        Path(refs[2].paths[0]).write_bytes(good)
        retry, stats = run_step(partition_stats.STEP, refs, tmp_path / "dask-cache-2", client=client)
        assert stats.computed == [2] and stats.cached == [0, 1, 3, 4, 5]
        assert _bytes(retry) == _bytes(local)
    print(f"cluster test: {time.perf_counter() - t0:.1f} s")


def _split_input(inputs: list[Path], d: Path) -> list[Path]:
    """The generated batch cut into 3 files (+ the planted one): several inputs."""
    lines = inputs[0].read_text().splitlines(keepends=True)
    cut = [lines[:2500], lines[2500:6000], lines[6000:]]
    files = [d / f"in-{k}.jsonl" for k in range(3)]
    for f, chunk in zip(files, cut, strict=True):
        f.write_text("".join(chunk))
    return files + [inputs[1]]


def test_per_file_partitions_equal_one_set_in_process_and_on_the_cluster(inputs, tmp_path, monkeypatch):
    """Each input file partitioned on its own (in parallel on 2 worker processes): partition i is
    the list of every file's part i; the same rows, ledger and reduce bytes as one set of all files."""
    from pipeline.partition import merged_ledger, partition_inputs, read_partition

    files = _split_input(inputs, tmp_path)
    whole = partition_files(files, tmp_path / "whole", n_partitions=N_PARTS, flush_rows=1000)
    want, _ = run_step(partition_stats.STEP, refs_of(whole), tmp_path / "c-whole")
    local_sets = partition_inputs(files, tmp_path / "work-local", n_partitions=N_PARTS, flush_rows=1000)
    assert merged_ledger(local_sets) == whole.ledger and len(local_sets) == 4
    refs = refs_of(*local_sets)
    assert all(len(r.paths) == 4 for r in refs)
    for r in refs:
        assert read_partition(list(r.paths)).equals(read_partition(whole.path(r.index)))
    got, _ = run_step(partition_stats.STEP, refs, tmp_path / "c-local")
    assert _bytes(got) == _bytes(want)
    with open_runner("local") as client:
        # the driver never reads judgments: its Parquet and JSONL readers fail if called (the workers are
        # other processes with their own modules)
        import pipeline.ingest
        import pyarrow.parquet

        def refuse(*_a, **_k):
            raise AssertionError("the driver read data")

        for mod, name in ((pl, "read_parquet"), (pl, "scan_parquet"), (pyarrow.parquet, "read_table"),
                          (pipeline.ingest, "ingest_files")):
            monkeypatch.setattr(mod, name, refuse)
        dask_sets = partition_inputs(files, tmp_path / "work-dask", n_partitions=N_PARTS, client=client, flush_rows=1000)
        assert [[p.sha256 for p in s.partitions] for s in dask_sets] == [[p.sha256 for p in s.partitions] for s in local_sets]
        got, stats = run_step(partition_stats.STEP, refs_of(*dask_sets), tmp_path / "c-dask", client=client)
        # an unreadable input on a worker reaches the driver as UnreadableFile, naming the file
        bad = tmp_path / "bad.jsonl.gz"
        bad.write_bytes(b"not gzip at all")
        with pytest.raises(UnreadableFile, match="bad.jsonl.gz"):
            partition_inputs([files[0], bad], tmp_path / "work-bad", n_partitions=N_PARTS, client=client)
        monkeypatch.undo()
    assert stats.runner == "dask" and _bytes(got) == _bytes(want)
    # a second call finds every file's set by its content: nothing is partitioned again (the first calls' spilled
    # chunks are removed on threads of their own: waited for, or one may still be listed in ``before`` only)
    from pipeline.partition import wait_removals

    wait_removals()
    before = {d: d.stat().st_mtime_ns for d in (tmp_path / "work-local").iterdir()}
    partition_inputs(files, tmp_path / "work-local", n_partitions=N_PARTS)
    assert {d: d.stat().st_mtime_ns for d in (tmp_path / "work-local").iterdir()} == before


def test_per_file_sets_are_keyed_by_the_ingest_options(inputs, tmp_path):
    """A set made with other ingest options (they can change the rows) is not reused for these."""
    from pipeline.partition import partition_inputs, wait_removals

    a = partition_inputs(inputs[1:], tmp_path / "w", n_partitions=2)
    b = partition_inputs(inputs[1:], tmp_path / "w", n_partitions=2, batch_id="other-batch")
    c = partition_inputs(inputs[1:], tmp_path / "w", n_partitions=2)
    assert a[0].directory != b[0].directory and c[0].directory == a[0].directory
    wait_removals()  # (the spilled chunks: removed on threads of their own; a loaded machine lists one otherwise)
    assert len(list((tmp_path / "w").iterdir())) == 2


def test_kept_tables_are_returned_and_the_others_read_back_one_partition_at_a_time(parts, tmp_path):
    """``keep``: the driver decodes the tables it names; the rest stay cached (rows a later stage
    reads one partition at a time, :func:`cached_table`), verified against their sha256."""
    from pipeline.distributed import PartitionChanged, cached_table

    refs = refs_of(parts)
    every, _ = map_partitions(partition_stats.STEP, refs, tmp_path / "cache")
    names = sorted(every[0])
    assert len(names) >= 2
    kept, stats = map_partitions(partition_stats.STEP, refs, tmp_path / "cache", keep=[names[0]])
    assert stats.cached == list(range(N_PARTS)) and all(sorted(s) == [names[0]] for s in kept)
    fresh, _ = map_partitions(partition_stats.STEP, refs, tmp_path / "cache2", keep=[names[0]])  # computed, not cached
    assert all(sorted(s) == [names[0]] for s in fresh)
    for r, state in zip(refs, every, strict=True):
        assert cached_table(partition_stats.STEP, r, tmp_path / "cache", names[1]).equals(state[names[1]])
    d = next(d for d in (tmp_path / "cache").iterdir() if (d / f"{names[1]}.arrow").exists())
    (d / f"{names[1]}.arrow").write_bytes(b"not arrow")
    with pytest.raises((PartitionChanged, FileNotFoundError)):
        for r in refs:
            cached_table(partition_stats.STEP, r, tmp_path / "cache", names[1])
    with pytest.raises(FileNotFoundError, match="no cached table"):
        cached_table(partition_stats.STEP, refs[0], tmp_path / "cache", "no-such-table")


def test_partition_progress_reports_each_partition_of_each_step(parts, tmp_path):
    from pipeline.distributed import partition_progress
    from flows.console import StageProgress

    seen: list[tuple[str, int, int]] = []
    with partition_progress(lambda *a: seen.append(a)):
        map_partitions(partition_stats.STEP, refs_of(parts), tmp_path / "cache")  # computed
        map_partitions(partition_stats.STEP, refs_of(parts), tmp_path / "cache")  # cached: reported too
    name = partition_stats.STEP.name
    assert seen == [(name, i, N_PARTS) for i in range(1, N_PARTS + 1)] * 2
    map_partitions(partition_stats.STEP, refs_of(parts), tmp_path / "cache")  # outside: nothing reported
    assert len(seen) == 2 * N_PARTS

    class Prog:  # what rich's Progress receives on a terminal
        def __init__(self):
            self.descriptions = []

        def update(self, task, description, refresh):
            self.descriptions.append(description)

    prog = Prog()
    sp = StageProgress(prog, 0)
    sp.partitions("select-pairs", 3, 16)
    assert prog.descriptions == ["select pairs: 3/16 partitions"]
    StageProgress().partitions("select-pairs", 3, 16)  # no terminal: nothing to update, no error


def test_a_partition_changed_in_place_after_a_step_read_it_is_still_caught(parts, tmp_path):
    """A process remembers the files it hashed (a build maps several steps over them); a file
    rewritten since -- same size, one byte flipped -- is hashed again and refused."""
    refs = refs_of(parts)
    map_partitions(partition_stats.STEP, refs, tmp_path / "cache")
    target = Path(refs[1].paths[0])
    good = target.read_bytes()
    try:
        target.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
        with pytest.raises(PartitionTaskError, match=r"partition 1 .*PartitionChanged"):
            map_partitions(partition_stats.STEP, refs, tmp_path / "other-cache")
    finally:
        target.write_bytes(good)


def test_state_bytes_are_read_without_a_python_copy_of_them():
    # Polars' public reader wraps bytes in a BytesIO whose getbuffer() copies them all into fresh memory;
    # read_ipc gives the same frame with no Python-side allocation near the blob's size (tracemalloc sees
    # Python's allocations only: the copy, not Polars' own columns)
    import tracemalloc

    from pipeline.distributed import decode_state, read_ipc

    frame = pl.DataFrame({"id": list(range(200_000)), "text": [f"response {i} " * 8 for i in range(200_000)],
                          "tags": [[str(i % 7)] if i % 5 else None for i in range(200_000)]})
    blob = encode_state({"t": frame})["t"]
    assert len(blob) > 20 << 20
    tracemalloc.start()
    try:
        got = read_ipc(blob)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        pl.read_ipc_stream(blob)
        _, public_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.equals(frame) and got.schema == frame.schema
    assert decode_state({"t": blob})["t"].equals(frame)
    assert public_peak > len(blob)  # the control: the public reader's copy
    assert peak < 1 << 20, peak
