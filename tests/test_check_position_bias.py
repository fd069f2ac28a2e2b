"""Position-bias check: both directions, BH, order consistency in canonical orientation,
randomisation status, missing shown_first."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.checks import position_bias
from pipeline.ingest import judgments_from_records
from schemas.policy import AnnotatorTestConfig, ChecksConfig
from tests.conftest import redelivered
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


# ---------------------------------------------------------------- order inconsistency
def _flip_panel() -> pl.DataFrame:
    """30 pairs in both orders: 'flipper' picks the first position on even pairs and the second
    on odd ones (verdict flips every time, first-shown rate exactly 0.5), 'first' always the
    first position, 'steady' the same (right) verdict in both orders."""
    from tests.synth import both_orders, verdict_records

    rows = []
    for p in range(30):
        truth = "ab"[p % 2]
        rows += both_orders(str(p), "flipper", "first" if p % 2 == 0 else "second", truth)
        rows += both_orders(str(p), "first", "first", truth)
        rows += both_orders(str(p), "steady", "right", truth)
    return judgments_from_records(verdict_records(rows))


def test_order_inconsistent_judge_with_first_shown_rate_one_half_is_flagged() -> None:
    res = position_bias.run(_flip_panel())
    t = _table(res)
    by = {(r["subject_id"], r["reason"]) for r in res.flags.iter_rows(named=True)}
    assert t["flipper"]["first_shown_rate"] == 0.5 and t["flipper"]["order_flip_rate"] == 1.0
    assert t["flipper"]["order_decisive_pairs"] == 30 and t["flipper"]["order_flips"] == 30
    assert by == {("flipper", "order_inconsistent"), ("first", "position_bias"), ("first", "order_inconsistent")}
    assert t["steady"]["order_flips"] == 0 and t["steady"]["status"] == "ok"
    assert res.metrics["order_inconsistent"] == 2 and res.status == "warn"
    detail = res.flags.filter((pl.col("subject_id") == "flipper"))["detail"][0]
    assert "30 of 30 pairs" in detail and "first-shown rate 0.5" in detail


def test_order_inconsistency_needs_more_flips_than_an_order_blind_judge() -> None:
    # 14 flips of 24 pairs (0.58): p = 0.27, not flagged; 20 of 24: flagged; < 20 pairs: not tested
    from tests.synth import both_orders, verdict_records

    def run(n_flip: int, n: int):
        rows = []
        for p in range(n):
            rows += both_orders(str(p), "j", ("first", "second")[p % 2] if p < n_flip else "right", "a")
        t = _table(position_bias.run(judgments_from_records(verdict_records(rows))))["j"]
        return t["status"], t["order_p_value"]

    assert run(14, 24)[0] == "ok" and run(14, 24)[1] == pytest.approx(0.2706, abs=1e-4)
    assert run(20, 24)[0] == "flagged"
    assert run(19, 19) == ("ok", None)  # 19 pairs: order test not run (the position test is: 38 judgments)


def test_certify_gate_fails_on_an_order_inconsistent_judge(tmp_path) -> None:
    """The clean sample batch plus an AI judge that follows the display position pair by pair
    on 80 pairs in both orders: flagged order_inconsistent (never position_bias), and the
    biased-annotator gate of certify fails naming it."""
    import json

    from conftest import ROOT

    from pipeline.certify import BIAS_REASONS, certify_version
    from pipeline.curate import curate
    from pipeline.store import Store
    from schemas.policy import policy_from_dict

    clean = ROOT / "data" / "samples" / "batch-2026-11-02.jsonl"
    rows = [json.loads(line) for line in clean.read_text(encoding="utf-8").splitlines()]
    firsts = {}
    for r in rows:
        firsts.setdefault(json.dumps(r["prompt"]), r)
    extra = []
    for i, r in enumerate(list(firsts.values())[:80]):
        for first in "ab":
            pos = first if i % 2 == 0 else {"a": "b", "b": "a"}[first]
            extra.append({**r, "comparison_id": f"flip-{i}-{first}", "annotator_id": "ai-flipper", "annotator_kind": "ai",
                          "shown_first": first, "label": pos, "gold_label": None})
    batch = tmp_path / "flipper.jsonl"
    batch.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in rows + extra) + "\n", encoding="utf-8")
    assert "order_inconsistent" in BIAS_REASONS
    policy = policy_from_dict({"select": {"flag_actions": {"low_reliability": "warn"}}})
    store = Store(tmp_path / "store")
    res = curate([batch], store, policy)
    flags = store.get(res.version_id).read("flags.parquet").filter(pl.col("subject_id") == "ai-flipper")
    assert set(flags["reason"]) >= {"order_inconsistent"} and "position_bias" not in set(flags["reason"])
    cert = certify_version(store, res.version_id, policy, run_gx=False)
    gate = next(g for g in cert.gates if g.name == "biased_annotator_share")
    assert not gate.passed and "ai-flipper" in gate.detail and cert.verdict == "rejected"


def test_re_delivered_copies_count_once() -> None:
    """A re-delivered judgment (``exact_duplicate``: same annotator, pair, display order and
    verdict; select drops it) is one delivery, not two: the batch with a copy of every 5th
    judgment has the figures, tables and flags of the batch without them -- counted, an
    annotator's re-delivered judgments weighed once per copy in its first-shown test."""
    pt = make_planted(3, n_pairs=400, n_honest=15, per_defect=50, ai_shared=60, ai_only=30)
    want = position_bias.run(pt.judgments(), ChecksConfig())
    got = position_bias.run(judgments_from_records(redelivered(pt.records, 5)), ChecksConfig())
    assert want.flags.height and want.metrics["judgments"] == len(pt.records)
    assert got.metrics == want.metrics and got.flags.equals(want.flags)
    for name, table in want.tables.items():
        assert got.tables[name].equals(table), name
