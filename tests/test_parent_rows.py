"""pipeline/parent_rows.py: a child under the rule lets go of its union after the checks -- its drops,
changed pairs and flagged judgments come from a pass over its parent's parts, select's rows of the pairs
it reads from those parts -- and writes the version the child that keeps its union writes, byte for
byte; on a 2-process LocalCluster too (issue 15, goal 2 for a child's passes over its history)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT, write_jsonl
from test_incremental import POLICY, curate_chain

import pipeline.curate as cu
from pipeline import parent_rows as pr
from pipeline.checks import resolve_policy
from pipeline.curate import curate
from pipeline.store import Store
from schemas.policy import SelectConfig


def _with_union(monkeypatch) -> None:
    """Children built the way a child under another rule is: with every parent row held to the end."""
    orig = cu._build_version
    monkeypatch.setattr(cu, "_build_version", lambda *a, **k: orig(*a, **{**k, "work": None}))


def _chain(root: Path, name: str, seed: int, n: int) -> tuple[Store, list[tuple[str, str | None]]]:
    """The chain in store ``root/name`` (its batch files in ``root``: the same paths for every store)."""
    store = Store(root / name)
    return store, [(vid, parent) for _p, vid, parent in curate_chain(store, seed, n)]


def generate_lines(path: Path, n: int, seed: int) -> list[str]:
    from gen_judgments import generate

    generate(path, n, 500, seed=seed)
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _same_version(a, b) -> None:
    ma, mb = a.manifest(), b.manifest()
    assert ma.ledger.model_dump_json() == mb.ledger.model_dump_json()
    assert json.dumps([c.model_dump() for c in ma.checks], sort_keys=True, default=str) == \
        json.dumps([c.model_dump() for c in mb.checks], sort_keys=True, default=str)
    assert sorted(ma.tables) == sorted(mb.tables)
    for name, table in ma.tables.items():
        if name == "review_state":  # (stamps the build's time on newly routed pairs: its rows)
            assert a.read(name).drop("routed_at").equals(b.read(name).drop("routed_at"))
        else:
            assert [(p.path, p.sha256) for p in table.parts] == [(p.path, p.sha256) for p in mb.tables[name].parts], name


@pytest.mark.parametrize("seed", [35, 4, 11])
def test_a_child_without_its_union_writes_the_child_with_it(tmp_path, monkeypatch, seed):
    store, chain = _chain(tmp_path, "parts", seed, 4)
    with monkeypatch.context() as m:
        _with_union(m)
        ref, ref_chain = _chain(tmp_path, "union", seed, 4)
    assert [v for v, _ in chain] == [v for v, _ in ref_chain]
    dropped = 0
    for vid, parent in chain:
        h = store.get(vid)
        _same_version(h, ref.get(vid))
        if parent is None:
            continue
        union = h.manifest().lineage["union"]
        assert union["after_checks"] == "parent parts by pair"  # (the paths were taken)
        assert union["rows"] == "near the batch"
        assert "after_checks" not in ref.get(vid).manifest().lineage["union"]
        dropped += sum(h.manifest().ledger.judgments_dropped.values())
    assert dropped  # (drops of parent and batch rows were counted by the scan)


def test_a_child_reads_the_parent_rows_of_the_pairs_it_selects_only(tmp_path):
    """A batch of new prompts on a generated parent: the scan reads three columns of every part, select's rows are
    those of the recomputed pairs and of the pairs with a dropped judgment -- a few of the parent's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gen_judgments import generate

    generate(tmp_path / "parent.jsonl", 6000, 500, seed=5)
    rows = [json.loads(line) for line in generate_lines(tmp_path / "batch.jsonl", 300, seed=6)]
    batch = write_jsonl(tmp_path / "batch.jsonl", [{**r, "comparison_id": f"new-{r['comparison_id']}",
                                                    "prompt": f"{r['prompt']} (new)"} for r in rows])
    store = Store(tmp_path / "s")
    parent = curate([tmp_path / "parent.jsonl"], store, POLICY).version_id
    child = store.get(curate([batch], store, POLICY, parent=parent).version_id)
    union = child.manifest().lineage["union"]
    n_parent = store.get(parent).manifest().tables["judgments"].rows
    assert union["after_checks"] == "parent parts by pair"
    assert 0 < union["parent_rows_read"] < n_parent / 5, (union, n_parent)
    assert union["rows"] == "near the batch" and union["parent_rows_held"] < n_parent / 5, (union, n_parent)
    assert child.manifest().lineage["consensus"]["pairs_recomputed"] < child.manifest().ledger.pairs / 5


def test_a_child_with_reviews_of_parent_pairs_is_the_child_with_its_union(tmp_path, monkeypatch):
    """Reviews of the parent's pairs (decisive, a tie, texts that differ from the pair's, an unknown pair): the
    review rows and the pairs they name are among the rows the child holds; the same version as with every row."""
    from test_review_loop import TOPICS, _base_rows, _review

    base = write_jsonl(tmp_path / "base.jsonl", _base_rows())

    def child(name: str):
        store = Store(tmp_path / name)
        v1 = curate([base], store, POLICY).version_id
        pairs = {r["prompt_text"].split("about ")[1].rstrip("."): r for r in store.get(v1).read("pairs").iter_rows(named=True)}
        P = [pairs[t] for t in TOPICS]
        rows = [_review(P[0], "a", "r-0"), _review(P[1], "a", "r-1a"), _review(P[1], "b", "r-1b", who="rev-11"),
                _review(P[2], "a", "r-2", response_b="Another text altogether."),
                {**_review(P[3], "a", "r-3"), "review_of": "p-nowhere"}]
        batch = write_jsonl(tmp_path / "reviews.jsonl", rows)
        return store, curate([batch], store, POLICY, parent=v1).version_id

    store, vid = child("parts")
    with monkeypatch.context() as m:
        _with_union(m)
        ref, ref_vid = child("union")
    assert vid == ref_vid
    h = store.get(vid)
    _same_version(h, ref.get(vid))
    union = h.manifest().lineage["union"]
    # (the reviewed pairs' rows: the review rows name them, as their pairs)
    assert union["rows"] == "near the batch" and union["parent_row_passes"] >= 2 and union["parent_rows_held"] >= 8
    assert h.manifest().ledger.reviews.resolved >= 1


@pytest.mark.slow
def test_a_childs_passes_on_a_two_worker_local_cluster_write_the_same_version(tmp_path, monkeypatch):
    """The scan and the reads by pair as tasks on 2 worker processes, reading the parent's parts
    themselves: the same bytes as in process."""
    store, chain = _chain(tmp_path, "here", 35, 3)
    monkeypatch.setenv("PREFPIPE_DASK", "local")
    there, there_chain = _chain(tmp_path, "there", 35, 3)
    assert [v for v, _ in chain] == [v for v, _ in there_chain]
    for vid, _ in chain:
        _same_version(store.get(vid), there.get(vid))
    assert not (there.root / ".work").exists() or not any((there.root / ".work").iterdir())  # (its states: removed)


def test_the_scan_of_parts_is_the_scan_of_their_rows_together():
    """Drops, reasons, kept annotators, changed and flagged pairs of rows split into parts, placed, equal one scan."""
    rows = pl.DataFrame({"comparison_id": [f"c{i}" for i in range(12)],
                         "pair_id": [f"p{i % 5}" for i in range(12)],
                         "annotator_id": [f"a{i % 3}" for i in range(12)]})
    flags = pl.DataFrame({"subject_kind": ["judgment", "judgment", "annotator", "judgment", "pair"],
                          "subject_id": ["c1", "c1", "a2", "c7", "p3"],
                          "check": ["duplicates", "pair_id_conflict", "reliability", "routing", "routing"],
                          "reason": ["exact_duplicate", "pair_id_conflict", "low_reliability", "ambiguous", "too_easy"],
                          "detail": [None] * 5, "severity": ["warn"] * 5})
    changed = pr.changed_subjects(flags.filter(pl.col("subject_id") != "a2"), flags)
    assert changed.rows() == [("annotator", "a2")]
    cfg = resolve_policy(POLICY).select
    assert isinstance(cfg, SelectConfig)
    keys = pr.scan_keys(flags, changed, cfg)
    whole = pr.scan_frame(rows, keys)
    parts = [pr.scan_frame(rows.slice(0, 5), keys), pr.scan_frame(rows.slice(5), keys)]
    placed = pl.concat([parts[0]["dropped"], parts[1]["dropped"].with_columns(pl.col(pr.ROW) + 5)])
    assert placed.equals(whole["dropped"])
    # c1: its judgment-level reason (a pair_id conflict first); a2's rows: the annotator's
    assert dict(whole["dropped"].select("comparison_id", "_drop").iter_rows()) == \
        {"c1": "pair_id_conflict", "c2": "low_reliability", "c5": "low_reliability", "c8": "low_reliability",
         "c11": "low_reliability"}
    assert sorted(pl.concat([p["annotators"]["annotator_id"] for p in parts]).unique()) == ["a0", "a1"]
    assert whole["hit"]["pair_id"].to_list() == sorted({f"p{i % 5}" for i in (2, 5, 8, 11)})
    assert whole["flagged"]["comparison_id"].to_list() == ["c1", "c7"]


def test_a_damaged_parent_part_fails_the_child_as_a_damaged_version_and_writes_nothing(tmp_path):
    """A parent part whose bytes are not its manifest's: the task that reads it says so, and the child fails with the
    store's integrity error (the CLI's exit 2), not a task to retry; no version is written."""
    from conftest import canonical

    from pipeline.store import IntegrityError

    store = Store(tmp_path / "s")
    parent = store.get(curate([write_jsonl(tmp_path / "a.jsonl", [canonical(i) for i in range(6)])], store,
                              POLICY).version_id)
    part = parent.path / parent.manifest().tables["state/judgment_rows"].parts[0].path
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.unlink()  # (a part may be a hard link to the store's object: replaced, not written through)
    part.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 differs from the manifest"):
        curate([write_jsonl(tmp_path / "b.jsonl", [canonical(i, comparison_id=f"n-{i}") for i in range(3)])], store,
               POLICY, parent=parent.version_id)
    assert [v.name for v in (store.root / "versions").iterdir()] == [parent.version_id]
