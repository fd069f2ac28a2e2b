"""Split: train / validation / test, grouped by near-duplicate cluster, stratified, deterministic.

* **Grouped**: the unit of assignment is the near-duplicate cluster (``near_dup_cluster``,
  from the near-duplicates check; exact-duplicate prompts share a cluster), so no
  near-duplicate prompt appears in two splits.
* **Stratified**: each cluster belongs to the stratum (locale, annotator_kind) of most of its
  pairs; within a stratum clusters are visited in a seeded pseudo-random order (a hash of
  seed + cluster id, so the result does not depend on input order) and each goes to the
  split furthest below its target share of that stratum's pairs.
* **Deterministic**: same pairs + same seed (+ same prior assignments) -> same assignment, on any machine.
* **Sticky across versions**: a child version keeps every pair, and every member of its
  near-duplicate cluster, in the split its ancestors gave it (``split_assignments.parquet``
  carries the assignments down the lineage, also of pairs a version does not keep); only
  clusters never seen before are assigned fresh.

:func:`leakage` counts clusters and prompts that appear in more than one split (must be 0).
"""
from __future__ import annotations

import hashlib

import polars as pl

from schemas.policy import SplitConfig

SPLITS = ("train", "validation", "test")


def _order_key(seed: int, cluster: str) -> str:
    return hashlib.blake2b(f"{seed}|{cluster}".encode(), digest_size=8).hexdigest()


def _order_keys(seed: int, clusters: pl.Series) -> pl.Series:
    """:func:`_order_key` of every cluster id as the unsigned 64-bit number its hex digits spell (the same order:
    16 lower-case hex digits sort as the big-endian number), hashed in compiled code from one UTF-8 buffer of
    them all (:func:`pipeline.kernels.blake2b64`; no Python object a cluster: at 10M judgments ~3M fresh
    clusters; the sort by the numbers 2.6 s less than by the hex strings)."""
    from pipeline.kernels import blake2b64

    keys = pl.select(pl.lit(f"{seed}|") + pl.lit(clusters)).to_series().to_arrow()
    return pl.Series(blake2b64(keys).byteswap(), dtype=pl.UInt64)  # (little-endian digest -> the number it spells)


# most protected first: a cluster whose members were assigned to several splits goes to the first
PROTECTION = ("test", "validation", "train")
ASSIGNMENT_SCHEMA = {"pair_id": pl.String, "cluster": pl.String, "split": pl.String, "assigned_in": pl.String}


def assign_splits(dpo: pl.DataFrame, cfg: SplitConfig, *, prior: pl.DataFrame | None = None,
                  clusters: pl.DataFrame | None = None, base: pl.DataFrame | None = None,
                  base_counts: pl.DataFrame | None = None) -> pl.DataFrame:
    """Add a ``split`` column to the DPO rows (needs pair_id, near_dup_cluster, locale, annotator_kind).

    **Sticky**: ``prior`` (pair_id -> split, the ancestors' assignments, :func:`assignments`)
    fixes the split of every pair assigned before, and of every cluster with such a member:
    a new pair joining an existing cluster takes that cluster's split.  ``clusters``
    (pair_id -> near_dup_cluster for *all* pairs of the version, kept or not) lets a cluster
    reach prior members that are not kept this time.  A cluster whose members were assigned
    to different splits (a new pair bridged two clusters) goes to the most protected of them
    (test, then validation, then train): a pair may move towards test, never out of it.
    Only clusters with no prior member are assigned fresh, filling each stratum's deficits
    against its targets, counting the sticky rows of the stratum.  ``base``: kept rows of other
    clusters whose split is decided already (pair_id, near_dup_cluster, locale, annotator_kind,
    split; a child's clean clusters, :mod:`pipeline.delta`): they count as placed rows of their
    stratum, exactly as if they were among ``dpo`` with that split; ``base_counts``: the same
    rows as their :func:`placement` (counted, not read)."""
    if dpo.height == 0:
        return dpo.with_columns(split=pl.lit(None, dtype=pl.String))
    rows = dpo.with_columns(_cl=_cluster_expr(), _stratum=_stratum_expr())
    mine = rows.select("_cl").unique()
    if clusters is not None and clusters.height:  # the members of the rows' clusters only (sticky_splits keeps no
        # other; a child's dirty rows are in a few of every pair's clusters: with all of them ~0.25 GB at 10M judgments)
        clusters = clusters.filter(pl.col("near_dup_cluster").is_in(mine["_cl"].implode()))
    sticky = sticky_splits(sticky_ranks(_cluster_members(rows, clusters), prior), mine)
    amap = assign_clusters(cluster_counts(rows), sticky, cfg, base=base, base_counts=base_counts)
    return rows.join(amap, on="_cl", how="left").drop("_cl", "_stratum")


# ---------------------------------------------------------------- assign_splits in mergeable parts (issue 15)
# A partitioned run counts cluster_counts and sticky_ranks per partition, adds them (a cluster's rows may be in
# several partitions: near duplicates), assigns the clusters once on the driver and sends the map back.
COUNTS_SCHEMA = {"_cl": pl.String, "_stratum": pl.String, "n": pl.UInt32}
RANKS_SCHEMA = {"_cl": pl.String, "_rank": pl.Int8}


def cluster_counts(rows: pl.DataFrame) -> pl.DataFrame:
    """Rows per (cluster, stratum) of DPO rows (with ``_cl`` and ``_stratum``, or the columns they
    come from): what the assignment counts; adds over disjoint sets of rows (:func:`add_counts`)."""
    if "_cl" not in rows.columns:
        rows = rows.with_columns(_cl=_cluster_expr(), _stratum=_stratum_expr())
    return rows.group_by("_cl", "_stratum").len().rename({"len": "n"}).cast(COUNTS_SCHEMA).sort("_cl", "_stratum")  # type: ignore[arg-type]


def add_counts(parts: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(parts).group_by("_cl", "_stratum").agg(pl.col("n").sum()).cast(COUNTS_SCHEMA).sort("_cl", "_stratum")  # type: ignore[arg-type]


def _cluster_members(rows: pl.DataFrame, clusters: pl.DataFrame | None) -> pl.DataFrame:
    """(pair_id, _cl) of the kept rows and of every pair of ``clusters`` (kept or not)."""
    members = rows.select("pair_id", "_cl")
    if clusters is not None and clusters.height:
        members = pl.concat([members, clusters.select("pair_id", _cl=pl.col("near_dup_cluster"))]).unique(["pair_id", "_cl"])
    return members


def sticky_ranks(members: pl.DataFrame, prior: pl.DataFrame | None) -> pl.DataFrame:
    """Per cluster of ``members`` (pair_id, _cl) with a member assigned before: the most protected
    split among them, as a rank (mergeable by its minimum, :func:`add_ranks`)."""
    if prior is None or prior.height == 0:
        return pl.DataFrame(schema=RANKS_SCHEMA)
    rank = {name: i for i, name in enumerate(PROTECTION)}
    return (members.join(prior.select("pair_id", "split"), on="pair_id", how="inner")
            .with_columns(_rank=pl.col("split").replace_strict(rank, return_dtype=pl.Int8))
            .group_by("_cl").agg(pl.col("_rank").min()).cast(RANKS_SCHEMA).sort("_cl"))  # type: ignore[arg-type]


def add_ranks(parts: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(parts).group_by("_cl").agg(pl.col("_rank").min()).cast(RANKS_SCHEMA).sort("_cl")  # type: ignore[arg-type]


def sticky_splits(ranks: pl.DataFrame, kept: pl.DataFrame) -> pl.DataFrame:
    """_cl -> split for the kept clusters (``kept``: _cl) that have a member assigned before."""
    back = {i: name for i, name in enumerate(PROTECTION)}
    return ranks.join(kept, on="_cl", how="semi").select(
        "_cl", split=pl.col("_rank").replace_strict(back, return_dtype=pl.String)).sort("_cl")


def assign_clusters(counts: pl.DataFrame, sticky: pl.DataFrame, cfg: SplitConfig, *, base: pl.DataFrame | None = None,
                    base_counts: pl.DataFrame | None = None) -> pl.DataFrame:
    """_cl -> split of every cluster of ``counts`` (:func:`cluster_counts` of the DPO rows): the
    sticky ones keep theirs, the fresh ones fill each stratum's deficits (:func:`assign_splits`)."""
    c = pl.col
    cluster_stats = _stats_of_counts(counts).join(sticky, on="_cl", how="left")
    if base is not None and base.height:
        fixed = base.with_columns(_cl=_cluster_expr(), _stratum=_stratum_expr())
        cluster_stats = pl.concat([cluster_stats, _decided_stats(fixed)], how="vertical_relaxed")
    fresh = cluster_stats.filter(c("split").is_null())
    # rows already placed, per stratum and split (the fresh clusters fill the remaining deficits)
    placed = {(st, sp): n for st, sp, n in cluster_stats.filter(c("split").is_not_null())
              .group_by("_stratum", "split").agg(c("n").sum()).iter_rows()}
    seed = cfg.seed
    fresh = fresh.with_columns(_key=_order_keys(seed, fresh["_cl"]))
    targets = [cfg.train, cfg.validation, cfg.test]
    totals = dict(cluster_stats.group_by("_stratum").agg(c("n").sum()).iter_rows())
    for st, sp, n in base_counts.select("_stratum", "split", "n").iter_rows() if base_counts is not None else ():
        placed[(st, sp)] = placed.get((st, sp), 0) + n
        totals[st] = totals.get(st, 0) + n
    out: list[pl.DataFrame] = [sticky]
    for (stratum,), grp in fresh.sort("_stratum", "_key").group_by("_stratum", maintain_order=True):
        total = totals[stratum]
        # deficit of each split against its target share (a split with target 0 never receives)
        goal = [t * total if t > 0 else None for t in targets]
        have = [placed.get((stratum, name), 0) for name in SPLITS]
        picks = _picks(goal, have, grp["n"].to_list())
        out.append(grp.select("_cl", split=pl.Series(picks, dtype=pl.Int8).replace_strict(
            {i: name for i, name in enumerate(SPLITS)} | {-1: SPLITS[-1]}, return_dtype=pl.String)))
    return pl.concat(out)


def _picks(goal: list[float | None], have: list[int], sizes: list[int]) -> list[int]:
    """For clusters of ``sizes`` rows in turn: the split (0, 1, 2) with the largest deficit ``goal - have`` (ties:
    train, validation, test; a split without a goal never), its ``have`` grown by the cluster's rows."""
    picks = [0] * len(sizes)
    if None not in goal:  # (every split has a target: the same comparisons, unrolled -- ~3M clusters at 10M)
        g0, g1, g2 = goal
        h0, h1, h2 = have
        for k, n in enumerate(sizes):
            d0, d1, d2 = g0 - h0, g1 - h1, g2 - h2
            if d0 >= d1 and d0 >= d2:
                h0 += n
            elif d1 >= d2:
                h1 += n
                picks[k] = 1
            else:
                h2 += n
                picks[k] = 2
        return picks
    for k, n in enumerate(sizes):
        best, best_d = -1, 0.0
        for i in (0, 1, 2):
            g = goal[i]
            if g is not None and (best < 0 or g - have[i] > best_d):
                best, best_d = i, g - have[i]
        picks[k] = best
        have[best] += n
    return picks


PLACEMENT = "state/placement"  # a version's placement(): what a child's assign_splits counts of its clean clusters
_PLACEMENT_SCHEMA = {"_stratum": pl.String, "split": pl.String, "n": pl.Int64}


def placement(rows: pl.DataFrame) -> pl.DataFrame:
    """Placed rows (pair_id, near_dup_cluster, locale, annotator_kind, split; every cluster in one
    split) as :func:`assign_splits` counts them: rows by (stratum, split), each cluster's in its
    majority stratum.  Summable by cluster: a child's clean clusters count their parent's
    placement minus the placement of its parent's rows of the dirty clusters (:func:`counted`)."""
    if rows.height == 0:
        return pl.DataFrame(schema=_PLACEMENT_SCHEMA)
    fixed = rows.with_columns(_cl=_cluster_expr(), _stratum=_stratum_expr())
    return _decided_stats(fixed).group_by("_stratum", "split").agg(pl.col("n").sum().cast(pl.Int64)).sort("_stratum", "split")


def counted(*terms: tuple[int, pl.DataFrame]) -> pl.DataFrame:
    """The sum of placements, each with its sign (+1 / -1); a count below 0 is an inconsistent state."""
    frames = [f.select("_stratum", "split", n=pl.col("n").cast(pl.Int64) * sign) for sign, f in terms if f.height]
    if not frames:
        return pl.DataFrame(schema=_PLACEMENT_SCHEMA)
    out = pl.concat(frames).group_by("_stratum", "split").agg(pl.col("n").sum()).filter(pl.col("n") != 0)
    if (out["n"] < 0).any():
        raise ValueError(f"placement below zero: {out.filter(pl.col('n') < 0).rows()}")
    return out.sort("_stratum", "split")


def _cluster_expr() -> pl.Expr:
    return pl.col("near_dup_cluster").fill_null(pl.col("pair_id"))


def _stratum_expr() -> pl.Expr:
    c = pl.col
    return pl.concat_str([c("locale").fill_null("-"), c("annotator_kind").fill_null("-")], separator="|")


def _cluster_stats(rows: pl.DataFrame) -> pl.DataFrame:
    """_cl -> the stratum of most of its rows (ties: the first by name), its rows."""
    return _stats_of_counts(rows.group_by("_cl", "_stratum").len().rename({"len": "n"}))


def _stats_of_counts(counts: pl.DataFrame) -> pl.DataFrame:
    """:func:`_cluster_stats` from the rows per (cluster, stratum)."""
    c = pl.col
    return (counts.sort(["_cl", "n", "_stratum"], descending=[False, True, False])
            .group_by("_cl", maintain_order=True)
            .agg(c("_stratum").first(), c("n").sum()))


def _decided_stats(fixed: pl.DataFrame) -> pl.DataFrame:
    """:func:`_cluster_stats` of rows whose clusters are placed already, with each cluster's split
    (its first row's): one pass by cluster; the majority rule is run only for the clusters whose
    rows span several strata (a child's clean clusters: ~a million, nearly all in one stratum)."""
    c = pl.col
    g = fixed.group_by("_cl").agg(n=pl.len(), _lo=c("_stratum").min(), _hi=c("_stratum").max(), split=c("split").first())
    out = g.filter(c("_lo") == c("_hi")).select("_cl", _stratum="_lo", n="n", split="split")
    mixed = g.filter(c("_lo") != c("_hi")).select("_cl", "split")
    if mixed.height:
        stats = _cluster_stats(fixed.join(mixed, on="_cl", how="semi")).join(mixed, on="_cl", how="left")
        out = pl.concat([out, stats.select(out.columns)], how="vertical_relaxed")
    return out


def assignments(dpo: pl.DataFrame, prior: pl.DataFrame | None, version_id: str) -> pl.DataFrame:
    """The assignment table a version stores (``split_assignments.parquet``): every pair ever
    assigned in its lineage (the ancestors' rows, updated where a pair moved towards test) plus
    this version's new ones, sorted by pair_id.  Children read it as their ``prior``."""
    changed = assignment_changes(dpo, prior, version_id)
    if prior is not None and prior.height:
        changed = pl.concat([prior.select(list(ASSIGNMENT_SCHEMA)).cast(ASSIGNMENT_SCHEMA)
                             .join(changed, on="pair_id", how="anti"), changed])
    return changed.sort("pair_id")


def assignment_changes(dpo: pl.DataFrame, prior: pl.DataFrame | None, version_id: str) -> pl.DataFrame:
    """The rows of :func:`assignments` that are not ``prior``'s: the pairs of ``dpo`` (pair_id,
    near_dup_cluster, split) assigned for the first time or moved, with ``assigned_in`` this
    version.  A child that selected its dirty pairs only passes those (the others keep their
    split: :mod:`pipeline.delta`) and rewrites only the parts these rows fall in."""
    now = dpo.select("pair_id", cluster=pl.col("near_dup_cluster").fill_null(pl.col("pair_id")), split="split")
    if prior is not None and prior.height:
        now = now.join(prior.select("pair_id", "split"), on=["pair_id", "split"], how="anti")
    return now.with_columns(assigned_in=pl.lit(version_id)).select(list(ASSIGNMENT_SCHEMA)).cast(ASSIGNMENT_SCHEMA)


def prior_assignments(parent, columns: list[str] | None = None) -> pl.DataFrame | None:
    """The assignments a child inherits: the parent's ``split_assignments.parquet`` (verified read),
    or, for a parent written before that file existed, its kept pairs' splits.  ``columns``: only
    these (a child that writes only its changed rows reads pair_id and split)."""
    if parent is None:
        return None
    if parent.has("split_assignments.parquet"):  # a table of parts, or the older single file
        return parent.read("split_assignments.parquet", columns=columns)
    frames = [parent.read_split(s, columns=["pair_id", "near_dup_cluster"]).with_columns(split=pl.lit(s))
              for s in SPLITS if s in parent.manifest().splits]
    table = pl.concat(frames) if frames else pl.DataFrame(schema={"pair_id": pl.String, "near_dup_cluster": pl.String,
                                                                   "split": pl.String})
    table = table.select("pair_id", cluster=pl.col("near_dup_cluster").fill_null(pl.col("pair_id")), split="split",
                         assigned_in=pl.lit(parent.version_id)).cast(ASSIGNMENT_SCHEMA)
    return table if columns is None else table.select(columns)


def split_moves(prior: pl.DataFrame | None, now: pl.DataFrame) -> pl.DataFrame:
    """Pairs whose split differs from ``prior`` (pair_id, from, to); ``now`` has pair_id and split."""
    if prior is None or prior.height == 0 or now.height == 0:
        return pl.DataFrame(schema={"pair_id": pl.String, "from": pl.String, "to": pl.String})
    return (now.select("pair_id", to="split").join(prior.select("pair_id", **{"from": pl.col("split")}), on="pair_id")
            .filter(pl.col("from") != pl.col("to")).select("pair_id", "from", "to").sort("pair_id"))


def leakage(split_frames: dict[str, pl.DataFrame], prompt_hash: pl.DataFrame | None = None) -> dict[str, int]:
    """Clusters / pair ids / prompts found in more than one split (all must be 0).  ``prompt_hash``:
    pair_id -> prompt_hash, one row a pair (each pair's first judgment's prompt)."""
    parts = [f.select(pl.col("pair_id"), cluster=pl.col("near_dup_cluster").fill_null(pl.col("pair_id")))
             .with_columns(split=pl.lit(i, pl.UInt8)) for i, f in enumerate(split_frames.values())]
    if not parts:
        return {"clusters_in_several_splits": 0, "pairs_in_several_splits": 0, "prompts_in_several_splits": 0}
    allp = pl.concat(parts)
    out = {"clusters_in_several_splits": _in_several(allp, "cluster"), "pairs_in_several_splits": _in_several(allp, "pair_id"),
           "prompts_in_several_splits": 0}
    if prompt_hash is not None:
        ph = allp.select("pair_id", "split").join(prompt_hash.select("pair_id", "prompt_hash"), on="pair_id", how="left")
        out["prompts_in_several_splits"] = _in_several(ph, "prompt_hash")
    return out


def _in_several(frame: pl.DataFrame, key: str) -> int:
    """How many values of ``key`` occur in more than one ``split``.  First by the keys' 64-bit hashes
    (a third of a string grouping's cost at a million rows): equal keys have equal hashes, so a hash
    found in one split only is a key found in one split only, and no candidate means 0, exactly.  A
    candidate (a real one, or two keys sharing a hash) is counted again by the keys themselves."""
    by_hash = frame.select(h=pl.col(key).hash(), s=pl.col("split")).group_by("h").agg(
        several=pl.col("s").min() != pl.col("s").max())
    if not by_hash["several"].any():
        return 0
    return frame.group_by(key).agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height
