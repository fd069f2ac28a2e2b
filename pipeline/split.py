"""Split: train / validation / test, grouped by near-duplicate cluster, stratified, deterministic.

* **Grouped**: the unit of assignment is the near-duplicate cluster (``near_dup_cluster``,
  from the near-duplicates check; exact-duplicate prompts share a cluster), so no
  near-duplicate prompt appears in two splits.
* **Stratified**: each cluster belongs to the stratum (locale, annotator_kind) of most of its
  pairs; within a stratum clusters are visited in a seeded pseudo-random order (a hash of
  seed + cluster id, so the result does not depend on input order) and each goes to the
  split furthest below its target share of that stratum's pairs.
* **Deterministic**: same pairs + same seed -> same assignment, on any machine.

:func:`leakage` counts clusters and prompts that appear in more than one split (must be 0).
"""
from __future__ import annotations

import hashlib

import polars as pl

from schemas.policy import SplitConfig

SPLITS = ("train", "validation", "test")


def _order_key(seed: int, cluster: str) -> str:
    return hashlib.blake2b(f"{seed}|{cluster}".encode(), digest_size=8).hexdigest()


def assign_splits(dpo: pl.DataFrame, cfg: SplitConfig) -> pl.DataFrame:
    """Add a ``split`` column to the DPO rows (needs pair_id, near_dup_cluster, locale, annotator_kind)."""
    if dpo.height == 0:
        return dpo.with_columns(split=pl.lit(None, dtype=pl.String))
    c = pl.col
    rows = dpo.with_columns(
        _cl=c("near_dup_cluster").fill_null(c("pair_id")),
        _stratum=pl.concat_str([c("locale").fill_null("-"), c("annotator_kind").fill_null("-")], separator="|"),
    )
    clusters = (
        rows.group_by("_cl", "_stratum").len()
        .sort(["_cl", "len", "_stratum"], descending=[False, True, False])
        .group_by("_cl", maintain_order=True)
        .agg(c("_stratum").first(), c("len").sum().alias("n"))
    )
    seed = cfg.seed
    keys = [_order_key(seed, x) for x in clusters["_cl"].to_list()]
    clusters = clusters.with_columns(_key=pl.Series(keys, dtype=pl.String))
    targets = [cfg.train, cfg.validation, cfg.test]
    out_cl: list[str] = []
    out_split: list[str] = []
    for (_stratum,), grp in clusters.sort("_stratum", "_key").group_by("_stratum", maintain_order=True):
        total = grp["n"].sum()
        # deficit of each split against its target share (a split with target 0 never receives)
        goal = [t * total if t > 0 else None for t in targets]
        have = [0, 0, 0]
        names = grp["_cl"].to_list()
        picks = []
        for n in grp["n"].to_list():
            # the split with the largest deficit (ties: train, validation, test)
            best, best_d = -1, 0.0
            for i in (0, 1, 2):
                g = goal[i]
                if g is not None and (best < 0 or g - have[i] > best_d):
                    best, best_d = i, g - have[i]
            picks.append(best)
            have[best] += n
        out_cl += names
        out_split += [SPLITS[i] for i in picks]
    amap = pl.DataFrame({"_cl": out_cl, "split": out_split})
    return rows.join(amap, on="_cl", how="left").drop("_cl", "_stratum")


def leakage(split_frames: dict[str, pl.DataFrame], prompt_hash: pl.DataFrame | None = None) -> dict[str, int]:
    """Clusters / pair ids / prompts found in more than one split (all must be 0)."""
    parts = []
    for name, f in split_frames.items():
        cols = [pl.col("pair_id"), pl.col("near_dup_cluster").fill_null(pl.col("pair_id")).alias("cluster")]
        parts.append(f.select(cols).with_columns(split=pl.lit(name)))
    if not parts:
        return {"clusters_in_several_splits": 0, "pairs_in_several_splits": 0, "prompts_in_several_splits": 0}
    allp = pl.concat(parts)
    out = {
        "clusters_in_several_splits": allp.group_by("cluster").agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height,
        "pairs_in_several_splits": allp.group_by("pair_id").agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height,
        "prompts_in_several_splits": 0,
    }
    if prompt_hash is not None:
        ph = allp.join(prompt_hash.select("pair_id", "prompt_hash").unique("pair_id"), on="pair_id", how="left")
        out["prompts_in_several_splits"] = ph.group_by("prompt_hash").agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height
    return out
