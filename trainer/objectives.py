"""DPO objectives on four per-sequence log-prob vectors: the second half of the DPO loss.

Inputs are per pair i (shape (P,)): the summed completion log-probs of the policy and the
reference model on the chosen (w) and rejected (l) responses, e.g. from
``trainer.loss.fused_sequence_logprobs`` on the concatenated [chosen; rejected] batch.

    r_w = beta * (pi_w - ref_w)          implicit reward of the chosen response ("rewards/chosen")
    r_l = beta * (pi_l - ref_l)          implicit reward of the rejected response
    h   = (pi_w - ref_w) - (pi_l - ref_l)

Loss per pair, by ``loss_type`` (eps = label_smoothing):

    sigmoid  -(1 - eps) log s(beta h) - eps log s(-beta h)
             DPO, Rafailov et al. 2023 (arXiv:2305.18290); eps > 0 is conservative DPO
             (Mitchell 2023, "A note on DPO with noisy preferences").
    robust   (-(1 - eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps)
             unbiased under label flips with rate eps, Chowdhury et al. 2024 (arXiv:2403.00409).
    hinge    max(0, 1 - beta h)                           SLiC, Zhao et al. 2023 (arXiv:2305.10425).
    ipo      (h_bar - 1 / (2 beta))^2,  h_bar = h with every log-prob divided by its sequence's
             completion length (mean log-probs), Azar et al. 2023 (arXiv:2310.12036), Eq. 17;
             the length-normalised form is the one the IPO authors' results use (as in TRL).

Optional RPO / NLL term (Pang et al. 2024, arXiv:2404.19733): ``+ rpo_alpha * (-pi_w / n_w)``,
the mean negative log-likelihood of each chosen completion (n_w its token count). TRL averages
the NLL over all chosen tokens of the batch instead; the two agree when lengths are equal.

Weights and reduction: each pair's loss is multiplied by its weight w_i (e.g. annotator
agreement from pipeline.aggregate); the returned per-pair vector is w_i * loss_i and the batch
loss is ``reduce_pair_loss`` = sum_i w_i loss_i / sum_i w_i, a weighted mean (equal weights give
the plain mean, as in TRL). With gradient accumulation, sum w_i * loss_i over micro-batches and
divide by the total weight instead of averaging per-micro-batch means.

Metrics are returned, not logged: detached 0-d tensors, unweighted batch means, with TRL's names
and definitions (rewards use summed log-probs for every loss type).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

LossType = Literal["sigmoid", "robust", "hinge", "ipo"]


class DPOLossConfig(BaseModel):
    """Objective settings; frozen so its hash can key caches and run ids."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    beta: float = Field(0.1, gt=0.0, allow_inf_nan=False, description="KL strength (IPO's tau)")
    loss_type: LossType = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="assumed label-flip rate (sigmoid, robust)")
    rpo_alpha: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="weight of the chosen mean NLL term; 0 turns it off")

    @model_validator(mode="after")
    def _smoothing_only_where_defined(self) -> DPOLossConfig:
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(
                f"label_smoothing={self.label_smoothing} is only defined for loss_type 'sigmoid' or 'robust', "
                f"not {self.loss_type!r}; set it to 0")
        return self


def dpo_objective(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    cfg: DPOLossConfig,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair weighted DPO-family loss and metrics.

    Args:
        policy_chosen_logps, policy_rejected_logps: (P,) summed completion log-probs, with grad.
        ref_chosen_logps, ref_rejected_logps: (P,) the same under the frozen reference model.
        cfg: loss type and hyper-parameters.
        chosen_lengths, rejected_lengths: (P,) completion token counts; required by ``ipo``
            (both) and by ``rpo_alpha > 0`` (chosen). A zero length counts as 1 (log-prob 0).
        weight: (P,) non-negative pair weights, default all ones.

    Returns:
        (w * loss) of shape (P,) and a dict of detached 0-d metric tensors.
    """
    pi_w, pi_l, ref_w, ref_l = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    shape = pi_w.shape
    if pi_w.dim() != 1 or any(t.shape != shape for t in (pi_l, ref_w, ref_l)):
        raise ValueError(
            "the four log-prob vectors must share one (P,) shape, got "
            f"{[tuple(t.shape) for t in (pi_w, pi_l, ref_w, ref_l)]}")
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths), ("weight", weight)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if cfg.loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths (it uses mean log-probs)")
    if cfg.rpo_alpha > 0 and chosen_lengths is None:
        raise ValueError(f"rpo_alpha={cfg.rpo_alpha} needs chosen_lengths (the NLL is a per-token mean)")

    chosen_logratios = pi_w - ref_w  # (P,)
    rejected_logratios = pi_l - ref_l  # (P,)
    beta, eps = cfg.beta, cfg.label_smoothing
    if cfg.loss_type == "ipo":
        n_w = chosen_lengths.clamp(min=1).to(pi_w.dtype)
        n_l = rejected_lengths.clamp(min=1).to(pi_w.dtype)
        h_bar = chosen_logratios / n_w - rejected_logratios / n_l
        losses = (h_bar - 1.0 / (2.0 * beta)) ** 2
    else:
        logits = beta * (chosen_logratios - rejected_logratios)  # beta * h
        if cfg.loss_type == "sigmoid":
            losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        elif cfg.loss_type == "robust":
            losses = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
        else:  # hinge
            losses = torch.relu(1.0 - logits)

    metrics: dict[str, Tensor] = {}
    if cfg.rpo_alpha > 0:
        nll = -pi_w / chosen_lengths.clamp(min=1).to(pi_w.dtype)  # (P,) mean NLL per chosen completion
        losses = losses + cfg.rpo_alpha * nll
        metrics["loss/nll"] = nll.detach().mean()
    if weight is not None:
        if bool((weight < 0).any()):
            raise ValueError(f"pair weights must be >= 0, got min {weight.min().item()}")
        losses = losses * weight.to(losses.dtype)

    with torch.no_grad():
        r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
        metrics.update({
            "rewards/chosen": r_w.mean(),
            "rewards/rejected": r_l.mean(),
            "rewards/margins": (r_w - r_l).mean(),
            "rewards/accuracies": (r_w > r_l).to(r_w.dtype).mean(),
            "logps/chosen": pi_w.detach().mean(),
            "logps/rejected": pi_l.detach().mean(),
        })
    return losses, metrics


def reduce_pair_loss(weighted_losses: Tensor, weight: Tensor | None = None) -> Tensor:
    """Scalar batch loss: sum_i w_i loss_i / sum_i w_i (plain mean when ``weight`` is None).

    ``weighted_losses`` is the first output of :func:`dpo_objective` (already multiplied by w).
    A batch whose weights sum to 0 contributes a zero loss (with a graph, so backward works).
    """
    if weight is None:
        return weighted_losses.mean()
    total = weight.to(weighted_losses.dtype).sum()
    return weighted_losses.sum() / total.clamp(min=torch.finfo(weighted_losses.dtype).tiny)
