"""Store: atomic, immutable, idempotent versions; crash and concurrency behaviour; integrity checks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT

from pipeline.store import IntegrityError, Store, VersionNotFound, write_parquet
from schemas.manifest import Certification, GateResult, IngestLedger, Ledger, Manifest, SourceInfo


def _manifest(vid: str, splits, files=None) -> Manifest:
    return Manifest(
        version_id=vid, created_at=datetime.now(UTC), code_version="test", policy_hash="p", policy={},
        ledger=Ledger(rows_in=2, quarantined=0, judgments_valid=2, pairs=2, pairs_kept=2,
                      splits={k: v.rows for k, v in splits.items()}),
        ingest=IngestLedger(rows_in=2, rows_valid=2, judgments=2), sources=[], splits=splits, files=files or {}, checks=[],
    )


def _builder(vid: str, calls: list | None = None):
    def build(stage: Path) -> Manifest:
        if calls is not None:
            calls.append(stage)
        df = pl.DataFrame({"pair_id": ["x", "y"], "weight": [1.0, 0.5]})
        info = write_parquet(df, stage / "data" / "train.parquet")
        info = info.model_copy(update={"path": "data/train.parquet"})
        return _manifest(vid, {"train": info})

    return build


def test_write_then_idempotent(tmp_path):
    st = Store(tmp_path / "s")
    calls: list = []
    assert st.write_version("v-1", _builder("v-1", calls)) == ("v-1", True)
    assert st.write_version("v-1", _builder("v-1", calls)) == ("v-1", False)
    assert len(calls) == 1  # the second call did no work
    h = st.get("v-1")
    assert h.verify() == [] and h.manifest().ledger.pairs_kept == 2
    assert st.list_ids() == ["v-1"] and st.resolve("latest").version_id == "v-1" and st.resolve("v-").version_id == "v-1"
    assert not any((tmp_path / "s" / ".staging").iterdir())


def test_failed_build_leaves_nothing(tmp_path):
    st = Store(tmp_path / "s")

    def boom(stage: Path):
        (stage / "half.parquet").write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        st.write_version("v-2", boom)
    assert not st.exists("v-2") and st.list_ids() == []
    assert not any((tmp_path / "s" / ".staging").iterdir())
    with pytest.raises(VersionNotFound):
        st.get("v-2")


def test_tampered_file_detected(tmp_path):
    st = Store(tmp_path / "s")
    st.write_version("v-3", _builder("v-3"))
    h = st.get("v-3")
    p = h.split_path("train")
    pl.DataFrame({"pair_id": ["x", "y"], "weight": [1.0, 1.0]}).write_parquet(p)
    assert h.verify() == ["data/train.parquet: sha256 differs from the manifest (file changed after the version was written)"]
    p.unlink()
    assert h.verify() == ["data/train.parquet: missing"]


def test_manifest_mismatch_refused(tmp_path):
    st = Store(tmp_path / "s")

    def lying(stage: Path):
        m = _builder("v-4")(stage)
        (stage / "data" / "train.parquet").write_bytes(b"changed after hashing")
        return m

    with pytest.raises(IntegrityError):
        st.write_version("v-4", lying)
    assert not st.exists("v-4")


_WRITER = textwrap.dedent("""
    import sys, time, os
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_store import _builder
    from pipeline.store import Store
    st = Store(sys.argv[1])
    mode = sys.argv[2]
    def build(stage):
        m = _builder("v-c")(stage)
        open(os.path.join(sys.argv[1], "built." + str(os.getpid())), "w").close()
        time.sleep(30 if mode == "hang" else 1.0)
        return m
    print(st.write_version("v-c", build))
""")


def _spawn(store: Path, mode: str) -> subprocess.Popen:
    code = _WRITER.format(root=str(ROOT), tests=str(ROOT / "tests"))
    return subprocess.Popen([sys.executable, "-c", code, str(store), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_minus_9_mid_write_leaves_no_visible_version(tmp_path):
    store = tmp_path / "s"
    proc = _spawn(store, "hang")
    deadline = time.time() + 30
    while not list(store.glob("built.*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(store.glob("built.*")), proc.stderr.read() if proc.poll() is not None else "writer never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    st = Store(store)
    assert st.list_ids() == [] and not st.exists("v-c")
    assert any((store / ".staging").iterdir())  # the half-written stage is there, but invisible
    assert st.write_version("v-c", _builder("v-c")) == ("v-c", True)  # the next run succeeds
    assert st.get("v-c").verify() == []
    assert not any((store / ".staging").iterdir())  # and swept the dead writer's stage


def test_two_concurrent_writers_same_version(tmp_path):
    store = tmp_path / "s"
    procs = [_spawn(store, "slow") for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = sorted(o[0].strip() for o in outs)
    assert results == ["('v-c', False)", "('v-c', True)"]
    assert len(list(store.glob("built.*"))) == 1  # the loser waited on the lock and did no work
    assert Store(store).get("v-c").verify() == []


def test_certification_history_is_kept(tmp_path):
    st = Store(tmp_path / "s")
    st.write_version("v-5", _builder("v-5"))
    before = {p: p.stat().st_mtime_ns for p in st.get("v-5").path.rglob("*")}
    for verdict, ph in (("rejected", "p1"), ("certified", "p2")):
        st.add_certification(Certification(version_id="v-5", verdict=verdict, policy_hash=ph, policy={},
                                           gates=[GateResult(name="g", value=1, threshold=0, passed=verdict == "certified")],
                                           certified_at=datetime.now(UTC), code_version="t"))
    hist = st.certification_history("v-5")
    assert [h["verdict"] for h in hist] == ["rejected", "certified"]
    assert st.latest_certification("v-5")["policy_hash"] == "p2"
    assert {p: p.stat().st_mtime_ns for p in st.get("v-5").path.rglob("*")} == before  # version untouched


def _chain_builder(vid: str, parent: str | None, shas: list[str], new: list[str]):
    """A version whose manifest lists ``shas`` as its sources, ``new`` of them its own (lineage)."""
    def src(sha: str) -> dict:
        return {"path": f"{sha[:4]}.jsonl", "sha256": sha, "bytes": 1, "format": "jsonl", "rows_in": 1,
                "rows_valid": 1, "quarantined": 0, "judgments": 1}

    def build(stage: Path) -> Manifest:
        m = _builder(vid)(stage)
        return m.model_copy(update={"parent_version": parent, "sources": [SourceInfo(**src(s)) for s in shas],
                                    "lineage": {"parent_version": parent, "new_sources": [src(s) for s in new]}})

    return build


def test_listing_parses_each_manifest_once_and_notices_every_change(tmp_path, monkeypatch):
    """The listing (the scheduled inbox lists the store per batch) reads a manifest only when it is
    new or changed (a writer adds its version to the cache); a removed version leaves the listing, a damaged cache is rebuilt, and the
    processed batches are the same as from reading every manifest, also after a parent is gone."""
    import shutil

    from pipeline import store as store_mod
    from pipeline.inbox import processed_hashes

    st = Store(tmp_path / "s")
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    st.write_version("v-1", _chain_builder("v-1", None, [a], [a]))
    time.sleep(0.01)
    st.write_version("v-2", _chain_builder("v-2", "v-1", [a, b], [b]))
    time.sleep(0.01)
    st.write_version("v-3", _chain_builder("v-3", "v-2", [a, b, c], [c]))
    parsed: list[str] = []
    real = store_mod._entry_of
    monkeypatch.setattr(store_mod, "_entry_of", lambda vid, m: (parsed.append(vid), real(vid, m))[1])
    assert st.list_ids() == ["v-1", "v-2", "v-3"] and parsed == []  # the writer put them in the cache
    (st.root / store_mod.INDEX).unlink()
    assert st.list_ids() == ["v-1", "v-2", "v-3"] and sorted(parsed) == ["v-1", "v-2", "v-3"]
    parsed.clear()
    assert st.list_ids() == ["v-1", "v-2", "v-3"] and processed_hashes(st) == {a, b, c}
    assert parsed == []  # from the cache: one stat per version
    # a manifest replaced (another inode, size or mtime): parsed again
    mf = st.versions_dir / "v-1" / "manifest.json"
    os.utime(mf, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert st.list_ids() == ["v-1", "v-2", "v-3"] and parsed == ["v-1"]
    mf = st.versions_dir / "v-2" / "manifest.json"
    mf.write_bytes(mf.read_bytes().replace(b'"v-2"', b'"v-9"', 1))
    assert [e.version_id for e in st.list_versions() if e.damaged] == ["v-2"]
    # the parent of v-3 unreadable: v-3 counts every source its manifest lists
    assert processed_hashes(st) == {a, b, c}
    shutil.rmtree(st.versions_dir / "v-2")
    shutil.rmtree(st.versions_dir / "v-1")
    assert st.list_ids() == ["v-3"] and processed_hashes(st) == {a, b, c}
    # a damaged or foreign cache is ignored and rebuilt
    for junk in (b"\xff not json", b"[1, 2]", b'{"format": 1, "versions": {"v-3": {"stat": 1}}}'):
        (st.root / store_mod.INDEX).write_bytes(junk)
        parsed.clear()
        assert st.list_ids() == ["v-3"] and parsed == ["v-3"]
        assert processed_hashes(st) == {a, b, c}


def _table_version(tmp_path, frames: dict[str, pl.DataFrame]):
    """A version holding one table ``t`` whose parts are ``frames`` (key -> rows)."""
    from pipeline.parts import TableWriter

    st = Store(tmp_path / "s")

    def build(stage: Path) -> Manifest:
        w = TableWriter(st, stage, "t")
        for key, frame in frames.items():
            w.write(key, frame)
        m = _builder("v-t")(stage)
        m.tables["t"] = w.info()
        return m

    st.write_version("v-t", build)
    return st.get("v-t")


def test_a_table_read_in_one_scan_equals_its_parts_read_one_by_one(tmp_path, monkeypatch):
    """Parts are parsed together (one scan per group of verified bytes); parts whose schemas
    differ (a column missing, another type) fall back to a read per part: the rows are those of
    the parts in order either way, with columns and a filter too."""
    import pipeline.store as store_mod

    same = {f"k{i:02d}": pl.DataFrame({"pair_id": [f"p{i}-{j}" for j in range(i + 1)], "x": [float(j) for j in range(i + 1)],
                                       "tags": [[str(j)] * (j % 3) for j in range(i + 1)]}) for i in range(12)}
    differ = {**same, "k05": same["k05"].drop("tags"), "k07": same["k07"].with_columns(pl.col("x").cast(pl.Float32))}
    for n, frames in enumerate((same, differ)):
        h = _table_version(tmp_path / str(n), frames)
        whole = pl.concat(list(frames.values()), how="diagonal_relaxed")
        for group_bytes in (1, 1 << 30):  # every part alone; all parts in one scan
            monkeypatch.setattr(store_mod, "SCAN_GROUP_BYTES", group_bytes)
            assert h.read("t").equals(whole)
            assert h.read("t", columns=["x", "pair_id"]).equals(whole.select("x", "pair_id"))
            where = pl.col("x") >= 3
            assert h.read("t", columns=["pair_id"], where=where).equals(whole.filter(where).select("pair_id"))


def test_a_part_that_hashes_right_but_is_not_parquet_is_named(tmp_path, monkeypatch):
    """A part listed with its true sha256 that does not parse: DamagedVersion naming that part
    (also when the other parts are read in the same scan)."""
    from pipeline.store import DamagedVersion

    frames = {f"k{i}": pl.DataFrame({"a": [i]}) for i in range(4)}
    h = _table_version(tmp_path, frames)
    m = h.manifest()
    bad = m.tables["t"].parts[2]
    p = h.path / bad.path
    p.unlink()  # a hard link to the shared object: replaced, not written through
    p.write_bytes(b"not parquet at all")
    import hashlib

    fixed = bad.model_copy(update={"sha256": hashlib.sha256(b"not parquet at all").hexdigest()})
    m.tables["t"].parts[2] = fixed
    monkeypatch.setattr(type(h), "manifest", lambda self: m)
    with pytest.raises(DamagedVersion, match="part-k2"):
        h.read("t")


def test_a_version_is_synced_once_as_a_whole_before_it_appears(tmp_path, monkeypatch):
    """Inside a build the parts skip their own fsync; the stage is synced as a whole (syncfs) before
    the rename makes it visible; a Parquet file written anywhere else is fsynced as before."""
    import pipeline.store as store_mod

    synced_fds: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced_fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    trees: list[tuple[Path, bool, bool]] = []
    real_tree = store_mod.sync_tree

    def sync_tree(root):
        trees.append((root, (root / "data" / "train.parquet").is_file(), (st.versions_dir / "v-1").exists()))
        return real_tree(root)

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    monkeypatch.setattr(store_mod, "sync_tree", sync_tree)
    st = Store(tmp_path / "store")
    st.write_version("v-1", _builder("v-1"))
    assert not any(p.endswith("train.parquet") for p in synced_fds), synced_fds  # (the part: synced with the stage)
    assert len(trees) == 1 and trees[0][1] and not trees[0][2]  # the whole stage, before the rename
    assert st.get("v-1").verify() == []
    outside = tmp_path / "elsewhere" / "t.parquet"
    write_parquet(pl.DataFrame({"x": [1]}), outside)
    assert synced_fds[-1] == str(outside)


def test_sync_tree_without_syncfs_fsyncs_every_file_and_folder(tmp_path, monkeypatch):
    import pipeline.store as store_mod

    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("x", "a/y", "a/b/z"):
        (tmp_path / rel).write_bytes(b"1")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    monkeypatch.setattr(store_mod.sys, "platform", "darwin")  # (no syncfs: the walk)
    store_mod.sync_tree(tmp_path)
    want = {str(tmp_path / r) for r in ("x", "a/y", "a/b/z", "", "a", "a/b")}
    assert {s.rstrip("/") for s in synced} == {w.rstrip("/") for w in want}


def _stage(st: Store, name: str, *, age: float = 0.0) -> Path:
    d = st.root / ".staging" / name
    (d / "data").mkdir(parents=True)
    (d / "data" / "part.parquet").write_bytes(b"x")
    if age:
        os.utime(d, (time.time() - age, time.time() - age))
    return d


def test_a_live_writers_stage_survives_sweeps_whatever_its_pid_or_age(tmp_path):
    """A stage is its writer's while the writer holds its ``.alive`` lock: a pid in the name says nothing on another
    host sharing the store, and a build may run for longer than any age rule (both swept such a stage before)."""
    from pipeline.store import StageMark

    st = Store(tmp_path / "s").ensure()
    other_host = st.root / ".staging" / f"v-0123456789abcdef.{2**22 + 12345}.0123abcd"  # (that pid is not alive here)
    mark = StageMark(other_host)  # (a lock from another open file: as another process's, on any host)
    _stage(st, other_host.name, age=7 * 3600)
    st.write_version("v-a", _builder("v-a"))  # (a writer sweeps the staging area first)
    assert (other_host / "data" / "part.parquet").is_file()
    assert st.sweep_staging(max_age=0) == 0
    from pipeline.parts import plan_gc

    assert other_host not in plan_gc(st).staging and other_host.with_name(other_host.name + ".alive") not in plan_gc(st).staging
    mark.release()  # the writer ends (or dies: the kernel lets go of its lock)
    assert st.sweep_staging() == 1 and not other_host.exists()
    assert not any((st.root / ".staging").iterdir())  # its mark went with it


def test_marks_of_dead_writers_are_swept_and_finished_writers_leave_none(tmp_path):
    from pipeline.parts import collect_garbage, plan_gc
    from pipeline.store import ALIVE, StageMark

    st = Store(tmp_path / "s").ensure()
    st.write_version("v-a", _builder("v-a"))
    assert not any((st.root / ".staging").iterdir())  # (the version's stage renamed away, its mark let go and removed)
    dead = st.root / ".staging" / f"inputs.{os.getpid()}.deadbeef"  # a live pid: only its free lock says it is dead
    StageMark(dead).release()
    (dead.with_name(dead.name + ALIVE)).touch()  # (a mark left free: its writer died)
    _stage(st, dead.name)
    lone = st.root / ".staging" / f"partitions.{os.getpid()}.0badf00d{ALIVE}"  # a mark whose directory is gone
    lone.touch()
    plan = plan_gc(st)
    assert sorted(p.name for p in plan.staging) == sorted([dead.name, lone.name])
    collect_garbage(st, plan)
    assert not any((st.root / ".staging").iterdir())


def test_a_stage_without_a_mark_is_judged_by_its_pid_and_age_as_before(tmp_path):
    st = Store(tmp_path / "s").ensure()
    old = _stage(st, f"v-0123456789abcdef.{os.getpid()}.00000001", age=7 * 3600)  # a live pid, 7 h old
    young = _stage(st, f"v-0123456789abcdef.{os.getpid()}.00000002")
    gone = _stage(st, f"v-0123456789abcdef.{2**22 + 12345}.00000003")
    assert st.sweep_staging() == 2
    assert young.is_dir() and not old.exists() and not gone.exists()


# ---------------------------------------------------------------- the publication record
def _rewrite_consistently(h) -> None:
    """Edit the train split and write its new sha256 and size into the manifest: the files verify against the
    manifest, the version id (derived from the inputs) is the same."""
    from pipeline.store import atomic_write_json, file_info

    p = h.split_path("train")
    p.unlink()
    pl.DataFrame({"pair_id": ["x", "y"], "weight": [1.0, 1.0]}).write_parquet(p)
    m = h.manifest()
    m = m.model_copy(update={"splits": {"train": file_info(p, "data/train.parquet", rows=2)}})
    atomic_write_json(h.path / "manifest.json", m.model_dump(mode="json"))


def test_the_store_records_what_it_published_and_knows_a_manifest_rewritten_after(tmp_path):
    from pipeline.store import sha256_file

    st = Store(tmp_path / "s")
    st.write_version("v-p", _builder("v-p"))
    h = st.get("v-p")
    hist = st.publications("v-p")
    assert [r["manifest_sha256"] for r in hist] == [sha256_file(h.path / "manifest.json")] and hist[0]["published_at"]
    assert st.publication(h).ok is True
    _rewrite_consistently(h)
    h = Store(st.root).get("v-p")
    assert h.verify() == []  # the files match the rewritten manifest: only the record tells
    pub = st.publication(h)
    assert pub.ok is False and f"{h.path / 'manifest.json'}: not the manifest the store published as v-p" in pub.reason
    assert f"published {hist[0]['manifest_sha256'][:12]}" in pub.reason and "rewritten after publication" in pub.reason
    # a record that cannot be read vouches for nothing
    st.publication_path("v-p").write_text("{")
    pub = st.publication(h)
    assert pub.ok is False and "damaged publication record" in pub.reason
    # a version from before publication records: nothing to compare with, said so
    st.publication_path("v-p").unlink()
    pub = st.publication(h)
    assert pub.ok is None and "no publication record of v-p" in pub.reason


def test_a_version_is_never_visible_without_its_publication_record(tmp_path, monkeypatch):
    import errno
    import shutil

    st = Store(tmp_path / "s")

    def full(self, version_id, sha):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.publication_path(version_id)))

    with monkeypatch.context() as mp:
        mp.setattr(Store, "_record_publication", full)
        with pytest.raises(OSError, match="No space left"):
            st.write_version("v-r", _builder("v-r"))
    assert not st.exists("v-r") and not any((st.root / ".staging").iterdir())
    # deleted (gc --delete) and built anew: the record keeps the first publication and appends the second
    st.write_version("v-r", _builder("v-r"))
    first = st.publications("v-r")
    shutil.rmtree(st.versions_dir / "v-r")
    st.write_version("v-r", _builder("v-r"))
    hist = st.publications("v-r")
    assert len(hist) == 2 and hist[0] == first[0] and st.publication(st.get("v-r")).ok is True
    # a damaged record is kept aside and a new history starts with the next publication
    shutil.rmtree(st.versions_dir / "v-r")
    st.publication_path("v-r").write_text("not json")
    st.write_version("v-r", _builder("v-r"))
    assert len(st.publications("v-r")) == 1 and st.publication(st.get("v-r")).ok is True
    assert [p.read_text() for p in st.publication_path("v-r").parent.glob("v-r.json.damaged-*")] == ["not json"]
