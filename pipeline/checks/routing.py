"""Routing counts, label imbalance per slice, and too-easy / ambiguous pairs.

Method
------
* **Routing counts**: judgments labelled ``tie`` / ``both_bad`` / ``escalate``, and pairs
  whose consensus (``label_consensus`` of :mod:`pipeline.aggregate`) is one of them --
  what ``select`` will route away from training.
* **Label imbalance** (subject ``slice``, ids ``locale=<x>`` / ``annotator_kind=<k>``):
  among pairs with a decisive consensus, the share of ``a`` and of ``b`` (canonical
  orientation: the first judgment's a/b, i.e. the data's own names).  A slice is flagged
  when the larger share exceeds ``max_label_share`` *and* an exact two-sided binomial test
  against 0.5 rejects at ``imbalance_alpha`` after Benjamini-Hochberg across slices, and
  the slice has at least ``min_slice_pairs`` such pairs.  The test keeps small balanced
  slices from being flagged by chance (30 balanced pairs exceed 0.65 about 4 % of the
  time; with the test, < 1 %), while a slice at 0.85 is found from ~30 pairs on.
* **too_easy** (severity info): consensus a/b, every judgment used agrees (agreement 1,
  >= 2 judgments) and the mean strength is >= ``easy_strength`` -- little to learn.
* **ambiguous** (severity info): >= 2 judgments used, not unanimous, and mean strength
  of the agreeing judgments <= ``ambiguous_strength`` -- a weak, split verdict.
  Pairs without strength are never easy or ambiguous.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from pipeline.aggregate import aggregate, n_used_expr
from pipeline.checks.agreement import ratings
from pipeline.stats import bh_adjust, binom_two_sided_half
from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import ChecksConfig
from schemas.records import LABELS, ROUTED_LABELS
from pipeline.checks import consensus
from pipeline.checks.spec import CheckSpec, Reason

NAME = "routing"


def slice_shares(pairs: pl.DataFrame) -> pl.DataFrame:
    """Per slice (locale, annotator kind): decisive-consensus pairs, count and share of a and b."""
    c = pl.col
    # counted by (locale, kind) first: a slice name per pair copied a million strings twice
    dec = pairs.lazy().filter(c("label_consensus").is_in(["a", "b"])).group_by("locale", "annotator_kind") \
        .agg(pl.len().alias("pairs"), (c("label_consensus") == "a").sum().alias("n_a")).collect()
    frames = [
        dec.select(slice=pl.lit("locale=") + c("locale").fill_null("unknown"), pairs="pairs", n_a="n_a"),
        dec.select(slice=pl.lit("annotator_kind=") + c("annotator_kind"), pairs="pairs", n_a="n_a"),
    ]
    return (
        pl.concat(frames)
        .group_by("slice")
        .agg(c("pairs").sum().cast(pl.UInt32), c("n_a").sum().cast(pl.UInt32))
        .with_columns(n_b=c("pairs") - c("n_a"))
        .with_columns(share_a=c("n_a") / c("pairs"), share_b=c("n_b") / c("pairs"))
        .sort("slice")
    )


def run(
    judgments: pl.DataFrame,
    cfg: ChecksConfig | None = None,
    *,
    pairs: pl.DataFrame | None = None,
    label_counts: dict[str, int] | None = None,
) -> CheckResult:
    """Routing / imbalance / difficulty over pairs (aggregated here when not given).  ``label_counts``:
    the judgments per label when they are known (summed over partitions): the judgments are then not read."""
    cfg = cfg or ChecksConfig()
    c = pl.col
    if pairs is None:
        pairs = aggregate(judgments, cfg.aggregation, rated=ratings(judgments)).pairs  # (as the preliminary consensus)
    if label_counts is None:
        label_counts = dict(judgments.group_by("label").len().iter_rows()) if judgments.height else {}
    cons_counts = dict(pairs.group_by("label_consensus").len().drop_nulls().iter_rows()) if pairs.height else {}
    metrics: dict[str, Any] = {
        "judgments": sum(label_counts.values()),
        "pairs": pairs.height,
        "judgment_labels": {x: int(label_counts.get(x, 0)) for x in LABELS},
        "pair_consensus": {x: int(cons_counts.get(x, 0)) for x in LABELS},
        "pairs_without_consensus": int(pairs["label_consensus"].null_count()) if pairs.height else 0,
        "routed_pairs": {x: int(cons_counts.get(x, 0)) for x in ROUTED_LABELS},
    }
    if pairs.height == 0:
        return CheckResult(name=NAME, status="pass", metrics=metrics, flags=empty_flags(), summary="no pairs")

    shares = slice_shares(pairs)
    big = shares.select(pl.max_horizontal("n_a", "n_b")).to_series().to_numpy().astype(float)
    n = shares["pairs"].to_numpy().astype(float)
    testable = n >= cfg.min_slice_pairs
    p = np.where(testable, binom_two_sided_half(big, n), np.nan)
    q = bh_adjust(p)
    imbalanced = testable & (big / np.maximum(n, 1) > cfg.max_label_share) & np.where(np.isnan(q), False, q <= cfg.imbalance_alpha)
    shares = shares.with_columns(p_value=pl.Series(p).fill_nan(None), q_value=pl.Series(q).fill_nan(None),
                                 imbalanced=pl.Series(imbalanced))
    bad = shares.filter(c("imbalanced"))
    imb_flags = make_flags(
        bad["slice"], subject_kind="slice", check=NAME, reason="label_imbalance",
        detail=bad.select(pl.format("consensus a {} / b {} of {} pairs (max share {}, BH q={})", c("n_a"), c("n_b"),
                                    c("pairs"), pl.lit(cfg.max_label_share), c("q_value").round(6))).to_series(),
    )

    used = n_used_expr()
    # the columns read first: a filter copies every column of the rows it keeps
    pairs = pairs.select("pair_id", "label_consensus", "agreement", "strength", "annotator_kind", "n_human", "n_ai", "n_judgments")
    easy = pairs.filter(_is_too_easy(cfg))
    amb = pairs.filter(_is_split_and_weak(cfg))
    easy_flags = make_flags(easy["pair_id"], subject_kind="pair", check=NAME, reason="too_easy", severity="info",
                            detail=easy.select(pl.format("unanimous over {} judgments, strength {}", used, c("strength").round(3))).to_series())
    amb_flags = make_flags(amb["pair_id"], subject_kind="pair", check=NAME, reason="ambiguous", severity="info",
                           detail=amb.select(pl.format("agreement {}, strength {}", c("agreement").round(3), c("strength").round(3))).to_series())

    dec = shares.filter(c("slice").str.starts_with("locale="))
    total = int(dec["pairs"].sum())
    metrics.update(
        share_a=(int(dec["n_a"].sum()) / total) if total else None,
        slices={s: {"pairs": int(n_), "share_a": float(sa), "imbalanced": bool(im)}
                for s, n_, sa, im in shares.select("slice", "pairs", "share_a", "imbalanced").iter_rows()},
        imbalanced_slices=int(imbalanced.sum()),
        too_easy=easy.height,
        ambiguous=amb.height,
    )
    status = "warn" if imbalanced.any() else "pass"
    routed = sum(metrics["routed_pairs"].values())
    summary = f"{routed} pairs routed; {int(imbalanced.sum())} imbalanced slice(s); {easy.height} too easy, {amb.height} ambiguous"
    return CheckResult(name=NAME, status=status, metrics=metrics, flags=pl.concat([imb_flags, easy_flags, amb_flags]),
                       tables={"slices": shares}, summary=summary)


def _is_too_easy(cfg: ChecksConfig) -> pl.Expr:
    """The ``too_easy`` rule over PairRecord columns (the flags here; select's test that it still holds)."""
    c = pl.col
    return c("label_consensus").is_in(["a", "b"]) & (n_used_expr() >= 2) & (c("agreement") >= 1.0) \
        & (c("strength") >= cfg.easy_strength)


def _is_split_and_weak(cfg: ChecksConfig) -> pl.Expr:
    """This check's ``ambiguous`` rule over PairRecord columns (the flags here; with the consensus
    check's abstention, select's test that an ``ambiguous`` flag still holds)."""
    c = pl.col
    return (n_used_expr() >= 2) & (c("agreement") < 1.0) & (c("strength") <= cfg.ambiguous_strength)


CHECK = CheckSpec(
    name=NAME, run=run, inputs=("pairs", "label_counts"), doc="label imbalance per slice; too-easy and ambiguous pairs",
    judgment_columns=("label",),
    pair_columns=("pair_id", "locale", "label_consensus", "agreement", "strength", "annotator_kind", "n_human", "n_ai",
                  "n_judgments"),
    reasons=(
        Reason("label_imbalance", "slice", "warn", "a slice's a/b share differs from 0.5 beyond `max_label_share`",
               actions=("warn",)),
        Reason("too_easy", "pair", "warn", "unanimous and at least `easy_strength` strong: little to learn", precedence=80,
               holds=_is_too_easy),
        # emitted by this check and the consensus check: it holds where either rule does
        Reason("ambiguous", "pair", "warn", "split and weak, or the consensus abstained: the evidence nearly cancels",
               precedence=90, holds=lambda checks: _is_split_and_weak(checks) | consensus.abstains()),
    ))
