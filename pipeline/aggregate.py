"""Aggregation: judgments -> one row per pair (``PairRecord``) + per-annotator accuracies.

Method
------
1. **Canonical orientation** (:func:`orient`).  Judgments of a derived ``pair_id`` may name
   the two responses in either a/b order.  The orientation of the pair's *first judgment
   in frame order* is canonical (for data given consistently this is simply the input's
   own orientation, and the pair's texts are that judgment's texts).  A judgment whose
   ``a_hash``/``b_hash`` are that orientation swapped is flipped: its ``label``,
   ``shown_first`` and ``gold_label`` have ``a`` and ``b`` exchanged (``c_label``,
   ``c_shown_first``, ``c_gold``).  All counts below are in canonical orientation.
2. **One vote per annotator per pair.**  An annotator who judged a pair k times (an AI
   judge run in both display orders) gives each of those judgments weight 1/k, so
   repeating a judgment never outvotes a second opinion.
3. **Per-kind labels** ``label_human`` / ``label_ai``: plurality of the votes of that kind
   over the five labels.  A tie between ``a`` and ``b`` is broken by the Dawid-Skene
   weighted estimate (below) of the same judgments; any other unresolved tie (or exactly
   balanced evidence) gives ``escalate``.  ``label_majority`` is the plain plurality of
   all raw judgments (null on a tie), for reference only.
4. **Dawid-Skene (one-coin)** on decisive (a/b) judgments, :func:`dawid_skene`: each
   annotator j has an accuracy r_j; the pair posterior is
   ``logit P(a) = sum_i w_i * v_i * log(r_j / (1 - r_j))`` (v = +1 for a, -1 for b,
   flat class prior because a/b are names, not positions); r_j is re-estimated as the
   posterior-expected share of j's decisive judgments that are right, with a Beta(3.5, 1.5)
   prior (mean 0.7, weight of 5 judgments) so annotators with few judgments stay near a
   typical accuracy.  EM for ``ds_iterations`` rounds (stops early on convergence),
   vectorised with ``np.bincount``.  AI judgments enter the E-step with weight
   ``ai_weight`` (0 under ``ignore_ai``); every annotator's accuracy is estimated.
5. **Consensus** ``label_consensus`` per ``AggregationConfig.ai_mode`` -- an AI judge never
   silently outvotes a human:

   * ``human_first`` (default): ``label_human`` when any human judged the pair, else
     ``label_ai``.
   * ``separate``: the label both kinds agree on; when only one kind judged, that kind's
     label; when they disagree, ``escalate``.
   * ``vote``: plurality of human votes + ``ai_weight`` * AI votes (DS tie-break with
     the same weights).
   * ``ignore_ai``: ``label_human`` only (AI-only pairs get no consensus: null label and
     null agreement).

   "Judgments used" are those of the kinds the mode consults for the pair (human only or
   AI only under ``human_first``; both under ``separate``/``vote``; human under
   ``ignore_ai``).  ``agreement`` = share of the used judgments whose label equals the
   consensus; ``strength`` = mean strength of the used judgments agreeing with it;
   ``annotator_kind`` = human / ai / mixed from the used judgments; ``p_a_weighted`` = the
   DS posterior from the used judgments.  ``count_*`` / ``n_*`` count all judgments.

Everything is one Polars group-by over the judgments plus numpy bincounts; no per-row
Python.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy.special import expit

from schemas.arrow import conform, empty_frame, polars_schema
from schemas.check import CheckResult
from schemas.policy import AggregationConfig
from schemas.records import LABELS, AnnotatorStats, PairRecord

__all__ = ["Aggregation", "aggregate", "orient", "dawid_skene", "annotator_votes", "plurality_expr", "annotator_table"]

_EPS = 1e-9
_PRIOR_A, _PRIOR_B = 3.5, 1.5  # Beta prior on annotator accuracy: mean 0.7, weight 5
_ACC_CLIP = (0.02, 0.98)
_SWAP = {"a": "b", "b": "a"}


@dataclass(frozen=True)
class Aggregation:
    """``pairs``: PairRecord columns, one row per pair (first-seen order).
    ``annotators``: annotator_id, annotator_kind, n_judgments, n_decisive, ds_accuracy."""

    pairs: pl.DataFrame
    annotators: pl.DataFrame


# ---------------------------------------------------------------- orientation
def orient(judgments: pl.DataFrame) -> pl.DataFrame:
    """Add ``flipped``, ``c_label``, ``c_shown_first``, ``c_gold`` (canonical orientation).

    Needs ``pair_id``, ``a_hash``, ``b_hash``, ``label``; ``shown_first`` and
    ``gold_label`` are used when present.  Row order and all columns are kept.
    """
    c = pl.col
    canon_a = c("a_hash").first().over("pair_id")
    out = judgments.with_columns(flipped=((c("a_hash") != canon_a) & (c("b_hash") == canon_a)).fill_null(False))

    def swap(name: str) -> pl.Expr:
        return pl.when(c("flipped")).then(c(name).replace(_SWAP)).otherwise(c(name))

    cols = [swap("label").alias("c_label")]
    cols.append(swap("shown_first").alias("c_shown_first") if "shown_first" in out.columns
                else pl.lit(None, dtype=pl.String).alias("c_shown_first"))
    cols.append(swap("gold_label").alias("c_gold") if "gold_label" in out.columns
                else pl.lit(None, dtype=pl.String).alias("c_gold"))
    return out.with_columns(cols)


# ---------------------------------------------------------------- votes and plurality
def annotator_votes(oj: pl.DataFrame, by: tuple[str, ...] = ("pair_id", "annotator_id")) -> pl.DataFrame:
    """Per (pair, annotator): vote share of each label (``v_a`` .. ``v_escalate``, summing to 1)
    from an :func:`orient`-ed frame; plus ``annotator_kind`` and ``n`` (judgments)."""
    lab = pl.col("c_label")
    return oj.group_by(list(by)).agg(
        pl.col("annotator_kind").first(),
        pl.len().alias("n"),
        *[(lab == x).mean().alias(f"v_{x}") for x in LABELS],
    )


def plurality_expr(prefix: str, p_a: str | None, unresolved: str | None) -> pl.Expr:
    """Label with the most votes among columns ``{prefix}{label}``.

    A tie of exactly ``a`` and ``b`` is broken by column ``p_a`` (P(a), e.g. the DS
    estimate) when given and not 0.5; any other tie gives ``unresolved``.  No votes -> null.
    """
    cols = [pl.col(f"{prefix}{x}") for x in LABELS]
    mx = pl.max_horizontal(cols)
    top = [col >= mx - _EPS for col in cols]
    n_top = pl.sum_horizontal([t.cast(pl.Int32) for t in top])
    first = pl.when(top[0]).then(pl.lit("a"))
    for x, t in zip(LABELS[1:], top[1:], strict=True):
        first = first.when(t).then(pl.lit(x))
    expr = pl.when(mx <= _EPS).then(pl.lit(None, dtype=pl.String)).when(n_top == 1).then(first.otherwise(None))
    if p_a is not None:
        ab = (n_top == 2) & top[0] & top[1]
        pa = pl.col(p_a)
        expr = expr.when(ab & (pa > 0.5 + _EPS)).then(pl.lit("a")).when(ab & (pa < 0.5 - _EPS)).then(pl.lit("b"))
    return expr.otherwise(pl.lit(unresolved, dtype=pl.String))


# ---------------------------------------------------------------- Dawid-Skene
def dawid_skene(
    pair_idx: np.ndarray,
    ann_idx: np.ndarray,
    vote: np.ndarray,
    weight: np.ndarray,
    *,
    n_pairs: int,
    n_annotators: int,
    iterations: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One-coin Dawid-Skene EM on decisive judgments.

    ``vote`` is +1 (a) / -1 (b); ``weight`` the judgment's weight in the pair posterior
    (the M-step counts every judgment once).  Returns (accuracy per annotator,
    log-likelihood-ratio weight per annotator ``log(r / (1 - r))``).
    """
    vote = vote.astype(float)
    s = np.bincount(pair_idx, weights=weight * vote, minlength=n_pairs)
    t = np.bincount(pair_idx, weights=weight, minlength=n_pairs)
    q = np.where(t > 0, 0.5 + 0.5 * s / np.maximum(t, _EPS), 0.5)  # weighted vote share of a
    n_j = np.bincount(ann_idx, minlength=n_annotators).astype(float)
    acc = np.full(n_annotators, _PRIOR_A / (_PRIOR_A + _PRIOR_B))
    for _ in range(max(iterations, 1)):
        qp = q[pair_idx]
        right = np.where(vote > 0, qp, 1.0 - qp)
        new_acc = (_PRIOR_A + np.bincount(ann_idx, weights=right, minlength=n_annotators)) / (_PRIOR_A + _PRIOR_B + n_j)
        new_acc = np.clip(new_acc, *_ACC_CLIP)
        llr = np.log(new_acc / (1.0 - new_acc))
        q = expit(np.bincount(pair_idx, weights=weight * vote * llr[ann_idx], minlength=n_pairs))
        converged = np.max(np.abs(new_acc - acc)) < 1e-7
        acc = new_acc
        if converged:
            break
    return acc, np.log(acc / (1.0 - acc))


def _posterior(pair_idx: np.ndarray, vote: np.ndarray, weight: np.ndarray, llr_j: np.ndarray, n_pairs: int) -> np.ndarray:
    """P(a) per pair from the judgments with weight > 0; NaN where there are none."""
    logit = np.bincount(pair_idx, weights=weight * vote * llr_j, minlength=n_pairs)
    has = np.bincount(pair_idx, weights=(weight > 0).astype(float), minlength=n_pairs) > 0
    return np.where(has, expit(logit), np.nan)


# ---------------------------------------------------------------- aggregate
_NEEDED = ("pair_id", "a_hash", "b_hash", "label", "shown_first", "gold_label", "annotator_id",
           "annotator_kind", "strength", "comparison_id", "locale", "tags")
_TEXT_COLS = ("prompt", "prompt_text", "response_a", "response_b", "model_a", "model_b")


def aggregate(judgments: pl.DataFrame, cfg: AggregationConfig | None = None) -> Aggregation:
    """Judgments frame (``schemas.records.Judgment`` columns) -> :class:`Aggregation`."""
    cfg = cfg or AggregationConfig()
    if judgments.height == 0:
        return Aggregation(empty_frame(PairRecord), _empty_annotators())
    c = pl.col
    lab = c("c_label")
    j = orient(judgments.select(list(_NEEDED)).with_row_index("_row"))
    pids = j.select("pair_id").unique(maintain_order=True).with_row_index("_p")
    anns = j.group_by("annotator_id", maintain_order=True).agg(c("annotator_kind").first()).with_row_index("_j")
    j = j.join(pids, on="pair_id", how="left", maintain_order="left").join(
        anns.select("annotator_id", "_j"), on="annotator_id", how="left", maintain_order="left"
    )
    is_h = c("annotator_kind") == "human"
    n_h = is_h.sum().over("_p")
    used = {
        "human_first": pl.when(n_h > 0).then(is_h).otherwise(~is_h),
        "separate": pl.lit(True),
        "vote": pl.lit(True),
        "ignore_ai": is_h,
    }[cfg.ai_mode]
    j = j.with_columns(_h=is_h, _used=used, _w=1.0 / pl.len().over(["_p", "annotator_id"]).cast(pl.Float64))

    # Dawid-Skene on decisive judgments
    n_pairs, n_ann = pids.height, anns.height
    dec = j.filter(lab.is_in(["a", "b"])).select("_p", "_j", "_h", "_w", vote=pl.when(lab == "a").then(1.0).otherwise(-1.0))
    p_idx = dec["_p"].to_numpy().astype(np.int64)
    a_idx = dec["_j"].to_numpy().astype(np.int64)
    vote = dec["vote"].to_numpy()
    hmask = dec["_h"].to_numpy()
    w = dec["_w"].to_numpy()
    ai_w_em = 0.0 if cfg.ai_mode == "ignore_ai" else cfg.ai_weight
    acc, llr = dawid_skene(p_idx, a_idx, vote, w * np.where(hmask, 1.0, ai_w_em),
                           n_pairs=n_pairs, n_annotators=n_ann, iterations=cfg.ds_iterations)
    llr_i = llr[a_idx]
    p_h = _posterior(p_idx, vote, w * hmask, llr_i, n_pairs)
    p_ai = _posterior(p_idx, vote, w * ~hmask, llr_i, n_pairs)
    p_vote = _posterior(p_idx, vote, w * np.where(hmask, 1.0, cfg.ai_weight), llr_i, n_pairs)

    used_c, st = c("_used"), c("strength")
    per = j.group_by("_p").agg(
        pl.len().alias("n_judgments"),
        c("_h").sum().alias("n_human"),
        *[(lab == x).sum().alias(f"count_{x}") for x in LABELS],
        *[((lab == x) & c("_h")).cast(pl.Float64).dot(c("_w")).alias(f"_hv_{x}") for x in LABELS],
        *[((lab == x) & ~c("_h")).cast(pl.Float64).dot(c("_w")).alias(f"_av_{x}") for x in LABELS],
        *[(used_c & (lab == x)).sum().alias(f"_u_{x}") for x in LABELS],
        *[st.filter(used_c & (lab == x)).sum().alias(f"_us_{x}") for x in LABELS],
        *[st.filter(used_c & (lab == x)).count().alias(f"_un_{x}") for x in LABELS],
        (used_c & c("_h")).any().alias("_used_h"),
        (used_c & ~c("_h")).any().alias("_used_ai"),
        c("_row").first().alias("_first_row"),
        c("locale").drop_nulls().first().alias("locale"),
        c("tags").flatten().drop_nulls().unique().sort().alias("tags"),
        c("comparison_id").alias("source_comparison_ids"),
    ).sort("_p")
    per = per.with_columns(
        n_ai=c("n_judgments") - c("n_human"),
        _p_h=pl.Series(p_h).fill_nan(None), _p_ai=pl.Series(p_ai).fill_nan(None), _p_vote=pl.Series(p_vote).fill_nan(None),
        **{f"_vv_{x}": c(f"_hv_{x}") + cfg.ai_weight * c(f"_av_{x}") for x in LABELS},
    ).with_columns(
        label_majority=plurality_expr("count_", None, None),
        label_human=plurality_expr("_hv_", "_p_h", "escalate"),
        label_ai=plurality_expr("_av_", "_p_ai", "escalate"),
        _label_vote=plurality_expr("_vv_", "_p_vote", "escalate"),
    )
    consensus, p_weighted = _consensus(cfg)
    per = per.with_columns(label_consensus=consensus, p_a_weighted=p_weighted)
    per = per.with_columns(
        agreement=_pick("_u_", "label_consensus") / pl.sum_horizontal([c(f"_u_{x}") for x in LABELS]),
        strength=_pick("_us_", "label_consensus") / _pick("_un_", "label_consensus"),
        annotator_kind=pl.when(c("_used_h") & c("_used_ai")).then(pl.lit("mixed"))
        .when(c("_used_h")).then(pl.lit("human")).when(c("_used_ai")).then(pl.lit("ai"))
        .when((c("n_human") > 0) & (c("n_ai") > 0)).then(pl.lit("mixed"))
        .when(c("n_human") > 0).then(pl.lit("human")).otherwise(pl.lit("ai")),
    ).with_columns(agreement=pl.when(c("label_consensus").is_null()).then(None).otherwise(c("agreement")))

    texts = judgments.select(list(_TEXT_COLS))[per["_first_row"]]
    pairs = pl.concat([pids.select("pair_id"), texts, per], how="horizontal")
    pairs = conform(pairs, PairRecord).select(list(polars_schema(PairRecord)))

    ann_stats = j.group_by("_j").agg(pl.len().alias("n_judgments"), lab.is_in(["a", "b"]).sum().alias("n_decisive"))
    annotators = (
        anns.join(ann_stats, on="_j", how="left")
        .sort("_j")
        .with_columns(ds_accuracy=pl.Series(acc))
        .with_columns(ds_accuracy=pl.when(c("n_decisive") > 0).then(c("ds_accuracy")))
        .select("annotator_id", "annotator_kind", "n_judgments", "n_decisive", "ds_accuracy")
    )
    return Aggregation(pairs, annotators)


def _pick(prefix: str, label_col: str) -> pl.Expr:
    """Value of column ``{prefix}{label}`` where label is the row's ``label_col``."""
    lc = pl.col(label_col)
    expr = pl.when(lc == "a").then(pl.col(f"{prefix}a"))
    for x in LABELS[1:]:
        expr = expr.when(lc == x).then(pl.col(f"{prefix}{x}"))
    return expr.otherwise(None).cast(pl.Float64)


def _consensus(cfg: AggregationConfig) -> tuple[pl.Expr, pl.Expr]:
    c = pl.col
    has_h = c("n_human") > 0
    if cfg.ai_mode == "human_first":
        return (pl.when(has_h).then(c("label_human")).otherwise(c("label_ai")),
                pl.when(has_h).then(c("_p_h")).otherwise(c("_p_ai")))
    if cfg.ai_mode == "ignore_ai":
        return c("label_human"), c("_p_h")
    if cfg.ai_mode == "vote":
        return c("_label_vote"), c("_p_vote")
    lh, la = c("label_human"), c("label_ai")  # separate
    label = (pl.when(lh.is_null()).then(la).when(la.is_null()).then(lh)
             .when(lh == la).then(lh).otherwise(pl.lit("escalate")))
    return label, c("_p_vote")


def _empty_annotators() -> pl.DataFrame:
    return pl.DataFrame(schema={"annotator_id": pl.String, "annotator_kind": pl.String, "n_judgments": pl.Int64,
                                "n_decisive": pl.Int64, "ds_accuracy": pl.Float64})


# ---------------------------------------------------------------- annotators.parquet
_STATUS_RANK = {"flagged": 2, "insufficient_data": 1, "ok": 0}


def annotator_table(
    results: Iterable[CheckResult] | Mapping[str, CheckResult],
    ds_accuracy: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Merge the per-check ``tables["annotators"]`` into one ``AnnotatorStats`` table.

    Columns present in several tables (``annotator_kind``, ``n_judgments``,
    ``n_decisive``...) are coalesced in the order the results are given.  ``flags`` is the
    sorted list of reason codes of all annotator flags of the given results;
    ``status`` is ``flagged`` when there is any, else ``insufficient_data`` when some check
    had too few judgments to test the annotator, else ``ok``.  ``ds_accuracy`` may come
    from :attr:`Aggregation.annotators`.  Extra columns of the check tables are kept after
    the ``AnnotatorStats`` columns.
    """
    res = list(results.values()) if isinstance(results, Mapping) else list(results)
    schema = polars_schema(AnnotatorStats)
    tables = [r.tables["annotators"] for r in res if "annotators" in r.tables]
    if ds_accuracy is not None:
        tables.append(ds_accuracy)
    tables = [t for t in tables if t.height]
    if not tables:
        return empty_frame(AnnotatorStats)
    merged = tables[0].rename({"status": "_status_0"}) if "status" in tables[0].columns else tables[0]
    for i, t in enumerate(tables[1:], start=1):
        t = t.rename({"status": f"_status_{i}"}) if "status" in t.columns else t
        common = [x for x in t.columns if x in merged.columns and x != "annotator_id"]
        merged = merged.join(t, on="annotator_id", how="full", coalesce=True, suffix="__r")
        merged = merged.with_columns([pl.coalesce(x, f"{x}__r").alias(x) for x in common]).drop([f"{x}__r" for x in common])
    flag_frames = [r.flags.filter(pl.col("subject_kind") == "annotator") for r in res]
    flags = pl.concat(flag_frames) if flag_frames else pl.DataFrame(schema={"subject_id": pl.String, "reason": pl.String})
    per_ann = flags.group_by("subject_id").agg(pl.col("reason").unique().sort().alias("flags")).rename({"subject_id": "annotator_id"})
    merged = merged.drop("flags", strict=False).join(per_ann, on="annotator_id", how="left")
    status_cols = [x for x in merged.columns if x.startswith("_status_")]
    insufficient = pl.any_horizontal([pl.col(x) == "insufficient_data" for x in status_cols]) if status_cols else pl.lit(False)
    merged = merged.with_columns(
        flags=pl.col("flags").fill_null(pl.lit([], dtype=pl.List(pl.String))),
    ).with_columns(
        status=pl.when(pl.col("flags").list.len() > 0).then(pl.lit("flagged"))
        .when(insufficient.fill_null(False)).then(pl.lit("insufficient_data")).otherwise(pl.lit("ok"))
    ).drop(status_cols)
    for name, dtype in schema.items():
        if name not in merged.columns:
            default = {"n_judgments": 0, "n_decisive": 0, "gold_n": 0}.get(name)
            merged = merged.with_columns(pl.lit(default, dtype=dtype).alias(name))
    extra = [x for x in merged.columns if x not in schema]
    return merged.select([pl.col(n).cast(t) for n, t in schema.items()] + extra).sort("annotator_id")
