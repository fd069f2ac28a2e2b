"""Length-bias check: paired comparison with the other annotators, robustness when length
correlates with quality, near-equal lengths ignored, batch figures."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.aggregate import aggregate
from pipeline.checks import length_bias
from pipeline.ingest import judgments_from_records
from schemas.policy import AnnotatorTestConfig, ChecksConfig
from tests.conftest import redelivered
from tests.synth import make_planted
from tests.test_aggregate import rec


def _table(res) -> dict[str, dict]:
    return {r["annotator_id"]: r for r in res.tables["annotators"].iter_rows(named=True)}


def test_planted_length_bias() -> None:
    pt = make_planted(8)
    j = pt.judgments()
    pairs = aggregate(j).pairs
    res = length_bias.run(j, ChecksConfig(), pairs=pairs)
    flagged = set(res.flags["subject_id"])
    assert pt.truth["length_bias"] <= flagged and not flagged & pt.clean_annotators
    assert set(res.flags["reason"]) == {"length_bias"}
    t = _table(res)
    for a in pt.truth["length_bias"]:
        assert t[a]["longer_chosen_rate"] > t[a]["others_longer_rate"] + 0.1
    for a in pt.insufficient:
        assert t[a]["status"] == "insufficient_data" and a not in flagged
    hist = res.tables["length_ratio_hist"]
    assert hist["pairs"].sum() == pairs.filter(pairs["label_consensus"].is_in(["a", "b"])).height
    q = res.metrics["chosen_rejected_ratio_quantiles"]
    assert q["0.05"] < q["0.5"] < q["0.95"]
    assert 0.5 < res.metrics["chosen_longer_rate_pairs"] < 0.7  # the generator's longer_better = 0.6


@pytest.mark.parametrize("longer_better", [0.15, 0.85])
def test_honest_annotators_not_flagged_when_length_predicts_quality(longer_better: float) -> None:
    # a majority label errs less than one annotator; comparing with the other annotators'
    # individual choices keeps honest annotators unflagged whichever way length correlates
    pt = make_planted(9, longer_better=longer_better)
    res = length_bias.run(pt.judgments())
    flagged = set(res.flags["subject_id"])
    assert not flagged & pt.clean_annotators
    if longer_better < 0.5:  # (when longer is nearly always right a longer-bias is mostly invisible)
        assert pt.truth["length_bias"] <= flagged


def _pairs_with_ratio(ratio: float, n: int, chooser) -> list[dict]:  # noqa: ANN001
    rng = np.random.default_rng(0)
    recs = []
    for p in range(n):
        short, long_ = "x" * 100, "y" * int(100 * ratio)
        truth = "a" if rng.random() < 0.5 else "b"
        for h in range(3):
            lab = truth if rng.random() < 0.85 else {"a": "b", "b": "a"}[truth]
            recs.append(rec(f"h{h}-{p}", lab, f"h{h}", prompt=f"q{p}", ra=short, rb=long_))
        recs.append(rec(f"z-{p}", chooser(truth), "z", prompt=f"q{p}", ra=short, rb=long_))
    return recs


def test_near_equal_lengths_are_ignored() -> None:
    res = length_bias.run(judgments_from_records(_pairs_with_ratio(1.05, 60, lambda t: "b")))
    t = _table(res)
    assert res.flags.height == 0 and t["z"]["length_n"] == 0 and t["z"]["status"] == "insufficient_data"
    res = length_bias.run(judgments_from_records(_pairs_with_ratio(1.5, 60, lambda t: "b")))
    assert set(res.flags["subject_id"]) == {"z"} and _table(res)["z"]["longer_chosen_rate"] == 1.0


def test_shorter_preference_is_not_length_bias() -> None:
    res = length_bias.run(judgments_from_records(_pairs_with_ratio(1.5, 60, lambda t: "a")), AnnotatorTestConfig())
    assert res.flags.height == 0 and _table(res)["z"]["length_p_value"] > 0.9


def test_edge_cases() -> None:
    one = judgments_from_records([rec("c1", "a", "h1")])
    r = length_bias.run(one)
    assert r.flags.height == 0 and _table(r)["h1"]["length_p_value"] is None
    assert length_bias.run(one.head(0)).flags.height == 0
    r = length_bias.run(one, pairs=aggregate(one).pairs)
    assert r.metrics["chosen_longer_rate_pairs"] == 0.0  # "short" chosen over "a longer answer"


def _child(judgments, n_parent: int, cfg: ChecksConfig):  # noqa: ANN001, ANN202
    """A child's update of the state: the parent's first ``n_parent`` rows, then the rest (pipeline.incremental)."""
    import polars as pl

    from pipeline.checks.spec import Child

    rows = judgments.with_row_index("_row")
    touched = judgments.slice(n_parent)["pair_id"].unique()

    def split(mine: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        return mine.filter(pl.col("_row") < n_parent).drop("_row"), mine.drop("_row")

    def pairs_of(annotators: pl.Series) -> tuple[pl.DataFrame, pl.DataFrame]:
        judged = judgments.filter(pl.col("annotator_id").is_in(annotators.implode()))["pair_id"]
        return split(rows.filter(pl.col("pair_id").is_in(pl.concat([touched, judged]).unique().implode())))

    old, new = split(rows.filter(pl.col("pair_id").is_in(touched.implode())))
    parent = length_bias.count_sums(judgments.head(n_parent), cfg)
    return parent, Child(state=parent, params=None, old=old, new=new, cfg=cfg, inputs={}, pairs_of=pairs_of)


def test_a_child_whose_batch_changes_the_excluded_reference_counts_those_pairs_again() -> None:
    # the parent saw too few judgments to exclude the length-biased annotators from the reference;
    # the child's batch makes pass 1 exclude them, so pass 2 of every pair they judged changes
    import numpy as np
    import polars as pl

    cfg = ChecksConfig()
    pt = make_planted(8)
    j = pt.judgments()
    rng = np.random.default_rng(3)
    first = pl.Series(rng.random(j.height) < 0.15)  # the parent: 15 % of the rows, in order; the batch: the rest
    j = pl.concat([j.filter(first), j.filter(~first)])
    n_parent = int(first.sum())
    parent, child = _child(j, n_parent, cfg)
    before = length_bias.excluded_ids(parent, cfg)
    state, _ = length_bias.CHECK.sums.advance(child)
    whole = length_bias.count_sums(j, cfg)
    after = length_bias.excluded_ids(whole, cfg)
    assert not after.equals(before) and set(pt.truth["length_bias"]) & set(after)  # the path under test
    assert state.equals(whole)  # exactly a count over every judgment
    res = length_bias.run(j, cfg, sums=state)
    assert res.flags.equals(length_bias.run(j, cfg).flags) and res.flags.height
    # without counting those pairs again (parent - old + new with the parent's set), pass 2 is wrong
    naive = length_bias.CHECK.sums.merge(parent, length_bias.count_sums(child.old, cfg, before),
                                         length_bias.count_sums(child.new, cfg, before))
    assert not naive.equals(whole)


def test_lengths_given_as_state_in_either_orientation_equal_the_texts() -> None:
    """A version keeps each pair's lengths (``state/preliminary``: its first judgment's, with that
    judgment's ``a_hash``) so that a child need not read the history's texts.  Given in the other
    orientation (as a frame of one dimension's verdicts may start a pair), or without the texts,
    the check gives what it computes from the texts."""
    import polars as pl

    pt = make_planted(8)
    j = pt.judgments()
    pairs = aggregate(j).pairs
    want = length_bias.run(j, ChecksConfig(), pairs=pairs)
    first = j.filter(pl.col("pair_id").is_first_distinct())
    as_is = first.select("pair_id", "a_hash", len_a=pl.col("response_a").str.len_chars().cast(pl.Int64),
                         len_b=pl.col("response_b").str.len_chars().cast(pl.Int64))
    flipped = first.select("pair_id", a_hash="b_hash", len_a=pl.col("response_b").str.len_chars().cast(pl.Int64),
                           len_b=pl.col("response_a").str.len_chars().cast(pl.Int64))
    narrow = j.drop("prompt", "prompt_text", "response_a", "response_b")
    assert (as_is["len_a"] != as_is["len_b"]).sum() > 100
    for lengths in (as_is, flipped):
        got = length_bias.run(narrow, ChecksConfig(), pairs=pairs, lengths=lengths)
        assert got.metrics == want.metrics and got.flags.equals(want.flags)
        for name, table in want.tables.items():
            assert got.tables[name].equals(table), name
    with pytest.raises(ValueError, match="lengths lack 1 of the pairs"):
        length_bias.run(narrow, ChecksConfig(), pairs=pairs, lengths=as_is.slice(1))


def test_pair_ratio_figures_are_the_same_for_aligned_and_shuffled_lengths():
    """The lengths of a curate run are one row a pair in the pairs' order (read side by side);
    any other table of lengths is joined: the same figures and histogram either way."""
    import random

    import polars as pl

    from pipeline.checks.length_bias import _ratio_metrics

    rng = random.Random(4)
    n = 400
    pairs = pl.DataFrame({"pair_id": [f"p{i}" for i in range(n)],
                          "label_consensus": [rng.choice(["a", "b", "tie", None]) for _ in range(n)]})
    lengths = pl.DataFrame({"pair_id": pairs["pair_id"], "len_a": [rng.randrange(1, 900) for _ in range(n)],
                            "len_b": [rng.randrange(1, 900) for _ in range(n)]})
    t1: dict = {}
    t2: dict = {}
    aligned = _ratio_metrics(pairs, lengths, 1.2, t1)
    shuffled = _ratio_metrics(pairs, lengths.sample(fraction=1.0, shuffle=True, seed=1).head(n - 7), 1.2, t2)
    missing = set(pairs["pair_id"]) - set(lengths.sample(fraction=1.0, shuffle=True, seed=1).head(n - 7)["pair_id"])
    assert missing  # the shuffled table lacks a few pairs: compared with the aligned figures of the others
    t3: dict = {}
    kept = pairs.filter(~pl.col("pair_id").is_in(list(missing)))
    assert _ratio_metrics(kept, lengths.filter(pl.col("pair_id").is_in(kept["pair_id"].implode())), 1.2, t3) == shuffled
    assert t3["length_ratio_hist"].equals(t2["length_ratio_hist"])
    assert aligned["consensus_pairs_with_length_difference"] > 0 and aligned != shuffled


def test_re_delivered_copies_count_once() -> None:
    """A re-delivered judgment (``exact_duplicate``; select drops it) is one delivery: the batch
    with a copy of every 5th judgment has the figures, tables and flags of the batch without
    them -- counted, a copy doubled its judgment's weight in both passes' sums."""
    pt = make_planted(3, n_pairs=400, n_honest=15, per_defect=50, ai_shared=60, ai_only=30)
    want = length_bias.run(pt.judgments(), ChecksConfig())
    got = length_bias.run(judgments_from_records(redelivered(pt.records, 5)), ChecksConfig())
    assert want.flags.height and want.metrics["judgments_with_length_difference"]
    assert got.metrics == want.metrics and got.flags.equals(want.flags)
    for name, table in want.tables.items():
        assert got.tables[name].equals(table), name
