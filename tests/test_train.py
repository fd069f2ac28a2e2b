"""The DPO training loop: refuses bad versions, accumulation, exact resume, cache, lineage, learning."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_toys import make_store, planted_rows

from trainer.train import (
    ResumeMismatch,
    VersionNotCertified,
    VersionTampered,
    lr_schedule,
    make_config,
    train,
)

TINY = "tiny-llama:layers=1,hidden=32,heads=2"
FAST = dict(model=TINY, max_length=64, threads=1, lr=1e-3, warmup_steps=2, eval_every=0)


def splits(n_train=24, n_val=8):
    return {"train": planted_rows(n_train), "validation": planted_rows(n_val, seed=1, prefix="v"),
            "test": planted_rows(4, seed=2, prefix="t")}


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store", splits())


def final_state(run_dir: Path) -> dict:
    from trainer.runs import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir))


def train_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


# ---------------------------------------------------------------- refusing versions
def test_refuses_version_without_certification(tmp_path):
    st = make_store(tmp_path / "s", splits(), certified=None)
    with pytest.raises(VersionNotCertified, match="no certification record"):
        train(make_config(st.root, "v-toy", max_steps=1, **FAST))
    assert not (st.root / "runs").exists()


def test_refuses_rejected_version(tmp_path):
    st = make_store(tmp_path / "s", splits(), certified=False)
    with pytest.raises(VersionNotCertified, match="rejected"):
        train(make_config(st.root, "v-toy", max_steps=1, **FAST))


def test_refuses_tampered_version(store):
    path = store.get("v-toy").split_path("validation")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VersionTampered, match="validation.parquet: sha256 differs"):
        train(make_config(store.root, "v-toy", max_steps=1, **FAST))
    assert not (store.root / "runs").exists()


# ---------------------------------------------------------------- the math of the loop
def test_lr_schedule_warmup_then_cosine():
    f = [lr_schedule(s, peak=2.0, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.5, 1.0, 1.5, 2.0] and f[4] == 2.0
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and abs(f[20] - 0.2) < 1e-12


def test_adamw_equals_torch_adamw_bit_for_bit():
    from trainer.optim import AdamW

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    ours = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    ours.load_state_dict(ref.state_dict())

    def groups(m):
        ps = list(m.parameters())
        return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]

    t_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    o_opt = AdamW(groups(ours), betas=(0.9, 0.95))
    for step in range(5):
        x = torch.randn(4, 7)
        lr = 1e-2 * (step + 1) / 5
        for g in t_opt.param_groups:
            g["lr"] = lr
        for m in (ref, ours):
            m(x).pow(2).sum().backward()
        t_opt.step()
        t_opt.zero_grad()
        o_opt.step(lr)
        o_opt.zero_grad()
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), n


def test_grad_accumulation_4x1_equals_1x4(store):
    a = train(make_config(store.root, "v-toy", run_id="acc-1x4", batch_size=4, grad_accum=1, max_steps=3, **FAST))
    b = train(make_config(store.root, "v-toy", run_id="acc-4x1", batch_size=1, grad_accum=4, max_steps=3, **FAST))
    sa, sb = final_state(a.run_dir)["model"], final_state(b.run_dir)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)
    la, lb = train_metrics(a.run_dir), train_metrics(b.run_dir)
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) < 1e-5
        assert x["tokens"] == y["tokens"]  # the same pairs in the same order


def _crashed(root, version: str, run_id: str, cfg: dict, when=lambda kind, payload: kind == "step" and payload["step"] == 3
             ) -> None:
    """A run of ``cfg`` that crashes at the first event ``when`` says (default: right after its step 3), by an
    exception from its event hook."""
    class Crash(Exception):
        pass

    def crash(kind, payload):
        if when(kind, payload):
            raise Crash

    with pytest.raises(Crash):
        train(make_config(root, version, run_id=run_id, **cfg), on_event=crash)


def test_checkpoint_resume_continues_exactly(store):
    cfg = dict(max_steps=6, checkpoint_every=3, batch_size=3, **FAST)
    full = train(make_config(store.root, "v-toy", run_id="uninterrupted", **cfg))
    _crashed(store.root, "v-toy", "interrupted", cfg)
    resumed = train(make_config(store.root, "v-toy", run_id="interrupted", resume=True, **cfg))
    assert resumed.steps == 6
    s1, s2 = final_state(full.run_dir), final_state(resumed.run_dir)
    for k in s1["model"]:
        assert torch.equal(s1["model"][k], s2["model"][k]), k
    for key in ("exp_avg", "exp_avg_sq"):
        for g1, g2 in zip(s1["optimizer"][key], s2["optimizer"][key]):
            assert all(torch.equal(a, b) for a, b in zip(g1, g2)), key
    assert s1["optimizer"]["t"] == s2["optimizer"]["t"] == 6 and s1["data_position"] == s2["data_position"] == 18
    m1, m2 = train_metrics(full.run_dir), train_metrics(resumed.run_dir)
    assert [r["step"] for r in m2] == [1, 2, 3, 4, 5, 6]  # nothing duplicated after the resume
    assert [r["loss"] for r in m1] == [r["loss"] for r in m2]
    lineage = [json.loads(x) for x in (store.root / "lineage" / "v-toy.jsonl").read_text().splitlines()]
    # (the crash was recorded: a "failed" event, then the resume's)
    assert [e["event"] for e in lineage if e["run_id"] == "interrupted"] == ["started", "failed", "resumed", "finished"]


def test_resume_refuses_changed_settings(store):
    train(make_config(store.root, "v-toy", run_id="r", max_steps=2, **FAST))
    with pytest.raises(ResumeMismatch, match="lr"):
        train(make_config(store.root, "v-toy", run_id="r", resume=True, max_steps=2, **{**FAST, "lr": 5e-4}))


def test_resume_refuses_latest_that_now_names_another_version(tmp_path):
    """'latest' is stored as typed in the fingerprint; a version curated since the run started must not
    become the data of its second half (nor get its resumed / finished lineage events)."""
    root = tmp_path / "store"
    make_store(root, splits(), version_id="v-aaa")
    cfg = dict(max_steps=4, checkpoint_every=2, batch_size=3, **{**FAST, "test_eval": False})
    full = train(make_config(root, "v-aaa", run_id="full", **cfg))
    _crashed(root, "latest", "r", cfg, when=lambda kind, payload: kind == "step" and payload["step"] == 2)
    make_store(root, {"train": planted_rows(24, seed=7, prefix="n"), "validation": planted_rows(8, seed=8, prefix="w")},
               version_id="v-bbb")  # now 'latest'
    with pytest.raises(ResumeMismatch, match=r"trained on version v-aaa, but 'latest' now resolves to v-bbb"):
        train(make_config(root, "latest", run_id="r", resume=True, **cfg))
    assert not (root / "lineage" / "v-bbb.jsonl").exists()
    assert not (root / "runs" / "reference-cache" / "v-bbb").exists()  # refused before the reference pass
    resumed = train(make_config(root, "v-aaa", run_id="r", resume=True, **cfg))  # the id it started with
    assert [r["loss"] for r in train_metrics(resumed.run_dir)] == [r["loss"] for r in train_metrics(full.run_dir)]
    assert json.loads((resumed.run_dir / "run.json").read_text())["version_id"] == "v-aaa"


@pytest.mark.parametrize("tail", ['{"kind": "train", "step": 4, "loss": 0.69', "\x00" * 64],
                         ids=["torn-line", "nul-bytes"])
def test_resume_after_a_torn_last_metrics_line(store, tail):
    """The crash a resume follows can leave half a line (killed mid-write, disk full) or NUL bytes (power
    loss) at the end of metrics.jsonl; that line came after the checkpoint and is dropped, not a traceback."""
    cfg = dict(max_steps=4, checkpoint_every=2, batch_size=3, **{**FAST, "test_eval": False})
    full = train(make_config(store.root, "v-toy", run_id="full", **cfg))
    _crashed(store.root, "v-toy", "r", cfg)
    with open(store.root / "runs" / "r" / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(tail)
    resumed = train(make_config(store.root, "v-toy", run_id="r", resume=True, **cfg))
    assert [r["loss"] for r in train_metrics(resumed.run_dir)] == [r["loss"] for r in train_metrics(full.run_dir)]


def test_resume_refuses_a_changed_tokenizer(store, tmp_path):
    """A tokenizer directory is named by path in the settings; its files changing since the run started
    changes the token ids (the reference cache key says so)."""
    import shutil

    from trainer.tokenize import TINY_TOKENIZER

    tok = tmp_path / "tok"
    shutil.copytree(TINY_TOKENIZER, tok)
    cfg = dict(max_steps=1, tokenizer=str(tok), **{**FAST, "test_eval": False})
    train(make_config(store.root, "v-toy", run_id="t", **cfg))
    conf = json.loads((tok / "tokenizer_config.json").read_text())
    conf["chat_template"] = conf["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    (tok / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(ResumeMismatch, match=r"reference log-probs .* differing: tokenizer"):
        train(make_config(store.root, "v-toy", run_id="t", resume=True, **cfg))


# ---------------------------------------------------------------- run outputs
def test_run_outputs_reference_cache_and_lineage(store):
    version_dir = store.get("v-toy").path
    before = sorted(p.relative_to(version_dir) for p in version_dir.rglob("*"))
    r1 = train(make_config(store.root, "v-toy", run_id="one", max_steps=2, beta=0.2, loss_type="ipo", **FAST))
    r2 = train(make_config(store.root, "v-toy", run_id="two", max_steps=2, beta=0.2, loss_type="ipo", **FAST))
    # the version itself is untouched; the cache sits beside it
    assert sorted(p.relative_to(version_dir) for p in version_dir.rglob("*")) == before
    assert store.get("v-toy").verify() == []
    run1, run2 = (json.loads((r.run_dir / "run.json").read_text()) for r in (r1, r2))
    cache = Path(run1["reference_cache"]["path"])
    assert cache.parent == store.root / "runs" / "reference-cache" / "v-toy" and cache.exists()
    assert run1["reference_cache"]["hit"] is False and run2["reference_cache"]["hit"] is True
    assert run1["reference_cache"]["key"] == run2["reference_cache"]["key"]
    assert json.loads(cache.with_suffix(".json").read_text())["version_id"] == "v-toy"
    # lineage in the run dir
    assert run1["version_id"] == "v-toy" and run1["status"] == "finished"
    assert run1["beta"] == 0.2 and run1["objective"] == "ipo"
    assert len(run1["tokenizer"]["tokenizer_sha256"]) == 64 and len(run1["tokenizer"]["chat_template_sha256"]) == 64
    assert run1["code_version"]["version"].startswith("0.1.0+") and run1["certification"]["verdict"] == "certified"
    assert run1["tokenize_ledger"]["train"]["kept"] == 24
    # metrics + plot
    rec = train_metrics(r1.run_dir)[-1]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "tokens/s", "peak_rss_mib", "lr", "grad_norm"):
        assert key in rec, key
    assert (r1.run_dir / "metrics.svg").read_text().startswith("<svg")
    # the version's lineage record
    events = [json.loads(x) for x in (store.root / "lineage" / "v-toy.jsonl").read_text().splitlines()]
    assert [(e["run_id"], e["event"]) for e in events] == [("one", "started"), ("one", "finished"),
                                                           ("two", "started"), ("two", "finished")]
    # a different max_length is a different cache entry
    r3 = train(make_config(store.root, "v-toy", run_id="three", max_steps=1, **{**FAST, "max_length": 48}))
    assert json.loads((r3.run_dir / "run.json").read_text())["reference_cache"]["key"] != run1["reference_cache"]["key"]


def test_pair_weights_scale_the_loss(tmp_path):
    rows = planted_rows(8)
    half = [{**r, "weight": 0.5} for r in rows]
    outs = []
    for name, data in (("w1", [{**r, "weight": 1.0} for r in rows]), ("mixed", [{**r, "weight": w} for r, w in
                                                                                zip(rows, [1.0, 0.25] * 4)])):
        st = make_store(tmp_path / name, {"train": data, "validation": half[:4], "test": half[:2]})
        outs.append(train(make_config(st.root, "v-toy", run_id=name, max_steps=1, batch_size=8, **FAST)))
    l_uniform, l_mixed = (train_metrics(o.run_dir)[0]["loss"] for o in outs)
    assert l_uniform == pytest.approx(l_mixed, rel=1e-6)  # at step 1 every pair's loss is log 2: weights only re-mix


@pytest.mark.slow
def test_planted_preference_is_learned_on_held_out_pairs(tmp_path):
    st = make_store(tmp_path / "s", {"train": planted_rows(96), "validation": planted_rows(48, seed=7, prefix="v"),
                                     "test": planted_rows(8, seed=8, prefix="t")})
    res = train(make_config(st.root, "v-toy", model="tiny-llama:layers=2,hidden=64,heads=4", max_length=64, threads=1,
                            max_steps=200, batch_size=8, lr=1e-3, warmup_steps=10, eval_every=50, beta=0.1))
    evals = [r for r in map(json.loads, (res.run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9  # chance is 0.5
    assert evals[-1]["eval/rewards/margins"] > 0.5


@pytest.mark.parametrize("pack", [True, False])
def test_sequence_logps_length_groups_match_full_logits(pack):
    """Our forward (tiny_llama, packed sequences with block-diagonal attention, or length groups
    without an attention mask; fused lm-head) equals transformers' LlamaForCausalLM with an
    attention mask and full logits, in float64."""
    from trainer.model import build_model, length_groups, parse_model, sequence_logps
    from trainer.tiny_llama import to_hf

    torch.manual_seed(0)
    model = build_model(parse_model("tiny-llama:layers=2,hidden=32,heads=2,kv_heads=1"), 301).double()
    hf = to_hf(model).double()
    lengths = [17, 5, 30, 29, 12, 30, 2]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 301, (n,))
        mask[i, n // 2:n] = True  # second half is the completion
    attn = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    ours = sequence_logps(model, ids, mask, chunk_size=7, pack=pack).summed
    ours.sum().backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    logits = hf(input_ids=ids, attention_mask=attn).logits  # (B, T, V): the plain reference
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    plain = (lp * mask[:, 1:]).sum(1)
    plain.sum().backward()
    torch.testing.assert_close(ours, plain, rtol=1e-10, atol=1e-10)
    for n, p in hf.named_parameters():
        torch.testing.assert_close(g_ours[n], p.grad, rtol=1e-8, atol=1e-10, msg=n)
    assert sorted(i for g in length_groups(lengths) for i in g) == list(range(len(lengths)))


def test_packed_forward_equals_separate_forwards():
    """seq_lens packing: each sequence's hidden states equal running it alone (positions restart,
    no attention across sequences), with grouped-query attention, in float64."""
    from trainer.model import build_model, parse_model

    torch.manual_seed(1)
    body = build_model(parse_model("tiny-llama:layers=2,hidden=32,heads=4,kv_heads=2"), 97).double().get_decoder()
    seqs = [torch.randint(0, 97, (n,)) for n in (5, 1, 12, 7)]
    packed = body(torch.cat(seqs)[None], seq_lens=[len(x) for x in seqs]).last_hidden_state[0]
    for got, x in zip(packed.split([len(x) for x in seqs]), seqs):
        torch.testing.assert_close(got, body(x[None]).last_hidden_state[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="packed input"):
        body(torch.cat(seqs)[None], seq_lens=[5, 1])


def test_forward_parts_are_whole_pairs_within_the_budget():
    from trainer.data import forward_parts
    from trainer.tokenize import TokenizedPair

    pairs = [TokenizedPair(f"p{i}", (1,) * n, (2,) * n, (3,) * n) for i, n in enumerate([3, 3, 10, 1, 1, 1])]
    parts = forward_parts(pairs, max_tokens=12)  # num_tokens = 4n: 12, 12, 40, 4, 4, 4
    assert [[p.pair_id for p in part] for part in parts] == [["p0"], ["p1"], ["p2"], ["p3", "p4", "p5"]]
    assert [len(x) for x in forward_parts(pairs, max_tokens=100, max_pairs=2)] == [2, 2, 2]


def test_pack_budget_does_not_change_the_step(store):
    a = train(make_config(store.root, "v-toy", run_id="pack-all", batch_size=4, max_steps=2, **FAST))
    b = train(make_config(store.root, "v-toy", run_id="pack-one", batch_size=4, max_steps=2, pairs_per_forward=1, **FAST))
    sa, sb = final_state(a.run_dir)["model"], final_state(b.run_dir)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_light_tokenizer_equals_autotokenizer():
    """train() loads the repo's tokenizer without transformers; ids, ledger, specials, template
    rendering and the fingerprint (part of the reference-cache key) must equal AutoTokenizer's."""
    from trainer_toys import source_rows

    from trainer.tokenize import ChatTokenizer, TokenizeConfig, load_tokenizer, tokenize_rows, tokenizer_fingerprint

    auto, light = load_tokenizer(), load_tokenizer(light=True)
    assert isinstance(light, ChatTokenizer) and not isinstance(auto, ChatTokenizer)
    rows = source_rows() + planted_rows(8)
    for max_length in (48, 256):
        cfg = TokenizeConfig(max_length=max_length)
        (pa, la), (pb, lb) = tokenize_rows(auto, rows, cfg), tokenize_rows(light, rows, cfg)
        assert pa == pb and la.as_dict() == lb.as_dict()
    assert tokenizer_fingerprint(auto) == tokenizer_fingerprint(light)
    for name in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        assert getattr(auto, name) == getattr(light, name), name
    assert len(auto) == len(light) and auto.get_vocab() == light.get_vocab()
    msgs = [{"role": "user", "content": " two  spaces\nand 日本語 "}, {"role": "assistant", "content": "<|im_end|>x"}]
    for gen in (True, False):
        text = auto.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        assert light.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False) == text
        ids = auto(text, add_special_tokens=False)["input_ids"]
        assert light(text, add_special_tokens=False)["input_ids"] == ids and light.decode(ids) == auto.decode(ids)
    assert light("x")["input_ids"] == auto("x")["input_ids"]  # what _specials probes for an added BOS


# ---------------------------------------------------------------- the command
def _cli():
    import typer

    from flows.train_cmd import train as train_cmd

    app = typer.Typer()
    app.command()(train_cmd)
    app.command("noop")(lambda: None)  # two commands: typer keeps the subcommand name
    return app


def test_cli_refuses_tampered_and_uncertified_with_exit_4(tmp_path):
    from typer.testing import CliRunner

    runner = CliRunner()
    st = make_store(tmp_path / "a", splits(), certified=None)
    res = runner.invoke(_cli(), ["train", "v-toy", "--store", str(st.root), "--model", TINY, "--steps", "1"])
    assert res.exit_code == 4 and "refused" in res.output and "no certification record" in res.output
    st = make_store(tmp_path / "b", splits())
    st.get("v-toy").split_path("train").write_bytes(b"not the file the manifest names")
    res = runner.invoke(_cli(), ["train", "v-toy", "--store", str(st.root), "--model", TINY, "--steps", "1"])
    assert res.exit_code == 4 and "do not match the manifest" in res.output


def test_cli_trains_and_prints_the_run_dir(store):
    from typer.testing import CliRunner

    res = CliRunner().invoke(_cli(), ["train", "v-toy", "--store", str(store.root), "--model", TINY, "--steps", "2",
                                      "--max-length", "64", "--threads", "1", "--run-id", "cli-run", "--loss-type", "hinge"])
    assert res.exit_code == 0, res.output
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    assert run_dir == store.root / "runs" / "cli-run" and (run_dir / "run.json").exists()
    assert json.loads((run_dir / "run.json").read_text())["objective"] == "hinge"
    res = CliRunner().invoke(_cli(), ["train", "v-toy", "--store", str(store.root), "--model", "gpt-17:huge", "--steps", "1"])
    assert res.exit_code == 2 and "neither a tiny spec" in res.output


def test_bf16_mixed_precision_trains_with_fp32_state(store):
    import math

    res = train(make_config(store.root, "v-toy", run_id="bf16", max_steps=3, batch_size=4, precision="bf16-mixed",
                            **FAST))
    recs = train_metrics(res.run_dir)
    assert abs(recs[0]["loss"] - math.log(2)) < 1e-3  # the reference pass ran at the same precision
    assert all(math.isfinite(r["loss"]) for r in recs)
    state = final_state(res.run_dir)
    assert all(v.dtype == torch.float32 for v in state["model"].values())
    run = json.loads((res.run_dir / "run.json").read_text())
    fp32 = train(make_config(store.root, "v-toy", run_id="fp32", max_steps=1, batch_size=4, **FAST))
    assert json.loads((fp32.run_dir / "run.json").read_text())["reference_cache"]["key"] != run["reference_cache"]["key"]


# ---------------------------------------------------------------- a non-finite loss stops the run
def _nan_loss_from(monkeypatch, *, train_call: int | None = None, in_eval: bool = False) -> None:
    """Make ``dpo_batch_loss`` return NaN losses from its ``train_call``-th training forward on (1-based;
    with FAST and batch_size=4 a step is one forward), or in every evaluation forward."""
    import trainer.train as tt

    real, calls = tt.dpo_batch_loss, {"train": 0}

    def patched(model, b, cfg):
        losses, weight, metrics = real(model, b, cfg)
        if torch.is_grad_enabled():
            calls["train"] += 1
            poison = train_call is not None and calls["train"] >= train_call
        else:
            poison = in_eval
        return (losses * float("nan"), weight, metrics) if poison else (losses, weight, metrics)

    monkeypatch.setattr(tt, "dpo_batch_loss", patched)


def test_nan_training_loss_stops_the_run_with_exit_5_naming_the_step(store, monkeypatch):
    from typer.testing import CliRunner

    _nan_loss_from(monkeypatch, train_call=3)
    res = CliRunner().invoke(_cli(), ["train", "v-toy", "--store", str(store.root), "--model", TINY, "--steps", "5",
                                      "--batch-size", "4", "--max-length", "64", "--threads", "1", "--lr", "1e-3",
                                      "--warmup-steps", "2", "--eval-every", "0", "--checkpoint-every", "2",
                                      "--run-id", "diverges"])
    assert res.exit_code == 5, res.output
    msg = " ".join(res.output.split())
    assert "step 3" in msg and "loss nan" in msg and "--lr" in msg and "precision" in msg, msg
    assert "validation loss" not in msg and not res.stdout.strip()  # no success summary, no run dir on stdout
    run_dir = store.root / "runs" / "diverges"
    run = json.loads((run_dir / "run.json").read_text())  # strict JSON: no NaN token
    assert run["status"] == "failed" and "final" not in run
    assert run["failure"]["reason"] == "non_finite_train_loss" and run["failure"]["step"] == 3
    assert run["failure"]["loss"] == "nan" and run["failure"]["last_checkpoint"] == "step-000002"
    assert run["failure"]["pair_ids"]
    # the checkpoint before the failure is kept; nothing at or after the failing step
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002"]
    assert [r["step"] for r in train_metrics(run_dir)] == [1, 2]
    events = [json.loads(x) for x in (store.root / "lineage" / "v-toy.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["started", "failed"] and events[-1]["failure"]["step"] == 3


def test_nan_validation_loss_at_the_end_fails_the_run(store, monkeypatch):
    from trainer.train import TrainingDiverged

    _nan_loss_from(monkeypatch, in_eval=True)
    with pytest.raises(TrainingDiverged, match=r"after step 2: validation loss nan") as err:
        train(make_config(store.root, "v-toy", run_id="eval-nan", max_steps=2, batch_size=4, **FAST))
    assert err.value.step == 2 and err.value.what == "eval/loss"
    run_dir = store.root / "runs" / "eval-nan"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and run["failure"]["reason"] == "non_finite_validation_loss"
    assert not (run_dir / "checkpoints").exists()  # no final checkpoint of a model that evaluates to NaN


def test_a_non_finite_reference_log_prob_exits_2_before_the_run_and_is_not_cached(store, monkeypatch):
    """A reference model that overflows (NaN/inf log-prob) cannot be trained against: said before the run,
    not as a training loss at step 1 with a hint to lower the lr, and not cached for every later run."""
    import math

    from typer.testing import CliRunner

    import trainer.reference as reference

    real = reference.compute_reference_logps

    def overflowing(*args, **kwargs):
        out = real(*args, **kwargs)
        pid = sorted(out)[0]
        out[pid] = (out[pid][0], -math.inf if pid.startswith("p") else math.nan)
        return out

    monkeypatch.setattr(reference, "compute_reference_logps", overflowing)
    args = ["train", "v-toy", "--store", str(store.root), "--model", TINY, "--steps", "1", "--max-length", "64",
            "--threads", "1", "--eval-every", "0", "--run-id", "ref-nan"]
    res = CliRunner().invoke(_cli(), args)
    assert res.exit_code == 2, res.output
    msg = " ".join(res.output.split())
    assert "reference model's log-probs are not finite" in msg and "1 of 36 pairs" in msg, msg
    assert not (store.root / "runs" / "ref-nan").exists() and not (store.root / "lineage").exists()
    assert not list((store.root / "runs" / "reference-cache").rglob("*.parquet"))
    monkeypatch.setattr(reference, "compute_reference_logps", real)  # the overflow fixed: the run trains
    assert CliRunner().invoke(_cli(), args).exit_code == 0


def test_resume_after_the_final_checkpoint_logs_the_final_eval_once(store):
    """Stopped after its final checkpoint (in the test evaluation, the report), a run resumes to finish:
    its final validation eval is in metrics.jsonl already and is not logged a second time."""
    cfg = dict(max_steps=2, batch_size=3, **FAST)
    _crashed(store.root, "v-toy", "late", cfg, when=lambda kind, _payload: kind == "test_eval")
    res = train(make_config(store.root, "v-toy", run_id="late", resume=True, **cfg))
    records = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2)]
    assert res.final["eval/loss"] == records[-1]["eval/loss"]
