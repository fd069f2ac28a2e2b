"""Causal LMs for the trainer: build one from a path or a tiny config spec; sequence log-probs.

``--model`` is either

* a local directory with a Hugging Face causal LM (``config.json`` + weights), loaded with
  ``local_files_only=True`` (nothing is downloaded), or
* a spec for a tiny random-init model, e.g. ``tiny-llama:layers=4,hidden=256,heads=4``
  (keys: layers, hidden, heads, kv_heads, intermediate, max_pos, tie, seed, vocab); the vocabulary
  size is the tokenizer's, or ``vocab`` if larger (output rows no token id reaches, as real
  models pad theirs: the benchmark's 32k / 128k shapes with the repo's 3k tokenizer).  Built with ``trainer.tiny_llama`` (plain PyTorch, the Hugging
  Face Llama's numerics and parameter names, without transformers' import cost).  The same spec and seed always give the same weights, so the
  reference model of a spec is "the policy at step 0", rebuilt when needed.

:func:`sequence_logps` runs the model *body* (``get_decoder()``) to get the final hidden
states, then ``trainer.loss.fused_sequence_logprobs`` with the lm-head weight: the
(B, T, V) logits are never built.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainer.loss import DEFAULT_CHUNK_SIZE, SequenceLogProbs, fused_sequence_logprobs

SPEC_FAMILIES = ("tiny-llama",)
_SPEC_KEYS = {"layers", "hidden", "heads", "kv_heads", "intermediate", "max_pos", "tie", "seed", "vocab"}
# allowed range per key (seed: any integer); a size of 0 or less builds no model, or one without layers
_SPEC_RANGES = {"layers": (1, None), "hidden": (1, None), "heads": (1, None), "kv_heads": (1, None),
                "intermediate": (1, None), "max_pos": (1, None), "tie": (0, 1), "vocab": (0, None)}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelSpecError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` names, resolved: a local path or a parsed tiny spec."""

    kind: str  # "path" | "spec"
    value: str  # resolved path, or the canonical spec string
    params: tuple[tuple[str, int], ...] = ()

    def identity(self, vocab_size: int) -> dict[str, Any]:
        """What makes the weights what they are (goes into cache keys and lineage)."""
        if self.kind == "spec":
            return {"kind": "spec", "spec": self.value, "vocab_size": vocab_size, "torch": torch.__version__.split("+")[0]}
        return {"kind": "path", "path": self.value, "sha256": _weights_sha256(Path(self.value))}


def parse_model(model: str, *, default_seed: int = 0) -> ModelSource:
    """``tiny-llama[:k=v,...]`` -> spec; anything else must be a local model directory."""
    family, _, rest = model.partition(":")
    if family in SPEC_FAMILIES:
        params: dict[str, int] = {"layers": 4, "hidden": 256, "heads": 4, "seed": default_seed}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, val = item.partition("=")
            if not eq or key not in _SPEC_KEYS:
                raise ModelSpecError(f"bad model spec item {item!r} in {model!r}; allowed keys: {', '.join(sorted(_SPEC_KEYS))}")
            try:
                params[key] = int(val)
            except ValueError as err:
                raise ModelSpecError(f"model spec {model!r}: {key} must be an integer, got {val!r}") from err
        for key, (lo, hi) in _SPEC_RANGES.items():
            if key in params and (params[key] < lo or (hi is not None and params[key] > hi)):
                allowed = f"{lo} or {hi}" if hi == lo + 1 else f"at least {lo}" if hi is None else f"{lo}..{hi}"
                raise ModelSpecError(f"model spec {model!r}: {key}={params[key]} is not allowed ({allowed})")
        if params["hidden"] % params["heads"]:
            raise ModelSpecError(f"model spec {model!r}: hidden={params['hidden']} is not divisible by heads={params['heads']}")
        if params["heads"] % params.get("kv_heads", params["heads"]):
            raise ModelSpecError(f"model spec {model!r}: heads={params['heads']} is not divisible by "
                                 f"kv_heads={params['kv_heads']} (each key/value head serves a whole group of heads)")
        canon = family + ":" + ",".join(f"{k}={params[k]}" for k in sorted(params))
        return ModelSource("spec", canon, tuple(sorted(params.items())))
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelSpecError(
            f"--model {model!r} is neither a tiny spec ({', '.join(f'{f}:layers=4,hidden=256,heads=4' for f in SPEC_FAMILIES)}) "
            "nor a local directory with a Hugging Face config.json (models are never downloaded)")
    return ModelSource("path", str(path.resolve()))


def build_model(src: ModelSource, vocab_size: int, *, dtype: str = "float32") -> nn.Module:
    """The causal LM named by ``src``, in train mode (use ``.eval()`` for a reference)."""
    if src.kind == "spec":
        from trainer.tiny_llama import TinyLlamaConfig, TinyLlamaForCausalLM, default_intermediate

        p = dict(src.params)
        config = TinyLlamaConfig(
            vocab_size=max(vocab_size, p.get("vocab", 0)), hidden_size=p["hidden"], num_hidden_layers=p["layers"],
            num_attention_heads=p["heads"], num_key_value_heads=p.get("kv_heads", p["heads"]),
            intermediate_size=p.get("intermediate", default_intermediate(p["hidden"])),
            max_position_embeddings=p.get("max_pos", 4096), tie_word_embeddings=bool(p.get("tie", 0)))
        with torch.random.fork_rng(devices=[]):  # the init must not move the caller's RNG stream
            torch.manual_seed(p["seed"])
            model = TinyLlamaForCausalLM(config)
        return model.to(_DTYPES[dtype])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src.value, local_files_only=True, dtype=_DTYPES[dtype])
    if model.get_output_embeddings().weight.shape[0] < vocab_size:
        raise ModelSpecError(f"model {src.value} has {model.get_output_embeddings().weight.shape[0]} output ids, "
                             f"fewer than the tokenizer's {vocab_size}")
    return model


def _weights_sha256(path: Path) -> str:
    """sha256 over config.json and the weight files (sorted by name)."""
    h = hashlib.sha256()
    files = [path / "config.json"] + sorted(p for p in path.iterdir()
                                            if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _logit_options(model: nn.Module) -> dict[str, Any]:
    """Model-specific logit transforms the fused loss must reproduce (Gemma 2 soft-capping)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return {"softcap": float(cap)} if cap else {}


def length_groups(lengths: list[int], max_waste: float = 0.15) -> list[list[int]]:
    """Row indices grouped by length (longest first) so that padding inside a group stays below
    ``max_waste`` of its real tokens; on CPU, shorter padded work beats one big padded batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g and lengths[g[0]] * (len(g) + 1) <= (1 + max_waste) * (sum(lengths[j] for j in g) + lengths[i]):
            g.append(i)
        else:
            groups.append([i])
    return groups


PRECISIONS = ("fp32", "bf16-mixed")


def sequence_logps(model: nn.Module, input_ids: Tensor, completion_mask: Tensor, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, pack: bool = True, precision: str = "fp32") -> SequenceLogProbs:
    """Summed completion log-probs per row of a right-padded batch.

    input_ids, completion_mask: (N, T).  A row's length is up to its last completion token;
    padding never enters the body.

    * **packed** (``pack`` and a body with ``supports_packing``, e.g. ``trainer.tiny_llama``): the
      N rows are laid back to back in one (1, sum of lengths) sequence with positions restarting
      per row and block-diagonal causal attention (``seq_lens``): one forward, large matmuls, no
      padding at all.
    * otherwise (transformers models): rows run through the body in length groups
      (:func:`length_groups`) with right padding and causal attention, so a real token never
      attends to a pad position and no attention mask is needed (SDPA's causal fast path).

    Then the hidden states of each row go to the fused lm-head loss: the (N, T, V) logits never exist.

    ``precision="bf16-mixed"``: the body runs under ``torch.autocast("cpu", bfloat16)`` and the
    fused lm-head's tile matmuls take bf16 operands; weights, gradients, log-sum-exps and the
    returned log-probs stay float32 (AMP's recipe; bf16 matmuls are ~3x faster than float32 on
    CPUs with AVX512-BF16).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    mixed = precision == "bf16-mixed"
    N, T = input_ids.shape
    has = completion_mask.any(1)
    last = torch.where(has, T - 1 - completion_mask.flip(1).int().argmax(1), torch.zeros_like(has, dtype=torch.long))
    lengths = (last + 1).tolist()  # tokens needed per row: through its last completion token
    body = model.get_decoder()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        if pack and getattr(body, "supports_packing", False):
            flat = torch.cat([input_ids[i, :n] for i, n in enumerate(lengths)])[None]  # (1, sum n)
            rows = list(body(input_ids=flat, use_cache=False, seq_lens=lengths).last_hidden_state[0].split(lengths))
        else:
            rows: list[Tensor | None] = [None] * N
            for g in length_groups(lengths):
                Lg = lengths[g[0]]
                h = body(input_ids=input_ids[g, :Lg], use_cache=False).last_hidden_state  # (len(g), Lg, H)
                for k, i in enumerate(g):
                    rows[i] = h[k, :lengths[i]]
    head = model.get_output_embeddings()
    hidden = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(head.weight.dtype)  # (N, T', H)
    Tp = hidden.shape[1]
    return fused_sequence_logprobs(
        hidden[:, :-1], head.weight, head.bias, input_ids[:, 1:Tp], completion_mask[:, 1:Tp],
        chunk_size=chunk_size, matmul_dtype=torch.bfloat16 if mixed else None, **_logit_options(model))


def describe(model: nn.Module) -> dict[str, Any]:
    cfg = model.config
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "config": json.loads(cfg.to_json_string(use_diff=True))}
