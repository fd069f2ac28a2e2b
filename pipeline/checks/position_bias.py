"""Position bias: does an annotator (human or AI judge) prefer a display position?

Method
------
* Per annotator, over decisive judgments (``a``/``b``) with ``shown_first``: k = number
  won by the first-shown candidate, n = their number; ``first_shown_rate`` = k / n.
  Ties, ``both_bad`` and ``escalate`` are excluded (they favour no position).
* Each delivery counts once: a re-delivered copy (``exact_duplicate`` within the pair: same
  annotator, display order and verdict; select drops it) is not counted anywhere in this check
  (:func:`pipeline.checks.agreement.ratings`) -- counted, an annotator's re-delivered
  judgments weighed once per copy, and a batch with copies got other figures and flags.
* Exact two-sided binomial test of k against Bin(n, 1/2): favouring the second position
  is a bias too.  Annotators with fewer than ``min_judgments`` such judgments are not
  tested (status ``insufficient_data``, never a flag).  Benjamini-Hochberg at ``alpha``
  across the tested annotators -> ``position_bias`` (subject ``annotator``).  The test
  assumes the better response is shown first half of the time, which holds when display
  order is randomised -- checked below.
* ``order_consistency``: over pairs the same annotator judged in both display orders
  (canonical orientation, so "a first" means the same physical response), the share where
  the verdict (any label) was the same both times; the first judgment of each order is
  used.  Null if there are none.
* **Order inconsistency** (reason ``order_inconsistent``, its own reason beside
  ``position_bias``): over the pairs the annotator judged *decisively* (a/b) in both
  orders, f = pairs whose verdict flipped (it named the first-shown response both times or
  the second-shown both times).  An annotator whose verdict does not depend on the display
  order flips with probability 2 p (1 - p) <= 1/2 on a pair it calls ``a`` with probability
  p, so a flip rate above one half is more than chance allows: one-sided exact binomial
  test of f against Bin(n, 1/2), BH at ``alpha`` across annotators with >= ``min_judgments``
  such pairs.  This catches the judge whose verdict follows the display order pair by pair
  (first on some pairs, second on others) with an overall first-shown rate of 0.5, which
  the first-shown test cannot see; a strongly position-biased judge flips on most pairs
  too and then carries both reasons.  A flipped verdict is no evidence for the pair
  (:mod:`pipeline.position_ds`); the flag tells the policy and certify about the judge.
* Batch level: overall first-shown win rate; whether display order was randomised:
  share of judgments showing canonical ``a`` first among those with ``shown_first``
  (``randomised`` is false when it differs from 0.5 by more than 0.1 *and* a two-sided
  binomial test rejects 0.5 at 0.01 -- big batches are not failed for 0.51), and the
  share with no ``shown_first`` at all.

Status: ``warn`` when an annotator is flagged (either reason), display order is not randomised (the
per-annotator tests are then confounded with quality differences between a and b), or
more than half of the judgments lack ``shown_first`` (position bias mostly untestable).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from pipeline.aggregate import A, B, Encoded, encode
from pipeline.checks.agreement import ratings
from pipeline.stats import bh_adjust, binom_greater, binom_two_sided_half
from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import AnnotatorTestConfig, ChecksConfig
from pipeline.checks.spec import CheckSpec, Reason, Sums

NAME = "position_bias"
RANDOMISED_MAX_DEVIATION = 0.1
RANDOMISED_ALPHA = 0.01
MIN_FOR_RANDOMISATION = 20


def order_consistency(e: Encoded, *, decisive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per annotator: (pairs judged in both display orders, how many got the same verdict).

    Canonical ``shown_first`` identifies the physical response shown first; the first
    judgment of each (pair, annotator, order) is used (``decisive``: the first a/b one, and
    only pairs with an a/b verdict in both orders count)."""
    rows = np.flatnonzero((e.shown >= 0) & ((e.label <= B) if decisive else True))
    key = e.unit[rows].astype(np.int64) * 2 + e.shown[rows]
    uk, first = np.unique(key, return_index=True)
    lab = e.label[rows[first]]
    la = np.full(e.n_units, -9, np.int64)
    lb = np.full(e.n_units, -9, np.int64)
    side_a = uk % 2 == 0
    la[uk[side_a] // 2] = lab[side_a]
    lb[uk[~side_a] // 2] = lab[~side_a]
    both = (la >= 0) & (lb >= 0)
    n = np.bincount(e.unit_ann, weights=both, minlength=e.n_annotators)
    same = np.bincount(e.unit_ann, weights=both & (la == lb), minlength=e.n_annotators)
    return n, same


SUMS_COLUMNS = ("n_human", "n_ai", "n_unknown", "n_decisive", "position_n", "first_won", "a_first", "n_known",
                "order_pairs", "order_same", "order_decisive_pairs", "order_decisive_same")
SUMS_SCHEMA = {"annotator_id": pl.String, **{k: pl.Int64 for k in SUMS_COLUMNS}}
_KINDS = ("human", "ai", "unknown")


def kind_counts(judgments: pl.DataFrame, e: Encoded, counted: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per annotator code, its judgments of each kind (``n_human``, ``n_ai``, ``n_unknown``: a
    missing or unexpected kind counts as unknown, so every judgment counts under one kind);
    ``counted``: the judgments counted (bool per row; default all)."""
    kind = judgments["annotator_kind"].fill_null("unknown").to_numpy()
    kind = np.where(np.isin(kind, ("human", "ai")), kind, "unknown")
    ok = True if counted is None else counted
    return {f"n_{k}": np.bincount(e.ann, weights=(kind == k) & ok, minlength=e.n_annotators).astype(np.int64)
            for k in _KINDS}


def majority_kind(st: pl.DataFrame) -> np.ndarray:
    """An annotator's kind from a state with :func:`kind_counts`: the kind most of its judgments
    name (ties: human, ai, unknown)."""
    per_kind = np.column_stack([st[f"n_{k}"].to_numpy() for k in _KINDS]).reshape(st.height, len(_KINDS))
    return np.array(_KINDS)[np.argmax(per_kind, axis=1) if st.height else np.zeros(0, np.int64)]


def count_sums(judgments: pl.DataFrame, encoded: Encoded | None = None) -> pl.DataFrame:
    """The check's state: per annotator, the counts every figure of the check is computed from --
    judgments per kind, decisive ones, the first-shown test's n and k, canonical-``a``-first and
    known display orders, and the pairs judged in both orders (all / decisive) with how many got
    the same verdict.  Re-delivered copies are not counted (:func:`pipeline.checks.agreement.ratings`;
    order consistency reads the first judgment of each pair, annotator and order, which a copy
    cannot change).  A pair's contribution depends on its own judgments only, so the state adds
    over disjoint sets of pairs (:class:`pipeline.checks.spec.Sums`).  Sorted by annotator."""
    if judgments.height == 0:
        return pl.DataFrame(schema=SUMS_SCHEMA)
    e = encoded or encode(judgments)
    na = e.n_annotators
    delivered = ratings(judgments)

    def per_ann(w: np.ndarray) -> np.ndarray:
        return np.bincount(e.ann, weights=w & delivered, minlength=na).astype(np.int64)

    decisive = (e.raw_label >= A) & (e.raw_label <= B)
    known = e.raw_shown >= 0
    n_both, n_same = order_consistency(e)
    n_ord, n_same_ord = order_consistency(e, decisive=True)
    return pl.DataFrame({
        "annotator_id": e.ann_ids,
        **kind_counts(judgments, e, delivered),
        "n_decisive": per_ann(decisive), "position_n": per_ann(decisive & known),
        "first_won": per_ann(decisive & known & (e.raw_label == e.raw_shown)),
        "a_first": per_ann(e.shown == A), "n_known": per_ann(known),
        "order_pairs": n_both.astype(np.int64), "order_same": n_same.astype(np.int64),
        "order_decisive_pairs": n_ord.astype(np.int64), "order_decisive_same": n_same_ord.astype(np.int64),
    }, schema=SUMS_SCHEMA).sort("annotator_id")


def run(
    judgments: pl.DataFrame,
    cfg: AnnotatorTestConfig | ChecksConfig | None = None,
    *,
    pairs: pl.DataFrame | None = None,  # noqa: ARG001 - same signature as the other checks
    encoded: Encoded | None = None,
    sums: pl.DataFrame | None = None,
) -> CheckResult:
    """Position bias per annotator over a judgments frame (no consensus needed);
    ``encoded``: :func:`pipeline.aggregate.encode` of the same frame, to share work;
    ``sums``: the check's state of these judgments when it is known (a child's): the
    judgments are then not read.  An annotator's kind is the kind most of its judgments
    name (ties: human, ai, unknown)."""
    cfg = cfg.position_bias if isinstance(cfg, ChecksConfig) else (cfg or AnnotatorTestConfig())
    if judgments.height == 0 and sums is None:  # (with its state the judgments are not read)
        return CheckResult(name=NAME, status="pass", metrics={"annotators": 0}, flags=empty_flags(), summary="no judgments",
                           tables={"sums": pl.DataFrame(schema=SUMS_SCHEMA)})
    c = pl.col
    st = count_sums(judgments, encoded) if sums is None else sums
    na = st.height

    def col(name: str) -> np.ndarray:
        return st[name].to_numpy().astype(float)

    per_kind = np.column_stack([st[f"n_{k}"].to_numpy() for k in _KINDS]).reshape(na, len(_KINDS))
    n, k = col("position_n"), col("first_won")
    a_first, n_known = col("a_first"), col("n_known")
    n_judgments = per_kind.sum(axis=1)
    tested = n >= cfg.min_judgments
    p = np.where(tested, binom_two_sided_half(k, n), np.nan)
    q = bh_adjust(p)
    biased = np.where(np.isnan(q), False, q <= cfg.alpha)
    n_both, n_same = col("order_pairs"), col("order_same")
    n_ord, n_same_ord = col("order_decisive_pairs"), col("order_decisive_same")
    flips = n_ord - n_same_ord
    ord_tested = n_ord >= cfg.min_judgments
    ord_p = np.where(ord_tested, binom_greater(flips, n_ord, 0.5), np.nan)
    ord_q = bh_adjust(ord_p)
    inconsistent = np.where(np.isnan(ord_q), False, ord_q <= cfg.alpha)
    with np.errstate(invalid="ignore", divide="ignore"):
        table = pl.DataFrame({
            "annotator_id": st["annotator_id"], "annotator_kind": majority_kind(st),
            "n_judgments": n_judgments.astype(np.int64), "n_decisive": st["n_decisive"],
            "position_n": n.astype(np.int64), "first_won": k.astype(np.int64),
            "first_shown_rate": pl.Series(k / n).fill_nan(None),
            "position_p_value": pl.Series(p).fill_nan(None), "position_q_value": pl.Series(q).fill_nan(None),
            "order_consistency": pl.Series(n_same / n_both).fill_nan(None), "order_pairs": n_both.astype(np.int64),
            "order_decisive_pairs": n_ord.astype(np.int64), "order_flips": flips.astype(np.int64),
            "order_flip_rate": pl.Series(flips / n_ord).fill_nan(None),
            "order_p_value": pl.Series(ord_p).fill_nan(None), "order_q_value": pl.Series(ord_q).fill_nan(None),
            "shown_first_a_share": pl.Series(a_first / n_known).fill_nan(None),
            "status": np.where(biased | inconsistent, "flagged", np.where(tested | ord_tested, "ok", "insufficient_data")),
            "_biased": biased, "_inconsistent": inconsistent,
        })

    bad = table.filter(c("_biased"))
    detail = bad.select(
        pl.format(
            "{}-shown candidate won {} of {} decisive judgments (first-shown rate {}, p={}, BH q={})",
            pl.when(c("first_shown_rate") >= 0.5).then(pl.lit("first")).otherwise(pl.lit("second")),
            pl.when(c("first_shown_rate") >= 0.5).then(c("first_won")).otherwise(c("position_n") - c("first_won")),
            c("position_n"), c("first_shown_rate").round(3), c("position_p_value").round(6), c("position_q_value").round(6),
        )
    ).to_series()
    flags = make_flags(bad["annotator_id"], subject_kind="annotator", check=NAME, reason="position_bias", detail=detail)
    flip = table.filter(c("_inconsistent"))
    flip_detail = flip.select(pl.format(
        "verdict flipped with the display order on {} of {} pairs judged in both orders (flip rate {}; an order-blind "
        "judge flips on at most half, p={}, BH q={}); first-shown rate {}",
        c("order_flips"), c("order_decisive_pairs"), c("order_flip_rate").round(3), c("order_p_value").round(6),
        c("order_q_value").round(6), c("first_shown_rate").round(3),
    )).to_series()
    flags = pl.concat([flags, make_flags(flip["annotator_id"], subject_kind="annotator", check=NAME,
                                         reason="order_inconsistent", detail=flip_detail)])

    metrics = _batch_metrics(int(n_judgments.sum()), int(n_known.sum()), int(a_first.sum()), int(n.sum()), int(k.sum()))
    rate = k / np.maximum(n, 1)
    metrics.update(
        annotators=na,
        tested=int(tested.sum()),
        insufficient_data=int((~tested).sum()),
        position_biased=int(biased.sum()),
        favour_first=int((biased & (rate >= 0.5)).sum()),
        favour_second=int((biased & (rate < 0.5)).sum()),
        order_tested=int(ord_tested.sum()),
        order_inconsistent=int(inconsistent.sum()),
        pairs_judged_in_both_orders=int(n_both.sum()),
        order_consistency=float(n_same.sum() / n_both.sum()) if n_both.sum() else None,
    )
    problems = []
    if biased.any():
        problems.append(f"{int(biased.sum())} position-biased annotator(s)")
    if inconsistent.any():
        problems.append(f"{int(inconsistent.sum())} order-inconsistent annotator(s)")
    if metrics["randomised"] is False:
        problems.append(f"display order not randomised (canonical a shown first {metrics['shown_first_a_share']:.2f})")
    if metrics["missing_shown_first_share"] > 0.5:
        problems.append(f"shown_first missing for {metrics['missing_shown_first_share']:.0%} of judgments")
    status = "warn" if problems else "pass"
    summary = "; ".join(problems) or f"no position bias among {int(tested.sum())} tested annotators"
    return CheckResult(name=NAME, status=status, metrics=metrics, flags=flags,
                       tables={"annotators": table.drop("_biased", "_inconsistent", "first_won"), "sums": st},
                       summary=summary)


def _batch_metrics(n_all: int, known: int, a_first: int, n_pos: int, first_won: int) -> dict[str, Any]:
    share = a_first / known if known else None
    randomised: bool | None = None
    p_rand = None
    if known >= MIN_FOR_RANDOMISATION:
        p_rand = float(binom_two_sided_half(np.array([a_first]), np.array([known]))[0])
        randomised = not (abs(share - 0.5) > RANDOMISED_MAX_DEVIATION and p_rand < RANDOMISED_ALPHA)  # type: ignore[operator]
    return {
        "judgments": n_all,
        "first_shown_win_rate": first_won / n_pos if n_pos else None,
        "decisive_with_shown_first": n_pos,
        "shown_first_a_share": share,
        "randomisation_p_value": p_rand,
        "randomised": randomised,
        "missing_shown_first_share": (n_all - known) / n_all if n_all else 0.0,
    }


CHECK = CheckSpec(
    name=NAME, run=run, config="position_bias", doc="annotators preferring a display position; verdicts that flip with it",
    inputs=("sums",), sums=Sums(count_sums, ("annotator_id",), format="2"),  # 2: re-delivered copies not counted
    reasons=(
        Reason("position_bias", "annotator", "downweight", "prefers one display position (first or second) "
               "significantly more than chance"),
        Reason("order_inconsistent", "annotator", "downweight", "verdicts flip with the display order on more pairs "
               "than chance allows"),
    ))
