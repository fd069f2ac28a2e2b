"""Trainer throughput, memory and held-out quality: prefpipe's DPO loop vs TRL's DPOTrainer at its best.

A race, not a demo: TRL runs in the fastest reasonable configuration measured on this machine
(candidates below), both trainers see the same pairs in the same order, with the same schedule
and no truncation, and the result is judged by held-out loss and reward accuracy too.

Setup shared by every run:

* model: a random-init Llama from one tiny spec and seed (prefpipe runs it as
  ``trainer.tiny_llama``, TRL as the equivalent transformers ``LlamaForCausalLM``: identical
  weights); shapes ``tiny`` (4 layers, hidden 256, vocab 3,072 = the repo's tokenizer),
  ``32k`` and ``128k`` (4 layers, hidden 512, 8 heads, the lm-head padded to 32,768 / 131,072
  rows as real models pad their vocabularies);
* data: the 342 DPO rows of ``data/source/*.jsonl`` (en / zh / ja), a fixed 64-pair validation
  split, the rest train; max length 1024 tokens, which truncates nothing (the longest pair has
  783 tokens), so both trainers see the same token ids (``tests/test_trainer_vs_trl.py``
  checks that TRL's tokenisation equals ours);
* order: prefpipe's epoch permutation; TRL gets the train rows in that order and a sequential
  sampler, so step k of both trains on the same 4 pairs;
* optimisation: batch 4 pairs, AdamW lr 5e-5 (betas 0.9 / 0.999, no weight decay), no warmup,
  cosine to 10 % (TRL: ``cosine_with_min_lr``, ``min_lr_rate=0.1``; with no warmup the two
  schedules are the same function), gradient clipping at 1.0, DPO sigmoid beta 0.1;
* threads: torch's default (all cores), ``OMP_WAIT_POLICY=PASSIVE`` for every child.

Measured per run, each in a fresh subprocess: tokens/s = non-padding tokens of chosen +
rejected (TRL's ``num_tokens``: the attention mask's sum; ours: the same sequences' lengths)
per wall second, over the optimizer steps after the first and before the last (the first pays
lazy initialisation, the last a checkpoint); peak RSS = the child's ``ru_maxrss`` through the
end of training (imports, data, reference pass, training); setup = start to the first step.
After training, the child evaluates the final weights with one shared evaluator (float32,
``trainer.model.sequence_logps`` + ``trainer.objectives``, reference = the initial weights) on
the 64 validation pairs: held-out DPO loss, reward accuracy and margin.

TRL candidates (``--trl``): ``defaults`` (DPOConfig defaults: bf16 autocast, gradient
checkpointing, a reference forward every step), ``fp32`` (float32, no checkpointing,
``precompute_ref_log_probs=True``), ``fp32-ref`` (as fp32 with the reference model run every
step), ``fp32-gc`` (fp32 with gradient checkpointing), ``bf16`` (bf16 autocast, no
checkpointing, precomputed reference).  ``padding_free`` is not a candidate: TRL 1.16 accepts
it, warns that it is "temporarily unavailable" and falls back to padding.

prefpipe variants (``--ours``): ``fp32`` (defaults: a micro-batch's sequences packed into one
padding-free forward), ``fp32-pair`` (one pair per forward, the previous default), ``bf16``
(``precision="bf16-mixed"``: float32 master weights and optimizer, bf16 matmuls in the body
and the fused lm-head with float32 log-sum-exp), ``bf16-compile`` (the same with the model body
under ``torch.compile(dynamic=True)``), ``fp32-malloc`` / ``bf16-malloc`` (glibc's own mmap
threshold instead of the trainer's 128 KiB: more CPU throughput, more memory).

    python benchmarks/train.py --shapes tiny --steps 25 --rounds 2
    python benchmarks/train.py --shapes 32k 128k --steps 8 --trl bf16 fp32 --ours bf16 fp32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, table, write_section  # noqa: E402

SHAPES = {
    "tiny": "tiny-llama:layers=4,hidden=256,heads=4",
    "32k": "tiny-llama:layers=4,hidden=512,heads=8,vocab=32768",
    "128k": "tiny-llama:layers=4,hidden=512,heads=8,vocab=131072",
}
BATCH, MAX_LEN, LR, BETA, MIN_LR, N_VAL = 4, 1024, 5e-5, 0.1, 0.1, 64
TRL_CONFIGS = {  # DPOConfig overrides
    "defaults": {},
    "fp32": {"bf16": False, "gradient_checkpointing": False, "precompute_ref_log_probs": True},
    "fp32-ref": {"bf16": False, "gradient_checkpointing": False, "precompute_ref_log_probs": False},
    "fp32-gc": {"bf16": False, "gradient_checkpointing": True, "precompute_ref_log_probs": True},
    "bf16": {"bf16": True, "gradient_checkpointing": False, "precompute_ref_log_probs": True},
}
OURS_CONFIGS = {  # TrainConfig overrides
    "fp32": {},
    "fp32-pair": {"pairs_per_forward": 1},
    "fp32-malloc": {"mmap_threshold_kib": None},  # glibc's own (dynamic) mmap threshold
    "bf16-malloc": {"precision": "bf16-mixed", "mmap_threshold_kib": None},
    "bf16": {"precision": "bf16-mixed"},
    "bf16-compile": {"precision": "bf16-mixed", "compile": True},
}
ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TRANSFORMERS_VERBOSITY": "error"}


# ---------------------------------------------------------------- data shared by both trainers
def splits(train_pairs: int | None = None) -> dict[str, list[dict]]:
    """64 validation pairs, the rest (or its first ``train_pairs``) train; the test split is unused."""
    sys.path.insert(0, str(ROOT / "tests"))
    from trainer_toys import source_rows

    rows = source_rows()
    train = rows[N_VAL:] if train_pairs is None else rows[N_VAL:N_VAL + train_pairs]
    return {"train": train, "validation": rows[:N_VAL], "test": []}


def train_order(train_rows: list[dict], n: int) -> list[dict]:
    """The first ``n`` train rows in prefpipe's stream order (what its loop consumes)."""
    from trainer.data import PairStream
    from trainer.tokenize import TokenizeConfig, load_tokenizer, tokenize_rows

    pairs, _ = tokenize_rows(load_tokenizer(light=True), train_rows, TokenizeConfig(max_length=MAX_LEN))
    assert len(pairs) == len(train_rows), "the benchmark budget must truncate and drop nothing"
    by_id = {r["pair_id"]: r for r in train_rows}
    return [by_id[p.pair_id] for p in PairStream(pairs, seed=0).take(n)]


def heldout(state: dict, spec: str, rows: list[dict]) -> dict[str, float]:
    """The shared evaluator: DPO loss / reward accuracy / margin of ``state`` on ``rows`` (float32)."""
    import torch

    from trainer.data import collate
    from trainer.model import build_model, parse_model, sequence_logps
    from trainer.objectives import DPOLossConfig, dpo_objective
    from trainer.tokenize import TokenizeConfig, load_tokenizer, tokenize_rows

    tok = load_tokenizer(light=True)
    pairs, _ = tokenize_rows(tok, rows, TokenizeConfig(max_length=MAX_LEN))
    policy = build_model(parse_model(spec), len(tok)).eval()
    reference = build_model(parse_model(spec), len(tok)).eval()
    policy.load_state_dict({k: v.float() for k, v in state.items() if k in policy.state_dict()})
    losses, acc, margins = [], [], []
    with torch.no_grad():
        for i in range(0, len(pairs), 8):
            b = collate(pairs[i:i + 8], tok.pad_token_id)
            lp, lr = (sequence_logps(m, b.input_ids, b.completion_mask).summed.double() for m in (policy, reference))
            n = b.size
            loss, metrics = dpo_objective(lp[:n], lp[n:], lr[:n], lr[n:], DPOLossConfig(beta=BETA))
            rc, rr = BETA * (lp[:n] - lr[:n]), BETA * (lp[n:] - lr[n:])
            losses += loss.tolist()
            acc += (rc > rr).double().tolist()
            margins += (rc - rr).tolist()
    return {"eval_loss": statistics.fmean(losses), "eval_accuracy": statistics.fmean(acc),
            "eval_margin": statistics.fmean(margins), "eval_pairs": len(losses)}


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rate(marks: list[tuple[float, int, float]]) -> dict[str, float]:
    """tokens/s, s/step and tokens per CPU-second (user + sys of the process, all threads) over
    steps 2 .. N-1, from (wall time, cumulative tokens, CPU time) after each step.  On a shared
    machine the wall rate moves with other jobs' load; the CPU rate much less."""
    (t1, k1, c1), (t2, k2, c2) = marks[0], marks[-2]
    return {"tokens_per_s": (k2 - k1) / (t2 - t1), "step_s": (t2 - t1) / (len(marks) - 2),
            "tokens_per_cpu_s": (k2 - k1) / max(c2 - c1, 1e-9), "cpu_busy": (c2 - c1) / (t2 - t1)}


# ---------------------------------------------------------------- children
def child_ours(job: dict) -> dict:
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT / "tests"))
    from trainer_toys import make_store

    from trainer.runs import latest_checkpoint, load_checkpoint
    from trainer.train import make_config, train

    data = splits(job.get("train_pairs"))
    store = make_store(Path(job["tmp"]) / f"store-{os.getpid()}", data, version_id="v-bench").root  # no cache hit
    marks: list[tuple[float, int]] = []
    seen = {"tokens": 0, "start": None}

    def on_event(kind, payload):
        if kind == "start":
            seen["start"] = time.perf_counter()
        elif kind == "step":
            seen["tokens"] += payload["tokens"]
            marks.append((time.perf_counter(), seen["tokens"], _cpu_s()))

    cfg = make_config(store, "v-bench", model=SHAPES[job["shape"]], batch_size=BATCH, max_length=MAX_LEN,
                      max_steps=job["steps"], lr=LR, beta=BETA, warmup_steps=0, min_lr_ratio=MIN_LR, eval_every=0,
                      checkpoint_every=0, run_id=f"bench-{job['name']}-{os.getpid()}", test_eval=False,
                      **OURS_CONFIGS[job["config"]])
    res = train(cfg, on_event=on_event)
    peak = _peak_mib()
    rate = _rate(marks)
    losses = [json.loads(x)["loss"] for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"train"' in x]
    state = load_checkpoint(latest_checkpoint(res.run_dir))["model"]
    return {**rate, "setup_s": seen["start"] - t0, "peak_rss_mib": peak,
            "train_losses": losses, **heldout(state, SHAPES[job["shape"]], data["validation"])}


def child_trl(job: dict) -> dict:
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trainer.model import build_model, parse_model
    from trainer.tiny_llama import to_hf
    from trainer.tokenize import load_tokenizer

    data = splits(job.get("train_pairs"))
    tok = load_tokenizer()
    spec = SHAPES[job["shape"]]
    overrides = TRL_CONFIGS[job["config"]]
    model = to_hf(build_model(parse_model(spec), len(tok)))  # transformers' LlamaForCausalLM, same weights
    ref_model = None
    if not overrides.get("precompute_ref_log_probs", False):  # TRL would otherwise reload it from a hub path
        ref_model = to_hf(build_model(parse_model(spec), len(tok))).eval()
    # the whole train split (TRL precomputes reference log-probs for all of it, as prefpipe does), in
    # prefpipe's stream order: the first steps x batch rows are exactly the pairs prefpipe trains on
    ordered = train_order(data["train"], max(job["steps"] * BATCH, len(data["train"])))
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ordered])
    args = DPOConfig(output_dir=str(Path(job["tmp"]) / f"trl-{os.getpid()}"), per_device_train_batch_size=BATCH,
                     max_length=MAX_LEN, max_steps=job["steps"], learning_rate=LR, beta=BETA, warmup_steps=0,
                     lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": MIN_LR},
                     max_grad_norm=1.0, weight_decay=0.0, logging_steps=1, report_to="none", save_strategy="no",
                     use_cpu=True, dataloader_num_workers=0, seed=0, **overrides)

    class InOrder(DPOTrainer):  # the same pairs in the same order as prefpipe
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    trainer = InOrder(model=model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok)
    marks: list[tuple[float, int]] = []
    start = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            start["t"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            marks.append((time.perf_counter(), trainer._total_train_tokens, _cpu_s()))

    trainer.add_callback(Clock())
    trainer.train()
    peak = _peak_mib()
    rate = _rate(marks)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    state = {k: v.detach().float().clone() for k, v in trainer.model.state_dict().items()}
    del trainer, model, ref_model
    torch.set_grad_enabled(True)
    return {**rate, "setup_s": start["t"] - t0, "peak_rss_mib": peak,
            "train_losses": losses, **heldout(state, spec, data["validation"])}


# ---------------------------------------------------------------- parent
def run_job(job: dict) -> dict:
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **ENV})
    if proc.returncode:
        raise RuntimeError(f"{job['name']} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT="))
    return {**json.loads(line.split("=", 1)[1]), "wall_s": time.perf_counter() - t0,
            "load": f"{load0:.2f}-{os.getloadavg()[0]:.2f}"}


def machine_line() -> str:
    import torch

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    model = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                  if x.startswith("model name")), platform.processor())
    return (f"{datetime.now(UTC):%Y-%m-%d}, {platform.machine()} {model}, {os.cpu_count()} cores, vector extensions: "
            f"{' '.join(ext) or 'none listed'} (no AMX), torch {torch.__version__} with "
            f"{torch.get_num_threads()} intra-op threads (its default), Python {platform.python_version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", nargs="+", default=["tiny"], choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=1, help="repeat every run, interleaved; medians over rounds")
    ap.add_argument("--train-pairs", type=int, default=None,
                    help="train split = the first N non-validation rows (default: all 278); both trainers "
                         "precompute reference log-probs for all of them, so this bounds the set-up time")
    ap.add_argument("--trl", nargs="+", default=list(TRL_CONFIGS), choices=list(TRL_CONFIGS))
    ap.add_argument("--ours", nargs="+", default=["fp32", "bf16"], choices=list(OURS_CONFIGS))
    ap.add_argument("--out", type=Path, help="also append every run's JSON to this file")
    ap.add_argument("--section", default=None, help="docs/benchmarks.md section to write (default: none)")
    args = ap.parse_args()

    if args.child:
        job = json.loads(args.child)
        res = (child_trl if job["trainer"] == "trl" else child_ours)(job)
        print("RESULT=" + json.dumps(res))
        return

    import torch

    print(machine_line(), file=sys.stderr)
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="prefpipe-bench-train-") as tmp:
        for rnd in range(args.rounds):
            for shape in args.shapes:
                jobs = [("trl", c) for c in args.trl] + [("prefpipe", c) for c in args.ours]
                if rnd % 2:
                    jobs.reverse()  # alternate the order so drifting load hits both sides
                for trainer, config in jobs:
                    job = {"trainer": trainer, "config": config, "shape": shape, "steps": args.steps, "tmp": tmp,
                           "name": f"{trainer}-{config}-{shape}", "train_pairs": args.train_pairs}
                    print(f"[round {rnd + 1}] {job['name']} ...", file=sys.stderr, flush=True)
                    r = run_job(job)
                    print(f"  {json.dumps({k: v for k, v in r.items() if k != 'train_losses'})}", file=sys.stderr,
                          flush=True)
                    results.setdefault((shape, f"{trainer} {config}"), []).append(r)
                    if args.out:
                        with open(args.out, "a") as fh:
                            fh.write(json.dumps({**job, "round": rnd, **r}) + "\n")
    rows = []
    med = lambda rs, f: statistics.median(r[f] for r in rs if f in r) if any(f in r for r in rs) else float("nan")  # noqa: E731
    for shape in args.shapes:
        trl_keys = [k for k in results if k[0] == shape and k[1].startswith("trl")]
        # TRL's best = the highest tokens per CPU-second (stable under other jobs' load); wall rate shown too
        best_trl = max(trl_keys, key=lambda k: med(results[k], "tokens_per_cpu_s"))
        base = results[best_trl]
        for key, rs in results.items():
            if key[0] != shape:
                continue
            rows.append([shape, key[1] + (" (TRL best)" if key == best_trl else ""), f"{med(rs, 'tokens_per_s'):,.0f}",
                         f"{med(rs, 'tokens_per_cpu_s'):,.0f}", f"{med(rs, 'step_s'):.2f}",
                         f"{med(rs, 'peak_rss_mib'):,.0f}", f"{med(rs, 'setup_s'):.1f}",
                         f"{med(rs, 'eval_loss'):.4f}", f"{med(rs, 'eval_accuracy'):.3f}",
                         f"{med(rs, 'tokens_per_s') / med(base, 'tokens_per_s'):.2f}x / "
                         f"{med(rs, 'tokens_per_cpu_s') / med(base, 'tokens_per_cpu_s'):.2f}x",
                         f"{med(rs, 'peak_rss_mib') / med(base, 'peak_rss_mib'):.2f}x",
                         ", ".join(r["load"] for r in rs)])
    body = "\n".join([
        f"`python benchmarks/train.py --shapes {' '.join(args.shapes)} --steps {args.steps} --rounds {args.rounds} "
        + (f"--train-pairs {args.train_pairs} " if args.train_pairs else "")
        + f"--trl {' '.join(args.trl)} --ours {' '.join(args.ours)}`",
        "",
        f"Machine: {machine_line()}; OMP_WAIT_POLICY=PASSIVE for every run; shared with other jobs (load = "
        "1-minute load average at the start and end of each run).",
        "",
        table(["shape", "trainer config", "tokens/s", "tokens/CPU-s", "s/step", "peak RSS MiB", "setup s", "held-out loss",
               "held-out acc", "vs TRL best (wall / CPU)", "RSS vs TRL best", "load"], rows),
    ])
    print(body)
    if args.section:
        write_section(args.section, body)
    del torch


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
