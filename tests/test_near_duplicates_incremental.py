"""The near-duplicate state as shared parts: a child's incremental run, applied step by step,
equals the full run over all judgments so far -- the same flagged pairs with the same details,
the same cluster partition and names, the same metrics -- on random chains with planted near
duplicates within and across batches, LSH buckets growing past 16 members, repeated prompts,
re-judged pairs and pairs that gain a second prompt.  The state round-trips through a store
(verified reads, parent parts linked), and a parent of the old ``prompt_index.npz`` layout
converts once.
"""
from __future__ import annotations

import os
import random
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.checks import near_duplicates as nd
from pipeline.checks import near_duplicates_state as nds
from pipeline.ingest import judgments_from_records
from pipeline.parts import TableWriter
from pipeline.store import IntegrityError, Store, file_info
from schemas.check import empty_flags
from schemas.manifest import IngestLedger, Ledger, Manifest
from schemas.policy import NearDuplicateConfig, Policy

WORDS = ("apple river stone cloud quiet green market window silver garden paper tiger violin orbit candle "
         "harbor meadow pencil rocket castle forest mirror planet bridge lantern canyon velvet island puzzle "
         "thunder marble falcon pepper compass glacier saddle beacon cactus anchor blossom engine ladder").split()
RUN_ONLY = ("prompts_hashed", "index_prompts_before")  # this run's work, not the version's content


# ---------------------------------------------------------------- random chains of batches
def _variant(words: list[str], rng: random.Random) -> list[dict]:
    """The same words (so the same shingles) under another prompt_hash: case, punctuation, a system turn."""
    text = " ".join(w.upper() if rng.random() < 0.3 else w for w in words) + rng.choice(["", "?", "!", " ..."])
    msgs = [{"role": "user", "content": text}]
    if rng.random() < 0.4:
        msgs.insert(0, {"role": "system", "content": f"You are assistant number {rng.randrange(1000)}."})
    return msgs


def _edit(words: list[str], rng: random.Random, k: int) -> list[str]:
    w = list(words)
    for _ in range(k):
        op = rng.random()
        if op < 0.4:
            w[rng.randrange(len(w))] = rng.choice(WORDS)
        elif op < 0.7:
            w.insert(rng.randrange(len(w) + 1), rng.choice(WORDS))
        elif len(w) > 4:
            del w[rng.randrange(len(w))]
    return w


def _chain(seed: int, n_batches: int) -> list[list[dict]]:
    """Batches of judgment records.  Families of prompts: exact-shingle variants (one hot family
    gets many, so its buckets grow past 16 across batches), one-word edits (near duplicates),
    heavier edits (candidates that fail verification); new pairs on old prompts, old pairs
    judged again, and now and then an old pair id with another prompt."""
    rng = random.Random(seed)
    families: list[list[str]] = []
    pairs: list[tuple[str, list[dict]]] = []
    batches = []
    for step in range(n_batches):
        recs = []

        def add(pair_id: str, msgs: list[dict]) -> None:
            recs.append({"comparison_id": f"c{step}-{len(recs)}", "pair_id": pair_id, "prompt": msgs,
                         "response_a": f"answer one {pair_id}", "response_b": f"answer two {pair_id}", "label": "a",
                         "annotator_id": f"rev-{rng.randrange(3)}", "annotator_kind": "human", "locale": "en"})

        for i in range(rng.randint(4, 22)):
            roll = rng.random()
            if roll < 0.25 or not families:
                families.append(rng.sample(WORDS, rng.randint(5, 11)))
                words = families[-1]
                msgs = [{"role": "user", "content": " ".join(words)}]
            else:
                fam = families[0] if rng.random() < 0.5 else rng.choice(families)
                if roll < 0.6:
                    msgs = _variant(fam, rng)
                elif roll < 0.85:
                    msgs = _variant(_edit(fam, rng, 1), rng)
                else:
                    msgs = _variant(_edit(fam, rng, rng.randint(2, 4)), rng)
            pid = f"p{step}-{i}"
            add(pid, msgs)
            pairs.append((pid, msgs))
        old = pairs[: len(pairs) - len(recs)]
        for pid, msgs in rng.sample(old, min(len(old), rng.randint(0, 4))):
            add(pid, msgs)  # an old pair judged again
        for _, msgs in rng.sample(old, min(len(old), rng.randint(0, 3))):
            pid = f"p{step}-r{len(recs)}"
            add(pid, msgs)  # a new pair on an old prompt
            pairs.append((pid, msgs))
        if old and rng.random() < 0.3:
            pid, msgs = rng.choice(old)
            add(pid, _variant(_edit(families[0], rng, 1), rng))  # an old pair id with another prompt
        batches.append(recs)
    return batches


def _frames(batches: list[list[dict]]) -> list[pl.DataFrame]:
    return [judgments_from_records(b) for b in batches]


def _assert_equal_to_full(union: pl.DataFrame, flags: pl.DataFrame, clusters: pl.DataFrame, res, n_before: int,
                          cfg: NearDuplicateConfig | None = None) -> None:
    full = nd.run(union, cfg)
    got_flags = flags.sort("subject_id")
    assert got_flags.equals(full.flags.sort("subject_id")), (got_flags, full.flags.sort("subject_id"))
    assert clusters.equals(full.tables["clusters"])
    want = {k: v for k, v in full.metrics.items() if k not in RUN_ONLY}
    assert {k: v for k, v in res.metrics.items() if k not in RUN_ONLY} == want
    assert res.metrics["index_prompts_before"] == n_before
    assert res.status == full.status and res.check_result().summary == full.summary


EMPTY_CLUSTERS = pl.DataFrame(schema={"pair_id": pl.String, "near_dup_cluster": pl.String})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 1_000_000), st.integers(2, 5))
def test_incremental_chain_equals_the_full_run_on_the_union(seed, n_batches):
    frames = _frames(_chain(seed, n_batches))
    state, flags, clusters = nds.NearDupState.empty(), empty_flags(), EMPTY_CLUSTERS
    for step, batch in enumerate(frames):
        n_before = len(state)
        res = nds.run_incremental(batch, state, generation=f"v{step}")
        flags, clusters = nds.merge_flags(flags, res), nds.merge_clusters(clusters, res)
        union = pl.concat(frames[: step + 1])
        _assert_equal_to_full(union, flags, clusters, res, n_before)
        # every pair's cluster, one row a pair (also a pair with several prompts), as the merged table has them
        assert res.all_clusters().sort("pair_id").equals(clusters.sort("pair_id"))
        known = set(state.hashes.to_list())
        assert res.metrics["prompts_hashed"] == len(set(batch["prompt_hash"].to_list()) - known)  # only new prompts hashed
        assert set(res.recomputed.to_list()) >= set(batch["pair_id"].to_list())
        state = res.child_state()


def test_a_bucket_growing_past_16_members_loses_candidates_exactly_like_the_full_run():
    rng = random.Random(1)
    base = rng.sample(WORDS, 9)
    recs = [[], []]
    for i in range(24):  # 12 + 12 copies of one word set under distinct prompt hashes
        recs[i // 12].append({"comparison_id": f"c{i}", "pair_id": f"p{i:02d}", "prompt": [
            {"role": "system", "content": f"system {i}"}, {"role": "user", "content": " ".join(base)}],
            "response_a": "x", "response_b": "y", "label": "a", "annotator_id": "u", "annotator_kind": "human"})
    recs[1].append({**recs[1][0], "comparison_id": "c-near", "pair_id": "p-near",
                    "prompt": [{"role": "user", "content": " ".join(_edit(base, rng, 1))}]})
    frames = _frames(recs)
    first = nds.run_incremental(frames[0], nds.NearDupState.empty(), generation="v0")
    assert first.metrics["near_duplicate_prompts"] == 12 and first.child_state().edges.height == 66  # all pairs
    second = nds.run_incremental(frames[1], first.child_state(), generation="v1")
    assert second.stats["edges_removed"] > 0 and second.stats["candidates_lost"] > 0
    flags, clusters = nds.merge_flags(first.flags, second), nds.merge_clusters(first.clusters, second)
    _assert_equal_to_full(pl.concat(frames), flags, clusters, second, 12)
    # the old pairs' details changed (fewer near-duplicate prompts each): they were recomputed
    assert {f"p{i:02d}" for i in range(12)} <= set(second.recomputed.to_list())


def test_sketch_is_an_upper_bound_of_the_estimated_jaccard():
    rng = np.random.default_rng(0)
    for num_perm in (16, 100, 128):
        a = rng.integers(0, 1 << 32, (500, num_perm), dtype=np.uint64).astype(np.uint32)
        b = a.copy()
        flip = rng.random(a.shape) < rng.random((500, 1))
        b[flip] = rng.integers(0, 1 << 32, int(flip.sum()), dtype=np.uint64).astype(np.uint32)
        exact = nd.estimated_jaccard(a, b)
        bound = nds.sketch_jaccard(nds.sketch(a), nds.sketch(b), num_perm)
        assert (bound >= exact).all() and np.array_equal(bound[exact == 1.0], exact[exact == 1.0])
        assert np.mean(bound - exact) < 0.1  # the 4-bit collisions are rare


# ---------------------------------------------------------------- through a store
def _write_version(store: Store, vid: str, res, *, judgments: pl.DataFrame | None = None,
                   npz_from: pl.DataFrame | None = None):
    def build(stage):
        tables = res.write_state(store, stage) if res is not None else {}
        files = {}
        if judgments is not None:
            w = TableWriter(store, stage, "judgments")
            w.write(vid, judgments)
            tables["judgments"] = w.info()
        if npz_from is not None:  # the layout before state tables: one prompt_index.npz
            for rel in nd.save_index(nd.run(npz_from), stage / "prompt_index"):
                files[rel] = file_info(stage / rel, rel)
        return Manifest(version_id=vid, created_at=datetime.now(UTC), code_version="test", policy_hash="test",
                        policy=Policy(), ledger=Ledger(rows_in=0, quarantined=0, judgments_valid=0, pairs=0, pairs_kept=0),
                        ingest=IngestLedger(), sources=[], splits={}, files=files, tables=tables, checks=[])

    store.write_version(vid, build)
    return store.get(vid)


def test_state_round_trips_through_the_store_and_children_link_the_parents_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(nds, "CHUNK", 5)  # several parts per generation: signatures read part by part
    store = Store(tmp_path / "s")
    frames = _frames(_chain(7, 4))
    parent, flags, clusters = None, empty_flags(), EMPTY_CLUSTERS
    for step, batch in enumerate(frames):
        state = nds.load_state(parent)
        assert state.origin == ("empty" if parent is None else f"state of {parent.version_id}")
        res = nds.run_incremental(batch, state, generation=f"v{step}")
        flags, clusters = nds.merge_flags(flags, res), nds.merge_clusters(clusters, res)
        _assert_equal_to_full(pl.concat(frames[: step + 1]), flags, clusters, res, len(state))
        h = _write_version(store, f"v{step}", res)
        if parent is not None:  # the parent's append-only parts are the child's, same inode
            for t in (nds.PROMPTS, nds.SIGNATURES, nds.PAIR_PROMPTS):
                mine = {(h.path / p.path).stat().st_ino for p in h.table(t).parts}
                assert {(parent.path / p.path).stat().st_ino for p in parent.table(t).parts} <= mine, t
            new_parts = {p.path for t in nds.TABLES for p in h.table(t).parts} - \
                {p.path for t in nds.TABLES for p in parent.table(t).parts}
            assert all(f"part-v{step}" in p or "part-all" in p or "edges" in p for p in new_parts), new_parts
        again = nds.load_state(h)  # what was written reads back as the in-memory child state
        mem = res.child_state()
        assert again.hashes.equals(mem.hashes) and np.array_equal(again.bands, mem.bands)
        assert np.array_equal(again.sketches, mem.sketches) and again.pair_prompts.equals(mem.pair_prompts)
        assert again.links.sort("pair_id", "prompt_hash").equals(mem.links.sort("pair_id", "prompt_hash"))
        assert again.edges.drop("_part").sort("left", "right").equals(mem.edges.drop("_part").sort("left", "right"))
        assert np.array_equal(again.old_signatures(np.arange(len(again))), mem.old_signatures(np.arange(len(mem))))
        parent = h


def test_a_tampered_state_part_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(nds, "CHUNK", 5)
    store = Store(tmp_path / "s")
    frames = _frames(_chain(3, 2))
    h = _write_version(store, "v0", nds.run_incremental(frames[0], nds.NearDupState.empty(), generation="v0"))
    part = h.path / h.table(nds.SIGNATURES).parts[0].path
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 1
    os.unlink(part)  # a hard link to the object: replace the file, do not write through it
    part.write_bytes(bytes(data))
    state = nds.load_state(h)  # the prompts table is intact; signatures are read on demand
    assert state.old_signatures(np.arange(5, len(state))).shape[0] == len(state) - 5  # other parts: fine
    with pytest.raises(IntegrityError):
        state.old_signatures(np.arange(len(state)))
    bad = h.path / h.table(nds.PROMPTS).parts[0].path
    os.unlink(bad)
    bad.write_bytes(b"PAR1 not the bytes the manifest names")
    with pytest.raises(IntegrityError):
        nds.load_state(h)


def test_a_parent_with_the_old_prompt_index_converts_once(tmp_path):
    store = Store(tmp_path / "s")
    frames = _frames(_chain(11, 3))
    old = _write_version(store, "v-old", None, judgments=frames[0], npz_from=frames[0])
    state = nds.load_state(old)
    assert state.origin.startswith("converted from prompt_index.npz")
    res = nds.run_incremental(frames[1], state, generation="v1")
    parent_run = nd.run(frames[0])
    flags, clusters = nds.merge_flags(parent_run.flags, res), nds.merge_clusters(parent_run.tables["clusters"], res)
    _assert_equal_to_full(pl.concat(frames[:2]), flags, clusters, res, frames[0]["prompt_hash"].n_unique())
    assert res.stats["prompts_hashed"] == res.metrics["prompts_hashed"] < res.metrics["prompts"]
    h = _write_version(store, "v1", res)  # the child carries the converted state: its grandchild extends it
    assert {p.path.split("part-")[1].split("-0")[0] for p in h.table(nds.PROMPTS).parts} >= {"v-old", "v1"}
    res2 = nds.run_incremental(frames[2], nds.load_state(h), generation="v2")
    _assert_equal_to_full(pl.concat(frames), nds.merge_flags(flags, res2), nds.merge_clusters(clusters, res2), res2,
                          pl.concat(frames[:2])["prompt_hash"].n_unique())


def test_other_parameters_rebuild_the_state_from_the_parents_judgments(tmp_path):
    store = Store(tmp_path / "s")
    frames = _frames(_chain(5, 2))
    res0 = nds.run_incremental(frames[0], nds.NearDupState.empty(), generation="v0")
    h = _write_version(store, "v0", res0, judgments=frames[0])
    cfg = NearDuplicateConfig(threshold=0.8)
    state = nds.load_state(h, cfg)
    assert state.origin.startswith("rebuilt: state of v0 has other parameters") and "threshold" in state.origin
    res = nds.run_incremental(frames[1], state, generation="v1")
    parent_run = nd.run(frames[0], cfg)
    _assert_equal_to_full(pl.concat(frames), nds.merge_flags(parent_run.flags, res),
                          nds.merge_clusters(parent_run.tables["clusters"], res), res, len(state), cfg)


def test_empty_and_already_known_batches(tmp_path):
    frames = _frames(_chain(13, 2))
    empty_batch = frames[0].clear()
    first = nds.run_incremental(empty_batch, nds.NearDupState.empty(), generation="v0")
    assert first.metrics["prompts"] == 0 and first.flags.height == 0 and first.clusters.height == 0
    store = Store(tmp_path / "s")
    h = _write_version(store, "v0", first)
    assert all(h.table(t).parts for t in nds.TABLES)  # every table has a part, so its columns are known
    res = nds.run_incremental(frames[0], nds.load_state(h), generation="v1")
    _assert_equal_to_full(frames[0], res.flags, res.clusters, res, 0)
    again = nds.run_incremental(frames[0], res.child_state(), generation="v2")  # the same batch delivered twice
    assert again.metrics["prompts_hashed"] == 0 and len(again.write[nds.PROMPTS]) == len(res.write[nds.PROMPTS])
    assert {k: v for k, v in again.metrics.items() if k not in RUN_ONLY} == \
        {k: v for k, v in res.metrics.items() if k not in RUN_ONLY}
    assert again.flags.sort("subject_id").equals(res.flags.sort("subject_id")) and again.clusters.equals(res.clusters)


@pytest.mark.parametrize("chunk", [nds.CHUNK, 64])
def test_a_chain_of_small_versions_keeps_few_state_parts_and_the_same_results(tmp_path, monkeypatch, chunk):
    """Every version of a chain of small batches: the state tables' trailing parts are merged into
    the version's part (a level compaction; prompts and signatures alike, a merged part at most
    CHUNK rows), so their parts grow O(log N), not one per version; the results still equal the
    full run, and the state read back equals the uncompacted in-memory chain row for row."""
    monkeypatch.setattr(nds, "CHUNK", chunk)
    store = Store(tmp_path / "s")
    frames = _frames(_chain(21, 36))
    parent, flags, clusters = None, empty_flags(), EMPTY_CLUSTERS
    mem = nds.NearDupState.empty()  # the same chain in memory: nothing merged
    merged = 0
    for step, batch in enumerate(frames):
        state = nds.load_state(parent)
        res = nds.run_incremental(batch, state, generation=f"v{step:02d}")
        flags, clusters = nds.merge_flags(flags, res), nds.merge_clusters(clusters, res)
        _assert_equal_to_full(pl.concat(frames[: step + 1]), flags, clusters, res, len(state))
        mem_res = nds.run_incremental(batch, mem, generation=f"v{step:02d}")
        assert mem_res.flags.sort("subject_id").equals(res.flags.sort("subject_id"))
        assert mem_res.clusters.equals(res.clusters) and mem_res.metrics == res.metrics
        mem = mem_res.child_state()
        h = _write_version(store, f"v{step:02d}", res)
        assert h.verify() == []
        n = step + 1
        for t in (nds.PROMPTS, nds.SIGNATURES, nds.PAIR_PROMPTS, nds.LINKS, nds.EDGES):
            parts = h.table(t).parts
            assert len(parts) <= 2 * np.log2(n) + 2 + 2 * h.table(t).rows / chunk, (t, n, [p.rows for p in parts])
            if t == nds.EDGES or parent is None:
                continue
            # the parent's parts not merged are linked as they are, in their order; then this version's part
            before = parent.table(t).parts
            kept = [p for p in parts if p in before]
            assert kept == before[:len(kept)] and all(f"part-v{step:02d}" in p.path for p in parts[len(kept):]), t
            merged += len(before) - len(kept)
        pt, st = h.table(nds.PROMPTS), h.table(nds.SIGNATURES)
        assert [p.path.split("/")[-1] for p in pt.parts] == [p.path.split("/")[-1] for p in st.parts]
        assert [p.rows for p in pt.parts] == [p.rows for p in st.parts] and max(p.rows for p in pt.parts) <= chunk
        again = nds.load_state(h)  # rows in the order the uncompacted chain has them
        assert again.hashes.equals(mem.hashes) and np.array_equal(again.bands, mem.bands)
        assert np.array_equal(again.sketches, mem.sketches) and again.pair_prompts.equals(mem.pair_prompts)
        assert again.links.equals(mem.links)
        assert again.edges.drop("_part").sort("left", "right").equals(mem.edges.drop("_part").sort("left", "right"))
        assert np.array_equal(again.old_signatures(np.arange(len(again))), mem.old_signatures(np.arange(len(mem))))
        parent = h
    assert merged > 0


def test_band_keys_and_sketches_in_row_chunks_equal_the_whole_matrix_at_once(monkeypatch):
    """The nibble sketches are computed a block of rows at a time (bounded temporaries); cut at any row count they
    are the same arrays.  The band keys (one compiled pass, no temporaries) are the chain their docstring says."""
    import numpy as np

    from pipeline.checks import near_duplicates as nd_mod
    from pipeline.checks import near_duplicates_state as nds_mod

    rng = np.random.default_rng(7)
    sigs = rng.integers(0, 2**32, size=(103, 128), dtype=np.uint64).astype(np.uint32)
    whole_bands, whole_sketch = nd_mod._band_keys(sigs, 9, 13), nds_mod.sketch(sigs)
    assert whole_bands.shape == (9, 103) and whole_sketch.shape == (103, 8)
    for rows in (1, 7, 64, 102):
        monkeypatch.setattr(nds_mod, "_SKETCH_ROWS", rows)
        assert np.array_equal(nds_mod.sketch(sigs), whole_sketch)
    # the nibble sketch is what its docstring says: the low 4 bits of every value, 16 to a word
    assert int(whole_sketch[5, 0]) == sum(int(sigs[5, k] & 0xF) << (4 * k) for k in range(16))
    # the band key of band 0 is the multiply-add chain of its 13 values, then fmix64
    acc = np.uint64(sigs[11, 0])
    with np.errstate(over="ignore"):
        for j in range(1, 13):
            acc = acc * nd_mod._K[1] + np.uint64(sigs[11, j])
        assert whole_bands[0, 11] == nd_mod._fmix64(np.array([acc], np.uint64))[0]


# ---------------------------------------------------------------- a first version's pair rows
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from(["sorted", "shuffled", "by pair only"]))
def test_first_version_rows_equal_the_child_path_on_an_empty_state(seed: int, order: str) -> None:
    """A first version's steps 4-6 (no parent rows: no joins against them, each pair's cluster from its first row,
    the histogram from the clusters) give what the child's steps give over an empty state: the pair rows written,
    links, components, recomputed pairs, flags, clusters and the cluster-size histogram."""
    rng = np.random.default_rng(seed)
    n_pairs, n_prompts = int(rng.integers(1, 60)), int(rng.integers(1, 40))
    prompts = [f"{h:016x}" for h in rng.choice(2**40, n_prompts, replace=False)]
    rows = [(f"p{i:03d}", prompts[int(j)]) for i in range(n_pairs) for j in
            rng.choice(n_prompts, min(n_prompts, int(rng.choice([1, 1, 1, 2, 3]))), replace=False)]  # some pairs with several prompts
    pp = pl.DataFrame(rows, schema=nds.PAIR_PROMPT_SCHEMA, orient="row")
    pp = {"sorted": pp.sort("pair_id", "prompt_hash"), "shuffled": pp.sample(fraction=1.0, shuffle=True, seed=seed % 1000),
          "by pair only": pp.sort("pair_id", "prompt_hash", descending=[False, True])}[order]
    used = pp["prompt_hash"].unique().sort()
    k = int(rng.integers(0, 2 * used.len() + 1))
    ends = rng.choice(used.len(), (k, 2)) if used.len() > 1 else np.zeros((0, 2), int)
    edges = pl.DataFrame({"left": used.gather(ends.min(1)), "right": used.gather(ends.max(1)),
                          "jaccard": rng.uniform(0.5, 1.0, len(ends)).round(2), "support": np.ones(len(ends), np.uint16)},
                         schema=nds.EDGE_SCHEMA).filter(pl.col("left") != pl.col("right")).unique(["left", "right"])
    edges = edges.sort("left", "right").with_columns(_part=pl.lit("v"))
    state = nds.NearDupState.empty(NearDuplicateConfig())
    assert state.holds_nothing()
    args = (state, pp, used, state.edges, edges, edges.drop("_part"), edges.clear().drop("_part"), nds._Clock())
    first, child = nds._first_rows(*args), nds._child_rows(*args)
    for name in ("pp_new", "links_add", "links_new", "clusters", "flags"):
        assert getattr(first, name).equals(getattr(child, name)), name
    assert first.comp_new.sort("prompt_hash").equals(child.comp_new.sort("prompt_hash"))
    assert first.recomputed.equals(child.recomputed)
    assert (first.n_new_pairs, first.n_flagged_delta, first.sizes) == (child.n_new_pairs, child.n_flagged_delta, child.sizes)
    assert sum(k * v for k, v in first.sizes.items()) == n_pairs
