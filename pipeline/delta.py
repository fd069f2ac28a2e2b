"""A child's select, split and write over the pairs that changed (docs/incremental.md).

Under the rule of a child (:func:`pipeline.incremental.pairs_to_recompute`) a pair that is not
recomputed keeps its parent's row, and select decides a pair from its own row, its flag
reasons, its near-duplicate cluster and the share of its judgments from down-weighted
annotators (all unchanged unless the pair is recomputed or its flags or cluster changed).  So
its decision, weight, DPO row and routed row are its parent's, and only the *dirty* pairs go
through select and split:

- the recomputed pairs, the pairs the parent's pairs table does not have, the pairs whose flag
  reasons or cluster differ from the parent's (:func:`plan`);
- every pair of a near-duplicate cluster such a pair is in, or was in (a cluster's split is
  decided for the cluster), and the pairs the parent had that the child does not (removed).

The split of a clean cluster is its parent's (every member's assignment is sticky and the
members are the same); fresh clusters fill their stratum's deficits counting the clean clusters
as placed (:func:`pipeline.split.assign_splits` ``base``).  The pair tables (DPO splits, pairs,
routed) are written by bucket (:mod:`pipeline.parts`): a bucket without a dirty pair links its
parent's part without reading it; a dirty bucket is the parent's part without the dirty rows plus
the new ones, in pair_id order -- the bytes a full select of the same rows writes -- and is linked
all the same when those rows come out as they were (same fingerprint).  ``tests/test_delta.py``
builds random chains with and without this path and requires byte-identical versions.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

import numpy as np

from pipeline.parts import EMPTY_KEY, FINGERPRINTS, PartReuse, TableWriter, fingerprint, part_key
from pipeline.store import Store, VersionHandle
from schemas.manifest import TableInfo

# the parent's pairs table columns the plan reads (no texts)
PLAN_COLUMNS = ("pair_id", "flag_reasons", "near_dup_cluster", "decision", "reason", "weight", "locale", "annotator_kind",
                "first_version")
# what a child keeps of its clean pairs' rows (their fate, routes and strata): a filter copies each column
CLEAN_COLUMNS = ("pair_id", "decision", "reason", "near_dup_cluster", "locale", "annotator_kind")
# the pairs table without its texts, in the same buckets: what a child reads of its parent's pairs
# (a read hashes whole parts: the texts are ~90 % of the pairs table's bytes)
PAIR_ROWS = "state/pair_rows"
TABLES = ("pairs", PAIR_ROWS, "routed", "data/train", "data/validation", "data/test")


def applies(parent: VersionHandle | None) -> bool:
    """The parent keeps what this path reads: its pair tables as parts, with their fingerprints."""
    return parent is not None and all(parent.table(t) is not None for t in (*TABLES, FINGERPRINTS, "split_assignments"))


@dataclass
class Plan:
    dirty: pl.Series  # pair ids whose rows are recomputed (select, split, write)
    removed: pl.Series  # pair ids the parent's pairs table has and the child's does not
    clean: pl.DataFrame  # the parent's rows of the other pairs in CLEAN_COLUMNS (the child's rows, unchanged)
    order: pl.Series | None = None  # every pair with a row (kept judgments), first-seen order (set by the build)
    new: pl.Series | None = None  # pairs with kept judgments that the parent's pairs table lacks


def plan(parent_rows: pl.DataFrame, pair_ids: pl.Series, recompute: pl.Series, flags: pl.DataFrame,
         clusters: pl.DataFrame | None, no_kept: pl.Series, moved: pl.DataFrame | None = None,
         fresh: pl.Series | None = None) -> Plan:
    """Which pairs go through select again.  ``parent_rows``: the parent's pairs table
    (:data:`PLAN_COLUMNS`); ``pair_ids``: the pairs of the child's aggregation (with kept
    judgments); ``no_kept``: the child's other pairs (all their judgments dropped); ``moved``:
    pair_id, near_dup_cluster of the only pairs whose cluster may differ from the parent's (the
    near-duplicate step's: the batch's pairs and those of renamed prompts), None: any pair's may;
    ``fresh``: the pairs first seen in this version: the pairs without a parent row are looked for
    among them and the recomputed ones (a pair the parent had without a row, all its judgments
    dropped, gains a kept one only by a change that recomputes it), and taken when their count is
    that of every pair (the union only grows, so the parent's rows the child lacks are among
    ``no_kept``); else, or None, found by a join of every pair.

    Only small sets are compared pair by pair: the flag reasons by (pair, reason) difference,
    the clusters over the pairs that are in a cluster in the child or were in the parent; a join
    of a small set with every pair's rows filters those rows by the set first."""
    c = pl.col
    ids = pair_ids.to_frame("pair_id")
    cl = (clusters.select("pair_id", _cl="near_dup_cluster") if clusters is not None and clusters.height
          else pl.DataFrame(schema={"pair_id": pl.String, "_cl": pl.String}))

    def of(frame: pl.DataFrame, keys: pl.Series) -> pl.DataFrame:  # the rows of ``keys`` (a small set) only
        return frame.filter(c("pair_id").is_in(keys.implode()))

    nk = no_kept.implode()

    def kept(keys: pl.Series) -> pl.Series:  # the pairs of ``keys`` that have kept judgments (``ids``), sorted:
        u = keys.unique()  # every key is a pair of the union (``ids`` or ``no_kept``): no look-up of every pair
        return u.filter(~u.is_in(nk)).sort()

    ndc = parent_rows.select("pair_id", "near_dup_cluster")
    # flag reasons: the (pair, reason) rows of one side that the other lacks
    mine = flags.filter(c("subject_kind") == "pair").select(pair_id="subject_id", reason="reason")
    theirs = parent_rows.select("pair_id", reason="flag_reasons").explode("reason").drop_nulls("reason")
    flag_changed = pl.concat([mine.join(theirs, on=["pair_id", "reason"], how="anti"),
                              theirs.join(mine, on=["pair_id", "reason"], how="anti")])["pair_id"]
    # clusters: a pair of the parent whose cluster here (its own id when it has none) is another
    # (the pairs not in the child's aggregation are left out with the seeds below)
    maybe = ndc if moved is None else of(ndc, moved["pair_id"])
    cluster_changed = maybe.filter(c("near_dup_cluster").is_not_null()) \
        .join(cl if moved is None else of(cl, moved["pair_id"]), on="pair_id", how="left") \
        .filter(c("_cl").fill_null(c("pair_id")) != c("near_dup_cluster"))["pair_id"]
    # not in the parent's pairs (new, or all dropped there)
    new = None
    if fresh is not None and not ndc["near_dup_cluster"].null_count():
        had = of(ndc, recompute)["pair_id"]
        new = kept(pl.concat([fresh, recompute.filter(~recompute.is_in(had.implode()))]))
        if new.len() != ids.height - ndc.height + of(ndc, no_kept).height:  # some pair is not among them: joined
            new = None
    if new is None:
        new = ids.join(ndc.filter(c("near_dup_cluster").is_not_null()), on="pair_id", how="anti")["pair_id"]
    seed_ids = kept(pl.concat([flag_changed, cluster_changed, new, recompute])).to_frame("pair_id")
    seeds = seed_ids.join(of(cl, seed_ids["pair_id"]), on="pair_id", how="left") \
        .join(of(ndc, seed_ids["pair_id"]), on="pair_id", how="left").with_columns(_cl=c("_cl").fill_null(c("pair_id")))
    none = pl.DataFrame(schema={"pair_id": pl.String, "near_dup_cluster": pl.String})
    # the parent's pairs the child has no kept judgment of (usually none: counted before joining)
    matched = ids.height - new.len()
    removed = ndc.join(ids, on="pair_id", how="anti") if matched < parent_rows.height else none
    # pairs of the child without kept judgments that the parent's pairs table lacks: their clusters too
    others = no_kept.to_frame("pair_id").join(removed.select("pair_id"), on="pair_id", how="anti")
    others = others.join(of(cl, others["pair_id"]), on="pair_id", how="left").with_columns(_cl=c("_cl").fill_null(c("pair_id")))
    gone = removed.select("pair_id").join(no_kept.to_frame("pair_id"), on="pair_id", how="semi")
    removed_cl = gone.join(of(cl, gone["pair_id"]), on="pair_id", how="left").select(c("_cl").fill_null(c("pair_id")))["_cl"]
    # whole clusters: a cluster's split is decided for all its members (now and in the parent)
    touched = pl.concat([seeds["_cl"], seeds["near_dup_cluster"].drop_nulls(), removed["near_dup_cluster"], removed_cl,
                         others["_cl"]]).unique().implode()
    # a pair's cluster here (its own id when in none) or in the parent is touched
    in_cl = cl.filter(c("_cl").is_in(touched))["pair_id"]
    lone = ids.filter(c("pair_id").is_in(touched))
    alone = lone.join(of(cl, lone["pair_id"]), on="pair_id", how="anti")["pair_id"]
    was = ndc.filter(c("near_dup_cluster").is_in(touched))["pair_id"]
    dirty = kept(pl.concat([seed_ids["pair_id"], in_cl, alone, was]))
    # the parent's pairs that still have kept judgments: all of them unless some were removed
    still = parent_rows.join(ids, on="pair_id", how="semi") if removed.height else parent_rows
    clean = still.select(CLEAN_COLUMNS).filter(~c("pair_id").is_in(dirty.implode()))
    return Plan(dirty=dirty, removed=removed["pair_id"].sort(), clean=clean, new=new)


def write_table(reuse: PartReuse, store: Store, stage: Path, name: str, rows: pl.DataFrame, gone: pl.DataFrame,
                order_by: tuple[str, ...] = ("pair_id",)) -> TableInfo:
    """A pair table of a child: ``rows`` (the dirty pairs' rows, with ``_part``), ``gone`` (pair_id,
    ``_part`` of every dirty or removed pair: their parent rows are replaced or deleted).  A parent
    part no such pair falls in is linked unread; the others are rewritten, their rows sorted by
    ``order_by`` (a state table with several rows a pair: pair_id and its flat columns, the order
    :func:`pipeline.curate._grouped_table` gives the same rows)."""
    assert reuse.parent is not None
    parent = reuse.parent
    w = TableWriter(store, stage, name)
    t = parent.table(name)
    assert t is not None
    hit = set(gone["_part"].unique().to_list()) | set(rows["_part"].unique().to_list())
    body = rows.drop("_part")  # an empty frame of the dirty rows may lack columns the parts have (routed's judgments)
    by_key = {k: f.drop("_part") for (k,), f in rows.partition_by("_part", as_dict=True).items()} if rows.height else {}
    gone_ids = gone["pair_id"]
    done: set[str] = set()
    for part in t.parts:
        key = part.path.rsplit("/", 1)[-1].removeprefix("part-").removesuffix(".parquet")
        if key == EMPTY_KEY:
            continue  # an empty table's placeholder: rows, if any, come as new parts
        rel = part.path
        if key not in hit:
            w.inherit(parent, part)
            reuse.linked += 1
            known = reuse.known.get(rel)
            reuse.seen[rel] = known[0] if known is not None else fingerprint(parent.read(rel))
            continue
        done.add(key)
        old = parent.read(rel).filter(~pl.col("pair_id").is_in(gone_ids.implode()))
        new = by_key.get(key)
        if new is not None:  # the same columns (the dirty rows' frame decides order and types)
            if set(old.columns) != set(new.columns):
                raise ValueError(f"{parent.path / rel}: columns {sorted(old.columns)} differ from the new rows' {sorted(new.columns)}")
            old = pl.concat([old.select(new.columns).cast(new.schema), new])
        frame = _sorted(old, order_by)
        known = reuse.known.get(rel)
        if known is not None and frame.height == known[1].rows and fingerprint(frame) == known[0]:
            w.inherit(parent, part)  # the dirty rows came out as they were: the parent's part, linked
            reuse.linked += 1
            reuse.seen[rel] = known[0]
            continue
        _write(w, reuse, key, frame)
    for key, new in sorted(by_key.items()):
        if key not in done:
            _write(w, reuse, key, _sorted(new, order_by))
    if not w.parts:
        w.write(EMPTY_KEY, body.clear())
    return w.info()


def part_tags(parent: VersionHandle, name: str, rows: int) -> pl.Series | None:
    """The part key of each row of the parent's table ``name`` as :meth:`VersionHandle.read` gives it
    (its parts in order; ``rows``: the frame's height, to check that it is that read).  None when the
    table is not kept by pair part: absent, or one part ``all`` (written whole by older code)."""
    t = parent.table(name)
    if t is None or sum(p.rows for p in t.parts) != rows:
        return None
    keys = [part_key(p) for p in t.parts]
    if "all" in keys:
        return None
    return pl.Series("_part", np.repeat(np.array(keys, dtype=object), [p.rows for p in t.parts]), dtype=pl.String)


def write_changed(reuse: PartReuse, store: Store, stage: Path, name: str, rows: pl.DataFrame, parent_rows: pl.DataFrame,
                  tags: pl.Series, key_of: Callable[[pl.DataFrame], pl.Series], order_by: tuple[str, ...], *,
                  fingerprinted: bool = True) -> TableInfo:
    """A child's table kept by pair part whose rows are not replaced pair by pair but compared with
    its parent's by value (the flags, the review state): ``rows`` the child's whole table,
    ``parent_rows`` the parent's as read, ``tags`` their parts (:func:`part_tags`).  A row whose
    count differs between the two (by seeded row hash) left or came: the parts it is in, or that
    ``key_of`` puts it in, are rewritten -- the parent's unchanged rows of the part plus the
    child's changed rows keyed there, sorted by ``order_by`` -- and every other part is linked
    unread.  The same parts as writing every row keyed (:func:`pipeline.curate._grouped_table`),
    since a row's key is a function of its pair that never changes (:func:`pipeline.parts.parent_keys`);
    ``tests/test_delta.py`` requires it.  Hashing both tables is O(history) but ~10 ms a 300k rows;
    what is written is O(change).  ``fingerprinted``: the parts' fingerprints are recorded in
    ``reuse`` (not for a table whose rows carry the build's time: they would differ between two
    builds of one version)."""
    assert reuse.parent is not None
    parent = reuse.parent
    cols = rows.columns
    mine = parent_rows.select(cols)
    if mine.schema != rows.schema:  # (values equal under another type would hash differently)
        mine = mine.cast(rows.schema)  # type: ignore[arg-type]
    hp = mine.hash_rows(seed=_ROW_SEED).alias("_h")
    del mine
    hc = rows.hash_rows(seed=_ROW_SEED).alias("_h")
    if hp.n_unique() == hp.len() and hc.n_unique() == hc.len():  # no row twice (the flags): a set difference
        left, came = ~hp.is_in(hc.implode()), rows.filter(~hc.is_in(hp.implode()))
    else:  # a row whose count changed
        counts = hp.value_counts(name="_np").join(hc.value_counts(name="_nc"), on="_h", how="full", coalesce=True)
        changed = counts.filter(pl.col("_np").fill_null(0) != pl.col("_nc").fill_null(0))["_h"].implode()
        left, came = hp.is_in(changed), rows.filter(hc.is_in(changed))
    came_keys = key_of(came) if came.height else pl.Series("_part", [], dtype=pl.String)
    hit = set(tags.filter(left).unique().to_list()) | set(came_keys.unique().to_list())
    w = TableWriter(store, stage, name)
    t = parent.table(name)
    assert t is not None
    done: set[str] = set()
    for part in t.parts:
        key = part_key(part)
        if key == EMPTY_KEY:
            continue  # an empty table's placeholder: rows, if any, come as new parts
        if key not in hit:
            w.inherit(parent, part)
            reuse.linked += 1
            if fingerprinted:
                known = reuse.known.get(part.path)
                reuse.seen[part.path] = known[0] if known is not None else fingerprint(parent.read(part.path))
            continue
        done.add(key)
        kept = parent_rows.filter((tags == key) & ~left).select(cols).cast(rows.schema)
        _write(w, reuse, key, _sorted(pl.concat([kept, came.filter(came_keys == key)]), order_by), fingerprinted)
    for key in sorted(hit - done):
        _write(w, reuse, key, _sorted(came.filter(came_keys == key), order_by), fingerprinted)
    if not w.parts:
        w.write(EMPTY_KEY, rows.clear())
    return w.info()


_ROW_SEED = 0xF1A6


def _sorted(frame: pl.DataFrame, order_by: tuple[str, ...]) -> pl.DataFrame:
    return frame.sort(list(order_by), nulls_last=True, maintain_order=True)


def _write(w: TableWriter, reuse: PartReuse, key: str, frame: pl.DataFrame, fingerprinted: bool = True) -> None:
    if frame.height == 0:
        return
    part = w.write(key, frame)
    reuse.written += 1
    if fingerprinted:
        reuse.seen[part.path] = fingerprint(frame)


def parent_texts(parent: VersionHandle, own: pl.DataFrame, keys: Callable[[pl.DataFrame], pl.DataFrame]
                 ) -> Callable[[pl.Series], pl.DataFrame]:
    """pair ids -> their pairs rows with texts: the dirty pairs' from ``own``, the others (the clean
    pairs) from the parent's pairs table -- only the parts that hold them (``keys``: a frame of pair
    ids -> pair_id, ``_part``), read in one scan whose filter decodes the texts of those rows only."""

    def texts(ids: pl.Series) -> pl.DataFrame:
        mine = own.join(ids.to_frame("pair_id"), on="pair_id", how="semi")
        rest = ids.to_frame("pair_id").join(mine.select("pair_id"), on="pair_id", how="anti")
        if rest.height == 0:
            return mine
        theirs = parent.read("pairs", where=pl.col("pair_id").is_in(rest["pair_id"].implode()),
                             keys=keys(rest)["_part"].unique().to_list())
        cols = [x for x in mine.columns if x in theirs.columns]
        return pl.concat([mine.select(cols), theirs.select(cols).cast(mine.select(cols).schema)])

    return texts


__all__ = ["PAIR_ROWS", "PLAN_COLUMNS", "Plan", "TABLES", "applies", "parent_texts", "part_tags", "plan", "write_changed", "write_table"]
