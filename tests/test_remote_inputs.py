"""Inputs named by URL (pipeline/remote.py): any fsspec filesystem, copied into the store and hashed
on the way; the same bytes give the same version as a local path, and their rows name the URL."""
from __future__ import annotations

import uuid

import fsspec
import pytest
from conftest import ROOT
from typer.testing import CliRunner

from flows.cli import app
from pipeline.store import Store

SAMPLES = ROOT / "data" / "samples"
B1, B2 = SAMPLES / "batch-2026-11-02.jsonl", SAMPLES / "batch-2026-11-09.jsonl"
runner = CliRunner()


@pytest.fixture
def bucket():
    """A bucket of fsspec's in-memory filesystem (this process's: the CLI runs in it) with two batches."""
    fs = fsspec.filesystem("memory")
    root = f"memory://bucket-{uuid.uuid4().hex[:8]}"
    for b in (B1, B2):
        with fs.open(f"{root}/{b.name}", "wb") as fh:
            fh.write(b.read_bytes())
    yield root
    fs.rm(root.removeprefix("memory://"), recursive=True)


def _curate(*args) -> str:
    res = runner.invoke(app, ["curate", *map(str, args)])
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()[-1]


def test_a_url_input_gives_the_local_files_version_and_its_rows_name_the_url(bucket, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    v1 = _curate(B1, "--store", local)
    url1 = f"{bucket}/{B1.name}"
    assert _curate(url1, "--store", remote) == v1  # the same bytes: the same version (the id is the content's)
    h = Store(remote).get(v1)
    assert [s.path for s in h.manifest().sources] == [url1]
    assert h.read("judgments", columns=["source_file"])["source_file"].unique().to_list() == [url1]
    want = Store(local).get(v1).read("judgments", columns=["comparison_id", "pair_id", "label"])
    assert h.read("judgments", columns=["comparison_id", "pair_id", "label"]).equals(want)
    # a child whose batch is a URL: its parent's child from the local file
    c_local = _curate(B2, "--store", local, "--parent", v1)
    assert _curate(f"{bucket}/{B2.name}", "--store", remote, "--parent", v1) == c_local
    assert Store(remote).get(c_local).verify() == []
    # the copies are gone once curate ends
    staging = remote / ".staging"
    assert not staging.exists() or not [p for p in staging.iterdir() if p.name.startswith("inputs.")]


@pytest.mark.parametrize("name, why", [("missing.jsonl", "no such file"), ("..", "cannot name a local file")])
def test_an_unreadable_url_exits_2_naming_it_and_writes_nothing(bucket, tmp_path, name, why):
    url = f"{bucket}/{name}"
    res = runner.invoke(app, ["curate", url, "--store", str(tmp_path / "s")])
    assert res.exit_code == 2, res.output
    assert url in res.output and why in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s" / "versions").exists() or not any((tmp_path / "s" / "versions").iterdir())


def test_a_url_of_an_unknown_protocol_exits_2(tmp_path):
    res = runner.invoke(app, ["curate", "nosuchfs://bucket/b.jsonl", "--store", str(tmp_path / "s")])
    assert res.exit_code == 2 and "nosuchfs://bucket/b.jsonl" in res.output and "cannot open this URL" in res.output


def test_a_damaged_url_input_is_named_by_its_url(bucket, tmp_path):
    """Damage found while reading the copy (here a gzip stream cut short) names the URL, not the copy."""
    import gzip

    data = gzip.compress(B1.read_bytes())
    url = f"{bucket}/cut.jsonl.gz"
    with fsspec.open(url, "wb") as fh:
        fh.write(data[: len(data) // 2])
    res = runner.invoke(app, ["curate", url, "--store", str(tmp_path / "s")])
    assert res.exit_code == 2, res.output
    assert url in res.output and ".staging" not in res.output


def test_a_local_path_that_looks_like_no_url_is_read_as_before(tmp_path):
    """A path is a URL only with ``scheme://``; ``a:b.jsonl`` or a relative path is a file."""
    from pipeline.remote import is_url

    assert is_url("s3://b/k.jsonl") and is_url("https://h/x.jsonl") and is_url("memory://x/y")
    assert not is_url("a:b.jsonl") and not is_url("data/x.jsonl") and not is_url(str(tmp_path / "x.jsonl"))


def test_validate_reads_a_url_and_names_it(bucket, tmp_path):
    import json

    url = f"{bucket}/{B1.name}"
    res = runner.invoke(app, ["validate", url, "--json"])
    assert res.exit_code in (0, 1), res.output  # (the sample plants bad rows: 1)
    out = json.loads(res.stdout)
    assert [s["path"] for s in out["sources"]] == [url] and out["ledger"]["rows_in"] > 0
    assert all(e["source_file"] == url for e in out["errors"])
    local = json.loads(runner.invoke(app, ["validate", str(B1), "--json"]).stdout)
    assert out["ledger"] == local["ledger"] and out["sources"][0]["sha256"] == local["sources"][0]["sha256"]
    res = runner.invoke(app, ["validate", f"{bucket}/nope.jsonl"])
    assert res.exit_code == 2 and f"{bucket}/nope.jsonl" in res.output and "no such file" in res.output


def test_gc_removes_a_dead_processs_copies_and_keeps_a_live_ones(tmp_path):
    """A killed curate leaves its URL copies under .staging/inputs.<pid>.<id>: gc removes them once that process is
    gone, never while it runs."""
    import os
    import subprocess
    import sys

    from pipeline.parts import collect_garbage, plan_gc

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store = Store(tmp_path / "s")
    store.ensure()
    copies = {}
    for who, pid in (("dead", int(dead.stdout)), ("live", os.getpid())):
        d = store.root / ".staging" / f"inputs.{pid}.{who}"
        (d / ("0" * 64)).mkdir(parents=True)
        (d / ("0" * 64) / "b.jsonl").write_text("{}\n")
        copies[who] = d
    plan = plan_gc(store)
    assert copies["dead"] in plan.staging and copies["live"] not in plan.staging
    collect_garbage(store, plan)
    assert not copies["dead"].exists() and copies["live"].exists()
