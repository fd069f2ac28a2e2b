"""Fused, chunked lm-head + per-sequence log-probs: the first half of the DPO loss.

For each sequence b and each completion position t (``mask[b, t]`` true), with final hidden
state h_t (H,), lm-head weight W (V, H), optional bias c (V,) and target id y_t::

    l_t      = W h_t + c                         # raw logits (V,)
    l_t      = cap * tanh(l_t / cap)             # optional soft-capping (Gemma 2), `softcap=cap`
    z_t      = l_t / temperature
    logp_t   = z_t[y_t] - logsumexp(z_t)
    summed_b = sum_t logp_t                      # (B,)
    mean_b   = summed_b / n_b                    # n_b = completion tokens of row b; 0 when n_b = 0

Contract: targets are already shifted by the caller, i.e. ``hidden[b, t]`` predicts
``targets[b, t]`` (for a causal LM: ``targets = input_ids[:, 1:]``, ``hidden = h[:, :-1]``,
``mask = completion_mask[:, 1:]``). Targets at masked positions are never read, so they may hold
anything (e.g. -100). Any batch works; for DPO the caller concatenates chosen and rejected rows
(2B rows) and splits the outputs.

Memory: the (B*T, V) logits are never built. Only completion tokens are gathered (prompt and
padding positions are skipped, not masked after the fact), then processed in tiles of
``chunk_size`` tokens x ``vocab_block`` vocabulary entries, so the extra working memory is
O(chunk_size * vocab_block) for logits, plus O(N * H) for the gathered hidden states and their
gradient (N = completion tokens; the same order as ``hidden`` itself), plus the weight gradient.
The log-sum-exp is accumulated online over vocabulary blocks (Milakov & Gimelshein 2018,
arXiv:1805.02867) in float32 (float64 for float64 inputs, used by gradcheck), whatever the input
dtype: bf16/fp16 inputs are upcast tile by tile, never the whole weight.

Backward (``backward="recompute"``, the default): the forward keeps only the per-token
log-sum-exp (N floats); the backward recomputes each logits tile and applies
d logp_t / d l_t = (onehot(y_t) - softmax(z_t)) * dz/dl, scaled per token by the incoming
gradient. ``backward="accumulate"`` is Liger-Kernel's scheme (gradients computed during the
forward, scaled by grad_output in the backward); because our outputs are per-sequence vectors,
not a scalar loss, it must keep one weight gradient per row, O(B * V * H) memory. It exists to
be measured against; see docs/fused-loss.md for the numbers behind the default.

Functional core + thin module, after Liger-Kernel's ``chunked_loss``; tests compare every path
with :func:`naive_sequence_logprobs`, which builds the full logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

BackwardMode = Literal["recompute", "accumulate"]
_BACKWARD_MODES = ("recompute", "accumulate")

# Measured on the 2-core AVX2 CPU in docs/fused-loss.md: a 1024 x 2048 fp32 tile (8 MiB) stays in the
# last-level cache, so the elementwise passes over it cost little next to the matmuls, and it is large
# enough that each matmul runs near the core's peak and the loop issues few (threaded) operations.
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_VOCAB_BLOCK = 2048


class SequenceLogProbs(NamedTuple):
    """Per-sequence log-probs of the completion tokens."""

    summed: Tensor  # (B,) float32 (float64 for float64 inputs): sum of completion-token log-probs
    mean: Tensor  # (B,) same dtype: summed / num_tokens, 0 for rows without completion tokens
    num_tokens: Tensor  # (B,) int64: completion tokens per row


@dataclass(frozen=True)
class _Spec:
    chunk_size: int
    vocab_block: int | None
    temperature: float
    softcap: float | None
    backward: BackwardMode
    matmul_dtype: torch.dtype | None = None  # bf16: tile matmuls in bf16, everything else in float32


def _make_spec(chunk_size, vocab_block, temperature, softcap, backward, matmul_dtype=None) -> _Spec:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if vocab_block is not None and (not isinstance(vocab_block, int) or vocab_block < 1):
        raise ValueError(f"vocab_block must be a positive int or None (whole vocabulary), got {vocab_block!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    if backward not in _BACKWARD_MODES:
        raise ValueError(f"backward must be one of {_BACKWARD_MODES}, got {backward!r}")
    if matmul_dtype not in (None, torch.bfloat16):
        raise ValueError(f"matmul_dtype must be None (the compute dtype) or torch.bfloat16, got {matmul_dtype!r}")
    if matmul_dtype is not None and backward != "recompute":
        raise ValueError("matmul_dtype=torch.bfloat16 is implemented for backward='recompute' only")
    return _Spec(chunk_size, vocab_block, float(temperature), None if softcap is None else float(softcap), backward,
                 matmul_dtype)


def _check_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, mask: Tensor) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    B, T, H = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be (V, {H}) to match hidden (B, T, {H}), got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},) or None, got shape {tuple(bias.shape)}")
    if tuple(targets.shape) != (B, T) or tuple(mask.shape) != (B, T):
        raise ValueError(
            f"targets and mask must be (B, T) = {(B, T)} like hidden, got {tuple(targets.shape)} and {tuple(mask.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor (int64 or int32), got {targets.dtype}")
    if not hidden.is_floating_point() or weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(
            f"hidden, weight and bias must share one floating dtype, got {hidden.dtype}, {weight.dtype}, "
            f"{None if bias is None else bias.dtype}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Selection(NamedTuple):
    flat_pos: Tensor  # (N,) int64 positions into the flattened (B*T) axis, row-major, ascending
    rows: Tensor  # (N,) int64 row of each completion token
    targets: Tensor  # (N,) int64 target id of each completion token
    num_tokens: Tensor  # (B,) int64


def _select(targets: Tensor, mask: Tensor, vocab: int) -> _Selection:
    B, T = mask.shape
    flat_pos = mask.reshape(-1).bool().nonzero().squeeze(1)  # (N,)
    tgt = targets.reshape(-1).index_select(0, flat_pos).long()  # (N,)
    if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= vocab):
        bad = tgt[(tgt < 0) | (tgt >= vocab)][0].item()
        raise ValueError(f"target id {bad} at a completion position is outside the vocabulary [0, {vocab})")
    num_tokens = mask.reshape(B, T).bool().sum(1)
    return _Selection(flat_pos, torch.div(flat_pos, T, rounding_mode="floor"), tgt, num_tokens)


def _gather_hidden(hidden: Tensor, sel: _Selection, cd: torch.dtype) -> Tensor:
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, sel.flat_pos).to(cd)  # (N, H)


def _tile_buffer(rows: int, cols: int, cd: torch.dtype, device) -> Tensor:
    # One flat buffer reused by every tile: fresh large allocations cost page faults on CPU.
    return torch.empty(rows * cols, dtype=cd, device=device)


def _raw_logits(h: Tensor, w: Tensor, b: Tensor | None, buf: Tensor) -> Tensor:
    """l = h w^T + b into the front of ``buf`` as a contiguous (n, v) view.

    With bf16 operands (``matmul_dtype``) the product is computed in bf16 (float32 accumulation
    inside the kernel, a bf16 result) and widened into the float32 buffer."""
    out = buf[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    if h.dtype != buf.dtype:
        out.copy_(torch.mm(h, w.t()))
        return out if b is None else out.add_(b)
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _scale_logits_(l: Tensor, spec: _Spec) -> Tensor:
    """In place: raw logits l -> z = softcap(l) / temperature."""
    if spec.softcap is not None:
        return l.div_(spec.softcap).tanh_().mul_(spec.softcap / spec.temperature)
    if spec.temperature != 1.0:
        return l.div_(spec.temperature)
    return l


def _dz_dl_from_z_(z_to_dzdl: Tensor, spec: _Spec) -> Tensor:
    """In place: z -> dz/dl = (1 - tanh^2(l / cap)) / temperature (soft-capping only)."""
    t = z_to_dzdl.mul_(spec.temperature / spec.softcap)  # tanh(l / cap)
    return t.square_().neg_().add_(1.0).div_(spec.temperature)


# The recompute path works with base-2 logits z2 = z * log2(e): exp2 costs ~40% less than exp on this
# CPU, and without soft-capping the factor log2(e) / temperature is folded into the small (N, H)
# operand of the logits matmul, so no pass over a tile scales it. Log-sum-exps are kept in base 2 too
# (lse2 = lse * log2(e)); only the returned log-probs are converted back.
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _tile_operand(h: Tensor, spec: _Spec) -> Tensor:
    """The (n, H) left operand of the logits matmul: h * log2(e) / T, or h itself with soft-capping."""
    return h if spec.softcap is not None else h * (_LOG2E / spec.temperature)


def _tile_bias(bias: Tensor | None, v0: int, v1: int, spec: _Spec, cd) -> Tensor | None:
    if bias is None:
        return None
    b = bias[v0:v1].to(cd)
    return b if spec.softcap is not None else b * (_LOG2E / spec.temperature)


def _logits2(h2: Tensor, w: Tensor, b2: Tensor | None, buf: Tensor, spec: _Spec) -> Tensor:
    """Base-2 logits tile z2 = z * log2(e), (n, v), from :func:`_tile_operand` / :func:`_tile_bias` inputs."""
    l = _raw_logits(h2, w, b2, buf)
    if spec.softcap is not None:
        return l.div_(spec.softcap).tanh_().mul_(spec.softcap * _LOG2E / spec.temperature)
    return l


def _dz_dl_from_z2_(z2_to_dzdl: Tensor, spec: _Spec) -> Tensor:
    """In place: z2 -> dz/dl = (1 - tanh^2(l / cap)) / temperature (soft-capping only)."""
    t = z2_to_dzdl.mul_(spec.temperature / (spec.softcap * _LOG2E))  # tanh(l / cap)
    return t.square_().neg_().add_(1.0).div_(spec.temperature)


def _target_logits(h: Tensor, weight: Tensor, bias: Tensor | None, tgt: Tensor, spec: _Spec, cd) -> tuple[Tensor, Tensor]:
    """(z[y], dz/dl[y]) for each token, from a row-wise dot with the gathered target rows of W."""
    out_z, out_d = [], []
    for t0 in range(0, h.shape[0], spec.chunk_size):
        y = tgt[t0:t0 + spec.chunk_size]
        l = (h[t0:t0 + spec.chunk_size] * weight.index_select(0, y).to(cd)).sum(1)  # (n,)
        if bias is not None:
            l = l + bias.index_select(0, y).to(cd)
        if spec.softcap is not None:
            t = torch.tanh(l / spec.softcap)
            out_z.append(t * (spec.softcap / spec.temperature))
            out_d.append((1.0 - t * t) / spec.temperature)
        else:
            out_z.append(l / spec.temperature)
            out_d.append(torch.full_like(l, 1.0 / spec.temperature))
    return torch.cat(out_z), torch.cat(out_d)


def _vocab_blocks(vocab: int, spec: _Spec):
    step = vocab if spec.vocab_block is None else spec.vocab_block
    return [(v0, min(v0 + step, vocab)) for v0 in range(0, vocab, step)]


def _logsumexp2_tiled(h: Tensor, weight: Tensor, bias: Tensor | None, spec: _Spec, cd) -> Tensor:
    """(N,) base-2 log-sum-exp of z2 = z * log2(e) over the vocabulary, online over vocabulary blocks."""
    N, V = h.shape[0], weight.shape[0]
    blocks = _vocab_blocks(V, spec)
    h2 = _mm_operand(_tile_operand(h, spec), spec)
    m = torch.empty(N, dtype=cd, device=h.device)  # running max of z2
    s = torch.empty(N, dtype=cd, device=h.device)  # running sum of 2^(z2 - m)
    buf = _tile_buffer(min(spec.chunk_size, N), blocks[0][1] - blocks[0][0], cd, h.device)
    for i, (v0, v1) in enumerate(blocks):  # vocabulary outside: the weight block stays in cache
        w = _mm_operand(weight[v0:v1].to(cd), spec)
        b2 = _tile_bias(bias, v0, v1, spec, cd)
        for t0 in range(0, N, spec.chunk_size):
            t1 = min(t0 + spec.chunk_size, N)
            z2 = _logits2(h2[t0:t1], w, b2, buf, spec)  # (n, v)
            if i == 0:  # first block: its own max, no rescaling
                torch.amax(z2, 1, out=m[t0:t1])
                torch.sum(z2.sub_(m[t0:t1, None]).exp2_(), 1, out=s[t0:t1])
                continue
            m_new = torch.maximum(m[t0:t1], z2.amax(1))
            s[t0:t1].mul_(torch.exp2(m[t0:t1] - m_new)).add_(z2.sub_(m_new[:, None]).exp2_().sum(1))
            m[t0:t1] = m_new
    return s.log2_().add_(m)


def _mm_operand(x: Tensor, spec: _Spec) -> Tensor:
    """A matmul operand in ``spec.matmul_dtype`` (bf16 runs ~3x faster than float32 on CPUs with
    AVX512-BF16), or unchanged."""
    return x if spec.matmul_dtype is None else x.to(spec.matmul_dtype)


def _mm_acc(out: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """out = a @ b (first) or out += a @ b; bf16 operands give a bf16 product added in float32."""
    if a.dtype == out.dtype:
        if first:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    elif first:
        out.copy_(torch.mm(a, b))
    else:
        out.add_(torch.mm(a, b))


def _forward_core(hidden, weight, bias, sel: _Selection, spec: _Spec) -> tuple[Tensor, Tensor]:
    """(logp (N,), lse2 (N,)) of the completion tokens (lse2 in base 2), without building any gradient."""
    cd = _compute_dtype(hidden.dtype)
    h = _gather_hidden(hidden, sel, cd)
    if h.shape[0] == 0:
        empty = torch.zeros(0, dtype=cd, device=hidden.device)
        return empty, empty
    lse2 = _logsumexp2_tiled(h, weight, bias, spec, cd)
    z_y, _ = _target_logits(h, weight, bias, sel.targets, spec, cd)
    return z_y - lse2 * _LN2, lse2


def _per_row(logp: Tensor, sel: _Selection, batch: int) -> tuple[Tensor, Tensor]:
    summed = torch.zeros(batch, dtype=logp.dtype, device=logp.device).index_add_(0, sel.rows, logp)
    return summed, summed / sel.num_tokens.clamp(min=1).to(logp.dtype)


def _row_coef(grad_summed: Tensor | None, grad_mean: Tensor | None, sel: _Selection, cd, device) -> Tensor:
    """(B,) d loss / d logp_t = g_sum[b] + g_mean[b] / n_b, shared by every token t of row b."""
    coef = torch.zeros(sel.num_tokens.shape[0], dtype=cd, device=device)
    if grad_summed is not None:
        coef = coef + grad_summed.to(cd)
    if grad_mean is not None:
        coef = coef + grad_mean.to(cd) / sel.num_tokens.clamp(min=1).to(cd)
    return coef


class _RecomputeFn(torch.autograd.Function):
    """Forward keeps the per-token log-sum-exp; backward recomputes each logits tile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, spec: _Spec):
        sel = _select(targets, mask, weight.shape[0])
        logp, lse2 = _forward_core(hidden, weight, bias, sel, spec)
        ctx.save_for_backward(hidden, weight, bias, lse2, *sel)
        ctx.spec = spec
        return _per_row(logp, sel, mask.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_summed, grad_mean):
        hidden, weight, bias, lse2, *sel_fields = ctx.saved_tensors
        sel, spec = _Selection(*sel_fields), ctx.spec
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cd, device = _compute_dtype(hidden.dtype), hidden.device
        N, H, V = lse2.shape[0], hidden.shape[-1], weight.shape[0]
        h = _gather_hidden(hidden, sel, cd)  # (N, H), gathered again rather than kept alive
        coef = _row_coef(grad_summed, grad_mean, sel, cd, device).index_select(0, sel.rows)  # (N,)
        grad_h = torch.empty(N, H, dtype=cd, device=device) if need_h else None
        grad_w = torch.empty(V, H, dtype=weight.dtype, device=device) if need_w else None
        grad_b = torch.zeros(V, dtype=cd, device=device) if need_b else None
        if N and (need_h or need_w or need_b):
            # d loss / d l_tv = coef_t * (onehot(y_t)_v - p_tv) * dz/dl_tv, p = softmax(z_t). The per-token
            # coef_t (and a constant dz/dl = 1/temperature) is folded into the small (n, H) operand of each
            # matmul, so a logits tile is touched only by sub + exp (and dz/dl with soft-capping). The first
            # product into each accumulator writes it (mm out=), so nothing is zero-filled.
            if spec.softcap is not None:
                _, dz_y = _target_logits(h, weight, bias, sel.targets, spec, cd)
                coef_y, coef_k = coef * dz_y, coef  # (N,) the one-hot half; the softmax half
            else:
                coef_y = coef_k = coef / spec.temperature
            h_k = _mm_operand(h * (-coef_k)[:, None], spec) if need_w else None  # (N, H), the sign folded in too
            h2 = _mm_operand(_tile_operand(h, spec), spec)
            blocks = _vocab_blocks(V, spec)
            width = blocks[0][1] - blocks[0][0]
            n = min(spec.chunk_size, N)
            buf = _tile_buffer(n, width, cd, device)
            dzdl_buf = _tile_buffer(n, width, cd, device) if spec.softcap is not None else None
            direct = grad_w is not None and grad_w.dtype == cd
            gw_buf = None if (not need_w or direct) else torch.empty(width, H, dtype=cd, device=device)
            for i, (v0, v1) in enumerate(blocks):
                w = _mm_operand(weight[v0:v1].to(cd), spec)
                b2 = _tile_bias(bias, v0, v1, spec, cd)
                gw = (grad_w[v0:v1] if direct else gw_buf[: v1 - v0]) if need_w else None  # this block's grad, in cd
                for t0 in range(0, N, spec.chunk_size):
                    t1 = min(t0 + spec.chunk_size, N)
                    z2 = _logits2(h2[t0:t1], w, b2, buf, spec)
                    if spec.softcap is not None:
                        dzdl = _dz_dl_from_z2_(dzdl_buf[: z2.numel()].view_as(z2).copy_(z2), spec)
                    p = z2.sub_(lse2[t0:t1, None]).exp2_()  # softmax(z), (n, v)
                    if spec.softcap is not None:
                        p.mul_(dzdl)
                    pm = _mm_operand(p, spec)
                    if need_h:  # sum_v p_tv dz/dl_tv W_v, scaled by -coef_k below
                        _mm_acc(grad_h[t0:t1], pm, w, first=i == 0)
                    if need_w:
                        _mm_acc(gw, pm.t(), h_k[t0:t1], first=t0 == 0)
                    if need_b:
                        grad_b[v0:v1].addmv_(p.t(), coef_k[t0:t1], alpha=-1.0)
                if need_w and not direct:  # one-hot half for the targets inside this block, then cast once
                    inside = ((sel.targets >= v0) & (sel.targets < v1)).nonzero().squeeze(1)
                    gw.index_add_(0, sel.targets[inside] - v0, h[inside] * coef_y[inside, None])
                    grad_w[v0:v1].copy_(gw)
            if need_w and direct:  # one-hot half: row y_t of grad W gets coef_y[t] * h_t
                grad_w.index_add_(0, sel.targets, h * coef_y[:, None])
            if need_h:
                grad_h.mul_(-coef_k[:, None])
                for t0 in range(0, N, spec.chunk_size):
                    t1 = min(t0 + spec.chunk_size, N)
                    grad_h[t0:t1].add_(weight.index_select(0, sel.targets[t0:t1]).to(cd) * coef_y[t0:t1, None])
            if need_b:
                grad_b.index_add_(0, sel.targets, coef_y)
        elif need_w:
            grad_w.zero_()
        return (
            _scatter_hidden_grad(grad_h, hidden, sel) if need_h else None,
            grad_w,
            grad_b.to(bias.dtype) if need_b else None,
            None, None, None,
        )


def _scatter_hidden_grad(grad_h: Tensor, hidden: Tensor, sel: _Selection) -> Tensor:
    out = torch.zeros_like(hidden)  # prompt and padding positions get exactly zero
    out.view(-1, hidden.shape[-1]).index_copy_(0, sel.flat_pos, grad_h.to(hidden.dtype))
    return out


class _AccumulateFn(torch.autograd.Function):
    """Liger-style: gradients computed chunk by chunk in the forward, scaled in the backward.

    d logp_t / d(h_t) is per token, so it is kept (N, H) and scaled per token later. The weight
    gradient sums tokens of different rows, whose scales (grad_output[b]) are unknown during the
    forward, so it is kept per row: (B, V, H). Token chunks span the whole vocabulary (the
    log-sum-exp must be final before the softmax is known), so the tile is (chunk_size, V).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, spec: _Spec):
        sel = _select(targets, mask, weight.shape[0])
        B, H, V = mask.shape[0], hidden.shape[-1], weight.shape[0]
        cd, device = _compute_dtype(hidden.dtype), hidden.device
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h = _gather_hidden(hidden, sel, cd)
        N = h.shape[0]
        w = weight.to(cd)
        b = None if bias is None else bias.to(cd)
        logp = torch.empty(N, dtype=cd, device=device)
        gh = torch.zeros(N, H, dtype=cd, device=device) if need_h else None
        gw_rows = torch.zeros(B, V, H, dtype=cd, device=device) if need_w else None
        gb_rows = torch.zeros(B, V, dtype=cd, device=device) if need_b else None
        buf = _tile_buffer(min(spec.chunk_size, max(N, 1)), V, cd, device)
        dzdl_buf = _tile_buffer(min(spec.chunk_size, max(N, 1)), V, cd, device) if spec.softcap is not None else None
        for t0 in range(0, N, spec.chunk_size):
            t1 = min(t0 + spec.chunk_size, N)
            ar, y = torch.arange(t1 - t0, device=device), sel.targets[t0:t1]
            z = _scale_logits_(_raw_logits(h[t0:t1], w, b, buf), spec)  # (n, V)
            dzdl = _dz_dl_from_z_(dzdl_buf[: z.numel()].view_as(z).copy_(z), spec) if spec.softcap is not None else None
            z_y = z[ar, y]
            m = z.amax(1)
            e = z.sub_(m[:, None]).exp_()
            s = e.sum(1)
            logp[t0:t1] = z_y - m - s.log()
            if not (need_h or need_w or need_b):
                continue
            g = e.div_(s[:, None]).neg_()  # -softmax
            g[ar, y] += 1.0  # onehot - softmax = d logp / d z
            g = g.mul_(dzdl) if dzdl is not None else g.div_(spec.temperature)  # d logp / d l
            if need_h:
                gh[t0:t1] = g @ w
            rows, counts = torch.unique_consecutive(sel.rows[t0:t1], return_counts=True)
            r0 = 0
            for r, c in zip(rows.tolist(), counts.tolist()):
                if need_w:
                    gw_rows[r].addmm_(g[r0:r0 + c].t(), h[t0 + r0:t0 + r0 + c])
                if need_b:
                    gb_rows[r].add_(g[r0:r0 + c].sum(0))
                r0 += c
        ctx.save_for_backward(hidden, bias, gh, gw_rows, gb_rows, *sel)
        ctx.weight_dtype = weight.dtype
        return _per_row(logp, sel, B)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_summed, grad_mean):
        hidden, bias, gh, gw_rows, gb_rows, *sel_fields = ctx.saved_tensors
        sel = _Selection(*sel_fields)
        cd = _compute_dtype(hidden.dtype)
        coef_row = _row_coef(grad_summed, grad_mean, sel, cd, hidden.device)  # (B,)
        coef = coef_row.index_select(0, sel.rows)  # (N,)
        grad_h = _scatter_hidden_grad(gh * coef[:, None], hidden, sel) if gh is not None else None
        grad_w = torch.einsum("b,bvh->vh", coef_row, gw_rows).to(ctx.weight_dtype) if gw_rows is not None else None
        grad_b = (coef_row @ gb_rows).to(bias.dtype) if gb_rows is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def fused_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    mask: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_block: int | None = DEFAULT_VOCAB_BLOCK,
    temperature: float = 1.0,
    softcap: float | None = None,
    backward: BackwardMode = "recompute",
    matmul_dtype: torch.dtype | None = None,
) -> SequenceLogProbs:
    """Per-sequence completion log-probs without materialising the (B, T, V) logits.

    Args:
        hidden: (B, T, H) final hidden states; ``hidden[b, t]`` predicts ``targets[b, t]``.
        weight: (V, H) lm-head weight, same dtype as ``hidden``.
        bias: (V,) lm-head bias or None.
        targets: (B, T) int target ids, already shifted; read only where ``mask`` is true.
        mask: (B, T) bool/0-1 completion mask (prompt and padding false).
        chunk_size: completion tokens per tile.
        vocab_block: vocabulary entries per tile (None = whole vocabulary); ignored by
            ``backward="accumulate"``, which needs whole-vocabulary rows.
        temperature, softcap: z = softcap * tanh(l / softcap) / temperature (see module doc).
        backward: "recompute" (default) or "accumulate" (see module doc).
        matmul_dtype: None (matmuls in the compute dtype) or torch.bfloat16: the tile matmuls of
            the forward and backward take bf16 operands (bf16 mixed precision, as autocast would
            run an lm head); log-sum-exp, softmax, per-row sums and gradient accumulators stay
            float32.  Log-probs then carry bf16 rounding of the logits (~1e-2 per token).

    Returns:
        SequenceLogProbs(summed (B,), mean (B,), num_tokens (B,)); log-probs in float32
        (float64 for float64 inputs). Differentiable wrt hidden, weight and bias.
    """
    spec = _make_spec(chunk_size, vocab_block, temperature, softcap, backward, matmul_dtype)
    _check_inputs(hidden, weight, bias, targets, mask)
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        fn = _RecomputeFn if spec.backward == "recompute" else _AccumulateFn
        summed, mean = fn.apply(hidden, weight, bias, targets, mask, spec)
        num_tokens = mask.bool().sum(1)
    else:  # e.g. the reference model under no_grad: forward only, tiled
        sel = _select(targets, mask, weight.shape[0])
        logp, _ = _forward_core(hidden, weight, bias, sel, spec)
        summed, mean = _per_row(logp, sel, mask.shape[0])
        num_tokens = sel.num_tokens
    return SequenceLogProbs(summed, mean, num_tokens)


class FusedLinearLogProbs(nn.Module):
    """Thin module over :func:`fused_sequence_logprobs`; holds only the tiling and logit options.

    ``FusedLinearLogProbs(chunk_size=256)(hidden, lm_head.weight, lm_head.bias, targets, mask)``
    """

    def __init__(
        self,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        vocab_block: int | None = DEFAULT_VOCAB_BLOCK,
        temperature: float = 1.0,
        softcap: float | None = None,
        backward: BackwardMode = "recompute",
    ) -> None:
        super().__init__()
        self.spec = _make_spec(chunk_size, vocab_block, temperature, softcap, backward)

    def forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, mask: Tensor) -> SequenceLogProbs:
        s = self.spec
        return fused_sequence_logprobs(
            hidden, weight, bias, targets, mask, chunk_size=s.chunk_size, vocab_block=s.vocab_block,
            temperature=s.temperature, softcap=s.softcap, backward=s.backward)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"chunk_size={s.chunk_size}, vocab_block={s.vocab_block}, temperature={s.temperature}, "
                f"softcap={s.softcap}, backward={s.backward!r}")


def naive_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> SequenceLogProbs:
    """Plain reference: full (B, T, V) logits, log_softmax, gather, masked sum. Same contract."""
    _check_inputs(hidden, weight, bias, targets, mask)
    cd = _compute_dtype(hidden.dtype)
    logits = torch.nn.functional.linear(hidden, weight, bias).to(cd)  # (B, T, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:  # no extra pass over the (B, T, V) logits when it would divide by 1
        logits = logits / temperature
    logps = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    m = mask.bool()
    safe_targets = torch.where(m, targets.long(), torch.zeros_like(targets, dtype=torch.long))
    token_logps = logps.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) * m  # (B, T)
    num_tokens = m.sum(1)
    summed = token_logps.sum(1)
    return SequenceLogProbs(summed, summed / num_tokens.clamp(min=1).to(cd), num_tokens)
