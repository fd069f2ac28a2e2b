"""The inbox's failure rule (pipeline/inbox.py): the input's own fault is final, an operating-system
error is tried again a bounded number of times, a batch whose version is written but not certified
is picked up again with that version, a damaged version blocks its batch only while it is there, and a
certified version is trained until a finished run of it exists.  The flow that applies it: tests/test_flows.py."""
from __future__ import annotations

import errno
import gzip
import json
import shutil

import pytest
from conftest import ROOT

from pipeline.inbox import (TRANSIENT_ATTEMPTS, failed_hashes, finished_run, is_transient, pending_batches,
                            record_failure, train_failure_histories, unfinished_versions)
from pipeline.readers import UnreadableFile, iter_raw_rows
from pipeline.store import Store

SAMPLE = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))[0]


def _read_error(path) -> UnreadableFile:
    with pytest.raises(UnreadableFile) as err:
        for _ in iter_raw_rows(path):
            pass
    return err.value


def test_damaged_input_is_not_transient_a_system_error_is(tmp_path, monkeypatch):
    truncated = tmp_path / "a.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:-30])
    not_parquet = tmp_path / "b.parquet"
    not_parquet.write_bytes(b"PAR1" + b"\0" * 100 + b"PAR1")  # pyarrow says so with an OSError (no errno)
    assert not is_transient(_read_error(truncated)) and not is_transient(_read_error(not_parquet))
    assert not is_transient(ValueError("no valid rows"))
    assert is_transient(OSError(errno.ENOSPC, "No space left on device", "store/.staging"))

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("pipeline.readers.open", eio, raising=False)  # a network filesystem failing under the reader
    assert is_transient(_read_error(SAMPLE))


def _inbox_with_sample(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(SAMPLE, inbox / SAMPLE.name)
    (inbox / (SAMPLE.name + ".done")).touch()
    return inbox


def test_a_batch_is_tried_until_a_failure_is_final(tmp_path):
    st = Store(tmp_path / "s").ensure()
    inbox = _inbox_with_sample(tmp_path)
    for tries in range(TRANSIENT_ATTEMPTS):
        [batch] = pending_batches(inbox, st)
        assert batch.failed_tries == tries
        rec = record_failure(st, batch, "disk full", transient=True)
        assert rec["attempt"] == tries + 1 and rec["retry"] == (tries + 1 < TRANSIENT_ATTEMPTS)
    assert pending_batches(inbox, st) == [] and failed_hashes(st) == {batch.sha256}


def test_a_bad_input_failure_is_final_at_once_and_so_is_an_older_record(tmp_path):
    st = Store(tmp_path / "s").ensure()
    inbox = _inbox_with_sample(tmp_path)
    [batch] = pending_batches(inbox, st)
    record_failure(st, batch, "disk full", transient=True)
    [batch] = pending_batches(inbox, st)
    assert not record_failure(st, batch, "not UTF-8", transient=False)["retry"]
    assert pending_batches(inbox, st) == []
    (st.root / "inbox" / "failed.jsonl").write_text(  # a record written before failures had kinds
        json.dumps({"file": str(batch.path), "sha256": batch.sha256, "reason": "x", "at": "2026-01-01"}) + "\n")
    assert pending_batches(inbox, st) == [] and failed_hashes(st) == {batch.sha256}


def _certify(st: Store, vid: str) -> None:
    from datetime import UTC, datetime

    from schemas.manifest import Certification

    st.add_certification(Certification(version_id=vid, verdict="rejected", gates=[], policy_hash="p", policy={},
                                       certified_at=datetime.now(UTC), code_version="test"))


def test_a_batch_whose_version_is_not_certified_is_picked_up_with_that_version(tmp_path):
    """A version written from the batch but not certified (a later step failed, or the run was killed between):
    the batch is pending again with that version (the newest that added it), its tries counted as before, until
    a certification of it (either verdict) is there -- or the failure is final.  A certified version is done."""
    from test_store import _chain_builder

    st = Store(tmp_path / "s").ensure()
    inbox = _inbox_with_sample(tmp_path)
    [batch] = pending_batches(inbox, st)
    other = "b" * 64
    st.write_version("v-1", _chain_builder("v-1", None, [other], [other]))
    st.write_version("v-2", _chain_builder("v-2", "v-1", [other, batch.sha256], [batch.sha256]))
    _certify(st, "v-1")
    assert unfinished_versions(st) == {batch.sha256: "v-2"}
    [again] = pending_batches(inbox, st)
    assert (again.version, again.failed_tries) == ("v-2", 0)
    rec = record_failure(st, again, "disk full", transient=True, version="v-2")
    assert (rec["version"], rec["attempt"], rec["retry"]) == ("v-2", 1, True)
    [again] = pending_batches(inbox, st)
    assert (again.version, again.failed_tries) == ("v-2", 1)
    _certify(st, "v-2")
    assert pending_batches(inbox, st) == [] and unfinished_versions(st) == {}


def test_an_unfinished_batch_is_no_longer_tried_after_its_last_try(tmp_path):
    from test_store import _chain_builder

    st = Store(tmp_path / "s").ensure()
    inbox = _inbox_with_sample(tmp_path)
    [batch] = pending_batches(inbox, st)
    st.write_version("v-1", _chain_builder("v-1", None, [batch.sha256], [batch.sha256]))
    for tries in range(TRANSIENT_ATTEMPTS):
        [batch] = pending_batches(inbox, st)
        assert (batch.version, batch.failed_tries) == ("v-1", tries)
        record_failure(st, batch, "I/O error", transient=True, version="v-1")
    assert pending_batches(inbox, st) == [] and failed_hashes(st) == {batch.sha256}


def test_a_damaged_version_failure_counts_while_that_damaged_copy_is_there(tmp_path):
    """The batch's unfinished version was found damaged (kind damaged_version, naming it): final while that copy is
    there; once it is removed (`gc --delete`) the batch is new again -- curated anew, its earlier tries counted as
    before -- and a copy built anew since is not the damaged one.  A record that does not say which version
    counts, as every bad-input record does."""
    from test_store import _chain_builder

    st = Store(tmp_path / "s").ensure()
    inbox = _inbox_with_sample(tmp_path)
    [batch] = pending_batches(inbox, st)
    build = _chain_builder("v-1", None, [batch.sha256], [batch.sha256])
    st.write_version("v-1", build)
    [batch] = pending_batches(inbox, st)
    record_failure(st, batch, "I/O error", transient=True, version="v-1")
    [batch] = pending_batches(inbox, st)
    rec = record_failure(st, batch, "version v-1 is in the store but damaged", transient=False, version="v-1",
                         damaged="v-1")
    assert (rec["kind"], rec["damaged"]["version"], rec["retry"]) == ("damaged_version", "v-1", False)
    assert pending_batches(inbox, st) == [] and failed_hashes(st) == {batch.sha256}
    shutil.rmtree(st.versions_dir / "v-1")  # what `prefpipe gc --delete v-1 --apply` does to it
    [again] = pending_batches(inbox, st)
    assert (again.version, again.failed_tries, again.train) == (None, 1, False) and failed_hashes(st) == set()
    st.write_version("v-1", build)  # built anew (the next tick's curate): another copy, not the damaged one
    [again] = pending_batches(inbox, st)
    assert (again.version, again.failed_tries) == ("v-1", 1)
    with (st.root / "inbox" / "failed.jsonl").open("a") as fh:  # a record naming no valid version: it counts
        fh.write(json.dumps({**rec, "damaged": {"version": "../v-1"}}) + "\n")
    assert pending_batches(inbox, st) == [] and failed_hashes(st) == {batch.sha256}


def _certified_for_training(st: Store, vid: str, *, train_after_certify: bool = True) -> None:
    """A certification record of ``vid`` as the inbox's certify writes it (binding its manifest) under a policy
    with ``certify.train_after_certify``."""
    from datetime import UTC, datetime

    from schemas.manifest import Certification

    st.add_certification(Certification(version_id=vid, verdict="certified", gates=[], policy_hash="p",
                                       policy={"certify": {"train_after_certify": train_after_certify}},
                                       certified_at=datetime.now(UTC), code_version="test",
                                       manifest_sha256=st.get(vid).manifest_sha256()))


def _finished_run(st: Store, vid: str, run_id: str, **over) -> None:
    """What trainer.train writes of a finished run: run.json, then the lineage's ``finished`` event."""
    splits = {name: info.sha256 for name, info in st.get(vid).manifest().splits.items()}
    run = {"run_id": run_id, "status": "finished", "version_id": vid, "split_sha256": splits,
           "certification": {"verdict": "certified", "policy_hash": "p", "certified_at": "2026-12-07"}, **over}
    (st.root / "runs" / run_id).mkdir(parents=True)
    (st.root / "runs" / run_id / "run.json").write_text(json.dumps(run))
    (st.root / "lineage").mkdir(exist_ok=True)
    with (st.root / "lineage" / f"{vid}.jsonl").open("a") as fh:
        fh.write(json.dumps({"event": "finished", "run_id": run_id, "run_dir": "/elsewhere"}) + "\n")


def test_a_certified_version_without_a_finished_run_is_pending_for_training(tmp_path):
    """With the policy's train_after_certify, a batch whose version is certified (under a policy that says so) is
    pending again -- to train that version, nothing else -- until a finished run of it exists.  Its training's
    transient failures are counted apart from the batch's, TRANSIENT_ATTEMPTS tries; another failure is final."""
    from test_store import _chain_builder

    st = Store(tmp_path / "s").ensure()
    inbox = _inbox_with_sample(tmp_path)
    [batch] = pending_batches(inbox, st)
    record_failure(st, batch, "disk full", transient=True)  # a try of the batch before its version was certified
    st.write_version("v-1", _chain_builder("v-1", None, [batch.sha256], [batch.sha256]))
    _certified_for_training(st, "v-1")
    assert pending_batches(inbox, st) == []  # (training off)
    for tries in range(TRANSIENT_ATTEMPTS):
        [again] = pending_batches(inbox, st, train=True)
        assert (again.version, again.train, again.failed_tries) == ("v-1", True, tries)
        rec = record_failure(st, again, "I/O error", transient=True, version="v-1")
        assert (rec["kind"], rec["attempt"], rec["retry"]) == ("train", tries + 1, tries + 1 < TRANSIENT_ATTEMPTS)
    assert pending_batches(inbox, st, train=True) == [] and failed_hashes(st) == set()
    assert train_failure_histories(st)["v-1"].final

    st2 = Store(tmp_path / "s2").ensure()  # a failure of the training itself: final at once
    st2.write_version("v-1", _chain_builder("v-1", None, [batch.sha256], [batch.sha256]))
    _certified_for_training(st2, "v-1")
    [again] = pending_batches(inbox, st2, train=True)
    assert not record_failure(st2, again, "no train pair left", transient=False, version="v-1")["retry"]
    assert pending_batches(inbox, st2, train=True) == []

    st3 = Store(tmp_path / "s3").ensure()  # certified before the setting was on: not trained by a later tick
    st3.write_version("v-1", _chain_builder("v-1", None, [batch.sha256], [batch.sha256]))
    _certified_for_training(st3, "v-1", train_after_certify=False)
    assert pending_batches(inbox, st3, train=True) == []


def test_a_finished_run_is_recognised_only_when_it_trained_on_the_certified_content(tmp_path):
    """finished_run: the lineage names a run, whose run.json says finished, of this version, on the splits of its
    certified manifest.  A run still running, of another version, of other content, named by an unsafe id, or
    whose lineage line is damaged, is not one; neither is any run once the manifest changed after certification."""
    from test_store import _chain_builder

    st = Store(tmp_path / "s").ensure()
    inbox = _inbox_with_sample(tmp_path)
    [batch] = pending_batches(inbox, st)
    st.write_version("v-1", _chain_builder("v-1", None, [batch.sha256], [batch.sha256]))
    _certified_for_training(st, "v-1")
    _finished_run(st, "v-1", "run-running", status="running")
    _finished_run(st, "v-1", "run-other", version_id="v-2")
    _finished_run(st, "v-1", "run-content", split_sha256={"train": "0" * 64})
    _finished_run(st, "v-1", "run-uncertified", certification={"verdict": "rejected"})
    with (st.root / "lineage" / "v-1.jsonl").open("a") as fh:
        fh.write('{"event": "finished", "run_id": "../run-x"}\n{"event": "fini\n')
    (st.root / "runs" / "run-x").mkdir()
    assert finished_run(st, "v-1") is None
    assert [b.train for b in pending_batches(inbox, st, train=True)] == [True]
    _finished_run(st, "v-1", "run-ok")
    assert finished_run(st, "v-1") == st.root / "runs" / "run-ok"
    assert pending_batches(inbox, st, train=True) == []
    manifest = st.get("v-1").path / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"created_at"', b' "created_at"', 1))  # changed since certified
    assert finished_run(st, "v-1") is None


def test_a_version_found_damaged_while_curating_says_how_to_remove_it_and_blocks_until_then(tmp_path):
    """The flow's failure (flows.flows._failure, no Prefect run needed): a batch whose version's manifest became
    unreadable is curated anew and the curate refuses the damaged version of that id (existing_version).  The
    error ends with the exact remedy for this store; the record names the damaged version, final while it is
    there; removed, the batch is tried again.  A training failure says whether the version stays untrained."""
    from test_store import _chain_builder

    from flows.flows import _failure, _retry_note
    from pipeline.curate import existing_version
    from pipeline.store import DamagedVersion

    st = Store(tmp_path / "my store").ensure()
    inbox = _inbox_with_sample(tmp_path)
    [batch] = pending_batches(inbox, st)
    st.write_version("v-1", _chain_builder("v-1", None, [batch.sha256], [batch.sha256]))
    (st.versions_dir / "v-1" / "manifest.json").write_text("{not json")
    [batch] = pending_batches(inbox, st)  # (a version listed as damaged is no source: curated anew)
    with pytest.raises(DamagedVersion) as err:
        existing_version(st, "v-1")
    out = _failure(st, batch, err.value, version=None)
    assert (out["damaged"], out["transient"], out["retry"]) == ("v-1", False, False) and "version" not in out
    assert out["error"].endswith(f"; nothing written. Remove it (`prefpipe gc --store '{st.root}' --delete v-1 --apply`): "
                                 f"the next tick curates {batch.path.name} anew")
    assert _retry_note(out) == "" and pending_batches(inbox, st) == []
    shutil.rmtree(st.versions_dir / "v-1")
    assert [b.path for b in pending_batches(inbox, st)] == [batch.path]
    trained = {"training": True, "version": "v-1", "verdict": "certified", "transient": False, "retry": False}
    assert _retry_note(trained) == " (version v-1 is certified, not trained, and stays so)"


def test_a_damaged_version_failure_recorded_before_kinds_is_read_as_one(tmp_path):
    """failed.jsonl written by the inbox before failures had kinds: the final failure of a batch whose version was
    found damaged (the record names the version; its reason is existing_version's) counts while that copy is there
    -- the batch a user could only free by editing failed.jsonl is curated anew once the version is removed, and
    a copy built after the record does not revive it.  Other old records read as they always did."""
    import os
    import time

    from test_store import _chain_builder

    st = Store(tmp_path / "s").ensure()
    inbox = _inbox_with_sample(tmp_path)
    [batch] = pending_batches(inbox, st)
    build = _chain_builder("v-1", None, [batch.sha256], [batch.sha256])
    st.write_version("v-1", build)
    old = {"file": str(batch.path), "sha256": batch.sha256, "at": "2026-12-01T10:00:00+00:00", "transient": False,
           "attempt": 2, "version": "v-1", "reason": f"version v-1 is in the store ({st.versions_dir / 'v-1'}) but "
           "damaged: data/train.parquet: 9 bytes, the manifest says 7; nothing written. Remove it (`prefpipe gc "
           "--delete v-1 --apply`) and curate again, which builds it anew"}
    (st.root / "inbox").mkdir()
    (st.root / "inbox" / "failed.jsonl").write_text(json.dumps(old) + "\n")
    manifest = st.versions_dir / "v-1" / "manifest.json"
    os.utime(manifest, ns=(time.time_ns(), 1_764_000_000 * 10**9))  # written before the record (2025-11-24)
    assert pending_batches(inbox, st) == [] and failed_hashes(st) == {batch.sha256}
    shutil.rmtree(st.versions_dir / "v-1")
    [again] = pending_batches(inbox, st)
    assert (again.version, again.failed_tries) == (None, 0)
    st.write_version("v-1", build)  # built after the record: not the damaged copy
    [again] = pending_batches(inbox, st)
    assert again.version == "v-1"
    (st.root / "inbox" / "failed.jsonl").write_text(json.dumps({**old, "reason": "not UTF-8"}) + "\n")
    assert pending_batches(inbox, st) == []  # another old bad-input record: final, as before
