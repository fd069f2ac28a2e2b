"""Agreement check: alpha / kappa against independent references, low_agreement flags,
orientation and missing-value handling, slices, edge cases."""
from __future__ import annotations

import json
import math

import krippendorff
import numpy as np
import polars as pl
import pytest

from pipeline.checks import agreement
from pipeline.ingest import judgments_from_records
from schemas.policy import AgreementConfig, ChecksConfig
from schemas.text import content_hash, derive_pair_id
from tests.conftest import redelivered
from tests.synth import make_planted
from tests.test_aggregate import rec

CAT = {"a": 0, "b": 1, "tie": 2}


def _matrix(records: list[dict], kind: str, locale: str | None = None) -> np.ndarray:
    """coders x units reliability matrix from raw dicts (canonical = first judgment's
    orientation; both_bad / escalate missing)."""
    first_a: dict[str, str] = {}
    cells: dict[tuple[str, str], float] = {}
    for r in records:
        pid = derive_pair_id(content_hash(r["prompt"]), content_hash(r["response_a"]), content_hash(r["response_b"]))
        first_a.setdefault(pid, r["response_a"])
        if r["annotator_kind"] != kind or (locale and r.get("locale") != locale):
            continue
        lab = r["label"] if r["response_a"] == first_a[pid] else {"a": "b", "b": "a"}.get(r["label"], r["label"])
        if lab in CAT:
            assert (r["annotator_id"], pid) not in cells  # one rating per coder and unit here
            cells[(r["annotator_id"], pid)] = CAT[lab]
    coders = sorted({c for c, _ in cells})
    units = sorted({u for _, u in cells})
    m = np.full((len(coders), len(units)), np.nan)
    ci, ui = {c: i for i, c in enumerate(coders)}, {u: i for i, u in enumerate(units)}
    for (c, u), v in cells.items():
        m[ci[c], ui[u]] = v
    return m


def _fleiss_modal_reference(m: np.ndarray) -> float:
    per_unit = []
    for u in range(m.shape[1]):
        col = [int(v) for v in m[:, u] if not np.isnan(v)]
        if len(col) >= 2:
            per_unit.append([col.count(k) for k in range(3)])
    sizes = [sum(r) for r in per_unit]
    freq = {s: sizes.count(s) for s in set(sizes)}
    modal = max(freq, key=lambda s: (freq[s], s))
    table = [r for r in per_unit if sum(r) == modal]
    n, k = len(table), modal
    p_j = [sum(r[j] for r in table) / (n * k) for j in range(3)]
    p_bar = sum((sum(x * x for x in r) - k) / (k * (k - 1)) for r in table) / n
    p_e = sum(x * x for x in p_j)
    return (p_bar - p_e) / (1 - p_e)


@pytest.fixture(scope="module")
def planted():
    pt = make_planted(3, n_pairs=400, n_honest=15, per_defect=50, ai_shared=60, ai_only=30)
    return pt, pt.judgments()


def test_human_alpha_and_kappa_match_references(planted) -> None:
    pt, j = planted
    res = agreement.run(j, AgreementConfig(bootstrap=50))
    m = _matrix(pt.records, "human")
    ref_alpha = krippendorff.alpha(reliability_data=m, level_of_measurement="nominal", value_domain=[0, 1, 2])
    assert res.metrics["human"]["krippendorff_alpha"] == pytest.approx(ref_alpha, abs=1e-9)
    assert res.metrics["human"]["fleiss_kappa"] == pytest.approx(_fleiss_modal_reference(m), abs=1e-9)
    lo, hi = res.metrics["human"]["krippendorff_alpha_ci"]
    assert lo < res.metrics["human"]["krippendorff_alpha"] < hi
    lo, hi = res.metrics["human"]["fleiss_kappa_ci"]
    assert lo < res.metrics["human"]["fleiss_kappa"] < hi
    assert res.metrics["human"]["fleiss_m"] == 3  # most pairs have three human ratings
    json.dumps(res.metrics)  # manifest-ready


def test_slice_alpha_matches_reference(planted) -> None:
    pt, j = planted
    res = agreement.run(j, AgreementConfig(bootstrap=0))
    m = _matrix(pt.records, "human", locale="ja-JP")
    ref = krippendorff.alpha(reliability_data=m, level_of_measurement="nominal", value_domain=[0, 1, 2])
    assert res.metrics["slices"]["locale=ja-JP"]["human"]["krippendorff_alpha"] == pytest.approx(ref, abs=1e-9)
    assert {"tag=support", "tag=code", "locale=en"} <= set(res.metrics["slices"])
    assert res.metrics["human"]["krippendorff_alpha_ci"] is None  # bootstrap switched off
    assert set(res.tables["slices"].columns) == {"slice", "kind", "n_pairs", "krippendorff_alpha", "fleiss_kappa"}


def test_low_agreement_flags_planted_pairs(planted) -> None:
    pt, j = planted
    res = agreement.run(j, ChecksConfig())
    flagged = set(res.flags.filter(pl.col("reason") == "low_agreement")["subject_id"])
    assert pt.truth["low_agreement"] <= flagged
    assert set(res.flags["subject_kind"]) == {"pair"} and set(res.flags["check"]) == {"agreement"}
    assert len(flagged & pt.clean_pairs) <= 0.03 * len(pt.clean_pairs)


def test_low_agreement_rules() -> None:
    recs = [
        # 2-2 split: agreement 0.5 -> flagged
        *[rec(f"s{i}", lab, f"h{i}", prompt="split") for i, lab in enumerate("aabb")],
        # 2-1: agreement 0.67 -> kept
        *[rec(f"m{i}", lab, f"h{i}", prompt="major") for i, lab in enumerate("aab")],
        # one judgment: not scored
        rec("o1", "a", "h1", prompt="one"),
        # AI-only pair, the same judge disagreeing with itself across display orders -> flagged
        rec("x1", "a", "ai1", kind="ai", prompt="ai", shown_first="a"), rec("x2", "b", "ai1", kind="ai", prompt="ai", shown_first="b"),
        # humans agree; an AI dissent is not used under human_first -> kept
        rec("y1", "a", "h1", prompt="hum"), rec("y2", "a", "h2", prompt="hum"), rec("y3", "b", "ai1", kind="ai", prompt="hum"),
    ]
    j = judgments_from_records(recs)
    res = agreement.run(j)
    pid = dict(j.select("prompt_text", "pair_id").unique().iter_rows())
    assert set(res.flags["subject_id"]) == {pid["split"], pid["ai"]}
    assert res.metrics["pairs_scored"] == 4 and res.metrics["low_agreement_pairs"] == 2


def test_both_bad_and_escalate_are_missing_values() -> None:
    base = [rec(f"c{p}{i}", lab, f"h{i}", prompt=f"q{p}") for p, labs in enumerate(["aab", "bba", "aaa", "ab"])
            for i, lab in enumerate(labs)]
    more = base + [rec("bb1", "both_bad", "h9", prompt="q0"), rec("es1", "escalate", "h8", prompt="q1")]
    r1 = agreement.run(judgments_from_records(base), AgreementConfig(bootstrap=0))
    r2 = agreement.run(judgments_from_records(more), AgreementConfig(bootstrap=0))
    assert r1.metrics["human"]["krippendorff_alpha"] == pytest.approx(r2.metrics["human"]["krippendorff_alpha"])
    assert r2.metrics["ratings_treated_as_missing"] == 2


def test_orientation_does_not_change_alpha() -> None:
    rng = np.random.default_rng(0)
    plain, swapped = [], []
    for p in range(200):
        truth = "a" if rng.random() < 0.5 else "b"
        for i in range(3):
            lab = truth if rng.random() < 0.8 else ("tie" if rng.random() < 0.2 else {"a": "b", "b": "a"}[truth])
            plain.append(rec(f"c{p}-{i}", lab, f"h{i}", prompt=f"q{p}"))
            swapped.append(rec(f"c{p}-{i}", lab, f"h{i}", prompt=f"q{p}", swap=i > 0 and rng.random() < 0.5))
    a1 = agreement.run(judgments_from_records(plain), AgreementConfig(bootstrap=0)).metrics["human"]
    a2 = agreement.run(judgments_from_records(swapped), AgreementConfig(bootstrap=0)).metrics["human"]
    assert a1["krippendorff_alpha"] == pytest.approx(a2["krippendorff_alpha"], abs=1e-12)
    assert a1["fleiss_kappa"] == pytest.approx(a2["fleiss_kappa"], abs=1e-12)
    assert 0.2 < a1["krippendorff_alpha"] < 0.6  # ~0.38 expected for 80 % accurate raters


def test_edge_cases_do_not_crash() -> None:
    j1 = judgments_from_records([rec("c1", "a", "h1", shown_first=None)])
    r = agreement.run(j1)
    assert r.flags.height == 0 and r.metrics["human"]["krippendorff_alpha"] is None and r.status == "pass"
    r = agreement.run(j1.head(0))
    assert r.flags.height == 0 and r.status == "pass"
    only_ai = judgments_from_records([rec("c1", "a", "ai1", kind="ai"), rec("c2", "a", "ai2", kind="ai")])
    m = agreement.run(only_ai).metrics
    assert m["human"]["n_pairs"] == 0 and m["ai"]["n_pairs"] == 1 and math.isnan(m["ai"]["krippendorff_alpha"] or math.nan)


def test_state_adds_over_disjoint_pairs_and_gives_the_same_figures(planted) -> None:
    """The check's state (``count_sums``) of two disjoint sets of pairs merges into the state of
    both; figures computed from a merged state equal the run over every judgment, to the bit;
    a state that does not contain the rows taken out of it is refused."""
    _, j = planted
    spec = agreement.CHECK.sums
    assert spec is not None
    pairs = j["pair_id"].unique().sort()
    left = j.filter(pl.col("pair_id").is_in(pairs.head(pairs.len() // 3).implode()))
    right = j.filter(~pl.col("pair_id").is_in(pairs.head(pairs.len() // 3).implode()))
    whole = spec.count(j)
    empty = whole.clear()
    assert spec.merge(spec.count(left), empty, spec.count(right)).equals(whole)
    assert spec.merge(whole, spec.count(left), empty).equals(spec.count(right))
    cfg = AgreementConfig(bootstrap=40)
    direct = agreement.run(j, cfg)
    merged = agreement.run(j, cfg, sums=spec.merge(spec.count(right), empty, spec.count(left)))
    assert merged.metrics == direct.metrics
    assert merged.tables["slices"].equals(direct.tables["slices"])
    assert whole.filter(pl.col("kind") == agreement.MISSING)["n"].sum() == direct.metrics["ratings_treated_as_missing"]
    with pytest.raises(ValueError, match="does not belong"):
        spec.merge(spec.count(left), spec.count(right), empty)


def test_re_delivered_copies_are_not_ratings(planted) -> None:
    """A copy the duplicates check finds (``exact_duplicate``, dropped by select) is the same
    answer again, not another annotator's: the batch with a re-delivery of every 5th judgment
    has the agreement figures of the batch without them (every kind, CIs, slices, missing
    values), to the bit -- counted, they raised human alpha."""
    from pipeline.checks import duplicates

    pt, j = planted
    again = judgments_from_records(redelivered(pt.records, 5))
    assert duplicates.run(again).metrics["exact_duplicates"] == len(pt.records[::5])
    cfg = AgreementConfig(bootstrap=40)
    want, got = agreement.run(j, cfg), agreement.run(again, cfg)
    for key in (*agreement.KINDS, "slices", "ratings_treated_as_missing"):
        assert got.metrics[key] == want.metrics[key], key
    assert got.tables["slices"].equals(want.tables["slices"]) and got.tables["sums"].equals(want.tables["sums"])
