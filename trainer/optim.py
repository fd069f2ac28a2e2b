"""AdamW (decoupled weight decay, Loshchilov & Hutter 2019, arXiv:1711.05101), by hand.

Per parameter p with gradient g, at step t (1-based), learning rate lr (set by the caller
each step, as nanoGPT's loop does), weight decay wd::

    p   <- p * (1 - lr * wd)
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g^2
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The same operations in the same order as ``torch.optim.AdamW(foreach=False)`` (the test
checks bit equality).  Why not torch's class: its first use imports torch._dynamo and sympy,
~70 MiB of resident memory, more than this whole optimizer state for a small model.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class AdamW:
    def __init__(self, groups: list[dict[str, Any]], *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        """``groups``: [{"params": [...], "weight_decay": float}, ...]."""
        self.groups = [{"params": list(g["params"]), "weight_decay": float(g.get("weight_decay", 0.0))} for g in groups]
        self.betas, self.eps, self.t = betas, eps, 0
        self.exp_avg = [[torch.zeros_like(p) for p in g["params"]] for g in self.groups]
        self.exp_avg_sq = [[torch.zeros_like(p) for p in g["params"]] for g in self.groups]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1 ** self.t
        bias2_sqrt = math.sqrt(1 - beta2 ** self.t)
        for g, ms, vs in zip(self.groups, self.exp_avg, self.exp_avg_sq):
            for p, m, v in zip(g["params"], ms, vs):
                if p.grad is None:
                    continue
                grad: Tensor = p.grad
                p.mul_(1 - lr * g["weight_decay"])
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
                p.addcdiv_(m, denom, value=-lr / bias1)

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "betas": self.betas, "eps": self.eps, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shapes = [[tuple(p.shape) for p in g["params"]] for g in self.groups]
        if [[tuple(m.shape) for m in ms] for ms in state["exp_avg"]] != shapes:
            raise ValueError("optimizer state does not match the model's parameters")
        self.t, self.betas, self.eps = state["t"], tuple(state["betas"]), state["eps"]
        for dst, src in ((self.exp_avg, state["exp_avg"]), (self.exp_avg_sq, state["exp_avg_sq"])):
            for d_group, s_group in zip(dst, src):
                for d, s in zip(d_group, s_group):
                    d.copy_(s)
