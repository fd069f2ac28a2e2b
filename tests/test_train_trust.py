"""The trainer executes nothing it reads and writes only under STORE/runs/ (issue 13, trainer items).

Checkpoints are safetensors + JSON, verified against the sha256s written at save time; a pickle
where a checkpoint is expected is refused without being unpickled; run ids are validated
before any path is built; a pair whose chat template breaks the prefix property is skipped
and counted (or fails the run, exit 2, naming it); the CLI prints the tokenize ledger.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from trainer_toys import make_store, planted_rows

from trainer.runs import CheckpointError, latest_checkpoint, load_checkpoint
from trainer.tokenize import TINY_TOKENIZER
from trainer.train import make_config, train

TINY = "tiny-llama:layers=1,hidden=32,heads=2"
FAST = dict(model=TINY, max_length=64, threads=1, lr=1e-3, warmup_steps=2, eval_every=0)


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store", {"train": planted_rows(12), "validation": planted_rows(4, seed=1, prefix="v"),
                                           "test": planted_rows(4, seed=2, prefix="t")})


def _cli():
    import typer

    from flows.train_cmd import train as train_cmd

    app = typer.Typer()
    app.command()(train_cmd)
    app.command("noop")(lambda: None)
    return app


def _invoke(*args: str):
    from typer.testing import CliRunner

    return CliRunner().invoke(_cli(), ["train", *args])


def _pickle_payload(marker: Path) -> bytes:
    """Bytes whose unpickling creates ``marker`` (what a hostile writer of the run dir would plant)."""
    import pickle  # tests only: builds the hostile file

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    return pickle.dumps({"model": Payload()})


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_is_safetensors_plus_json_with_sha256s(store):
    res = train(make_config(store.root, "v-toy", run_id="ck", max_steps=2, checkpoint_every=1, keep_checkpoints=2, **FAST))
    ckpts = sorted((res.run_dir / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-000001", "step-000002"]
    assert sorted(p.name for p in ckpts[-1].iterdir()) == ["checkpoint.json", "model.safetensors",
                                                          "optimizer.safetensors", "state.json"]
    index = json.loads((ckpts[-1] / "checkpoint.json").read_text())
    assert set(index["files"]) == {"model.safetensors", "optimizer.safetensors", "state.json"}
    assert all(len(f["sha256"]) == 64 for f in index["files"].values())
    state = load_checkpoint(ckpts[-1])
    assert state["step"] == 2 and state["optimizer"]["t"] == 2 and state["data_position"] == 8
    assert "lm_head.weight" in state["model"]


def test_resume_refuses_a_planted_pickle_and_never_runs_it(store, tmp_path):
    train(make_config(store.root, "v-toy", run_id="victim", max_steps=2, **FAST))
    marker = tmp_path / "PWNED"
    ckdir = store.root / "runs" / "victim" / "checkpoints"
    (ckdir / "step-000099.pt").write_bytes(_pickle_payload(marker))  # the newest entry, old format
    res = _invoke("v-toy", "--store", str(store.root), "--model", TINY, "--steps", "3", "--max-length", "64",
                  "--threads", "1", "--resume", "victim")
    assert res.exit_code == 2, res.output
    assert "step-000099.pt" in res.output and "unpickling can run code" in res.output
    assert "Traceback" not in res.output
    assert not marker.exists()


def test_a_pickle_inside_a_checkpoint_directory_is_refused(store, tmp_path):
    res = train(make_config(store.root, "v-toy", run_id="victim", max_steps=2, **FAST))
    ckpt = latest_checkpoint(res.run_dir)
    marker = tmp_path / "PWNED"
    # the payload replaces the model file: its sha256 no longer matches
    (ckpt / "model.safetensors").write_bytes(_pickle_payload(marker))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* differs"):
        load_checkpoint(ckpt)
    # ... and with the index rewritten to match, the bytes are still parsed only as safetensors
    index = json.loads((ckpt / "checkpoint.json").read_text())
    import hashlib
    index["files"]["model.safetensors"]["sha256"] = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    (ckpt / "checkpoint.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_a_damaged_checkpoint_names_the_file(store):
    res = train(make_config(store.root, "v-toy", run_id="r", max_steps=2, **FAST))
    ckpt = latest_checkpoint(res.run_dir)
    data = bytearray((ckpt / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ckpt / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: sha256"):
        train(make_config(store.root, "v-toy", run_id="r", resume=True, max_steps=3, **FAST))


# ---------------------------------------------------------------- run ids
@pytest.mark.parametrize("flag", ["--run-id", "--resume"])
@pytest.mark.parametrize("bad", ["../../x", "/tmp/abs-run", "a/b", ".hidden", "x..y"])
def test_unsafe_run_ids_exit_2_and_write_nothing(store, tmp_path, flag, bad):
    before = sorted(p for p in tmp_path.rglob("*"))
    res = _invoke("v-toy", "--store", str(store.root), "--model", TINY, "--steps", "1", flag, bad)
    assert res.exit_code == 2, res.output
    assert "run id" in res.output and "is not allowed" in res.output and "Traceback" not in res.output
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/abs-run").exists()


def test_unsafe_run_id_refused_by_the_config_too(store):
    with pytest.raises(ValueError, match="run id"):
        make_config(store.root, "v-toy", run_id="../escape", **FAST)


# ---------------------------------------------------------------- template mismatch
def _mismatching_tokenizer(dst: Path) -> Path:
    """The repo tokenizer with a template that renders the assistant turn differently for replies
    containing 'MISMATCH' (so their prompt is not a prefix of prompt + reply)."""
    shutil.copytree(TINY_TOKENIZER, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = cfg["chat_template"].replace(
        "'<|im_start|>' + message['role']",
        "'<|im_start|>' + ('bot' if 'MISMATCH' in message['content'] else message['role'])")
    assert cfg["chat_template"] != json.loads((TINY_TOKENIZER / "tokenizer_config.json").read_text())["chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dst


@pytest.fixture
def mismatch_store(tmp_path):
    train_rows = planted_rows(12)
    train_rows[3] = {**train_rows[3], "pair_id": "bad-pair",
                     "rejected": [{"role": "assistant", "content": "MISMATCH here"}]}
    return make_store(tmp_path / "mm", {"train": train_rows, "validation": planted_rows(4, seed=1, prefix="v"),
                                        "test": planted_rows(4, seed=2, prefix="t")})


def test_template_mismatch_pair_is_skipped_and_counted(mismatch_store, tmp_path):
    tok = _mismatching_tokenizer(tmp_path / "tok")
    res = _invoke("v-toy", "--store", str(mismatch_store.root), "--model", TINY, "--tokenizer", str(tok), "--steps", "1",
                  "--max-length", "64", "--threads", "1", "--run-id", "mm")
    assert res.exit_code == 0, res.output
    led = json.loads((mismatch_store.root / "runs" / "mm" / "run.json").read_text())["tokenize_ledger"]["train"]
    assert led["rows_in"] == 12 and led["kept"] == 11 and led["skipped_template_mismatch"] == 1
    assert led["dropped_pair_ids"]["skipped_template_mismatch"] == ["bad-pair"]
    assert led["skipped"] == [{"pair_id": "bad-pair", "reason": "template_mismatch", "side": "rejected",
                               "position": led["skipped"][0]["position"]}]
    # the summary prints the ledger, not only run.json
    assert "train: 12 rows in, 11 used, 0 dropped, 1 skipped [template_mismatch 1 (bad-pair)]" in res.output
    assert "validation: 4 rows in, 4 used" in res.output


def test_template_mismatch_fails_the_run_when_asked(mismatch_store, tmp_path):
    tok = _mismatching_tokenizer(tmp_path / "tok")
    res = _invoke("v-toy", "--store", str(mismatch_store.root), "--model", TINY, "--tokenizer", str(tok), "--steps", "1",
                  "--max-length", "64", "--threads", "1", "--run-id", "mm", "--on-template-mismatch", "fail")
    assert res.exit_code == 2, res.output
    assert "bad-pair" in res.output and "prefix" in res.output and "Traceback" not in res.output
    assert not (mismatch_store.root / "runs" / "mm").exists()


# ---------------------------------------------------------------- bad option values
@pytest.mark.parametrize("flag,value,field", [("--lr", "inf", "lr"), ("--beta", "inf", "beta"),
                                              ("--weight-decay", "inf", "weight_decay"), ("--rpo-alpha", "inf", "rpo_alpha")])
def test_infinite_option_values_exit_2_before_anything_runs(store, flag, value, field):
    """``--lr inf`` trained with NaN weights and exited 0 (validation loss nan); an infinite
    learning rate, beta, weight decay or NLL weight is a bad value, refused like a negative one."""
    res = _invoke("v-toy", "--store", str(store.root), "--model", TINY, "--steps", "1", flag, value)
    assert res.exit_code == 2, res.output
    assert "bad training options" in res.output and field in res.output and "finite" in res.output
    assert not (store.root / "runs").exists()


@pytest.mark.parametrize("prompt_length", ["32", "40"])
def test_a_prompt_budget_without_room_for_a_completion_exits_2(store, prompt_length):
    """``--max-length 32 --max-prompt-length 32`` passed TrainConfig and failed inside ``train()``, after the
    version was opened and hashed, with a TokenizeConfig traceback (exit 1): the config refuses it, exit 2."""
    with pytest.raises(ValueError, match="no room"):
        make_config(store.root, "v-toy", model=TINY, max_length=32, max_prompt_length=int(prompt_length))
    res = _invoke("v-toy", "--store", str(store.root), "--model", TINY, "--steps", "1",
                  "--max-length", "32", "--max-prompt-length", prompt_length)
    assert res.exit_code == 2, (res.output, res.exception)
    assert "bad training options" in res.output and "max_prompt_length" in res.output and "no room" in res.output
    assert not (store.root / "runs").exists()
    make_config(store.root, "v-toy", model=TINY, max_length=32, max_prompt_length=31)  # one token of room is enough


def test_no_train_pair_left_after_tokenisation_exits_2_with_the_ledger(store):
    """Every train prompt longer than --max-length (all dropped, prompt_too_long): the run ended with
    PairStream's bare ValueError traceback (exit 1) after computing and caching reference log-probs; now
    exit 2 naming the split's ledger, before any reference work or run directory."""
    from trainer.train import NoTrainingPairs

    with pytest.raises(NoTrainingPairs, match="prompt_too_long 12"):
        train(make_config(store.root, "v-toy", **{**FAST, "max_length": 8}, max_steps=1))
    res = _invoke("v-toy", "--store", str(store.root), "--model", TINY, "--steps", "1", "--max-length", "8")
    assert res.exit_code == 2, (res.output, res.exception)
    assert "Traceback" not in res.output and "no train pair" in res.output and "12 rows in, 0 used" in res.output
    assert "--max-length" in res.output
    assert not (store.root / "runs").exists()


def _no_template_tokenizer(dst: Path) -> Path:
    shutil.copytree(TINY_TOKENIZER, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    del cfg["chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dst


def _damaged_tokenizer(dst: Path) -> Path:
    shutil.copytree(TINY_TOKENIZER, dst)
    (dst / "tokenizer.json").write_text('{"x": 1}', encoding="utf-8")
    return dst


@pytest.mark.parametrize("case,needle", [("missing", "no such directory"), ("empty", "no tokenizer.json"),
                                         ("no_template", "no chat_template"), ("damaged", "cannot be loaded")])
def test_an_unusable_tokenizer_directory_exits_2_naming_it(store, tmp_path, case, needle):
    """``--tokenizer`` naming a missing directory, one without the tokenizer files, a damaged
    tokenizer.json or a tokenizer without a chat template: exit 2 with the path and the reason, never a traceback or a Hub message."""
    path = {"missing": lambda: tmp_path / "nope", "empty": lambda: (tmp_path / "empty").mkdir() or tmp_path / "empty",
            "no_template": lambda: _no_template_tokenizer(tmp_path / "tok"),
            "damaged": lambda: _damaged_tokenizer(tmp_path / "tok")}[case]()
    res = _invoke("v-toy", "--store", str(store.root), "--model", TINY, "--steps", "1", "--tokenizer", str(path))
    assert res.exit_code == 2, (res.output, res.exception)
    assert str(path) in res.output and needle in res.output and "Repo id" not in res.output
    assert not (store.root / "runs").exists()


@pytest.mark.parametrize("spec,needle", [
    ("tiny-llama:heads=0", "heads"),  # was ZeroDivisionError
    ("tiny-llama:layers=0,hidden=32,heads=2", "layers"),  # was a model without a layer, trained
    ("tiny-llama:layers=-1,hidden=32,heads=2", "layers"),
    ("tiny-llama:hidden=-32,heads=2", "hidden"),  # was a negative-dimension RuntimeError
    ("tiny-llama:hidden=32,heads=2,kv_heads=3", "kv_heads"),  # was trained with a broken attention
    ("tiny-llama:hidden=32,heads=2,intermediate=0", "intermediate"),
    ("tiny-llama:hidden=32,heads=2,tie=2", "tie"),
])
def test_bad_tiny_model_spec_values_exit_2_naming_the_key(store, spec, needle):
    from trainer.model import ModelSpecError, parse_model

    with pytest.raises(ModelSpecError, match=needle):
        parse_model(spec)
    res = _invoke("v-toy", "--store", str(store.root), "--model", spec, "--steps", "1")
    assert res.exit_code == 2, (res.output, res.exception)
    assert needle in res.output and not (store.root / "runs").exists()


def test_two_runs_never_share_a_run_directory(store, monkeypatch):
    """The directory is claimed (an exclusive mkdir), not checked and then written: another run that
    creates it right after a check (started together with the same --run-id, or the same settings in
    the same second) keeps it to itself."""
    other = store.root / "runs" / "same"
    other.mkdir(parents=True)
    (other / "config.json").write_text('{"other": "run"}')
    real_exists = Path.exists
    # what a check made a moment before the other run created the directory saw
    monkeypatch.setattr(Path, "exists", lambda self, *a, **k: False if self == other else real_exists(self, *a, **k))
    with pytest.raises(FileExistsError, match="exists; pick another run_id"):
        train(make_config(store.root, "v-toy", run_id="same", max_steps=1, **FAST))
    assert (other / "config.json").read_text() == '{"other": "run"}'
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]


def test_run_id_and_resume_naming_two_runs_exit_2(store):
    """--run-id new --resume old resumed 'old' and ignored --run-id; one of the two was not what was meant."""
    assert _invoke("v-toy", "--store", str(store.root), "--model", TINY, "--steps", "1", "--max-length", "64",
                   "--threads", "1", "--run-id", "old").exit_code == 0
    before = (store.root / "lineage" / "v-toy.jsonl").read_text()
    res = _invoke("v-toy", "--store", str(store.root), "--model", TINY, "--steps", "1", "--max-length", "64",
                  "--threads", "1", "--run-id", "new", "--resume", "old")
    assert res.exit_code == 2, res.output
    assert "--run-id new and --resume old name two runs" in " ".join(res.output.split())
    assert (store.root / "lineage" / "v-toy.jsonl").read_text() == before  # nothing resumed
    assert not (store.root / "runs" / "new").exists()


def test_a_run_in_use_cannot_be_resumed_by_another_process(store):
    """A run holds its lock from its claim to its end: a resume while it still trains (a scheduler's retry of a
    run it thinks crashed) or while another resume runs is refused (exit 2), and writes nothing into the run."""
    from pipeline.store import Store

    s = Store(store.root)
    seen = []

    def probe(kind, _payload):  # while the run trains, the lock is held: another process's try fails
        if kind == "start":
            with s.try_lock("train-run-busy") as free:
                seen.append(free)

    train(make_config(store.root, "v-toy", run_id="busy", max_steps=2, checkpoint_every=1, **FAST), on_event=probe)
    assert seen == [False]
    from trainer.train import RunInUse

    run = store.root / "runs" / "busy"
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    with s.try_lock("train-run-busy") as free:  # (another process trains or resumes it now)
        assert free
        with pytest.raises(RunInUse, match="run busy is in use"):
            train(make_config(store.root, "v-toy", run_id="busy", resume=True, max_steps=2, checkpoint_every=1, **FAST))
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    # (free again: the resume goes on)
    assert train(make_config(store.root, "v-toy", run_id="busy", resume=True, max_steps=2, checkpoint_every=1, **FAST))


def test_a_resume_of_a_finished_run_returns_its_results_and_writes_nothing(store):
    """A scheduler's retry of a run that finished (``--resume RUN`` again): its recorded results, and nothing
    trained, evaluated, exported or written again -- it re-ran the test evaluation, the report and the export and
    appended a second resumed/finished pair to the version's lineage.  With other settings: refused, as before."""
    from typer.testing import CliRunner

    from flows.cli import app
    from trainer.train import ResumeMismatch

    first = train(make_config(store.root, "v-toy", run_id="done", max_steps=2, checkpoint_every=1, **FAST))
    run = store.root / "runs" / "done"
    lineage = store.root / "lineage" / "v-toy.jsonl"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    events = lineage.read_text()
    again = train(make_config(store.root, "v-toy", run_id="done", resume=True, max_steps=2, checkpoint_every=1, **FAST))
    assert lineage.read_text() == events and {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert again.final == json.loads(json.dumps(first.final)) and again.steps == first.steps == 2
    assert again.evaluation == json.loads(json.dumps(first.evaluation))
    assert again.already_finished and not first.already_finished
    res = CliRunner().invoke(app, ["train", "v-toy", "--store", str(store.root), "--resume", "done", "--steps", "2",
                                   "--checkpoint-every", "1", "--model", FAST["model"], "--max-length", "64", "--threads", "1",
                                   "--lr", "1e-3", "--warmup-steps", "2", "--eval-every", "0"])
    assert res.exit_code == 0, res.output
    assert "run done had finished: nothing trained or written again" in " ".join(res.output.split())
    assert lineage.read_text() == events
    with pytest.raises(ResumeMismatch, match="max_steps"):
        train(make_config(store.root, "v-toy", run_id="done", resume=True, max_steps=3, checkpoint_every=1, **FAST))
