"""--export / --eval-cmd: a save_pretrained checkpoint transformers loads, an external command's JSON in the lineage."""
from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest
import torch
from trainer_toys import make_store, planted_rows

from trainer.train import make_config, train

TINY = "tiny-llama:layers=1,hidden=32,heads=2"
FAST = dict(model=TINY, max_length=64, threads=1, lr=1e-3, warmup_steps=2, eval_every=0, test_eval=False)

# the "external benchmark": loads the export with transformers only, prints one JSON line
BENCH = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = tok("river stone absolutely", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    print("loading done")
    print(json.dumps({"ok": True, "n_ids": len(ids), "last_logit_sum": float(logits.sum()), "vocab": len(tok)}))
""")


def test_eval_cmd_runs_on_the_exported_checkpoint(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(BENCH)
    st = make_store(tmp_path / "s", {"train": planted_rows(12), "validation": planted_rows(4, seed=1, prefix="v"),
                                     "test": []})
    res = train(make_config(st.root, "v-toy", run_id="ext", max_steps=2,
                            eval_cmd=f"{sys.executable} {script} {{checkpoint}}", **FAST))
    export = res.run_dir / "export"
    assert (export / "config.json").exists() and (export / "model.safetensors").exists()
    assert (export / "tokenizer.json").exists() and (export / "tokenizer_config.json").exists()
    assert not list(export.glob("*.bin")) and not list(export.glob("*.pt"))
    ext = json.loads((res.run_dir / "external_eval.json").read_text())
    assert ext["status"] == "ok" and ext["result"]["ok"] is True and ext["argv"][-1] == str(export)
    # the exported weights are the trained ones: the same logits as our model from the final checkpoint
    from trainer.model import build_model, parse_model
    from trainer.runs import latest_checkpoint, load_checkpoint
    from trainer.tokenize import load_tokenizer

    tok = load_tokenizer(light=True)
    ours = build_model(parse_model(TINY), len(tok)).eval()
    ours.load_state_dict(load_checkpoint(latest_checkpoint(res.run_dir))["model"])
    ids = tok("river stone absolutely", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = float(ours(torch.tensor([ids]))[0, -1].sum())
    assert abs(ext["result"]["last_logit_sum"] - want) < 1e-3
    run = json.loads((res.run_dir / "run.json").read_text())
    assert run["final"]["external_eval"]["result"]["n_ids"] == len(ids) and run["export"] == str(export)
    lineage = [json.loads(x) for x in (st.root / "lineage" / "v-toy.jsonl").read_text().splitlines()]
    assert lineage[-1]["final"]["external_eval"]["status"] == "ok"


def test_a_failing_eval_cmd_is_recorded_and_the_run_finishes(tmp_path):
    st = make_store(tmp_path / "s", {"train": planted_rows(8), "validation": planted_rows(4, seed=1, prefix="v"),
                                     "test": []})
    res = train(make_config(st.root, "v-toy", run_id="bad", max_steps=1,
                            eval_cmd=f"{sys.executable} -c 'import sys; print(\"no json\"); sys.exit(3)' {{checkpoint}}",
                            **FAST))
    ext = json.loads((res.run_dir / "external_eval.json").read_text())
    assert ext["status"] == "exit 3" and ext["result"] is None and "no json" in ext["stdout_tail"]
    res = train(make_config(st.root, "v-toy", run_id="missing", max_steps=1, eval_cmd="/no/such/program {checkpoint}",
                            **FAST))
    assert json.loads((res.run_dir / "external_eval.json").read_text())["status"] == "not started"
    assert json.loads((res.run_dir / "run.json").read_text())["status"] == "finished"


def test_an_eval_cmd_that_cannot_run_is_recorded_and_the_run_finishes(tmp_path):
    """A program that exists but cannot be executed (a directory, no x bit) is 'not started', like a
    missing one: the run still finishes (it stayed "running", without report or lineage, before)."""
    st = make_store(tmp_path / "s", {"train": planted_rows(8), "validation": planted_rows(4, seed=1, prefix="v"),
                                     "test": []})
    plain = tmp_path / "not-executable.sh"
    plain.write_text("#!/bin/sh\necho '{}'\n")
    for run_id, cmd in (("dir", f"{tmp_path} {{checkpoint}}"), ("nox", f"{plain} {{checkpoint}}")):
        res = train(make_config(st.root, "v-toy", run_id=run_id, max_steps=1, eval_cmd=cmd, **FAST))
        ext = json.loads((res.run_dir / "external_eval.json").read_text())
        assert ext["status"] == "not started" and "Permission denied" in ext["error"], ext
        assert json.loads((res.run_dir / "run.json").read_text())["status"] == "finished"
        assert (res.run_dir / "report.html").exists()


def test_an_eval_cmd_with_unbalanced_quotes_exits_2_before_training(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    st = make_store(tmp_path / "s", {"train": planted_rows(8), "validation": planted_rows(4, seed=1, prefix="v")})
    with pytest.raises(ValueError, match="cannot be split into words"):
        make_config(st.root, "v-toy", eval_cmd="sh -c 'echo {checkpoint}", **FAST)
    out = CliRunner().invoke(app, ["train", "v-toy", "--store", str(st.root), "--model", TINY, "--steps", "1",
                                   "--eval-cmd", "sh -c 'echo {checkpoint}"])
    assert out.exit_code == 2, out.output
    assert "cannot be split into words" in out.output
    assert not (st.root / "runs").exists()  # nothing trained, nothing written


def test_a_reference_model_with_another_vocabulary_is_refused(tmp_path):
    """A local reference directory whose tokenizer maps tokens to other ids (same size: it loads and scores
    without an error) would give DPO rewards against other tokens; refused before any work, the same
    directory with the run's vocabulary trains."""
    from trainer.external import export_checkpoint
    from trainer.model import ModelSpecError, build_model, parse_model
    from trainer.tokenize import load_tokenizer

    st = make_store(tmp_path / "s", {"train": planted_rows(8), "validation": planted_rows(4, seed=1, prefix="v")})
    tok = load_tokenizer(light=True)
    same = export_checkpoint(build_model(parse_model(TINY + ",seed=5"), len(tok)), tok, tmp_path / "ref-same")
    other = tmp_path / "ref-other"
    shutil.copytree(same, other)
    spec = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = (next(k for k, i in vocab.items() if i == n) for n in (200, 201))
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens trade ids: same size, other meaning
    (other / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ModelSpecError, match=r"reference model .*ref-other ships a tokenizer whose vocabulary differs "
                                             r"from the run's .* in 2 tokens"):
        train(make_config(st.root, "v-toy", run_id="other", max_steps=1, reference_model=str(other), **FAST))
    assert not (st.root / "runs").exists()
    res = train(make_config(st.root, "v-toy", run_id="same", max_steps=1, reference_model=str(same), **FAST))
    assert json.loads((res.run_dir / "run.json").read_text())["status"] == "finished"
