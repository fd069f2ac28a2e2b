"""Versions share content-addressed parts: a child stores only what changed; gc frees what nothing links."""
from __future__ import annotations

import json
import os
import shutil

import polars as pl

from conftest import ROOT
from typer.testing import CliRunner

from flows.cli import app
from pipeline.curate import curate
from pipeline.parts import object_path
from pipeline.store import Store
from schemas.policy import policy_from_dict

SAMPLES = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))
POLICY = policy_from_dict({"certify": {"require_expectations": False}})


def _inodes(h, name: str) -> set[int]:
    return {(h.path / p.path).stat().st_ino for p in h.table(name).parts}


def _lines(path, n: int | None, tag: str, tmp_path):
    """The first ``n`` parseable rows of a sample, their comparison ids made new."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # the samples' damaged lines
        if isinstance(r, dict):
            rows.append({**r, "comparison_id": f"{r.get('comparison_id')}-{tag}"})
    out = tmp_path / f"{tag}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return out


def test_child_links_its_parents_parts_and_writes_only_new_ones(tmp_path):
    st = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], st, POLICY).version_id
    small = _lines(SAMPLES[1], 60, "small", tmp_path)  # less than half of the parent's part: not merged into it
    v2 = curate([small], st, POLICY, parent=v1).version_id
    h1, h2 = st.get(v1), st.get(v2)
    for name in ("judgments", "quarantine"):  # tables that only grow: the parent's part is the child's first part
        assert _inodes(h1, name) <= _inodes(h2, name), name
        assert len(h2.table(name).parts) == len(h1.table(name).parts) + (name == "judgments")
    assert h2.read("judgments").height == h1.read("judgments").height + 60
    # every part is one object of the store, whichever version it belongs to
    for h in (h1, h2):
        for t in h.manifest().tables.values():
            for p in t.parts:
                assert os.path.samefile(h.path / p.path, object_path(st, p.sha256))
    # pair tables in generations; two small ones share the tail group's part, keyed by its first generation
    assert h2.read("state/generation_groups")["group"].to_list() == [v1, v1]
    gens = {p.path.split("part-")[1].removesuffix(".parquet") for p in h2.table("pairs").parts}
    assert gens == {v1}
    assert h2.read("pairs").filter(h2.read("pairs")["first_version"] == v1).height == h1.read("pairs").height


def test_small_generations_fill_a_tail_part_then_start_the_next(tmp_path, monkeypatch):
    """A chain of small batches adds a pair-table part every ~PART_PAIRS new pairs, not one per
    version: a generation joins its parent's last tail group while that holds at most PART_PAIRS
    pairs; a big one is a group (and buckets) of its own."""
    from pipeline import parts

    st = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], st, POLICY).version_id
    n1 = st.get(v1).read("pairs").height
    monkeypatch.setattr(parts, "PART_PAIRS", n1 + 10)  # the next batch does not fit into v1's group
    parent, ids = v1, [v1]
    for i, path in enumerate([*SAMPLES[1:], *SAMPLES[:1]]):
        parent = curate([_lines(path, None, f"b{i}", tmp_path)], st, POLICY, parent=parent).version_id
        ids.append(parent)
    h = st.get(parent)
    groups = h.read("state/generation_groups")
    assert groups["generation"].to_list() == ids
    # contiguous groups, each named after its first generation, none over PART_PAIRS with two or more generations
    firsts = groups.group_by("group", maintain_order=True).agg(first=pl.col("generation").first(),
                                                                n=pl.len(), pairs=pl.col("pairs").sum())
    assert firsts["group"].to_list() == firsts["first"].to_list()
    assert groups["group"].to_list() == sorted(groups["group"].to_list(), key=ids.index)
    assert firsts.filter((pl.col("n") > 1) & (pl.col("pairs") > n1 + 10)).height == 0
    # the pairs table has one part per group (plus buckets of big ones), and its rows are every pair once
    keys = {p.path.split("part-")[1].removesuffix(".parquet").split(".b")[0] for p in h.table("pairs").parts}
    assert keys == set(firsts["group"].to_list())
    assert len(h.table("pairs").parts) < len(ids)
    pairs = h.read("pairs")
    assert pairs["pair_id"].is_unique().all() and h.verify() == []


def test_same_content_is_stored_once(tmp_path):
    st = Store(tmp_path / "s")
    a = curate(SAMPLES[:1], st, POLICY).version_id
    # another policy that changes nothing the tables hold: a new version, the same parts
    b = curate(SAMPLES[:1], st, policy_from_dict({"certify": {"require_expectations": False, "min_pairs_per_locale": 3}})).version_id
    assert a != b
    ha, hb = st.get(a), st.get(b)
    assert _inodes(ha, "judgments") == _inodes(hb, "judgments") and _inodes(ha, "data/train") == _inodes(hb, "data/train")


def test_a_damaged_shared_part_is_not_linked_into_a_new_version(tmp_path):
    """A part edited in place damages the store's object too (one inode): a later build writing the
    same content must not link that object into its new version (publication trusts objects) -- it
    checks it, replaces it with its fresh copy, and the new version verifies; the damaged one stays
    damaged (found by its own verification)."""
    st = Store(tmp_path / "s")
    a = curate(SAMPLES[:1], st, POLICY).version_id
    part = st.get(a).manifest().tables["data/train"].parts[0]
    path = st.get(a).path / part.path
    with open(path, "r+b") as f:  # a byte flipped in place: same size, same inode
        f.seek(part.bytes // 2)
        byte = f.read(1)
        f.seek(part.bytes // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    b = curate(SAMPLES[:1], st, policy_from_dict({"certify": {"require_expectations": False, "min_pairs_per_locale": 3}})).version_id
    assert a != b
    assert st.get(b).verify() == []
    same = next(q for q in st.get(b).manifest().tables["data/train"].parts if q.sha256 == part.sha256)
    assert os.path.samefile(st.get(b).path / same.path, object_path(st, part.sha256))  # the fresh copy is the object now
    assert any(part.path in p for p in st.get(a).verify())


def test_a_truncated_shared_part_is_found_without_hashing(tmp_path):
    """The publication check skips hashing a store object, but never its size against the manifest."""
    st = Store(tmp_path / "s")
    a = curate(SAMPLES[:1], st, POLICY).version_id
    part = st.get(a).manifest().tables["data/train"].parts[0]
    os.truncate(st.get(a).path / part.path, part.bytes - 1)
    from pipeline.store import verify_files
    problems = verify_files(st.get(a).manifest(), st.get(a).path, objects=st.root / "objects")
    assert any(part.path in p and "bytes" in p for p in problems), problems


def test_a_copied_version_without_hard_links_still_verifies(tmp_path):
    st = Store(tmp_path / "s")
    vid = curate(SAMPLES[:1], st, POLICY).version_id
    other = Store(tmp_path / "copy")
    shutil.copytree(st.root / "versions", other.root / "versions")  # copies the bytes, no objects/
    assert other.get(vid).verify() == [] and other.get(vid).read_split("train").height > 0


def test_gc_dry_run_then_delete_a_version_keeps_shared_parts(tmp_path):
    st = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], st, POLICY).version_id
    v2 = curate([_lines(SAMPLES[1], 60, "small", tmp_path)], st, POLICY, parent=v1).version_id  # v1's parts stay shared
    runner = CliRunner()
    res = runner.invoke(app, ["gc", "--store", str(st.root), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["objects"] == 0  # nothing is garbage
    # a crash after an object was linked but before its version appeared leaves an unlinked object
    orphan = object_path(st, "ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"PAR1")
    res = runner.invoke(app, ["gc", "--store", str(st.root), "--delete", v1, "--json"])
    plan = json.loads(res.stdout)
    assert plan["applied"] is False and plan["versions"] == [v1] and plan["objects"] >= 1
    assert st.exists(v1) and orphan.exists()  # dry run: nothing removed
    shared = [object_path(st, p.sha256) for p in st.get(v1).table("judgments").parts]
    res = runner.invoke(app, ["gc", "--store", str(st.root), "--delete", v1, "--apply"])
    assert res.exit_code == 0, res.output
    assert not st.exists(v1) and not orphan.exists()
    assert all(p.exists() for p in shared)  # still linked by v2
    assert st.get(v2).verify() == [] and st.get(v2).read("judgments").height > 0
    assert list((st.root / "certifications").glob("*")) == []  # v1 had no record to keep aside


def test_gc_frees_the_parts_a_dead_writers_stage_held_in_one_run(tmp_path):
    """kill -9 of a curate after it linked parts into objects/ but before its rename: the stage holds
    the objects' only other link.  One gc lists the stage *and* those objects (dry run: nothing
    removed); one gc --apply removes both, so a second gc finds nothing."""
    st = Store(tmp_path / "s")
    vid = curate(SAMPLES[:1], st, POLICY).version_id
    stage = st.root / ".staging" / f"v-0123456789abcdef.{2**22 + 12345}.0123abcd"  # a pid above pid_max: dead
    (stage / "judgments").mkdir(parents=True)
    obj = object_path(st, "cd" * 32)
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(b"PAR1")
    os.link(obj, stage / "judgments" / "part-v-0123456789abcdef.parquet")
    runner = CliRunner()
    plan = json.loads(runner.invoke(app, ["gc", "--store", str(st.root), "--json"]).stdout)
    assert plan["staging"] == [stage.name] and plan["objects"] == 1 and plan["object_bytes"] == 4, plan
    assert obj.exists() and stage.is_dir()  # dry run
    res = runner.invoke(app, ["gc", "--store", str(st.root), "--apply"])
    assert res.exit_code == 0, res.output
    assert not stage.exists() and not obj.exists()
    plan = json.loads(runner.invoke(app, ["gc", "--store", str(st.root), "--json"]).stdout)
    assert plan["objects"] == 0 and plan["staging"] == [], plan
    assert st.get(vid).verify() == []


def test_appended_tables_stay_in_few_parts_in_arrival_order(tmp_path):
    """judgments and quarantine after N batches: the trailing parts merged while the newest holds at
    least half the rows of the one before (O(log N) parts), the rows in arrival order, a part of the
    parent linked unless merged."""
    st = Store(tmp_path / "s")
    parent, sizes = None, []
    expected: list[str] = []
    for i in range(9):
        path = _lines(SAMPLES[i % len(SAMPLES)], 40 + 10 * (i % 3), f"c{i}", tmp_path)
        vid = curate([path], st, POLICY, parent=parent).version_id
        h = st.get(vid)
        expected += [json.loads(x)["comparison_id"] for x in path.read_text().splitlines()]
        rows = [p.rows for p in h.table("judgments").parts]
        sizes.append(len(rows))
        assert all(2 * b < a for a, b in zip(rows, rows[1:])), rows  # each part under half the one before
        assert h.read("judgments")["comparison_id"].to_list() == [c for c in expected if c in
                                                                  set(h.read("judgments")["comparison_id"])]
        if parent is not None:  # the parent's parts not merged are linked as they are
            before = {p.sha256 for p in st.get(parent).table("judgments").parts}
            kept = [p for p in h.table("judgments").parts[:-1]]
            assert {p.sha256 for p in kept} <= before
        assert h.verify() == []
        parent = vid
    assert max(sizes) <= 4 and sizes[-1] < 9


def test_a_big_generation_gets_at_most_max_buckets_and_a_parents_count_is_kept(tmp_path, monkeypatch):
    """A new generation's bucket count: the power of two that keeps its buckets at PART_PAIRS pairs, at most
    MAX_BUCKETS (past it the buckets grow); a generation the parent wrote keeps the count its part names carry
    -- a parent written with more buckets than today's cap (older code) is not re-bucketed by its child."""
    from pipeline import parts

    assert parts.bucket_counts(None, "pairs", {"g": parts.PART_PAIRS * 3}) == {"g": 4}
    assert parts.bucket_counts(None, "pairs", {"g": parts.PART_PAIRS * parts.MAX_BUCKETS * 10}) == {"g": parts.MAX_BUCKETS}
    monkeypatch.setattr(parts, "PART_PAIRS", 2)
    v1 = curate([_lines(SAMPLES[0], 40, "one", tmp_path)], Store(tmp_path / "s"), POLICY)
    h = v1.handle
    names = [p.path for p in h.table("pairs").parts]
    k = int(names[0].split("of")[-1].removesuffix(".parquet"))  # part-<gen>.b<i>of<k>.parquet
    assert k > 2 and all(n.endswith(f"of{k:04d}.parquet") for n in names)  # the first generation in k buckets
    monkeypatch.setattr(parts, "MAX_BUCKETS", 2)  # today's cap below the parent's count
    got = parts.bucket_counts(h, "pairs", {v1.version_id: 0, "new-gen": 1_000})
    assert got == {v1.version_id: k, "new-gen": 2}


def test_write_many_lists_the_parts_in_the_order_given(tmp_path):
    """Parts written two at a time are listed in the order they were given (a table kept in arrival order),
    frames and functions that make them alike; each part is the frame it was given."""
    from pipeline.parts import TableWriter

    store = Store(tmp_path / "s")
    w = TableWriter(store, tmp_path / "stage", "t", arrival_order=True)
    frames = [pl.DataFrame({"x": list(range(i * 1000, i * 1000 + 500 - 40 * i))}) for i in range(9)]
    w.write_many([(f"k{i}", f if i % 2 else (lambda f=f: f)) for i, f in enumerate(frames)])
    assert [p.path for p in w.parts] == [f"t/part-k{i}.parquet" for i in range(9)]
    for p, f in zip(w.parts, frames, strict=True):
        assert pl.read_parquet(tmp_path / "stage" / p.path).equals(f)
        assert p.rows == f.height


def test_gc_deleting_a_certified_version_keeps_its_whole_certification_aside(tmp_path):
    """The record and its evidence (part facts, Great Expectations results) go aside together: the folder stayed under
    the live name, where the same batch curated again (the same id) would have found the deleted version's files."""
    from pipeline.certify import certify_version

    st = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], st, POLICY).version_id
    certify_version(st, v1, POLICY, run_gx=False)
    evidence = st.root / "certifications" / v1
    assert evidence.is_dir() and any(evidence.iterdir())
    res = CliRunner().invoke(app, ["gc", "--store", str(st.root), "--delete", v1, "--apply"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (st.root / "certifications").iterdir())
    assert len(names) == 2 and names[0].startswith(f"{v1}.deleted-") and names[1].startswith(f"{v1}.json.deleted-"), names
    assert names[0].split("deleted-")[1] == names[1].split("deleted-")[1]
    assert curate(SAMPLES[:1], st, POLICY).version_id == v1  # built again: certified from scratch
    assert certify_version(st, v1, POLICY, run_gx=False).verdict == "certified"


def test_gc_never_deletes_the_parent_a_running_curate_builds_on(tmp_path, monkeypatch):
    """`prefpipe gc --delete P --apply` while a child of P is being built: P stays (the child reads
    and links P's parts), the gc says it kept it, and the child is published whole."""
    import pipeline.curate as cur
    from pipeline.parts import PartReuse, collect_garbage, plan_gc

    st = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], st, POLICY).version_id
    seen = {}
    original = PartReuse.of.__func__

    def of_after_gc(cls, parent):  # a gc run in another process, in the middle of the child's build
        plan = plan_gc(st, delete_versions=[v1])
        seen["planned"], seen["in_use"] = list(plan.versions), list(getattr(plan, "in_use", []))
        seen["removed"] = list(plan.versions)
        collect_garbage(st, plan)
        return original(cls, parent)

    monkeypatch.setattr(cur.PartReuse, "of", classmethod(of_after_gc))
    v2 = curate([_lines(SAMPLES[1], 60, "small", tmp_path)], st, POLICY, parent=v1).version_id
    assert seen == {"planned": [], "in_use": [v1], "removed": []}, seen
    assert st.exists(v1) and st.get(v1).verify() == []
    assert st.get(v2).verify() == [] and st.get(v2).read("judgments").height == st.get(v1).read("judgments").height + 60
    # once the child is built, the parent is no longer in use: gc removes it and the child stays whole
    plan = plan_gc(st, delete_versions=[v1])
    assert plan.versions == [v1] and plan.in_use == []
    assert collect_garbage(st, plan).versions == [v1]
    assert not st.exists(v1) and st.get(v2).verify() == []


def test_gc_apply_reports_what_it_removed_not_what_it_planned(tmp_path):
    """A version taken into use between the plan and --apply stays, and is not counted as removed."""
    from pipeline.parts import collect_garbage, plan_gc

    st = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], st, POLICY).version_id
    plan = plan_gc(st, delete_versions=[v1])
    assert plan.versions == [v1] and plan.objects  # its parts: linked by nothing else
    with st.in_use(v1):
        done = collect_garbage(st, plan)
    assert done.versions == [] and done.in_use == [v1] and done.objects == [] and done.bytes == 0
    assert st.exists(v1) and st.get(v1).verify() == []
    with st.in_use(v1):  # the command says so too: nothing removed, the version listed as in use
        res = CliRunner().invoke(app, ["gc", "--store", str(st.root), "--delete", v1, "--apply", "--json"])
    out = json.loads(res.stdout)
    assert res.exit_code == 0 and out["versions"] == [] and out["in_use"] == [v1] and out["objects"] == 0, res.output
    assert st.exists(v1) and st.get(v1).verify() == []


def test_an_empty_routed_table_has_the_columns_of_a_full_one(tmp_path):
    """`routed` is "pairs routed away from training with their judgments" (docs/outputs): a version
    that routed nothing writes one empty part with the same columns and types, `judgments` included,
    so one query over several versions' routed tables (or a reader selecting `judgments`) works."""
    import pyarrow.parquet as pq

    st = Store(tmp_path / "s")
    full = st.get(curate(SAMPLES[:1], st, POLICY).version_id)  # routes ties, both_bad, escalations
    trl = ROOT / "data" / "samples" / "extra" / "trl_conversational.jsonl"
    from pipeline.curate import CurateOptions

    empty = st.get(curate([trl], st, POLICY, options=CurateOptions(fmt="trl")).version_id)
    assert full.read("routed").height > 0 and empty.read("routed").height == 0
    assert empty.read("routed").schema == full.read("routed").schema
    schemas = {pq.read_schema(h.path / p.path).remove_metadata() for h in (full, empty) for p in h.table("routed").parts}
    assert len(schemas) == 1


def test_a_part_whose_object_gc_removes_while_it_is_shared_becomes_the_object(tmp_path, monkeypatch):
    """A curate writes a part whose object exists unlinked (a deleted version's); `gc --apply` removes
    that object between the curate's check of its bytes and its link: the fresh part becomes the
    object (the curate stopped with FileNotFoundError)."""
    import hashlib

    import pipeline.parts as parts

    st = Store(tmp_path / "s")
    st.ensure()
    data = b"PAR1 the same bytes PAR1"
    sha = hashlib.sha256(data).hexdigest()
    obj = object_path(st, sha)
    obj.parent.mkdir(parents=True)
    obj.write_bytes(data)  # an object nothing links (nlink 1): what gc removes
    part = tmp_path / "stage" / "part-x.parquet"
    part.parent.mkdir()
    part.write_bytes(data)
    checked = parts._object_intact

    def intact_then_collected(o, size, s):
        ok = checked(o, size, s)
        o.unlink()  # gc's unlink, right after the check
        return ok

    monkeypatch.setattr(parts, "_object_intact", intact_then_collected)
    parts.share(st, part, sha)
    assert obj.exists() and os.path.samefile(part, obj) and part.read_bytes() == data


def test_versions_leaves_out_a_version_gc_removed_during_the_listing(tmp_path, monkeypatch):
    """`prefpipe versions` while `gc --apply` removes a version: the version is gone, not DAMAGED
    (it listed it as damaged: "cannot read the manifest (No such file or directory)")."""
    from pipeline.parts import collect_garbage, plan_gc

    st = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], st, POLICY).version_id
    v2 = curate([_lines(SAMPLES[1], 60, "small", tmp_path)], st, POLICY, parent=v1).version_id
    listed = Store.list_versions

    def listed_then_collected(self):
        entries = listed(self)
        collect_garbage(self, plan_gc(self, delete_versions=[v1]))  # another process's gc, right after the listing
        return entries

    monkeypatch.setattr(Store, "list_versions", listed_then_collected)
    res = CliRunner().invoke(app, ["versions", "--store", str(st.root), "--json", "--fast"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["version_id"] for r in rows] == [v2] and rows[0]["damaged"] is None
