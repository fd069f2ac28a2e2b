"""The inbox's failure rule (pipeline/inbox.py): the input's own fault is final, an operating-system
error is tried again a bounded number of times, and a batch whose version is written but not certified
is picked up again with that version.  The flow that applies it: tests/test_flows.py."""
from __future__ import annotations

import errno
import gzip
import json
import shutil

import pytest
from conftest import ROOT

from pipeline.inbox import (TRANSIENT_ATTEMPTS, failed_hashes, is_transient, pending_batches, record_failure,
                            unfinished_versions)
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
