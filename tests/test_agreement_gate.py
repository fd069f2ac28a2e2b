"""Agreement must be measured before certification: an independent overlap subset and its alpha."""
from __future__ import annotations

import json

from conftest import ROOT, canonical, write_jsonl

from pipeline.certify import certify_version
from pipeline.ingest import judgments_from_records
from pipeline.curate import curate
from pipeline.overlap import overlap_agreement, required_overlap
from pipeline.store import Store
from schemas.policy import policy_from_dict

CLEAN = ROOT / "data" / "samples" / "batch-2026-11-02.jsonl"
NO_GX = {"certify": {"require_expectations": False}}


def _gates(cert) -> dict:
    return {g.name: g for g in cert.gates}


def _single_judgment_batch(tmp_path, n=60):
    """The clean batch reduced to one human judgment per pair: nothing to measure agreement on."""
    seen, rows = set(), []
    for line in CLEAN.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        key = json.dumps(r["prompt"], sort_keys=True)
        if r["annotator_kind"] == "human" and key not in seen:
            seen.add(key)
            rows.append(r)
    return write_jsonl(tmp_path / "single.jsonl", rows[:n])


def test_one_judgment_per_pair_is_not_certified(tmp_path):
    st = Store(tmp_path / "s")
    policy = policy_from_dict(NO_GX)
    vid = curate([_single_judgment_batch(tmp_path)], st, policy).version_id
    cert = certify_version(st, vid, policy, run_gx=False)
    g = _gates(cert)
    assert cert.verdict == "rejected"
    assert not g["agreement_overlap.human"].passed and g["agreement_overlap.human"].value == 0
    assert not g["krippendorff_alpha.human"].passed and "not measured" in g["krippendorff_alpha.human"].detail
    assert cert.opt_outs == ["expectations"]  # (NO_GX: the suite opted out, recorded as such)


def test_explicit_opt_out_certifies_and_is_recorded(tmp_path):
    """Both opt-outs show in the certificate, as a passing gate and in ``opt_outs`` (``require_expectations = false``
    left no trace before: a reader could not tell a version certified without the suite)."""
    st = Store(tmp_path / "s")
    policy = policy_from_dict({"certify": {"require_expectations": False, "require_agreement": False,
                                           "min_pairs_per_locale": 0}})
    vid = curate([_single_judgment_batch(tmp_path)], st, policy).version_id
    cert = certify_version(st, vid, policy, run_gx=False)
    g = _gates(cert)
    assert g["agreement"].passed and "opted out" in g["agreement"].detail
    assert "agreement_overlap.human" not in g
    assert st.latest_certification(vid)["opt_outs"] == ["agreement", "expectations"]
    assert g["expectations"].passed and "opted out" in g["expectations"].detail and g["expectations"].value is None


def test_clean_samples_measure_agreement_on_an_independent_overlap(tmp_path):
    st = Store(tmp_path / "s")
    policy = policy_from_dict(NO_GX)
    vid = curate([CLEAN], st, policy).version_id
    g = _gates(certify_version(st, vid, policy, run_gx=False))
    assert g["agreement_overlap.human"].passed and g["agreement_overlap.human"].value >= 90
    assert g["krippendorff_alpha.human"].passed and g["krippendorff_alpha.human"].value >= 0.3
    assert "agreement_overlap.ai" in g


def test_same_ai_judge_twice_is_not_an_overlap():
    """One AI judge in both display orders: consistency, not agreement between judges."""
    rows = []
    for i in range(20):
        for shown in ("a", "b"):
            rows.append(canonical(len(rows), prompt=f"q{i}", response_a=f"x{i}", response_b=f"y{i}", shown_first=shown,
                                  label="a" if i % 3 else "b", annotator_id="judge-1", annotator_kind="ai"))
    j = judgments_from_records(rows)
    ov = overlap_agreement(j)
    assert ov["ai"] == {"pairs": 20, "overlap_pairs": 0, "krippendorff_alpha": None}
    # a second judge makes every pair an overlap pair
    rows += [canonical(len(rows) + k, prompt=f"q{k}", response_a=f"x{k}", response_b=f"y{k}", label="a",
                       annotator_id="judge-2", annotator_kind="ai") for k in range(20)]
    ov = overlap_agreement(judgments_from_records(rows))
    assert ov["ai"]["overlap_pairs"] == 20 and ov["ai"]["krippendorff_alpha"] is not None


def test_required_overlap_rule():
    assert required_overlap(0, 0.1, 200) == 0
    assert required_overlap(5, 0.1, 200) == 1
    assert required_overlap(1000, 0.1, 200) == 100
    assert required_overlap(10_000, 0.1, 200) == 200
