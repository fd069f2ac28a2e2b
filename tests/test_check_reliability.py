"""Reliability check: leave-one-out consensus, gold accuracy, chance rate, power rule."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.aggregate import encode
from pipeline.checks import reliability
from pipeline.aggregate import loo_reference
from pipeline.ingest import judgments_from_records
from schemas.policy import AnnotatorTestConfig, ChecksConfig
from tests.synth import make_planted
from tests.test_aggregate import rec


def _table(res) -> dict[str, dict]:
    return {r["annotator_id"]: r for r in res.tables["annotators"].iter_rows(named=True)}


def _panel(rng: np.random.Generator, n_pairs: int, extra: dict[str, callable], *, honest: int = 4) -> list[dict]:
    """n_pairs pairs, each judged by 3 of ``honest`` 85 %-accurate humans and by every extra annotator
    (a function truth -> label)."""
    recs = []
    for p in range(n_pairs):
        truth = "a" if rng.random() < 0.5 else "b"
        for h in rng.choice(honest, 3, replace=False):
            lab = truth if rng.random() < 0.85 else {"a": "b", "b": "a"}[truth]
            recs.append(rec(f"h{h}-{p}", lab, f"h{h}", prompt=f"q{p}"))
        for name, f in extra.items():
            recs.append(rec(f"{name}-{p}", f(truth), name, prompt=f"q{p}"))
    return recs


def test_planted_random_annotators_flagged_clean_not() -> None:
    pt = make_planted(5)
    res = reliability.run(pt.judgments(), ChecksConfig())
    flagged = set(res.flags["subject_id"])
    assert pt.truth["low_reliability"] <= flagged
    assert not flagged & pt.clean_annotators
    assert set(res.flags["reason"]) == {"low_reliability"} and set(res.flags["subject_kind"]) == {"annotator"}
    t = _table(res)
    for a in pt.insufficient:
        assert t[a]["status"] == "insufficient_data" and a not in flagged
    for a in pt.clean_annotators:
        assert t[a]["agreement_with_consensus"] > 0.6 and t[a]["reliability_p_value"] < 0.01
    assert t["rand-0"]["gold_n"] >= 80 and t["rand-0"]["gold_accuracy"] < 0.7
    assert 0.45 < t["rand-2"]["loo_chance"] < 0.55


def test_loo_reference_excludes_all_own_judgments() -> None:
    j = judgments_from_records([
        rec("x1", "a", "x", kind="ai", shown_first="a"), rec("x2", "a", "x", kind="ai", shown_first="b"),
        rec("y1", "b", "y"),
    ])
    e = encode(j)
    ref = loo_reference(e)
    by_ann = {e.ann_ids[int(a)]: int(r) for a, r in zip(e.unit_ann, ref, strict=True)}
    assert by_ann == {"x": 1, "y": 0}  # x is compared with y's "b"; y with x's one (double) vote "a"


def test_gold_only_annotators_are_tested_on_gold() -> None:
    rng = np.random.default_rng(1)
    recs = []
    for p in range(60):  # pairs judged by one annotator each: no consensus reference, only gold
        truth = "a" if rng.random() < 0.5 else "b"
        recs.append(rec(f"r{p}", str(rng.choice(["a", "b"])), "g-rand", prompt=f"r{p}", gold_label=truth))
        lab = truth if rng.random() < 0.9 else {"a": "b", "b": "a"}[truth]
        recs.append(rec(f"g{p}", lab, "g-good", prompt=f"g{p}", gold_label=truth))
    res = reliability.run(judgments_from_records(recs))
    t = _table(res)
    assert set(res.flags["subject_id"]) == {"g-rand"}
    assert res.metrics["flagged_by_gold"] == 1 and res.metrics["flagged_by_consensus"] == 0
    assert t["g-rand"]["reliability_p_value"] is None and t["g-rand"]["gold_p_value"] > 0.05
    assert t["g-good"]["status"] == "ok" and t["g-good"]["gold_accuracy"] > 0.8
    assert "gold accuracy" in res.flags["detail"][0]


def test_gold_orientation_is_the_judgments_own() -> None:
    # a swapped judgment writes label and gold_label in its own orientation: still correct
    recs = [rec(f"c{p}", "a", "g", prompt="q", ra=f"x{p}", rb=f"y{p}", gold_label="a", swap=p % 2 == 1) for p in range(40)]
    recs += [rec(f"d{p}", "b", "g", prompt="q", ra=f"u{p}", rb=f"v{p}", gold_label="a", swap=p % 2 == 1) for p in range(10)]
    t = _table(reliability.run(judgments_from_records(recs)))
    assert t["g"]["gold_n"] == 50 and t["g"]["gold_accuracy"] == pytest.approx(40 / 50)


def test_always_a_annotator_is_no_better_than_chance() -> None:
    rng = np.random.default_rng(2)
    res = reliability.run(judgments_from_records(_panel(rng, 120, {"always-a": lambda t: "a"})))
    assert set(res.flags["subject_id"]) == {"always-a"}
    t = _table(res)
    assert t["always-a"]["loo_chance"] == pytest.approx(t["always-a"]["agreement_with_consensus"], abs=0.06)


def test_power_rule_gives_insufficient_data_not_a_flag() -> None:
    rng = np.random.default_rng(3)
    coin = lambda t: str(rng.choice(["a", "b"]))  # noqa: E731
    few = reliability.run(judgments_from_records(_panel(rng, 25, {"coin": coin})), AnnotatorTestConfig())
    t = _table(few)
    assert few.flags.height == 0 and t["coin"]["status"] == "insufficient_data" and t["coin"]["reliability_p_value"] is None
    many = reliability.run(judgments_from_records(_panel(rng, 150, {"coin": coin})), AnnotatorTestConfig())
    assert set(many.flags["subject_id"]) == {"coin"}


def test_ds_accuracy_column_and_edge_cases() -> None:
    rng = np.random.default_rng(4)
    res = reliability.run(judgments_from_records(_panel(rng, 60, {})))
    t = res.tables["annotators"]
    assert t["ds_accuracy"].drop_nulls().len() == t.height and t["ds_accuracy"].min() > 0.6
    one = judgments_from_records([rec("c1", "tie", "h1")])
    r = reliability.run(one)
    assert r.flags.height == 0 and _table(r)["h1"]["status"] == "insufficient_data"
    assert reliability.run(one.head(0)).flags.height == 0
    ext = pl.DataFrame({"annotator_id": ["h1"], "ds_accuracy": [0.42]})
    assert _table(reliability.run(one, ds_accuracy=ext))["h1"]["ds_accuracy"] == 0.42


# ---------------------------------------------------------------- the decision rule (exact error rates)
def _flag_probability(rate: float, n: int, chance: float = 0.5) -> float:
    """P(at-chance flag) of one family for an annotator with agreement ``rate`` over ``n`` units: exact,
    by enumerating the outcomes k (one annotator, so Benjamini-Hochberg is the plain test)."""
    from scipy.stats import binom

    cfg = AnnotatorTestConfig()
    ks = np.arange(n + 1, dtype=float)
    flags = np.array([reliability._test(np.array([k]), np.array([float(n)]), np.array([chance]), np.array([True]), cfg).at_chance[0]
                      for k in ks])
    return float(binom.pmf(ks, n, rate)[flags].sum())


@pytest.mark.parametrize("n", [20, 45, 60, 115, 400])
def test_flag_error_rates(n: int) -> None:
    """An annotator at the useful level (0.7 at chance 0.5) or above is flagged with probability <= alpha
    at any n; one at chance is found with probability >= power once the test runs (about 60 units;
    below, never flagged); one at 0.6 -- better than chance -- at most about half the time near 100
    units, less as units accumulate (docs/checks-stats.md has the table)."""
    assert _flag_probability(0.7, n) <= 0.05 and _flag_probability(0.8, n) <= 0.01
    at_chance = _flag_probability(0.5, n)
    assert at_chance == 0.0 if n < 50 else at_chance >= 0.9
    assert _flag_probability(0.6, n) <= 0.56
    assert _flag_probability(0.6, 1000) < 0.05


def test_order_flips_are_no_verdict() -> None:
    """An AI judge judged in both display orders: a verdict that flips with the order is no verdict.
    ``first`` always picks the first-shown response (every verdict flips: nothing to test, position
    bias is its own reason); ``flippy`` follows the position on 85 % of the pairs and is right on the
    rest -- 0.58 per judgment, 1.0 per verdict: not at chance."""
    rng = np.random.default_rng(7)
    recs = _panel(rng, 120, {})
    for p in range(120):
        truth = next(r["label"] for r in recs if r["prompt"] == f"q{p}")  # a colleague's label is close enough
        consistent = rng.random() < 0.15
        for first in "ab":
            recs.append(rec(f"first-{p}-{first}", first, "first", kind="ai", prompt=f"q{p}", shown_first=first))
            lab = truth if consistent else first
            recs.append(rec(f"flippy-{p}-{first}", lab, "flippy", kind="ai", prompt=f"q{p}", shown_first=first))
    res = reliability.run(judgments_from_records(recs))
    t = _table(res)
    assert not {"first", "flippy"} & set(res.flags["subject_id"])
    assert t["first"]["loo_n"] == 0 and t["first"]["status"] == "insufficient_data"
    assert 5 < t["flippy"]["loo_n"] < 40 and t["flippy"]["agreement_with_consensus"] > 0.7


def test_gold_at_chance_is_not_cleared_by_agreeing_copies() -> None:
    """Four copies of one coin (the same random answer per pair: a family that errs together) agree
    with each other's consensus far above chance, but gold -- which their shared errors cannot
    inflate -- finds them at chance: flagged, by gold."""
    rng = np.random.default_rng(8)
    recs = []
    for p in range(100):
        truth = "a" if rng.random() < 0.5 else "b"
        coin = str(rng.choice(["a", "b"]))
        for h in range(3):
            lab = truth if rng.random() < 0.85 else {"a": "b", "b": "a"}[truth]
            recs.append(rec(f"h{h}-{p}", lab, f"h{h}", prompt=f"q{p}", gold_label=truth))
        for c in range(4):
            recs.append(rec(f"c{c}-{p}", coin, f"copy-{c}", prompt=f"q{p}", gold_label=truth))
    res = reliability.run(judgments_from_records(recs))
    t = _table(res)
    assert set(res.flags["subject_id"]) == {f"copy-{c}" for c in range(4)}
    assert res.metrics["flagged_by_gold"] == 4
    assert all(t[f"copy-{c}"]["agreement_with_consensus"] > 0.8 for c in range(4))


def test_stats_helpers_match_scipy() -> None:
    from scipy.stats import binom

    from pipeline.stats import binom_less, binom_upper_bound, chance_power

    ks, ns = np.array([0, 3, 14, 50, 20, 7]), np.array([10, 10, 28, 80, 20, 9])
    np.testing.assert_allclose(binom_less(ks, ns, 0.6), binom.cdf(ks, ns, 0.6), rtol=1e-12)
    ub = binom_upper_bound(ks, ns, 0.05)
    below = ks < ns
    np.testing.assert_allclose(binom.cdf(ks[below], ns[below], ub[below]), 0.05, rtol=1e-9)  # Clopper-Pearson
    assert ub[~below].tolist() == [1.0] and np.isnan(binom_upper_bound(np.array([0]), np.array([0]), 0.05))[0]
    for n in (0, 1, 7, 33, 60, 200):
        for chance, useful in ((0.5, 0.7), (0.4, 0.64)):
            k = np.arange(n + 1)
            crit = k[binom.cdf(k, n, useful) <= 0.05]
            brute = binom.cdf(crit.max(), n, chance) if len(crit) else 0.0
            assert chance_power(np.array([n]), np.array([chance]), np.array([useful]), 0.05)[0] == pytest.approx(brute, abs=1e-12)


def test_re_delivered_copies_count_once() -> None:
    """A re-delivered judgment (``exact_duplicate``: same annotator, pair, display order and
    verdict; select drops it) is one delivery: the batch with a copy of every 5th judgment has the
    figures, tables and flags of the batch without them, with the accuracies fitted here and with
    the preliminary consensus's (a build's) -- counted, a copy of one of an AI judge's two display
    orders outweighed the other in its unit's vote, and the others' reference and the judgment
    counts moved with it."""
    from pipeline.aggregate import aggregate
    from pipeline.checks.agreement import ratings
    from tests.conftest import redelivered

    pt = make_planted(3, n_pairs=400, n_honest=15, per_defect=50, ai_shared=60, ai_only=30)
    # (delivered before the copies: the copies are the later deliveries, and the fits read a pair's judgments in the
    # same order -- a float sum in another order may differ in its last bit)
    records = [{**r, "created_at": "2026-01-01T00:00:00Z"} for r in pt.records]
    j, again = judgments_from_records(records), judgments_from_records(redelivered(records, 5))
    assert not ratings(again).all()

    def ds(frame: pl.DataFrame) -> pl.DataFrame:
        return aggregate(frame, rated=ratings(frame)).params.select("annotator_id", "ds_accuracy")

    def same(want, got) -> None:
        assert want.flags.height and want.metrics["tested"] > 20
        assert got.metrics == want.metrics and got.flags.equals(want.flags)
        for name, table in want.tables.items():
            assert got.tables[name].equals(table), name

    same(reliability.run(j, ChecksConfig()), reliability.run(again, ChecksConfig()))
    same(reliability.run(j, ChecksConfig(), ds_accuracy=ds(j)), reliability.run(again, ChecksConfig(), ds_accuracy=ds(again)))
