"""Select on any cut of the pairs (partitions): given what a driver broadcasts -- the annotator
flags, the final consensus parameters, each pair's cluster -- every part's judgment drops, final
pairs, decisions, DPO rows and routed pairs are the whole input's rows of those pairs, and the
counts by reason add up to the whole input's (issue 15: select per partition)."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from pipeline import select as sel
from pipeline.aggregate import aggregate
from pipeline.checks.agreement import ratings
from pipeline.checks import all_flags, resolve_policy, run_checks
from pipeline.ingest import ingest_files
from schemas.policy import Policy
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from gen_judgments import generate  # noqa: E402

POLICY = resolve_policy(Policy())


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("in")
    generate(d / "gen.jsonl", 6000, 700, seed=9)
    inputs: list[Path] = [d / "gen.jsonl", *sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))]
    judgments = ingest_files(inputs).judgments
    prelim = aggregate(judgments, POLICY.checks.aggregation, rated=ratings(judgments))  # (as curate: copies do not vote)
    results = run_checks(judgments, POLICY.checks, pairs=prelim.pairs)
    flags = all_flags(results)
    jsel = sel.filter_judgments(judgments, flags, POLICY.select)
    kept = jsel.kept
    final = aggregate(kept, POLICY.checks.aggregation, texts=prelim.texts())
    clusters = results["near_duplicates"].tables.get("clusters")
    psel = sel.select_pairs(final.pairs, flags, POLICY.select, all_pair_ids=prelim.pairs["pair_id"], clusters=clusters,
                            downweight_share=sel.downweight_shares(kept, jsel.downweighted_annotators), judgments=kept,
                            checks=POLICY.checks)
    return {"judgments": judgments, "prelim": prelim, "flags": flags, "jsel": jsel, "final": final, "clusters": clusters,
            "psel": psel}


def _part(frame: pl.DataFrame, key: str, n: int, i: int) -> pl.DataFrame:
    return frame.filter(pl.col(key).hash(17) % n == i)


def test_the_inputs_exercise_what_select_decides(whole):
    psel, jsel = whole["psel"], whole["jsel"]
    assert jsel.dropped_by_reason and psel.dropped_by_reason and psel.routed.height > 0
    assert psel.dpo.height > 1000 and (psel.pairs["weight"] < 1).sum() > 0
    kinds = set(whole["flags"]["subject_kind"])
    assert {"judgment", "pair", "annotator"} <= kinds


@pytest.mark.parametrize("n", [2, 5])
def test_select_on_each_part_gives_the_whole_inputs_rows(whole, n):
    judgments, flags, prelim, final = whole["judgments"], whole["flags"], whole["prelim"], whole["final"]
    # what the driver broadcasts: flags about annotators (and slices), the final consensus parameters, the clusters
    broadcast = flags.filter(~pl.col("subject_kind").is_in(["pair", "judgment"]))
    drops, dropped, routed_by = Counter(), Counter(), Counter()
    pairs, dpo, routed = [], [], []
    for i in range(n):
        mine = _part(judgments, "pair_id", n, i)
        own = flags.filter(((pl.col("subject_kind") == "pair") & pl.col("subject_id").is_in(mine["pair_id"].implode()))
                           | ((pl.col("subject_kind") == "judgment") & pl.col("subject_id").is_in(mine["comparison_id"].implode())))
        part_flags = pl.concat([own, broadcast])
        jsel = sel.filter_judgments(mine, part_flags, POLICY.select)
        drops.update(jsel.dropped_by_reason)
        kept = jsel.kept
        texts = _part(prelim.texts(), "pair_id", n, i)  # (a worker has its partition's texts)
        agg = aggregate(kept, POLICY.checks.aggregation, texts=texts, params=final.params, fitted=True)
        psel = sel.select_pairs(agg.pairs, part_flags, POLICY.select, all_pair_ids=_part(prelim.pairs, "pair_id", n, i)["pair_id"],
                                clusters=whole["clusters"], downweight_share=sel.downweight_shares(kept, jsel.downweighted_annotators),
                                judgments=kept, checks=POLICY.checks)
        dropped.update(psel.dropped_by_reason)
        routed_by.update(psel.routed_by_label)
        pairs.append(psel.pairs)
        dpo.append(psel.dpo)
        routed.append(psel.routed)
    want = whole["psel"]
    assert dict(drops) == whole["jsel"].dropped_by_reason
    assert pl.concat(pairs).sort("pair_id").equals(want.pairs.sort("pair_id"))
    assert pl.concat(dpo).sort("pair_id").equals(want.dpo.sort("pair_id"))
    assert pl.concat(routed).sort("pair_id").equals(want.routed.sort("pair_id"))
    assert dict(dropped) == want.dropped_by_reason
    assert {k: v for k, v in routed_by.items()} == want.routed_by_label


# ---------------------------------------------------------------- pipeline/partition_select.py: the steps composed
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("in")
    generate(d / "gen.jsonl", 6000, 700, seed=9)
    return [d / "gen.jsonl", *sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))]


def _selected(inputs: list[Path], root: Path, n: int, client=None):
    from pipeline.checks import all_flags as flags_of
    from pipeline.distributed import refs_of
    from pipeline.partition import partition_files
    from pipeline.partition_select import select
    from pipeline.partitioned import analyze

    pset = partition_files(inputs, root / "set", n_partitions=n)
    refs = refs_of(pset)
    a = analyze(refs, root / "work", POLICY.checks, [s.path for s in pset.sources], client=client)
    got = select(refs, root / "work", POLICY, a.params, flags_of(a.results), a.results["near_duplicates"].tables.get("clusters"),
                 client=client)
    return refs, got


@pytest.mark.parametrize("n", [1, 3])
def test_partitioned_select_and_split_are_the_whole_inputs(whole, inputs, tmp_path, n):
    """Drops, the final fit, every pair's row, the DPO rows with their splits, the routed pairs and
    the counts: the one-process select and split's (the checks' flags from partitioned.analyze)."""
    from pipeline import split as sp
    from pipeline.partition_select import dpo_rows, partition_rows

    refs, got = _selected(inputs, tmp_path, n)
    want, jsel, final = whole["psel"], whole["jsel"], whole["final"]
    assert got.judgments_dropped == jsel.dropped_by_reason
    assert got.params.equals(final.params.sort("annotator_id"))
    assert got.fate.drop("_p").equals(want.pairs.select("pair_id", "decision", "reason", "near_dup_cluster").sort("pair_id"))
    assert got.routed.equals(want.routed.select("pair_id", "route").sort("pair_id"))
    assert (got.dropped_by_reason, got.routed_by_label) == (want.dropped_by_reason, want.routed_by_label)
    pairs = pl.concat([partition_rows(got, r, "pairs") for r in refs]).sort("pair_id")
    assert pairs.equals(want.pairs.sort("pair_id"))
    dpo = pl.concat([dpo_rows(got, r) for r in refs]).sort("pair_id")
    want_dpo = sp.assign_splits(want.dpo, POLICY.split, clusters=whole["clusters"]).sort("pair_id")
    assert dpo.equals(want_dpo)
    assert got.split_sizes == {s: int((want_dpo["split"] == s).sum()) for s in sp.SPLITS}
    assert min(got.split_sizes.values()) > 0


def test_the_flags_partitioned_analyze_gives_are_the_whole_inputs(whole, inputs, tmp_path):
    """What select reads: the flags of every check (registry and reviews have nothing to say
    under the default policy, so analyze's eleven checks give every flag)."""
    from pipeline.checks import all_flags as flags_of
    from pipeline.distributed import refs_of
    from pipeline.partition import partition_files
    from pipeline.partitioned import analyze

    pset = partition_files(inputs, tmp_path / "set", n_partitions=3)
    a = analyze(refs_of(pset), tmp_path / "work", POLICY.checks, [s.path for s in pset.sources])
    got, want = flags_of(a.results), whole["flags"]
    assert got.sort(got.columns, nulls_last=True).equals(want.sort(want.columns, nulls_last=True))


def test_a_changed_broadcast_file_fails_the_task(tmp_path):
    from pipeline.distributed import PartitionChanged
    from pipeline.partition_select import Broadcast

    b = Broadcast.write(pl.DataFrame({"x": [1, 2]}), tmp_path, "flags")
    assert b.read()["x"].to_list() == [1, 2]
    Path(b.path).write_bytes(Path(b.path).read_bytes()[:-1] + b"\0")
    # a process that read it keeps the verified copy; one that has not (a worker, a retry) fails
    assert b.read()["x"].to_list() == [1, 2]
    Broadcast.forget()
    with pytest.raises(PartitionChanged, match="sha256"):
        b.read()


def test_a_broadcast_table_is_read_once_per_process(tmp_path, monkeypatch):
    """Every select and drop task reads the flags and clusters: a process verifies and decodes each
    once (64 partitions at 10M judgments read the clusters 64 times before) and keeps two."""
    import pipeline.partition_select as ps

    tables = [ps.Broadcast.write(pl.DataFrame({"x": [i]}), tmp_path, f"t{i}") for i in range(3)]
    reads = []
    real = ps.sha256_file
    monkeypatch.setattr(ps, "sha256_file", lambda p: reads.append(p) or real(p))
    ps.Broadcast.forget()
    for _ in range(3):
        assert tables[0].read()["x"].to_list() == [0] and tables[1].read()["x"].to_list() == [1]
    assert reads == [tables[0].path, tables[1].path]
    tables[2].read()  # a third table: the oldest goes
    tables[0].read()
    assert reads[-2:] == [tables[2].path, tables[0].path] and len(ps._READ) == 2
    ps.Broadcast.forget()
    assert not ps._READ


def test_select_takes_each_partitions_texts_from_the_decide_step_and_gives_the_same_rows(inputs, tmp_path, monkeypatch):
    """With the decide step's cached texts a select task aggregates once (the final pairs), not
    twice; its rows are the rows it gives when it aggregates the texts again."""
    import pipeline.partition_select as ps
    from pipeline.checks import all_flags as flags_of
    from pipeline.distributed import refs_of
    from pipeline.partition import partition_files
    from pipeline.partitioned import analyze

    pset = partition_files(inputs, tmp_path / "set", n_partitions=3)
    refs = refs_of(pset)
    a = analyze(refs, tmp_path / "work", POLICY.checks, [s.path for s in pset.sources])
    assert sorted(a.texts) == sorted(r.paths[0] for r in refs)
    calls = []
    real = ps.aggregate
    monkeypatch.setattr(ps, "aggregate", lambda *x, **k: calls.append(1) or real(*x, **k))
    args = (refs, tmp_path / "work", POLICY, a.params, flags_of(a.results), a.results["near_duplicates"].tables.get("clusters"))
    fast = ps.select(*args, texts=a.texts)
    assert len(calls) == len(refs)
    slow = ps.select(*args)
    assert len(calls) == 3 * len(refs)
    for r in refs:
        assert ps.partition_rows(fast, r, "pairs").equals(ps.partition_rows(slow, r, "pairs"))
        assert ps.dpo_rows(fast, r).equals(ps.dpo_rows(slow, r))
