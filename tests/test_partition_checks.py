"""pipeline/partition_checks.py: the checks' declared states counted per partition and added give
the very state, and so the very result, of each check over every judgment at once."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import orjson
import polars as pl
import pytest

from pipeline import partition_checks as pk
from pipeline import partition_consensus as pc
from pipeline.aggregate import aggregate, annotator_params
from pipeline.checks import agreement, length_bias, position_bias, reliability
from pipeline.checks.agreement import ratings
from pipeline.distributed import map_partitions, open_runner, refs_of
from pipeline.incremental import PAIR_SCOPED, RUNNERS, Totals
from pipeline.ingest import ingest_files
from pipeline.partition import partition_files, partition_index
from schemas.check import CheckResult
from schemas.policy import ChecksConfig
from tests.conftest import ROOT, canonical, write_jsonl

sys.path.insert(0, str(ROOT / "benchmarks"))
from gen_judgments import generate  # noqa: E402

CFG = ChecksConfig()
N_PARTS = 4
DROP = ("given-across", "given-in")  # the planted pair-id conflicts (dropped before the consensus)
LONGER = "judge-gamma"  # planted: always picks the longer response (length bias's pass 1 leaves it out)


def _text(x) -> str:
    return x["text"] if isinstance(x, dict) else x


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("in")
    generate(d / "gen.jsonl", 8000, 700, seed=5)
    out = []
    for line in (d / "gen.jsonl").read_bytes().splitlines(keepends=True):
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:  # the generator's malformed rows stay as they are
            out.append(line)
            continue
        if row.get("annotator_id") == LONGER:
            row["label"] = "a" if len(_text(row["response_a"])) > len(_text(row["response_b"])) else "b"
        out.append(orjson.dumps(row) + b"\n")
    (d / "planted.jsonl").write_bytes(b"".join(out))
    # given ids naming two contents: one within a partition, one across partitions (of N_PARTS)
    cand = [canonical(900 + k, pair_id=f"given-{k}", annotator_id="rev-9") for k in range(40)]
    where = partition_index(ingest_files([write_jsonl(d / "cand.jsonl", cand)]).judgments, N_PARTS).to_list()
    same = next((i, j) for i in range(40) for j in range(i + 1, 40) if where[i] == where[j])
    apart = next((i, j) for i in range(40) for j in range(i + 1, 40) if where[i] != where[j] and {i, j}.isdisjoint(same))
    rows = [{**cand[k], "pair_id": "given-in", "comparison_id": f"c-in-{k}"} for k in same]
    rows += [{**cand[k], "pair_id": "given-across", "comparison_id": f"c-across-{k}"} for k in apart]
    rows += [canonical(950, response_b="Mix flour, water, yeast and salt, then knead (950).")]  # identical responses
    return [d / "planted.jsonl", write_jsonl(d / "given.jsonl", rows), *sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))]


@pytest.fixture(scope="module")
def every(inputs) -> pl.DataFrame:
    return ingest_files(inputs).judgments


@pytest.fixture(scope="module")
def whole(every) -> pl.DataFrame:
    """What the consensus and the states count: the pair-id conflicts' judgments are dropped first."""
    return every.filter(~pl.col("pair_id").is_in(list(DROP)))


@pytest.fixture(scope="module")
def pset(inputs, tmp_path_factory):
    return partition_files(inputs, tmp_path_factory.mktemp("set") / "s", n_partitions=N_PARTS, flush_rows=2000)


@pytest.fixture(scope="module")
def refs(pset):
    return refs_of(pset)


def _driver_params(refs, cache) -> pl.DataFrame:
    """What the driver fits from the assembled codes: the consensus, then reliability's parameters."""
    states, _ = map_partitions(pc.codes_step(CFG.aggregation, drop=DROP), refs, cache)
    e = pc.assemble(states)
    ds = annotator_params(e, CFG.aggregation).select("annotator_id", "ds_accuracy")
    return reliability.fit_params(None, ds, CFG.aggregation, encoded=e, laid_out=True)


def _same(a: CheckResult, b: CheckResult) -> None:
    assert (a.name, a.status, a.summary) == (b.name, b.status, b.summary)
    assert json.dumps(a.metrics, sort_keys=True, default=str) == json.dumps(b.metrics, sort_keys=True, default=str)
    assert a.flags.equals(b.flags)
    assert sorted(a.tables) == sorted(b.tables)
    for k in a.tables:
        assert a.tables[k].equals(b.tables[k]), k


def test_reliability_parameters_are_fitted_the_same_from_codes_and_in_any_order(whole, refs, tmp_path):
    ds = aggregate(whole, CFG.aggregation, rated=ratings(whole)).params.select("annotator_id", "ds_accuracy")
    want = reliability.fit_params(whole, ds, CFG.aggregation)
    assert _driver_params(refs, tmp_path / "codes").equals(want)
    shuffled = whole.sort(pl.col("pair_id").hash(3), maintain_order=True)  # each pair's judgments keep their order
    assert reliability.fit_params(shuffled, ds, CFG.aggregation).equals(want)
    assert want["independence"].drop_nulls().len() > 150


def test_every_declared_state_added_over_partitions_is_the_whole_inputs_and_so_is_every_result(whole, refs, tmp_path):
    params = _driver_params(refs, tmp_path / "codes")
    total = pk.check_sums(refs, tmp_path / "sums", CFG, params, drop=DROP)
    assert sorted(total) == ["agreement", "length_bias", "position_bias", "reliability"]
    # length bias's pass 1 leaves the planted annotator out: its pass 2 was counted again with that set
    assert length_bias.excluded_ids(total["length_bias"], CFG).to_list() == [LONGER]
    want = {"agreement": agreement.count_sums(whole), "position_bias": position_bias.count_sums(whole),
            "length_bias": length_bias.count_sums(whole, CFG), "reliability": reliability.count_sums(whole, params)}
    for name, frame in want.items():
        assert total[name].equals(frame), name
    agg = aggregate(whole, CFG.aggregation, rated=ratings(whole))  # (the preliminary consensus: copies do not vote)
    ds = agg.params.select("annotator_id", "ds_accuracy")
    _same(agreement.run(whole, CFG, pairs=agg.pairs, sums=total["agreement"]), agreement.run(whole, CFG, pairs=agg.pairs))
    _same(position_bias.run(whole, CFG, sums=total["position_bias"]), position_bias.run(whole, CFG))
    got = length_bias.run(whole, CFG, pairs=agg.pairs, sums=total["length_bias"])
    _same(got, length_bias.run(whole, CFG, pairs=agg.pairs))
    assert LONGER in got.flags["subject_id"].to_list()
    _same(reliability.run(whole, CFG, ds_accuracy=ds, sums=total["reliability"], sums_params=params),
          reliability.run(whole, CFG, ds_accuracy=ds))


def test_a_step_is_keyed_by_what_it_counts_with():
    none = pl.DataFrame({"annotator_id": []}, schema={"annotator_id": pl.String})
    params = pl.DataFrame({"annotator_id": ["x"], "ds_accuracy": [0.8], "independence": [1.0]})
    given = {"reliability_params": params, "length_bias_excluded": none}
    a = pk.sums_step(("reliability",), CFG, given)
    assert a.version == pk.sums_step(("reliability",), CFG, dict(given)).version
    assert a.version != pk.sums_step(("reliability",), CFG, {**given, "reliability_params": params.with_columns(
        independence=pl.lit(0.5))}).version
    assert a.version != pk.sums_step(("reliability",), ChecksConfig(length_bias={"alpha": 0.01}), given).version
    assert a.version != pk.sums_step(("reliability", "agreement"), CFG, given).version
    assert a.version != pk.sums_step(("reliability",), CFG, given, drop=("p-1",)).version


@pytest.mark.slow
def test_the_states_counted_on_a_two_worker_cluster_are_the_same(whole, refs, tmp_path):
    params = _driver_params(refs, tmp_path / "codes")
    here = pk.check_sums(refs, tmp_path / "here", CFG, params, drop=DROP)
    with open_runner("local") as client:
        there = pk.check_sums(refs, tmp_path / "there", CFG, params, drop=DROP, client=client)
    for name in here:
        assert there[name].equals(here[name])


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(frame.columns, nulls_last=True)


@pytest.mark.parametrize("in_caches", [False, True], ids=["held", "left-in-caches"])
def test_the_pair_scoped_checks_over_partitions_are_the_whole_inputs(every, pset, refs, tmp_path, in_caches):
    """Also with the language rows left in the partitions' caches, keyed by a version's parts: the
    figures from the partitions' tallies (less the rows of the ids checked again on the driver),
    the rows merged back part by part."""
    whole = every
    totals = Totals(judgments=whole.height, pairs=whole["pair_id"].n_unique())
    cached: dict[str, pk.CachedRows] | None = {} if in_caches else None
    got = pk.pair_scoped(refs, tmp_path / "ps", CFG, totals, [src.path for src in pset.sources],
                         layout=("v-1", 4) if in_caches else None, cached=cached)
    if cached is not None:
        assert sorted(cached) == ["language"] and got["language"].tables["texts"].height == 0
        rows = cached["language"]
        assert rows.drop.len() > 0  # (the ids checked again: their partitions' rows left out, the driver's added)
        for stream in rows.streams():  # each stream sorted by the version's part key, as the merge needs
            keys = pl.concat([b for b in stream])["_part"]
            assert keys.null_count() == 0 and keys.is_sorted()
        got["language"].tables["texts"] = rows.frame()
    assert sorted(got) == sorted(PAIR_SCOPED)
    for name, spec in PAIR_SCOPED.items():
        res = RUNNERS[name](whole, CFG)
        want = spec.summarize(res.tables[spec.table], res.flags, totals)
        # (the language check's run counters: each partition's work, summed -- not a figure of the rows)
        assert json.dumps({k: v for k, v in got[name].metrics.items() if k not in pk.RUN_COUNTERS}, sort_keys=True, default=str) \
            == json.dumps({k: v for k, v in want.metrics.items() if k not in pk.RUN_COUNTERS}, sort_keys=True, default=str), name
        assert got[name].status == want.status
        assert _sorted(got[name].flags).equals(_sorted(want.flags)), name
        assert _sorted(got[name].tables[spec.table]).equals(_sorted(want.tables[spec.table])), name
    # every partition's distinct texts counted: at least the whole input's (a text in several partitions counts in each)
    assert got["language"].metrics["distinct_texts"] >= RUNNERS["language"](whole, CFG).metrics["distinct_texts"] > 0
    conflicts = got["pair_id_conflict"].tables["conflicts"]
    assert conflicts["pair_id"].to_list() == ["given-across", "given-in"]
    assert got["pair_id_conflict"].flags.height == 4
    assert got["duplicates"].metrics["exact_duplicates"] > 50
    assert got["duplicates"].flags.filter(pl.col("reason") == "identical_responses").height >= 1


@pytest.mark.parametrize("n", [1, 4])
def test_near_duplicates_from_partition_signatures_are_the_whole_inputs(every, inputs, n, tmp_path):
    from pipeline.checks import near_duplicates as nd

    refs = refs_of(partition_files(inputs, tmp_path / "set", n_partitions=n))
    got = pk.near_duplicates(refs, tmp_path / "nd", CFG)
    want = nd.run(every, CFG)
    assert json.dumps(got.metrics, sort_keys=True, default=str) == json.dumps(want.metrics, sort_keys=True, default=str)
    assert got.flags.equals(want.flags) and got.status == want.status == "warn"
    for k in want.tables:
        assert got.tables[k].equals(want.tables[k]), k
    assert want.metrics["near_duplicate_pairs"] > 20 and want.metrics["multi_pair_clusters"] > 10


def test_a_partitions_signatures_stream_gives_the_rows_asked_for_across_its_batches():
    """The cursor the signature parts are written through: rows taken in increasing order over
    calls, from batches of any size; rows asked for again, or past the end, are refused."""
    import numpy as np

    sigs = np.arange(11 * 4, dtype=np.uint32).reshape(11, 4)
    batches = [pl.DataFrame({"signature": pl.Series(sigs[a:a + 3])}) for a in range(0, 11, 3)]  # 3, 3, 3, 2 rows
    cur = pk._Cursor(iter(batches), 4)
    for rows in (np.array([0, 2]), np.array([3, 4, 7]), np.array([], np.int64), np.array([8, 9, 10])):
        assert np.array_equal(cur.take(rows), sigs[rows])
    with pytest.raises(ValueError, match="out of order"):
        pk._Cursor(iter(batches), 4).take(np.array([5])) is not None and cur.take(np.array([1]))
    with pytest.raises(ValueError, match="past the partition's end"):
        pk._Cursor(iter(batches), 4).take(np.array([11]))
