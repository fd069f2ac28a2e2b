"""Our tokenisation and DPO loss equal TRL's DPOTrainer on the same tiny model and batch.

TRL is a test-only anchor: it tokenises the rows itself (its ``_prepare_dataset``), collates
them with its own collator and computes its loss with ``DPOTrainer.compute_loss`` (its own
concatenated forward over [chosen; rejected] with full per-token log-probs and a separate
reference model).  The models are ``trainer.tiny_llama`` models for us and the equivalent transformers
``LlamaForCausalLM`` (same weights, ``to_hf``) for TRL.  We compute the same quantities with ``trainer.tokenize``,
``trainer.reference`` (reference log-probs), ``trainer.model.sequence_logps`` (fused lm-head)
and ``trainer.objectives``; loss, reward metrics and the policy gradient must agree.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from trainer_toys import planted_rows, source_rows  # noqa: E402

from trainer.data import collate  # noqa: E402
from trainer.model import build_model, parse_model  # noqa: E402
from trainer.objectives import DPOLossConfig, reduce_pair_loss  # noqa: E402
from trainer.reference import compute_reference_logps  # noqa: E402
from trainer.tiny_llama import to_hf  # noqa: E402
from trainer.tokenize import TokenizeConfig, load_tokenizer, tokenize_rows  # noqa: E402
from trainer.train import TrainConfig, dpo_batch_loss  # noqa: E402


# TRL's fused lm-head returns float32 per-token log-probs whatever the model dtype, so the
# comparison is in float32.  Float32 matmuls of different shapes (TRL pads the whole batch;
# we run length groups) round differently: summed log-probs of the same sequence differ by
# up to ~1e-3 here, rewards (beta times differences of such sums) by ~1e-4.  The tolerances
# allow that and nothing more: a shifted target, a missing EOS or a prompt token counted as a
# completion token would move a summed log-prob by several units.  The float64 agreement of
# our log-probs with full logits is tested in test_train.py.
def test_loss_and_gradients_match_trl(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    tok = load_tokenizer()
    short = [r for r in source_rows() if len(str(r["prompt"]) + r["chosen"][0]["content"] + r["rejected"][0]["content"]) < 400]
    rows = planted_rows(3) + [next(r for r in short if r["locale"] == loc) for loc in ("en", "zh", "ja")]
    rows = [{**r, "weight": 1.0} for r in rows]  # TRL has no per-pair weights
    policy = build_model(parse_model("tiny-llama:layers=2,hidden=32,heads=2,seed=1"), len(tok))
    reference = build_model(parse_model("tiny-llama:layers=2,hidden=32,heads=2,seed=2"), len(tok)).eval()
    hf_policy, hf_reference = to_hf(policy), to_hf(reference).eval()  # the same weights as transformers models
    beta = 0.1

    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), max_length=None,
                     beta=beta, report_to="none", use_cpu=True, save_strategy="no")
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trl = DPOTrainer(model=hf_policy, ref_model=hf_reference, args=args, train_dataset=ds, processing_class=tok)

    # 1. tokenisation: the same prompt / completion ids as TRL's own
    pairs, _ = tokenize_rows(tok, rows, TokenizeConfig(max_length=4096))
    for p, ex in zip(pairs, trl.train_dataset):
        assert list(p.prompt_ids) == ex["prompt_ids"]
        assert list(p.chosen_ids) == ex["chosen_ids"] and list(p.rejected_ids) == ex["rejected_ids"]
    batch = trl.data_collator([trl.train_dataset[i] for i in range(len(rows))])
    ref = compute_reference_logps(reference, pairs, pad_id=tok.pad_token_id, batch_size=2)

    for loss_type in ("sigmoid", "ipo", "hinge"):
        # 2. TRL's loss, metrics and gradient
        trl.loss_types, trl.loss_weights = [loss_type], [1.0]
        trl.model.train()
        hf_policy.zero_grad(set_to_none=True)
        trl_loss = trl.compute_loss(trl.model, batch)
        trl_loss.backward()
        trl_grads = {n: p.grad.clone() for n, p in hf_policy.named_parameters()}
        trl_metrics = {k: v[-1] for k, v in trl._metrics["train"].items()}
        policy.zero_grad(set_to_none=True)

        # 3. ours: precomputed reference log-probs, fused policy log-probs, the objective
        cfg = TrainConfig(store=tmp_path, version="x", loss=DPOLossConfig(beta=beta, loss_type=loss_type))
        b = collate(pairs, tok.pad_token_id, ref)
        losses, weight, metrics = dpo_batch_loss(policy, b, cfg)
        loss = reduce_pair_loss(losses, weight)
        loss.backward()

        assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=5e-4), loss_type
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert float(metrics[key]) == pytest.approx(trl_metrics[key], abs=5e-4), (loss_type, key)
        for key in ("logps/chosen", "logps/rejected"):
            assert float(metrics[key]) == pytest.approx(trl_metrics[key], abs=2e-3), (loss_type, key)
        for n, p in policy.named_parameters():
            err = (p.grad - trl_grads[n]).norm() / trl_grads[n].norm().clamp(min=1e-12)
            assert err < 2e-3, f"{loss_type} {n}: relative gradient error {float(err):.2e}"
