"""trainer.objectives: each loss against a direct formula, and against TRL's own DPO loss code.

TRL 1.16.0 has no standalone ``dpo_loss``: the loss is computed inline in
``DPOTrainer._compute_loss(self, model, inputs, return_outputs)``. The TRL tests call that
method unbound, with a stub ``self`` (only the attributes the method reads) and a stub model
whose per-token log-probs sum to the given sequence log-probs, with reference log-probs passed
as precomputed (``precompute_ref_logps=True``). So TRL's real code computes the loss and the
metrics from the same four tensors. Note that TRL 1.16's "sigmoid" ignores label_smoothing
(conservative DPO is checked against the formula only).
"""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from trainer.objectives import DPOLossConfig, dpo_objective, reduce_pair_loss

P = 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: OpenMP barriers on a shared 2-core box cost more than the math (10-100x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def four_logps(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths_c = torch.randint(1, 40, (P,), generator=g)
    lengths_r = torch.randint(1, 40, (P,), generator=g)
    pc = -torch.rand(P, generator=g, dtype=dtype) * 3 * lengths_c
    pr = -torch.rand(P, generator=g, dtype=dtype) * 3 * lengths_r
    rc = pc + torch.randn(P, generator=g, dtype=dtype) * 4
    rr = pr + torch.randn(P, generator=g, dtype=dtype) * 4
    return pc, pr, rc, rr, lengths_c, lengths_r


def formula(loss_type, pc, pr, rc, rr, nc, nr, beta, eps=0.0):
    """Direct, element-by-element transcription of the papers' per-pair losses."""
    out = []
    for i in range(P):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        x = beta * h
        log_sig = lambda v: -math.log1p(math.exp(-v)) if v > 0 else v - math.log1p(math.exp(v))  # noqa: E731
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * log_sig(x) - eps * log_sig(-x))
        elif loss_type == "robust":
            out.append((-(1 - eps) * log_sig(x) + eps * log_sig(-x)) / (1 - 2 * eps))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - x))
        elif loss_type == "ipo":
            hb = (pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]
            out.append((hb - 1 / (2 * beta)) ** 2)
    return torch.tensor([float(v) for v in out], dtype=torch.float64)


CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type, eps", CASES)
def test_each_loss_equals_its_formula(loss_type, eps, beta):
    pc, pr, rc, rr, nc, nr = four_logps()
    cfg = DPOLossConfig(beta=beta, loss_type=loss_type, label_smoothing=eps)
    losses, metrics = dpo_objective(pc, pr, rc, rr, cfg, chosen_lengths=nc, rejected_lengths=nr)
    expected = formula(loss_type, pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), nc.tolist(), nr.tolist(), beta, eps)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["rewards/chosen"], (beta * (pc - rc)).mean())
    torch.testing.assert_close(metrics["rewards/margins"], (beta * ((pc - rc) - (pr - rr))).mean())
    assert metrics["rewards/accuracies"] == ((pc - rc) > (pr - rr)).double().mean()
    assert metrics["logps/rejected"] == pr.mean()
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())


def test_sigmoid_gradient_is_the_dpo_gradient():
    """d loss / d pi_w = -beta * sigmoid(-beta h): the DPO paper's weighting of each pair."""
    pc, pr, rc, rr, _, _ = four_logps(1)
    pc.requires_grad_()
    losses, _ = dpo_objective(pc, pr, rc, rr, DPOLossConfig(beta=0.3))
    (grad,) = torch.autograd.grad(losses.sum(), pc)
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(grad, -0.3 * torch.sigmoid(-0.3 * h.detach()))


def test_rpo_term_and_weighted_reduction():
    pc, pr, rc, rr, nc, nr = four_logps(2)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.25, 0.75], dtype=torch.float64)
    base, _ = dpo_objective(pc, pr, rc, rr, DPOLossConfig())
    losses, metrics = dpo_objective(pc, pr, rc, rr, DPOLossConfig(rpo_alpha=0.5), chosen_lengths=nc, weight=w)
    nll = -pc / nc
    torch.testing.assert_close(losses, w * (base + 0.5 * nll))
    torch.testing.assert_close(metrics["loss/nll"], nll.mean())
    torch.testing.assert_close(reduce_pair_loss(losses, w), (w * (base + 0.5 * nll)).sum() / w.sum())
    torch.testing.assert_close(reduce_pair_loss(base), base.mean())
    # a zero-weight pair gets no gradient; an all-zero batch reduces to 0, not NaN
    pc.requires_grad_()
    losses, _ = dpo_objective(pc, pr, rc, rr, DPOLossConfig(), weight=w)
    (grad,) = torch.autograd.grad(reduce_pair_loss(losses, w), pc)
    assert grad[2] == 0 and grad[0] != 0
    zero = torch.zeros(P, dtype=torch.float64)
    assert reduce_pair_loss(losses * 0, zero) == 0


def test_config_and_input_errors():
    with pytest.raises(ValidationError, match="label_smoothing=0.1 is only defined"):
        DPOLossConfig(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValidationError):
        DPOLossConfig(beta=0.0)
    with pytest.raises(ValidationError):
        DPOLossConfig(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValidationError):
        DPOLossConfig(loss_typ="ipo")  # typo: extra fields are rejected
    cfg = DPOLossConfig()
    with pytest.raises(ValidationError):
        cfg.beta = 1.0  # frozen
    pc, pr, rc, rr, nc, nr = four_logps()
    with pytest.raises(ValueError, match="'ipo' needs chosen_lengths and rejected_lengths"):
        dpo_objective(pc, pr, rc, rr, DPOLossConfig(loss_type="ipo"))
    with pytest.raises(ValueError, match="rpo_alpha=0.5 needs chosen_lengths"):
        dpo_objective(pc, pr, rc, rr, DPOLossConfig(rpo_alpha=0.5))
    with pytest.raises(ValueError, match="share one \\(P,\\) shape"):
        dpo_objective(pc, pr[:3], rc, rr, cfg)
    with pytest.raises(ValueError, match="weight must have shape"):
        dpo_objective(pc, pr, rc, rr, cfg, weight=torch.ones(3))
    with pytest.raises(ValueError, match="pair weights must be >= 0"):
        dpo_objective(pc, pr, rc, rr, cfg, weight=-torch.ones(P))


# --- TRL -------------------------------------------------------------------------------------

def trl_dpo_loss(pc, pr, rc, rr, nc, nr, *, beta, loss_type, label_smoothing):
    """Run trl 1.16.0's ``DPOTrainer._compute_loss`` on the four log-prob tensors."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = len(pc)
    T = int(max(nc.max(), nr.max())) + 2
    log_probs = torch.zeros(2 * n, T - 1, dtype=pc.dtype)
    log_probs[:, 0] = torch.cat([pc, pr])  # per-token log-probs whose row sums are the sequence log-probs
    completion_mask = torch.zeros(2 * n, T, dtype=torch.long)
    for i, length in enumerate(torch.cat([nc, nr]).tolist()):
        completion_mask[i, T - length:] = 1  # IPO divides by these counts
    zeros = torch.zeros(2 * n, T - 1)
    outputs = SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * n, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.slow  # importing trl pulls in transformers/accelerate/datasets (~8 s)
@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("robust", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_matches_trl_dpo_loss(loss_type, eps):
    pytest.importorskip("trl")
    for seed, beta in ((0, 0.1), (5, 0.5)):
        pc, pr, rc, rr, nc, nr = four_logps(seed)
        cfg = DPOLossConfig(beta=beta, loss_type=loss_type, label_smoothing=eps)
        losses, metrics = dpo_objective(pc, pr, rc, rr, cfg, chosen_lengths=nc, rejected_lengths=nr)
        trl_loss, trl_metrics = trl_dpo_loss(pc, pr, rc, rr, nc, nr, beta=beta, loss_type=loss_type, label_smoothing=eps)
        torch.testing.assert_close(reduce_pair_loss(losses), trl_loss, rtol=1e-12, atol=1e-12)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected"):
            rel = 1e-7 if key == "rewards/accuracies" else 1e-12  # TRL takes this mean in float32
            assert metrics[key].item() == pytest.approx(trl_metrics[key], rel=rel, abs=rel), key
