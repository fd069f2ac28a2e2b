"""A run's life when things go wrong: the version it trains on is held against `prefpipe gc`, any exception
after the run started leaves run.json saying failed (and a resume finishes it), and the failure paths a user
meets -- a full disk, a damaged checkpoint, a run directory of another run, two resumes at once -- end with a
clear message and nothing half-written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_train_trust import FAST, TINY, store  # noqa: F401 - the toy store (a fixture) and fast settings

from trainer.train import make_config, train


def _gc_delete(root: Path, version: str) -> dict:
    """`prefpipe gc --delete VERSION --apply --json`, as another process would run it now."""
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, ["gc", "--store", str(root), "--delete", version, "--apply", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _events(root: Path, version: str = "v-toy") -> list[dict]:
    return [json.loads(x) for x in (root / "lineage" / f"{version}.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the version is held for the whole run
def test_gc_keeps_the_version_a_run_trains_on_and_the_run_finishes(store):
    """`prefpipe gc --delete V --apply` while a run reads V -- right after V's verification, and between two
    optimizer steps -- keeps V (listed as in use) and the run finishes; once the run is over, gc removes V."""
    seen = []

    def gc_now(kind, payload):  # the run waits here while gc runs: a deterministic "concurrent" gc
        if kind == "tokenized" or (kind == "step" and payload["step"] == 1):
            seen.append((kind, _gc_delete(store.root, "v-toy")))

    res = train(make_config(store.root, "v-toy", run_id="held", max_steps=2, **FAST), on_event=gc_now)
    assert [(kind, out["versions"], out["in_use"]) for kind, out in seen] == [
        ("tokenized", [], ["v-toy"]), ("step", [], ["v-toy"])]
    assert store.exists("v-toy") and store.get("v-toy").verify() == []
    assert json.loads((res.run_dir / "run.json").read_text())["status"] == "finished"
    assert [e["event"] for e in _events(store.root)] == ["started", "finished"]
    out = _gc_delete(store.root, "v-toy")  # the run is over: nothing holds V any more
    assert out["versions"] == ["v-toy"] and out["in_use"] == [] and not store.exists("v-toy")


def test_a_version_gc_removed_before_the_hold_is_not_found_and_nothing_is_written(store, monkeypatch):
    """gc removing V between the lookup of 'v-toy' and the run's hold on it: the run stops (exit 2) saying so,
    before anything is written."""
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline.store import Store

    real = Store.in_use

    def gc_first(self, version_id):
        _gc_delete(self.root, version_id)
        return real(self, version_id)

    monkeypatch.setattr(Store, "in_use", gc_first)
    res = CliRunner().invoke(app, ["train", "v-toy", "--store", str(store.root), "--model", TINY, "--steps", "1",
                                   "--max-length", "64", "--threads", "1", "--run-id", "late"])
    assert res.exit_code == 2, res.output
    assert "version v-toy was removed (`prefpipe gc`) before the run could use it" in " ".join(res.output.split())
    assert not (store.root / "runs").exists() and not (store.root / "lineage").exists()


# ---------------------------------------------------------------- any exception after the start is recorded
def _run_json(root: Path, run_id: str) -> dict:
    return json.loads((root / "runs" / run_id / "run.json").read_text())


def _boom(*_args, **_kwargs):
    raise OSError(28, "No space left on device", "/store/runs/x/[red]eval.parquet[/]\x1b[2J")


@pytest.mark.parametrize("where", ["trainer.train._evaluate_test_split",   # the test-split evaluation
                                   "trainer.train.write_run_report",       # the report, after run.json said finished
                                   "trainer.runs.atomic_write_parquet",    # the eval tables
                                   "trainer.runs.save_checkpoint",         # the final model
                                   "trainer.train.export_checkpoint"])     # --export
def test_an_error_past_the_loop_leaves_the_run_failed_and_a_resume_finishes_it(store, monkeypatch, where):
    """An exception after the training loop (it stayed "running": neither finished nor failed) leaves run.json saying
    failed with the error's type and message, and a "failed" lineage event; a resume then finishes the run."""
    module, name = where.rsplit(".", 1)
    import importlib

    cfg = dict(max_steps=2, checkpoint_every=1, export=True, **FAST)
    calls = {"n": 0}

    def boom_at_the_end(*args, **kwargs):  # (save_checkpoint: the step-1 checkpoint is written, the final one fails)
        calls["n"] += 1
        if name == "save_checkpoint" and calls["n"] == 1:
            return real(*args, **kwargs)
        _boom()

    real = getattr(importlib.import_module(module), name)
    monkeypatch.setattr(importlib.import_module(module), name, boom_at_the_end)
    with pytest.raises(OSError) as err:
        train(make_config(store.root, "v-toy", run_id="late", **cfg))
    run = _run_json(store.root, "late")
    assert run["status"] == "failed" and "final" not in run and "finished_at" not in run, run
    f = run["failure"]
    assert f["reason"] == "error" and f["error"] == "OSError" and "No space left on device" in f["message"]
    assert f["step"] == 2  # (the steps done; the final checkpoint's failure leaves step 1's as the last)
    assert f["last_checkpoint"] == ("step-000001" if name == "save_checkpoint" else "step-000002")
    assert "recorded as failed in" in " ".join(err.value.__notes__) and "--resume late" in " ".join(err.value.__notes__)
    assert [e["event"] for e in _events(store.root)] == ["started", "failed"]
    monkeypatch.setattr(importlib.import_module(module), name, real)  # the cause gone: a resume finishes the run
    res = train(make_config(store.root, "v-toy", run_id="late", resume=True, **cfg))
    run = _run_json(store.root, "late")
    assert run["status"] == "finished" and "failure" not in run and run["final"]["step"] == 2 == res.steps
    assert [e["event"] for e in _events(store.root)] == ["started", "failed", "resumed", "finished"]
    assert (res.run_dir / "report.html").is_file() and (res.run_dir / "export" / "model.safetensors").is_file()


def test_an_interrupted_run_is_recorded_and_the_command_exits_130(store, monkeypatch):
    """Ctrl-C in the middle of the loop: run.json says failed, reason "interrupted", before the run's lock is
    released; `prefpipe train` says where it stopped and how to go on (exit 130, no traceback); a resume finishes."""
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline.store import Store

    held_while_recorded = []

    def ctrl_c(kind, payload):
        if kind == "step" and payload["step"] == 2:
            raise KeyboardInterrupt
        if kind == "failed":  # the record is written while the run still holds its lock
            with Store(store.root).try_lock("train-run-intr") as free:
                held_while_recorded.append(not free)

    import flows.train_cmd as tc

    real = tc._Progress.on_event
    monkeypatch.setattr(tc._Progress, "on_event", lambda self, kind, payload: (ctrl_c(kind, payload),
                                                                                real(self, kind, payload)))
    args = ["train", "v-toy", "--store", str(store.root), "--model", TINY, "--steps", "3", "--max-length", "64",
            "--threads", "1", "--eval-every", "0", "--checkpoint-every", "1"]
    res = CliRunner().invoke(app, [*args, "--run-id", "intr"])
    assert res.exit_code == 130, res.output
    msg = " ".join(res.output.split())
    assert "interrupted:" in msg and "run intr stopped after step 2" in msg and "--resume intr" in msg, msg
    assert "Traceback" not in res.output and not res.stdout.strip()
    assert held_while_recorded == [True]
    f = _run_json(store.root, "intr")["failure"]
    assert (f["reason"], f["error"], f["message"], f["step"], f["last_checkpoint"]) == (
        "interrupted", "KeyboardInterrupt", "interrupted", 2, "step-000002")
    monkeypatch.setattr(tc._Progress, "on_event", real)
    res = CliRunner().invoke(app, [*args, "--resume", "intr"])
    assert res.exit_code == 0, res.output
    assert _run_json(store.root, "intr")["status"] == "finished"
    assert [e["event"] for e in _events(store.root)] == ["started", "failed", "resumed", "finished"]


def test_an_io_error_in_the_run_exits_2_naming_the_file_escaped_and_the_record(store, monkeypatch):
    """A full disk writing the eval tables: exit 2 with the file and the reason -- markup and control characters of
    the path shown as text -- and where the failure is recorded; no traceback."""
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setattr("trainer.runs.atomic_write_parquet", _boom)
    res = CliRunner().invoke(app, ["train", "v-toy", "--store", str(store.root), "--model", TINY, "--steps", "1",
                                   "--max-length", "64", "--threads", "1", "--run-id", "disk"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "\x1b" not in res.output
    msg = " ".join(res.output.split())
    assert "[red]eval.parquet[/]\\x1b[2J: No space left on device" in msg, msg
    assert "run disk stopped after step 1; recorded as failed" in msg and "--resume disk" in msg, msg
    f = _run_json(store.root, "disk")["failure"]
    assert f["error"] == "OSError" and f["message"].startswith("[Errno 28] No space left on device: '/store/runs/x/")


def test_a_new_run_that_fails_before_its_run_json_leaves_no_directory(store, monkeypatch):
    """A new run whose claimed directory gets no run.json (writing config.json fails) removes it: no directory that
    blocks the run id and cannot be resumed."""
    import trainer.runs as runs

    real = runs.write_json

    def no_config(path, obj):
        if path.name == "config.json":
            _boom()
        real(path, obj)

    monkeypatch.setattr(runs, "write_json", no_config)
    with pytest.raises(OSError):
        train(make_config(store.root, "v-toy", run_id="early", max_steps=1, **FAST))
    assert not (store.root / "runs" / "early").exists() and not (store.root / "lineage").exists()
    monkeypatch.setattr(runs, "write_json", real)
    assert train(make_config(store.root, "v-toy", run_id="early", max_steps=1, **FAST)).steps == 1


# ---------------------------------------------------------------- the failure paths a user meets
def _train_cli(root: Path, *args: str):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, ["train", "v-toy", "--store", str(root), "--model", TINY, "--max-length", "64",
                                    "--threads", "1", "--eval-every", "0", *args])


def test_a_full_disk_writing_a_checkpoint_exits_2_leaves_no_partial_checkpoint_and_resumes(store, monkeypatch):
    """safetensors says a full disk as SafetensorError("... (os error 28)"), not OSError: it was a traceback, and the
    checkpoint's temp directory (half a model file) stayed, holding the space.  Now: exit 2 naming the file and the
    reason and the record, no temp directory left, run.json failed at the last good checkpoint; a resume finishes."""
    import safetensors.torch
    from safetensors import SafetensorError

    real, calls = safetensors.torch.save_file, {"n": 0}

    def full_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] < 3:  # step 1's checkpoint: its model and optimizer files
            return real(tensors, filename, metadata)
        Path(filename).write_bytes(b"\0" * 100)  # what was written before the disk filled up
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    res = _train_cli(store.root, "--steps", "3", "--checkpoint-every", "1", "--run-id", "full")
    assert res.exit_code == 2, res.output
    msg = " ".join(res.output.split())
    assert "Traceback" not in res.output and "model.safetensors: No space left on device" in msg, msg
    assert "run full stopped after step 2; recorded as failed" in msg and "resume it from step-000001" in msg, msg
    ckdir = store.root / "runs" / "full" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-000001"]  # no half-written checkpoint beside it
    f = _run_json(store.root, "full")["failure"]
    assert (f["reason"], f["error"], f["step"], f["last_checkpoint"]) == ("error", "OSError", 2, "step-000001")
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    res = _train_cli(store.root, "--steps", "3", "--checkpoint-every", "1", "--resume", "full")
    assert res.exit_code == 0, res.output
    assert _run_json(store.root, "full")["status"] == "finished"


def test_a_full_disk_writing_the_export_leaves_no_partial_export(store, monkeypatch):
    """--export on a full disk: the OSError naming the file (a SafetensorError traceback before), the export's temp
    directory removed, the run recorded as failed."""
    from safetensors import SafetensorError

    import trainer.runs as runs

    monkeypatch.setattr(runs, "save_checkpoint", lambda *a, **k: None)  # (only the export's write fails)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    import transformers.modeling_utils  # (it writes with the save_file it imported)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device") as err:
        train(make_config(store.root, "v-toy", run_id="exp", max_steps=1, export=True, **FAST))
    assert err.value.errno == 28 and err.value.filename.endswith("model.safetensors")
    run_dir = store.root / "runs" / "exp"
    assert not (run_dir / ".export.tmp").exists() and not (run_dir / "export").exists()
    assert _run_json(store.root, "exp")["failure"]["error"] == "OSError"


def _rewrite_index(ckpt: Path, **files_override) -> None:
    """checkpoint.json with the sha256s of the files as they are now (an edit that also rewrote the index)."""
    import hashlib

    index = json.loads((ckpt / "checkpoint.json").read_text())
    for name in index["files"]:
        index["files"][name]["sha256"] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    index.update(files_override)
    (ckpt / "checkpoint.json").write_text(json.dumps(index))


@pytest.mark.parametrize("damage,needle", [
    ("index-files-list", "checkpoint.json: no sha256 record for each of"),
    ("state-not-object", "state.json: missing or malformed entry"),
    ("another-model", "its state does not fit this run"),
])
def test_a_damaged_checkpoint_exits_2_naming_it_and_leaves_the_run_as_it_was(store, tmp_path, damage, needle):
    """A checkpoint whose files match an index rewritten with them, but whose content is not this run's: exit 2
    naming the file, no traceback (AttributeError, KeyError, load_state_dict's RuntimeError before), run.json and the
    lineage untouched; an older intact checkpoint is named as the way on."""
    from safetensors.torch import load_file, save_file

    res = _train_cli(store.root, "--steps", "2", "--checkpoint-every", "1", "--run-id", "dmg")
    assert res.exit_code == 0, res.output
    ckpt = store.root / "runs" / "dmg" / "checkpoints" / "step-000002"
    if damage == "index-files-list":
        _rewrite_index(ckpt)
        _rewrite_index(ckpt, files=[])
    elif damage == "state-not-object":
        (ckpt / "state.json").write_text('"not an object"')
        _rewrite_index(ckpt)
    else:  # a model file of another shape under the same names
        state = load_file(str(ckpt / "model.safetensors"))
        save_file({k: v[..., :1].contiguous() if v.dim() == 2 else v for k, v in state.items()},
                  str(ckpt / "model.safetensors"))
        _rewrite_index(ckpt)
    run_before = (store.root / "runs" / "dmg" / "run.json").read_text()
    events_before = (store.root / "lineage" / "v-toy.jsonl").read_text()
    res = _train_cli(store.root, "--steps", "2", "--checkpoint-every", "1", "--resume", "dmg")
    assert res.exit_code == 2, (res.output, res.exception)
    msg = " ".join(res.output.split())
    assert needle in msg and "Traceback" not in res.output, msg
    assert "older checkpoint, step-000001: move step-000002 out of" in msg, msg
    assert (store.root / "runs" / "dmg" / "run.json").read_text() == run_before
    assert (store.root / "lineage" / "v-toy.jsonl").read_text() == events_before
    (ckpt.rename(tmp_path / "step-000002"))  # the way on the message gives
    res = _train_cli(store.root, "--steps", "2", "--checkpoint-every", "1", "--resume", "dmg")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("case,needle", [
    ("copied", "runs/copy/run.json belongs to run 'orig' (a run directory copied or renamed?)"),
    ("damaged", "run.json cannot be read"),
    ("not-a-record", "run.json is not a run record"),
    ("missing", "run.json is missing"),
    ("no-directory", "there is no run directory"),
])
def test_resuming_a_run_directory_that_is_not_that_runs_exits_2(store, case, needle):
    """`--resume copy` of `cp -r runs/orig runs/copy` resumed it: run.json kept saying 'orig' while the lineage said
    'copy'.  A run.json that is damaged or gone was a traceback.  Now each exits 2 saying which, writing nothing."""
    import shutil

    assert _train_cli(store.root, "--steps", "1", "--run-id", "orig").exit_code == 0
    copy = store.root / "runs" / "copy"
    if case != "no-directory":
        shutil.copytree(store.root / "runs" / "orig", copy)
    if case == "damaged":
        (copy / "run.json").write_bytes(b'{"run_id": "copy", \xff')
    elif case == "not-a-record":
        (copy / "run.json").write_text('["copy"]')
    elif case == "missing":
        (copy / "run.json").unlink()
    events_before = (store.root / "lineage" / "v-toy.jsonl").read_text()
    res = _train_cli(store.root, "--steps", "2", "--resume", "copy")
    assert res.exit_code == 2, (res.output, res.exception)
    msg = " ".join(res.output.split())
    assert needle in msg and "Traceback" not in res.output, msg
    assert (store.root / "lineage" / "v-toy.jsonl").read_text() == events_before
    if case == "copied":
        assert json.loads((copy / "run.json").read_text())["status"] == "finished"  # untouched


def test_two_resumes_at_once_one_trains_the_other_exits_2_and_records_nothing(store):
    """An interrupted run resumed twice at once (two scheduler retries): the second is refused (RunInUse, exit 2)
    while the first trains, and its refusal is no failure of the run -- run.json stays the first resume's "running"
    -- and the first finishes; one "resumed" event."""
    class Crash(Exception):
        pass

    def crash(kind, payload):
        if kind == "step" and payload["step"] == 1:
            raise Crash

    cfg = dict(max_steps=3, checkpoint_every=1, **FAST)
    with pytest.raises(Crash):
        train(make_config(store.root, "v-toy", run_id="twice", **cfg), on_event=crash)
    seen = {}

    def second_resume(kind, payload):
        if kind == "step" and payload["step"] == 2:
            res = _train_cli(store.root, "--steps", "3", "--checkpoint-every", "1", "--resume", "twice")
            seen["exit"], seen["output"] = res.exit_code, " ".join(res.output.split())
            seen["status"] = _run_json(store.root, "twice")["status"]

    res = train(make_config(store.root, "v-toy", run_id="twice", resume=True, **cfg), on_event=second_resume)
    assert seen["exit"] == 2 and "run twice is in use" in seen["output"] and seen["status"] == "running", seen
    assert res.steps == 3 and _run_json(store.root, "twice")["status"] == "finished"
    assert [e["event"] for e in _events(store.root)] == ["started", "failed", "resumed", "finished"]


def test_a_full_disk_writing_the_eval_tables_exits_2_naming_the_file_and_leaves_no_temp_file(store, monkeypatch):
    """polars says a full disk as ComputeError("... (os error 28)"): it was a traceback (after the run was recorded);
    now the OSError naming the table, exit 2, and the temp file it wrote removed."""
    import polars as pl
    from polars.exceptions import ComputeError

    real = pl.DataFrame.write_parquet

    def full_disk(self, file, *args, **kwargs):
        if isinstance(file, (str, Path)) and "eval" in Path(file).name:
            Path(file).write_bytes(b"PAR1")
            raise ComputeError("parquet: File out of specification: underlying IO error: No space left on device "
                               "(os error 28)")
        return real(self, file, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full_disk)
    res = _train_cli(store.root, "--steps", "1", "--run-id", "tables")
    assert res.exit_code == 2, (res.output, res.exception)
    msg = " ".join(res.output.split())
    assert "eval.parquet: No space left on device" in msg and "Traceback" not in res.output, msg
    run_dir = store.root / "runs" / "tables"
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert _run_json(store.root, "tables")["failure"]["error"] == "OSError"


def test_writes_that_fail_leave_no_temp_files(store, tmp_path, monkeypatch):
    """A full disk in the middle of an atomic write (run.json, the reference cache and its record): the temp file
    goes with the error (it stayed, holding the space)."""
    import errno
    import os

    import trainer.reference as reference
    import trainer.runs as runs

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        runs.atomic_write_text(tmp_path / "run.json", "{}")
    monkeypatch.undo()
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: full() if str(a).endswith(".tmp") else real_replace(a, b))
    with pytest.raises(OSError):
        reference.atomic_write_bytes(tmp_path / "key.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    res = _train_cli(store.root, "--steps", "1", "--run-id", "ref")  # the reference cache's parquet file
    assert res.exit_code == 2 and "No space left on device" in res.output, res.output
    cache = store.root / "runs" / "reference-cache"
    assert not [p for p in cache.rglob("*") if p.is_file()] and not (store.root / "runs" / "ref").exists()


def test_sigterm_is_recorded_as_an_interruption_and_exits_143(store, monkeypatch):
    """`kill PID` / `timeout` / a scheduler stopping `prefpipe train`: the process died with run.json "running"; now
    SIGTERM interrupts the run as Ctrl-C does -- recorded, exit 143 -- and the previous handler is back after."""
    import os
    import signal

    import flows.train_cmd as tc

    before = signal.getsignal(signal.SIGTERM)
    real = tc._Progress.on_event

    def terminate_at_step_1(self, kind, payload):
        if kind == "step" and payload["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        real(self, kind, payload)

    monkeypatch.setattr(tc._Progress, "on_event", terminate_at_step_1)
    res = _train_cli(store.root, "--steps", "3", "--checkpoint-every", "1", "--run-id", "term")
    assert res.exit_code == 143, (res.output, res.exception)
    assert "terminated by SIGTERM; run term stopped after step 1" in " ".join(res.output.split()), res.output
    f = _run_json(store.root, "term")["failure"]
    assert (f["reason"], f["message"], f["last_checkpoint"]) == ("interrupted", "terminated by SIGTERM", "step-000001")
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_lineage_line_the_disk_takes_only_part_of_is_cut_back_and_said(store, monkeypatch):
    """On a full disk os.write may write part of a lineage line and return the short count, no error: the torn line
    stayed, and the next event appended after it was glued to it -- both unreadable, lost without a word.  Now the
    file is cut back to its whole lines and the write fails (OSError, ENOSPC)."""
    import errno
    import os

    import trainer.runs as runs

    runs.append_lineage(store, "v-toy", {"event": "started", "run_id": "a"})
    path = store.root / "lineage" / "v-toy.jsonl"
    before = path.read_bytes()
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[:len(data) // 2]))
    with pytest.raises(OSError) as err:
        runs.append_lineage(store, "v-toy", {"event": "finished", "run_id": "a"})
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and path.read_bytes() == before
    runs.append_lineage(store, "v-toy", {"event": "failed", "run_id": "a"})
    assert [e["event"] for e in _events(store.root)] == ["started", "failed"]


def test_the_metrics_plot_leaves_no_temp_file_when_its_write_fails(tmp_path):
    from trainer.plot import write_metrics_svg

    target = tmp_path / "metrics.svg"
    target.mkdir()  # (the rename into place fails, as a full disk would fail the write)
    with pytest.raises(OSError):
        write_metrics_svg([{"kind": "train", "step": 1, "loss": 0.69}], target, title="t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.svg"]
