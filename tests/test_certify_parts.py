"""Certification per part: a child's certification takes the facts of the parts it shares with its
certified parent from the parent's record, validates and hashes only its new parts, and reaches
exactly the gates a certification from scratch reaches.  Facts come only from a record that verifies."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import ROOT

import pipeline.certify_parts as cp
import pipeline.expectations as expectations
import pipeline.parts as parts
from pipeline.certify import certify_version, expectations_gate, split_pair_ids
from pipeline.curate import curate
from pipeline.store import SPLITS, Store
from schemas.policy import Policy, policy_from_dict

BATCHES = [ROOT / "data" / "samples" / f"batch-2026-11-{d}.jsonl" for d in ("02", "09", "16")]
NO_GX = policy_from_dict({"certify": {"require_expectations": False}})


def _chain(root: Path) -> tuple[Store, str, str]:
    st = Store(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parts, "PART_PAIRS", 8)  # small buckets: the child shares about half of its split parts
        v1 = curate([BATCHES[0]], st, Policy()).version_id
        v2 = curate([BATCHES[1]], st, Policy(), parent=v1).version_id
    return st, v1, v2


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return _chain(tmp_path_factory.mktemp("certparts"))


def _copy(chain, tmp_path: Path, *, own_files: bool = False) -> tuple[Store, str, str]:
    """A copy of the chain's store without certifications: its parts hard links to the chain's
    (same inodes), or with ``own_files`` new files, linked among themselves like the original's."""
    st, v1, v2 = chain
    root = tmp_path / "store"
    if own_files:
        subprocess.run(["cp", "-a", str(st.root), str(root)], check=True)  # -a keeps hard links
        shutil.rmtree(root / "certifications", ignore_errors=True)
    else:
        shutil.copytree(st.root, root, copy_function=os.link, ignore=shutil.ignore_patterns("certifications"))
    return Store(root), v1, v2


def _gates(cert) -> dict[str, tuple]:
    return {g.name: (g.value, g.threshold, g.passed) for g in cert.gates}


def _detail(cert, name: str) -> str:
    return next(g.detail for g in cert.gates if g.name == name)


def _new_split_rows(st: Store, v1: str, v2: str) -> dict[str, int]:
    m1, m2 = st.get(v1).manifest(), st.get(v2).manifest()
    out = {}
    for s in SPLITS:
        old = {p.sha256 for p in m1.tables[f"data/{s}"].parts}
        out[s] = sum(p.rows for p in m2.tables[f"data/{s}"].parts if p.sha256 not in old)
    return out


def test_a_child_validates_only_its_new_parts_and_reaches_the_gates_of_a_full_certification(chain, tmp_path, monkeypatch):
    st, v1, v2 = _copy(chain, tmp_path)
    batches: list[dict[str, int]] = []
    real = expectations.run_expectations

    def spy(frames, out_dir, **kwargs):
        out = real(frames, out_dir, **kwargs)
        batches.append({s: r["rows"] for s, r in out["splits"].items()})
        return out

    monkeypatch.setattr(expectations, "run_expectations", spy)
    first = certify_version(st, v1, Policy())
    assert batches == [{s: st.get(v1).manifest().splits[s].rows for s in SPLITS}]  # nothing to take: every row
    child = certify_version(st, v2, Policy())
    new_rows = _new_split_rows(st, v1, v2)
    assert 0 < sum(new_rows.values()) < sum(st.get(v2).manifest().splits[s].rows for s in SPLITS)
    assert batches[1] == {s: n for s, n in new_rows.items() if n}  # only the child's new parts
    shared = sum(p.sha256 in {q.sha256 for t in st.get(v1).manifest().tables.values() for q in t.parts}
                 for t in st.get(v2).manifest().tables.values() for p in t.parts)
    assert f"{shared} unchanged since the certification of {v1}" in _detail(child, "integrity")
    assert f"unchanged since the certification of {v1}" in _detail(child, "expectations")
    assert first.part_facts is not None and child.part_facts is not None

    # the same child certified with nothing to take (a fresh copy, parent not certified) -> the same gates
    st2, _, _ = _copy(chain, tmp_path / "scratch")
    monkeypatch.setattr(expectations, "run_expectations", real)
    scratch = certify_version(st2, v2, Policy())
    assert "unchanged since" not in _detail(scratch, "integrity")
    assert _gates(child) == _gates(scratch)
    assert child.verdict == scratch.verdict

    # certifying the child again takes every part from its own record: no GX run, no file hashed
    batches.clear()
    monkeypatch.setattr(expectations, "run_expectations", spy)
    again = certify_version(st, v2, Policy())
    assert batches == []
    assert "0 files hashed" in _detail(again, "integrity")
    assert _gates(again) == _gates(child)


def test_a_part_changed_since_the_parents_certification_is_hashed_again(chain, tmp_path):
    st, v1, v2 = _copy(chain, tmp_path, own_files=True)
    certify_version(st, v1, NO_GX, run_gx=False)
    m1, m2 = st.get(v1).manifest(), st.get(v2).manifest()
    old = {p.sha256 for p in m1.tables["pairs"].parts}
    shared = next(p for p in m2.tables["pairs"].parts if p.sha256 in old)
    path = st.get(v2).path / shared.path  # the same inode as the parent's part and the store's object
    assert path.stat().st_ino == (st.get(v1).path / shared.path).stat().st_ino
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    cert = certify_version(st, v2, NO_GX, run_gx=False)
    assert cert.verdict == "rejected"
    integrity = next(g for g in cert.gates if g.name == "integrity")
    assert not integrity.passed and shared.path in integrity.detail and "sha256 differs" in integrity.detail


def _integrity_reused(cert) -> bool:
    return "unchanged since" in _detail(cert, "integrity")


def test_facts_are_taken_only_from_a_record_that_verifies(chain, tmp_path, monkeypatch):
    st, v1, v2 = _copy(chain, tmp_path)
    parent = certify_version(st, v1, NO_GX, run_gx=False)
    facts_file = st.root / parent.part_facts.path

    # a damaged facts file: its sha256 no longer matches the record
    saved = facts_file.read_bytes()
    facts_file.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    assert not _integrity_reused(certify_version(st, v2, NO_GX, run_gx=False))
    facts_file.write_bytes(saved)
    shutil.rmtree(st.root / "certifications" / v2)
    st.certification_path(v2).unlink()
    assert _integrity_reused(certify_version(st, v2, NO_GX, run_gx=False))
    shutil.rmtree(st.root / "certifications" / v2)
    st.certification_path(v2).unlink()

    # a record that names another file as its facts (copied there, sha256 matching) is no source either
    doc = json.loads(st.certification_path(v1).read_text())
    elsewhere = st.root / "certifications" / "elsewhere.parquet"
    shutil.copy(facts_file, elsewhere)
    doc["history"][-1]["part_facts"]["path"] = f"certifications/{v1}/../elsewhere.parquet"
    st.certification_path(v1).write_text(json.dumps(doc))
    assert not _integrity_reused(certify_version(st, v2, NO_GX, run_gx=False))
    doc["history"][-1]["part_facts"]["path"] = parent.part_facts.path
    st.certification_path(v1).write_text(json.dumps(doc))
    shutil.rmtree(st.root / "certifications" / v2)
    st.certification_path(v2).unlink()

    # signing configured: the parent's unsigned record is no source of facts
    monkeypatch.setenv("PREFPIPE_SIGNING_KEY", "k" * 32)
    assert not _integrity_reused(certify_version(st, v2, NO_GX, run_gx=False))

    # facts computed by other code are not taken
    shutil.rmtree(st.root / "certifications" / v2)
    st.certification_path(v2).unlink()
    monkeypatch.delenv("PREFPIPE_SIGNING_KEY")
    monkeypatch.setattr(cp, "FORMAT", cp.FORMAT + 1)
    assert not _integrity_reused(certify_version(st, v2, NO_GX, run_gx=False))


def test_a_failed_part_is_not_remembered_as_validated(chain, tmp_path, monkeypatch):
    st, v1, _ = _copy(chain, tmp_path)
    calls: list[set[str]] = []

    def failing(frames, out_dir, **_kwargs):
        calls.append(set(frames))
        return {"success": False, "docs_index": str(out_dir / "index.html"),
                "splits": {s: {"success": s != "train", "rows": f().height, "evaluated": 20,
                               "failed": ["expect_column_values_to_not_be_null(prompt)"] if s == "train" else []}
                           for s, f in frames.items()}}

    monkeypatch.setattr(expectations, "run_expectations", failing)
    cert = certify_version(st, v1, Policy())
    gx = next(g for g in cert.gates if g.name == "expectations")
    assert not gx.passed and "train" in gx.detail
    facts = pl.read_parquet(st.root / cert.part_facts.path)
    train = {p.sha256 for p in st.get(v1).manifest().tables["data/train"].parts}
    assert facts.filter(pl.col("sha256").is_in(list(train)))["gx_evaluated"].null_count() == len(train)
    certify_version(st, v1, Policy())
    assert calls == [set(SPLITS), {"train"}]  # the passing splits' parts are taken, train's validated again


def test_a_pair_id_in_two_parts_of_a_split_fails_the_expectations_gate(chain, tmp_path):
    st, v1, _ = _copy(chain, tmp_path)
    h = st.get(v1)
    facts = cp.VersionFacts(h, cp.empty_facts(), {})
    for s in SPLITS:  # every part as if validated: the gate runs no GX, only the cross-part check
        for _, row in facts.split(s):
            row["gx_evaluated"] = 20
    ids = split_pair_ids(h)
    ok = expectations_gate(facts, ids, tmp_path / "gx", None)
    assert ok.passed and ok.value == ok.threshold == 60
    dup = pl.concat([ids, ids.filter(pl.col("split") == "test").head(1)])
    bad = expectations_gate(facts, dup, tmp_path / "gx", None)
    assert not bad.passed and "test" in bad.detail and "1 repeated" in bad.detail


def test_a_childs_agreement_sums_are_its_parents_updated_with_its_new_judgments(chain, tmp_path):
    st, v1, v2 = _copy(chain, tmp_path)
    certify_version(st, v1, NO_GX, run_gx=False)
    child = certify_version(st, v2, NO_GX, run_gx=False)  # its part absorbed the parent's (level compaction)
    assert "plus this version's new judgments" in _detail(child, "agreement_overlap.human")
    assert child.agreement_state == json.loads(json.dumps(cp.full_agreement_state(st.get(v2))))  # exact
    # a grandchild that judges old pairs again, by a known and a new annotator of each kind
    old = [json.loads(line) for line in BATCHES[0].read_text(encoding="utf-8").splitlines()][:60]
    again = [{**r, "comparison_id": f"again-{i}", "annotator_id": ("judge-new" if i % 3 == 0 else r["annotator_id"]) + "-x",
              "label": "b" if r["label"] == "a" else "a"} for i, r in enumerate(old)]
    batch = tmp_path / "again.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in again), encoding="utf-8")
    v3 = curate([batch], st, Policy(), parent=v2).version_id
    grandchild = certify_version(st, v3, NO_GX, run_gx=False)
    assert "plus this version's new judgments" in _detail(grandchild, "agreement_overlap.human")
    full = cp.full_agreement_state(st.get(v3))
    assert grandchild.agreement_state == json.loads(json.dumps(full))
    assert full["sums"] != child.agreement_state["sums"]
    scratch = certify_version(st, v3, NO_GX, run_gx=False, reuse=False)
    assert _gates(scratch) == _gates(grandchild)


def _random_judgments(rng: random.Random, n: int, prefix: str) -> pl.DataFrame:
    rows = []
    for i in range(n):
        pair = f"{prefix}{rng.randrange(n // 3 + 1)}"
        a, b = ("x", "y") if rng.random() < 0.8 else ("y", "x")  # some judgments in the other display order
        rows.append({"pair_id": pair, "a_hash": f"{pair}{a}", "b_hash": f"{pair}{b}",
                     "label": rng.choice(["a", "b", "tie", "both_bad", "a", "b"]),
                     "annotator_id": f"ann{rng.randrange(6)}", "annotator_kind": rng.choice(["human", "ai", None, "human"])})
    return pl.DataFrame(rows)


@pytest.mark.parametrize("seed", range(6))
def test_overlap_state_adds_over_pairs_and_gives_the_alpha_of_the_counts(seed):
    from pipeline.overlap import add_states, annotator_kinds, from_state, overlap_agreement, overlap_state
    from pipeline.stats import krippendorff_alpha_nominal

    rng = random.Random(seed)
    a, b = _random_judgments(rng, 120, "p"), _random_judgments(rng, 90, "q")  # disjoint pairs
    both = pl.concat([a, b])
    kinds = annotator_kinds(both)
    assert add_states(overlap_state(a, kinds), overlap_state(b, kinds)) == overlap_state(both)
    assert add_states(overlap_state(both), overlap_state(b, kinds), -1) == overlap_state(a, kinds)
    got = overlap_agreement(both)
    # the alpha of the same ratings from the float implementation of pipeline.stats
    from pipeline.aggregate import TIE, encode

    e = encode(both)
    per_unit = e.per_unit(codes=np.where(e.label <= TIE, e.label, -1), k=3)
    top = per_unit.max(axis=1)
    rated = (top > 0) & ((per_unit == top[:, None]).sum(axis=1) == 1)
    for kind in ("human", "ai"):
        sel = (e.ann_kind.to_numpy()[e.unit_ann] == kind) & rated
        counts = np.zeros((e.n_pairs, 3))
        np.add.at(counts, (e.unit_pair[sel], np.argmax(per_unit, axis=1)[sel]), 1.0)
        overlap = counts.sum(axis=1) >= 2
        assert got[kind]["overlap_pairs"] == int(overlap.sum())
        want = krippendorff_alpha_nominal(counts[overlap]) if overlap.any() else float("nan")
        if np.isnan(want):
            assert got[kind]["krippendorff_alpha"] is None
        else:
            assert got[kind]["krippendorff_alpha"] == pytest.approx(want, abs=1e-12)
    assert from_state(overlap_state(both)) == got


def test_with_a_registry_the_qualified_overlap_sums_per_locale_follow_the_batch_too(tmp_path):
    from schemas.registry import load_registry

    registry = load_registry(ROOT / "data" / "samples" / "annotators.csv")
    st = Store(tmp_path / "store")
    v1 = curate([BATCHES[0]], st, Policy(annotators=registry)).version_id
    v2 = curate([BATCHES[1]], st, Policy(annotators=registry), parent=v1).version_id
    certify_version(st, v1, NO_GX, run_gx=False)
    child = certify_version(st, v2, NO_GX, run_gx=False)
    assert "plus this version's new judgments" in _detail(child, "agreement_overlap.human")
    assert any(name.startswith("qualified_overlap.locale=") for name in _gates(child))
    full = cp.full_agreement_state(st.get(v2))
    assert child.agreement_state == json.loads(json.dumps(full)) and full["qualified"]
    scratch = certify_version(st, v2, NO_GX, run_gx=False, reuse=False)
    assert _gates(scratch) == _gates(child)
    # a child built with another registry: its registry flags of old judgments change -> every judgment read
    other = load_registry(ROOT / "data" / "samples" / "annotators.csv")
    other = other.model_copy(update={"annotator": other.annotator[1:]})
    v3 = curate([BATCHES[2]], st, Policy(annotators=other), parent=v2).version_id
    grandchild = certify_version(st, v3, NO_GX, run_gx=False)
    assert "computed over every judgment" in _detail(grandchild, "agreement_overlap.human")
    assert _gates(grandchild) == _gates(certify_version(st, v3, NO_GX, run_gx=False, reuse=False))


def test_a_large_split_is_validated_in_bounded_batches_each_read_when_validated(chain, tmp_path, monkeypatch):
    import pipeline.certify as certify

    st, v1, _ = _copy(chain, tmp_path)
    monkeypatch.setattr(certify, "GX_BATCH_ROWS", 40)
    seen: list[tuple[str, int]] = []
    real = expectations.run_expectations

    def spy(frames, out_dir, **kwargs):
        assert all(callable(f) for f in frames.values())  # read when validated, one at a time
        out = real(frames, out_dir, **kwargs)
        seen.extend((name, r["rows"]) for name, r in out["splits"].items())
        return out

    monkeypatch.setattr(expectations, "run_expectations", spy)
    cert = certify_version(st, v1, Policy())
    m = st.get(v1).manifest()
    names = [n for n, _ in seen]
    assert {n.split("-")[0] for n in names} == set(SPLITS) and "train-2" in names
    big = max(p.rows for p in m.tables["data/train"].parts)
    assert all(rows <= max(40, big) for _, rows in seen)
    for s in SPLITS:
        assert sum(rows for n, rows in seen if n.split("-")[0] == s) == m.splits[s].rows
    gx = next(g for g in cert.gates if g.name == "expectations")
    assert gx.passed and gx.value == gx.threshold == 72
    facts = pl.read_parquet(st.root / cert.part_facts.path)
    split_parts = {p.sha256 for s in SPLITS for p in m.tables[f"data/{s}"].parts}
    assert facts.filter(pl.col("sha256").is_in(list(split_parts)))["gx_evaluated"].null_count() == 0


def test_a_review_counts_under_its_pairs_locale_in_the_qualified_overlap_not_its_own():
    """The qualified-overlap sums per locale group judgments by locale: a review row whose locale was edited
    in the review tool (``ja-JP`` on an ``en`` pair) counted its pair under a second locale (1 pair of ja-JP, a
    unit of one rating).  A review takes its pair's locale, as the registry check decides it (no pair moved)."""
    rows = [{"comparison_id": f"c{i}", "pair_id": "p-1", "a_hash": "x", "b_hash": "y", "label": "a", "annotator_id": f"h{i}",
             "annotator_kind": "human", "locale": "en", "review_of": None} for i in range(2)]
    rows.append({**rows[0], "comparison_id": "r1", "annotator_id": "rev", "locale": "ja-JP", "review_of": "p-1"})
    rows.append({**rows[0], "comparison_id": "c9", "pair_id": "p-2", "a_hash": "u", "locale": "ja-JP"})
    j = pl.DataFrame(rows)
    none = pl.DataFrame(schema={"comparison_id": pl.String})
    got = cp._contribution(j, none, none, {})["qualified"]
    assert {loc: v["pairs"] for loc, v in got.items()} == {"en": 1, "ja-JP": 1}
    assert got["en"]["sums"] == cp._contribution(j.filter(pl.col("pair_id") == "p-1").with_columns(locale=pl.lit("en")),
                                                 none, none, {})["qualified"]["en"]["sums"]
