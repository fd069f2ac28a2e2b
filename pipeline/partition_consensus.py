"""The consensus over partitions: one global fit of the annotator parameters, then every
partition's pairs decided with them (issue 15, step 3 of docs/scale-out.md "Next").

A pair's consensus needs two things: its own judgments (all in one partition: the partition key
is the pair's content key) and the annotator parameters (Dawid-Skene accuracy, the order-aware
alpha / beta / engagement / factor), which are fitted over *every* judgment.  So it takes two
passes:

1. :data:`CODES` (a :class:`pipeline.distributed.Step`): each partition sends the compact
   integer codes of its judgments (labels, display order, gold, orientation, annotator code;
   ~12 bytes per judgment, no text, no id but the pair's), its pairs (id, judgment count) and its
   annotators.  The reduce (:func:`assemble`) lays them out in the **canonical order** -- pairs by
   ``pair_id``, each pair's judgments in input order -- as the very :class:`Encoded` that
   :func:`pipeline.aggregate.encode` gives for the whole input in that order (tested array by
   array), and :func:`pipeline.aggregate.annotator_params` fits the parameters on it, on the driver.
   The canonical order does not depend on the partition count or on which partition finished
   first, so neither does any float sum of the fit: the parameters are bit-identical for every cut.
2. :func:`decide_step` (bound to the fitted parameters): each partition's pairs aggregated with
   every annotator's parameters given, :func:`pipeline.aggregate.aggregate` with ``params``; a
   pair's row then depends on its own judgments and the parameters only, so the partitions' rows,
   concatenated in ``pair_id`` order, equal the whole input's (tested: every column, every bit).

What the driver holds: the codes of every decisive judgment and the pair ids (~40 bytes per
judgment in memory while it fits: 10M judgments ~0.4 GB, 100M ~4 GB -- the point where the fit
itself has to become map-reduce rounds of the EM's sums, docs/scale-out.md), never a text.

``drop``: pair ids whose judgments are left out before the consensus (given ids that name two
contents, found by :mod:`pipeline.partition_stats`'s reduce; such an id may span partitions,
which the canonical layout refuses).

Dimension verdicts: the per-dimension consensus (:func:`pipeline.dimensions.consensus`) is the
same shape of fit over the per-(judgment, dimension) rows -- pairs keyed by (pair, dimension),
annotators by (annotator, dimension).  Pass 1 sends their codes too (``dim_*`` tables,
:func:`codes_with_dimensions`), the driver fits them once (:func:`fit_dimensions`) and pass 2
decides every pair's dimensions with those parameters and the policy's dimension rule; its
``dimensions`` table is the consensus rows the dimensions check reads.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel

from pipeline import dimensions as dims
from pipeline.checks.agreement import RATING_COLUMNS, ratings
from pipeline.aggregate import PAIR_TEXT_COLUMNS, PARAM_SCHEMA, Encoded, _encode, aggregate, annotator_params, unique_inverse
from pipeline.distributed import State, Step, read_ipc
from pipeline.partition import read_partition
from schemas.policy import AggregationConfig, DimensionsConfig

VERSION = "8"  # 7: re-delivered copies do not vote (codes carry ``rated``); 8: nor in the per-dimension codes
# what the fit reads of a judgment (the columns :func:`pipeline.aggregate.encode` codes)
FIT_COLUMNS = ["pair_id", "a_hash", "b_hash", "annotator_id", "annotator_kind", "label", "shown_first", "gold_label",
               "strength", "dimensions"]
# the per-judgment arrays of an Encoded that travel as they are (pair and annotator codes are rebuilt globally)
_ARRAYS = {"human": pl.Boolean, "label": pl.Int8, "raw_label": pl.Int8, "shown": pl.Int8, "raw_shown": pl.Int8,
           "gold": pl.Int8, "flipped": pl.Boolean, "strength": pl.Float64}


def canonical(judgments: pl.DataFrame) -> pl.DataFrame:
    """The order every global fit reads: pairs by ``pair_id``, a pair's judgments in input order."""
    return judgments.sort("pair_id", maintain_order=True)


def _read(paths: list[str], columns: list[str] | None, drop: tuple[str, ...]) -> pl.DataFrame:
    frame = read_partition(paths, columns=columns)
    if drop:
        frame = frame.filter(~pl.col("pair_id").is_in(pl.Series(drop, dtype=pl.String).implode()))
    return frame


# ---------------------------------------------------------------- pass 1: codes, assembled and fitted on the driver
def _codes_run(drop: tuple[str, ...], paths: list[str]) -> State:
    part = _read(paths, list(dict.fromkeys([*FIT_COLUMNS, *RATING_COLUMNS])), drop)
    # which judgments vote (a set: any order of the rows finds the same), carried through the sort
    part = canonical(part.select(FIT_COLUMNS).with_columns(_rated=pl.Series(ratings(part))))
    return codes_with_dimensions(part.drop("_rated"), part["_rated"].to_numpy())


def codes_with_dimensions(part: pl.DataFrame, rated: np.ndarray | None = None) -> State:
    """:func:`codes_of` of judgments in the canonical order, and, when they give dimension verdicts,
    the codes of their per-dimension rows (:func:`pipeline.dimensions.long_frame`: a pair key per
    (pair, dimension), an annotator key per (annotator, dimension)) as ``dim_*`` tables: the
    per-dimension consensus is fitted on them as the overall one is (:func:`fit_dimensions`).
    ``rated``: the judgments that vote (:func:`pipeline.checks.agreement.ratings`; default all), sent
    with the codes: the fit leaves out the others, as :func:`pipeline.aggregate.aggregate` does; the
    per-dimension rows are made of them only, as :func:`pipeline.dimensions.consensus` makes them."""
    state = codes_of(part, rated)
    if dims.has_dimensions(part):
        long = dims.long_frame(part, rated)
        if long.height:  # (none: the only verdicts were copies')
            state.update({f"dim_{k}": v for k, v in codes_of(canonical(long)).items()})
    return state


def fit_dimensions(states: list[State], cfg: AggregationConfig | None = None) -> pl.DataFrame | None:
    """The per-(annotator, dimension) parameters over every partition's ``dim_*`` codes (None: no
    dimension verdicts anywhere) -- those :func:`pipeline.dimensions.consensus` fits on the whole input."""
    parts = [{k[4:]: v for k, v in s.items() if k.startswith("dim_")} for s in states if "dim_codes" in s]
    return fit(parts, cfg) if parts else None


def codes_of(part: pl.DataFrame, rated: np.ndarray | None = None) -> State:
    """The codes state of judgments already in the canonical order (:func:`canonical`); ``rated``:
    which of them vote (default all)."""
    e = _encode(part)
    return {
        "pairs": pl.DataFrame({"pair_id": e.pair_ids, "n": np.bincount(e.pair, minlength=e.n_pairs).astype(np.int64)}),
        "annotators": pl.DataFrame({"annotator_id": e.ann_ids, "annotator_kind": e.ann_kind}),
        "codes": pl.DataFrame({"ann": e.ann.astype(np.int32), **{k: getattr(e, k) for k in _ARRAYS},
                               "rated": np.ones(e.n, bool) if rated is None else rated}),
    }


def codes_step(cfg: AggregationConfig | None = None, drop: tuple[str, ...] = ()) -> Step:
    """Pass 1: every partition's codes; the reduce fits the parameters on them (``{"params":
    PARAM_SCHEMA by annotator_id}``).  ``drop``: pair ids left out (their judgments do not enter the fit)."""
    drop = tuple(sorted(set(drop)))
    cfg_json = (cfg or AggregationConfig()).model_dump_json()
    return Step("consensus-codes", f"{VERSION}-{_digest(drop)}", functools.partial(_codes_run, drop),
                functools.partial(_fit_reduce, cfg_json))


def _fit_reduce(cfg_json: str, states: list[State]) -> State:
    return {"params": fit(states, AggregationConfig.model_validate_json(cfg_json))}


def assemble(states: list[State]) -> Encoded:
    """The whole input's votes as :class:`Encoded` in the canonical order from every partition's codes
    (partition order: any; the result is the same): the judgments the codes mark ``rated`` (a
    re-delivered copy is no second vote), as :func:`pipeline.aggregate.canonical_encoding` lays out
    ``encode(judgments).only(ratings(judgments))``."""
    pairs = pl.concat([s["pairs"] for s in states])
    n = pairs["n"].to_numpy()
    start = _starts(n)  # each pair's first row in the concatenated codes
    order = pairs.with_columns(_start=pl.Series(start)).sort("pair_id")
    # (an id twice is two equal neighbours once sorted: at 10M judgments 1.2 s less than is_duplicated on the union)
    sid = order["pair_id"]
    if sid.len() > 1 and (sid.slice(1) == sid.slice(0, sid.len() - 1)).any():
        dup = pairs.filter(pl.col("pair_id").is_duplicated())["pair_id"].unique().sort().head(3).to_list()
        raise ValueError(f"pair ids in more than one partition (a given id naming several contents; drop them first): {dup}")
    n_sorted, start_sorted = order["n"].to_numpy(), order["_start"].to_numpy()
    total = int(n.sum())
    out_start = _starts(n_sorted)
    rows = np.arange(total, dtype=np.int64) - np.repeat(out_start, n_sorted) + np.repeat(start_sorted, n_sorted)
    codes = pl.concat([s["codes"] for s in states])
    if "rated" in codes.columns and not codes["rated"].all():  # the votes only: the rows' layout without the others
        pair = np.repeat(np.arange(len(n_sorted), dtype=np.int64), n_sorted)
        keep = codes["rated"].to_numpy()[rows]
        rows, pair = rows[keep], pair[keep]
        n_sorted = np.bincount(pair, minlength=len(n_sorted)).astype(np.int64)
        total, out_start = len(rows), _starts(n_sorted)
    # annotators: a partition's code -> the sorted union of ids -> first-seen order in the canonical layout
    union = pl.concat([s["annotators"] for s in states])
    ids = union["annotator_id"].unique().sort()
    union = union.join(ids.to_frame().with_row_index("_global"), on="annotator_id", how="left", maintain_order="left")
    offsets = _starts(np.array([s["annotators"].height for s in states], np.int64))
    part_of_row = np.repeat(np.arange(len(states)), [s["codes"].height for s in states])
    local = (codes["ann"].to_numpy().astype(np.int64) + offsets[part_of_row])[rows]  # a row of ``union``, canonical order
    glob = union["_global"].to_numpy().astype(np.int64)[local]
    # each annotator's first row, and its code = its rank by first row (what np.unique's first index and inverse
    # gave, without sorting every judgment: the ids are few, the rows many -- at 10M judgments 2.2 s -> ~0.1 s)
    at = np.full(len(ids), total, np.int64)
    np.minimum.at(at, glob, np.arange(total, dtype=np.int64))
    seen = np.flatnonzero(at < total)
    by_first = seen[np.argsort(at[seen], kind="stable")]
    rank = np.empty(len(ids), np.int64)
    rank[by_first] = np.arange(len(by_first))
    ann, ann_first = rank[glob], at[by_first]
    # an annotator's kind is the one of its first judgment, as encode takes it
    ann_ids = union["annotator_id"].gather(local[ann_first])
    ann_kind = union["annotator_kind"].gather(local[ann_first])
    pair = np.repeat(np.arange(len(n_sorted), dtype=np.int64), n_sorted)
    n_ann = len(ann_first)
    ukeys, unit = unique_inverse(pair * max(n_ann, 1) + ann)
    arrays = {k: codes[k].to_numpy()[rows] for k in _ARRAYS}
    return Encoded(pair=pair, pair_first=out_start, pair_ids=order["pair_id"], ann=ann, ann_ids=ann_ids,
                   ann_kind=ann_kind, unit=unit.ravel(), unit_pair=ukeys // max(n_ann, 1), unit_ann=ukeys % max(n_ann, 1),
                   **arrays)


def fit(states: list[State], cfg: AggregationConfig | None = None) -> pl.DataFrame:
    """The annotator parameters (:data:`pipeline.aggregate.PARAM_SCHEMA`, by ``annotator_id``)
    fitted over every partition's codes."""
    return annotator_params(assemble(states), cfg).sort("annotator_id")  # (assembled in the canonical layout)


# ---------------------------------------------------------------- pass 2: each partition's pairs, parameters given
def params_blob(params: pl.DataFrame | None) -> bytes:
    """Annotator parameters as the bytes a step is bound to (empty: none)."""
    if params is None:
        return b""
    buf = io.BytesIO()
    params.sort("annotator_id").select(list(PARAM_SCHEMA)).cast(PARAM_SCHEMA).write_ipc_stream(  # type: ignore[arg-type]
        buf, compat_level=pl.CompatLevel.oldest())
    return buf.getvalue()


def params_of(blob: bytes) -> pl.DataFrame | None:
    return read_ipc(blob) if blob else None


def _decide_run(params_ipc: bytes, cfg_json: str, drop: tuple[str, ...], dim_ipc: bytes, dims_json: str,
                prelim_json: str, paths: list[str]) -> State:
    params = read_ipc(params_ipc)
    part = _read(paths, None, drop)
    agg = aggregate(part, AggregationConfig.model_validate_json(cfg_json), params=params, fitted=True,
                    dim_params=params_of(dim_ipc), dimensions=DimensionsConfig.model_validate_json(dims_json),
                    rated=ratings(part))
    c = pl.col
    assert agg.a_hash is not None
    first = part.group_by("pair_id", maintain_order=True).agg(source_file=c("source_file").first(),
                                                              source_line=c("source_line").first())
    extra = {"dimensions": agg.dimensions} if agg.dimensions is not None else {}
    pairs = agg.pairs.drop(PAIR_TEXT_COLUMNS).sort("pair_id")
    # each pair's response lengths in its orientation (what the length-bias check reads of the texts)
    lengths = agg.pairs.select("pair_id", len_a=c("response_a").str.len_chars().cast(pl.Int64),
                               len_b=c("response_b").str.len_chars().cast(pl.Int64)).sort("pair_id")
    # its canonical orientation and where its first judgment is in the input (first-seen order)
    seen = agg.pairs.select("pair_id").with_columns(a_hash=agg.a_hash).join(first, on="pair_id", how="left").sort("pair_id")
    # the pairs' texts in first-seen order (``Aggregation.texts``): what a later step of the same partition
    # aggregates its kept judgments with; left in the cache (``DECIDED``: what the driver reads)
    out: State = {**extra, "texts": agg.texts()}
    prelim = Prelim.model_validate_json(prelim_json) if prelim_json else None
    if prelim is None:
        return {**out, "pairs": pairs, "lengths": lengths, "seen": seen}
    # a build's version: its preliminary pairs' state rows left in the cache, keyed by its parts (the driver merges
    # them part by part); the driver gets the columns the checks read, and each pair's place in the input (``_o``)
    from pipeline.checks import pair_columns
    from pipeline.incremental import _PRELIM_DROP
    from pipeline.partition_write import keyed_by_part

    o = input_order(prelim.sources)
    rows = pairs.drop(_PRELIM_DROP, strict=False).join(lengths, on="pair_id", how="left") \
        .join(seen.select("pair_id", "a_hash", _o=o), on="pair_id", how="left").with_columns(first_version=pl.lit(prelim.version_id))
    narrow = pair_columns()
    return {**out, PRELIM: keyed_by_part(rows, (prelim.group, prelim.buckets)),
            "pairs": pairs if narrow is None else pairs.select(narrow), "lengths": lengths,
            "first_seen": rows.select(pl.col("_o").sort())}


class Prelim(BaseModel):
    """What a build's decide step needs to leave the preliminary pairs' state rows in its cache:
    the version, its part layout (:func:`pipeline.parts.first_layout`) and the input files in order
    (a row's place in the input, :func:`input_order`)."""

    version_id: str
    group: str
    buckets: int
    sources: list[str]


PRELIM = "prelim"  # the decide step's table of a build's preliminary pair rows (left in the cache)


def input_order(sources: list[str]) -> pl.Expr:
    """A row's place in the input: (its file's index among ``sources``) * 2**40 + its line."""
    idx = pl.col("source_file").replace_strict(sources, list(range(len(sources))), return_dtype=pl.Int64)
    return idx * (1 << 40) + pl.col("source_line").cast(pl.Int64)


def decide_step(params: pl.DataFrame, cfg: AggregationConfig | None = None, drop: tuple[str, ...] = (),
                dim_params: pl.DataFrame | None = None, dimensions: DimensionsConfig | None = None,
                prelim: Prelim | None = None) -> Step:
    """Pass 2's step: every pair of a partition decided with ``params`` (:func:`fit`'s; its
    per-dimension consensus with ``dim_params``, :func:`fit_dimensions`'s, and the policy's
    ``dimensions`` rule), and its response lengths; its reduce concatenates the partitions' rows in
    ``pair_id`` order (texts left out: a real run writes them where they are, by partition).
    ``prelim``: a build's -- the preliminary pairs' state rows stay in the cache (:data:`PRELIM`),
    the driver reads the pairs' columns the checks read and ``first_seen`` (each pair's place in the
    input, sorted) instead of ``seen``."""
    cfg = cfg or AggregationConfig()
    blob, dim_blob = params_blob(params), params_blob(dim_params)
    cfg_json, dims_json, drop = cfg.model_dump_json(), (dimensions or DimensionsConfig()).model_dump_json(), tuple(sorted(set(drop)))
    prelim_json = prelim.model_dump_json() if prelim is not None else ""
    version = f"{VERSION}-{_digest((hashlib.sha256(blob).hexdigest(), cfg_json, drop, hashlib.sha256(dim_blob).hexdigest(), dims_json, prelim_json))}"
    return Step("consensus-decide", version, functools.partial(_decide_run, blob, cfg_json, drop, dim_blob, dims_json, prelim_json),
                _concat_pairs)


# the decide step's tables the driver reads (not the texts, nor a build's preliminary rows); ``dimensions`` (the
# per-dimension consensus rows) only where the partition has dimension verdicts; ``first_seen`` a build's
DECIDED = ("pairs", "lengths", "seen", "dimensions", "first_seen")


def _concat_pairs(states: list[State]) -> State:
    names = {n for s in states for n in s}
    out = {name: pl.concat([s[name] for s in states]).sort("pair_id") for name in ("pairs", "lengths", "seen") if name in names}
    if "first_seen" in names:
        out["first_seen"] = pl.concat([s["first_seen"] for s in states]).sort("_o")
    long = [s["dimensions"] for s in states if "dimensions" in s]
    if long:
        out["dimensions"] = pl.concat(long).sort("pair_id", "name")
    return out


def _starts(counts: np.ndarray) -> np.ndarray:
    """Where each of consecutive blocks of ``counts`` rows starts."""
    return (np.cumsum(counts) - counts).astype(np.int64)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
