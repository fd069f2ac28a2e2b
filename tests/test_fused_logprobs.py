"""trainer.loss: the fused, chunked log-probs against the full-logits reference.

Every case compares values and gradients (hidden, weight, bias) with
``naive_sequence_logprobs``, which builds the (B, T, V) logits and uses log_softmax + gather.
The upstream gradient mixes both outputs (summed and mean) with random per-row weights, as the
DPO objective does (chosen and rejected rows get different signs and scales).
"""
from __future__ import annotations

import pytest
import torch

from trainer.loss import (
    FusedLinearLogProbs,
    fused_sequence_logprobs,
    naive_sequence_logprobs,
)

MODES = ["recompute", "accumulate"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: OpenMP barriers on a shared 2-core box cost more than the math (10-100x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_case(B, T, H, V, *, bias, dtype=torch.float32, seed=0, prompt=5, all_masked_row=None):
    """Inputs with a prompt prefix, right padding of varying length, and logits of O(1..10)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (3.0 / H**0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for r in range(B):
        end = T - (r * 7) % max(T - prompt, 1)  # different padding per row
        mask[r, min(prompt, T):end] = True
    if all_masked_row is not None:
        mask[all_masked_row] = False
    targets[~mask] = -100  # never read: an out-of-vocabulary id must not matter
    conv = (lambda t: None if t is None else t.to(dtype).requires_grad_())
    gs = torch.randn(B, generator=g, dtype=torch.float64)
    gm = torch.randn(B, generator=g, dtype=torch.float64)
    return conv(hidden), conv(weight), conv(b), targets, mask, gs, gm


def run(fn, hidden, weight, bias, targets, mask, gs, gm, **kw):
    """Values and grads of sum(gs * summed + gm * mean); grads reset afterwards."""
    out = fn(hidden, weight, bias, targets, mask, **kw)
    loss = (out.summed * gs.to(out.summed.dtype)).sum() + (out.mean * gm.to(out.mean.dtype)).sum()
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return out, grads


def reference(hidden, weight, bias, targets, mask, gs, gm, dtype=torch.float32, **kw):
    """The naive path on detached copies of the same values (optionally upcast)."""
    cp = (lambda t: None if t is None else t.detach().to(dtype).requires_grad_())
    return run(naive_sequence_logprobs, cp(hidden), cp(weight), cp(bias), targets, mask, gs, gm, **kw)


def assert_close_sum(actual, expected, n_tokens, per_token=2e-6, rtol=1e-5):
    """Summed log-probs: the absolute tolerance grows with the number of tokens summed."""
    atol = 1e-5 + per_token * float(n_tokens.max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "shape, chunk_size, vocab_block",
    [
        ((3, 47, 31, 123), 16, 50),  # odd shapes; neither tile size divides
        ((3, 47, 31, 123), 1, None),  # one token per chunk, whole vocabulary
        ((3, 47, 31, 123), 4096, 123),  # one tile for everything
        ((4, 64, 48, 1000), 32, 256),  # typical (2 DPO pairs); both divide
        ((4, 64, 48, 1000), 100, 333),
    ],
)
def test_matches_full_logits_fp32(shape, chunk_size, vocab_block, bias, mode):
    case = make_case(*shape, bias=bias)
    out, grads = run(fused_sequence_logprobs, *case, chunk_size=chunk_size, vocab_block=vocab_block, backward=mode)
    ref, ref_grads = reference(*case)
    assert out.summed.dtype == torch.float32
    assert torch.equal(out.num_tokens, ref.num_tokens)
    assert_close_sum(out.summed, ref.summed, ref.num_tokens)
    torch.testing.assert_close(out.mean, ref.mean, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_long_rows_tolerance_scales_with_length(mode):
    """Hundreds of completion tokens per row: the summed log-prob is ~ -1e3 in fp32."""
    case = make_case(2, 600, 32, 500, bias=True, seed=3, prompt=40)
    out, grads = run(fused_sequence_logprobs, *case, chunk_size=128, vocab_block=128, backward=mode)
    ref, ref_grads = reference(*case, dtype=torch.float64)
    assert int(ref.num_tokens.min()) >= 400
    assert_close_sum(out.summed.double(), ref.summed, ref.num_tokens)
    torch.testing.assert_close(out.mean.double(), ref.mean, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_row_is_zero_without_nan(mode):
    case = make_case(3, 47, 31, 123, bias=True, all_masked_row=1)
    hidden, mask = case[0], case[4]
    out, (g_h, g_w, g_b) = run(fused_sequence_logprobs, *case, chunk_size=16, vocab_block=50, backward=mode)
    assert out.num_tokens[1] == 0 and out.summed[1] == 0 and out.mean[1] == 0
    for t in (out.summed, out.mean, g_h, g_w, g_b):
        assert torch.isfinite(t).all()
    # prompt, padding and the empty row get exactly zero gradient: they were never computed
    assert torch.count_nonzero(g_h[~mask]) == 0
    ref, ref_grads = reference(*case)
    torch.testing.assert_close(out.summed, ref.summed, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_h, ref_grads[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_no_completion_tokens_at_all(mode):
    case = make_case(2, 9, 8, 17, bias=True)
    case[4].zero_()
    out, grads = run(fused_sequence_logprobs, *case, backward=mode)
    assert torch.equal(out.summed, torch.zeros(2)) and torch.equal(out.mean, torch.zeros(2))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("softcap, temperature", [(None, 0.7), (4.0, 1.0), (4.0, 1.3)])
def test_temperature_and_softcap(softcap, temperature, mode):
    case = make_case(3, 47, 31, 123, bias=True, seed=1)
    kw = dict(softcap=softcap, temperature=temperature)
    out, grads = run(fused_sequence_logprobs, *case, chunk_size=20, vocab_block=40, backward=mode, **kw)
    ref, ref_grads = reference(*case, **kw)
    assert_close_sum(out.summed, ref.summed, ref.num_tokens)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("softcap, bias", [(None, False), (None, True), (3.0, True)])
@pytest.mark.parametrize("shape, chunk_size, vocab_block", [((3, 37, 24, 301), 16, 64), ((2, 130, 64, 2000), 64, None)])
def test_bf16_matmuls_fp32_everything_else(shape, chunk_size, vocab_block, softcap, bias):
    """matmul_dtype=bf16 (mixed precision): fp32 inputs, outputs and gradients; only the tile
    matmuls round their operands to bf16 (8 mantissa bits), so log-probs move by ~1e-2 per token
    at these O(1..10) logits and gradients by ~1 % -- and nothing else changes."""
    case = make_case(*shape, bias=bias, seed=5)
    out, grads = run(fused_sequence_logprobs, *case, chunk_size=chunk_size, vocab_block=vocab_block, softcap=softcap,
                     matmul_dtype=torch.bfloat16)
    ref, ref_grads = reference(*case, softcap=softcap)
    assert out.summed.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert_close_sum(out.summed, ref.summed, ref.num_tokens, per_token=3e-2, rtol=1e-2)
    for g, r in zip(grads, ref_grads):
        assert float((g - r).norm() / r.norm()) < 2e-2
    exact, _ = run(fused_sequence_logprobs, *case, chunk_size=chunk_size, vocab_block=vocab_block, softcap=softcap)
    assert not torch.equal(exact.summed, out.summed)  # the bf16 path really ran
    with torch.no_grad():  # the forward-only path (reference model) takes it too
        nog = fused_sequence_logprobs(*case[:5], chunk_size=chunk_size, vocab_block=vocab_block, softcap=softcap,
                                      matmul_dtype=torch.bfloat16)
    torch.testing.assert_close(nog.summed, out.summed.detach(), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="matmul_dtype"):
        fused_sequence_logprobs(*case[:5], matmul_dtype=torch.float16)
    with pytest.raises(ValueError, match="recompute"):
        fused_sequence_logprobs(*case[:5], matmul_dtype=torch.bfloat16, backward="accumulate")


@pytest.mark.parametrize("mode", MODES)
def test_bf16_inputs_accumulate_in_fp32(mode):
    """bf16 in, fp32 log-probs out; compared with the fp32 reference on the same (rounded) values."""
    case = make_case(4, 64, 48, 1000, bias=True, dtype=torch.bfloat16, seed=2)
    out, grads = run(fused_sequence_logprobs, *case, chunk_size=32, vocab_block=256, backward=mode)
    ref, ref_grads = reference(*case, dtype=torch.float32)
    assert out.summed.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    # the log-sum-exp runs in fp32 on the upcast values, so values are as tight as fp32
    assert_close_sum(out.summed, ref.summed, ref.num_tokens)
    # gradients are rounded to bf16 once, at the end (8 mantissa bits)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, rtol=1.6e-2, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gradcheck_float64(mode, softcap):
    h, w, b, targets, mask, _, _ = make_case(2, 5, 4, 7, bias=True, dtype=torch.float64, prompt=1)

    def f(h, w, b):
        out = fused_sequence_logprobs(h, w, b, targets, mask, chunk_size=3, vocab_block=4, softcap=softcap,
                                      temperature=0.9, backward=mode)
        return out.summed, out.mean

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_only_requested_grads_and_no_grad_path():
    """Frozen lm head (LoRA-style): no weight grad; reference model under no_grad: same values."""
    hidden, weight, bias, targets, mask, _, _ = make_case(3, 47, 31, 123, bias=True)
    weight.requires_grad_(False)
    out = fused_sequence_logprobs(hidden, weight, None, targets, mask, chunk_size=16, vocab_block=50)
    out.summed.sum().backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        nog = fused_sequence_logprobs(hidden, weight, None, targets, mask, chunk_size=16, vocab_block=50)
    assert not nog.summed.requires_grad
    torch.testing.assert_close(nog.summed, out.summed.detach(), rtol=0, atol=0)


def test_module_wrapper_matches_function():
    case = make_case(3, 47, 31, 123, bias=True)
    module = FusedLinearLogProbs(chunk_size=16, vocab_block=50, temperature=0.8)
    assert "chunk_size=16" in repr(module)
    a = module(*case[:5])
    b = fused_sequence_logprobs(*case[:5], chunk_size=16, vocab_block=50, temperature=0.8)
    torch.testing.assert_close(a.summed, b.summed, rtol=0, atol=0)


def test_errors_name_the_bad_value():
    hidden, weight, bias, targets, mask, _, _ = make_case(2, 9, 8, 17, bias=True)
    targets = targets.clone()
    r, t = mask.nonzero()[0].tolist()
    targets[r, t] = 17
    with pytest.raises(ValueError, match="target id 17 .* outside the vocabulary \\[0, 17\\)"):
        fused_sequence_logprobs(hidden, weight, bias, targets, mask)
    with pytest.raises(ValueError, match="weight must be \\(V, 8\\)"):
        fused_sequence_logprobs(hidden, weight[:, :4], None, targets, mask)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        FusedLinearLogProbs(chunk_size=0)
    with pytest.raises(ValueError, match="backward must be one of"):
        FusedLinearLogProbs(backward="lazy")
