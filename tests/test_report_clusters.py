"""The report's near-duplicate clusters: their prompts, looked up through one pair per prompt."""
from __future__ import annotations

import polars as pl

from pipeline.report import ReportInputs, near_dup_clusters


def test_cluster_prompts_come_from_one_pair_per_prompt_in_first_seen_order():
    # cluster X: six pairs over two prompts (alternating); Y: two pairs of one prompt (not shown:
    # a single prompt); Z: three prompts, two of them the same text (they differ in a system turn)
    rows = [("p1", "X", "h1"), ("p2", "X", "h2"), ("p3", "X", "h1"), ("p4", "X", "h2"), ("p5", "X", "h1"),
            ("p6", "X", "h2"), ("q1", "Y", "h9"), ("q2", "Y", "h9"), ("r1", "Z", "h5"), ("r2", "Z", "h6"),
            ("r3", "Z", "h7"), ("s1", "s1", "h8")]
    text = {"h1": "how do tides work", "h2": "how do the tides work", "h5": "a", "h6": "b", "h7": "a", "h8": "c",
            "h9": "d"}
    pairs = pl.DataFrame({"pair_id": [r[0] for r in rows], "decision": "keep", "reason": None,
                          "near_dup_cluster": [r[1] for r in rows]})
    judgments = pl.DataFrame({"pair_id": [r[0] for r in rows] * 2, "prompt_hash": [r[2] for r in rows] * 2})
    asked: list[list[str]] = []

    def pair_rows(ids: pl.Series) -> pl.DataFrame:
        asked.append(ids.to_list())
        by = {r[0]: text[r[2]] for r in rows}
        return pl.DataFrame({"pair_id": ids, "prompt_text": [by[i] for i in ids]})

    inp = ReportInputs(manifest=None, judgments=judgments, pairs=pairs, pair_rows=pair_rows,  # type: ignore[arg-type]
                       flags=pl.DataFrame(), annotators=pl.DataFrame(), routed=pl.DataFrame(), quarantine=pl.DataFrame())
    out = near_dup_clusters(inp)
    got = {r["near_dup_cluster"]: (r["pairs"], r["n_prompts"], r["prompts"]) for r in out.iter_rows(named=True)}
    assert got == {"X": (6, 2, ["how do tides work", "how do the tides work"]), "Z": (3, 3, ["a", "b"])}
    assert out["near_dup_cluster"].to_list() == ["Z", "X"]  # most prompts first
    assert len(asked) == 1 and sorted(asked[0]) == ["p1", "p2", "r1", "r2", "r3"]  # not p3..p6


def test_label_distribution_shares_per_locale_and_kind():
    """Each slice (locale · annotator kind; a missing locale is '?') gets its labels' shares and its count."""
    from types import SimpleNamespace

    from pipeline.report import label_counts, label_distribution

    rows = [("en", "human", "a")] * 3 + [("en", "human", "b")] + [("en", "ai", "tie")] * 2 + [(None, "human", "escalate")]
    j = pl.DataFrame({"locale": [r[0] for r in rows], "annotator_kind": [r[1] for r in rows], "label": [r[2] for r in rows]},
                     schema={"locale": pl.String, "annotator_kind": pl.String, "label": pl.String})
    # counted here, or summed from a parent's counts and a batch's (split anywhere): the same figures
    for counts in (None, label_counts(j.slice(4), label_counts(j.slice(0, 4))), label_counts(j.slice(0, 0), label_counts(j))):
        inp = SimpleNamespace(judgments=j if counts is None else j.clear(), label_counts=counts)
        slices, shares, totals = label_distribution(inp)  # type: ignore[arg-type]
        assert slices == ["? · human", "en · ai", "en · human"] and totals == [1, 2, 4]
        assert shares["a"] == [0.0, 0.0, 0.75] and shares["b"] == [0.0, 0.0, 0.25]
        assert shares["tie"] == [0.0, 1.0, 0.0] and shares["escalate"] == [1.0, 0.0, 0.0] and shares["both_bad"] == [0.0] * 3
    assert label_counts(j.slice(3), label_counts(j.slice(0, 3))).equals(label_counts(j))


def test_clusters_looked_for_among_the_graph_ones_are_those_of_every_cluster(tmp_path):
    """The report looks for clusters of several prompts among the near-duplicate graph's clusters
    (when the check gives them): on the samples, which plant near-duplicate prompts, that finds
    exactly the clusters a look over every cluster of several pairs finds."""
    from conftest import ROOT

    import pipeline.checks.near_duplicates_state as nds
    from pipeline.curate import curate
    from pipeline.store import Store
    from schemas.policy import Policy

    batches = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))
    store = Store(tmp_path / "s")
    h = store.get(curate(batches, store, Policy()).version_id)
    judgments = h.read("judgments", columns=["pair_id", "prompt_hash", "prompt", "prompt_text"])
    graph = nds.run_incremental(judgments, nds.NearDupState.empty(Policy().checks), generation="g").graph_clusters()
    pairs = h.read("pairs", columns=["pair_id", "decision", "reason", "near_dup_cluster", "prompt_text"])

    def inputs(graph_clusters: pl.DataFrame | None) -> ReportInputs:
        return ReportInputs(manifest=None, judgments=judgments, pairs=pairs.drop("prompt_text"),  # type: ignore[arg-type]
                            pair_rows=lambda ids: pairs.join(ids.to_frame("pair_id"), on="pair_id", how="semi"),
                            flags=pl.DataFrame(), annotators=pl.DataFrame(), routed=pl.DataFrame(),
                            quarantine=pl.DataFrame(), graph_clusters=graph_clusters)

    every = near_dup_clusters(inputs(None))
    assert every.height and every["n_prompts"].min() > 1  # the samples have clusters of several prompts
    assert graph.len() < pairs["near_dup_cluster"].n_unique() // 4  # a small set to look among
    assert near_dup_clusters(inputs(graph.to_frame())).equals(every)


def test_offender_examples_are_the_first_flagged_pairs_the_version_has():
    """Examples of a reason: the first MAX_EXAMPLES pairs in flag order that the version has (pairs
    whose judgments were all dropped are skipped, however many come first), looked up together."""
    import random

    from pipeline.report import MAX_EXAMPLES, OFFENDER_REASONS, offender_pairs
    from schemas.check import make_flags

    rng = random.Random(6)
    ids = [f"p{i}" for i in range(200)]
    absent = set(ids[:120:2]) | set(rng.sample(ids, 40))  # many of the first flagged pairs are not in the version
    gone, kept = sorted(absent), [i for i in ids if i not in absent]
    # each reason flags absent pairs first (more than a first look takes), then others
    flags = pl.concat([make_flags([rng.choice(gone if k < 150 else kept)], subject_kind="pair", check="x", reason=r,
                                  detail=f"d{k}") for r in OFFENDER_REASONS for k in range(300)])
    pairs = pl.DataFrame({"pair_id": [i for i in ids if i not in absent], "decision": "keep", "reason": None,
                          "near_dup_cluster": [i for i in ids if i not in absent]})
    asked: list[list[str]] = []

    def pair_rows(want: pl.Series) -> pl.DataFrame:
        asked.append(want.to_list())
        return pl.DataFrame({"pair_id": want, "prompt_text": want, "decision": "?", "reason": "?"})

    inp = ReportInputs(manifest=None, judgments=pl.DataFrame(), pairs=pairs, pair_rows=pair_rows,  # type: ignore[arg-type]
                       flags=flags, annotators=pl.DataFrame(), routed=pl.DataFrame(), quarantine=pl.DataFrame())
    for reason in OFFENDER_REASONS:
        got = offender_pairs(inp, reason)
        want = flags.filter((pl.col("reason") == reason) & pl.col("subject_id").is_in(pairs["pair_id"].implode())) \
            .unique("subject_id", maintain_order=True).head(MAX_EXAMPLES)
        assert got.select(want.columns).equals(want) and got["decision"].to_list() == ["keep"] * want.height
    assert len(asked) == 1  # one lookup for every reason's examples
