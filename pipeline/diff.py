"""Compare two versions: kept pairs added / removed, label flips, metric deltas."""
from __future__ import annotations

from typing import Any

import polars as pl

from pipeline.store import SPLITS, VersionHandle


def _kept(h: VersionHandle) -> pl.DataFrame:
    frames = [h.read_split(s, columns=["pair_id", "chosen"]).with_columns(split=pl.lit(s)) for s in SPLITS]
    df = pl.concat(frames)
    return df.with_columns(chosen_text=pl.col("chosen").list.first().struct.field("content")).drop("chosen")


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


def diff_versions(a: VersionHandle, b: VersionHandle) -> dict[str, Any]:
    ka, kb = _kept(a), _kept(b)
    both = ka.join(kb, on="pair_id", suffix="_b")
    ma, mb = _metrics(a), _metrics(b)
    keys = sorted(set(ma) | set(mb))
    flips = both.filter(pl.col("chosen_text") != pl.col("chosen_text_b"))
    moves = both.filter(pl.col("split") != pl.col("split_b"))
    return {
        "a": a.version_id,
        "b": b.version_id,
        "pairs_added": kb.join(ka, on="pair_id", how="anti").height,
        "pairs_removed": ka.join(kb, on="pair_id", how="anti").height,
        "pairs_common": both.height,
        "label_flips": flips.height,
        "label_flip_pair_ids": sorted(flips["pair_id"].to_list()),
        "split_moves": moves.height,
        "split_moves_by": {f"{x}->{y}": n for x, y, n in moves.group_by("split", "split_b").len().sort("split", "split_b").iter_rows()},
        "split_move_pair_ids": moves["pair_id"].sort().to_list(),
        "split_move_examples": {f"{x}->{y}": ids[:5] for x, y, ids in moves.sort("pair_id").group_by(
            "split", "split_b", maintain_order=True).agg("pair_id").sort("split", "split_b").iter_rows()},
        "metrics": {k: (ma.get(k), mb.get(k)) for k in keys if ma.get(k) != mb.get(k)},
    }
