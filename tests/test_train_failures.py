"""A run's life when things go wrong: the version it trains on is held against `prefpipe gc`, any exception
after the run started leaves run.json saying failed (and a resume finishes it), and the failure paths a user
meets -- a full disk, a damaged checkpoint, a run directory of another run, two resumes at once -- end with a
clear message and nothing half-written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_toys import make_store, planted_rows

from trainer.train import make_config, train

TINY = "tiny-llama:layers=1,hidden=32,heads=2"
FAST = dict(model=TINY, max_length=64, threads=1, lr=1e-3, warmup_steps=2, eval_every=0)


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store", {"train": planted_rows(12), "validation": planted_rows(4, seed=1, prefix="v"),
                                           "test": planted_rows(4, seed=2, prefix="t")})


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
