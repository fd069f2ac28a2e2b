"""Exact duplicates (re-delivered judgments) and identical responses: planted defects are
found with the exact reason code, look-alikes that are not duplicates are left alone."""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import canonical
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.checks import duplicates
from pipeline.ingest import judgments_from_records
from schemas.policy import ChecksConfig
from schemas.text import dedup_key

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def swapped(row: dict, **over) -> dict:
    """The same judgment with response_a/response_b named the other way round."""
    flip = {"a": "b", "b": "a"}
    out = dict(row, response_a=row["response_b"], response_b=row["response_a"],
               shown_first=flip.get(row.get("shown_first"), row.get("shown_first")),
               label=flip.get(row["label"], row["label"]))
    out.update(over)
    return out


def flagged(result, reason: str) -> set[str]:
    f = result.flags.filter(pl.col("reason") == reason)
    return set(f["subject_id"].to_list())


def test_redelivered_judgments_flag_only_the_later_copies():
    base = [canonical(i) for i in range(6)]
    rows = base + [
        dict(base[1], comparison_id="late-1", created_at="2026-11-21T10:00:00Z", batch_id="b-2"),
        dict(base[1], comparison_id="late-2", created_at="2026-11-22T10:00:00Z", batch_id="b-3"),
        swapped(base[2], comparison_id="late-swapped", created_at="2026-11-21T10:00:00Z"),
    ]
    res = duplicates.run(judgments_from_records(rows), ChecksConfig())
    assert flagged(res, "exact_duplicate") == {"late-1", "late-2", "late-swapped"}
    f = res.flags.filter(pl.col("subject_id") == "late-2")
    assert f["subject_kind"][0] == "judgment" and f["check"][0] == "duplicates"
    assert "c-00001" in f["detail"][0]
    assert res.metrics["exact_duplicates"] == 3 and res.metrics["duplicate_groups"] == 2
    assert res.metrics["exact_duplicate_rate"] == pytest.approx(3 / 9)
    assert res.status == "warn"
    assert res.tables["exact_duplicates"].sort("comparison_id")["kept_id"].to_list() == ["c-00001", "c-00001", "c-00002"]


def test_look_alikes_are_not_duplicates():
    b = canonical(0)
    rows = [
        b,
        dict(b, comparison_id="other-order", shown_first="b"),  # re-judged in the other display order
        # a/b renamed, new b (= old a) shown first, new b chosen: the original delivery again
        swapped(b, comparison_id="other-order-swapped", shown_first="b"),
        dict(b, comparison_id="other-label", label="b"),
        dict(b, comparison_id="other-annotator", annotator_id="rev-02"),
        dict(b, comparison_id="other-response", response_b="Bake it yourself."),
        dict(b, comparison_id="other-prompt", prompt="How do I bake a cake?"),
    ]
    res = duplicates.run(judgments_from_records(rows))
    assert flagged(res, "exact_duplicate") == {"other-order-swapped"}


def test_earliest_copy_is_kept_whatever_the_frame_order():
    b = canonical(0)
    rows = [
        dict(b, comparison_id="z-late", created_at="2026-11-25T00:00:00Z"),
        dict(b, comparison_id="a-no-time", created_at=None),
        dict(b, comparison_id="m-early", created_at="2026-11-01T00:00:00Z"),
    ]
    j = judgments_from_records(rows)
    expect = {"z-late", "a-no-time"}  # missing created_at sorts last
    assert flagged(duplicates.run(j), "exact_duplicate") == expect
    for seed in range(3):
        assert flagged(duplicates.run(j.sample(fraction=1, shuffle=True, seed=seed)), "exact_duplicate") == expect
    # same time: batch, then source line decide
    same = [dict(b, comparison_id=f"t-{k}", created_at="2026-11-01T00:00:00Z", batch_id=bid)
            for k, bid in enumerate(["b-2", "b-1", "b-1"])]
    res = duplicates.run(judgments_from_records(same))
    assert flagged(res, "exact_duplicate") == {"t-0", "t-2"}


def test_missing_shown_first_is_a_value_of_its_own():
    b = canonical(0, shown_first=None)
    rows = [b, dict(b, comparison_id="copy"), dict(b, comparison_id="with-order", shown_first="a")]
    res = duplicates.run(judgments_from_records(rows))
    assert flagged(res, "exact_duplicate") == {"copy"}
    no_col = judgments_from_records(rows).drop("shown_first")
    assert flagged(duplicates.run(no_col), "exact_duplicate") == {"copy", "with-order"}


def test_same_comparison_id_twice_is_not_an_exact_duplicate():
    j = judgments_from_records([canonical(0)])
    res = duplicates.run(pl.concat([j, j]))
    assert res.flags.height == 0


def test_identical_responses_after_normalisation():
    long = "Mix flour, water and salt. " * 12
    rows = [
        canonical(0, response_a="Sure, here it is.", response_b="Sure, here it is."),
        canonical(1, response_a="Hello   World\n\nagain", response_b="hello world AGAIN"),
        canonical(2, response_a="Die Straße", response_b="DIE STRASSE"),
        canonical(3, response_a="はい、 できます。", response_b="はい、\u3000できます。"),
        canonical(4, response_a=long + "Bake.", response_b=long.upper().replace(". ", ".\n") + "bake."),
        canonical(5, response_a=long + "Bake.", response_b=long + "Fry."),  # same 300-char prefix, different end
        canonical(6, response_a="Sure, here it is.", response_b="Sure, here it is!"),
        canonical(7, response_a="abc", response_b="abcd"),
        canonical(8, response_a="a b c d e f g h i j k l m n o p q r s", response_b="abcdefghijklmnopqrs"),
    ]
    j = judgments_from_records(rows)
    res = duplicates.run(j)
    pid = dict(j.select("comparison_id", "pair_id").iter_rows())
    assert flagged(res, "identical_responses") == {pid[f"c-0000{i}"] for i in range(5)}
    f = res.flags.filter(pl.col("reason") == "identical_responses")
    assert set(f["subject_kind"]) == {"pair"}
    assert res.metrics["identical_responses"] == 5


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="aAbBß \n\tΣσς", max_size=40),
                          st.text(alphabet="aAbBß \n\tΣσς", max_size=40)), min_size=1, max_size=8))
def test_identical_responses_agree_with_dedup_key(pairs):
    rows = [canonical(i, response_a=a, response_b=b) for i, (a, b) in enumerate(pairs) if a.strip() and b.strip()]
    if not rows:
        return
    j = judgments_from_records(rows)
    got = duplicates.identical_response_pairs(j).to_list()
    want = sorted({p for p, a, b in j.select("pair_id", "response_a", "response_b").iter_rows()
                   if dedup_key(a) == dedup_key(b)})
    assert got == want


@pytest.mark.skipif(not SHARED.exists(), reason="shared reference data not available")
def test_real_data_duplicate_rows_are_found():
    from pipeline.ingest import ingest_files

    j = ingest_files(sorted(SHARED.glob("*.jsonl"))).judgments
    res = duplicates.run(j)
    # the README of the shared data: 5 (en) + 11 (zh) exact duplicate rows kept as found
    assert res.metrics["exact_duplicates"] == 16
    assert res.metrics["identical_responses"] == 0


def test_empty_and_single():
    j = judgments_from_records([canonical(0)])
    for frame in (j.clear(), j):
        res = duplicates.run(frame)
        assert res.flags.height == 0 and res.status == "pass"
        assert res.metrics["exact_duplicate_rate"] == 0.0
