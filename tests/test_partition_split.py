"""pipeline/split.py in mergeable parts: the clusters' row counts and sticky ranks counted on any
cut of the pairs (partitions), added, and assigned once give the splits of assign_splits over
every row -- near-duplicate clusters that span the cut, sticky clusters and fresh ones alike."""
from __future__ import annotations

import random

import polars as pl
import pytest

from pipeline import split as sp
from schemas.policy import SplitConfig

CFG = SplitConfig()


def _version(seed: int) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(kept DPO rows, every pair's cluster, the ancestors' assignments) of a made-up version."""
    rng = random.Random(seed)
    pairs, cluster_of = [], {}
    for i in range(3000):
        pid = f"p-{i:05d}"
        # a third of the pairs in near-duplicate clusters of 2-6 pairs (which a cut by pair splits)
        cl = f"nd-{rng.randrange(300):04d}" if rng.random() < 0.33 else None
        cluster_of[pid] = cl
        pairs.append({"pair_id": pid, "near_dup_cluster": cl, "locale": rng.choice(["en", "en", "ja-JP", None]),
                      "annotator_kind": rng.choice(["human", "human", "ai", "mixed"])})
    every = pl.DataFrame(pairs)
    kept = every.filter(pl.Series([rng.random() < 0.8 for _ in range(every.height)]))
    clusters = every.select("pair_id", "near_dup_cluster").filter(pl.col("near_dup_cluster").is_not_null())
    prior = every.sample(fraction=0.3, seed=seed).select(
        "pair_id", split=pl.Series([rng.choice(["train"] * 8 + ["validation", "test"]) for _ in range(900)]))
    return kept, clusters, prior


def _partitioned(kept: pl.DataFrame, clusters: pl.DataFrame, prior: pl.DataFrame | None, n: int) -> pl.DataFrame:
    def part(frame: pl.DataFrame, i: int) -> pl.DataFrame:
        return frame.filter(pl.col("pair_id").hash(11) % n == i)

    counts, ranks = [], []
    for i in range(n):
        rows = part(kept, i).with_columns(_cl=sp._cluster_expr(), _stratum=sp._stratum_expr())
        counts.append(sp.cluster_counts(rows))
        ranks.append(sp.sticky_ranks(sp._cluster_members(rows, part(clusters, i)), prior))
    total = sp.add_counts(counts)
    sticky = sp.sticky_splits(sp.add_ranks(ranks), total.select("_cl").unique())
    amap = sp.assign_clusters(total, sticky, CFG)
    return kept.with_columns(_cl=sp._cluster_expr()).join(amap, on="_cl", how="left").drop("_cl")


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_assignments_from_added_parts_equal_assign_splits(n, with_prior):
    kept, clusters, prior = _version(5)
    prior = prior if with_prior else None
    want = sp.assign_splits(kept, CFG, prior=prior, clusters=clusters).sort("pair_id")
    got = _partitioned(kept, clusters, prior, n).sort("pair_id")
    assert got.equals(want)
    assert want["split"].null_count() == 0 and set(want["split"]) == {"train", "validation", "test"}
    # every cluster in one split, also when its rows were in several parts
    assert got.filter(pl.col("near_dup_cluster").is_not_null()).group_by("near_dup_cluster") \
        .agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height == 0
    if with_prior:  # a kept pair assigned before keeps its split unless its cluster moved towards test
        back = got.join(prior, on="pair_id", suffix="_before")
        rank = {s: i for i, s in enumerate(sp.PROTECTION)}
        assert all(rank[a] <= rank[b] for a, b in back.select("split", "split_before").iter_rows())


def test_a_sticky_member_in_another_part_pins_its_cluster():
    """A cluster's only previously assigned member is not kept and sits in another part than the
    cluster's kept rows: the added ranks still pin the cluster (as the whole computation does)."""
    kept = pl.DataFrame({"pair_id": ["p-1", "p-2"], "near_dup_cluster": ["nd-1", "nd-1"], "locale": ["en", "en"],
                         "annotator_kind": ["human", "human"]})
    clusters = pl.DataFrame({"pair_id": ["p-1", "p-2", "p-3"], "near_dup_cluster": ["nd-1"] * 3})
    prior = pl.DataFrame({"pair_id": ["p-3"], "split": ["test"]})
    want = sp.assign_splits(kept, CFG, prior=prior, clusters=clusters)
    assert want["split"].to_list() == ["test", "test"]
    for n in (2, 3, 5):
        assert _partitioned(kept, clusters, prior, n).sort("pair_id").equals(want.sort("pair_id"))
