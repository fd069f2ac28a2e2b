"""Annotator reliability: agreement with the leave-one-out consensus, gold accuracy and
Dawid-Skene accuracy per annotator; ``low_reliability`` when an annotator is no better
than chance.

Method
------
* **Leave-one-out (LOO) consensus** (:func:`pipeline.aggregate.loo_reference`).  For each
  judgment of annotator j on a pair, the reference is the Dawid-Skene weighted a/b
  estimate of the *other* annotators on that pair (one vote per annotator, canonical
  orientation, any kind), used only when it is confident (P >= 0.9: typically two
  agreeing colleagues).  A random colleague has weight ~0, so the reference stays
  accurate (~97 % on the planted batches vs ~92 % for a plain plurality), which is what
  separates honest annotators from random ones.  Agreement = share of j's judgments on
  such pairs equal to the reference (a tie or both_bad answer counts as disagreement).
* **Gold.**  On items with ``gold_label``: share of j's judgments equal to it (both in the
  judgment's own orientation).
* **Chance rate** of each comparison = sum_c p_j(c) * q_j(c), with p_j the annotator's
  own label distribution and q_j the reference (or gold) label distribution on the same
  items -- the agreement an annotator would reach by answering independently of the
  item (e.g. always "a" in a batch where the reference says "a" 70 % of the time).
* **Test.**  One-sided exact binomial, H0: rate <= p0 = chance + ``chance_margin`` *
  (1 - chance) (0.525 for chance 0.5), H1: rate > p0.  Benjamini-Hochberg at ``alpha``
  across annotators (LOO and gold are separate families) controls the share of
  annotators wrongly *declared reliable*.  ``low_reliability`` when the annotator is not
  declared better than chance by gold accuracy, or -- when the gold test could not be run
  for it -- by LOO agreement.  Gold takes precedence because the LOO consensus is only a
  proxy: on an AI panel where a family of judges errs together, the consensus follows the
  family, and a judge that is right on gold would otherwise be dropped for disagreeing
  with it.  The small margin
  lifts recall of random annotators from ~95 % (a plain test at level 0.05 lets 5 % of
  them through) to ~99 % on the planted batches, at no cost for honest annotators.
* **Power rule (why the flag is safe).**  "Not shown better than chance" is also what
  too few comparisons give, so a test is run only when it has power >= ``power`` against
  an annotator at chance + ``reliable_margin`` * (1 - chance) (0.75 for chance 0.5), and
  the annotator has >= ``min_judgments`` decisive judgments.  Otherwise the test is
  skipped; when no test could be run the annotator's status is ``insufficient_data``,
  never a flag.  With the defaults about 42 comparisons are needed at chance 0.5.

``reliability_p_value`` in the table is the LOO test's p-value (small = reliable);
``gold_p_value`` the gold test's.  ``ds_accuracy`` comes from the aggregation's
Dawid-Skene model (passed in, or computed).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from pipeline.aggregate import A, B, Encoded, encode, loo_reference
from pipeline.aggregate import ds_accuracy as ds_accuracy_of
from pipeline.stats import bh_reject, binom_greater, reliability_power
from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import AnnotatorTestConfig, ChecksConfig
from pipeline.checks.spec import CheckSpec, Reason

NAME = "reliability"


def _test(k: np.ndarray, n: np.ndarray, chance: np.ndarray, enough: np.ndarray, cfg: AnnotatorTestConfig):
    """(p-value, tested, better-than-chance) per annotator for one family of comparisons."""
    p0 = chance + cfg.chance_margin * (1.0 - chance)
    p1 = chance + cfg.reliable_margin * (1.0 - chance)
    power = reliability_power(n, p0, p1, cfg.alpha)
    tested = enough & (n > 0) & (power >= cfg.power) & (p1 > p0)
    p = binom_greater(k, n, p0)
    better = bh_reject(np.where(tested, p, np.nan), cfg.alpha)
    return p, tested, better


def _loo_counts(e: Encoded, accuracy: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per annotator: ``loo_n`` judgments whose LOO reference is a or b, ``loo_k`` agreeing,
    ``loo_chance`` = p(a) q(a) + p(b) q(b) (own label shares x reference shares)."""
    ref = loo_reference(e, accuracy)
    valid = (ref == A) | (ref == B)
    n_unit = np.bincount(e.unit, minlength=e.n_units).astype(float)
    own = e.per_unit()  # counts per unit and label
    rows = np.arange(e.n_units)
    k_unit = np.where(valid, own[rows, np.clip(ref, 0, 4)], 0.0)
    na = e.n_annotators

    def s(wts: np.ndarray) -> np.ndarray:
        return np.bincount(e.unit_ann, weights=wts, minlength=na)

    n = s(n_unit * valid)
    pa, pb, qa = s(own[:, A] * valid), s(own[:, B] * valid), s(n_unit * (ref == A))
    with np.errstate(invalid="ignore", divide="ignore"):
        chance = (pa / n) * (qa / n) + (pb / n) * ((n - qa) / n)
    return {"loo_n": n, "loo_k": s(k_unit), "loo_chance": chance}


def _gold_counts(e: Encoded) -> dict[str, np.ndarray]:
    """Per annotator: ``gold_n``, ``gold_k`` (label == gold_label, as written), ``gold_chance``."""
    g = (e.gold >= 0).astype(float)
    n = np.bincount(e.ann, weights=g, minlength=e.n_annotators)
    k = np.bincount(e.ann, weights=g * (e.raw_label == e.gold), minlength=e.n_annotators)
    own = e.per_ann(g, codes=e.raw_label)
    gold = e.per_ann(g, codes=e.gold)
    with np.errstate(invalid="ignore", divide="ignore"):
        chance = (own * gold).sum(axis=1) / (n * n)
    return {"gold_n": n, "gold_k": k, "gold_chance": chance}


def run(
    judgments: pl.DataFrame,
    cfg: AnnotatorTestConfig | ChecksConfig | None = None,
    *,
    pairs: pl.DataFrame | None = None,  # noqa: ARG001 - same signature as the other checks
    ds_accuracy: pl.DataFrame | None = None,
    encoded: Encoded | None = None,
) -> CheckResult:
    """Reliability per annotator.  ``ds_accuracy``: ``Aggregation.annotators`` (annotator_id,
    ds_accuracy), computed with the default/ChecksConfig aggregation when not given;
    ``encoded``: :func:`pipeline.aggregate.encode` of the same frame, to share work."""
    agg_cfg = cfg.aggregation if isinstance(cfg, ChecksConfig) else None
    cfg = cfg.reliability if isinstance(cfg, ChecksConfig) else (cfg or AnnotatorTestConfig())
    if judgments.height == 0:
        return CheckResult(name=NAME, status="pass", metrics={"annotators": 0}, flags=empty_flags(), summary="no judgments")
    c = pl.col
    e = encoded or encode(judgments)
    if ds_accuracy is None:
        acc = np.where(np.bincount(e.ann, weights=(e.label >= A) & (e.label <= B), minlength=e.n_annotators) > 0,
                       ds_accuracy_of(e, agg_cfg), np.nan)
        ds_accuracy = pl.DataFrame({"annotator_id": e.ann_ids, "ds_accuracy": pl.Series(acc).fill_nan(None)})
    dec = (e.label >= A) & (e.label <= B)
    acc = pl.DataFrame({"annotator_id": e.ann_ids}).join(
        ds_accuracy.select("annotator_id", "ds_accuracy"), on="annotator_id", how="left", maintain_order="left"
    )["ds_accuracy"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    loo, gold = _loo_counts(e, acc), _gold_counts(e)
    t = pl.DataFrame({
        "annotator_id": e.ann_ids, "annotator_kind": e.ann_kind,
        "n_judgments": np.bincount(e.ann, minlength=e.n_annotators).astype(np.int64),
        "n_decisive": np.bincount(e.ann, weights=dec, minlength=e.n_annotators).astype(np.int64),
        **{k: pl.Series(v).fill_nan(None) for k, v in (loo | gold).items()},
    }).join(ds_accuracy.select("annotator_id", "ds_accuracy"), on="annotator_id", how="left", maintain_order="left")
    t = t.with_columns(c("loo_n", "gold_n").fill_null(0).cast(pl.Int64))
    enough = (t["n_decisive"] >= cfg.min_judgments).to_numpy()
    loo_p, loo_tested, loo_better = _test(
        np.round(loo["loo_k"]), loo["loo_n"], np.nan_to_num(loo["loo_chance"], nan=0.5), enough, cfg
    )
    gold_p, gold_tested, gold_better = _test(
        gold["gold_k"], gold["gold_n"], np.nan_to_num(gold["gold_chance"], nan=0.5), enough, cfg
    )
    flag_gold = gold_tested & ~gold_better
    # gold, when it can be tested, decides: the others' consensus is only a proxy for the truth,
    # and one a group of judges that err together can pull away from it
    flag_loo = ~gold_tested & loo_tested & ~loo_better
    flagged = flag_loo | flag_gold
    t = t.with_columns(
        agreement_with_consensus=pl.when(c("loo_n") > 0).then(c("loo_k") / c("loo_n")),
        gold_accuracy=pl.when(c("gold_n") > 0).then(c("gold_k") / c("gold_n")),
        reliability_p_value=pl.Series(np.where(loo_tested, loo_p, np.nan)).fill_nan(None),
        gold_p_value=pl.Series(np.where(gold_tested, gold_p, np.nan)).fill_nan(None),
        _flag_loo=pl.Series(flag_loo),
        _flag_gold=pl.Series(flag_gold),
        status=pl.Series(np.where(flagged, "flagged", np.where(loo_tested | gold_tested, "ok", "insufficient_data"))),
    )
    bad = t.filter(c("_flag_loo") | c("_flag_gold"))
    detail = bad.select(
        pl.concat_str(
            [
                pl.when(c("_flag_loo")).then(pl.format(
                    "agreement with the others' consensus {} over {} (chance {}, p={}); ",
                    c("agreement_with_consensus").round(3), c("loo_n"), c("loo_chance").round(3), c("reliability_p_value").round(4),
                )).otherwise(pl.lit("")),
                pl.when(c("_flag_gold")).then(pl.format(
                    "gold accuracy {} over {} (chance {}, p={})",
                    c("gold_accuracy").round(3), c("gold_n"), c("gold_chance").round(3), c("gold_p_value").round(4),
                )).otherwise(pl.lit("")),
            ]
        ).str.strip_chars("; ")
    ).to_series()
    flags = make_flags(bad["annotator_id"], subject_kind="annotator", check=NAME, reason="low_reliability", detail=detail)
    table = t.select(
        "annotator_id", "annotator_kind", "n_judgments", "n_decisive", "agreement_with_consensus", "loo_n",
        "loo_chance", "reliability_p_value", "gold_n", "gold_accuracy", "gold_p_value", "ds_accuracy", "status",
    ).with_columns(c("gold_n").fill_null(0).cast(pl.Int64))
    metrics: dict[str, Any] = {
        "annotators": t.height,
        "tested": int((loo_tested | gold_tested).sum()),
        "insufficient_data": int((~(loo_tested | gold_tested)).sum()),
        "low_reliability": int(flagged.sum()),
        "flagged_by_consensus": int(flag_loo.sum()),
        "flagged_by_gold": int(flag_gold.sum()),
        "median_agreement_with_consensus": _median(table["agreement_with_consensus"]),
        "median_gold_accuracy": _median(table["gold_accuracy"]),
    }
    status = "warn" if flagged.any() else "pass"
    summary = f"{int(flagged.sum())} of {int((loo_tested | gold_tested).sum())} testable annotators no better than chance"
    return CheckResult(name=NAME, status=status, metrics=metrics, flags=flags, tables={"annotators": table}, summary=summary)


def _median(s: pl.Series) -> float | None:
    v = s.drop_nulls()
    return float(v.median()) if v.len() else None  # type: ignore[arg-type]


CHECK = CheckSpec(
    name=NAME, run=run, config="reliability", doc="annotator reliability: gold accuracy, agreement with the consensus",
    reasons=(
        Reason("low_reliability", "annotator", "drop", "agreement with consensus / gold accuracy no better than chance"),
    ))
