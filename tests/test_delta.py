"""A child's select, split and write over its dirty pairs only (pipeline/delta.py) writes the same
version, byte for byte, as the same child deciding and writing every pair."""
from __future__ import annotations

import random
import re

import polars as pl
import pytest
from conftest import canonical, write_jsonl
from test_incremental import POLICY, _batch, random_chains

import pipeline.delta as delta
import pipeline.parts as parts
from pipeline.curate import curate
from pipeline.split import PLACEMENT, placement
from pipeline.store import Store

# an AI judge and a judge of unknown kind among the humans (pair kinds, the AI side of the consensus)
KINDS = {"ann-0": "ai", "ann-1": "unknown"}
# what legitimately differs: the run's own record of its work
RUN_ONLY = {"timings_s", "pair_table_parts"}
PATH_ONLY = {"pairs_selected", "pairs_removed"}


def _same_version(a: Store, b: Store, vid: str) -> None:
    ma, mb = a.get(vid).manifest(), b.get(vid).manifest()
    # every table byte for byte, but the review state: it stamps the build's time on newly routed pairs
    assert {n: [(p.path, p.sha256) for p in t.parts] for n, t in ma.tables.items() if n != "review_state"} == \
        {n: [(p.path, p.sha256) for p in t.parts] for n, t in mb.tables.items() if n != "review_state"}
    assert a.get(vid).read("review_state").drop("routed_at").equals(b.get(vid).read("review_state").drop("routed_at"))
    assert [p.path for p in ma.tables["review_state"].parts] == [p.path for p in mb.tables["review_state"].parts]
    assert ma.ledger == mb.ledger and ma.splits == mb.splits and ma.checks == mb.checks
    la = {k: v for k, v in ma.lineage.items() if k not in RUN_ONLY}
    lb = {k: v for k, v in mb.lineage.items() if k not in RUN_ONLY}
    la["consensus"] = {k: v for k, v in la["consensus"].items() if k not in PATH_ONLY}
    lb["consensus"] = {k: v for k, v in lb["consensus"].items() if k not in PATH_ONLY}
    for lin in (la, lb):  # the texts read for untouched pairs, the rows completed: those the path asked for
        if "union" in lin:
            lin["union"] = {k: v for k, v in lin["union"].items()
                            if k not in ("texts_read", "pairs_texts_read", "completed_reads", "rows_completed",
                                         # (which parent rows the path held and read: pipeline/parent_rows.py)
                                         "rows", "parent_rows_held", "parent_row_passes", "after_checks",
                                         "parent_rows_read")}
    assert la == lb
    def report(s: Store) -> str:  # the same report, but for the time it was written
        return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "TIME", (s.get(vid).path / "report.md").read_text())

    assert report(a) == report(b)


@pytest.mark.parametrize("bucket_pairs", [4096, 3])
@random_chains(4, max_batches=4)
def test_dirty_pairs_only_write_the_same_version(tmp_path_factory, monkeypatch, bucket_pairs, seed, n_batches):
    monkeypatch.setattr(parts, "PART_PAIRS", bucket_pairs)  # small: generations in many buckets
    root = tmp_path_factory.mktemp("delta")
    fast, slow = Store(root / "fast"), Store(root / "slow")
    rng = random.Random(seed)
    parent, old, used = None, [], 0
    for step in range(n_batches):
        rows = [{**r, "annotator_kind": KINDS.get(r["annotator_id"], "human")} for r in _batch(rng, step, old)]
        old += rows
        path = write_jsonl(root / f"b{step}.jsonl", rows)
        vid = curate([path], fast, POLICY, parent=parent).version_id
        with monkeypatch.context() as m:
            m.setattr(delta, "applies", lambda _parent: False)
            assert curate([path], slow, POLICY, parent=parent).version_id == vid
        if parent is not None:
            rule = fast.get(vid).manifest().lineage["consensus"]
            assert "pairs_selected" in rule and "pairs_selected" not in slow.get(vid).manifest().lineage["consensus"]
            used += 1
            _same_version(fast, slow, vid)
            assert fast.get(vid).verify() == []
            # the placement a child counted (its parent's, less the dirty clusters', plus theirs now) is its splits'
            h = fast.get(vid)
            rows = pl.concat([h.read_split(s, columns=["pair_id", "near_dup_cluster", "locale", "annotator_kind"])
                              .with_columns(split=pl.lit(s)) for s in ("train", "validation", "test")])
            assert h.read(PLACEMENT).equals(placement(rows))
        parent = vid
    assert used == n_batches - 1


def test_a_batch_of_new_pairs_selects_only_them(tmp_path, monkeypatch):
    """New pairs with new prompts: the old pairs are clean (not selected again), their bucket parts linked
    (both generations big enough for parts of their own: small ones would share a tail part)."""
    monkeypatch.setattr(parts, "PART_PAIRS", 4)
    rng = random.Random(3)
    first = _batch(rng, 0, [])
    second = [r for r in _batch(rng, 1, []) if not r["comparison_id"].startswith(("redelivered", "rejudged", "conflict"))]
    for r in second:  # prompts unlike any of the first batch: no near-duplicate cluster reaches back
        r["prompt"] = [{"role": "user", "content": f"Completely unrelated question number {r['comparison_id']} about tides"}]
    store = Store(tmp_path / "s")
    v1 = curate([write_jsonl(tmp_path / "a.jsonl", first)], store, POLICY).version_id
    v2 = curate([write_jsonl(tmp_path / "b.jsonl", second)], store, POLICY, parent=v1).version_id
    h1, h2 = store.get(v1), store.get(v2)
    rule = h2.manifest().lineage["consensus"]
    new_pairs = h2.read("pairs").filter(pl.col("first_version") == v2).height
    assert rule["pairs_selected"] == new_pairs and rule["pairs_removed"] == 0
    assert {p.sha256 for p in h1.table("pairs").parts} <= {p.sha256 for p in h2.table("pairs").parts}


def test_a_child_rewrites_only_the_state_parts_its_batch_reaches(tmp_path, monkeypatch):
    """The state tables (pair-scoped checks, the preliminary consensus) of a child under the rule are
    written like the pair tables: a part without a pair whose rows changed is the parent's, linked
    without being read; nothing goes through the grouped write, which fingerprints every row."""
    import pipeline.curate as cur
    from pipeline.incremental import PRELIM_TABLE

    monkeypatch.setattr(parts, "PART_PAIRS", 3)  # the first version in many buckets
    rng = random.Random(5)
    first = _batch(rng, 0, []) + _batch(rng, 1, [])
    store = Store(tmp_path / "s")
    v1 = curate([write_jsonl(tmp_path / "a.jsonl", first)], store, POLICY).version_id
    r = first[0]  # one old pair judged again
    again = [{**r, "comparison_id": "again-1", "annotator_id": "ann-new"}]
    grouped: list[str] = []
    real = cur._grouped_table

    def spy(reuse, store_, stage, name, frame):
        grouped.append(name)
        return real(reuse, store_, stage, name, frame)

    monkeypatch.setattr(cur, "_grouped_table", spy)
    v2 = curate([write_jsonl(tmp_path / "b.jsonl", again)], store, POLICY, parent=v1).version_id
    h1, h2 = store.get(v1), store.get(v2)
    assert h2.manifest().lineage["preliminary"]["mode"] == "incremental"
    names = ("state/duplicates", "state/pair_id_conflict", "state/language", PRELIM_TABLE)
    assert not set(grouped) & set(names), grouped
    for name in names:
        old = {p.path: p.sha256 for p in h1.table(name).parts}
        new = {p.path: p.sha256 for p in h2.table(name).parts}
        linked = [p for p in new if old.get(p) == new[p]]
        assert len(linked) >= len(old) - 2, (name, len(old), len(linked))  # the pair's part (and its cluster's)
        if name in ("state/language", PRELIM_TABLE):  # a row for every pair: many parts
            assert len(old) >= 4, (name, len(old))
    assert h2.read(PRELIM_TABLE).height == h1.read(PRELIM_TABLE).height  # no pair is new
    assert h2.verify() == []


def test_a_prompt_bridging_two_clusters_moves_pairs_as_selecting_every_pair_does(tmp_path, monkeypatch):
    """A new prompt near both of two old prompts that sit in different splits merges their clusters:
    the members of the less protected one move (towards test).  A child that writes only its dirty
    pairs' assignments writes the same table, byte for byte, as one that decides every pair."""
    monkeypatch.setattr(parts, "PART_PAIRS", 4)  # old pairs in many buckets: the moved rows' parts are rewritten
    words = [f"w{i}" for i in range(200)]
    core = " ".join(words[:30])

    def rec(cid: str, prompt: str, a: str = "First answer.", b: str = "Second answer.") -> dict:
        return canonical(0, comparison_id=cid, prompt=prompt, response_a=a, response_b=b, annotator_id="ann-2",
                         label="a", shown_first="a", locale="en", tags=None)

    # families: a prompt of the core and 10 words of its own; two families' prompts share 30 of 50 words
    # (Jaccard 0.6, below the threshold 0.7); one that takes 5 words of each is 35 / 45 = 0.78 from both
    extra = {i: words[30 + 10 * i:40 + 10 * i] for i in range(16)}
    first = [rec(f"c{i}-{k}", f"{core} {' '.join(extra[i])}", a=f"Answer {k} of {i}.") for i in range(16) for k in range(3)]
    fast, slow = Store(tmp_path / "fast"), Store(tmp_path / "slow")
    v1 = curate([write_jsonl(tmp_path / "a.jsonl", first)], fast, POLICY).version_id
    assert curate([write_jsonl(tmp_path / "a.jsonl", first)], slow, POLICY).version_id == v1
    h1 = fast.get(v1)
    clusters = h1.read("pairs").select("pair_id", "near_dup_cluster")
    assert clusters["near_dup_cluster"].n_unique() == 16  # no two families are near duplicates
    split_of = dict(h1.read("split_assignments").join(clusters, on="pair_id").select("near_dup_cluster", "split").iter_rows())
    fam = {f"{core} {' '.join(extra[i])}": i for i in range(16)}
    fam_split = {i: split_of[cl] for cl, i in h1.read("pairs").select(
        "near_dup_cluster", pl.col("prompt_text").replace_strict(fam, return_dtype=pl.Int64)).unique().iter_rows()}
    i = next(i for i in range(16) if fam_split[i] == "train")
    j = next(j for j in range(16) if fam_split[j] != "train")
    bridge = rec("bridge-0", f"{core} {' '.join(extra[i][:5] + extra[j][:5])}")
    path = write_jsonl(tmp_path / "b.jsonl", [bridge])
    v2 = curate([path], fast, POLICY, parent=v1).version_id
    with monkeypatch.context() as m:
        m.setattr(delta, "applies", lambda _parent: False)
        assert curate([path], slow, POLICY, parent=v1).version_id == v2
    stability = next(c for c in fast.get(v2).manifest().checks if c.name == "split_stability")
    assert stability.metrics["moved"] == 3 and stability.metrics["moves"] == {f"train->{fam_split[j]}": 3}
    assert "pairs_selected" in fast.get(v2).manifest().lineage["consensus"]
    _same_version(fast, slow, v2)


def test_a_leak_among_a_childs_dirty_pairs_is_counted_as_over_every_pair(tmp_path, monkeypatch):
    """A child whose parent leaked nothing counts leakage over its dirty pairs only. A leak planted
    among them (one pair of a cluster of several moved to another split) is counted as a count over
    every pair of the version's splits counts it."""
    import pipeline.curate as cur
    from pipeline.split import leakage

    rng = random.Random(11)
    store = Store(tmp_path / "s")
    first = _batch(rng, 0, [])
    parent = curate([write_jsonl(tmp_path / "a.jsonl", first)], store, POLICY).version_id
    assert store.get(parent).manifest().check("split_leakage").metrics["clusters_in_several_splits"] == 0
    real = cur.assign_splits
    moved: list[str] = []

    def leaky(dpo, *a, **k):  # noqa: ANN001, ANN002, ANN003
        out = real(dpo, *a, **k)
        big = out.filter(pl.col("near_dup_cluster").is_duplicated()).sort("pair_id")
        if big.height:
            moved.append(big["pair_id"][0])
            to = "validation" if big["split"][0] != "validation" else "train"
            out = out.with_columns(split=pl.when(pl.col("pair_id") == moved[-1]).then(pl.lit(to)).otherwise(pl.col("split")))
        return out

    monkeypatch.setattr(cur, "assign_splits", leaky)
    child = curate([write_jsonl(tmp_path / "b.jsonl", _batch(rng, 1, first))], store, POLICY, parent=parent).version_id
    h = store.get(child)
    assert moved and h.manifest().lineage["consensus"]["pairs_selected"] < h.manifest().ledger.pairs  # the delta path
    frames = {s: h.read_split(s, columns=["pair_id", "near_dup_cluster"]) for s in ("train", "validation", "test")}
    prompts = h.read("judgments", columns=["pair_id", "prompt_hash"]).unique("pair_id", keep="first", maintain_order=True)
    want = leakage(frames, prompts)
    got = h.manifest().check("split_leakage").metrics
    assert want["clusters_in_several_splits"] >= 1
    assert {k: got[k] for k in want} == want


@random_chains(4, max_batches=4)
def test_the_plan_compares_clusters_of_the_moved_pairs_only(tmp_path_factory, monkeypatch, seed, n_batches):
    """A child's plan compares the clusters of the pairs the near-duplicate step says may have
    moved (the batch's, those of renamed prompts), not every pair's, and takes the pairs its parent
    has no row of as those first seen now: the same plan as comparing and joining every pair."""
    real = delta.plan
    compared: list[int] = []

    def both(*a, moved=None, fresh=None, **k):  # noqa: ANN001, ANN002, ANN003
        got = real(*a, moved=moved, fresh=fresh, **k)
        if moved is not None:
            assert fresh is not None
            want = real(*a, moved=None, fresh=None, **k)
            assert sorted(got.dirty.to_list()) == sorted(want.dirty.to_list())
            assert got.removed.equals(want.removed) and got.new.sort().equals(want.new.sort())
            assert got.clean.sort("pair_id").equals(want.clean.sort("pair_id"))
            compared.append(moved.height)
        return got

    monkeypatch.setattr(delta, "plan", both)
    root = tmp_path_factory.mktemp("moved")
    store, rng, old, parent = Store(root / "s"), random.Random(seed), [], None
    for step in range(n_batches):
        rows = _batch(rng, step, old)
        old += rows
        parent = curate([write_jsonl(root / f"b{step}.jsonl", rows)], store, POLICY, parent=parent).version_id
    assert len(compared) == n_batches - 1


def test_pairs_without_a_parent_row_are_found_whatever_brought_them_back():
    """The pairs a parent has no row of are looked for among the new and the recomputed ones,
    and taken only when their count is that of every pair: a pair whose judgments were all
    dropped in the parent and that is kept now without being recomputed is found by the join."""
    from schemas.check import make_flags

    old = [f"p{i}" for i in range(6)]
    parent_rows = pl.DataFrame({"pair_id": old, "flag_reasons": [[] for _ in old], "near_dup_cluster": old,
                                "decision": "keep", "reason": None, "weight": 1.0, "locale": "en",
                                "annotator_kind": "human", "first_version": "v0"},
                               schema_overrides={"flag_reasons": pl.List(pl.String), "reason": pl.String})
    flags = make_flags([], subject_kind="pair", check="x", reason="x")
    for back, recompute in ((["r"], ["r", "p1"]), (["s"], ["p1"]), (["r", "s"], ["r"])):
        ids = pl.Series("pair_id", [*old, "q", *back])
        clusters = pl.DataFrame({"pair_id": ids, "near_dup_cluster": ids})
        args = (parent_rows, ids, pl.Series(recompute, dtype=pl.String), flags, clusters, pl.Series([], dtype=pl.String))
        got = delta.plan(*args, moved=clusters.head(0), fresh=pl.Series(["q"]))
        want = delta.plan(*args)
        assert sorted(got.new.to_list()) == sorted(want.new.to_list()) == sorted(["q", *back])
        assert sorted(got.dirty.to_list()) == sorted(want.dirty.to_list()) and got.clean.equals(want.clean)


def test_a_flag_that_leaves_an_old_part_rewrites_it_as_writing_every_flag_does(tmp_path, monkeypatch):
    """A child whose only flag changes are removals (an old pair's disagreement outvoted) rewrites the
    parts those flags left -- no flag comes into them -- and writes the flags table every-flag writing
    writes; the parts no flag left or came into are linked."""
    monkeypatch.setattr(parts, "PART_PAIRS", 3)  # the first generation in several buckets
    first = [canonical(i, comparison_id=f"c{i}-{k}", annotator_id=f"ann-{k}", label="a", shown_first="ab"[k])
             for i in range(12) for k in range(2)]
    first += [canonical(99, comparison_id="split-0", annotator_id="ann-0", label="a"),
              canonical(99, comparison_id="split-1", annotator_id="ann-1", label="b", shown_first="b")]
    second = [canonical(99, comparison_id=f"outvote-{k}", annotator_id=f"ann-{k + 2}", label="a", shown_first="ab"[k % 2])
              for k in range(5)]
    fast, slow = Store(tmp_path / "fast"), Store(tmp_path / "slow")
    v1 = curate([write_jsonl(tmp_path / "a.jsonl", first)], fast, POLICY).version_id
    assert curate([write_jsonl(tmp_path / "a.jsonl", first)], slow, POLICY).version_id == v1
    b = write_jsonl(tmp_path / "b.jsonl", second)
    v2 = curate([b], fast, POLICY, parent=v1).version_id
    with monkeypatch.context() as m:
        m.setattr(delta, "applies", lambda _parent: False)
        assert curate([b], slow, POLICY, parent=v1).version_id == v2
    _same_version(fast, slow, v2)
    h1, h2 = fast.get(v1), fast.get(v2)
    split = h1.read("judgments").filter(pl.col("comparison_id") == "split-0")["pair_id"][0]
    f1, f2 = h1.read("flags"), h2.read("flags")
    left, came = f1.join(f2, on=f1.columns, how="anti"), f2.join(f1, on=f1.columns, how="anti")
    assert "low_agreement" in left["reason"].to_list() and set(left["subject_id"]) == {split}  # the outvote's ...
    assert not came.height  # ... and no flag came
    old, new = ({p.path: p.sha256 for p in h.table("flags").parts} for h in (h1, h2))
    rewritten = [p for p in new if p in old and new[p] != old[p]]
    assert len(rewritten) == 1 and len(new) >= 2  # the part that held them; the others linked


def test_part_tags_name_the_part_of_each_row_as_a_read_gives_them(tmp_path, monkeypatch):
    """The parent's rows of a table kept by pair part, tagged with their part from the manifest's
    row counts (no second read): each row's tag is the part it was read from; a height that is not
    the table's, or a table written whole (one part ``all``, older code), gives no tags."""
    monkeypatch.setattr(parts, "PART_PAIRS", 3)
    rows = [canonical(i, comparison_id=f"c{i}-{k}", annotator_id=f"ann-{k}", label="ab"[(i + k) % 2])
            for i in range(12) for k in range(2)]
    h = Store(tmp_path / "s").get(curate([write_jsonl(tmp_path / "a.jsonl", rows)], Store(tmp_path / "s"), POLICY).version_id)
    for name in ("flags", "review_state"):
        t = h.table(name)
        assert t is not None and len(t.parts) > 1
        frame = h.read(name)
        tags = delta.part_tags(h, name, frame.height)
        assert tags is not None
        want = pl.concat([pl.Series([parts.part_key(p)] * p.rows, dtype=pl.String) for p in t.parts])
        assert tags.equals(want, check_names=False)
        for p in t.parts:  # the rows a tag names are that part's rows
            assert frame.filter(tags == parts.part_key(p)).equals(h.read(p.path))
        assert delta.part_tags(h, name, frame.height + 1) is None
    whole = h.table("annotators")  # a table of one part `all`: not kept by pair part
    assert whole is not None and delta.part_tags(h, "annotators", whole.rows) is None
