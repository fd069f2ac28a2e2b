"""Position-bias check: both directions, BH, order consistency in canonical orientation,
randomisation status, missing shown_first."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.checks import position_bias
from pipeline.ingest import judgments_from_records
from schemas.policy import AnnotatorTestConfig, ChecksConfig
from tests.synth import make_planted
from tests.test_aggregate import rec


def _table(res) -> dict[str, dict]:
    return {r["annotator_id"]: r for r in res.tables["annotators"].iter_rows(named=True)}


def test_planted_position_bias_both_directions() -> None:
    pt = make_planted(7)
    res = position_bias.run(pt.judgments(), ChecksConfig())
    flagged = set(res.flags["subject_id"])
    assert pt.truth["position_bias"] <= flagged
    assert len(flagged & pt.clean_annotators) <= 1
    t = _table(res)
    assert t["pos-first-0"]["first_shown_rate"] > 0.6 and t["pos-second-2"]["first_shown_rate"] < 0.4
    details = dict(res.flags.select("subject_id", "detail").iter_rows())
    assert details["pos-first-0"].startswith("first-shown") and details["pos-second-2"].startswith("second-shown")
    assert res.metrics["favour_second"] >= 2 and res.metrics["favour_first"] >= 3
    for a in pt.insufficient:
        assert t[a]["status"] == "insufficient_data" and a not in flagged
    # AI judges judged every pair in both display orders
    assert t["ai-good"]["order_consistency"] == 1.0 and t["ai-good"]["order_pairs"] > 100
    assert t["ai-posbias"]["order_consistency"] < 0.8
    assert res.metrics["randomised"] is True and res.status == "warn"


def test_two_sided_exact_test_and_bh() -> None:
    rng = np.random.default_rng(0)
    recs = []
    for p in range(60):
        first = "a" if rng.random() < 0.5 else "b"
        second = {"a": "b", "b": "a"}[first]
        recs.append(rec(f"f{p}", first, "firsty", prompt=f"q{p}", shown_first=first))  # always the first shown
        recs.append(rec(f"s{p}", second if p % 5 else first, "secondy", prompt=f"q{p}", shown_first=first))  # 80 % second
        recs.append(rec(f"h{p}", "a" if rng.random() < 0.5 else "b", "fair", prompt=f"q{p}", shown_first=first))
        recs.append(rec(f"t{p}", "tie", "tier", prompt=f"q{p}", shown_first=first))  # ties favour nobody
    res = position_bias.run(judgments_from_records(recs))
    assert set(res.flags["subject_id"]) == {"firsty", "secondy"}
    t = _table(res)
    assert t["firsty"]["first_shown_rate"] == 1.0 and t["secondy"]["first_shown_rate"] == pytest.approx(0.2)
    assert t["firsty"]["position_p_value"] == pytest.approx(2 * 0.5**60)
    assert t["tier"]["position_n"] == 0 and t["tier"]["status"] == "insufficient_data"
    assert t["fair"]["position_q_value"] >= t["fair"]["position_p_value"]


def test_order_consistency_uses_canonical_orientation() -> None:
    # the judge sees the pair twice with the *same* raw shown_first 'a', but the second time the
    # responses are named the other way round: physically both display orders
    recs = []
    for p in range(30):
        recs.append(rec(f"x{p}", "a", "judge", kind="ai", prompt=f"q{p}", shown_first="a"))
        same = p % 3 != 0
        recs.append(rec(f"y{p}", "a" if same else "b", "judge", kind="ai", prompt=f"q{p}", shown_first="b", swap=True))
    j = judgments_from_records(recs)
    assert set(j["shown_first"]) == {"a"}
    res = position_bias.run(j)
    t = _table(res)
    assert t["judge"]["order_pairs"] == 30 and t["judge"]["order_consistency"] == pytest.approx(20 / 30)
    assert res.metrics["order_consistency"] == pytest.approx(20 / 30)
    assert res.metrics["shown_first_a_share"] == pytest.approx(0.5)  # canonical: a first half of the time


def test_not_randomised_and_missing_display_order_warn() -> None:
    fixed = [rec(f"c{p}", "a", f"h{p % 3}", prompt=f"q{p}", shown_first="a") for p in range(60)]
    res = position_bias.run(judgments_from_records(fixed))
    assert res.metrics["randomised"] is False and res.status == "warn" and "not randomised" in res.summary
    missing = [rec(f"c{p}", "a", "h1", prompt=f"q{p}") for p in range(30)]
    res = position_bias.run(judgments_from_records(missing), AnnotatorTestConfig())
    assert res.flags.height == 0 and res.metrics["missing_shown_first_share"] == 1.0 and res.status == "warn"
    assert res.metrics["randomised"] is None and _table(res)["h1"]["first_shown_rate"] is None


def test_edge_cases() -> None:
    one = judgments_from_records([rec("c1", "a", "h1", shown_first="b")])
    r = position_bias.run(one)
    assert r.flags.height == 0 and _table(r)["h1"]["first_shown_rate"] == 0.0 and _table(r)["h1"]["order_consistency"] is None
    assert position_bias.run(one.head(0)).flags.height == 0
    assert set(pl.DataFrame(r.tables["annotators"]).columns) >= {"first_shown_rate", "position_p_value", "order_consistency"}
