"""Reference log-probs: computed once per cache key, stored beside the version, never inside it.

DPO needs log pi_ref(y | x) for every chosen and rejected completion.  They depend only on
the data and the frozen reference model, so they are computed once, before training, and
the reference model is freed before the policy is built: no second model in memory while
training.

Cache file::

    STORE/runs/reference-cache/<version_id>/<key>.parquet    pair_id, split, ref_chosen_logps,
                                                              ref_rejected_logps, chosen_tokens, rejected_tokens
    STORE/runs/reference-cache/<version_id>/<key>.json       the key material (what the key hashes) and the
                                                              parquet file's sha256, checked on every read

``key`` = sha256 (first 24 hex) of: the version id and the sha256 of each split file (from the
manifest), the reference model identity (local path + sha256 of config and weight files, or
the tiny spec + seed + torch version), the tokenizer sha256 and chat-template sha256, the
tokenisation budget (max_length, max_prompt_length, min_completion_tokens), the dtype, and
the tokenisation code version.  Any change gives a new key and a new file; stale files are
never read.  ``versions/<id>/`` is immutable and is not touched.

Writes are atomic (temp file + rename) under the store's lock for the key, so two runs
starting together compute once; the loser reads the winner's file.
"""
from __future__ import annotations

import gc
import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.store import atomic_write_bytes
from trainer.data import batches_in_order, collate
from trainer.loss import DEFAULT_CHUNK_SIZE
from trainer.model import sequence_logps
from trainer.tokenize import TokenizeConfig, TokenizedPair

CACHE_FORMAT = 1
# the sidecar's record of the cache file's bytes (not part of the key: a file from before it is computed again
# under the same key, so a run started before it still resumes)
SHA256_FIELD = "parquet_sha256"


class ReferenceNotFinite(ValueError):
    """The reference model gave a NaN/inf log-prob (an overflow, typically in low precision): DPO
    cannot train against it, whatever the learning rate; nothing is cached (CLI exit 2)."""


@dataclass(frozen=True)
class ReferenceLogps:
    key: str
    path: Path
    hit: bool  # True: read from the cache; False: computed now
    logps: dict[str, tuple[float, float]]  # pair_id -> (chosen, rejected) summed log-probs


def tokenize_code_version() -> str:
    """The tokenisation code is part of the key: a change there changes the token ids."""
    src = (Path(__file__).resolve().parent / "tokenize.py").read_bytes()
    return hashlib.sha256(src).hexdigest()[:12]


def cache_key_material(*, version_id: str, split_sha256: dict[str, str], reference: dict[str, Any],
                       tokenizer: dict[str, str], tokenize_cfg: TokenizeConfig, dtype: str) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "version_id": version_id,
        "split_sha256": dict(sorted(split_sha256.items())),
        "reference_model": reference,
        "tokenizer": tokenizer,
        "tokenize": tokenize_cfg.model_dump(),
        "tokenize_code": tokenize_code_version(),
        "dtype": dtype,
    }


def cache_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir(store_root: Path, version_id: str) -> Path:
    return Path(store_root) / "runs" / "reference-cache" / version_id


def compute_reference_logps(model: torch.nn.Module, pairs: list[TokenizedPair], *, pad_id: int, batch_size: int = 8,
                            chunk_size: int = DEFAULT_CHUNK_SIZE, on_batch: Callable[[int], None] | None = None,
                            precision: str = "fp32") -> dict[str, tuple[float, float]]:
    """(chosen, rejected) summed completion log-probs of each pair under ``model`` (no grad)."""
    out: dict[str, tuple[float, float]] = {}
    model.eval()
    with torch.no_grad():
        for group in batches_in_order(pairs, batch_size):
            b = collate(group, pad_id)
            lp = sequence_logps(model, b.input_ids, b.completion_mask, chunk_size=chunk_size, precision=precision).summed
            for i, pid in enumerate(b.pair_ids):
                out[pid] = (float(lp[i]), float(lp[b.size + i]))
            if on_batch:
                on_batch(len(group))
    return out


def load_or_compute(store, version_id: str, material: dict[str, Any], pairs_by_split: dict[str, list[TokenizedPair]],
                    build_reference: Callable[[], torch.nn.Module], *, pad_id: int, batch_size: int = 8,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, on_batch: Callable[[int], None] | None = None,
                    precision: str = "fp32") -> ReferenceLogps:
    """Read the cached reference log-probs for ``material``, or compute and cache them.

    ``build_reference()`` is called only on a miss; the model is dropped before returning.
    """
    import polars as pl

    key = cache_key(material)
    d = cache_dir(store.root, version_id)
    path = d / f"{key}.parquet"
    wanted = {p.pair_id for ps in pairs_by_split.values() for p in ps}

    def read() -> dict[str, tuple[float, float]] | None:
        if not path.exists():
            return None
        # the bytes read once, checked against the sha256 the sidecar recorded when they were written: a file
        # changed since (damaged, edited) or from before the record is computed again, never trained against
        data = path.read_bytes()
        try:
            recorded = json.loads(path.with_suffix(".json").read_text(encoding="utf-8")).get(SHA256_FIELD)
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != hashlib.sha256(data).hexdigest():
            return None
        t = pl.read_parquet(io.BytesIO(data)).to_dict(as_series=False)
        got = {pid: (w, r) for pid, w, r in zip(t["pair_id"], t["ref_chosen_logps"], t["ref_rejected_logps"])}
        if not wanted <= got.keys():  # a file that lacks pairs is not this key's file
            return None
        # a non-finite value (a file written before they were refused) is computed again, not trained on
        return got if all(math.isfinite(x) for pid in wanted for x in got[pid]) else None

    cached = read()
    if cached is not None:
        return ReferenceLogps(key, path, True, cached)
    with store.lock(f"refcache-{version_id}-{key}"):
        cached = read()  # another run may have written it while we waited
        if cached is not None:
            return ReferenceLogps(key, path, True, cached)
        model = build_reference()
        logps = compute_reference_logps(model, [p for ps in pairs_by_split.values() for p in ps], pad_id=pad_id,
                                        batch_size=batch_size, chunk_size=chunk_size, on_batch=on_batch,
                                        precision=precision)
        del model
        gc.collect()
        bad = [pid for pid, v in logps.items() if not all(math.isfinite(x) for x in v)]
        if bad:  # said now, before a run starts: as a training loss it would read as "lr too high"
            raise ReferenceNotFinite(
                f"the reference model's log-probs are not finite (NaN/inf) for {len(bad)} of {len(logps)} pairs "
                f"(first: {', '.join(bad[:5])}); likely an overflow in its dtype / precision ({material.get('dtype')}); "
                "try float32 weights and precision fp32, or another --reference-model; nothing was cached")
        rows = [(split, p) for split, ps in pairs_by_split.items() for p in ps]
        table = pl.DataFrame({
            "pair_id": [p.pair_id for _, p in rows],
            "split": [s for s, _ in rows],
            "ref_chosen_logps": pl.Series([logps[p.pair_id][0] for _, p in rows], dtype=pl.Float64),
            "ref_rejected_logps": pl.Series([logps[p.pair_id][1] for _, p in rows], dtype=pl.Float64),
            "chosen_tokens": [len(p.chosen_ids) for _, p in rows],
            "rejected_tokens": [len(p.rejected_ids) for _, p in rows],
        })
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        table.write_parquet(buf)
        data = buf.getvalue()
        atomic_write_bytes(path, data)  # (a full disk: no half-written temp file left in the cache)
        # the sidecar after the file: a crash between the two leaves a file without its record (computed again)
        record = {**material, SHA256_FIELD: hashlib.sha256(data).hexdigest()}
        atomic_write_bytes(d / f"{key}.json", (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return ReferenceLogps(key, path, False, logps)
