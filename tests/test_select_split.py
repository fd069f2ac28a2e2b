"""Select (every pair ends as kept / routed / dropped-with-reason) and split (grouped, stratified, deterministic)."""
from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.select import filter_judgments, select_pairs
from pipeline.split import assign_splits, leakage
from schemas.check import make_flags
from schemas.policy import ChecksConfig, SelectConfig, SplitConfig


def _pairs(n: int, **cols) -> pl.DataFrame:
    base = {
        "pair_id": [f"p{i}" for i in range(n)],
        "prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(n)],
        "prompt_text": [f"q{i}" for i in range(n)],
        "response_a": [f"good answer {i}" for i in range(n)],
        "response_b": [f"bad answer {i}" for i in range(n)],
        "model_a": ["ma"] * n, "model_b": ["mb"] * n, "locale": ["en"] * n,
        "label_consensus": ["a"] * n, "agreement": [1.0] * n, "strength": [0.8] * n, "n_judgments": [3] * n,
        "annotator_kind": ["human"] * n, "source_comparison_ids": [[f"c{i}"] for i in range(n)],
    }
    base.update(cols)
    return pl.DataFrame(base)


def test_every_pair_has_exactly_one_fate():
    labels = ["a", "b", "tie", "both_bad", "escalate", "a", "a", "a", None, "a"]
    pairs = _pairs(10, label_consensus=labels, agreement=[1.0, 1.0, 1.0, 1.0, 1.0, 0.4, 1.0, 1.0, None, 1.0])
    flags = pl.concat([
        make_flags(["p5"], subject_kind="pair", check="agreement", reason="low_agreement"),
        make_flags(["p6"], subject_kind="pair", check="duplicates", reason="identical_responses"),
        make_flags(["p7"], subject_kind="pair", check="near_duplicates", reason="near_duplicate"),  # warn by default
        make_flags(["p2"], subject_kind="pair", check="language", reason="language_mismatch"),  # beats routing
    ])
    res = select_pairs(pairs, flags, SelectConfig(), all_pair_ids=pl.Series([f"p{i}" for i in range(11)]))
    fate = dict(res.pairs.select("pair_id", "decision").iter_rows())
    assert fate == {"p0": "keep", "p1": "keep", "p2": "drop", "p3": "route", "p4": "route", "p5": "drop",
                    "p6": "drop", "p7": "keep", "p8": "drop", "p9": "keep"}
    assert res.dropped_by_reason == {"identical_responses": 1, "language_mismatch": 1, "low_agreement": 1,
                                     "no_consensus": 1, "all_judgments_dropped": 1}
    assert res.routed_by_label == {"tie": 0, "both_bad": 1, "escalate": 1}
    assert res.dpo.height + sum(res.routed_by_label.values()) + sum(res.dropped_by_reason.values()) == 11
    row = res.dpo.filter(pl.col("pair_id") == "p1").row(0, named=True)
    assert row["chosen"] == [{"role": "assistant", "content": "bad answer 1"}]  # label b -> response_b chosen
    assert row["rejected_model"] == "ma"


def test_low_agreement_acts_only_where_the_kept_judgments_still_disagree():
    """The flag comes from the consensus of every judgment; given the policy's checks, select drops
    (or down-weights) only pairs whose agreement over the kept judgments is still below the threshold
    with enough judgments used: p0 was split by a dropped vote (now 2-1), p1 still is 1-1."""
    pairs = _pairs(2, agreement=[2 / 3, 0.5], n_judgments=[3, 2], n_human=[3, 2], n_ai=[0, 0])
    flags = make_flags(["p0", "p1"], subject_kind="pair", check="agreement", reason="low_agreement")
    res = select_pairs(pairs, flags, SelectConfig(), checks=ChecksConfig())
    assert dict(res.pairs.select("pair_id", "reason").iter_rows()) == {"p0": None, "p1": "low_agreement"}
    res = select_pairs(pairs, flags, SelectConfig(flag_actions={"low_agreement": "downweight"}, weight_by="none"),
                       checks=ChecksConfig())
    assert dict(res.dpo.select("pair_id", "weight").iter_rows()) == {"p0": 1.0, "p1": 0.5}
    assert select_pairs(pairs, flags, SelectConfig()).dropped_by_reason == {"low_agreement": 2}  # (no checks: the flag)


def test_ambiguous_and_too_easy_act_only_where_the_kept_judgments_still_say_so():
    """``ambiguous`` holds where either of its rules does on the final pairs: split and weak (the
    routing check's) or a consensus that abstains (the consensus check's, confidence < 0.55);
    ``too_easy`` where the pair is still unanimous and strong over >= 2 judgments used."""
    pairs = _pairs(5, agreement=[1.0, 1.0, 2 / 3, 1.0, 1.0], strength=[0.2, 0.8, 0.2, 0.95, 0.95],
                   n_judgments=[2, 2, 3, 1, 2], n_human=[2, 2, 3, 1, 2], n_ai=[0] * 5,
                   p_a_weighted=[0.9, 0.52, 0.7, 0.9, 0.9])
    flags = pl.concat([make_flags(["p0", "p1", "p2"], subject_kind="pair", check="routing", reason="ambiguous"),
                       make_flags(["p3", "p4"], subject_kind="pair", check="routing", reason="too_easy")])
    res = select_pairs(pairs, flags, SelectConfig(flag_actions={"ambiguous": "drop", "too_easy": "drop"}), checks=ChecksConfig())
    assert dict(res.pairs.select("pair_id", "reason").iter_rows()) == {"p0": None, "p1": "ambiguous", "p2": "ambiguous",
                                                                      "p3": None, "p4": "too_easy"}


def test_dimension_conflict_acts_only_where_the_kept_judgments_still_conflict():
    """``dimension_conflict`` holds where the final pair's per-dimension consensus (of the kept
    judgments) still names ``a`` on one dimension and ``b`` on another: p0's conflict was made by
    a dropped verdict (one dimension left), p1 still conflicts, p2's other side is now a tie, p3
    has no dimension verdict left; as a drop and as a down-weight."""
    from schemas.arrow import polars_schema
    from schemas.records import PairRecord

    def verdicts(**labels):
        return [{"name": n, "label": lab, "agreement": 1.0, "strength": None, "n_judgments": 1} for n, lab in labels.items()]

    dims = [verdicts(helpfulness="a"), verdicts(harmlessness="b", helpfulness="a"),
            verdicts(harmlessness="tie", helpfulness="a"), None]
    pairs = _pairs(4, n_human=[3] * 4, n_ai=[0] * 4).with_columns(
        dimensions=pl.Series(dims, dtype=polars_schema(PairRecord)["dimensions"]))
    flags = make_flags(["p0", "p1", "p2", "p3"], subject_kind="pair", check="dimensions", reason="dimension_conflict")
    res = select_pairs(pairs, flags, SelectConfig(flag_actions={"dimension_conflict": "drop"}), checks=ChecksConfig())
    assert dict(res.pairs.select("pair_id", "reason").iter_rows()) == {"p0": None, "p1": "dimension_conflict",
                                                                      "p2": None, "p3": None}
    res = select_pairs(pairs, flags, SelectConfig(flag_actions={"dimension_conflict": "downweight"}, weight_by="none"),
                       checks=ChecksConfig())
    assert dict(res.dpo.select("pair_id", "weight").iter_rows()) == {"p0": 1.0, "p1": 0.5, "p2": 1.0, "p3": 1.0}


def test_policy_actions_drop_downweight_and_weights():
    pairs = _pairs(3, agreement=[1.0, 0.75, 0.5], strength=[0.5, None, 1.0])
    flags = make_flags(["p0"], subject_kind="pair", check="near_duplicates", reason="near_duplicate")
    cfg = SelectConfig(flag_actions={"near_duplicate": "downweight"}, downweight_factor=0.5, weight_by="agreement_x_strength")
    res = select_pairs(pairs, flags, cfg)
    w = dict(res.dpo.select("pair_id", "weight").iter_rows())
    assert w == {"p0": 0.25, "p1": 0.75, "p2": 0.5}
    cfg = SelectConfig(flag_actions={"near_duplicate": "drop"}, min_strength=0.6)
    res = select_pairs(pairs, flags, cfg)
    assert res.dropped_by_reason == {"near_duplicate": 1}  # p0 dropped once, by the first reason only
    cfg = SelectConfig(max_tokens_per_pair=16)
    res = select_pairs(_pairs(1, response_a=["x" * 200]), flags.clear(), cfg)
    assert res.dropped_by_reason == {"too_long": 1}


def test_filter_judgments_drops_duplicates_and_unreliable_annotators():
    j = pl.DataFrame({"comparison_id": ["c1", "c2", "c3", "c4"], "annotator_id": ["r1", "r1", "r2", "r3"], "pair_id": ["p"] * 4})
    flags = pl.concat([
        make_flags(["c2"], subject_kind="judgment", check="duplicates", reason="exact_duplicate"),
        make_flags(["r2"], subject_kind="annotator", check="reliability", reason="low_reliability"),
        make_flags(["r3"], subject_kind="annotator", check="position_bias", reason="position_bias"),
    ])
    sel = filter_judgments(j, flags, SelectConfig())
    assert sel.kept["comparison_id"].to_list() == ["c1", "c4"]
    assert sel.dropped_by_reason == {"exact_duplicate": 1, "low_reliability": 1}
    assert sel.downweighted_annotators == ["r3"]


def _dpo(n: int, clusters: list[str], locales: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"pair_id": [f"p{i}" for i in range(n)], "near_dup_cluster": clusters, "locale": locales,
                         "annotator_kind": ["human"] * n})


def test_split_groups_clusters_and_is_deterministic():
    n = 400
    clusters = [f"k{i // 4}" for i in range(n)]  # clusters of 4 near-duplicate prompts
    locales = ["en"] * 300 + ["ja-JP"] * 100
    dpo = _dpo(n, clusters, locales)
    a = assign_splits(dpo, SplitConfig())
    b = assign_splits(dpo.sample(fraction=1.0, shuffle=True, seed=3), SplitConfig())
    assert dict(a.select("pair_id", "split").iter_rows()) == dict(b.select("pair_id", "split").iter_rows())
    frames = {s: a.filter(pl.col("split") == s) for s in ("train", "validation", "test")}
    assert leakage(frames) == {"clusters_in_several_splits": 0, "pairs_in_several_splits": 0, "prompts_in_several_splits": 0}
    sizes = a.group_by("locale", "split").len()
    for loc, total in (("en", 300), ("ja-JP", 100)):
        got = dict(sizes.filter(pl.col("locale") == loc).select("split", "len").iter_rows())
        assert abs(got["train"] - 0.8 * total) <= 4 and abs(got["test"] - 0.1 * total) <= 4  # stratified per locale
    other = assign_splits(dpo, SplitConfig(seed=99))
    assert not other["split"].equals(a["split"])


def test_leakage_detects_straddling_cluster():
    tr = _dpo(2, ["k1", "k2"], ["en", "en"])
    te = _dpo(1, ["k1"], ["en"]).with_columns(pair_id=pl.lit("p9"))
    assert leakage({"train": tr, "test": te})["clusters_in_several_splits"] == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 3), st.sampled_from(["train", "validation", "test"])),
                max_size=30, unique_by=lambda r: r[0]))
def test_leakage_counts_what_a_grouping_by_strings_counts(rows):
    """Pairs, clusters and prompts in several splits: the counts a plain grouping by the string keys gives
    (leaks planted at random, none in about half the cases)."""
    frame = pl.DataFrame({"pair_id": [f"p{r[0]}" for r in rows], "near_dup_cluster": [f"k{r[1]}" if r[1] else None for r in rows],
                          "prompt": [f"h{r[2]}" for r in rows], "split": [r[3] for r in rows]},
                         schema={"pair_id": pl.String, "near_dup_cluster": pl.String, "prompt": pl.String, "split": pl.String})
    # a pair listed twice, in two splits, when the first two rows differ in split
    doubled = frame.head(2).with_columns(pair_id=pl.lit("p0")) if frame.height >= 2 else frame.clear()
    frame = pl.concat([frame, doubled])
    frames = {s: frame.filter(pl.col("split") == s) for s in ("train", "validation", "test")}
    prompts = frame.unique("pair_id", keep="first", maintain_order=True).select("pair_id", prompt_hash="prompt")

    def several(key: pl.Expr) -> int:
        f = frame.with_columns(k=key).join(prompts, on="pair_id", how="left")
        return f.group_by("k").agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height

    assert leakage(frames, prompts) == {
        "clusters_in_several_splits": several(pl.col("near_dup_cluster").fill_null(pl.col("pair_id"))),
        "pairs_in_several_splits": several(pl.col("pair_id")),
        "prompts_in_several_splits": frame.join(prompts, on="pair_id", how="left").group_by("prompt_hash")
        .agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height}


def test_routing_flags_act_when_the_policy_says_so():
    pairs = _pairs(3)
    flags = pl.concat([make_flags(["p0"], subject_kind="pair", check="routing", reason="too_easy"),
                       make_flags(["p1"], subject_kind="pair", check="routing", reason="ambiguous")])
    assert select_pairs(pairs, flags, SelectConfig()).dpo.height == 3  # reported only, by default
    res = select_pairs(pairs, flags, SelectConfig(flag_actions={"too_easy": "drop", "ambiguous": "downweight"}))
    assert res.dropped_by_reason == {"too_easy": 1}
    assert dict(res.dpo.select("pair_id", "weight").iter_rows()) == {"p1": 0.5, "p2": 1.0}


def test_max_tokens_with_a_real_tokenizer_counts_exactly():
    from conftest import ROOT

    tok = str(ROOT / "trainer" / "assets" / "tiny-chat-tokenizer")
    words = " ".join(["preference"] * 40)  # 10-letter word: chars/4 says ~100 tokens per response
    pairs = _pairs(2, response_a=[words, "short"], response_b=["tiny", "short"])
    est = select_pairs(pairs, pl.DataFrame(schema=make_flags([], subject_kind="pair", check="x", reason="x").schema),
                       SelectConfig(max_tokens_per_pair=60))
    assert est.dropped_by_reason == {"too_long": 1}
    from tokenizers import Tokenizer

    n = len(Tokenizer.from_file(tok + "/tokenizer.json").encode(words, add_special_tokens=False).ids)
    n += len(Tokenizer.from_file(tok + "/tokenizer.json").encode("q0", add_special_tokens=False).ids)
    flags = make_flags([], subject_kind="pair", check="x", reason="x")
    at = select_pairs(pairs, flags, SelectConfig(max_tokens_per_pair=n, tokenizer=tok))
    assert at.dropped_by_reason == {}  # exactly at the limit: kept
    over = select_pairs(pairs, flags, SelectConfig(max_tokens_per_pair=n - 1, tokenizer=tok))
    assert over.dropped_by_reason == {"too_long": 1}


def test_tokenizer_path_is_checked_before_any_work(tmp_path):
    import pytest

    from schemas.policy import PolicyError, policy_from_dict

    with pytest.raises(PolicyError, match="tokenizer"):
        policy_from_dict({"select": {"tokenizer": str(tmp_path / "nope")}})


def test_a_few_pairs_select_as_they_do_among_all():
    """Selecting a few pairs (a child's dirty ones: their flags and clusters are filtered to them
    first) decides each as selecting every pair does."""
    import random

    rng = random.Random(8)
    n = 60
    reasons = [("agreement", "low_agreement"), ("near_duplicates", "near_duplicate"), ("language", "language_mismatch"),
               ("duplicates", "identical_responses")]
    pairs = _pairs(n, label_consensus=[rng.choice(["a", "b", "tie", "a"]) for _ in range(n)],
                   agreement=[rng.choice([1.0, 0.4, 0.8]) for _ in range(n)])
    flags = pl.concat([make_flags([f"p{rng.randrange(n)}"], subject_kind="pair", check=ch, reason=r)
                       for _ in range(3 * n) for ch, r in [rng.choice(reasons)]]
                      + [make_flags([f"c{i}"], subject_kind="judgment", check="duplicates", reason="exact_duplicate")
                         for i in range(n)])
    clusters = pl.DataFrame({"pair_id": pairs["pair_id"], "near_dup_cluster": [f"k{rng.randrange(20)}" for _ in range(n)]})
    cfg = SelectConfig(flag_actions={"near_duplicate": "downweight"})
    every = select_pairs(pairs, flags, cfg, clusters=clusters)
    few = pairs.sample(7, seed=3)
    assert 4 * few.height < min(flags.height, clusters.height)  # the filtered path
    some = select_pairs(few, flags, cfg, clusters=clusters)
    ids = few["pair_id"].implode()
    for got, want in ((some.pairs, every.pairs), (some.dpo, every.dpo)):
        assert got.sort("pair_id").equals(want.filter(pl.col("pair_id").is_in(ids)).sort("pair_id"))


def test_kept_annotators_are_those_of_the_kept_rows():
    """The annotators with a kept judgment, found by groups over pieces of the rows (any piece size), are those of the
    kept rows."""
    import random

    from pipeline.select import JudgmentSelection

    rng = random.Random(3)
    n = 500
    rows = pl.DataFrame({"annotator_id": [f"a{rng.randrange(40)}" for _ in range(n)], "pair_id": [f"p{i}" for i in range(n)]})
    # some annotators dropped whole (every row), others in part
    whole = {f"a{i}" for i in range(6)}
    dropped = pl.Series([a in whole or rng.random() < 0.3 for a in rows["annotator_id"]])
    for d in (dropped, None):
        sel = JudgmentSelection(rows=rows, dropped=d, dropped_by_reason={})
        want = sorted(sel.kept_rows(columns=["annotator_id"])["annotator_id"].unique().to_list())
        for step in (1, 7, 64, 499, 500, 1 << 20):  # (an annotator kept in one piece, dropped in the others)
            assert sorted(sel.kept_annotators(step).to_list()) == want, step
    assert not whole & set(JudgmentSelection(rows=rows, dropped=dropped, dropped_by_reason={}).kept_annotators().to_list())


def test_order_keys_and_picks_equal_their_one_at_a_time_forms():
    """The split's vectorised cluster keys and unrolled deficit loop give what the per-cluster forms give."""
    import random

    from pipeline import split as sp

    ids = ["p-0123456789abcdef", "near-7", "cl-é-ü", "", "日本-1", *(f"p-{i:016x}" for i in range(200))]
    keys = sp._order_keys(17, pl.Series(ids, dtype=pl.String))
    assert keys.dtype == pl.UInt64 and keys.to_list() == [int(sp._order_key(17, x), 16) for x in ids]
    # (the numbers sort as the hex keys do: the order the fresh clusters are placed in)
    hexes = [sp._order_key(17, x) for x in ids]
    assert sorted(range(len(ids)), key=lambda i: keys[i]) == sorted(range(len(ids)), key=lambda i: hexes[i])
    assert sp._order_keys(17, pl.Series([], dtype=pl.String)).len() == 0

    def reference(goal, have, sizes):  # the loop as it was: the first split with the largest deficit
        have, picks = list(have), []
        for n in sizes:
            best, best_d = -1, 0.0
            for i in (0, 1, 2):
                g = goal[i]
                if g is not None and (best < 0 or g - have[i] > best_d):
                    best, best_d = i, g - have[i]
            picks.append(best)
            have[best] += n
        return picks

    rng = random.Random(5)
    for goal in ([80.0, 10.0, 10.0], [90.0, 5.0, 5.0], [50.0, 25.0, 25.0], [90.0, 10.0, None], [None, None, 3.0]):
        for have in ([0, 0, 0], [70, 12, 0], [3, 3, 3]):
            sizes = [rng.choice([1, 1, 2, 3, 7]) for _ in range(400)]
            got = sp._picks(goal, list(have), sizes)
            assert got == reference(goal, have, sizes)
            assert {0, 1, 2} & set(got)  # (not a degenerate case)
