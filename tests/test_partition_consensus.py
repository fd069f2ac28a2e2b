"""pipeline/partition_consensus.py: the annotator parameters fitted once over every partition's
codes, each partition's pairs decided with them -- equal, bit for bit, to the whole input's
consensus in the canonical order, whatever the partition count and wherever the tasks ran."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import partition_consensus as pc
from pipeline.aggregate import PAIR_TEXT_COLUMNS, _encode, _fit, aggregate, canonical_encoding, unique_inverse
from pipeline.checks.agreement import ratings
from pipeline.distributed import PartitionTaskError, map_partitions, open_runner, refs_of, run_step
from pipeline.ingest import ingest_files
from pipeline.partition import partition_files, partition_index, read_partition
from schemas.policy import AggregationConfig
from tests.conftest import ROOT, canonical, write_jsonl

sys.path.insert(0, str(ROOT / "benchmarks"))
from gen_judgments import generate  # noqa: E402

SAMPLES = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))  # AI judges, gold items, both display orders


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("in")
    generate(d / "gen.jsonl", 8000, 700, seed=5)
    return [d / "gen.jsonl", *SAMPLES]


@pytest.fixture(scope="module")
def whole(inputs) -> pl.DataFrame:
    return pc.canonical(ingest_files(inputs).judgments)


@pytest.fixture(scope="module")
def sets(inputs, tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    return {n: partition_files(inputs, d / f"n{n}", n_partitions=n, flush_rows=2000) for n in (1, 3, 6)}


def _same_encoded(a, b) -> list[str]:
    diff = []
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        same = x.equals(y) if isinstance(x, pl.Series) else (x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True))
        if not same:
            diff.append(name)
    return diff


@pytest.mark.parametrize("n", [1, 3, 6])
def test_the_assembled_codes_are_the_whole_inputs_and_so_are_the_parameters_and_pairs(whole, sets, n, tmp_path):
    refs = refs_of(sets[n])
    states, _ = map_partitions(pc.codes_step(), refs, tmp_path / "codes")
    # the votes (re-delivered copies left out) in the canonical layout
    votes = canonical_encoding(_encode(whole).only(ratings(whole)))
    assert not ratings(whole).all()  # (the samples re-deliver some judgments)
    assert _same_encoded(pc.assemble(states), votes) == []
    # in any partition order: the layout is the canonical one
    assert _same_encoded(pc.assemble(states[::-1]), votes) == []
    ref = aggregate(whole, rated=ratings(whole))
    params = run_step(pc.codes_step(), refs, tmp_path / "codes")[0]["params"]
    assert params.equals(ref.params.sort("annotator_id"))
    assert params["oa_alpha"].drop_nulls().len() >= 4 and params["ds_accuracy"].drop_nulls().len() > 150
    pairs, stats = run_step(pc.decide_step(params), refs, tmp_path / "decide")
    assert stats.computed == list(range(n))
    want = ref.pairs.drop(PAIR_TEXT_COLUMNS).sort("pair_id")
    assert pairs["pairs"].equals(want)
    assert want.height > 2500 and want["label_consensus"].n_unique() >= 4


def test_the_fit_is_global_and_its_order_is_canonical(inputs, whole, sets):
    """What the two passes guard against: pairs decided with each partition's own fit differ
    from the whole input's; an EM run in input order differs from the canonical one in the last
    bits, so aggregate fits on the canonical layout: the same parameters and pairs in any order."""
    ref = aggregate(whole)
    want = ref.pairs.drop(PAIR_TEXT_COLUMNS).sort("pair_id")
    local = pl.concat([aggregate(read_partition(list(r.paths))).pairs.drop(PAIR_TEXT_COLUMNS)
                       for r in refs_of(sets[3])]).sort("pair_id")
    assert (local["label_consensus"] != want["label_consensus"]).sum() > 10
    raw = ingest_files(inputs).judgments
    in_input_order = _fit(_encode(raw), AggregationConfig(), None).params.sort("annotator_id")
    canon = ref.params.sort("annotator_id")
    assert not in_input_order.equals(canon)
    assert (in_input_order["ds_accuracy"] - canon["ds_accuracy"]).abs().max() < 1e-12
    # any order that keeps each pair's judgments in input order (as a partitioning does): the same fit and pairs
    shuffled = raw.sort(pl.col("pair_id").hash(7), maintain_order=True)
    for order in (raw, shuffled):
        agg = aggregate(order)
        assert agg.params.sort("annotator_id").equals(canon)
        assert agg.pairs.drop(PAIR_TEXT_COLUMNS).sort("pair_id").equals(want)


def test_dropped_pairs_leave_the_fit_and_an_id_across_partitions_is_refused(tmp_path):
    rows = [canonical(i, annotator_id=f"rev-{i % 4}", label="ab"[i % 2]) for i in range(40)]
    # one given id naming two contents that fall in different partitions
    candidates = [canonical(900 + k, pair_id="given-x", annotator_id=f"rev-{k % 3}") for k in range(20)]
    where = partition_index(ingest_files([write_jsonl(tmp_path / "c.jsonl", candidates)]).judgments, 8).to_list()
    rows += [candidates[0], candidates[next(k for k, p in enumerate(where) if p != where[0])]]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    ps = partition_files([src], tmp_path / "set", n_partitions=8)
    refs = refs_of(ps)
    parts_with_x = [r.index for r in refs if "given-x" in read_partition(list(r.paths))["pair_id"].to_list()]
    assert len(parts_with_x) == 2
    with pytest.raises(ValueError, match="given-x"):
        run_step(pc.codes_step(), refs, tmp_path / "c1")
    params = run_step(pc.codes_step(drop=("given-x",)), refs, tmp_path / "c2")[0]["params"]
    whole = pc.canonical(ingest_files([src]).judgments.filter(pl.col("pair_id") != "given-x"))
    assert params.equals(aggregate(whole).params.sort("annotator_id"))
    pairs = run_step(pc.decide_step(params, drop=("given-x",)), refs, tmp_path / "d")[0]["pairs"]
    assert pairs.height == 40 and "given-x" not in pairs["pair_id"].to_list()


def test_the_decide_step_is_keyed_by_its_parameters_and_policy(whole):
    params = aggregate(whole).params
    a = pc.decide_step(params)
    assert a.version == pc.decide_step(params.reverse()).version  # (the rows' order is not a parameter)
    assert a.version != pc.decide_step(params.with_columns(ds_accuracy=pl.col("ds_accuracy") * 0.99)).version
    assert a.version != pc.decide_step(params, AggregationConfig(ai_weight=0.25)).version
    assert a.version != pc.decide_step(params, drop=("p-1",)).version


def test_dimension_verdicts_are_fitted_once_and_decided_as_over_the_whole_input(inputs, tmp_path):
    """Per-dimension codes travel with the overall ones: one fit per (annotator, dimension) on the
    driver, every pair's dimensions (and the rule's label where they conflict) decided with it --
    the whole input's consensus rows and pairs, bit for bit; partitions without verdicts send none."""
    from pipeline import dimensions as dims
    from schemas.policy import DimensionsConfig

    rule = DimensionsConfig(priority=["harmlessness", "helpfulness"])
    files = [*inputs, ROOT / "data" / "samples" / "dimensions" / "batch-2026-11-23-dimensions.jsonl"]
    whole = pc.canonical(ingest_files(files, dimensions=rule).judgments)
    ref = aggregate(whole, dimensions=rule, rated=ratings(whole))
    refs = refs_of(partition_files(files, tmp_path / "set", n_partitions=6, flush_rows=2000, dimensions=rule))
    states, _ = map_partitions(pc.codes_step(), refs, tmp_path / "codes")
    assert 0 < sum("dim_codes" in st for st in states) <= 6
    dim_params = pc.fit_dimensions(states)
    assert dim_params is not None and dim_params.equals(aggregate(dims.long_frame(whole)).params.sort("annotator_id"))
    assert dim_params["annotator_id"].str.contains(dims.SEP).all() and dim_params.height == 8  # 4 annotators x 2
    out, _ = run_step(pc.decide_step(pc.fit(states), dim_params=dim_params, dimensions=rule), refs, tmp_path / "decide")
    assert out["dimensions"].equals(dims.consensus(whole))
    assert out["pairs"].equals(ref.pairs.drop(PAIR_TEXT_COLUMNS).sort("pair_id"))
    assert out["pairs"]["dimensions"].drop_nulls().len() == 60
    # without the parameters each partition fits its own: the step is bound to them (its cache key says so)
    assert pc.decide_step(pc.fit(states), dim_params=dim_params).version != pc.decide_step(pc.fit(states)).version


@pytest.mark.slow
def test_both_passes_on_a_two_worker_cluster_give_the_same_bytes(whole, sets, tmp_path):
    refs = refs_of(sets[6])
    with open_runner("local") as client:
        params = run_step(pc.codes_step(), refs, tmp_path / "codes", client=client)[0]["params"]
        pairs, stats = run_step(pc.decide_step(params), refs, tmp_path / "decide", client=client)
    assert stats.runner == "dask" and stats.computed == list(range(6))
    ref = aggregate(whole, rated=ratings(whole))
    assert params.equals(ref.params.sort("annotator_id"))
    assert pairs["pairs"].equals(ref.pairs.drop(PAIR_TEXT_COLUMNS).sort("pair_id"))


def test_no_judgments_give_no_parameters_and_no_pairs(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [canonical(1, label="maybe")])  # quarantined: nothing to aggregate
    refs = refs_of(partition_files([src], tmp_path / "set", n_partitions=2))
    params = run_step(pc.codes_step(), refs, tmp_path / "c")[0]["params"]
    assert params.height == 0
    assert run_step(pc.decide_step(params), refs, tmp_path / "d")[0]["pairs"].height == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_unique_inverse_is_numpys_for_keys_in_any_order(seed):
    rng = np.random.default_rng(seed)
    pair = np.repeat(np.arange(500), rng.integers(1, 6, 500))
    for keys in (pair * 7 + rng.integers(0, 7, len(pair)),  # the units' keys: sorted by pair, any order within
                 rng.integers(-50, 50, 2000), np.zeros(0, np.int64), np.array([3], np.int64)):
        want_u, want_i = np.unique(keys, return_inverse=True)
        got_u, got_i = unique_inverse(keys)
        assert got_u.dtype == want_u.dtype and np.array_equal(got_u, want_u)
        assert np.array_equal(got_i, want_i.ravel()) and len(got_i) == len(keys)
