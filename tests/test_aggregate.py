"""Aggregation: canonical orientation, per-kind labels and ai_mode, Dawid-Skene, the
annotator table; compared with a plain-Python reference on generated data."""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import polars as pl
import pytest

from pipeline import aggregate as agg_mod
from pipeline.aggregate import aggregate, annotator_table, dawid_skene, dense_codes, encode, plurality
from pipeline.ingest import judgments_from_records
from schemas.arrow import polars_schema
from schemas.check import CheckResult, make_flags
from schemas.policy import AggregationConfig
from schemas.records import AnnotatorStats, PairRecord
from tests.synth import make_planted

FLIP = {"a": "b", "b": "a"}


def rec(cid: str, label: str, ann: str, *, kind: str = "human", swap: bool = False, prompt: str = "p1",
        ra: str = "short", rb: str = "a longer answer", **kw) -> dict:
    """One raw judgment; ``swap`` names the responses the other way round (label,
    shown_first and gold_label follow)."""
    if swap:
        ra, rb = rb, ra
        label = FLIP.get(label, label)
        for key in ("shown_first", "gold_label"):
            if kw.get(key):
                kw[key] = FLIP.get(kw[key], kw[key])
    return {"comparison_id": cid, "prompt": prompt, "response_a": ra, "response_b": rb, "label": label,
            "annotator_id": ann, "annotator_kind": kind, **kw}


def one_pair(frame: pl.DataFrame, **where) -> dict:
    rows = frame.filter(**where).to_dicts() if where else frame.to_dicts()
    assert len(rows) == 1
    return rows[0]


def test_canonical_orientation_counts_swapped_judgments_correctly() -> None:
    j = judgments_from_records([
        rec("c1", "a", "h1", strength=0.8),
        rec("c2", "a", "h2", swap=True, strength=0.6),  # says "a" about the same response, named the other way
        rec("c3", "b", "h3"),
    ])
    assert j["pair_id"].n_unique() == 1
    p = one_pair(aggregate(j).pairs)
    assert (p["response_a"], p["response_b"]) == ("short", "a longer answer")  # the first judgment's orientation
    assert (p["count_a"], p["count_b"]) == (2, 1)
    assert p["label_consensus"] == "a" and p["agreement"] == pytest.approx(2 / 3)
    assert p["strength"] == pytest.approx(0.7)  # mean strength of the agreeing judgments
    assert p["source_comparison_ids"] == ["c1", "c2", "c3"]


def test_output_schema_is_pair_record() -> None:
    pairs = aggregate(judgments_from_records([rec("c1", "a", "h1")])).pairs
    assert pairs.schema == polars_schema(PairRecord)


MIXED = [
    rec("c1", "a", "h1"), rec("c2", "a", "h2", swap=True), rec("c3", "b", "h3"),
    rec("c4", "b", "ai1", kind="ai", shown_first="a"), rec("c5", "b", "ai1", kind="ai", shown_first="b"),
    rec("c6", "a", "ai1", kind="ai", prompt="p2"), rec("c7", "tie", "h1", prompt="p2"),
    rec("c8", "b", "ai1", kind="ai", prompt="p3"), rec("c9", "b", "ai2", kind="ai", prompt="p3"),
]


@pytest.mark.parametrize(("mode", "expected"), [
    ("human_first", {"p1": ("a", 2 / 3, "human"), "p2": ("tie", 1.0, "human"), "p3": ("b", 1.0, "ai")}),
    ("separate", {"p1": ("escalate", 0.0, "mixed"), "p2": ("escalate", 0.0, "mixed"), "p3": ("b", 1.0, "ai")}),
    ("vote", {"p1": ("a", 2 / 5, "mixed"), "p2": ("tie", 0.5, "mixed"), "p3": ("b", 1.0, "ai")}),
    ("ignore_ai", {"p1": ("a", 2 / 3, "human"), "p2": ("tie", 1.0, "human"), "p3": (None, None, "ai")}),
])
def test_ai_modes(mode: str, expected: dict) -> None:
    j = judgments_from_records(MIXED)
    pairs = aggregate(j, AggregationConfig(ai_mode=mode)).pairs
    for prompt, (label, agreement, kind) in expected.items():
        p = one_pair(pairs, prompt_text=prompt)
        assert p["label_consensus"] == label, prompt
        assert (p["agreement"] is None) if agreement is None else p["agreement"] == pytest.approx(agreement), prompt
        assert p["annotator_kind"] == kind, prompt
    p1 = one_pair(pairs, prompt_text="p1")
    assert (p1["label_human"], p1["label_ai"], p1["label_majority"]) == ("a", "b", "b")
    assert (p1["n_judgments"], p1["n_human"], p1["n_ai"]) == (5, 3, 2)


def test_ai_judge_in_both_orders_has_one_vote() -> None:
    # vote mode, ai_weight 1: one human says a; one AI judge says b twice (both orders) -> a 1 vs b 1
    # (not 1 vs 2): the tie is then decided by the Dawid-Skene estimate, never by repetition
    recs = [rec("c1", "a", "h1"), rec("c2", "b", "ai1", kind="ai", shown_first="a"), rec("c3", "b", "ai1", kind="ai", shown_first="b")]
    pairs = aggregate(judgments_from_records(recs), AggregationConfig(ai_mode="vote", ai_weight=1.0)).pairs
    p = one_pair(pairs)
    assert p["count_b"] == 2 and p["label_majority"] == "b"  # raw counts would let the repetition win
    assert p["label_consensus"] != "b"
    e = encode(judgments_from_records(recs))
    assert e.n_units == 2


def test_ds_tie_break_follows_the_reliable_annotator() -> None:
    # "good" agrees with a three-person majority on 30 other pairs, "bad" disagrees; on the
    # contested pair good says a and bad says b -> a
    recs = []
    for i in range(30):
        q = f"q{i}"
        for k in range(3):
            recs.append(rec(f"m{i}-{k}", "a", f"maj{k}", prompt=q))
        recs.append(rec(f"g{i}", "a", "good", prompt=q))
        recs.append(rec(f"b{i}", "b", "bad", prompt=q))
    recs += [rec("x1", "a", "good", prompt="contested"), rec("x2", "b", "bad", prompt="contested")]
    out = aggregate(judgments_from_records(recs))
    p = one_pair(out.pairs, prompt_text="contested")
    assert p["label_consensus"] == "a" and p["p_a_weighted"] > 0.9 and p["label_majority"] is None
    acc = dict(out.annotators.select("annotator_id", "ds_accuracy").iter_rows())
    assert acc["good"] > 0.9 > 0.1 > acc["bad"]


def test_equal_evidence_split_escalates() -> None:
    p = one_pair(aggregate(judgments_from_records([rec("c1", "a", "h1"), rec("c2", "b", "h2")])).pairs)
    assert p["label_consensus"] == "escalate" and p["agreement"] == 0.0
    p = one_pair(aggregate(judgments_from_records([rec("c1", "a", "h1"), rec("c2", "tie", "h2")])).pairs)
    assert p["label_consensus"] == "escalate"


def test_dawid_skene_recovers_accuracies() -> None:
    rng = np.random.default_rng(0)
    n_pairs, acc_true = 3000, np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.5])
    truth = rng.random(n_pairs) < 0.5
    pair_idx, ann_idx, vote = [], [], []
    for p in range(n_pairs):
        for a in rng.choice(len(acc_true), 4, replace=False):
            right = rng.random() < acc_true[a]
            pair_idx.append(p)
            ann_idx.append(a)
            vote.append(1.0 if (truth[p] == right) else -1.0)
    pi, ai, v = np.array(pair_idx), np.array(ann_idx), np.array(vote)
    acc = dawid_skene(pi, ai, v, np.ones(len(v)), n_pairs=n_pairs, n_annotators=len(acc_true), iterations=100)
    np.testing.assert_allclose(acc, acc_true, atol=0.04)


def test_plurality_codes() -> None:
    v = np.array([[2, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 3, 0]], float)
    p_a = np.array([np.nan, 0.8, 0.5, 0.9, np.nan, np.nan])
    assert plurality(v, p_a, unresolved=4).tolist() == [0, 0, 4, 4, -1, 3]
    assert plurality(v).tolist() == [0, -1, -1, -1, -1, 3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_codes_are_first_seen_codes_sorted_or_not(seed: int) -> None:
    """Codes in first-seen order and each code's first row, as a dict gives them: for a column in any order
    (coded by a join with its first occurrences) and for one Polars knows sorted, either way (counted by changes)."""
    rng = np.random.default_rng(seed)
    values = [f"id-{x}" for x in rng.integers(0, 40, 500)]

    def by_dict(vals: list[str]) -> tuple[list[int], list[int]]:
        seen: dict[str, int] = {}
        first = [seen.setdefault(v, i) for i, v in enumerate(vals)]
        rank = {row: k for k, row in enumerate(sorted(set(first)))}
        return [rank[r] for r in first], sorted(set(first))

    for s in (pl.Series(values), pl.Series(values).sort(), pl.Series(values).sort(descending=True), pl.Series(["x"])):
        codes, first = dense_codes(s)
        assert codes.dtype == np.int64 and first.dtype == np.int64
        assert (codes.tolist(), first.tolist()) == by_dict(s.to_list())
    assert pl.Series(values).sort().is_sorted() and not pl.Series(values).is_sorted()  # (both paths ran)
    assert dense_codes(pl.Series(["x", "y", "x", "z", "y"]))[0].tolist() == [0, 1, 0, 2, 1]
    assert [len(x) for x in dense_codes(pl.Series([], dtype=pl.String))] == [0, 0]


def test_locale_first_non_null_and_tags_union() -> None:
    j = judgments_from_records([
        rec("c1", "a", "h1", tags=["z", "a", "z"]), rec("c2", "a", "h2", locale="ja-JP", tags=["q"]),
        rec("c3", "a", "h3", locale="en"),
        rec("d1", "b", "h1", prompt="p2", tags=["one"], locale="zh"), rec("d2", "b", "h2", prompt="p2", tags=["one"]),
    ])
    pairs = aggregate(j).pairs
    p1, p2 = one_pair(pairs, prompt_text="p1"), one_pair(pairs, prompt_text="p2")
    assert p1["locale"] == "ja-JP" and p1["tags"] == ["a", "q", "z"]
    assert p2["locale"] == "zh" and p2["tags"] == ["one"]


def test_empty_and_single_judgment() -> None:
    empty = judgments_from_records([rec("c1", "a", "h1")]).head(0)
    out = aggregate(empty)
    assert out.pairs.height == 0 and out.annotators.height == 0
    one = aggregate(judgments_from_records([rec("c1", "both_bad", "h1")]))
    p = one_pair(one.pairs)
    assert p["label_consensus"] == "both_bad" and p["agreement"] == 1.0 and p["p_a_weighted"] is None
    assert one.annotators["ds_accuracy"].to_list() == [None]  # no decisive judgment


def test_encode_cache_is_per_frame() -> None:
    j1 = judgments_from_records([rec("c1", "a", "h1")])
    j2 = judgments_from_records([rec("c1", "a", "h1"), rec("c2", "b", "h2", prompt="x")])
    assert encode(j1) is encode(j1)
    assert encode(j2).n_pairs == 2 and encode(j1).n_pairs == 1


# ---------------------------------------------------------------- plain-Python reference
def _reference(records: list[dict]) -> dict[str, dict]:
    """Counts and the human/AI plurality labels per pair with loops over the raw dicts
    (orientation: the first judgment's, as documented); ties among top labels -> None."""
    from schemas.text import content_hash, derive_pair_id

    out: dict[str, dict] = {}
    votes: dict[str, dict[str, dict[str, Counter]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(Counter)))
    for r in records:
        pid = derive_pair_id(content_hash(r["prompt"]), content_hash(r["response_a"]), content_hash(r["response_b"]))
        if pid not in out:
            out[pid] = {"a_text": r["response_a"], "counts": Counter()}
        lab = r["label"] if r["response_a"] == out[pid]["a_text"] else FLIP.get(r["label"], r["label"])
        out[pid]["counts"][lab] += 1
        votes[pid][r["annotator_kind"]][r["annotator_id"]][lab] += 1
    for pid, d in out.items():
        for kind in ("human", "ai"):
            tally: Counter = Counter()
            for c in votes[pid][kind].values():
                n = sum(c.values())
                for lab, k in c.items():
                    tally[lab] += k / n
            if not tally:
                d[kind] = None
                continue
            best = max(tally.values())
            top = [lab for lab, v in tally.items() if abs(v - best) < 1e-9]
            d[kind] = top[0] if len(top) == 1 else None
    return out


def test_matches_plain_python_reference_on_planted_batch() -> None:
    planted = make_planted(11, n_pairs=300, n_honest=12, per_defect=40, ai_shared=60, ai_only=30)
    pairs = aggregate(planted.judgments()).pairs
    ref = _reference(planted.records)
    assert pairs.height == len(ref)
    for p in pairs.iter_rows(named=True):
        r = ref[p["pair_id"]]
        assert p["response_a"] == r["a_text"]
        assert [p[f"count_{x}"] for x in ("a", "b", "tie", "both_bad", "escalate")] == [
            r["counts"][x] for x in ("a", "b", "tie", "both_bad", "escalate")]
        for kind in ("human", "ai"):
            if r[kind] is not None:
                assert p[f"label_{kind}"] == r[kind], (p["pair_id"], kind)
        if p["n_human"]:
            assert p["label_consensus"] == p["label_human"]
        else:
            assert p["label_consensus"] == p["label_ai"]


# ---------------------------------------------------------------- annotator table
def test_annotator_table_merges_checks() -> None:
    t1 = pl.DataFrame({"annotator_id": ["a1", "a2", "a3"], "annotator_kind": ["human", "human", "ai"],
                       "n_judgments": [50, 4, 30], "first_shown_rate": [0.9, None, 0.5], "ds_accuracy": [0.1, 0.2, 0.3],
                       "status": ["flagged", "insufficient_data", "ok"]})
    t2 = pl.DataFrame({"annotator_id": ["a1", "a2", "a3"], "n_judgments": [50, 4, 30], "longer_chosen_rate": [0.5, None, 0.6],
                       "status": ["ok", "insufficient_data", "ok"]})
    r1 = CheckResult(name="position_bias", status="warn", tables={"annotators": t1},
                     flags=make_flags(["a1"], subject_kind="annotator", check="position_bias", reason="position_bias"))
    r2 = CheckResult(name="length_bias", status="pass", tables={"annotators": t2},
                     flags=make_flags(["p-1"], subject_kind="pair", check="x", reason="low_agreement"))
    ds = pl.DataFrame({"annotator_id": ["a1", "a3"], "ds_accuracy": [0.6, 0.9]})
    t = annotator_table({"position_bias": r1, "length_bias": r2}, ds)
    assert list(t.columns[: len(polars_schema(AnnotatorStats))]) == list(polars_schema(AnnotatorStats))
    rows = {r["annotator_id"]: r for r in t.iter_rows(named=True)}
    assert rows["a1"]["flags"] == ["position_bias"] and rows["a1"]["status"] == "flagged"
    assert rows["a2"]["status"] == "insufficient_data" and rows["a2"]["flags"] == []
    assert rows["a3"]["status"] == "ok" and rows["a3"]["ds_accuracy"] == 0.9 and rows["a3"]["longer_chosen_rate"] == 0.6
    assert rows["a3"]["annotator_kind"] == "ai" and rows["a1"]["n_judgments"] == 50
    assert rows["a2"]["ds_accuracy"] == 0.2  # explicit ds_accuracy wins where given, the check's value elsewhere
    assert annotator_table([]).height == 0


def test_module_exports() -> None:
    for name in agg_mod.__all__:
        assert hasattr(agg_mod, name)


def test_aggregate_with_texts_matches_aggregate_with_text_columns_when_orientation_changes() -> None:
    """curate aggregates the kept judgments without their text columns and takes the texts
    from the preliminary pairs; when the dropped first judgment fixed the other orientation,
    the texts are swapped so the result equals aggregating the full rows."""
    short, long = {"text": "short", "model": "m-short"}, {"text": "a longer answer", "model": "m-long"}
    j = judgments_from_records([
        rec("c1", "a", "h1", ra=short, rb=long),
        rec("c2", "b", "h2", swap=True, ra=short, rb=long),
        rec("c3", "b", "h3", swap=True, ra=short, rb=long),
        rec("c4", "a", "h1", prompt="p2"),
    ])
    prelim = aggregate(j)
    kept = j.filter(pl.col("comparison_id") != "c1")  # canonical orientation of pair p1 flips
    expected = aggregate(kept).pairs
    got = aggregate(kept.drop(agg_mod.PAIR_TEXT_COLUMNS), texts=prelim.texts()).pairs
    assert got.equals(expected)
    p1 = one_pair(got, prompt_text="p1")
    assert (p1["response_a"], p1["model_a"]) == ("a longer answer", "m-long")
    assert p1["label_consensus"] == "a"  # both kept judgments prefer the longer answer, now named a
    with pytest.raises(ValueError, match="texts lack 1 of the pairs"):
        aggregate(kept.drop(agg_mod.PAIR_TEXT_COLUMNS), texts=prelim.texts().filter(pl.col("prompt_text") == "p1"))


def test_re_delivered_copies_are_no_second_vote() -> None:
    """``rated`` (the preliminary consensus's: :func:`pipeline.checks.agreement.ratings`): a batch with
    a copy of every 5th judgment (the later delivery, the responses named the other way round) gives
    the pairs, annotators and parameters of the batch without them, to the bit, but for the pairs'
    comparison ids -- counted, a copy was another judgment of the pair (a lone judgment and its copy
    made an agreeing panel of two), outweighed its annotator's other display order and weighed twice
    in the accuracy fits.  The agreement and length-bias checks' pair figures follow."""
    from pipeline.checks import agreement, length_bias
    from pipeline.checks.agreement import ratings
    from schemas.policy import ChecksConfig
    from tests.conftest import redelivered

    pt = make_planted(3, n_pairs=400, n_honest=15, per_defect=50, ai_shared=60, ai_only=30)
    records = [{**r, "created_at": "2026-01-01T00:00:00Z"} for r in pt.records]  # (the copies are the later deliveries)
    j, again = judgments_from_records(records), judgments_from_records(redelivered(records, 5))
    want, got = aggregate(j), aggregate(again, rated=ratings(again))
    counted = aggregate(again)
    assert not counted.pairs["n_judgments"].equals(want.pairs["n_judgments"])  # what it was
    assert not counted.params.equals(want.params)
    assert got.pairs.drop("source_comparison_ids").equals(want.pairs.drop("source_comparison_ids"))
    assert (got.pairs["source_comparison_ids"].list.len() - want.pairs["source_comparison_ids"].list.len()).sum() \
        == len(records[::5])
    assert got.annotators.equals(want.annotators) and got.params.equals(want.params)
    assert got.texts().equals(want.texts())
    cfg = ChecksConfig()
    for check in (agreement, length_bias):
        assert check.run(again, cfg, pairs=got.pairs).metrics == check.run(j, cfg, pairs=want.pairs).metrics, check.NAME
    # counted, the copies moved the pairs' figures: which pairs agree too little, which response the consensus chose
    low = {name: agreement.run(again, cfg, pairs=p.pairs).metrics["low_agreement_pairs"] for name, p in
           (("counted", counted), ("rated", got))}
    assert low["counted"] != low["rated"]
    assert not counted.pairs["label_consensus"].equals(want.pairs["label_consensus"])
