"""Sticky splits: a pair, and its near-duplicate cluster, keeps its split in every descendant version."""
from __future__ import annotations

import json

import polars as pl
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flows.cli import app
from pipeline.certify import certify_version
from pipeline.curate import curate
from pipeline.split import PROTECTION, assign_splits, assignments, leakage, split_moves
from pipeline.store import Store
from schemas.policy import SplitConfig, policy_from_dict

SAMPLES = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))
RANK = {s: i for i, s in enumerate(PROTECTION)}


def _dpo(pairs: list[tuple[str, str, str]]) -> pl.DataFrame:
    """(pair_id, cluster, locale) -> the columns assign_splits needs."""
    return pl.DataFrame({"pair_id": [p for p, _, _ in pairs], "near_dup_cluster": [c for _, c, _ in pairs],
                         "locale": [loc for _, _, loc in pairs], "annotator_kind": ["human"] * len(pairs)})


@st.composite
def chains(draw):
    """A chain of versions: each adds new pairs (new clusters, or joining / bridging old ones) and
    keeps a random subset of the pairs so far (dropped pairs still belong to their clusters)."""
    n_steps = draw(st.integers(2, 5))
    pairs: dict[str, str] = {}  # pair_id -> cluster (clusters only ever merge: union-find by name)
    steps = []
    for step in range(n_steps):
        n_new = draw(st.integers(1, 25))
        for i in range(n_new):
            pid = f"s{step}-p{i}"
            existing = sorted(set(pairs.values()))
            mode = draw(st.sampled_from(["new", "join", "bridge"])) if existing else "new"
            if mode == "new":
                pairs[pid] = f"c-{pid}"
            elif mode == "join":
                pairs[pid] = draw(st.sampled_from(existing))
            else:
                a, b = draw(st.sampled_from(existing)), draw(st.sampled_from(existing))
                pairs[pid] = a
                pairs.update({p: a for p, c in pairs.items() if c == b})  # b merges into a
        kept = [p for p in sorted(pairs) if draw(st.booleans()) or p.startswith(f"s{step}-")]
        steps.append((dict(pairs), kept, draw(st.sampled_from(["en", "ja"]))))
    return steps


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains(), st.integers(0, 3))
def test_property_splits_only_ever_move_towards_test(chain, seed):
    cfg = SplitConfig(seed=seed)
    prior = None
    for n, (clusters, kept, loc) in enumerate(chain):
        all_pairs = pl.DataFrame({"pair_id": list(clusters), "near_dup_cluster": list(clusters.values())})
        dpo = assign_splits(_dpo([(p, clusters[p], loc) for p in kept]), cfg, prior=prior, clusters=all_pairs)
        assert dpo["split"].null_count() == 0
        # never leaks: a cluster is in one split
        assert leakage({s: dpo.filter(pl.col("split") == s) for s in ("train", "validation", "test")})[
            "clusters_in_several_splits"] == 0
        if prior is not None:
            before = dict(prior.select("pair_id", "split").iter_rows())
            for pid, split in dpo.select("pair_id", "split").iter_rows():
                if pid in before:
                    assert RANK[split] <= RANK[before[pid]], f"{pid} moved {before[pid]} -> {split}"
            # a pair that was never assigned but joins a cluster with an assigned member takes its split
            for pid, cl, split in dpo.select("pair_id", "near_dup_cluster", "split").iter_rows():
                old = {before[p] for p, c in clusters.items() if c == cl and p in before}
                if old:
                    assert split == min(old, key=RANK.get)
            moves = split_moves(prior, dpo)
            assert moves.filter(pl.col("to") == "train").height == 0
        prior = assignments(dpo, prior, f"v{n}")
        assert prior["pair_id"].is_unique().all()


def test_first_version_assignment_is_unchanged_by_the_sticky_logic():
    pairs = [(f"p{i}", f"c{i // 2}", "en" if i % 3 else "ja") for i in range(200)]
    a = assign_splits(_dpo(pairs), SplitConfig(seed=5))
    b = assign_splits(_dpo(pairs), SplitConfig(seed=5), prior=pl.DataFrame(schema={"pair_id": pl.String, "split": pl.String}))
    assert a.equals(b)
    shares = a["split"].value_counts(normalize=True)
    assert dict(shares.iter_rows())["train"] > 0.7


def test_fresh_clusters_fill_the_deficits_left_by_sticky_ones():
    prior = pl.DataFrame({"pair_id": [f"p{i}" for i in range(50)], "split": ["test"] * 50})
    pairs = [(f"p{i}", f"c{i}", "en") for i in range(200)]
    dpo = assign_splits(_dpo(pairs), SplitConfig(), prior=prior)
    counts = dict(dpo["split"].value_counts().iter_rows())
    # targets of 200 rows: train 160, validation 20, test 20; test already holds 50 sticky rows, so no
    # fresh cluster goes there and the 150 fresh ones equalise the other deficits: 160 - t = 20 - v, t + v = 150
    assert counts == {"test": 50, "train": 145, "validation": 5}


def test_sample_chain_moves_no_pair_and_diff_reports_moves(tmp_path):
    policy = policy_from_dict({"certify": {"require_expectations": False}})
    store = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], store, policy).version_id
    v2 = curate(SAMPLES[1:2], store, policy, parent=v1).version_id
    v3 = curate(SAMPLES[2:3], store, policy, parent=v2).version_id
    split_of = {}
    for vid in (v1, v2, v3):
        h = store.get(vid)
        now = {pid: s for s in ("train", "validation", "test") for pid in h.read_split(s)["pair_id"].to_list()}
        for pid, s in now.items():
            assert RANK[s] <= RANK[split_of.get(pid, s)], (vid, pid, split_of[pid], s)
        split_of.update(now)
        assert h.manifest().check("split_stability").metrics["into_train_from_held_out"] == 0
        assert store.get(vid).read("split_assignments.parquet")["pair_id"].is_unique().all()
    res = CliRunner().invoke(app, ["diff", v1, v2, "--store", str(store.root), "--json"])
    d = json.loads(res.stdout)
    assert d["split_moves"] == 0 and d["split_moves_by"] == {}
    cert = certify_version(store, v3, policy, run_gx=False)
    gate = next(g for g in cert.gates if g.name == "split_stability")
    assert gate.passed and gate.value == 0


def test_certify_rejects_a_child_that_moved_held_out_pairs_into_train(tmp_path):
    """A child built by hand (or by an old prefpipe) that put a parent's test pair into train fails the gate."""
    policy = policy_from_dict({"certify": {"require_expectations": False}})
    store = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], store, policy).version_id
    test_ids = set(store.get(v1).read_split("test")["pair_id"].to_list())
    # the same batch as a child: then rewrite the child's assignment by moving a test pair into train
    import pipeline.curate as cur

    real = cur.assign_splits

    def leaky(dpo, cfg, **kw):
        out = real(dpo, cfg, **kw)
        victim = sorted(test_ids & set(out["pair_id"].to_list()))[0]
        return out.with_columns(split=pl.when(pl.col("pair_id") == victim).then(pl.lit("train")).otherwise(pl.col("split")))

    cur.assign_splits = leaky
    applies = cur.delta.applies
    cur.delta.applies = lambda _parent: False  # every pair through assign_splits (the child's clean pairs would not be)
    try:
        v2 = curate(SAMPLES[1:2], store, policy, parent=v1).version_id
    finally:
        cur.assign_splits = real
        cur.delta.applies = applies
    cert = certify_version(store, v2, policy, run_gx=False)
    gate = next(g for g in cert.gates if g.name == "split_stability")
    assert not gate.passed and gate.value >= 1 and "test->train" in gate.detail
    res = CliRunner().invoke(app, ["diff", v1, v2, "--store", str(store.root)])
    assert "test -> train" in res.output


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.sampled_from(["en|human", "ja|human", "en|ai"]),
                          st.sampled_from(["train", "validation", "test"])), min_size=1, max_size=40))
def test_placed_clusters_count_like_the_majority_rule(rows):
    """A child's placed clusters are counted in one pass by cluster; a cluster whose rows span several
    strata still goes to the stratum of most of its rows (ties: the first by name), with its first row's split."""
    from pipeline.split import _cluster_stats, _decided_stats

    f = pl.DataFrame({"_cl": [f"c{c}" for c, _, _ in rows], "_stratum": [s for _, s, _ in rows],
                      "split": [x for _, _, x in rows]})
    want = _cluster_stats(f).join(f.group_by("_cl").agg(pl.col("split").first()), on="_cl", how="left").sort("_cl")
    assert _decided_stats(f).sort("_cl").cast(want.schema).equals(want)


def test_diff_gives_each_split_move_its_own_examples(tmp_path):
    """Two builds of one batch with another split seed: diff's text names, for each from -> to, pairs that moved that
    way (it printed the same first five moved pairs, of any direction, once under all of them)."""
    store = Store(tmp_path / "s")
    v1 = curate(SAMPLES[:1], store, policy_from_dict({})).version_id
    v2 = curate(SAMPLES[:1], store, policy_from_dict({"split": {"seed": 18}})).version_id
    d = json.loads(CliRunner().invoke(app, ["diff", v1, v2, "--store", str(store.root), "--json"]).stdout)
    assert len(d["split_moves_by"]) >= 3, d["split_moves_by"]
    a, b = store.get(v1), store.get(v2)
    split_in = [{pid: s for s in ("train", "validation", "test") for pid in h.read_split(s)["pair_id"].to_list()} for h in (a, b)]
    res = CliRunner().invoke(app, ["diff", v1, v2, "--store", str(store.root)], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    for key, n in d["split_moves_by"].items():
        src, dst = key.split("->")
        examples = d["split_move_examples"][key]
        assert 1 <= len(examples) <= min(5, n)
        assert all(split_in[0][p] == src and split_in[1][p] == dst for p in examples), key
        line = next(x for x in res.output.splitlines() if x.strip().startswith(f"{src} -> {dst}: {n}"))
        assert line.endswith("e.g. " + ", ".join(examples)), line
