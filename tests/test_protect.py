"""A protected evaluation set: no later version trains on its pairs, their clusters or their prompts."""
from __future__ import annotations

import json

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from flows.cli import app
from pipeline.certify import certify_version
from pipeline.curate import curate
from pipeline.protect import contamination, load_protections
from pipeline.store import NotCertified, Store, StoreError
from schemas.policy import policy_from_dict

SAMPLES = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))
POLICY = policy_from_dict({"certify": {"require_expectations": False}})
runner = CliRunner()


def _gate(cert, name="protected_contamination"):
    return next(g for g in cert.gates if g.name == name)


@pytest.fixture
def protected(tmp_path):
    st = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], st, POLICY).version_id
    res = runner.invoke(app, ["protect", v1, "--store", str(st.root), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["pairs"] == st.get(v1).manifest().splits["test"].rows > 0
    return st, v1


def test_descendants_keep_protected_pairs_out_of_training(protected):
    st, v1 = protected
    v2 = curate(SAMPLES[1:2], st, POLICY, parent=v1).version_id
    cert = certify_version(st, v2, POLICY, run_gx=False)
    g = _gate(cert)
    assert g.passed and g.value == 0 and "1 protected set" in g.detail


def test_an_unrelated_version_with_the_protected_prompts_is_rejected_and_not_trained_on(protected, tmp_path):
    st, v1 = protected
    # the same batch curated as a new root with another split seed: fresh assignment, the protected
    # test prompts land partly in train -- a copy outside the protected lineage
    other = policy_from_dict({"certify": {"require_expectations": False}, "split": {"seed": 99}})
    v3 = curate(SAMPLES[:1], st, other).version_id
    hits = contamination(st.get(v3), load_protections(st))
    assert hits.height > 0 and set(hits["why"].to_list()) <= {"pair", "cluster", "prompt"}
    assert set(hits["split"].to_list()) <= {"train", "validation"}
    cert = certify_version(st, v3, other, run_gx=False)
    g = _gate(cert)
    assert not g.passed and g.value == hits.height and cert.verdict == "rejected"
    # a certificate from before the protection does not help: the trainer's way in refuses it
    st2 = Store(tmp_path / "s2")
    v = curate(SAMPLES[:1], st2, other).version_id
    assert certify_version(st2, v, other, run_gx=False).verdict == "certified"
    base = curate(SAMPLES[:1], st2, POLICY).version_id
    runner.invoke(app, ["protect", base, "--store", str(st2.root)])
    with pytest.raises(NotCertified) as err:
        st2.open_certified(v)
    assert err.value.link == "protected"
    res = runner.invoke(app, ["train", v, "--store", str(st2.root), "--model", "tiny-llama:layers=1,hidden=32,heads=2",
                              "--steps", "1"])
    assert res.exit_code == 4 and "protected" in res.output


def test_versions_and_show_do_not_call_certified_what_train_refuses(tmp_path):
    """A certificate from before the protection: train refuses the version (link ``protected``), so
    the trust column of ``versions`` and ``show`` must not say certified."""
    st = Store(tmp_path / "s")
    other = policy_from_dict({"certify": {"require_expectations": False}, "split": {"seed": 99}})
    v = curate(SAMPLES[:1], st, other).version_id
    assert certify_version(st, v, other, run_gx=False).verdict == "certified"
    base = curate(SAMPLES[:1], st, POLICY).version_id
    assert runner.invoke(app, ["protect", base, "--store", str(st.root)]).exit_code == 0
    with pytest.raises(NotCertified):
        st.open_certified(v)
    res = runner.invoke(app, ["versions", "--store", str(st.root), "--json"])
    row = next(r for r in json.loads(res.stdout) if r["version_id"] == v)
    assert row["certified"] is False and row["trust"]["link"] == "protected", row
    # --fast checks certificate -> manifest only: no data file is read (not for the protections either)
    res = runner.invoke(app, ["versions", "--store", str(st.root), "--json", "--fast"])
    row = next(r for r in json.loads(res.stdout) if r["version_id"] == v)
    assert row["certified"] is True and row["trust"]["link"] is None, row
    res = runner.invoke(app, ["versions", "--store", str(st.root)])
    assert res.exit_code == 0 and "no (protected pairs)" in res.stdout and "yes" not in res.stdout, res.output
    res = runner.invoke(app, ["show", v, "--store", str(st.root), "--json"])
    trust = json.loads(res.stdout)["trust"]
    assert not trust["ok"] and trust["link"] == "protected" and "protected evaluation set" in trust["reason"]
    res = runner.invoke(app, ["show", v, "--store", str(st.root)])
    assert "NOT certified (protected)" in res.stdout and "certification: CERTIFIED" not in res.stdout


def test_a_damaged_protection_is_an_error_not_an_absence(protected):
    st, v1 = protected
    rec = next((st.root / "protected").glob("*.json"))
    rec.write_text("{")
    with pytest.raises(StoreError, match="damaged protection record"):
        load_protections(st)
    res = runner.invoke(app, ["certify", v1, "--store", str(st.root), "--no-expectations"])
    assert res.exit_code == 2 and "damaged protection record" in res.output


def test_evaluation_reports_the_protected_slice():
    from trainer.evaluate import slice_members

    rows = [{"pair_id": f"p{i}", "locale": "en"} for i in range(5)]
    members = slice_members(rows, None, {"p1", "p3"})
    assert members[("protected", "yes")] == [1, 3]
    assert ("protected", "yes") not in slice_members(rows, None, set())


def test_a_protected_validation_split_does_not_contaminate_itself_and_train_cannot_be_protected(tmp_path):
    """``protect --split validation`` made the protected version (and every descendant, whose sticky splits keep
    those pairs in validation) fail its own gate: a held-out split's pairs are contamination in train only, and
    in the other held-out split.  ``--split train`` would leave nothing to train on: refused."""
    st = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], st, POLICY).version_id
    res = runner.invoke(app, ["protect", v1, "--split", "validation", "--store", str(st.root), "--json"])
    assert res.exit_code == 0, res.output
    assert contamination(st.get(v1), load_protections(st)).height == 0
    v2 = curate(SAMPLES[1:2], st, POLICY, parent=v1).version_id
    for vid in (v1, v2):
        g = _gate(certify_version(st, vid, POLICY, run_gx=False))
        assert g.passed and g.value == 0, (vid, g)
    val = set(st.get(v1).read_split("validation")["pair_id"].to_list())
    other = Store(tmp_path / "other")  # the same batch with another split seed: some of those pairs land in train
    seeded = policy_from_dict({"certify": {"require_expectations": False}, "split": {"seed": 99}})
    v3 = curate(SAMPLES[:1], other, seeded).version_id
    (other.root / "protected").mkdir(parents=True)
    for p in (st.root / "protected").iterdir():
        (other.root / "protected" / p.name).write_bytes(p.read_bytes())
    hits = contamination(other.get(v3), load_protections(other))
    assert hits.height > 0 and set(hits.filter(hits["why"] == "pair")["pair_id"].to_list()) <= val
    assert set(hits["split"].to_list()) <= {"train"}  # (the protected split itself is not counted)
    res = runner.invoke(app, ["protect", v1, "--split", "train", "--store", str(st.root)])
    assert res.exit_code == 2 and "held-out" in res.output, res.output
