"""A child's passes over its parent's judgments, one part at a time (issue 15: a child over partitions).

The parent's judgments are kept in parts of at most a partition's rows, in arrival order, and
:data:`pipeline.incremental.JUDGMENT_ROWS` holds the same rows without their texts.  Those parts are
the partitions of a child's passes over its history: a task reads one part (checked against the
manifest's sha256 first), in this process or on the Dask cluster ``PREFPIPE_DASK`` names
(:mod:`pipeline.distributed`), and returns what the child needs of it -- the size of the changes,
not of the history:

* :func:`scan`, after the checks, with the child's flags broadcast: each part's dropped judgments
  (their reason), its annotators with a kept judgment, the pairs whose judgments' flags or
  annotators' status changed (:func:`pipeline.incremental.pairs_to_recompute`), the pairs of the
  flagged judgments;
* :class:`PartedSelection`: select's judgments (:class:`pipeline.select.JudgmentSelection`) whose
  parent rows are read by pair, for the pairs a stage asks for (the recomputed and the dirty
  pairs), by a task per part, and kept once read.

So after the checks the child lets go of its union (every parent row's narrow columns, ~90-110 B a
judgment): select, split and the report read the rows of the pairs they touch.  The same rows in
the same order as the union's: a row's place is its part's offset plus its place in the part,
the batch's rows after the parent's.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import select as sel
from pipeline.distributed import PartitionRef, State, Step, map_partitions
from pipeline.incremental import JUDGMENT_ROWS, defers
from pipeline.partition_select import Broadcast
from pipeline.store import VersionHandle
from schemas.policy import SelectConfig

__all__ = ["Scan", "PartedSelection", "parent_refs", "scan", "scan_frame", "changed_subjects"]

VERSION = "1"
ROW = "_row"  # a row's place in the union (Int64)
SCAN_COLUMNS = ["comparison_id", "pair_id", "annotator_id"]


def parent_refs(parent: VersionHandle) -> tuple[list[PartitionRef], list[int]]:
    """(the parts a child's passes read -- :data:`JUDGMENT_ROWS`, whose parts hold the judgments' rows part for
    part --, each part's first row's place in the union)."""
    if not defers(parent):
        raise ValueError(f"{parent.path}: its {JUDGMENT_ROWS} parts do not hold its judgments' rows part for part")
    table = parent.table(JUDGMENT_ROWS)
    assert table is not None
    refs, offsets, at = [], [], 0
    for i, part in enumerate(table.parts):
        refs.append(PartitionRef(i, (str((parent.path / part.path).resolve()),), (part.sha256,)))
        offsets.append(at)
        at += part.rows
    return refs, offsets


def _map(parent: VersionHandle, step: Step, refs: list[PartitionRef], work: Path, client: Any) -> list[State]:
    """:func:`pipeline.distributed.map_partitions` over the parent's parts; a part whose bytes are not its manifest's
    is the parent's damage, not a task to retry (:class:`pipeline.store.IntegrityError`, as a read of it says)."""
    from pipeline.distributed import PartitionTaskError
    from pipeline.store import IntegrityError

    try:
        states, _ = map_partitions(step, refs, work / "states", client=client, light=True)  # (a few columns a task)
    except PartitionTaskError as err:
        changed = sorted(i for i, msg in err.failed.items() if msg.startswith("PartitionChanged"))
        if changed:
            by_index = {r.index: r for r in refs}
            raise IntegrityError(f"{by_index[changed[0]].paths[0]}: sha256 differs from the manifest of "
                                 f"{parent.version_id} (file changed after the version was written)") from err
        raise
    finally:
        Broadcast.forget()
    return states


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _row_index(frame: pl.DataFrame, offset: int = 0) -> pl.DataFrame:
    return frame.select((pl.int_range(pl.len(), dtype=pl.Int64) + offset).alias(ROW), pl.all())


# ---------------------------------------------------------------- the scan after the checks
def changed_subjects(parent_flags: pl.DataFrame, flags: pl.DataFrame) -> pl.DataFrame:
    """The judgments and annotators whose set of flag reasons differs between the parent's flags and the
    child's (``subject_kind``, ``subject_id``): their pairs are recomputed."""
    out = []
    for kind in ("judgment", "annotator"):
        a, b = (f.filter(pl.col("subject_kind") == kind).select("subject_id", "reason").unique() for f in (parent_flags, flags))
        ids = pl.concat([a.join(b, on=["subject_id", "reason"], how="anti"),
                         b.join(a, on=["subject_id", "reason"], how="anti")])["subject_id"].unique().sort()
        out.append(pl.DataFrame({"subject_kind": kind, "subject_id": ids}, schema={"subject_kind": pl.String,
                                                                                "subject_id": pl.String}))
    return pl.concat(out)


def scan_keys(flags: pl.DataFrame, changed: pl.DataFrame, cfg: SelectConfig) -> pl.DataFrame:
    """What a part's scan looks its rows up in, from the flags once (not per part): ``kind`` -- ``drop_j`` (a
    comparison id and the reason it is dropped: a flagged judgment), ``drop_a`` (an annotator's), ``flagged`` (a flagged
    judgment),
    ``changed_j``, ``changed_a`` (:func:`changed_subjects`) --, ``id``, ``reason``."""
    by_j, by_a, _ = sel.drop_rules(flags, cfg)
    kind = pl.col("subject_kind")

    def ids(k: str, frame: pl.DataFrame, col: str, reason: str | None = None) -> pl.DataFrame:
        return frame.select(kind=pl.lit(k), id=pl.col(col), reason=pl.col(reason) if reason else pl.lit(None, pl.String))

    return pl.concat([ids("drop_j", by_j, "comparison_id", "_drop"), ids("drop_a", by_a, "annotator_id", "_drop_a"),
                      ids("flagged", flags.filter(kind == "judgment").select("subject_id").unique(), "subject_id"),
                      ids("changed_j", changed.filter(kind == "judgment"), "subject_id"),
                      ids("changed_a", changed.filter(kind == "annotator"), "subject_id")]).sort("kind", "id")


def scan_frame(rows: pl.DataFrame, keys: pl.DataFrame) -> State:
    """One part's scan (``rows``: its comparison_id, pair_id, annotator_id; ``keys``: :func:`scan_keys`): ``dropped``
    (place, comparison_id, pair_id, annotator_id and ``_drop``, the reason: :func:`pipeline.select.filter_judgments`'s
    rule), ``annotators`` (those with a kept judgment), ``hit`` (the pairs of the changed judgments and annotators),
    ``flagged`` (place, comparison_id, pair_id of the judgments with a flag)."""
    def of(kind: str) -> pl.DataFrame:
        return keys.filter(pl.col("kind") == kind)

    by_j = of("drop_j").select(comparison_id="id", _drop="reason")
    by_a = of("drop_a").select(annotator_id="id", _drop_a="reason")
    placed = _row_index(rows.select(SCAN_COLUMNS))
    # a judgment dropped for a reason of its own is a flagged one: one look-up of every id, then the few flagged rows'
    flagged = placed.filter(pl.col("comparison_id").is_in(of("flagged")["id"].implode()))
    by_own = flagged.filter(pl.col("comparison_id").is_in(by_j["comparison_id"].implode()))[ROW]
    mask = placed.select(pl.col(ROW).is_in(by_own.implode())
                         | pl.col("annotator_id").is_in(by_a["annotator_id"].implode()).fill_null(False)).to_series()
    dropped = placed.filter(mask)
    reasons = dropped.join(by_j, on="comparison_id", how="left").join(by_a, on="annotator_id", how="left") \
        .select(pl.coalesce("_drop", "_drop_a")).to_series()
    hit = rows.filter(pl.col("comparison_id").is_in(of("changed_j")["id"].implode())
                      | pl.col("annotator_id").is_in(of("changed_a")["id"].implode()))
    return {"dropped": dropped.with_columns(_drop=reasons),
            "annotators": rows.filter(~mask).select(pl.col("annotator_id").unique().sort()),
            "hit": hit.select(pl.col("pair_id").unique().sort()),
            "flagged": flagged.select(ROW, "comparison_id", "pair_id")}


def _scan_run(keys: Broadcast, paths: list[str]) -> State:
    return scan_frame(pl.read_parquet(paths[0], columns=SCAN_COLUMNS, glob=False), keys.read())


@dataclass
class Scan:
    """Every part's scan (:func:`scan_frame`) and the batch's, their places in the union's."""

    dropped: pl.DataFrame
    annotators: pl.Series
    hit: pl.Series
    flagged: pl.DataFrame


def scan(parent: VersionHandle, batch: pl.DataFrame, n_parent_rows: int, flags: pl.DataFrame, changed: pl.DataFrame,
         cfg: SelectConfig, work: Path, client: Any = None) -> Scan:
    """The scan of the parent's parts (tasks) and of ``batch`` (the union's rows after the parent's ``n_parent_rows``)."""
    refs, offsets = parent_refs(parent)
    keys = scan_keys(flags, changed, cfg)
    kb = Broadcast.write(keys, work / "broadcast", "scan")
    step = Step("child-scan", f"{VERSION}-{pl.__version__}-{kb.sha256[:16]}", functools.partial(_scan_run, kb), _concat)
    states = _map(parent, step, refs, work, client)
    mine = scan_frame(batch.select(SCAN_COLUMNS), keys)
    at = [*offsets, n_parent_rows]

    def placed(name: str) -> pl.DataFrame:
        return pl.concat([s[name].with_columns(pl.col(ROW) + o) for s, o in zip([*states, mine], at, strict=True)])

    return Scan(dropped=placed("dropped"),
                annotators=pl.concat([s["annotators"]["annotator_id"] for s in [*states, mine]]).unique(),
                hit=pl.concat([s["hit"]["pair_id"] for s in [*states, mine]]).unique(),
                flagged=placed("flagged"))


def _concat(states: list[State]) -> State:  # pragma: no cover - the driver places each part's rows itself
    raise NotImplementedError("child-scan is reduced by pipeline.parent_rows.scan")


# ---------------------------------------------------------------- rows by pair
def part_rows(path: str, ids: pl.Series, pairs: pl.Series, columns: tuple[str, ...]) -> pl.DataFrame:
    """The rows of a part (its ``ids``: the pair_id column, read) of ``pairs``: their place in the part and the
    ``columns`` it has.  A part without any is not decoded further: a few pairs' rows cost most parts one column
    (1.6 ms a 250k-row part, against 20 ms for the filtered scan of every column)."""
    q = pl.scan_parquet(path, glob=False)
    have = q.collect_schema()
    cols = [c for c in columns if c in have]
    wanted = pairs.implode()
    if not ids.is_in(wanted).any():
        return pl.DataFrame(schema={ROW: pl.Int64, **{c: have[c] for c in cols}})
    return q.with_row_index(ROW).filter(pl.col("pair_id").is_in(wanted)).select(pl.col(ROW).cast(pl.Int64), *cols).collect()


def _rows_run(pairs: Broadcast, columns: tuple[str, ...], counted: Broadcast | None, paths: list[str]) -> State:
    """A part's rows of ``pairs`` (their place in the part, ``columns``) and, of the pairs ``counted`` names, how many
    rows each has here (``counts``)."""
    ids = pl.read_parquet(paths[0], columns=["pair_id"], glob=False)["pair_id"]
    out = {"rows": part_rows(paths[0], ids, pairs.read()["pair_id"], columns)}
    if counted is not None:
        mine = ids.filter(ids.is_in(counted.read()["pair_id"].implode()))
        out["counts"] = mine.to_frame("pair_id").group_by("pair_id").agg(n=pl.len().cast(pl.Int64))
    return out


class PartedSelection(sel.JudgmentSelection):
    """Select's judgments of a child (:class:`pipeline.select.JudgmentSelection`) without its union: the batch's rows
    in memory, the parent's read from its parts by pair when a stage asks for them (:meth:`kept_of`, a task per
    part), kept once read.  ``scan``: where the drops are (:func:`scan`); ``schema``: the union's columns (every
    row read is cast to it; ``prompt_hash`` too, for the leakage check and the report)."""

    def __init__(self, parent: VersionHandle, batch: pl.DataFrame, n_parent_rows: int, found: Scan,
                 schema: dict[str, pl.DataType], columns: list[str], cfg: SelectConfig, flags: pl.DataFrame,
                 work: Path, client: Any = None) -> None:
        _, _, down = sel.drop_rules(flags, cfg)
        super().__init__(rows=pl.DataFrame(), dropped=None,
                         dropped_by_reason=sel.reason_counts(found.dropped["_drop"]), downweighted_annotators=down)
        self.parent, self.work, self.client = parent, work, client
        self.refs, self.offsets = parent_refs(parent)
        self.n_parent_rows, self.found = n_parent_rows, found
        self.schema = {c: schema[c] for c in dict.fromkeys([*columns, "prompt_hash"])}
        self.want = columns
        self.batch = _row_index(batch.select(list(self.schema)), n_parent_rows)
        self.known = self.batch.clear()  # the parent's rows read so far, in union order
        self.read_pairs = pl.Series("pair_id", [], pl.String)
        self.every = False  # every parent row read
        self.without_kept: pl.Series | None = None  # (:meth:`prefetch`)
        self.reads = self.rows_read = 0

    # ------------------------------------------------------------ rows by pair
    def rows_of(self, pairs: pl.Series | None) -> pl.DataFrame:
        """Every row (kept or dropped) of ``pairs`` (None: of every pair), in union order, with :attr:`schema`'s
        columns and the place ``_row``."""
        if pairs is None:
            if not self.every:
                self._read(None)
            return pl.concat([self.known, self.batch])
        pairs = pairs.unique()
        if not self.every:
            self._read(pairs.filter(~pairs.is_in(self.read_pairs.implode())))
        want = pl.col("pair_id").is_in(pairs.implode())
        return pl.concat([self.known.filter(want), self.batch.filter(want)])

    def prefetch(self, pairs: pl.Series, candidates: pl.Series) -> None:
        """One pass for what the final aggregation reads first: the rows of ``pairs`` (the recomputed ones), and
        which of ``candidates`` (the pairs with a dropped judgment) have none kept (:meth:`pairs_without_kept`:
        their rows counted in each part, not read)."""
        pairs, candidates = pairs.unique(), candidates.unique()
        self._read(pairs.filter(~pairs.is_in(self.read_pairs.implode())), candidates)

    def _read(self, pairs: pl.Series | None, counted: pl.Series | None = None) -> None:
        """The parent's rows of ``pairs`` (None: every row), a task per part, added to :attr:`known`; ``counted``: see
        :meth:`prefetch`."""
        if pairs is not None and pairs.len() == 0 and counted is None:
            return
        cols = tuple(self.schema)
        if pairs is None:
            step = Step("child-every-row", f"{VERSION}-{pl.__version__}-{_digest(*cols)}",
                        functools.partial(_every_run, cols), _concat)
        else:
            pb = Broadcast.write(pairs.sort().to_frame("pair_id"), self.work / "broadcast", "pairs")
            cb = Broadcast.write(counted.sort().to_frame("pair_id"), self.work / "broadcast", "counted") \
                if counted is not None else None
            step = Step("child-rows", f"{VERSION}-{pl.__version__}-{_digest(pb.sha256, cb.sha256 if cb else '', *cols)}",
                        functools.partial(_rows_run, pb, cols, cb), _concat)
        states = _map(self.parent, step, self.refs, self.work, self.client)
        if counted is not None:
            self._no_kept(counted, [s.pop("counts") for s in states])
        got = [self._typed(s["rows"].with_columns(pl.col(ROW) + o)) for s, o in zip(states, self.offsets, strict=True)]
        del states
        got = [g for g in got if g.height]
        self.reads += 1
        self.rows_read += sum(g.height for g in got)
        if pairs is None:  # (every row: those read before among them)
            self.known, self.every = (pl.concat(got) if got else self.known.clear()), True
        elif got:
            self.known = pl.concat([self.known, *got]).sort(ROW)
        if pairs is not None:
            self.read_pairs = pl.concat([self.read_pairs, pairs])

    def _no_kept(self, candidates: pl.Series, counts: list[pl.DataFrame]) -> None:
        """The candidates all of whose rows (the parent's: ``counts``, per part; the batch's) are dropped."""
        mine = self.batch.filter(pl.col("pair_id").is_in(candidates.implode())).group_by("pair_id").agg(n=pl.len().cast(pl.Int64))
        rows = pl.concat([*counts, mine]).group_by("pair_id").agg(pl.col("n").sum())
        dropped = self.found.dropped.group_by("pair_id").agg(d=pl.len().cast(pl.Int64))
        self.without_kept = rows.join(dropped, on="pair_id").filter(pl.col("n") == pl.col("d"))["pair_id"].sort()

    def _typed(self, rows: pl.DataFrame) -> pl.DataFrame:
        """A part's rows with the union's columns and types (a column a parent written before it existed: null)."""
        made = [pl.lit(None, self.schema[c]).alias(c) for c in self.schema if c not in rows.columns]
        return rows.with_columns(made).select(ROW, *(pl.col(c).cast(t) for c, t in self.schema.items()))

    # ------------------------------------------------------------ JudgmentSelection
    def _kept(self, rows: pl.DataFrame, columns: list[str] | None) -> pl.DataFrame:
        rows = rows.filter(~pl.col(ROW).is_in(self.found.dropped[ROW].implode())) if self.found.dropped.height else rows
        return rows.select(columns if columns is not None else self.want)

    def kept_of(self, pairs: pl.Series, columns: list[str] | None = None) -> pl.DataFrame:
        return self._kept(self.rows_of(pairs), columns)

    def kept_rows(self, where: pl.Expr | None = None, columns: list[str] | None = None) -> pl.DataFrame:
        rows = self.rows_of(None)  # (any filter: every row, as the union would have them)
        return self._kept(rows.filter(where) if where is not None else rows, columns)

    def pairs_without_kept(self) -> pl.Series:
        if self.without_kept is not None:
            return self.without_kept
        cand = self.found.dropped["pair_id"].unique()
        if cand.len() == 0:
            return cand
        rows = self.rows_of(cand).select("pair_id", _dropped=pl.col(ROW).is_in(self.found.dropped[ROW].implode()))
        return rows.group_by("pair_id").agg(pl.col("_dropped").all()).filter(pl.col("_dropped"))["pair_id"]

    def kept_annotators(self, step: int = 1 << 20) -> pl.Series:  # noqa: ARG002 - one signature
        return self.found.annotators

    def dropped_ids(self) -> pl.Series:
        return self.found.dropped.sort(ROW)["comparison_id"]


def _every_run(columns: tuple[str, ...], paths: list[str]) -> State:
    q = pl.scan_parquet(paths[0], glob=False)
    have = q.collect_schema().names()
    return {"rows": q.with_row_index(ROW).select(pl.col(ROW).cast(pl.Int64), *(c for c in columns if c in have)).collect()}



# ---------------------------------------------------------------- before the checks: the rows near the batch
def _near_run(keys: Broadcast, columns: tuple[str, ...], first: bool, paths: list[str]) -> State:
    """A part's rows (their place, ``columns``) of the pairs, prompts and annotators ``keys`` names; ``first``: also
    every review row, the comparison ids among ``keys``' ids (``repeated``) and the part's dimension verdicts."""
    k = keys.read()
    q = pl.scan_parquet(paths[0], glob=False)
    have = q.collect_schema().names()

    def of(kind: str) -> pl.Series:
        return k.filter(pl.col("kind") == kind)["value"]

    # (only the keys given: a look-up in an empty set still decodes its column, ~12 ms a 250k-row part)
    tests = [pl.col(col).is_in(v.implode()) for col, v in (("pair_id", of("pair")), ("prompt_hash", of("prompt")),
                                                          ("annotator_id", of("annotator"))) if v.len()]
    if first and "review_of" in have:
        tests.append(pl.col("review_of").is_not_null())
    near = pl.any_horizontal(tests) if tests else pl.lit(False)
    rows = q.with_row_index(ROW).filter(near).select(pl.col(ROW).cast(pl.Int64), *(c for c in columns if c in have))
    if not first:
        return {"rows": rows.collect()}
    repeated = q.select("comparison_id").filter(pl.col("comparison_id").is_in(of("id").implode()))
    dims = q.select(n=pl.col("dimensions").is_not_null().sum().cast(pl.Int64)) if "dimensions" in have \
        else pl.LazyFrame({"n": [0]}, schema={"n": pl.Int64})
    got, rep, nd = pl.collect_all([rows, repeated, dims])
    return {"rows": got, "repeated": rep, "facts": nd}


def _keys(**kinds: pl.Series | None) -> pl.DataFrame:
    frames = [pl.DataFrame({"kind": kind, "value": v.drop_nulls().unique().sort()}, schema={"kind": pl.String, "value": pl.String})
              for kind, v in kinds.items() if v is not None]
    return pl.concat(frames)


class ParentUnion:
    """The parent's rows a child's stages before the checks read -- those of the batch's pairs and prompts, every
    review and the pairs reviews name, and what the touched pairs' closure and the checks' sums ask for later
    (:meth:`load`) -- in union order, instead of every parent row.  Found by a task per part (``child-near``), which
    also gives the batch's comparison ids the parent has (``repeated``) and the parent's dimension verdicts."""

    def __init__(self, parent: VersionHandle, batch: pl.DataFrame, columns: list[str], work: Path, client: Any = None
                 ) -> None:
        self.parent, self.work, self.client, self.columns = parent, work, client, columns
        self.refs, self.offsets = parent_refs(parent)
        table = parent.table(JUDGMENT_ROWS)
        assert table is not None
        self.n_parent = sum(p.rows for p in table.parts)
        self.pairs, self.prompts = batch["pair_id"].unique(), batch["prompt_hash"].unique()
        self.annotators = pl.Series("annotator_id", [], pl.String)
        states = self._scan(_keys(id=batch["comparison_id"], pair=self.pairs, prompt=self.prompts), True)
        self.repeated = pl.concat([s["repeated"] for s in states])["comparison_id"]
        self.dimension_verdicts = int(sum(s["facts"]["n"][0] for s in states))
        self.rows = self._placed(states)
        self.passes = 1  # the scans of the parts (each a task per part)
        # the pairs reviews name (a review's status reads whether its pair has judgments)
        targets = self.rows["review_of"].drop_nulls() if "review_of" in self.rows.columns else None
        more = pl.concat([x for x in (targets, batch["review_of"].drop_nulls() if "review_of" in batch.columns else None)
                          if x is not None]) if targets is not None or "review_of" in batch.columns else None
        if more is not None and more.len():
            self.load(pairs=more)

    def _scan(self, keys: pl.DataFrame, first: bool) -> list[State]:
        kb = Broadcast.write(keys, self.work / "broadcast", "near")
        cols = tuple(dict.fromkeys([*self.columns, "review_of"]))
        step = Step("child-near-first" if first else "child-near", f"{VERSION}-{pl.__version__}-{_digest(kb.sha256, *cols)}",
                    functools.partial(_near_run, kb, cols, first), _concat)
        return _map(self.parent, step, self.refs, self.work, self.client)

    def _placed(self, states: list[State]) -> pl.DataFrame:
        got = [s["rows"].with_columns(pl.col(ROW) + o) for s, o in zip(states, self.offsets, strict=True)]
        frame = pl.concat(got, how="diagonal_relaxed")
        if "review_of" not in frame.columns:  # (a parent written before reviews were a field)
            frame = frame.with_columns(review_of=pl.lit(None, pl.String))
        return frame.select(ROW, *self.columns)

    def load(self, pairs: pl.Series | None = None, prompts: pl.Series | None = None,
             annotators: pl.Series | None = None) -> bool:
        """The parent's rows of these pairs, prompts, annotators added (those loaded before not read again); whether
        any key was new."""
        def new(v: pl.Series | None, have: pl.Series) -> pl.Series | None:
            if v is None:
                return None
            v = v.drop_nulls().unique()
            return v.filter(~v.is_in(have.implode()))

        p, q, a = new(pairs, self.pairs), new(prompts, self.prompts), new(annotators, self.annotators)
        if all(x is None or x.len() == 0 for x in (p, q, a)):
            return False
        got = self._placed(self._scan(_keys(pair=p, prompt=q, annotator=a), False))
        self.passes += 1
        got = got.filter(~pl.col(ROW).is_in(self.rows[ROW].implode()))
        self.rows = pl.concat([self.rows, got], how="vertical_relaxed").sort(ROW)
        self.pairs = pl.concat([self.pairs, *(x for x in (p,) if x is not None)]).unique()
        self.prompts = pl.concat([self.prompts, *(x for x in (q,) if x is not None)]).unique()
        self.annotators = pl.concat([self.annotators, *(x for x in (a,) if x is not None)]).unique()
        return True

    def union(self, tail: pl.DataFrame) -> tuple[pl.DataFrame, int]:
        """(the parent's rows loaded, then ``tail`` -- the union's rows after the parent's --, how many are the
        parent's)."""
        old = self.rows.drop(ROW)
        return pl.concat([old, tail.select(old.columns)], how="vertical_relaxed"), old.height

    def wide(self, batch: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
        """Every column of the parent's rows of the batch's pairs and prompts (from the judgments' parts that hold
        them, verified, each filtered by the scan: the other rows' texts are not decoded)."""
        near = pl.col("pair_id").is_in(batch["pair_id"].unique().implode()) \
            | pl.col("prompt_hash").is_in(batch["prompt_hash"].unique().implode())
        hit = self.rows.filter(near)[ROW]
        full = self.parent.table("judgments")
        assert full is not None
        import numpy as np

        parts = sorted(set(np.searchsorted(np.asarray(self.offsets), hit.to_numpy(), side="right") - 1)) if hit.len() else []
        from pipeline.incremental import _with_columns

        frames = [_with_columns(self.parent.read(full.parts[i].path, where=near), columns) for i in parts]
        return pl.concat(frames, how="vertical_relaxed") if frames else batch.clear().select(columns)
