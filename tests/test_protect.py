"""A protected evaluation set: no later version trains on its pairs, their clusters or their prompts."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import polars as pl
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


def _reworded_export(st, v1, path):
    """SAMPLES[0] with each prompt of ``v1``'s test split re-worded (a word appended): a fresh export
    of the same data, whose prompts, prompt hashes and pair ids differ from the protected ones."""
    test = st.get(v1).read_split("test", columns=["prompt"])
    protected = {m[-1]["content"] for m in test["prompt"].to_list()}
    lines = []
    for line in SAMPLES[0].read_text().splitlines():
        r = json.loads(line)
        turns = r["prompt"] if isinstance(r["prompt"], list) else None
        text = turns[-1]["content"] if turns else r["prompt"]
        if text in protected:
            if turns:
                turns[-1]["content"] = text + " thanks"
            else:
                r["prompt"] = text + " thanks"
        lines.append(json.dumps(r, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def reworded(tmp_path):
    """A store with a version v1, and v3: a re-worded export of the same batch curated as a new root
    (another split seed), certified *before* v1's test split is protected."""
    st = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], st, POLICY).version_id
    seeded = policy_from_dict({"certify": {"require_expectations": False}, "split": {"seed": 99}})
    v3 = curate([_reworded_export(st, v1, tmp_path / "reworded.jsonl")], st, seeded).version_id
    assert certify_version(st, v3, seeded, run_gx=False).verdict == "certified"
    assert runner.invoke(app, ["protect", v1, "--store", str(st.root)]).exit_code == 0
    held = pl.concat([st.get(v3).read_split(s, columns=["pair_id", "prompt"]) for s in ("train", "validation")])
    planted = set(held.filter(pl.col("prompt").list.last().struct.field("content").str.ends_with(" thanks"))["pair_id"])
    return st, v1, v3, seeded, planted, held


def test_a_reworded_copy_in_another_lineage_is_caught_as_a_near_duplicate(reworded):
    """A protected prompt with a word added, in the train/validation split of a version outside the
    protected lineage: not the same pair, prompt or cluster -- it was caught by nothing."""
    st, v1, v3, seeded, planted, held = reworded
    rec = load_protections(st)[0]
    hits = contamination(st.get(v3), [rec])
    assert planted and held.height > len(planted)  # re-worded prompts, and unrelated ones, in train/validation
    # every re-worded copy caught, nothing else: the unrelated prompts of train/validation are not near duplicates
    assert set(hits["pair_id"]) == planted, hits
    assert set(hits["why"]) == {"near_duplicate"}
    assert set(hits["matched"]) <= set(rec.pair_ids) and hits["jaccard"].min() >= rec.signatures.config.threshold
    # the trainer's way in refuses it despite the certificate from before the protection
    with pytest.raises(NotCertified) as err:
        st.open_certified(v3)
    assert err.value.link == "protected" and "near_duplicate" in str(err.value)
    g = _gate(certify_version(st, v3, seeded, run_gx=False))
    assert not g.passed and g.value == len(planted) and f"near_duplicate {len(planted)}" in g.detail
    # an example names both pairs and shows both prompts
    ex = hits.row(0, named=True)
    theirs = st.get(v1).read_split("test").filter(pl.col("pair_id") == ex["matched"])["prompt"][0][-1]["content"]
    assert f'{ex["pair_id"]} ({ex["split"]}) ~ {ex["matched"]} of {v1}/test' in g.detail
    assert f'"{theirs[:120]}' in g.detail and f'"{ex["text"][:120]}' in g.detail


def test_listing_trust_matches_a_version_once_and_train_matches_afresh(reworded, monkeypatch):
    """``versions``/``show`` trust every version they list: a version's near-duplicate matches are found
    once per protection (cached beside the listing's cache, keyed by its manifest) and read back after;
    the trainer's way in never takes them from that cache (a forged "no hits" does not open the door)."""
    import pipeline.protect as protect

    st, v1, v3, *_ = reworded
    h = st.get(v3)
    first = st.trust(h)
    assert not first.ok and first.link == "protected" and "near_duplicate" in first.reason
    cache = st.root / protect.MATCHES_DIR / f"{v3}.json"
    assert json.loads(cache.read_text())["manifest_sha256"] == h.manifest_sha256()

    def no_matching(*_a, **_k):
        raise AssertionError("matched again")

    with monkeypatch.context() as m:
        m.setattr(protect, "_near_duplicates", no_matching)
        again = st.trust(h)
        assert (again.ok, again.link, again.reason) == (first.ok, first.link, first.reason)
    doc = json.loads(cache.read_text())
    doc["hits"] = {k: [] for k in doc["hits"]}  # a forged "no near duplicates"
    cache.write_text(json.dumps(doc))
    assert st.trust(h).ok  # (the listing reads its cache)
    with pytest.raises(NotCertified) as err:
        st.open_certified(v3)
    assert err.value.link == "protected"
    doc["manifest_sha256"] = "0" * 64  # a cache of other files is no cache
    cache.write_text(json.dumps(doc))
    assert st.trust(h).link == "protected"


def test_an_old_protection_record_keeps_its_exact_matches_and_says_to_protect_again(reworded, tmp_path):
    """A record written before the signatures (no ``signatures`` field, no .npy): the same pair, cluster
    or prompt still counts; near duplicates are not matched and the gate says so; protecting again
    turns matching on."""
    st, v1, v3, seeded, planted, _ = reworded
    path = next((st.root / "protected").glob("*.json"))
    doc = json.loads(path.read_text())
    del doc["signatures"]
    path.write_text(json.dumps(doc))
    next((st.root / "protected").glob("*.npy")).unlink()
    g = _gate(certify_version(st, v3, seeded, run_gx=False))
    assert g.passed and g.value == 0 and f"near-duplicate matching off for {v1}/test" in g.detail
    copy = curate(SAMPLES[:1], st, seeded).version_id  # the protected prompts themselves, partly in train
    hits = contamination(st.get(copy), load_protections(st))
    assert hits.height > 0 and set(hits["why"]) <= {"pair", "cluster", "prompt"}
    assert runner.invoke(app, ["protect", v1, "--store", str(st.root)]).exit_code == 0
    g = _gate(certify_version(st, v3, seeded, run_gx=False))
    assert not g.passed and g.value == len(planted) and "matching off" not in g.detail


@pytest.mark.parametrize("tamper", ["bytes", "shape", "pickle"])
def test_tampered_signatures_are_refused(protected, tamper):
    """The signature file is read only if its bytes match the record's sha256, as a plain uint32 array of
    the record's shape, never unpickled: anything else is a damaged protection (exit 2), not "no match"."""
    st, v1 = protected
    npy = next((st.root / "protected").glob("*.npy"))
    if tamper == "bytes":
        data = bytearray(npy.read_bytes())
        data[-1] ^= 1
        npy.write_bytes(bytes(data))
    else:  # a file that matches an edited sha256, but is not the signatures
        buf = io.BytesIO()
        bad = np.zeros((1, 3), np.uint32) if tamper == "shape" else np.array([{"x": 1}], dtype=object)
        np.save(buf, bad, allow_pickle=True)
        npy.write_bytes(buf.getvalue())
        path = next((st.root / "protected").glob("*.json"))
        doc = json.loads(path.read_text())
        doc["signatures"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="damaged protection signatures"):
        contamination(st.get(v1), load_protections(st))
    res = runner.invoke(app, ["certify", v1, "--store", str(st.root), "--no-expectations"])
    assert res.exit_code == 2 and "damaged protection signatures" in res.output, res.output


def test_protecting_an_empty_split_is_refused_and_writes_nothing(tmp_path):
    """A version too small for a test pair: `protect` would record a protection of nothing (exit 0,
    "0 pairs") that the user takes for a protected evaluation set; it is refused, naming the split."""
    st = Store(tmp_path / "s")
    rows = (ROOT / "data" / "samples" / "extra" / "trl_conversational.jsonl").read_text().splitlines()[:2]
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("\n".join(rows) + "\n")
    from pipeline.curate import CurateOptions

    v = curate([tiny], st, POLICY, options=CurateOptions(fmt="trl")).version_id
    assert st.get(v).manifest().splits["test"].rows == 0
    res = runner.invoke(app, ["protect", v, "--store", str(st.root)])
    assert res.exit_code == 2, res.output
    assert "no pairs" in res.output and "test" in res.output
    assert not (st.root / "protected").exists() or list((st.root / "protected").iterdir()) == []
    assert load_protections(st) == []
