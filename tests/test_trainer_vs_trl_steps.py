"""25 optimizer steps of prefpipe's loop track TRL's DPOTrainer step for step (slow).

Matched setup: the same tiny model and weights (``to_hf``), the same pairs in the same order
(TRL gets the train rows in prefpipe's stream order and a sequential sampler), no truncation,
float32, reference log-probs precomputed from the initial weights on both sides, AdamW with the
same hyper-parameters, no warmup and cosine to 10 % (``cosine_with_min_lr``: with no warmup the
same function as ``trainer.train.lr_schedule``), clipping at 1.0.  What differs is the
implementation: packing vs padding, our fused lm-head vs TRL's, our AdamW vs torch's.  The
per-step losses must agree within 1e-4 and the final weights closely.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl")

from trainer_toys import make_store, planted_rows, source_rows  # noqa: E402

from trainer.data import PairStream  # noqa: E402
from trainer.model import build_model, parse_model  # noqa: E402
from trainer.runs import latest_checkpoint, load_checkpoint  # noqa: E402
from trainer.tiny_llama import to_hf  # noqa: E402
from trainer.tokenize import TokenizeConfig, load_tokenizer, tokenize_rows  # noqa: E402
from trainer.train import make_config, train  # noqa: E402

SPEC = "tiny-llama:layers=2,hidden=64,heads=4,seed=3"
STEPS, BATCH, LR = 25, 4, 2e-3


@pytest.mark.slow
def test_25_matched_steps_track_trl_loss(tmp_path):
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    short = [r for r in source_rows() if len(str(r["prompt"]) + r["chosen"][0]["content"] + r["rejected"][0]["content"]) < 300]
    rows = [{**r, "weight": 1.0} for r in (short[:24] + planted_rows(12))]
    store = make_store(tmp_path / "store", {"train": rows, "validation": planted_rows(4, seed=1, prefix="v"),
                                            "test": planted_rows(4, seed=2, prefix="t")})

    # ours
    res = train(make_config(store.root, "v-toy", model=SPEC, max_length=4096, batch_size=BATCH, max_steps=STEPS, lr=LR,
                            warmup_steps=0, min_lr_ratio=0.1, grad_clip=1.0, threads=1, eval_every=0, run_id="ours"))
    ours = [json.loads(x)["loss"] for x in (res.run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    ours_state = load_checkpoint(latest_checkpoint(res.run_dir))["model"]

    # TRL, fed the pairs in our order
    tok = load_tokenizer()
    pairs, _ = tokenize_rows(tok, rows, TokenizeConfig(max_length=4096))
    by_id = {r["pair_id"]: r for r in rows}
    ordered = [by_id[p.pair_id] for p in PairStream(pairs, seed=0).take(STEPS * BATCH)]
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ordered])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, max_length=None,
                     max_steps=STEPS, learning_rate=LR, beta=0.1, warmup_steps=0, lr_scheduler_type="cosine_with_min_lr",
                     lr_scheduler_kwargs={"min_lr_rate": 0.1}, max_grad_norm=1.0, weight_decay=0.0, bf16=False,
                     gradient_checkpointing=False, precompute_ref_log_probs=True, report_to="none", save_strategy="no",
                     use_cpu=True, dataloader_num_workers=0, logging_steps=1, seed=0)
    trl_losses: list[float] = []

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                trl_losses.append(float((loss[0] if return_outputs else loss).detach()))  # unrounded, per step
            return loss

    hf = to_hf(build_model(parse_model(SPEC), len(tok)))
    InOrder(model=hf, args=args, train_dataset=ds, processing_class=tok).train()

    assert len(ours) == len(trl_losses) == STEPS
    diffs = [abs(a - b) for a, b in zip(ours, trl_losses)]
    assert max(diffs) < 1e-4, f"per-step |ours - TRL|: {[f'{d:.1e}' for d in diffs]}"
    assert ours[-1] < ours[0] - 0.05  # it did learn something, so the comparison is not of two flat lines
    for name, p in hf.named_parameters():
        err = (ours_state[name] - p.detach()).norm() / p.detach().norm()
        assert err < 1e-3, f"{name}: relative weight difference {float(err):.1e}"
