"""Reviews resolve routed pairs (``../shared/spec/outputs.md``, "Reviews resolve routed pairs").

A *review* is a judgment with ``review_of`` (``prefpipe review import`` writes them; ingest sets
``pair_id`` to it when the row gives none).  A version's *review state* (table ``review_state``)
has one row per pair that any version of its lineage routed away from training: the version
that first routed it and when (the age of an open review), the routing reason, and whether the
pair is still ``open`` (routed) or ``resolved`` (it now leaves as a DPO row or a drop).

Method, in a child version (curate calls the functions below through small hooks):

1. :func:`attach` -- a review whose prompt or responses differ from the pair it names (the
   first non-review judgment of that pair_id) is never merged into the pair: it takes its own
   content-derived pair_id (so the pair's judgments cannot conflict) and is flagged
   ``review_text_mismatch`` by the ``reviews`` check (dropped by default).
2. :func:`classify` -- every review gets one status: ``text_mismatch``; ``unknown_pair`` (no
   judgment of the lineage names the pair; flagged, dropped by default); ``not_routed`` (a known
   pair no version of the lineage routed; flagged ``review_not_routed``, kept as an ordinary
   judgment); ``not_human``; ``unqualified`` (with a registry: the registry check's
   ``unknown_annotator`` / ``kind_mismatch`` / ``unqualified_reviewer``); else ``qualified``.
3. :func:`resolve` (policy ``reviews.mode = "resolve"``, the default), over an aggregation: a
   routed pair with at least one qualified review whose verdict is decisive (``a``/``b``) takes
   the plurality of its qualified reviews (one vote per reviewer, in the pair's orientation):
   ``label_consensus`` is that verdict, ``agreement`` the share of the reviews' votes for it,
   ``strength`` their mean strength, ``annotator_kind`` human and ``p_a_weighted`` null (the
   weight is then the reviews' agreement).  A tie between reviews, or reviews without a decisive
   qualified one, keep the pair routed as it was -- a pair the parent still routes; one resolved
   since is routed again by qualified reviews only (the others are ordinary judgments of it).
   Select and split then treat it like any pair.
   Under ``mode = "vote"`` nothing is overridden: reviews are ordinary votes.  The original
   judgments are kept either way (``judgments.parquet``, ``source_comparison_ids``).
4. :func:`finish` -- the new review state and ``ledger.reviews`` (which adds up:
   ``routed_ever = resolved + open``, ``open`` = the version's routed pairs).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import polars as pl

from pipeline.hashing import pair_id_expr
from schemas.manifest import ReviewLedger
from schemas.records import LABELS, ROUTED_LABELS

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.aggregate import Aggregation
    from pipeline.store import VersionHandle
    from schemas.registry import AnnotatorRegistry

STATE = "review_state"
STATE_SCHEMA: dict[str, pl.DataType] = {
    "pair_id": pl.String, "route": pl.String, "routed_in": pl.String, "routed_at": pl.Datetime("us", "UTC"),
    "status": pl.String, "resolved_in": pl.String, "outcome": pl.String, "reviews": pl.Int64,
    "qualified_reviews": pl.Int64, "review_label": pl.String, "exported": pl.Boolean,
}
STATUSES = ("text_mismatch", "unknown_pair", "not_routed", "not_human", "unqualified", "qualified")
_OF_ROUTED = ["not_human", "unqualified", "qualified"]  # reviews of a pair the lineage routed
_REGISTRY_REASONS = ("unknown_annotator", "kind_mismatch", "unqualified_reviewer")


def empty_state() -> pl.DataFrame:
    return pl.DataFrame(schema=STATE_SCHEMA)


@dataclass(frozen=True)
class ReviewContext:
    """What a version's build knows about reviews before it starts: the pairs its lineage routed
    (``before``: the parent's review state), the policy's mode and registry, the exported pairs."""

    before: pl.DataFrame
    mode: str = "resolve"
    registry: AnnotatorRegistry | None = None
    exported: frozenset[str] = frozenset()


def state_of(handle: VersionHandle) -> pl.DataFrame:
    """A version's review state; for a version written before the table existed, its routed pairs
    (routed there, open)."""
    if handle.table(STATE) is not None:
        return handle.read(STATE).select(list(STATE_SCHEMA)).cast(STATE_SCHEMA)  # type: ignore[arg-type]
    routed = handle.read("routed.parquet", columns=["pair_id", "route"])
    m = handle.manifest()
    return routed.select(
        "pair_id", "route", routed_in=pl.lit(handle.version_id), routed_at=pl.lit(m.created_at).cast(pl.Datetime("us", "UTC")),
        status=pl.lit("open"), resolved_in=pl.lit(None, pl.String), outcome=pl.lit(None, pl.String),
        reviews=pl.lit(0, pl.Int64), qualified_reviews=pl.lit(0, pl.Int64), review_label=pl.lit(None, pl.String),
        exported=pl.lit(False),
    ).cast(STATE_SCHEMA)  # type: ignore[arg-type]


def context(parent: VersionHandle | None, *, mode: str, registry: AnnotatorRegistry | None,
            exported: frozenset[str] = frozenset()) -> ReviewContext:
    before = state_of(parent) if parent is not None else empty_state()
    return ReviewContext(before, mode, registry, exported)


def has_reviews(judgments: pl.DataFrame) -> bool:
    return "review_of" in judgments.columns and judgments["review_of"].null_count() < judgments.height


# ---------------------------------------------------------------- 1. attach
def attach(judgments: pl.DataFrame, *, from_row: int = 0,
           complete: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> pl.DataFrame:
    """Reviews (at row ``from_row`` or later: the rows a child adds to its parent's) whose prompt or
    responses differ from the pair they name get their own content-derived pair_id (never merged
    into that pair).  Unchanged (the same frame) without such reviews.  ``complete``: gives the rows
    it compares their response hashes when ``judgments`` lacks them (a child's union)."""
    if not has_reviews(judgments.slice(from_row)):
        return judgments
    c = pl.col
    ref = _reference(judgments, complete)
    rows = judgments.with_row_index("_r").filter(c("review_of").is_not_null() & (c("_r") >= from_row))
    rows = _hashed(rows, complete).select("_r", "review_of", "prompt_hash", "a_hash", "b_hash") \
        .join(ref, left_on="review_of", right_on="pair_id", how="inner")
    bad = rows.filter((c("prompt_hash") != c("_ph")) | (pl.min_horizontal("a_hash", "b_hash") != c("_lo"))
                      | (pl.max_horizontal("a_hash", "b_hash") != c("_hi")))
    if bad.height == 0:
        return judgments
    new_ids = bad.select("_r", _pid=pair_id_expr(c("prompt_hash"), c("a_hash"), c("b_hash")))
    idx = judgments.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_r")).join(new_ids, on="_r", how="left",
                                                                                     maintain_order="left")["_pid"]
    return judgments.with_columns(pair_id=pl.coalesce(idx, c("pair_id")))


def _hashed(rows: pl.DataFrame, complete: Callable[[pl.DataFrame], pl.DataFrame] | None) -> pl.DataFrame:
    """``rows`` with their response hashes (completed when they lack them)."""
    return rows if "a_hash" in rows.columns or complete is None else complete(rows)


def _reference(judgments: pl.DataFrame, complete: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> pl.DataFrame:
    """Per pair named by a review: the content of its first non-review judgment (``_ph``, ``_lo``, ``_hi``)."""
    c = pl.col
    named = judgments.select("review_of").drop_nulls().unique()
    rows = judgments.filter(c("review_of").is_null()).join(named, left_on="pair_id", right_on="review_of", how="semi")
    return _hashed(rows, complete).group_by("pair_id", maintain_order=True).agg(
        _ph=c("prompt_hash").first(), _lo=pl.min_horizontal("a_hash", "b_hash").first(),
        _hi=pl.max_horizontal("a_hash", "b_hash").first())


# ---------------------------------------------------------------- 2. classify
def classify(judgments: pl.DataFrame, ctx: ReviewContext | None,
             complete: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> pl.DataFrame:
    """One row per review judgment: comparison_id, pair_id, review_of, annotator_id, annotator_kind,
    label, a_hash, strength, status (:data:`STATUSES`, the first that applies).  ``complete``: the
    review rows with the columns ``judgments`` lacks (:class:`pipeline.incremental.Completer`)."""
    c = pl.col
    cols = ["comparison_id", "pair_id", "review_of", "annotator_id", "annotator_kind", "label", "a_hash", "strength"]
    if not has_reviews(judgments):
        return pl.DataFrame(schema={**{k: pl.String for k in cols}, "strength": pl.Float64, "status": pl.String})
    rows = judgments.filter(c("review_of").is_not_null())
    rows = complete(rows) if complete is not None else rows
    rv = rows.select(
        *[c(k) if k in rows.columns else pl.lit(None, pl.Float64 if k == "strength" else pl.String).alias(k) for k in cols])
    rv = rv.with_columns(c("label").cast(pl.String), c("strength").cast(pl.Float64))
    known = judgments.filter(c("review_of").is_null()).select("pair_id").unique()
    before = ctx.before.select("pair_id") if ctx is not None else pl.DataFrame(schema={"pair_id": pl.String})
    unqualified: list[str] = []
    if ctx is not None and ctx.registry is not None and rv.height:
        from pipeline.checks.registry import findings

        # (the review rows, completed, with the locale and rubric of the pair each reviews)
        found = findings(_registry_input(rows, _pair_values(judgments, rows, complete)), ctx.registry)
        unqualified = found.filter(c("reason").is_in(list(_REGISTRY_REASONS)))["comparison_id"].to_list()
    rv = rv.with_columns(_known=c("review_of").is_in(known["pair_id"].implode()),
                         _before=c("review_of").is_in(before["pair_id"].implode()))
    status = (pl.when(c("pair_id") != c("review_of")).then(pl.lit("text_mismatch"))
              .when(~c("_known") & ~c("_before")).then(pl.lit("unknown_pair"))
              .when(~c("_before")).then(pl.lit("not_routed"))
              .when(c("annotator_kind") != "human").then(pl.lit("not_human"))
              .when(c("comparison_id").is_in(pl.Series(unqualified, dtype=pl.String).implode())).then(pl.lit("unqualified"))
              .otherwise(pl.lit("qualified")))
    return rv.with_columns(status=status).drop("_known", "_before")


def _pair_values(judgments: pl.DataFrame, reviews: pl.DataFrame,
                 complete: Callable[[pl.DataFrame], pl.DataFrame] | None) -> pl.DataFrame:
    """Per pair the ``reviews`` are of (their ``pair_id``: the pair named, or their own content's when their texts
    differ from it): ``_ploc``, ``_prub``, the first locale and rubric its non-review judgments give
    (:func:`pipeline.checks.registry.pair_values`).  A review row's own locale and rubric are what the tool sent
    back (a JSONL column, Label Studio task data or Argilla metadata edited or emptied between export and import,
    a hand-written batch): they do not say which language the reviewer read nor under which rubric."""
    from pipeline.checks.registry import pair_values

    c = pl.col
    named = reviews.select("pair_id").unique()
    rows = judgments.filter(c("review_of").is_null()).join(named, on="pair_id", how="semi")
    if "locale" not in rows.columns and complete is not None and rows.height:
        rows = complete(rows)
    if "locale" not in rows.columns and "rubric" not in rows.columns:
        # (the partitioned first build: no pair is routed before it, none qualifies)
        return pl.DataFrame(schema={"pair_id": pl.String, "_ploc": pl.String, "_prub": pl.String})
    return pair_values(rows)


def _registry_input(judgments: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """The review rows as the registry check reads them, each with its pair's locale and rubric where the pair has
    one: a reviewer is qualified for the language and rubric of the pair reviewed, whatever the review row names."""
    from pipeline.checks.registry import as_reviewed

    keep = [k for k in ("comparison_id", "annotator_id", "annotator_kind", "pair_id", "locale", "rubric", "created_at")
            if k in judgments.columns]
    rows = judgments.filter(pl.col("review_of").is_not_null()).select(keep)
    return as_reviewed(rows, pairs).drop("pair_id")


# ---------------------------------------------------------------- 3. resolve
def votes(reviews: pl.DataFrame, pairs: pl.DataFrame, a_hash: pl.Series | None) -> pl.DataFrame:
    """Per reviewed pair (qualified reviews only, in the orientation of ``pairs``): the verdict
    the reviews decide (``review_label``, null on a tie or without a decisive review), ``tie``,
    ``agreement``, ``strength``, ``qualified_reviews``."""
    c = pl.col
    q = reviews.filter(c("status") == "qualified")
    out_schema = {"pair_id": pl.String, "review_label": pl.String, "tie": pl.Boolean, "agreement": pl.Float64,
                  "strength": pl.Float64, "qualified_reviews": pl.Int64}
    if q.height == 0:
        return pl.DataFrame(schema=out_schema)
    # a review naming the responses the other way round than the pair's canonical orientation: a <-> b
    canon_a = a_hash if a_hash is not None else pl.Series([None] * pairs.height, dtype=pl.String)
    q = q.join(pl.DataFrame({"pair_id": pairs["pair_id"], "_ca": canon_a}), on="pair_id", how="inner").with_columns(
        label=pl.when(c("_ca").is_not_null() & (c("a_hash") != c("_ca")) & c("label").is_in(["a", "b"]))
        .then(c("label").replace({"a": "b", "b": "a"})).otherwise(c("label")))
    q = q.with_columns(_w=1.0 / pl.len().over("pair_id", "annotator_id"))  # one vote per reviewer per pair
    per = q.group_by("pair_id", "label").agg(_v=c("_w").sum(), _s=c("strength").mean())
    tot = per.group_by("pair_id").agg(_tot=c("_v").sum(), _top=c("_v").max(),
                                      _dec=c("label").is_in(["a", "b"]).any())
    per = per.join(tot, on="pair_id").with_columns(_is_top=(c("_v") >= c("_top") - 1e-9))
    res = per.filter(c("_is_top")).group_by("pair_id").agg(
        _n_top=pl.len(), _label=c("label").first(), _agree=(c("_v") / c("_tot")).first(), _str=c("_s").first(),
        _dec=c("_dec").first())
    n = q.group_by("pair_id").agg(qualified_reviews=pl.len())
    decided = c("_dec") & (c("_n_top") == 1)
    return res.join(n, on="pair_id").select(
        "pair_id", review_label=pl.when(decided).then(c("_label")), tie=c("_dec") & (c("_n_top") > 1),
        agreement=pl.when(decided).then(c("_agree")), strength=pl.when(decided).then(c("_str")),
        qualified_reviews="qualified_reviews").cast(out_schema)  # type: ignore[arg-type]


# the columns of the pairs :func:`resolve` reads and rewrites (it keeps the others as they are)
RESOLVE_COLUMNS = ("pair_id", "label_consensus", "label_human", "agreement", "strength", "p_a_weighted", "annotator_kind")


def resolve(aggr: Aggregation, reviews: pl.DataFrame, ctx: ReviewContext) -> Aggregation:
    """The aggregation with routed pairs decided by their reviews (module docstring, step 3).
    ``reviews``: :func:`classify` of the judgments aggregated.  Unchanged under mode ``vote``."""
    from pipeline.aggregate import Aggregation

    of_routed = reviews.filter(pl.col("status").is_in(_OF_ROUTED))
    if ctx.mode != "resolve" or of_routed.height == 0:
        return aggr
    c = pl.col
    v = votes(of_routed, aggr.pairs, aggr.a_hash).rename({"agreement": "_agree", "strength": "_str"})
    # a pair the parent still routes stays routed without a decisive qualified review; a pair resolved before is
    # routed again only by qualified reviews (an AI's or an unqualified reviewer's review is an ordinary judgment)
    touched = of_routed.group_by("pair_id").agg(_qualified=(c("status") == "qualified").any()) \
        .join(ctx.before.select("pair_id", _route="route", _open=c("status") == "open"), on="pair_id", how="left") \
        .join(v, on="pair_id", how="left")
    p = aggr.pairs.join(touched, on="pair_id", how="left", maintain_order="left")
    decided = c("review_label").is_not_null()
    keep_routed = c("_route").is_not_null() & c("_route").is_in(list(ROUTED_LABELS)) \
        & (c("_open").fill_null(True) | c("_qualified").fill_null(False))
    label = pl.when(decided).then(c("review_label")).when(keep_routed).then(c("_route")).otherwise(c("label_consensus"))
    p = p.with_columns(
        label_consensus=label.cast(aggr.pairs.schema["label_consensus"]),
        label_human=pl.when(decided).then(c("review_label")).otherwise(c("label_human")).cast(aggr.pairs.schema["label_human"]),
        agreement=pl.when(decided).then(c("_agree")).otherwise(c("agreement")),
        strength=pl.when(decided).then(c("_str")).otherwise(c("strength")),
        p_a_weighted=pl.when(decided).then(pl.lit(None, pl.Float64)).otherwise(c("p_a_weighted")),
        annotator_kind=pl.when(decided).then(pl.lit("human")).otherwise(c("annotator_kind")).cast(aggr.pairs.schema["annotator_kind"]),
    )
    return Aggregation(p.select(aggr.pairs.columns), aggr.annotators, aggr.a_hash)


# ---------------------------------------------------------------- 4. state and ledger
def finish(ctx: ReviewContext, *, version_id: str, created_at: datetime, pairs: pl.DataFrame, routed: pl.DataFrame,
           reviews: pl.DataFrame, decided_by_reviews: pl.DataFrame, n_review_judgments: int) -> tuple[pl.DataFrame, ReviewLedger]:
    """The version's review state and ``ledger.reviews``.

    ``pairs``: every pair with ``decision`` / ``reason`` (select); ``routed``: pair_id, route;
    ``reviews``: :func:`classify`; ``decided_by_reviews``: :func:`votes` of the final aggregation."""
    c = pl.col
    now = pl.lit(created_at).cast(pl.Datetime("us", "UTC"))
    new = routed.select("pair_id", "route").join(ctx.before.select("pair_id"), on="pair_id", how="anti").select(
        "pair_id", "route", routed_in=pl.lit(version_id), routed_at=now)
    base = pl.concat([ctx.before.select("pair_id", "route", "routed_in", "routed_at", _was="status", _rin="resolved_in"),
                      new.with_columns(_was=pl.lit(None, pl.String), _rin=pl.lit(None, pl.String))], how="vertical_relaxed")
    of_routed = reviews.filter(c("status").is_in(_OF_ROUTED))
    counts = of_routed.group_by("pair_id").agg(reviews=pl.len(), qualified_reviews=(c("status") == "qualified").sum())
    now_routed = routed.select("pair_id", _now_route="route")
    fate = pairs.filter(c("pair_id").is_in(base["pair_id"].implode())).select("pair_id", "decision", "reason")  # the few
    st = base.join(now_routed, on="pair_id", how="left").join(fate, on="pair_id", how="left") \
        .join(counts, on="pair_id", how="left").join(decided_by_reviews.select("pair_id", "review_label"), on="pair_id", how="left")
    is_open = c("_now_route").is_not_null()
    outcome = pl.when(is_open).then(pl.lit(None, pl.String)).when(c("decision") == "keep").then(pl.lit("keep")) \
        .otherwise(pl.lit("drop:") + c("reason").fill_null("all_judgments_dropped"))
    st = st.select(
        "pair_id", route=pl.coalesce("_now_route", "route"), routed_in="routed_in", routed_at="routed_at",
        status=pl.when(is_open).then(pl.lit("open")).otherwise(pl.lit("resolved")),
        resolved_in=pl.when(is_open).then(pl.lit(None, pl.String))
        .when(c("_was") == "resolved").then(pl.coalesce("_rin", pl.lit(version_id))).otherwise(pl.lit(version_id)),
        outcome=outcome, reviews=c("reviews").fill_null(0).cast(pl.Int64),
        qualified_reviews=c("qualified_reviews").fill_null(0).cast(pl.Int64),
        review_label=c("review_label"), exported=c("pair_id").is_in(pl.Series(sorted(ctx.exported), dtype=pl.String).implode()),
    ).cast(STATE_SCHEMA).sort("pair_id")  # type: ignore[arg-type]
    resolving = ctx.mode == "resolve"
    by_reviews = st.filter((c("status") == "resolved") & c("review_label").is_in(["a", "b"]) & pl.lit(resolving))
    ties = decided_by_reviews.filter(c("tie") & pl.lit(resolving)).select("pair_id")
    ledger = ReviewLedger(
        mode=ctx.mode,  # type: ignore[arg-type]
        judgments=n_review_judgments, judgments_of_routed=of_routed.height,
        routed_ever=st.height, exported=int(st["exported"].sum()), reviewed=int((st["reviews"] > 0).sum()),
        resolved=int((st["status"] == "resolved").sum()), resolved_by_reviews=by_reviews.height,
        kept_routed_by_review_tie=st.filter(c("status") == "open").join(ties, on="pair_id", how="semi").height,
        open=int((st["status"] == "open").sum()),
    )
    return st, ledger


def open_reviews(state: pl.DataFrame, now: datetime) -> pl.DataFrame:
    """The open rows of a review state, oldest first, with ``age_days`` since the version that routed them."""
    c = pl.col
    return state.filter(c("status") == "open").with_columns(
        age_days=((pl.lit(now).cast(pl.Datetime("us", "UTC")) - c("routed_at")).dt.total_seconds() / 86400.0).round(2)
    ).sort("routed_at", "pair_id")


def open_reviews_of(handle: VersionHandle, now: datetime | None = None) -> pl.DataFrame:
    """A version's open reviews (:func:`open_reviews`): pair_id, route, routed_in, routed_at, age_days, reviews."""
    from datetime import UTC

    st = open_reviews(state_of(handle), now or datetime.now(UTC))
    return st.select("pair_id", "route", "routed_in", "routed_at", "age_days", "reviews")


__all__ = ["LABELS", "RESOLVE_COLUMNS", "STATE", "STATE_SCHEMA", "ReviewContext", "attach", "classify", "context", "empty_state", "finish",
           "has_reviews", "open_reviews", "open_reviews_of", "resolve", "state_of", "votes"]
