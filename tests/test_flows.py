"""Prefect orchestration: the inbox as the schedule runs it, artifacts in the API, failures, Dask."""
from __future__ import annotations

import json
from typing import Any

import asyncio
import shutil
from pathlib import Path

import pytest
from conftest import ROOT

import flows  # noqa: F401  (sets the temporary-server defaults before prefect is imported)
from pipeline.store import Store

SAMPLES = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))
pytestmark = pytest.mark.slow


def _drop(inbox: Path, src: Path, *, done: bool = True) -> Path:
    dst = inbox / src.name
    shutil.copyfile(src, dst)
    if done:
        (inbox / (src.name + ".done")).touch()
    return dst


async def _artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        arts = await client.read_artifacts(limit=200)
    return {a.key for a in arts if a.key}


def test_inbox_three_batches_chain_and_never_reprocess(tmp_path):
    from flows.flows import process_inbox

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    st = Store(store)
    _drop(inbox, SAMPLES[0])
    _drop(inbox, SAMPLES[1], done=False)  # still being copied: no .done marker yet
    out1 = process_inbox(inbox=str(inbox), store=str(store))
    assert [o["batch"] for o in out1] == [SAMPLES[0].name]
    (inbox / (SAMPLES[1].name + ".done")).touch()
    out2 = process_inbox(inbox=str(inbox), store=str(store))
    _drop(inbox, SAMPLES[2])
    out3 = process_inbox(inbox=str(inbox), store=str(store))
    assert [o["batch"] for o in out2 + out3] == [SAMPLES[1].name, SAMPLES[2].name]

    ids = st.list_ids()
    assert len(ids) == 3
    parents = [st.get(v).manifest().parent_version for v in ids]
    assert parents == [None, ids[0], ids[1]]  # chained: each batch is a child of the latest version
    last = st.get(ids[-1]).manifest()
    assert last.ledger.rows_in == sum(sum(1 for line in p.open() if line.strip()) for p in SAMPLES)
    assert {s.sha256 for s in last.sources} >= {o["sha256"] for o in out1 + out2 + out3}
    for v in ids:
        rec = st.latest_certification(v)
        assert rec is not None and rec["verdict"] in ("certified", "rejected")

    assert process_inbox(inbox=str(inbox), store=str(store)) == []  # fourth run: nothing new
    assert st.list_ids() == ids

    keys = asyncio.run(_artifact_keys())
    for v in ids:
        k = v.lower()
        assert {f"report-{k}", f"ledger-{k}", f"checks-{k}", f"annotators-{k}", f"certification-{k}"} <= keys


def test_failed_batch_is_visible_and_does_not_block(tmp_path):
    from flows.flows import process_inbox

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    bad = inbox / "a-broken.jsonl"
    bad.write_bytes("".join(f'{{"comparison_id": "caf\xe9 {i}"}}\n' for i in range(5)).encode("latin-1"))
    (inbox / "a-broken.jsonl.done").touch()
    _drop(inbox, SAMPLES[0])
    with pytest.raises(RuntimeError, match="a-broken.jsonl.*not UTF-8") as err:
        process_inbox(inbox=str(inbox), store=str(store))
    assert "transient" not in str(err.value)  # the input's own fault: final at once
    st = Store(store)
    assert len(st.list_ids()) == 1  # the good batch after it was processed
    [rec] = _failure_records(store)
    assert rec["file"].endswith("a-broken.jsonl") and (rec["transient"], rec["attempt"]) == (False, 1)
    assert process_inbox(inbox=str(inbox), store=str(store)) == []  # not retried, nothing re-done


def _disk_full(monkeypatch, times: int | None) -> None:
    """The store's version writes fail with ENOSPC (the first ``times`` of them; None: all)."""
    import errno

    real, calls = Store.write_version, []

    def write_version(self, version_id, build):
        calls.append(version_id)
        if times is None or len(calls) <= times:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root / ".staging"))
        return real(self, version_id, build)

    monkeypatch.setattr(Store, "write_version", write_version)


async def _latest_artifact_rows(key: str) -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        arts = [a for a in await client.read_artifacts(limit=200) if a.key == key]
    latest = max(arts, key=lambda a: a.created)
    return json.loads(latest.data) if isinstance(latest.data, str) else latest.data


def _failure_records(store: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (store / "inbox" / "failed.jsonl").read_text().splitlines()]


def test_a_transient_failure_is_tried_again_on_the_next_tick(tmp_path, monkeypatch):
    """Disk full while the version is written: not the batch's fault.  The failure is recorded as transient
    (try 1), the run fails visibly saying so, and the next tick curates the batch (try 2, in the artifact)."""
    from flows.flows import process_inbox

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    _drop(inbox, SAMPLES[0])
    _disk_full(monkeypatch, times=1)
    with pytest.raises(RuntimeError, match=r"No space left on device.*transient, try 1 of 3: tried again on the next tick"):
        process_inbox(inbox=str(inbox), store=str(store))
    assert Store(store).list_ids() == []
    [rec] = _failure_records(store)
    assert (rec["transient"], rec["attempt"]) == (True, 1) and "No space left" in rec["reason"]
    [out] = process_inbox(inbox=str(inbox), store=str(store))
    assert out["attempt"] == 2 and out["version"] == Store(store).list_ids()[0] and "error" not in out
    rows = asyncio.run(_latest_artifact_rows("inbox-last-run"))
    assert [(r["batch"], r["attempt"]) for r in rows] == [(SAMPLES[0].name, "2")]
    assert process_inbox(inbox=str(inbox), store=str(store)) == []


def test_transient_failures_end_after_the_last_try_until_the_content_changes(tmp_path, monkeypatch):
    from flows.flows import process_inbox
    from pipeline.inbox import TRANSIENT_ATTEMPTS

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    batch = _drop(inbox, SAMPLES[0])
    _disk_full(monkeypatch, times=None)
    for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
        last = attempt == TRANSIENT_ATTEMPTS
        with pytest.raises(RuntimeError, match=f"transient, try {attempt} of {TRANSIENT_ATTEMPTS}: "
                                               f"{'not tried again' if last else 'tried again'}"):
            process_inbox(inbox=str(inbox), store=str(store))
    assert [(r["transient"], r["attempt"]) for r in _failure_records(store)] == \
        [(True, n) for n in range(1, TRANSIENT_ATTEMPTS + 1)]
    monkeypatch.undo()  # room on the disk again: the failure stays final for this content
    assert process_inbox(inbox=str(inbox), store=str(store)) == []
    with batch.open("a") as fh:  # new content: a new batch
        fh.write(SAMPLES[1].read_text())
    [out] = process_inbox(inbox=str(inbox), store=str(store))
    assert "error" not in out and "attempt" not in out and len(Store(store).list_ids()) == 1


def _eio_in_certify(monkeypatch, times: int | None) -> list[str]:
    """The certification step fails with EIO (the first ``times`` calls; None: all), after the version is
    written: the versions it was asked to certify."""
    import errno

    from pipeline import certify

    real, calls = certify.certify_version, []

    def certify_version(store, ref, *args, **kwargs):
        calls.append(ref)
        if times is None or len(calls) <= times:
            raise OSError(errno.EIO, "Input/output error", str(store.certification_path(ref)))
        return real(store, ref, *args, **kwargs)

    monkeypatch.setattr(certify, "certify_version", certify_version)  # (certify_task imports it when it runs)
    return calls


def _version_files(st: Store, vid: str) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(st.get(vid).path.rglob("*"))}


def test_a_transient_failure_after_the_version_is_written_is_finished_on_the_next_ticks(tmp_path, monkeypatch):
    """The version is written, then the report fails (tick 1), then the certification (tick 2): each a transient
    try of the batch, recorded with the version.  The ticks after do not curate the batch again (its version is
    never rebuilt nor written over): they verify that version and finish it -- tick 3 certifies it, says so in the
    outcome and the inbox-last-run artifact; tick 4 has nothing to do."""
    import errno

    import flows.flows as flows_mod
    from flows.flows import process_inbox

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    _drop(inbox, SAMPLES[0])
    real_publish, published = flows_mod.publish_version_artifacts, []

    def publish(store_dir, version_id):
        published.append(version_id)
        if len(published) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", "report.html")
        return real_publish(store_dir, version_id)

    monkeypatch.setattr(flows_mod, "publish_version_artifacts", publish)
    certified = _eio_in_certify(monkeypatch, times=1)
    with pytest.raises(RuntimeError, match=r"No space left on device.*transient, try 1 of 3: tried again on the next "
                                           r"tick") as first:
        process_inbox(inbox=str(inbox), store=str(store))
    st = Store(store)
    [vid] = st.list_ids()
    files = _version_files(st, vid)
    assert certified == [] and st.latest_certification(vid) is None
    with pytest.raises(RuntimeError, match=r"Input/output error.*transient, try 2 of 3: tried again on the next tick") as second:
        process_inbox(inbox=str(inbox), store=str(store))
    for err in (first, second):  # the messages name the version left behind
        assert str(err.value).endswith(f"; version {vid} is written, not certified)")
    assert certified == [vid] and published == [vid, vid] and st.latest_certification(vid) is None
    assert [(r["transient"], r["attempt"], r["version"]) for r in _failure_records(store)] == [(True, 1, vid), (True, 2, vid)]
    [out] = process_inbox(inbox=str(inbox), store=str(store))
    assert "error" not in out and (out["attempt"], out["version"], out["verdict"]) == (3, vid, "certified")
    assert "earlier try" in out["resumed"]
    assert st.list_ids() == [vid] and _version_files(st, vid) == files  # not rebuilt, not written over
    assert st.latest_certification(vid)["verdict"] == "certified" and certified == [vid, vid]
    rows = asyncio.run(_latest_artifact_rows("inbox-last-run"))
    assert [(r["batch"], r["attempt"], r["version"], r["verdict"]) for r in rows] == [(SAMPLES[0].name, "3", vid, "certified")]
    assert "earlier try" in rows[0]["resumed"]
    assert process_inbox(inbox=str(inbox), store=str(store)) == [] and len(_failure_records(store)) == 2


def test_a_certification_failing_every_try_is_final_and_its_version_stays_uncertified(tmp_path, monkeypatch):
    from flows.flows import process_inbox
    from pipeline.inbox import TRANSIENT_ATTEMPTS

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    _drop(inbox, SAMPLES[0])
    certified = _eio_in_certify(monkeypatch, times=None)
    messages = []
    for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
        last = attempt == TRANSIENT_ATTEMPTS
        with pytest.raises(RuntimeError, match=f"transient, try {attempt} of {TRANSIENT_ATTEMPTS}: "
                                               f"{'not tried again' if last else 'tried again on the next tick'}") as err:
            process_inbox(inbox=str(inbox), store=str(store))
        messages.append(str(err.value))
    st = Store(store)
    [vid] = st.list_ids()  # one version, certified on no try
    assert messages[-1].endswith(f"; version {vid} is written, not certified, and stays so)")
    assert certified == [vid] * TRANSIENT_ATTEMPTS and st.latest_certification(vid) is None
    assert [(r["transient"], r["attempt"], r["version"]) for r in _failure_records(store)] == \
        [(True, n, vid) for n in range(1, TRANSIENT_ATTEMPTS + 1)]
    rows = asyncio.run(_latest_artifact_rows("inbox-last-run"))
    assert [(r["attempt"], r["version"], r["retry"]) for r in rows] == [(str(TRANSIENT_ATTEMPTS), vid, "False")]
    monkeypatch.undo()  # the disk is fine again: the failure stays final for this content
    assert process_inbox(inbox=str(inbox), store=str(store)) == [] and st.latest_certification(vid) is None


def test_an_unfinished_version_damaged_since_is_not_certified_and_once_removed_the_batch_is_curated_anew(tmp_path, monkeypatch):
    """The certification failed after the version was written; then a part of the version changed on disk.  The
    next tick verifies the version before finishing it: damaged -- a failure of its own (final while that damaged
    version is there, naming the file and the command that removes it), never certified, never written over.  The
    documented remedy works: once `prefpipe gc --delete V --apply` removed it, the next tick curates the batch anew
    (the same version, built again, intact, certified) -- no hand edit of failed.jsonl."""
    import re

    from typer.testing import CliRunner

    from flows.cli import app
    from flows.flows import process_inbox

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    _drop(inbox, SAMPLES[0])
    certified = _eio_in_certify(monkeypatch, times=1)
    with pytest.raises(RuntimeError, match="tried again on the next tick"):
        process_inbox(inbox=str(inbox), store=str(store))
    st = Store(store)
    [vid] = st.list_ids()
    [part] = st.get(vid).path.glob("data/train/*.parquet")
    with part.open("ab") as fh:
        fh.write(b"garbage")
    remedy = f"Remove it (`prefpipe gc --store {store} --delete {vid} --apply`): the next tick curates {SAMPLES[0].name} anew"
    with pytest.raises(RuntimeError, match=f"{vid} is in the store .* but damaged: .*{part.name}.*" + re.escape(remedy)) as err:
        process_inbox(inbox=str(inbox), store=str(store))
    assert "stays so" not in str(err.value)
    assert certified == [vid] and st.latest_certification(vid) is None and part.read_bytes().endswith(b"garbage")
    assert [(r["transient"], r["attempt"], r["version"]) for r in _failure_records(store)] == [(True, 1, vid), (False, 2, vid)]
    assert process_inbox(inbox=str(inbox), store=str(store)) == [] and st.list_ids() == [vid]  # final while it is there
    monkeypatch.undo()
    res = CliRunner().invoke(app, ["gc", "--store", str(store), "--delete", vid, "--apply"])  # the remedy, as said
    assert res.exit_code == 0, res.output
    assert st.list_ids() == []
    [out] = process_inbox(inbox=str(inbox), store=str(store))
    assert "error" not in out and "resumed" not in out and (out["version"], out["verdict"]) == (vid, "certified")
    assert st.get(vid).verify() == [] and st.latest_certification(vid)["verdict"] == "certified"
    assert process_inbox(inbox=str(inbox), store=str(store)) == [] and len(_failure_records(store)) == 2


TINY = "tiny-llama:layers=1,hidden=32,heads=2"


def _train_failing(monkeypatch, fail: list[BaseException | None]) -> list[str]:
    """The inbox's training (trainer.train.train_version, as train_on_version imports it) raises ``fail[i]`` on
    its i-th call (None, or past the list: trains for real, 2 steps of the tiny model): the versions it was given."""
    import trainer.train as train_mod

    real, calls = train_mod.train_version, []

    def train_version(store, version, **kwargs):
        calls.append(version)
        err = fail[len(calls) - 1] if len(calls) <= len(fail) else None
        if err is not None:
            raise err
        return real(store, version, **{**kwargs, "max_steps": 2, "threads": 1, "bootstrap_resamples": 10})

    monkeypatch.setattr(train_mod, "train_version", train_version)
    return calls


def test_a_training_failure_after_certification_is_tried_again_until_a_finished_run(tmp_path, monkeypatch):
    """With the policy's certify.train_after_certify, the training run after the certification fails with an
    operating-system error: the batch is certified but not trained, and the failure is a transient try of its
    training -- the next tick trains that version again (nothing curated, nothing certified again) and the tick
    after recognises the finished run (nothing to do).  (A training failure of another kind is final:
    tests/test_inbox.py.)"""
    import errno

    from flows.flows import process_inbox

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    policy = tmp_path / "policy.toml"
    policy.write_text("[certify]\ntrain_after_certify = true\n")
    _drop(inbox, SAMPLES[0])
    calls = _train_failing(monkeypatch, [OSError(errno.EIO, "Input/output error", str(store / "runs"))])
    run = dict(inbox=str(inbox), store=str(store), policy_path=str(policy), train_model=TINY)
    with pytest.raises(RuntimeError, match=r"Input/output error.*transient, try 1 of 3: tried again on the next tick") as err:
        process_inbox(**run)
    st = Store(store)
    [vid] = st.list_ids()
    assert str(err.value).endswith(f"; version {vid} is certified, not trained yet)")
    assert calls == [vid] and st.latest_certification(vid)["verdict"] == "certified"
    cert_records = len(st.certification_history(vid))
    assert [(r["transient"], r["attempt"], r["version"], r["kind"]) for r in _failure_records(store)] == [(True, 1, vid, "train")]
    [out] = process_inbox(**run)  # the next tick trains it, and only that
    assert "error" not in out and (out["version"], out["verdict"], out["attempt"]) == (vid, "certified", 2)
    assert Path(out["run"]).parent == store / "runs" and json.loads((Path(out["run"]) / "run.json").read_text())["status"] == "finished"
    assert calls == [vid, vid] and st.list_ids() == [vid] and len(st.certification_history(vid)) == cert_records
    assert process_inbox(**run) == [] and calls == [vid, vid]  # a finished run of it: done
    rows = asyncio.run(_latest_artifact_rows("inbox-last-run"))
    assert [(r["batch"], r["attempt"], r["version"]) for r in rows] == [(SAMPLES[0].name, "2", vid)] and rows[0]["run"] == out["run"]


def test_a_failure_that_cannot_be_recorded_does_not_stop_the_run_nor_count_as_a_try(tmp_path, monkeypatch):
    """The certification of the first batch fails (EIO), and so does writing its failure record (disk full): the
    run goes on to the next batch, says the failure was not recorded (outcome, artifact), and the next tick
    finishes the first batch's version as the same try (it counted for nothing)."""
    import errno

    from flows.flows import process_inbox
    from pipeline import inbox as inbox_logic

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    _drop(inbox, SAMPLES[0])
    _drop(inbox, SAMPLES[1])
    _eio_in_certify(monkeypatch, times=1)

    def record_failure(st, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(st.root / "inbox" / "failed.jsonl"))

    monkeypatch.setattr(inbox_logic, "record_failure", record_failure)
    with pytest.raises(RuntimeError, match=r"Input/output error.*could not be recorded in .*failed.jsonl: .*No space "
                                           r"left on device; this try is not counted"):
        process_inbox(inbox=str(inbox), store=str(store))
    st = Store(store)
    first, second = st.list_ids()
    assert st.latest_certification(first) is None and st.latest_certification(second) is not None  # (either verdict)
    rows = asyncio.run(_latest_artifact_rows("inbox-last-run"))
    assert [r["batch"] for r in rows] == [SAMPLES[0].name, SAMPLES[1].name] and "No space left" in rows[0]["unrecorded"]
    assert not (store / "inbox" / "failed.jsonl").exists()
    monkeypatch.undo()
    [out] = process_inbox(inbox=str(inbox), store=str(store))
    assert "error" not in out and "attempt" not in out and (out["version"], out["verdict"]) == (first, "certified")
    assert st.list_ids() == [first, second]


def test_a_run_killed_after_writing_the_version_is_finished_on_the_next_tick(tmp_path):
    """kill -9 of an inbox run between writing the version and certifying it (the certification step kills
    the process group: the flow process and its temporary Prefect server).  Nothing is recorded as failed; the
    next tick verifies that version and certifies it, curating nothing again."""
    import os
    import subprocess
    import sys

    from flows.flows import process_inbox

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    _drop(inbox, SAMPLES[0])
    killed_run = (
        "import os, signal\n"
        "import flows\n"
        "from pipeline import certify\n"
        "certify.certify_version = lambda *a, **k: os.killpg(0, signal.SIGKILL)\n"
        "from flows.flows import process_inbox\n"
        f"process_inbox(inbox={str(inbox)!r}, store={str(store)!r})\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", killed_run], cwd=ROOT, env=env, start_new_session=True,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]
    st = Store(store)
    [vid] = st.list_ids()
    files = _version_files(st, vid)
    assert st.latest_certification(vid) is None and not (store / "inbox" / "failed.jsonl").exists()
    [out] = process_inbox(inbox=str(inbox), store=str(store))
    assert "error" not in out and "attempt" not in out and (out["version"], out["verdict"]) == (vid, "certified")
    assert st.list_ids() == [vid] and _version_files(st, vid) == files
    assert process_inbox(inbox=str(inbox), store=str(store)) == []


def test_marked_files_of_another_type_or_unreadable_are_reported_not_passed_over(tmp_path):
    """A marked .json batch is curated; a marked .tsv fails once with its reason (recorded, not retried);
    a marked file that cannot be read (a dangling link) is reported on every tick until it is readable."""
    from flows.flows import process_inbox

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    shutil.copyfile(SAMPLES[0], inbox / "a-batch.json")
    shutil.copyfile(SAMPLES[1], inbox / "b-batch.tsv")
    (inbox / "c-batch.jsonl").symlink_to(tmp_path / "not-there.jsonl")
    for name in ("a-batch.json", "b-batch.tsv", "c-batch.jsonl"):
        (inbox / (name + ".done")).touch()
    with pytest.raises(RuntimeError, match=r"b-batch.tsv: .*unknown file type '.tsv'.*c-batch.jsonl: .*cannot read"):
        process_inbox(inbox=str(inbox), store=str(store))
    st = Store(store)
    assert len(st.list_ids()) == 1  # the .json batch
    failed = (store / "inbox" / "failed.jsonl").read_text()
    assert "b-batch.tsv" in failed and "c-batch.jsonl" not in failed
    with pytest.raises(RuntimeError, match="c-batch.jsonl") as err:  # the .tsv is not retried
        process_inbox(inbox=str(inbox), store=str(store))
    assert "b-batch.tsv" not in str(err.value) and len(st.list_ids()) == 1


def test_dask_runner_gives_identical_version(tmp_path, monkeypatch):
    pytest.importorskip("prefect_dask")
    from flows.flows import curate_batch, curate_batch_with_runner

    files = [str(p) for p in SAMPLES[:2]]
    v_default = curate_batch(files=files, store=str(tmp_path / "a"))
    c_default = curate_batch(files=[str(SAMPLES[2])], store=str(tmp_path / "a"), parent=v_default)
    monkeypatch.setenv("PREFPIPE_DASK", "local")
    # the first version's partition tasks on the cluster; the child's ingest tasks on the flow's Dask runner
    v_dask = curate_batch_with_runner()(files=files, store=str(tmp_path / "b"))
    c_dask = curate_batch_with_runner()(files=[str(SAMPLES[2])], store=str(tmp_path / "b"), parent=v_dask)
    assert (v_default, c_default) == (v_dask, c_dask)
    for v in (v_default, c_default):
        ma, mb = Store(tmp_path / "a").get(v).manifest(), Store(tmp_path / "b").get(v).manifest()
        assert {k: s.sha256 for k, s in ma.splits.items()} == {k: s.sha256 for k, s in mb.splits.items()}
        parts = {n: [p.sha256 for p in t.parts] for n, t in ma.tables.items() if n != "review_state"}  # (stamped: rows)
        assert parts == {n: [p.sha256 for p in t.parts] for n, t in mb.tables.items() if n != "review_state"}
    assert "partitions" in Store(tmp_path / "b").get(v_dask).manifest().lineage  # (a first version: over partitions)


def test_a_store_deleted_and_made_again_at_the_same_path_is_curated_again(tmp_path):
    """Prefect caches an ingest as a path, in PREFECT_HOME (outside the store): a new store at the
    old path must not be handed the old store's (deleted) ingest directory."""
    from flows.flows import curate_batch

    files = [str(SAMPLES[0])]
    store = tmp_path / "store"
    first = curate_batch(files=files, store=str(store))
    shutil.rmtree(store)
    again = curate_batch(files=files, store=str(store))
    assert again == first and Store(store).get(again).verify() == []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_the_inbox_on_its_schedule(tmp_path):
    """`prefpipe serve --interval` with no PREFECT_API_URL: starts a local Prefect server (the
    temporary one has no scheduler), the schedule creates runs, a dropped batch is curated and
    certified, and stopping serve stops the server."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--inbox", str(inbox), "--store", str(store),
                             "--interval", "5", "--port", str(port)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _drop(inbox, SAMPLES[0])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            st = Store(store)
            ids = st.list_ids() if (store / "versions").exists() else []
            if ids and st.latest_certification(ids[0]) is not None:
                break
            time.sleep(2)
        assert proc.poll() is None, proc.stdout.read()
        ids = Store(store).list_ids()
        assert len(ids) == 1 and Store(store).latest_certification(ids[0])["verdict"] in ("certified", "rejected")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=60) as r:
            assert r.status == 200  # the UI/API server is up while serving
        # the train deployment is served too: run it for the certified version as a user would from the UI
        api = f"http://127.0.0.1:{port}/api"

        def post(path: str, body: dict) -> Any:
            # the server answers 503 when its SQLite database is busy (the inbox flow writes run states at the same
            # time); Prefect's own client retries 429/502/503 with backoff, and so does this "user"
            import urllib.error

            for attempt in range(8):
                req = urllib.request.Request(api + path, data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        return json.loads(r.read())
                except urllib.error.HTTPError as e:
                    if e.code not in (429, 502, 503) or attempt == 7:
                        raise
                    time.sleep(min(2 ** attempt, 15))

        deps = {d["name"]: d for d in post("/deployments/filter", {})}
        assert {"prefpipe-inbox", "prefpipe-train"} <= set(deps)
        if Store(store).latest_certification(ids[0])["verdict"] == "certified":
            post(f"/deployments/{deps['prefpipe-train']['id']}/create_flow_run",
                 {"parameters": {"version": ids[0], "model": "tiny-llama:layers=1,hidden=32,heads=2", "max_steps": 2}})
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not list((store / "runs").glob("*/eval.json")):
                time.sleep(2)
            assert list((store / "runs").glob("*/eval.json")), "the train-on-version deployment did not finish a run"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert f"127.0.0.1:{port}" in out
    import urllib.error

    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=3)


def test_killed_inbox_run_resumes_on_the_next_tick(tmp_path):
    """kill -9 of an inbox run in the middle of writing a version: nothing visible, the batch is
    not marked failed, and the next tick (`serve --once`) curates it exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    _drop(inbox, SAMPLES[0])
    _drop(inbox, SAMPLES[1])
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--once", "--inbox", str(inbox), "--store", str(store)]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = store / ".staging"
    deadline = time.monotonic() + 240
    while not (staging.is_dir() and any(staging.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the inbox run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the flow process and its temporary Prefect server
    proc.wait()
    st = Store(store)
    assert st.list_ids() == []
    assert not (store / "inbox" / "failed.jsonl").exists() or SAMPLES[0].name not in (store / "inbox" / "failed.jsonl").read_text()

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ids = st.list_ids()
    assert len(ids) == 2 and st.get(ids[1]).manifest().parent_version == ids[0]
    assert all(st.get(v).verify() == [] for v in ids)
    assert not any(staging.iterdir())


def test_the_curate_flow_takes_urls(tmp_path):
    """The scheduled flow takes what the CLI takes: URLs (here fsspec's in-memory filesystem, this process's),
    copied and hashed once, the same versions as the local files, rows naming the URL, no copy left."""
    import uuid

    import fsspec

    from flows.flows import curate_batch

    root = f"memory://flow-{uuid.uuid4().hex[:8]}"
    for b in SAMPLES[:2]:
        with fsspec.open(f"{root}/{b.name}", "wb") as fh:
            fh.write(b.read_bytes())
    url1, url2 = (f"{root}/{b.name}" for b in SAMPLES[:2])
    v_local = curate_batch(files=[str(SAMPLES[0])], store=str(tmp_path / "a"))
    c_local = curate_batch(files=[str(SAMPLES[1])], store=str(tmp_path / "a"), parent=v_local)
    store = tmp_path / "b"
    assert curate_batch(files=[url1], store=str(store)) == v_local
    assert curate_batch(files=[url2], store=str(store), parent=v_local) == c_local
    child = Store(store).get(c_local)
    assert [s["path"] for s in child.manifest().lineage["new_sources"]] == [url2]
    assert set(child.read("judgments", columns=["source_file"])["source_file"].unique().to_list()) == {url1, url2}
    assert not [p for p in (store / ".staging").iterdir() if p.name.startswith("inputs.")]
    fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_an_inbox_run_while_another_holds_the_store_leaves_the_batches_to_it(tmp_path):
    """Two overlapping inbox runs on one store (a run past its schedule's next tick, one started by hand) both
    took the same pending batches, each certifying the same version.  The later run now does nothing while the
    store's inbox-run lock is held, and the next tick takes the batches."""
    from flows.flows import INBOX_RUN_LOCK, process_inbox

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    _drop(inbox, SAMPLES[0])
    st = Store(store)
    with st.try_lock(INBOX_RUN_LOCK) as held:  # (another run: flock conflicts between open files of one process too)
        assert held
        assert process_inbox(inbox=str(inbox), store=str(store)) == []
        assert st.list_ids() == []
    [out] = process_inbox(inbox=str(inbox), store=str(store))
    assert "error" not in out and out["verdict"] in {"certified", "rejected"} and st.list_ids() == [out["version"]]
