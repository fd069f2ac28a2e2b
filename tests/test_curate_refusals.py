"""`prefpipe curate` refuses what it must not answer with a version: inputs without one valid judgment
(every row quarantined), and a re-run over a version that is there but damaged.  Both exit 2, nothing written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import canonical, write_jsonl
from typer.testing import CliRunner

from flows.cli import app
from pipeline.store import Store

runner = CliRunner()


def run(*args: str | Path, code: int):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    return res


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` but the lock files, with (size, mtime_ns): equal snapshots = nothing written."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != ".locks"}


def leftovers(store: Path) -> list[str]:
    """What a refused curate could have left: versions, work or staging directories."""
    return [p.relative_to(store).as_posix() for d in ("versions", ".work", ".staging") if (store / d).is_dir()
            for p in (store / d).iterdir()]


@pytest.fixture
def bad_batch(tmp_path) -> Path:
    """Three rows, each quarantined for its label."""
    return write_jsonl(tmp_path / "bad.jsonl", [canonical(i, label="zzz") for i in range(3)])


# ---------------------------------------------------------------- no valid judgment
@pytest.mark.parametrize("build", [[], ["--one-process"]], ids=["partitioned", "one-process"])
def test_a_batch_without_a_valid_row_is_refused_with_the_ledger_and_its_reasons(tmp_path, bad_batch, build):
    """It wrote an empty version (splits 0/0/0, every check "pass") and exited 0."""
    store = tmp_path / "s"
    res = run("curate", bad_batch, "--store", store, *build, code=2)
    assert res.stdout == "" and leftovers(store) == []
    assert f"{bad_batch}: no valid judgment to curate" in res.stderr and "nothing written" in res.stderr
    assert "rows in 3 = valid 0 + quarantined 3" in res.stderr  # the ledger, as validate prints it
    assert f"{bad_batch}:1  invalid_value  line 1: field 'label'" in res.stderr and f"{bad_batch}:3" in res.stderr
    quarantined = run("validate", bad_batch, code=1).stdout  # the same lines as validate's
    assert f"{bad_batch}:2  invalid_value  line 2: field 'label'" in quarantined


def test_json_gives_the_failure_document_with_the_first_quarantined_row(tmp_path, bad_batch):
    store = tmp_path / "s"
    res = run("curate", bad_batch, "--store", store, "--json", code=2)
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 2 and "no valid judgment" in doc["error"]
    assert (doc["file"], doc["line"], doc["field"]) == (str(bad_batch), 1, "label")
    assert doc["ledger"]["rows_in"] == doc["ledger"]["quarantined"] == 3 and doc["ledger"]["judgments"] == 0
    assert [e["line"] for e in doc["errors"]] == [1, 2, 3] and doc["errors"][0]["reason"] == "invalid_value"
    assert leftovers(store) == []


def test_a_child_whose_batch_has_no_valid_row_is_refused_and_the_parent_untouched(tmp_path, bad_batch):
    store = tmp_path / "s"
    good = write_jsonl(tmp_path / "good.jsonl", [canonical(i) for i in range(3)])
    parent = run("curate", good, "--store", store, code=0).stdout.strip().splitlines()[-1]
    before = snapshot(store)
    res = run("curate", bad_batch, "--store", store, "--parent", "latest", code=2)
    assert "no valid judgment" in res.stderr and "rows in 3 = valid 0 + quarantined 3" in res.stderr
    assert snapshot(store) == before and Store(store).list_ids() == [parent]
    assert Store(store).get(parent).verify() == []


def test_a_child_whose_rows_are_all_in_its_parent_is_still_a_version(tmp_path):
    """Valid rows whose judgments are all dropped (already in the parent) are not bad input: the child is written,
    its ledger saying where the rows went."""
    store = tmp_path / "s"
    good = write_jsonl(tmp_path / "good.jsonl", [canonical(i) for i in range(3)])
    run("curate", good, "--store", store, code=0)
    res = run("curate", good, "--store", store, "--parent", "latest", code=0)
    assert "dropped 3 {'already_in_parent': 3}" in res.stdout


@pytest.mark.slow
def test_the_curate_flow_fails_with_the_reason_and_writes_nothing(tmp_path, bad_batch):
    import flows  # noqa: F401  (sets the temporary-server defaults before prefect is imported)
    from flows.flows import curate_batch
    from pipeline.curate import NoValidJudgments

    store = tmp_path / "s"
    with pytest.raises(NoValidJudgments, match=r"(?s)no valid judgment.*bad\.jsonl:1  invalid_value"):
        curate_batch(files=[str(bad_batch)], store=str(store))
    assert Store(store).list_ids() == []
    parent = curate_batch(files=[str(write_jsonl(tmp_path / "good.jsonl", [canonical(i) for i in range(3)]))],
                          store=str(store))
    with pytest.raises(NoValidJudgments, match="rows in 3 = valid 0 \\+ quarantined 3"):  # a child: the same
        curate_batch(files=[str(bad_batch)], store=str(store), parent=parent)
    assert Store(store).list_ids() == [parent]


# ---------------------------------------------------------------- a re-run over a damaged version
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, str]:
    """A store with one certified (or rejected: three judgments are too few) version, its batch, its id."""
    root = tmp_path_factory.mktemp("built")
    batch = write_jsonl(root / "b.jsonl", [canonical(i) for i in range(3)])
    vid = run("curate", batch, "--store", root / "s", code=0).stdout.strip().splitlines()[-1]
    run("certify", vid, "--store", root / "s", "--no-expectations", code=3)
    return root / "s", batch, vid


def _flip_a_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))  # (in place: the store's object of this part, the same inode, changes too)


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.unlink()  # (a new file: the object stays whole)
    p.write_bytes(data[: len(data) // 2])


def _reindent(p: Path) -> None:
    p.write_text(json.dumps(json.loads(p.read_text()), indent=1))  # the same content, other bytes than certified


DAMAGE = {  # what is done, to which file (relative to the version), what the message names
    "part edited": (_flip_a_byte, "train", "sha256 differs from the manifest"),
    "part truncated": (_truncate, "test", "bytes, the manifest says"),
    "part missing": (Path.unlink, "validation", "missing"),
    "manifest truncated": (_truncate, "manifest.json", "damaged manifest"),
    "manifest edited": (_reindent, "manifest.json", "not the manifest its certification bound"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_rerun_over_a_damaged_version_is_exit_2_naming_the_file(built, tmp_path, kind):
    """It said "already exists (nothing written)" and exited 0."""
    pristine, batch, vid = built
    store = tmp_path / "s"
    shutil.copytree(pristine, store)
    damage, target, said = DAMAGE[kind]
    h = Store(store).get(vid)
    path = h.path / "manifest.json" if target == "manifest.json" else h.split_files(target)[0]
    damage(path)
    before = snapshot(store)
    res = run("curate", batch, "--store", store, code=2)
    assert f"version {vid} is in the store ({h.path}) but damaged" in res.stderr and said in res.stderr
    assert (path.name if target == "manifest.json" else path.relative_to(h.path).as_posix()) in res.stderr
    assert f"prefpipe gc --delete {vid} --apply" in res.stderr and res.stdout == ""
    assert snapshot(store) == before  # nothing written over it
    doc = json.loads(run("curate", batch, "--store", store, "--json", code=2).stdout)
    assert doc["exit_code"] == 2 and doc["file"] == str(h.path) and said in doc["error"]
    # what it says to do works: the version is built anew
    run("gc", "--store", store, "--delete", vid, "--apply", code=0)
    assert run("curate", batch, "--store", store, code=0).stdout.strip().splitlines()[-1] == vid
    assert Store(store).get(vid).verify() == []


def test_a_rerun_over_an_intact_certified_version_hashes_none_of_its_parts(built, monkeypatch):
    """An intact version keeps the idempotent answer; the parts its certification hashed and that still have
    that inode, size and mtime are taken as checked (certify's rule), not hashed again."""
    import pipeline.store as store_mod

    store, batch, vid = built
    hashed: list[Path] = []
    real = store_mod.sha256_file

    def counting(p):
        hashed.append(Path(p))
        return real(p)

    monkeypatch.setattr(store_mod, "sha256_file", counting)
    res = run("curate", batch, "--store", store, code=0)
    assert "already exists (nothing written)" in res.stderr
    assert [p for p in hashed if (store / "versions") in p.parents] == []


@pytest.mark.slow
def test_the_curate_flow_over_a_damaged_version_fails_naming_the_file(built, tmp_path):
    import flows  # noqa: F401  (sets the temporary-server defaults before prefect is imported)
    from flows.flows import curate_batch
    from pipeline.store import DamagedVersion

    pristine, batch, vid = built
    store = tmp_path / "s"
    shutil.copytree(pristine, store)
    part = Store(store).get(vid).split_files("train")[0]
    _truncate(part)
    with pytest.raises(DamagedVersion, match=f"{vid} is in the store .* but damaged: data/train/{part.name}"):
        curate_batch(files=[str(batch)], store=str(store))


# ---------------------------------------------------------------- a part edited and the manifest rewritten to match
def rewrite_to_match(h, part: Path) -> None:
    """Swap chosen/rejected in ``part`` and write the new part into the manifest (:func:`rewrite_part`)."""
    import polars as pl

    df = pl.read_parquet(part)
    rewrite_part(h, part, df.with_columns(chosen=df["rejected"], rejected=df["chosen"]))


def rewrite_part(h, part: Path, frame) -> None:
    """Replace ``part`` by ``frame`` (a new file: the store's object stays whole) and write its sha256 and size, and
    its table's, into the manifest: the files verify against the manifest."""
    from pipeline.store import sha256_file, table_sha256
    from schemas.manifest import SplitInfo

    part.unlink()
    frame.write_parquet(part)
    doc = json.loads((h.path / "manifest.json").read_text())
    for key, table in doc["tables"].items():
        for p in table["parts"]:
            if h.path / p["path"] == part:
                p.update(sha256=sha256_file(part), bytes=part.stat().st_size)
                table["sha256"] = table_sha256([SplitInfo(**q) for q in table["parts"]])
                if key.startswith("data/"):
                    doc["splits"][key.removeprefix("data/")]["sha256"] = table["sha256"]
    (h.path / "manifest.json").write_text(json.dumps(doc, indent=2))


@pytest.fixture(scope="module")
def uncertified(tmp_path_factory) -> tuple[Path, Path, str]:
    """A store with one version nobody certified, its batch, its id."""
    root = tmp_path_factory.mktemp("uncertified")
    batch = write_jsonl(root / "b.jsonl", [canonical(i) for i in range(3)])
    vid = run("curate", batch, "--store", root / "s", code=0).stdout.strip().splitlines()[-1]
    return root / "s", batch, vid


def test_a_rerun_over_an_uncertified_version_whose_manifest_was_rewritten_is_exit_2(uncertified, tmp_path):
    """It said "already exists (nothing written)" and exited 0: the files match the rewritten manifest, the id is
    derived from the inputs, and no certificate bound the manifest."""
    pristine, batch, vid = uncertified
    store = tmp_path / "s"
    shutil.copytree(pristine, store)
    h = Store(store).get(vid)
    rewrite_to_match(h, h.split_files("train")[0])
    assert Store(store).get(vid).verify() == []
    before = snapshot(store)
    res = run("curate", batch, "--store", store, code=2)
    assert f"version {vid} is in the store ({h.path}) but damaged: {h.path / 'manifest.json'}: not the manifest the " \
           f"store published as {vid}" in res.stderr
    assert "rewritten after publication" in res.stderr and res.stdout == ""
    assert snapshot(store) == before  # nothing written over it
    doc = json.loads(run("curate", batch, "--store", store, "--json", code=2).stdout)
    assert doc["exit_code"] == 2 and doc["file"] == str(h.path) and "not the manifest the store published" in doc["error"]
    # what it says to do works: built anew, published again (the record keeps both publications)
    run("gc", "--store", store, "--delete", vid, "--apply", code=0)
    assert run("curate", batch, "--store", store, code=0).stdout.strip().splitlines()[-1] == vid
    assert len(Store(store).publications(vid)) == 2
    assert "already exists (nothing written)" in run("curate", batch, "--store", store, code=0).stderr


def test_a_rerun_over_a_version_from_before_publication_records_says_so(uncertified, tmp_path):
    """A store written before publication records: the re-run is answered as before (its files are checked against
    its manifest), and says that the manifest could not be compared with the one published."""
    pristine, batch, vid = uncertified
    store = tmp_path / "s"
    shutil.copytree(pristine, store)
    shutil.rmtree(store / ".index" / "published")
    res = run("curate", batch, "--store", store, code=0)
    assert "already exists (nothing written)" in res.stderr and f"note: the store has no publication record of {vid}" in res.stderr
    assert res.stdout.strip().splitlines()[-1] == vid


def rewritten_parent(uncertified, tmp_path):
    """A copy of the uncertified store whose version's train part was edited and its manifest rewritten to
    match, and a next batch: (store, the version's handle, its id, the batch)."""
    pristine, _, vid = uncertified
    store = tmp_path / "s"
    shutil.copytree(pristine, store)
    h = Store(store).get(vid)
    rewrite_to_match(h, h.split_files("train")[0])
    return store, h, vid, write_jsonl(tmp_path / "next.jsonl", [canonical(i) for i in range(3, 6)])


def test_a_child_of_a_version_whose_manifest_was_rewritten_is_refused(uncertified, tmp_path):
    """A child links its parent's parts and reads its rows against the parent's manifest: it took the edit in and the
    store published it as the child's own (whose manifest is then the published one)."""
    store, h, vid, batch = rewritten_parent(uncertified, tmp_path)
    before = snapshot(store)
    res = run("curate", batch, "--store", store, "--parent", vid, code=2)
    assert f"parent version {vid} is damaged: {h.path / 'manifest.json'}: not the manifest the store published" \
           in res.stderr and "nothing written" in res.stderr and res.stdout == ""
    assert snapshot(store) == before and Store(store).list_ids() == [vid]


def test_the_flows_child_build_refuses_a_parent_whose_manifest_was_rewritten(uncertified, tmp_path):
    """The curate flow builds a child with :func:`build_version` directly (its ingest done as tasks)."""
    from pipeline.checks import resolve_policy
    from pipeline.curate import CurateOptions, build_version, ingest_source
    from pipeline.store import DamagedVersion
    from schemas.policy import Policy

    store, h, vid, batch = rewritten_parent(uncertified, tmp_path)
    policy = resolve_policy(Policy())
    ingest = ingest_source([batch], CurateOptions(), policy)
    with pytest.raises(DamagedVersion, match=f"parent version {vid} is damaged: .*not the manifest the store published"):
        build_version(Store(store), "v-child", ingest, Store(store).get(vid), policy)
    assert Store(store).list_ids() == [vid]
