"""pipeline/partitioned.py: the bricks composed -- the preliminary consensus and eleven checks over
partitions give what the one-process path gives over the whole frame."""
from __future__ import annotations

import json
import sys

import polars as pl
import pytest

from pipeline.aggregate import PAIR_TEXT_COLUMNS, aggregate
from pipeline.checks.agreement import ratings
from pipeline.checks import resolve_policy, run_checks
from pipeline.distributed import refs_of
from pipeline.ingest import ingest_files
from pipeline.partition import partition_files
from pipeline.partitioned import analyze
from schemas.policy import Policy
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from gen_judgments import generate  # noqa: E402

POLICY = resolve_policy(Policy())
RUN_COUNTERS = ("distinct_texts", "langdetect_calls", "langdetect_skipped")  # the language check's work, per run


def _metrics(m: dict) -> str:
    return json.dumps({k: v for k, v in m.items() if k not in RUN_COUNTERS}, sort_keys=True, default=str)


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(frame.columns, nulls_last=True)


@pytest.mark.parametrize("n", [1, 3])
def test_the_partitioned_checks_are_the_one_process_checks(tmp_path, n):
    generate(tmp_path / "gen.jsonl", 6000, 700, seed=13)
    inputs = [tmp_path / "gen.jsonl", *sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))]
    pset = partition_files(inputs, tmp_path / "set", n_partitions=n)
    got = analyze(refs_of(pset), tmp_path / "work", POLICY.checks, [s.path for s in pset.sources])

    judgments = ingest_files(inputs).judgments
    prelim = aggregate(judgments, POLICY.checks.aggregation, rated=ratings(judgments))  # (as curate: copies do not vote)
    want = run_checks(judgments, POLICY.checks, pairs=prelim.pairs,
                      extra_kwargs={"reliability": {"ds_accuracy": prelim.params.select("annotator_id", "ds_accuracy")}})
    assert got.params.equals(prelim.params.sort("annotator_id"))
    assert got.pairs.equals(prelim.pairs.drop(PAIR_TEXT_COLUMNS).sort("pair_id"))
    assert sorted(got.results) == sorted(["duplicates", "pair_id_conflict", "language", "near_duplicates", "agreement",
                                          "reliability", "position_bias", "length_bias", "routing", "consensus", "dimensions"])
    for name, res in got.results.items():
        w = want[name]
        assert (res.status, res.summary) == (w.status, w.summary), name
        assert _metrics(res.metrics) == _metrics(w.metrics), name
        assert _sorted(res.flags).equals(_sorted(w.flags)), name
        for k, table in w.tables.items():
            assert k in res.tables, (name, k)
            assert _sorted(res.tables[k]).equals(_sorted(table)), (name, k)
    flagged = {name for name, res in got.results.items() if res.flags.height}
    assert {"duplicates", "near_duplicates", "position_bias", "reliability", "routing"} <= flagged
