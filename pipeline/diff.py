"""Compare two versions: kept pairs added / removed, label flips, split moves, policy and metric deltas.

A kept pair is compared by its id, its split and a hash of its chosen response's text (the
messages' contents, so versions whose message records carry other fields still compare): the
splits are read part by part (each part verified, then reduced to those three columns), so a
diff holds the pair ids of both versions, never their texts.  The pair ids it lists (label
flips, split moves) are the first :data:`MAX_LISTED_IDS` in order, with a ``*_truncated`` flag:
the counts are always whole, and a diff of two large versions stays a readable document.

Versions built under different policies are compared all the same; the diff says so
(``policy``: both hashes and every setting that differs, the annotator registry by its sha256)
and names both code versions when they differ.
"""
from __future__ import annotations

import io
from typing import Any

import polars as pl

from pipeline.store import SPLITS, DamagedVersion, VersionHandle

MAX_LISTED_IDS = 1000  # pair ids listed per kind (label flips, split moves); the counts are always whole
_KEPT_SCHEMA = {"pair_id": pl.String, "chosen_hash": pl.UInt64, "split": pl.String}


def _chosen_hash(h: VersionHandle, name: str, part: pl.DataFrame) -> pl.Expr:
    """A hash of the chosen messages' texts (not of the whole records: a message field added by a later schema is no
    label flip).  Stable within a process: both versions of a diff are hashed by one."""
    dtype = part.schema["chosen"]
    if dtype == pl.String:  # (a chosen response stored as its text)
        return pl.concat_list(pl.col("chosen")).hash(seed=0x5EED)
    inner = dtype.inner if isinstance(dtype, pl.List) else None
    if not (isinstance(inner, pl.Struct) and inner.to_schema().get("content") == pl.String):
        raise DamagedVersion(f"{h.path / name}: column chosen is {dtype}, not chat messages (a list of role/content "
                             "records) nor a text", path=h.path / name)
    return pl.col("chosen").list.eval(pl.element().struct.field("content")).hash(seed=0x5EED)


def _kept(h: VersionHandle) -> pl.DataFrame:
    """``pair_id``, ``split`` and the chosen response's hash of every kept pair, read part by part."""
    frames = []
    for s in SPLITS:
        rel = f"data/{s}" if h.table(f"data/{s}") is not None else f"data/{s}.parquet"
        for name, data in h.read_parts(rel):
            with h.parsing(name):  # (a part without these columns: a damaged version)
                part = pl.read_parquet(io.BytesIO(data), columns=["pair_id", "chosen"])
            frames.append(part.select(pl.col("pair_id").cast(pl.String), _chosen_hash(h, name, part).alias("chosen_hash"),
                                      split=pl.lit(s)))
    return pl.concat(frames) if frames else pl.DataFrame(schema=_KEPT_SCHEMA)


def _metrics(h: VersionHandle) -> dict[str, Any]:
    m = h.manifest()
    out: dict[str, Any] = {
        "ledger.rows_in": m.ledger.rows_in, "ledger.quarantined": m.ledger.quarantined,
        "ledger.judgments_valid": m.ledger.judgments_valid, "ledger.pairs": m.ledger.pairs,
        "ledger.pairs_kept": m.ledger.pairs_kept,
        **{f"ledger.routed.{k}": v for k, v in m.ledger.routed.items()},
        **{f"ledger.dropped.{k}": v for k, v in m.ledger.dropped.items()},
        **{f"splits.{k}": v.rows for k, v in m.splits.items()},
    }
    for c in m.checks:
        out[f"check.{c.name}.status"] = c.status
        for kind in ("human", "ai"):
            sub = c.metrics.get(kind)
            if isinstance(sub, dict):
                for key in ("krippendorff_alpha", "fleiss_kappa"):
                    if isinstance(sub.get(key), int | float):
                        out[f"check.{c.name}.{kind}.{key}"] = round(sub[key], 4)
    return out


def _settings(h: VersionHandle) -> dict[str, Any]:
    """The policy a version was built with, as dotted keys (``select.min_strength``); the annotator registry by its
    sha256 (its entries are data, not settings)."""
    m = h.manifest()
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", {k: v for k, v in m.policy.model_dump(mode="json").items() if k != "annotators"})
    out["annotators.sha256"] = m.registry_sha256
    return out


def policy_changes(a: VersionHandle, b: VersionHandle) -> dict[str, Any]:
    """Both versions' policy hashes and every setting that differs (``[a's value, b's value]``; null: not set)."""
    ma, mb = a.manifest(), b.manifest()
    if ma.policy_hash == mb.policy_hash:
        return {"a": ma.policy_hash, "b": mb.policy_hash, "changed": {}}
    sa, sb = _settings(a), _settings(b)
    return {"a": ma.policy_hash, "b": mb.policy_hash,
            "changed": {k: [sa.get(k), sb.get(k)] for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)}}


def _listed(ids: pl.Series) -> tuple[list[str], bool]:
    return ids.head(MAX_LISTED_IDS).to_list(), ids.len() > MAX_LISTED_IDS


def diff_versions(a: VersionHandle, b: VersionHandle) -> dict[str, Any]:
    ka, kb = _kept(a), _kept(b)
    both = ka.join(kb, on="pair_id", suffix="_b")
    ma, mb = _metrics(a), _metrics(b)
    keys = sorted(set(ma) | set(mb))
    flips = both.filter(pl.col("chosen_hash") != pl.col("chosen_hash_b"))
    moves = both.filter(pl.col("split") != pl.col("split_b")).sort("pair_id")
    flip_ids, flips_cut = _listed(flips["pair_id"].sort())
    move_ids, moves_cut = _listed(moves["pair_id"])
    code = [a.manifest().code_version, b.manifest().code_version]
    return {
        "a": a.version_id,
        "b": b.version_id,
        "pairs_added": kb.join(ka, on="pair_id", how="anti").height,
        "pairs_removed": ka.join(kb, on="pair_id", how="anti").height,
        "pairs_common": both.height,
        "label_flips": flips.height,
        "label_flip_pair_ids": flip_ids,
        "label_flip_pair_ids_truncated": flips_cut,
        "split_moves": moves.height,
        "split_moves_by": {f"{x}->{y}": n for x, y, n in moves.group_by("split", "split_b").len().sort("split", "split_b").iter_rows()},
        "split_move_pair_ids": move_ids,
        "split_move_pair_ids_truncated": moves_cut,
        "split_move_examples": {f"{x}->{y}": ids[:5] for x, y, ids in moves.group_by(
            "split", "split_b", maintain_order=True).agg(pl.col("pair_id").head(5)).sort("split", "split_b").iter_rows()},
        "policy": policy_changes(a, b),
        "code_version": code if code[0] != code[1] else None,
        "metrics": {k: (x, y) for k in keys if (x := _metric(ma, k)) != (y := _metric(mb, k))},
    }


def _metric(metrics: dict[str, Any], key: str) -> Any:
    """A version's metric; a ledger count it does not list is 0 (a ledger lists the reasons that occurred), any
    other metric it lacks null (a check the version did not run)."""
    return metrics.get(key, 0 if key.startswith("ledger.") else None)
