"""Format adapters: map other preference shapes onto canonical raw judgments.

* ``canonical``  the raw comparison format of the spec (identity).
* ``trl``        TRL preference rows: ``prompt`` / ``chosen`` / ``rejected``, standard
                 (strings) or conversational (message lists); also the implicit-prompt
                 form (``chosen``/``rejected`` full conversations sharing a prefix).
* ``hh``         HH-RLHF transcripts: ``chosen`` / ``rejected`` strings of
                 ``\\n\\nHuman: ... \\n\\nAssistant: ...`` turns, split into prompt messages
                 plus the two final replies.
* ``rated``      rated candidate lists (UltraFeedback style): one prompt with several
                 scored candidates -> every pair of candidates; equal scores become
                 ``tie``; two candidates with the same text never make a pair (counted
                 as skipped ``identical_candidates``).  Per-aspect ratings (UltraFeedback's
                 ``annotations``: ``{instruction_following, honesty, truthfulness,
                 helpfulness}`` each ``{"Rating": "4", ...}`` or a number) become the pair's
                 ``dimensions``: the higher-rated candidate wins that dimension, equal -> ``tie``;
                 an aspect rated ``N/A`` (or not numeric) by either candidate gives no verdict.

Chosen/rejected formats (``trl``, ``hh``) say which response won but not which was "a": the
adapter assigns ``a``/``b`` by a content hash (half the pairs get chosen as ``a``, label ``a``;
the others chosen as ``b``, label ``b``), deterministically, so that label-balance statistics
stay meaningful and the pair id (order-independent anyway) does not change.

Non-canonical rows do not say who judged: ``annotator_id`` defaults to ``<format>:<batch>``
and ``annotator_kind`` to ``unknown`` (never ``human``: a TRL or HH dataset may well be
AI-labelled, and unknown judgments never count as human agreement); a row's own fields, or
``--annotator-id`` / ``--annotator-kind``, say otherwise.  Fields an adapter does not
consume are carried through unchanged (they end up in ``extra``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from schemas.policy import DimensionsConfig
from schemas.text import content_hash, normalize_text

FORMATS = ("canonical", "trl", "hh", "rated")

_CANDIDATE_LISTS = ("completions", "candidates", "responses", "outputs")
_CANDIDATE_TEXT = ("response", "text", "output", "content", "completion")
_CANDIDATE_SCORE = ("overall_score", "score", "rating", "reward")
_PROMPT_KEYS = ("prompt", "instruction", "question", "input")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


class AdapterError(ValueError):
    """A row that an adapter cannot map; carries the quarantine reason and field."""

    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason = reason
        self.field = field


@dataclass(frozen=True, slots=True)
class AdapterContext:
    stem: str  # file name without suffixes, for derived ids
    batch_id: str
    annotator_id: str | None = None
    annotator_kind: str | None = None
    dimension_rule: DimensionsConfig | None = None  # derives a missing label from ``dimensions`` (policy [dimensions])


def detect_format(objs: list[dict[str, Any]]) -> str | None:
    """Guess the format from the first decodable objects; ``None`` when unknown."""
    votes: dict[str, int] = {}
    for o in objs:
        keys = set(o)
        if {"response_a", "response_b"} <= keys:
            fmt = "canonical"
        elif {"chosen", "rejected"} <= keys:
            ch = o["chosen"]
            fmt = "hh" if "prompt" not in keys and isinstance(ch, str) and "\n\nAssistant:" in ch else "trl"
        elif any(isinstance(o.get(k), list) for k in _CANDIDATE_LISTS) and any(k in keys for k in _PROMPT_KEYS):
            fmt = "rated"
        else:
            continue
        votes[fmt] = votes.get(fmt, 0) + 1
    return max(votes, key=votes.__getitem__) if votes else None


def _require(obj: dict[str, Any], key: str) -> Any:
    if obj.get(key) is None:
        raise AdapterError("missing_field", key, f"field {key!r}: required, found nothing")
    return obj[key]


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise AdapterError("invalid_type", field, f"field {field!r}: expected a string or a list of {{role, content}} messages, found {type(value).__name__}")


def _completion_text(value: Any, field: str) -> tuple[list[dict[str, str]], str]:
    """(leading context messages, final assistant text) of a TRL completion."""
    if isinstance(value, str):
        return [], value
    msgs = _messages(value, field)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise AdapterError("invalid_value", field, f"field {field!r}: expected the conversation to end with an assistant turn")
    return msgs[:-1], msgs[-1]["content"]


def _oriented(chosen: str, rejected: str) -> dict[str, str]:
    """Content-hash orientation of a chosen/rejected pair (see the module docstring)."""
    if int(content_hash(chosen + "\x00" + rejected)[-1], 16) % 2:
        return {"response_a": rejected, "response_b": chosen, "label": "b"}
    return {"response_a": chosen, "response_b": rejected, "label": "a"}


def _defaults(obj: dict[str, Any], ctx: AdapterContext, fmt: str) -> dict[str, Any]:
    return {
        "annotator_id": obj.get("annotator_id") or ctx.annotator_id or f"{fmt}:{ctx.batch_id}",
        "annotator_kind": obj.get("annotator_kind") or ctx.annotator_kind or "unknown",
    }


def _from_trl(obj: dict[str, Any], ctx: AdapterContext, line: int) -> list[dict[str, Any]]:
    rest = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected")}
    ctx_c, chosen = _completion_text(_require(obj, "chosen"), "chosen")
    ctx_r, rejected = _completion_text(_require(obj, "rejected"), "rejected")
    if obj.get("prompt") is not None:
        prompt = _messages(obj["prompt"], "prompt") + ctx_c
        if ctx_c != ctx_r:
            raise AdapterError("unpairable", "rejected", "chosen and rejected continue the prompt differently")
    else:  # implicit prompt: the shared conversation before the final replies
        if ctx_c != ctx_r or not ctx_c:
            raise AdapterError("unpairable", "chosen", "implicit-prompt row: chosen and rejected do not share a prompt prefix")
        prompt = ctx_c
    out = {"comparison_id": obj.get("comparison_id") or obj.get("id") or f"{ctx.stem}:{line}",
           **rest, "prompt": prompt, **_oriented(chosen, rejected)}
    out.update(_defaults(obj, ctx, "trl"))
    return [out]


def split_hh_transcript(text: str, field: str) -> tuple[list[dict[str, str]], str]:
    """Split an HH-RLHF transcript into (prompt messages, final assistant reply)."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    # parts = ['', 'Human', 'text', 'Assistant', 'text', ...]
    if len(parts) < 5 or parts[0].strip():
        raise AdapterError("invalid_value", field, f"field {field!r}: expected '\\n\\nHuman: ... \\n\\nAssistant: ...' turns")
    turns = [{"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1].strip()}
             for i in range(1, len(parts) - 1, 2)]
    if turns[-1]["role"] != "assistant":
        raise AdapterError("invalid_value", field, f"field {field!r}: expected the transcript to end with an Assistant turn")
    return turns[:-1], turns[-1]["content"]


def _from_hh(obj: dict[str, Any], ctx: AdapterContext, line: int) -> list[dict[str, Any]]:
    rest = {k: v for k, v in obj.items() if k not in ("chosen", "rejected")}
    chosen = _require(obj, "chosen")
    rejected = _require(obj, "rejected")
    for f, v in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(v, str):
            raise AdapterError("invalid_type", f, f"field {f!r}: expected a transcript string, found {type(v).__name__}")
    p_c, a = split_hh_transcript(chosen, "chosen")
    p_r, b = split_hh_transcript(rejected, "rejected")
    if p_c != p_r:
        raise AdapterError("unpairable", "rejected", "chosen and rejected transcripts have different prompts")
    out = {"comparison_id": obj.get("comparison_id") or obj.get("id") or f"{ctx.stem}:{line}",
           **rest, "prompt": p_c, **_oriented(a, b)}
    out.update(_defaults(obj, ctx, "hh"))
    return [out]


_ASPECT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _rating(value: Any) -> float | None:
    """A numeric aspect rating: a number, a numeric string ("4"), or ``{"Rating": ...}``; else None."""
    if isinstance(value, dict):
        value = value.get("Rating", value.get("rating"))
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value == value else None
    if isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            return None
        return x if x == x and abs(x) != float("inf") else None
    return None


def _aspect_ratings(c: dict[str, Any]) -> dict[str, float]:
    """Per-aspect numeric ratings of one candidate (UltraFeedback ``annotations``); aspect names
    are lower-cased with ``-``/spaces as ``_`` and must then be dimension names."""
    ann = c.get("annotations")
    if not isinstance(ann, dict):
        return {}
    out = {}
    for k, v in ann.items():
        name = str(k).strip().lower().replace("-", "_").replace(" ", "_")
        r = _rating(v)
        if r is not None and _ASPECT_NAME.fullmatch(name):
            out[name] = r
    return out


def _first(d: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for k in keys:
        if d.get(k) is not None:
            return k, d[k]
    return None, None


def _from_rated(obj: dict[str, Any], ctx: AdapterContext, line: int) -> tuple[list[dict[str, Any]], int]:
    pkey, prompt = _first(obj, _PROMPT_KEYS)
    if prompt is None:
        raise AdapterError("missing_field", "prompt", f"field 'prompt': required (or one of {list(_PROMPT_KEYS)}), found nothing")
    lkey, cands = _first(obj, _CANDIDATE_LISTS)
    if not isinstance(cands, list) or len(cands) < 2:
        raise AdapterError("unpairable", lkey or "completions", f"field {lkey or 'completions'!r}: expected a list of at least 2 candidates, found {0 if cands is None else len(cands) if isinstance(cands, list) else type(cands).__name__}")
    parsed = []
    for i, c in enumerate(cands):
        where = f"{lkey}[{i}]"
        if not isinstance(c, dict):
            raise AdapterError("invalid_type", where, f"field {where!r}: expected an object with text and score, found {type(c).__name__}")
        _, text = _first(c, _CANDIDATE_TEXT)
        skey, score = _first(c, _CANDIDATE_SCORE)
        if not isinstance(text, str):
            raise AdapterError("missing_field", where, f"field {where!r}: expected candidate text under one of {list(_CANDIDATE_TEXT)}")
        if isinstance(score, dict):  # e.g. fine-grained scores: take their mean
            vals = [v for v in score.values() if isinstance(v, int | float)]
            score = sum(vals) / len(vals) if vals else None
        aspects = _aspect_ratings(c)
        if score is None and aspects:  # only per-aspect ratings: their mean is the overall score
            score = sum(aspects.values()) / len(aspects)
        if not isinstance(score, int | float) or isinstance(score, bool):
            raise AdapterError("invalid_value", where, f"field {where!r}: expected a numeric score under one of {list(_CANDIDATE_SCORE)}, found {score!r}")
        parsed.append((text, float(score), c.get("model"), aspects))
    rest = {k: v for k, v in obj.items() if k not in (pkey, lkey)}
    base_id = obj.get("comparison_id") or obj.get("id") or f"{ctx.stem}:{line}"
    defaults = _defaults(obj, ctx, "rated")
    out, skipped = [], 0
    for i in range(len(parsed)):
        for j in range(i + 1, len(parsed)):
            (ta, sa, ma, xa), (tb, sb, mb, xb) = parsed[i], parsed[j]
            if normalize_text(ta) == normalize_text(tb):
                skipped += 1
                continue
            label = "a" if sa > sb else "b" if sb > sa else "tie"
            span = max(abs(sa), abs(sb), 1e-9)
            row = {**rest, "comparison_id": f"{base_id}:{i}-{j}", "prompt": prompt,
                   "response_a": {"text": ta, "model": ma}, "response_b": {"text": tb, "model": mb},
                   "label": label, "strength": min(1.0, abs(sa - sb) / span), **defaults}
            dims = {k: "a" if xa[k] > xb[k] else "b" if xb[k] > xa[k] else "tie" for k in sorted(xa) if k in xb}
            if dims:
                row["dimensions"] = dims
            out.append(row)
    return out, skipped


def adapt(fmt: str, obj: dict[str, Any], ctx: AdapterContext, line: int) -> tuple[list[dict[str, Any]], int]:
    """Map one decoded row to canonical judgments: (judgments, skipped identical candidates)."""
    if fmt == "canonical":
        return [obj], 0
    if fmt == "trl":
        return _from_trl(obj, ctx, line), 0
    if fmt == "hh":
        return _from_hh(obj, ctx, line), 0
    if fmt == "rated":
        return _from_rated(obj, ctx, line)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
