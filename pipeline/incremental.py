"""A child version's checks over the pairs its batch touches, merged with its parent's results.

The pair-scoped checks whose result for a pair depends only on that pair's own judgments
(``PAIR_SCOPED``: exact duplicates and identical responses, pair-id conflicts, language) are
not run again over the whole history: a child runs them over the judgments of the *touched*
pairs -- the pairs of its new judgments, and the parent's pairs that share a prompt and
response set with one of them (an exact duplicate or a pair-id conflict can reach across
pair ids) -- and merges:

* flags: the parent's flags of that check whose subject is not touched, plus the new ones;
* the check's state table (``state/<check>``, one row per flagged or profiled subject, kept
  in the version as generation parts like the pair tables), the same way;
* metrics: the check's ``summarize`` over the merged state and flags, with the version's
  judgment and pair counts.

The result equals a run over the parent's judgments plus the batch (``tests/test_incremental.py``
checks it on random chains), except the language check's run counters (``distinct_texts``,
``langdetect_calls``, ``langdetect_skipped``: this run's work) and where the langdetect cap
(``checks.language.max_langdetect`` texts per run) binds: a child spends its budget on its own
texts, where a run over everything would spend it on the longest texts of the whole history.

Near duplicates run through their own state tables (:func:`near_duplicates`,
:mod:`pipeline.checks.near_duplicates_state`): only the batch's new prompts are hashed.
Checks whose result for a pair depends on other pairs through the consensus and the annotator
statistics (agreement, reliability, bias, routing, consensus) still run over the whole union.

The consensus rule of a child (:func:`pairs_to_recompute`, :func:`with_parent_pairs`): a pair
keeps its parent's consensus unless its judgments, its judgments' flags or the status of one
of its annotators changed; docs/incremental.md gives the rule and the bound it records.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from pipeline.checks import duplicates, language, pair_id_conflict
from pipeline.checks.agreement import ratings
from pipeline.checks import near_duplicates_state as nds
from pipeline.aggregate import PAIR_TEXT_COLUMNS as _TEXT_COLUMNS
from pipeline.aggregate import Aggregation
from pipeline.checks.spec import Child, Sums
from pipeline.parts import parent_keys
from pipeline.store import DamagedVersion, VersionHandle
from schemas.version import code_version
from schemas.check import CheckResult, empty_flags
from schemas.policy import AggregationConfig, ChecksConfig, DimensionsConfig

STATE_PREFIX = "state/"


@dataclass(frozen=True)
class PairScoped:
    """How a pair-scoped check is run on touched pairs and merged: its state table, the columns
    that say which pair a state row belongs to, and how to rebuild the result."""

    name: str
    table: str  # key of CheckResult.tables holding the state rows (each with a pair_id column)
    summarize: Callable[[pl.DataFrame, pl.DataFrame, "Totals"], CheckResult]
    # the figures from the parent's (its manifest's) and the touched pairs' old and new state rows,
    # without reading the merged state: (parent metrics, old rows, new rows, the merged state when
    # it must be read after all, flags); the result's table is the new rows unless it was read
    delta: Callable[[dict, pl.DataFrame, pl.DataFrame, Callable[[], pl.DataFrame], pl.DataFrame], CheckResult] | None = None
    # the figures from the parent's state rows but the touched pairs', given one part at a time with ``columns``
    # (a pair's rows are in one part), and the touched pairs' rows now: (parts, new rows, flags) -> the result, whose
    # table is the new rows.  Where ``delta`` cannot take the parent's figures (another code made them), the merged
    # table is not held (a 10M-judgment version's language rows: 9.5M, ~1.3 GB)
    parts: Callable[[Iterable[pl.DataFrame], pl.DataFrame, pl.DataFrame], CheckResult] | None = None
    columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Totals:
    judgments: int
    pairs: int


PAIR_SCOPED: dict[str, PairScoped] = {
    "duplicates": PairScoped("duplicates", "exact_duplicates",
                             lambda state, flags, t: duplicates.summarize(state, flags, t.judgments, t.pairs)),
    "pair_id_conflict": PairScoped("pair_id_conflict", "conflicts",
                                   lambda state, flags, t: pair_id_conflict.summarize(state, flags)),
    "language": PairScoped("language", "texts", lambda state, flags, t: language.summarize(state, flags, {}),
                           delta=language.summarize_delta, parts=language.summarize_parts, columns=language.TALLY_COLUMNS),
}
RUNNERS = {"duplicates": duplicates.run, "pair_id_conflict": pair_id_conflict.run, "language": language.run}


def state_table(name: str) -> str:
    return f"{STATE_PREFIX}{name}"


def touched_pairs(judgments: pl.DataFrame, n_parent_rows: int,
                  complete: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> pl.Series:
    """Pair ids the batch touches: those of the judgments after the parent's rows, and every pair
    with a judgment of the same prompt and response set as a judgment of a touched pair (closed
    under that relation: an old pair judged again brings the pairs its old judgments duplicate).
    ``complete``: gives the rows it keys their response hashes when ``judgments`` lacks them (:data:`DEFERRED`)."""
    lo, hi = pl.min_horizontal("a_hash", "b_hash"), pl.max_horizontal("a_hash", "b_hash")
    on = ["prompt_hash", "_lo", "_hi"]
    held = "a_hash" in judgments.columns

    def keyed(where: pl.Expr) -> pl.DataFrame:  # the rows it selects with their key (only theirs computed:
        # the keys of all 3M rows of a 3M union took ~0.5 GB)
        if held or complete is None:
            return judgments.lazy().filter(where).select("pair_id", "prompt_hash", _lo=lo, _hi=hi).collect()
        rows = complete(judgments.lazy().filter(where).select("comparison_id", "pair_id", "prompt_hash").collect())
        return rows.select("pair_id", "prompt_hash", _lo=lo, _hi=hi)

    pairs = judgments.slice(n_parent_rows)["pair_id"].unique()
    rows = keyed(pl.col("pair_id").is_in(pairs.implode()))  # every row of the pairs so far
    while True:
        keys = rows.select(on).unique()
        hit = keyed(pl.col("prompt_hash").is_in(keys["prompt_hash"].unique().implode())).join(keys, on=on, how="semi")
        grown = hit["pair_id"].unique()
        if grown.len() == pairs.len():  # grown contains pairs: equal sizes, equal sets
            return pairs.sort()
        pairs = grown
        rows = keyed(pl.col("pair_id").is_in(pairs.implode()))


# ---------------------------------------------------------------- a child without the history's texts
# the judgments' texts: ~75 % of their bytes.  A child reads its parent's judgments without them and
# takes them only for the rows of the pairs its batch touches (docs/incremental.md, "Session 12")
WIDE_COLUMNS = ("prompt", "prompt_text", "response_a", "response_b")
# ... and what no stage of a child reads of the rows it does not hydrate (provenance: the
# duplicate check's tie-breaks read it from the hydrated rows)
NARROW_DROP = (*WIDE_COLUMNS, "batch_id", "source_file", "source_line", "model_version_a", "model_version_b", "extra")


JUDGMENT_ROWS = "state/judgment_rows"  # the judgments without NARROW_DROP, in the same parts (what a child reads of every row)


def judgment_rows(frame: pl.DataFrame) -> pl.DataFrame:
    """The columns of judgments a child reads of every row (:data:`JUDGMENT_ROWS`)."""
    return frame.drop(NARROW_DROP, strict=False)


def _narrow_sources(parent: VersionHandle) -> Iterator[tuple[str, bytes, str | None]]:
    """(part name, verified bytes, the judgments part of the same rows or None) of the table a
    child reads every row of: :data:`JUDGMENT_ROWS` when its parts hold the judgments' rows part for
    part (~15 % of their bytes to hash), else the judgments themselves."""
    rows, full = parent.table(JUDGMENT_ROWS), parent.table("judgments")
    if rows is not None and full is not None and [p.rows for p in rows.parts] == [p.rows for p in full.parts]:
        for (name, data), part in zip(parent.read_parts(JUDGMENT_ROWS), full.parts, strict=True):
            yield name, data, part.path
    else:
        for name, data in parent.read_parts("judgments"):
            yield name, data, None


def read_parent_narrow(parent: VersionHandle, columns: list[str], batch: pl.DataFrame, defer: Collection[str] = ()
                       ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One read of the parent's judgments for a child: every row without :data:`NARROW_DROP`
    (from :data:`JUDGMENT_ROWS` when the parent has it), and every column of the rows that may
    belong to the pairs the batch touches (those of its pairs or prompts: a superset of
    :func:`touched_pairs` but for given pair ids whose texts conflict, which :func:`hydrate` reads
    again) -- the judgments' parts are read only when such rows are in them.  A column null in
    every row of a part is made, not decoded (a null column costs no memory; a decoded one 16
    bytes a row).  ``defer``: columns left out of every row too (:class:`Completer`)."""
    want = [c for c in columns if c not in NARROW_DROP and c not in defer]
    near = pl.col("pair_id").is_in(batch["pair_id"].unique().implode()) \
        | pl.col("prompt_hash").is_in(batch["prompt_hash"].unique().implode())
    narrow, wide = [], []
    for name, data, full in _narrow_sources(parent):
        with parent.parsing(name):
            schema = pl.read_parquet_schema(io.BytesIO(data))
            null = _null_columns(pq.read_metadata(io.BytesIO(data)))
            part = pl.read_parquet(io.BytesIO(data), columns=[c for c in want if c in schema and c not in null])
            # the near rows' full columns: a second scan, unless the narrow rows show there are none (a batch
            # of new pairs and prompts: the scan decoded the texts' pages for nothing, 0.6 s at 3M)
            some = not {"pair_id", "prompt_hash"} <= set(part.columns) or bool(part.select(near.any()).item())
            if some and full is not None:
                near_rows = parent.read(full, where=near)
            elif some:
                near_rows = pl.scan_parquet(io.BytesIO(data)).filter(near).collect()
            else:  # none: the columns the judgments have (the dropped ones typed as the batch's)
                near_rows = pl.DataFrame(schema={**{c: batch.schema[c] for c in columns if c in NARROW_DROP}, **schema}
                                         if full is not None else schema)
        del data
        if any(c not in schema and c != "review_of" and (full is None or c not in NARROW_DROP) for c in columns):
            raise DamagedVersion(f"{parent.path / name}: lacks a judgment column ({sorted(set(columns) - set(schema))})")
        # review_of: an older parent
        made = [_nulls(c, schema.get(c, pl.String), part) for c in want if c not in part.columns]
        narrow.append(part.with_columns(made).select(want))
        wide.append(_with_columns(near_rows, columns))
    return (narrow[0] if len(narrow) == 1 else pl.concat(narrow, how="vertical_relaxed"),
            wide[0] if len(wide) == 1 else pl.concat(wide, how="vertical_relaxed"))


# the judgments' columns a child holds for the rows of the pairs it aggregates or selects only, not for every row
# of its history (~0.2 GB at 3M judgments): the stages that read them take those rows through a Completer
# (the response hashes: ~64 B a row; the touched pairs' keys, a review's content and the consensus's orientation
# read them, of a few rows.  Labels, judge kinds, locales and times: ~56 B a row; the routing check takes the
# judgments per label from the report's counts -- the parent's plus the batch's -- and the registry check reads
# nothing without a registry)
DEFERRED = ("model_a", "model_b", "shown_first", "strength", "confidence", "tags", "a_hash", "b_hash",
            "label", "annotator_kind", "locale", "created_at")


class Completer:
    """rows of a child's union without :data:`DEFERRED` -> the same rows, in the same order, with
    them: the batch's values from ``batch`` (every column, the rows the union added), the parent's
    read from its :data:`JUDGMENT_ROWS` parts by comparison id (a filtered scan: only those rows'
    values are decoded) and kept for the next call, so that a parent row is read once and a call
    whose rows are the batch's or known reads nothing.  ``order``: the union's columns with the
    deferred ones in their places.  Rows that have them already are returned as they are."""

    def __init__(self, parent: VersionHandle, batch: pl.DataFrame, order: list[str], near: pl.DataFrame | None = None
                 ) -> None:
        self.parent, self.order = parent, order
        self.columns = tuple(c for c in DEFERRED if c in order)
        self.schema = {"comparison_id": pl.String, **{c: batch.schema[c] for c in self.columns}}
        self.batch = batch.select(list(self.schema))
        # the parent's rows read so far: first those it read whole (``near``: :func:`read_parent_narrow`'s rows of
        # the batch's pairs and prompts, the rows the touched pairs' keys read)
        self.known = pl.DataFrame(schema=self.schema) if near is None else \
            near.select(list(self.schema)).cast(self.schema).unique("comparison_id")  # type: ignore[arg-type]
        self.reads = self.rows_read = 0

    def __call__(self, rows: pl.DataFrame) -> pl.DataFrame:
        missing = [c for c in self.columns if c not in rows.columns]
        if not missing:
            return rows
        ids = rows["comparison_id"].unique()
        new = ids.filter(~ids.is_in(self.batch["comparison_id"].implode()) & ~ids.is_in(self.known["comparison_id"].implode()))
        if new.len():
            old = self.parent.read(JUDGMENT_ROWS, columns=list(self.schema), where=pl.col("comparison_id").is_in(new.implode()))
            if old.height != new.len():
                raise DamagedVersion(f"{self.parent.path}: {new.len()} of the union's comparison ids are read from its "
                                     f"judgments, {old.height} rows found")
            self.reads, self.rows_read = self.reads + 1, self.rows_read + old.height
            self.known = pl.concat([self.known, old.cast(self.schema)])  # type: ignore[arg-type]
        want = pl.col("comparison_id").is_in(ids.implode())
        src = pl.concat([self.known.filter(want), self.batch.filter(want)]).select("comparison_id", *missing)
        out = rows.join(src, on="comparison_id", how="left", maintain_order="left")
        return out.select([c for c in self.order if c in out.columns] + [c for c in out.columns if c not in self.order])


def defers(parent: VersionHandle) -> bool:
    """A child can leave :data:`DEFERRED` unread for its parent's rows: the parent keeps
    :data:`JUDGMENT_ROWS` in the parts of its judgments (the table a :class:`Completer` reads and
    the child appends its batch's rows to)."""
    rows, full = parent.table(JUDGMENT_ROWS), parent.table("judgments")
    return rows is not None and full is not None and [p.rows for p in rows.parts] == [p.rows for p in full.parts]


def _nulls(name: str, dtype: pl.DataType, like: pl.DataFrame) -> pl.Series:
    """A null column for ``like``, chunked as its columns are (:func:`aligned`)."""
    empty = pl.repeat(None, like.height, dtype=dtype, eager=True).alias(name)
    return _chunked(empty, like.to_series(0).chunk_lengths()) if like.width else empty


def _chunked(series: pl.Series, lengths: list[int]) -> pl.Series:
    """``series`` in chunks of ``lengths`` (slices: no copy when it is one chunk)."""
    if series.chunk_lengths() == lengths:
        return series
    series = series.rechunk() if series.n_chunks() > 1 else series
    start, chunks = 0, []
    for n in lengths:
        chunks.append(series.slice(start, n))
        start += n
    return pl.concat(chunks, rechunk=False) if len(chunks) > 1 else series


def aligned(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with every column in the chunks of its first one.  Polars evaluates an expression
    on a frame whose columns are chunked differently by first copying the whole frame into one
    chunk (the 3M union: ~0.9 GB, again at each such expression); a column replaced after the
    union was read (a review's pair id) is chunked as the others instead (a copy of that column)."""
    if not frame.width:
        return frame
    lengths = frame.to_series(0).chunk_lengths()
    odd = [c for c in frame.columns[1:] if frame[c].chunk_lengths() != lengths]
    return frame.with_columns(_chunked(frame[c], lengths) for c in odd) if odd else frame


def _null_columns(meta: pq.FileMetaData) -> set[str]:
    """The top-level columns whose statistics say every row is null, in every row group."""
    out: set[str] | None = None
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        nulls = set()
        for j in range(rg.num_columns):
            col = rg.column(j)
            st = col.statistics
            if "." not in col.path_in_schema and st is not None and st.has_null_count and st.null_count == rg.num_rows:
                nulls.add(col.path_in_schema)
        out = nulls if out is None else out & nulls
    return out or set()


def _with_columns(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """``frame`` with ``columns`` (``review_of`` null when a parent written before reviews were a field lacks it)."""
    if "review_of" in columns and "review_of" not in frame.columns:
        frame = frame.with_columns(review_of=pl.lit(None, pl.String))
    return frame.select(columns)


def narrow_applies(parent: VersionHandle) -> bool:
    """The parent keeps what a child needs to leave the history's texts unread: its judgments as a
    table, the pair-scoped state and the preliminary consensus with the pairs' lengths."""
    if parent.table("judgments") is None or not has_state(parent) or not has_preliminary(parent):
        return False
    first = parent.table(PRELIM_TABLE).parts[0].path  # type: ignore[union-attr]
    return {"len_a", "len_b"} <= set(pl.read_parquet_schema(io.BytesIO(parent.read_bytes(first))))


@dataclass
class Hydrated:
    """The rows of the pairs a child's batch touches (:func:`touched_pairs`), texts included: the
    parent's rows of those pairs (``n_parent_rows`` of them, first) and the batch's, in the order
    of the union."""

    pairs: pl.Series
    rows: pl.DataFrame
    n_parent_rows: int
    read_again: bool = False  # the parent's rows near the batch lacked some: they were read again


def hydrate(judgments: pl.DataFrame, n_parent_rows: int, parent: VersionHandle, batch: pl.DataFrame,
            near: pl.DataFrame, complete: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> Hydrated:
    """``judgments``: the union without :data:`NARROW_DROP`; ``batch``: its rows after the
    parent's, with every column; ``near``: the parent's rows :func:`read_parent_narrow` read whole.
    The parent's rows of the touched pairs are taken from ``near`` when it holds all of them (they
    are counted in the union), else read again (a filtered read: the other rows' texts are not decoded)."""
    pairs = touched_pairs(judgments, n_parent_rows, complete)
    mine = pl.col("pair_id").is_in(pairs.implode())
    old = near.filter(mine)
    again = old.height != judgments.slice(0, n_parent_rows).select(mine.sum()).item()
    if again:
        old = parent_judgments(parent, mine, batch.columns)
    return Hydrated(pairs, pl.concat([old.cast(batch.schema), batch]), old.height, again)  # type: ignore[arg-type]


def parent_judgments(parent: VersionHandle, where: pl.Expr | None, columns: list[str]) -> pl.DataFrame:
    """The parent's judgments (``where``: only the rows it selects) with ``columns`` (``review_of``
    null when a parent written before reviews were a field lacks it)."""
    return _with_columns(parent.read("judgments", where=where), columns)


class TextsSource:
    """pair ids -> their :func:`first_texts` as the union would give them, for a child that did not
    read the history's texts: the touched pairs' from the hydrated rows, any other pair's (all its
    judgments are the parent's) from a filtered read of the parent's judgments, kept for the next
    call (``reads``, ``pairs_read`` count them).  None: every pair (not what a child under the rule
    asks for: it reads every text)."""

    COLUMNS = ("pair_id", *_TEXT_COLUMNS, "a_hash")

    def __init__(self, hydrated: Hydrated, parent: VersionHandle) -> None:
        self.known, self.parent, self.reads, self.pairs_read = first_texts(hydrated.rows), parent, 0, 0

    def _read(self, where: pl.Expr) -> pl.DataFrame:
        got = first_texts(parent_judgments(self.parent, where, list(self.COLUMNS)))
        self.reads, self.pairs_read = self.reads + 1, self.pairs_read + got.height
        self.known = pl.concat([self.known, got])
        return got

    def __call__(self, pairs: pl.Series | None) -> pl.DataFrame:
        if pairs is None:
            self._read(~pl.col("pair_id").is_in(self.known["pair_id"].implode()))
            return self.known
        ids = pairs.implode()
        have = self.known.filter(pl.col("pair_id").is_in(ids))
        if have.height == pairs.n_unique():
            return have
        got = self._read(pl.col("pair_id").is_in(ids) & ~pl.col("pair_id").is_in(have["pair_id"].implode()))
        return pl.concat([have, got])


def has_state(parent: VersionHandle | None) -> bool:
    return parent is not None and all(parent.table(state_table(n)) is not None for n in PAIR_SCOPED)


def run_touched(judgments: pl.DataFrame, n_parent_rows: int, parent: VersionHandle, cfg: ChecksConfig,
                totals: Totals, parent_flags: pl.DataFrame | None = None,
                hydrated: Hydrated | None = None, first: pl.DataFrame | None = None
                ) -> tuple[dict[str, CheckResult], pl.Series, set[str]]:
    """The pair-scoped checks of a child: run over the touched pairs, merged with the parent's.
    Returns the results, the touched pairs (every other pair's state rows are the parent's) and
    the checks whose state table in the result holds the touched pairs' rows only: those whose
    figures come from the parent's and the touched rows (``PairScoped.delta``) never read the rest
    (``language``: a row per text, 2.9M at 3M judgments); :func:`merged_state` gives the whole table.
    ``hydrated``: the touched pairs' rows with their texts, when ``judgments`` has none (:func:`hydrate`).
    ``first``: pair_id -> first_version of (at least) the touched pairs: their rows are read from the
    parts that hold them only (:func:`pipeline.parts.parent_keys`; a new pair's are in none)."""
    if hydrated is not None:
        touched, jt = hydrated.pairs, hydrated.rows
    else:
        touched = touched_pairs(judgments, n_parent_rows)
        jt = judgments.filter(pl.col("pair_id").is_in(touched.implode()))
    touched_judgments = jt["comparison_id"]
    if parent_flags is None:
        parent_flags = parent.read("flags.parquet")
    out, partial = {}, set()
    pm = parent.manifest()
    same_code = pm.code_version == code_version()
    mine = pl.col("pair_id").is_in(touched.implode())
    for name, spec in PAIR_SCOPED.items():
        res = RUNNERS[name](jt, cfg)
        old_flags = parent_flags.filter(pl.col("check") == name)
        keep = ~((pl.col("subject_kind") == "pair") & pl.col("subject_id").is_in(touched.implode())
                 | (pl.col("subject_kind") == "judgment") & pl.col("subject_id").is_in(touched_judgments.implode()))
        flags = pl.concat([old_flags.filter(keep), res.flags]) if res.flags.height else old_flags.filter(keep)
        flags = flags if flags.height else empty_flags()
        new_state = res.tables.get(spec.table)
        if spec.delta is not None and same_code:  # the parent's figures mean what this code computes
            # the touched pairs' rows only, from the parts that hold them (every part without ``first``)
            keys = None if first is None else \
                parent_keys(parent, first.join(touched.to_frame("pair_id"), on="pair_id", how="semi"))["_part"].unique().to_list()
            old = parent.read(state_table(name), where=mine, keys=keys)
            new_rows = new_state.select(old.columns) if new_state is not None else old.clear()
            asked: list[bool] = []

            def whole(name: str = name, rows: pl.DataFrame = new_rows) -> pl.DataFrame:
                asked.append(True)
                return merged_state(parent, name, touched, rows)

            merged = spec.delta(pm.check(name).metrics, old, new_rows, whole, flags)
            if not asked:  # the result's table holds the touched pairs' rows
                partial.add(name)
        elif spec.parts is not None:  # the parent's rows counted part by part; the result's table: the touched pairs'
            columns = parent.read(state_table(name), keys=()).columns
            new_rows = new_state.select(columns) if new_state is not None else pl.DataFrame(schema=dict.fromkeys(columns, pl.String))
            merged = spec.parts(untouched_rows(parent, name, touched, list(spec.columns)), new_rows, flags)
            partial.add(name)
        else:
            merged = spec.summarize(merged_state(parent, name, touched, new_state), flags, totals)
        merged.metrics["incremental"] = {"touched_pairs": touched.len(), "touched_judgments": jt.height}
        out[name] = merged
    return out, touched, partial


def untouched_rows(parent: VersionHandle, name: str, touched: pl.Series, columns: list[str]) -> Iterator[pl.DataFrame]:
    """A pair-scoped check's state rows in the parent but the touched pairs', ``columns`` of them, one part at a time
    (every part verified; only the rows kept are decoded)."""
    mine = pl.col("pair_id").is_in(touched.implode())
    for part, data in parent.read_parts(state_table(name)):
        with parent.parsing(part):
            rows = pl.scan_parquet(io.BytesIO(data)).select(columns).filter(~mine).collect()
        del data
        yield rows


def merged_state(parent: VersionHandle, name: str, touched: pl.Series, rows: pl.DataFrame | None) -> pl.DataFrame:
    """A pair-scoped check's whole state table in a child: the parent's rows but the touched
    pairs', then ``rows`` (the touched pairs' rows now)."""
    old = parent.read(state_table(name))
    state = old.filter(~pl.col("pair_id").is_in(touched.implode()))
    if rows is not None and rows.height:
        state = pl.concat([state, rows.select(state.columns)], how="vertical_relaxed")
    return state


def near_duplicates(judgments: pl.DataFrame, parent: VersionHandle | None, cfg: ChecksConfig, *, version_id: str,
                    n_parent_rows: int | None, parent_flags: pl.DataFrame | None = None,
                    state: Future[nds.NearDupState] | None = None) -> tuple[CheckResult, nds.IncrementalResult]:
    """The near-duplicate check of a version through its state tables
    (:mod:`pipeline.checks.near_duplicates_state`).

    ``n_parent_rows``: the union starts with that many judgments of the parent, whose state is
    extended with the rest (only new prompts hashed); None: no usable parent state (a first
    version, ``curate --full``, a parent whose judgments are not the union's first rows) -- the
    state is built from every judgment.  ``state``: :func:`~pipeline.checks.near_duplicates_state.load_state`
    of the parent, started earlier (its result, or its error, is taken here).  Returns the check's entry for the version (flags of
    every pair, the ``clusters`` table of every pair) and the run, whose
    :meth:`~pipeline.checks.near_duplicates_state.IncrementalResult.write_state` writes the tables."""
    if n_parent_rows is None or parent is None:
        res = nds.run_incremental(judgments, nds.NearDupState.empty(cfg), generation=version_id)
        flags = res.flags
    else:
        loaded = state.result() if state is not None else nds.load_state(parent, cfg)
        res = nds.run_incremental(judgments.slice(n_parent_rows), loaded, generation=version_id)
        del loaded
        pf = parent.read("flags.parquet") if parent_flags is None else parent_flags
        flags = nds.merge_flags(pf.filter(pl.col("check") == nds.nd.NAME), res)
    entry = res.check_result()
    entry = CheckResult(name=entry.name, status=entry.status, metrics=entry.metrics, summary=entry.summary,
                        flags=flags if flags.height else empty_flags(),
                        tables={"clusters": res.all_clusters(), "graph_clusters": res.graph_clusters().to_frame()})
    res.release()  # the parent's bands and sketches: the build writes the state parts at its end
    return entry, res


# ---------------------------------------------------------------- the consensus rule of a child
def pairs_to_recompute(judgments: pl.DataFrame, n_parent_rows: int, parent_flags: pl.DataFrame,
                       flags: pl.DataFrame) -> pl.Series:
    """The pairs whose consensus a child takes from its own aggregation (the others keep their
    parent's row, :func:`with_parent_pairs`): the pairs of its new judgments, the pairs of every
    judgment whose judgment-level flags changed, and every pair an annotator whose status changed
    judged (status: the set of the annotator's flag reasons -- flagged / unflagged, dropped /
    downweighted all change it).  ``judgments``: the union, the parent's ``n_parent_rows`` first."""
    def changed(kind: str) -> pl.Series:
        a, b = (f.filter(pl.col("subject_kind") == kind).select("subject_id", "reason").unique() for f in (parent_flags, flags))
        return pl.concat([a.join(b, on=["subject_id", "reason"], how="anti"),
                          b.join(a, on=["subject_id", "reason"], how="anti")])["subject_id"].unique()

    cj, ca = changed("judgment"), changed("annotator")
    hit = judgments.select("pair_id", "comparison_id", "annotator_id").filter(
        pl.col("comparison_id").is_in(cj.implode()) | pl.col("annotator_id").is_in(ca.implode()))["pair_id"]
    return pl.concat([judgments.slice(n_parent_rows)["pair_id"], hit]).unique().sort()


# the columns of a pair that depend on the annotator parameters (the rest depends on its judgments only)
PARAMETER_COLUMNS = ("label_human", "label_ai", "label_consensus", "p_a_weighted", "agreement", "strength", "dimensions")


PARAMS_TABLE = "state/annotator_params"


def parent_params(parent: VersionHandle) -> pl.DataFrame | None:
    """The annotator parameters the parent's consensus used (None: a parent written before they were kept)."""
    if parent.table(PARAMS_TABLE) is None:
        return None
    from pipeline.aggregate import PARAM_SCHEMA

    return parent.read(PARAMS_TABLE).cast(PARAM_SCHEMA)  # type: ignore[arg-type]


def merge_params(parent: pl.DataFrame, fitted: pl.DataFrame) -> pl.DataFrame:
    """A child's parameter state: the parent's row of every annotator it has, a value the parent
    lacks (a new annotator, or one first seen in the order-aware fit) from the child's fit."""
    cols = [c for c in parent.columns if c != "annotator_id"]
    both = parent.join(fitted, on="annotator_id", how="full", coalesce=True, suffix="__fit")
    oa = [c for c in cols if c.startswith("oa_")]
    has_oa = pl.all_horizontal([pl.col(c).is_not_null() for c in oa])  # the order-aware four go together
    out = both.with_columns(
        ds_accuracy=pl.coalesce("ds_accuracy", "ds_accuracy__fit"),
        **{c: pl.when(has_oa).then(pl.col(c)).otherwise(pl.col(f"{c}__fit")) for c in oa})
    return out.select("annotator_id", *cols).sort("annotator_id")


# ---------------------------------------------------------------- the preliminary consensus under the rule
PRELIM_TABLE = "state/preliminary"  # the preliminary pairs without texts, a_hash and seen (first-seen rank)
PRELIM_PARAMS = "state/preliminary_params"  # the annotator parameters the preliminary consensus used
_PRELIM_DROP = ("prompt", "prompt_text", "response_a", "response_b", "model_a", "model_b", "source_comparison_ids")


# what the preliminary state means, recorded in a version's lineage (``preliminary_format``); bump when it changes:
# a child keeps its parent's preliminary rows and parameters only in this format.  2: re-delivered copies do not vote;
# 3: nor in the rows' per-dimension consensus (``dimensions``, and the dimension rule's label of a pair it decides)
PRELIM_FORMAT = "3"


def has_preliminary(parent: VersionHandle) -> bool:
    return parent.table(PRELIM_TABLE) is not None and parent.table(PRELIM_PARAMS) is not None


def preliminary_applies(parent: VersionHandle) -> bool:
    """The parent keeps its preliminary state in the format this code decides pairs in (else a child
    aggregates every pair again: its parent's rows and parameters would mix two rules)."""
    return has_preliminary(parent) and parent.manifest().lineage.get("preliminary_format") == PRELIM_FORMAT


def preliminary_rows(aggr: Aggregation, first_version: pl.Series) -> pl.DataFrame:
    """A version's :data:`PRELIM_TABLE` rows from its preliminary aggregation (before reviews
    resolve anything): the pairs without texts and comparison ids, their canonical ``a_hash``,
    ``seen`` (the rank in first-seen order) and ``first_version`` (the version where the pair
    was first seen, aligned with the rows): every pair of the union has one, so every table
    keyed by pair keeps a pair in the same part from version to version."""
    assert aggr.a_hash is not None
    lengths = {k: aggr.pairs[c].str.len_chars().cast(pl.Int64) for k, c in (("len_a", "response_a"), ("len_b", "response_b"))}
    return aggr.pairs.drop(_PRELIM_DROP, strict=False).with_columns(**lengths).with_columns(
        a_hash=aggr.a_hash, seen=pl.int_range(aggr.pairs.height, dtype=pl.Int64),
        first_version=first_version.cast(pl.String))


def pair_lengths(rows: pl.DataFrame) -> pl.DataFrame:
    """The pairs' response lengths in characters (pair_id, ``a_hash``, ``len_a``, ``len_b``, in their
    canonical orientation: the first judgment's) from :data:`PRELIM_TABLE` rows: the ``lengths`` input
    of the length-bias and dimension checks.  A pair's first judgment never changes, so neither do its lengths: a child
    keeps its parent's and measures its new pairs' only."""
    return rows.select("pair_id", "a_hash", "len_a", "len_b")


def parent_first_versions(parent: VersionHandle) -> pl.DataFrame | None:
    """pair_id -> first_version of every pair the parent has seen (None: it keeps no preliminary
    state with that column, a parent written before it)."""
    if not has_preliminary(parent):
        return None
    try:
        known = parent.read(PRELIM_TABLE, columns=["pair_id", "first_version"])
    except pl.exceptions.ColumnNotFoundError:
        return None
    return known if "first_version" in known.columns else None


def first_texts(judgments: pl.DataFrame) -> pl.DataFrame:
    """Every pair's texts as an aggregation of these judgments orients them (its first judgment's:
    the ``texts`` of :func:`pipeline.aggregate.aggregate`, :meth:`Aggregation.texts` columns)."""
    from pipeline.aggregate import PAIR_TEXT_COLUMNS

    return judgments.filter(pl.col("pair_id").is_first_distinct()).select("pair_id", *PAIR_TEXT_COLUMNS, "a_hash")


# what a child reads of its parent's preliminary rows of every pair besides the columns its checks and the
# review resolution read (the rows of the pairs its batch touches are aggregated again, every column)
PRELIM_KEYS = ("pair_id", "a_hash", "len_a", "len_b", "seen", "first_version")


@dataclass
class Ruled:
    """:func:`preliminary`'s result.  ``aggregation``: pairs without texts (the parent's in the
    order it stored them, then the batch's; ``params``: the child's parameter state); ``rows``: the
    child's :data:`PRELIM_TABLE` rows in the same order, in the columns read; ``order``: the pair
    ids in first-seen order; ``touched``: the pairs aggregated again, whose rows changed and are
    ``changed`` (every column: what the child writes of the table); ``figures``: the rule's."""

    aggregation: Aggregation
    rows: pl.DataFrame
    order: pl.Series
    touched: pl.Series
    changed: pl.DataFrame
    figures: dict[str, int]


def preliminary(judgments: pl.DataFrame, n_parent_rows: int, parent: VersionHandle, cfg: AggregationConfig,
                dimensions: DimensionsConfig | None, version_id: str, columns: Collection[str] | None = None
                ) -> Ruled | None:
    """The preliminary consensus of a child under the rule (docs/incremental.md): the pairs of
    its new judgments (``judgments`` after the parent's ``n_parent_rows``) aggregated with the
    parent's preliminary parameters fixed (annotators without them fitted on those judgments),
    every other pair the parent's row -- of which only ``columns`` and :data:`PRELIM_KEYS` are
    read (None: every column; the others are ~half the table's memory at 3M judgments).  None when
    the parent's state lacks one of the columns (written before it was kept: recompute).  Only the
    ids are sorted: a gather of every pair's row (lists, nested dimensions) cost 1.4 s at 3M
    judgments, and nothing needs the rows in order."""
    from pipeline.aggregate import PARAM_SCHEMA, aggregate

    touched = judgments.slice(n_parent_rows)["pair_id"].unique().to_frame("pair_id")
    given = parent.read(PRELIM_PARAMS).cast(PARAM_SCHEMA)  # type: ignore[arg-type]
    mine = judgments.join(touched, on="pair_id", how="semi", maintain_order="left")
    fresh = aggregate(mine, cfg, dimensions=dimensions, params=given, rated=ratings(mine))  # (copies do not vote)
    assert fresh.params is not None
    rows = preliminary_rows(fresh, pl.repeat(version_id, fresh.pairs.height, eager=True))
    table = parent.table(PRELIM_TABLE)
    assert table is not None
    if set(rows.columns) - set(pl.read_parquet_schema(io.BytesIO(parent.read_bytes(table.parts[0].path)))):
        return None  # a parent written before a column was kept: recompute
    read = rows.columns if columns is None else [c for c in rows.columns if c in {*PRELIM_KEYS, *columns}]
    old = parent.read(PRELIM_TABLE, columns=read)
    if set(read) - set(old.columns):
        return None
    # (masks by a set of the batch's size: joins with the million old rows hash every one of them)
    mine = pl.col("pair_id").is_in(touched["pair_id"].implode())
    rows = rows.drop("seen", "first_version").join(old.filter(mine).select("pair_id", "seen", "first_version"),
                                                   on="pair_id", how="left", maintain_order="left")
    # a new pair's rank: after the parent's pairs, in the order of its first judgment (the batch's order)
    new = rows["seen"].is_null()
    rows = rows.with_columns(seen=pl.coalesce("seen", old.height + new.cast(pl.Int64).cum_sum() - 1),
                             first_version=pl.coalesce("first_version", pl.lit(version_id)))
    keep = old.filter(~mine).select(read).cast(rows.select(read).schema)  # type: ignore[arg-type]
    state = pl.concat([keep, rows.select(read)])
    aggr = Aggregation(state.drop("a_hash", "seen"), fresh.annotators, state["a_hash"],
                       merge_params(given, fresh.params))
    n_new = fresh.params.join(given, on="annotator_id", how="anti").height
    order = state.select("pair_id", "seen").sort("seen")["pair_id"]
    return Ruled(aggr, state, order, touched["pair_id"], rows,
                 {"pairs_recomputed": rows.height, "pairs_from_parent": keep.height,
                  "annotators_from_parent": given.height, "annotators_fitted": n_new})


def parent_pair_rows(parent: VersionHandle, columns: list[str], where: pl.Expr | None = None,
                     keys: Collection[str] | None = None) -> pl.DataFrame:
    """The parent's pairs without their texts (``columns`` other than the texts, and
    ``first_version``; ``where``: only the rows it selects), every part verified (hashed whole)
    by the read -- from :data:`pipeline.delta.PAIR_ROWS` (the pairs table without texts, ~10 % of
    its bytes), or the pairs table of a parent written before it.  ``keys``: only the parts with
    these keys (:func:`pipeline.parts.parent_keys` of the rows ``where`` selects)."""
    from pipeline.aggregate import PAIR_TEXT_COLUMNS
    from pipeline.delta import PAIR_ROWS

    name = PAIR_ROWS if parent.table(PAIR_ROWS) is not None else "pairs"
    return parent.read(name, columns=[c for c in dict.fromkeys((*columns, "first_version")) if c not in PAIR_TEXT_COLUMNS],
                       where=where, keys=keys)


def with_parent_pairs(fresh: pl.DataFrame, old: pl.DataFrame, recompute: pl.Series, kept: pl.DataFrame,
                      order: pl.Series, texts: pl.DataFrame, texts_for: pl.Series | None = None) -> tuple[pl.DataFrame, dict]:
    """The rule of a child (docs/incremental.md): ``fresh`` -- the child's aggregation of the
    pairs in ``recompute``; ``old``: :func:`parent_pair_rows` (kept judgments, the parent's annotator parameters) -- plus the
    parent's row of every other pair that has kept judgments (``kept``: pair_id, a_hash of the
    kept judgments, in frame order); the drift of the annotator parameters does not rewrite old
    pairs.  The texts of those pairs are not read from the parent: they are ``texts``
    (:meth:`~pipeline.aggregate.Aggregation.texts`) in the orientation of the pair's first kept
    judgment, as an aggregation of the kept judgments gives them.  Rows in the order of
    ``order`` (every pair id of the version, first-seen).  ``texts_for``: only these of the parent's
    rows get their texts (the others' are null: a child that selects its dirty pairs only,
    :mod:`pipeline.delta`).  Returns the pairs and the rule's figures."""
    from pipeline.aggregate import oriented_texts

    cols = fresh.columns
    keep = old.drop("first_version").join(recompute.to_frame("pair_id"), on="pair_id", how="anti")
    if texts_for is None:
        canon = kept.join(keep.select("pair_id"), on="pair_id", how="semi").unique("pair_id", keep="first", maintain_order=True)
        keep = canon.select("pair_id").join(keep, on="pair_id", how="left", maintain_order="left")
        keep = pl.concat([keep, oriented_texts(canon["pair_id"], canon["a_hash"], texts)], how="horizontal")
    else:  # the rows of the pairs with kept judgments; the first kept judgment's orientation for those with texts only
        keep = keep.join(kept["pair_id"].unique().to_frame("pair_id"), on="pair_id", how="semi")
        canon = kept.filter(pl.col("pair_id").is_in(texts_for.implode())).join(keep.select("pair_id"), on="pair_id",
                                                                              how="semi") \
            .unique("pair_id", keep="first", maintain_order=True)
        t = pl.concat([canon.select("pair_id"), oriented_texts(canon["pair_id"], canon["a_hash"], texts)], how="horizontal")
        keep = keep.join(t, on="pair_id", how="left")  # the row order does not matter: sorted by ``order`` below
    keep = keep.select(cols).cast(fresh.schema)  # type: ignore[arg-type]
    rank = order.to_frame("pair_id").with_row_index("_i")
    out = pl.concat([keep, fresh]).join(rank, on="pair_id", how="left").sort("_i").drop("_i")
    return out, {"pairs_recomputed": fresh.height, "pairs_from_parent": keep.height}


def sums_table(name: str) -> str:
    """The table a version keeps a check's mergeable state in (:class:`pipeline.checks.spec.Sums`)."""
    return f"{STATE_PREFIX}{name}_sums"


def sums_params_table(name: str) -> str:
    """The table a version keeps the fixed parameters of a check's state in (``Sums.params``)."""
    return f"{STATE_PREFIX}{name}_params"


def declared_sums() -> dict[str, Sums]:
    from pipeline.checks import CHECKS

    return {c.name: c.sums for c in CHECKS if c.sums is not None}


def sums_formats() -> dict[str, str]:
    """The format of every declared state, recorded in a version's lineage (``check_sums``)."""
    return {name: spec.format for name, spec in declared_sums().items()}


def has_sums(parent: VersionHandle) -> bool:
    """The parent keeps every declared state, in the formats this code counts (else: count again)."""
    recorded = (parent.manifest().lineage.get("check_sums") or {}).get("formats")
    return recorded == sums_formats() and all(
        parent.table(sums_table(n)) is not None and (not s.params or parent.table(sums_params_table(n)) is not None)
        for n, s in declared_sums().items())


def params_fitted_on(version: VersionHandle) -> dict[str, int]:
    """Per check whose state has parameters: the judgments they were fitted on (the version that
    last fitted them counted that many; a child that kept them carries the number on)."""
    return dict((version.manifest().lineage.get("check_sums") or {}).get("fitted_on") or {})


def fitted_on(parent: VersionHandle | None, merged: Iterable[str], n_judgments: int) -> dict[str, int]:
    """A version's :func:`params_fitted_on`: its parent's for the states it merged, ``n_judgments``
    for the ones it fitted."""
    kept = params_fitted_on(parent) if parent is not None else {}
    return {name: kept[name] if name in merged and name in kept else n_judgments
            for name, spec in declared_sums().items() if spec.params}


def merged_sums(judgments: pl.DataFrame, n_parent_rows: int, parent: VersionHandle, pairs: pl.Series,
                cfg: ChecksConfig, complete: Callable[[pl.DataFrame], pl.DataFrame],
                inputs: dict[str, dict[str, Any]], *, n_judgments: int | None = None,
                more: Callable[[pl.Series], tuple[pl.DataFrame, int]] | None = None) -> dict[str, dict[str, pl.DataFrame]]:
    """The mergeable state of every check that declares one, for a child whose judgments are its
    parent's (the first ``n_parent_rows``) followed by new ones on the pairs ``pairs``: the parent's
    state minus those pairs' rows as the parent counted them plus their rows now
    (:meth:`Sums.advance`; a check's own rule where it declares one).  Only the judgments of
    ``pairs`` are counted (and, for a check that asks, of the pairs some annotators judged); the
    result equals a count over every judgment with the same parameters (``tests/test_incremental.py``).
    Returns each check's inputs: ``sums`` and, for a state with parameters, ``sums_params``; a state
    with parameters is left out (counted again over every judgment, refitted) when the judgments
    are more than ``1 + cfg.refit_growth`` times those its parameters were fitted on
    (:func:`params_fitted_on`).  ``complete``: the rows counted with the columns ``judgments`` lacks
    (:class:`Completer`).  ``n_judgments``: the union's count when ``judgments`` holds some of the parent's rows only
    (the pairs' rows it counts); ``more(annotators)``: then the union with every row of the pairs they judged, and how
    many of its rows are the parent's."""
    rows = judgments.with_row_index("_row")
    n_judgments = judgments.height if n_judgments is None else n_judgments

    def split(mine: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        return mine.filter(pl.col("_row") < n_parent_rows).drop("_row"), mine.drop("_row")

    old, new = split(complete(rows.filter(pl.col("pair_id").is_in(pairs.implode()))))

    def pairs_of(annotators: pl.Series) -> tuple[pl.DataFrame, pl.DataFrame]:
        frame, n = (judgments, n_parent_rows) if more is None else more(annotators)
        judged = frame.filter(pl.col("annotator_id").is_in(annotators.implode()))["pair_id"]
        mine = complete(frame.with_row_index("_row").filter(pl.col("pair_id").is_in(pl.concat([pairs, judged]).unique().implode())))
        return mine.filter(pl.col("_row") < n).drop("_row"), mine.drop("_row")

    out: dict[str, dict[str, pl.DataFrame]] = {}
    fitted_on = params_fitted_on(parent)
    for name, spec in declared_sums().items():
        # the rule's bound: parameters fitted on all but refit_growth of the judgments they count; beyond,
        # the check counts every judgment, with parameters fitted on them
        if spec.params and n_judgments > (1 + cfg.refit_growth) * fitted_on.get(name, 0):
            continue
        params = parent.read(sums_params_table(name)) if spec.params else None
        child = Child(state=parent.read(sums_table(name)), params=params, old=old, new=new, cfg=cfg,
                      inputs=inputs.get(name, {}), pairs_of=pairs_of)
        state, params = spec.advance(child)
        out[name] = {"sums": state, **({"sums_params": params} if params is not None else {})}
    return out


def sums_frames(results: dict[str, CheckResult]) -> dict[str, pl.DataFrame]:
    """The state tables of the checks that declare mergeable sums (and their parameters), by table name."""
    out = {}
    for name, spec in declared_sums().items():
        if name in results:
            out[sums_table(name)] = results[name].tables["sums"]
            if spec.params:
                out[sums_params_table(name)] = results[name].tables["sums_params"]
    return out


def state_frames(results: dict[str, CheckResult]) -> dict[str, pl.DataFrame]:
    """The state tables a version keeps for its children, by table name."""
    out = {}
    for name, spec in PAIR_SCOPED.items():
        frame = results[name].tables.get(spec.table)
        if frame is None:  # e.g. no pair has a locale: an empty state with the columns a child reads
            frame = _EMPTY[name]
        out[state_table(name)] = frame
    return out


_EMPTY = {
    "duplicates": pl.DataFrame(schema={"comparison_id": pl.String, "pair_id": pl.String, "kept_id": pl.String,
                                       "copies": pl.UInt32}),
    "pair_id_conflict": pl.DataFrame(schema={"pair_id": pl.String, "n_prompts": pl.UInt32, "n_response_sets": pl.UInt32,
                                             "n_judgments": pl.UInt32}),
    "language": pl.DataFrame(schema={"pair_id": pl.String, "locale": pl.String, "part": pl.String, "detected": pl.String,
                                     "by": pl.String}),
}

__all__ = ["aligned", "Completer", "DEFERRED", "defers", "PRELIM_KEYS", "Ruled", "NARROW_DROP", "read_parent_narrow", "WIDE_COLUMNS", "Hydrated", "hydrate", "narrow_applies", "parent_judgments", "TextsSource", "declared_sums", "fitted_on", "params_fitted_on", "has_sums", "sums_params_table", "sums_formats", "merged_sums", "sums_frames", "sums_table", "PAIR_SCOPED", "PRELIM_FORMAT", "PRELIM_PARAMS", "PRELIM_TABLE", "preliminary_applies", "Totals", "PARAMS_TABLE", "first_texts", "has_preliminary", "pair_lengths", "parent_first_versions", "preliminary", "preliminary_rows", "has_state", "merge_params", "parent_pair_rows", "parent_params", "with_parent_pairs", "near_duplicates", "pairs_to_recompute", "run_touched", "merged_state", "state_frames", "state_table", "touched_pairs"]
