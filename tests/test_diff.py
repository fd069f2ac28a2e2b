"""`prefpipe diff` as a demanding user runs it: bad ids, damaged versions, versions under other policies, hostile
pair ids, --json shape and exit codes, diffs too large to list."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT, canonical, write_jsonl
from test_curate_refusals import rewrite_part
from typer.testing import CliRunner

from flows.cli import app
from pipeline.curate import curate
from pipeline.store import Store
from schemas.policy import Policy, policy_from_dict

CLEAN = ROOT / "data" / "samples" / "batch-2026-11-02.jsonl"
HOSTILE = ["\x1b[31mRED\x1b[0m", "[bold]x[/bold]", "a|b`c`*d*", "<script>alert(1)</script>", "line\nbreak", "\u202eevil"]
runner = CliRunner()


def _flip_versions(root: Path) -> tuple[Store, str, str]:
    """Two versions of the same 46 pairs (ids given by the data, six of them hostile), three judgments each, every
    label flipped from the first to the second."""
    ids = HOSTILE + [f"p{i:02d}" for i in range(40)]

    def rows(label: str) -> list[dict]:
        return [canonical(i, pair_id=pid, label=label, annotator_id=f"rev-{k:02d}", shown_first="ab"[(i + k) % 2],
                          comparison_id=f"c-{label}-{i}-{k}") for i, pid in enumerate(ids) for k in range(3)]

    st = Store(root / "store")
    a = curate([write_jsonl(root / "a.jsonl", rows("a"))], st, Policy()).version_id
    b = curate([write_jsonl(root / "b.jsonl", rows("b"))], st, Policy()).version_id
    return st, a, b


@pytest.fixture(scope="module")
def flips(tmp_path_factory):
    return _flip_versions(tmp_path_factory.mktemp("flips"))


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """The clean sample under the default policy and under one with two settings changed."""
    st = Store(tmp_path_factory.mktemp("policies"))
    other = policy_from_dict({"select": {"min_strength": 0.5, "flag_actions": {"position_bias": "drop"}}})
    return st, curate([CLEAN], st, Policy()).version_id, curate([CLEAN], st, other).version_id


def _diff(st: Store, *args: str, code: int = 0):
    res = runner.invoke(app, ["diff", *args, "--store", str(st.root), "--json"])
    assert res.exit_code == code, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("ref", ["../versions", "v-x/../../etc", "", ".hidden", "v-nope", "v-"])
def test_bad_or_unknown_ids_exit_2_naming_the_id(flips, ref):
    st, a, _ = flips
    for args in ([ref, a], [a, ref]):
        doc = _diff(st, *args, code=2)
        assert doc["ok"] is False and doc["exit_code"] == 2 and repr(ref) in doc["error"], doc


def test_the_diff_says_the_policies_differ_and_counts_absent_ledger_reasons_as_0(policies):
    """Two versions of one batch under different policies: the diff names both policy hashes and the two settings
    that differ (it said nothing of the policies: the pairs removed and split moves read as changes of the data),
    and a drop reason one ledger does not list is 0 there, not null."""
    st, a, b = policies
    d = _diff(st, a, b)
    ha, hb = st.get(a).manifest().policy_hash, st.get(b).manifest().policy_hash
    assert d["policy"] == {"a": ha, "b": hb, "changed": {"select.flag_actions.position_bias": ["downweight", "drop"],
                                                         "select.min_strength": [0.0, 0.5]}}
    assert d["code_version"] is None and d["pairs_removed"] > 0
    assert d["metrics"]["ledger.dropped.below_min_strength"] == [0, d["pairs_removed"]]
    same = _diff(st, a, a)
    assert same["policy"] == {"a": ha, "b": ha, "changed": {}} and same["metrics"] == {}
    text = runner.invoke(app, ["diff", a, b, "--store", str(st.root)]).output
    assert f"policy: {ha} -> {hb} (2 settings differ)" in text and '"downweight" -> "drop"' in text, text
    assert "None" not in text


def test_hostile_pair_ids_are_inert_in_text_and_json(flips):
    st, a, b = flips
    d = _diff(st, a, b)
    assert d["label_flips"] == d["pairs_common"] == 46 and set(HOSTILE) <= set(d["label_flip_pair_ids"])
    out = runner.invoke(app, ["diff", a, b, "--store", str(st.root)]).output
    assert "\x1b" not in out and "\u202e" not in out and "line\\nbreak" in out and "[bold]x[/bold]" in out, out


def test_a_large_diff_lists_a_bounded_number_of_ids(flips, monkeypatch):
    """The pair ids a diff lists are capped (``*_truncated`` says so); the counts stay whole.  Every flipped and
    moved pair id was listed: a diff of two large versions printed millions of ids."""
    import pipeline.diff as diff_mod

    st, a, b = flips
    whole = _diff(st, a, b)
    assert len(whole["label_flip_pair_ids"]) == 46 and whole["label_flip_pair_ids_truncated"] is False
    assert whole["split_move_pair_ids_truncated"] is False
    monkeypatch.setattr(diff_mod, "MAX_LISTED_IDS", 3)
    d = _diff(st, a, b)
    assert d["label_flips"] == 46 and len(d["label_flip_pair_ids"]) == 3 and d["label_flip_pair_ids_truncated"] is True
    assert d["label_flip_pair_ids"] == sorted(d["label_flip_pair_ids"])
    out = runner.invoke(app, ["diff", a, b, "--store", str(st.root)]).output
    assert "(+43 more)" in out, out


def test_a_diff_holds_pair_ids_not_response_texts(flips, monkeypatch):
    """The splits are reduced part by part to pair id, split and a hash of the chosen texts (the diff held every
    chosen response of both versions at once), and the whole table is never read in one go."""
    import pipeline.diff as diff_mod
    from pipeline.store import VersionHandle

    st, a, b = flips
    kept = diff_mod._kept(st.get(a))
    assert kept.schema == pl.Schema({"pair_id": pl.String, "chosen_hash": pl.UInt64, "split": pl.String})
    assert kept.height == 46

    def whole(*_args, **_kwargs):
        raise AssertionError("a whole table read")

    monkeypatch.setattr(VersionHandle, "read", whole)
    assert _diff(st, a, b)["label_flips"] == 46


def test_damaged_versions_exit_2_naming_the_file(tmp_path):
    """A part changed after the version was written, and one whose chosen column is no chat messages (its manifest
    rewritten to match): exit 2 naming the file in the message and as --json's ``file`` (it was null; the second was
    a traceback)."""
    st, a, b = _flip_versions(tmp_path)
    h = st.get(b)
    part = h.split_files("train")[0]
    frame = pl.read_parquet(part)
    rewrite_part(h, part, frame.with_columns(chosen=pl.lit(7)))
    doc = _diff(st, a, b, code=2)
    assert doc["file"] == str(part) and str(part) in doc["error"] and "chosen" in doc["error"], doc
    res = runner.invoke(app, ["diff", a, b, "--store", str(st.root)])
    assert res.exit_code == 2 and "Traceback" not in res.output and str(part) in " ".join(res.output.split()), res.output
    part.write_bytes(part.read_bytes() + b"\0")
    doc = _diff(st, b, a, code=2)
    assert doc["file"] == str(part) and "sha256 differs" in doc["error"], doc
    (h.path / "manifest.json").write_text("{")
    doc = _diff(st, a, b, code=2)
    assert doc["file"] == str(h.path / "manifest.json") and "damaged manifest" in doc["error"], doc


def test_a_chosen_stored_as_text_compares_with_messages(tmp_path):
    """A version whose chosen column is the response's text (not a list of messages), against the same pairs stored
    as messages: the same response is no label flip, another one is."""
    st, a, b = _flip_versions(tmp_path)
    same = curate([tmp_path / "a.jsonl"], st, policy_from_dict({"certify": {"min_pairs_per_locale": 1}})).version_id
    assert same != a
    h = st.get(same)
    for s in ("train", "validation", "test"):
        for part in h.split_files(s):
            frame = pl.read_parquet(part)
            rewrite_part(h, part, frame.with_columns(chosen=pl.col("chosen").list.first().struct.field("content")))
    d = _diff(st, a, same)
    assert d["label_flips"] == 0 and d["pairs_common"] == 46 and d["policy"]["changed"] == {
        "certify.min_pairs_per_locale": [5, 1]}
    assert _diff(st, same, b)["label_flips"] == 46
