"""A small Llama in plain PyTorch, numerically and state-dict compatible with transformers'
``LlamaForCausalLM`` (RMSNorm in fp32, rotary embeddings, grouped-query SDPA attention,
SwiGLU MLP), for the tiny random-init models of tests and benchmarks.

Why not transformers' class: importing it pulls in torch.distributed, dynamo, sympy, scipy
and accelerate, about 120 MiB of resident memory before the first weight, for a model of a
few MiB.  The parameter names are the Hugging Face ones, so ``to_hf(model)`` gives an
equivalent ``LlamaForCausalLM`` (used by the TRL comparison test) and checkpoints load
either way.  Real checkpoints (``--model PATH``) still go through transformers.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TinyLlamaConfig:
    vocab_size: int
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 688
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def to_json_string(self, use_diff: bool = True) -> str:  # the transformers config method describe() calls
        return json.dumps(asdict(self))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin) of shape (T, head_dim), as transformers' default rope (halves concatenated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, seq_lens: list[int] | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if seq_lens is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # causal; no padding mask (right padding)
        else:
            # Packed sequences (B = 1): block-diagonal causal attention, one causal SDPA per sequence
            # (varlen attention: no T x T mask, no score computed across sequences).
            y = torch.cat([F.scaled_dot_product_attention(qs, ks, vs, is_causal=True) for qs, ks, vs in
                           zip(q.split(seq_lens, 2), k.split(seq_lens, 2), v.split(seq_lens, 2))], dim=2)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, seq_lens: list[int] | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, seq_lens)
        return x + self.mlp(self.post_attention_layernorm(x))


class BodyOutput:
    def __init__(self, last_hidden_state: Tensor):
        self.last_hidden_state = last_hidden_state


class LlamaBody(nn.Module):
    """Embeddings + blocks + final norm: what ``model.get_decoder()`` returns.

    ``forward(input_ids)``: a right-padded batch (B, T), causal attention.
    ``forward(input_ids, seq_lens=[n1, n2, ...])``: input_ids (1, sum n_i) holds several sequences
    packed back to back; positions restart at 0 for each and no token attends across sequences
    (the result equals running each sequence alone).
    """

    supports_packing = True

    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, input_ids: Tensor, use_cache: bool = False, seq_lens: list[int] | None = None) -> BodyOutput:
        x = self.embed_tokens(input_ids)  # (B, T, H)
        if seq_lens is None:
            positions = torch.arange(input_ids.shape[1])
        else:
            if input_ids.shape[0] != 1 or sum(seq_lens) != input_ids.shape[1]:
                raise ValueError(f"packed input must be (1, sum(seq_lens)); got {tuple(input_ids.shape)} for "
                                 f"{len(seq_lens)} sequences of {sum(seq_lens)} tokens")
            positions = torch.cat([torch.arange(n) for n in seq_lens])  # restart at 0 in every sequence
        cos, sin = rotary(positions, self.config.hidden_size // self.config.num_attention_heads,
                          self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, seq_lens)
        return BodyOutput(self.norm(x))


class TinyLlamaForCausalLM(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.config = c
        self.model = LlamaBody(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.apply(self._init)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.initializer_range)

    def get_decoder(self) -> LlamaBody:
        return self.model

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: Tensor) -> Tensor:
        """Full logits (B, T, V): for generation or inspection, never used by the trainer's loss."""
        return self.lm_head(self.model(input_ids).last_hidden_state)


def to_hf(model: TinyLlamaForCausalLM):
    """An equivalent transformers ``LlamaForCausalLM`` with the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False, mlp_bias=False))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq")]:
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    return hf.to(next(model.parameters()).dtype)


def default_intermediate(hidden: int) -> int:
    """Llama's 8/3 ratio, rounded up to a multiple of 16."""
    return int(math.ceil(8 * hidden / 3 / 16) * 16)
