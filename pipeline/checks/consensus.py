"""Consensus confidence: pairs where the consensus abstains, and how sure the rest are.

Method
------
* **Confidence** of a pair with an ``a``/``b`` consensus: the share of the judgments'
  accuracy-weighted evidence that supports the consensus side -- ``p_a_weighted`` for
  ``a``, 1 - it for ``b`` (:func:`pipeline.aggregate.evidence_share`; for AI judges the
  evidence of the order-aware model, :mod:`pipeline.position_ds`, in which a verdict that
  flips with the display order supports neither side).  0.5 = the evidence cancels out,
  1 = every judgment that carries evidence points the same way.  With equally reliable
  annotators it is the share of votes for the consensus (a 2-1 human split: 0.67).
* **Abstention** (reason ``ambiguous``, subject ``pair``, severity ``info``): confidence
  below 0.5 + :data:`ABSTAIN_MARGIN` / 2 (0.55), i.e. the evidence for the two sides differs
  by less than a tenth of the total.  On the synthetic judge panels of
  ``benchmarks/quality.py`` (development seeds) the consensus is right on 48-54 % of those
  pairs -- a coin flip -- against 58-77 % in the next band (0.55-0.6) and >= 95 % above 0.9:
  below the margin the label is a guess.  ``select`` already knows ``ambiguous`` (the same
  reason the routing check gives weak split verdicts): ``select.flag_actions.ambiguous =
  "drop"`` leaves those pairs out; by default they stay, weighted by their confidence
  (``select.weight_by = "confidence"``), so they weigh about half a clear pair.
* A consensus below 0.5 (a human plurality against the weighted evidence, e.g. two
  unreliable annotators outvoting a reliable one) abstains as well.

Metrics: ``decided_pairs`` (a/b consensus), ``abstained``, ``abstained_share``,
``mean_confidence`` and ``confidence_quantiles`` (5/25/50/75/95 %) over decided pairs, and
the same per pair ``annotator_kind`` (``by_kind``).  Status ``pass`` always (abstentions
are findings about pairs, not a fault of the batch).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from pipeline.aggregate import aggregate
from pipeline.checks.agreement import ratings
from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import ChecksConfig
from pipeline.checks.spec import CheckSpec, Reason

NAME = "consensus"
ABSTAIN_MARGIN = 0.1  # abstain when |2 confidence - 1| < this
ABSTAIN_BELOW = 0.5 + ABSTAIN_MARGIN / 2


def confidence_expr() -> pl.Expr:
    """Confidence of an a/b consensus (null otherwise or without ``p_a_weighted``)."""
    lab, p = pl.col("label_consensus"), pl.col("p_a_weighted")
    return pl.when(lab == "a").then(p).when(lab == "b").then(1.0 - p)


def abstains() -> pl.Expr:
    """The abstention rule (reason ``ambiguous``) over PairRecord columns: the flags here; select's
    test that an ``ambiguous`` flag still holds (:mod:`pipeline.checks.routing`)."""
    return confidence_expr() < ABSTAIN_BELOW


def run(
    judgments: pl.DataFrame,
    cfg: ChecksConfig | None = None,
    *,
    pairs: pl.DataFrame | None = None,
) -> CheckResult:
    """Abstentions of the consensus over ``pairs`` (aggregated here when not given)."""
    cfg = cfg or ChecksConfig()
    c = pl.col
    if pairs is None:
        pairs = aggregate(judgments, cfg.aggregation, rated=ratings(judgments)).pairs  # (as the preliminary consensus)
    if pairs.height == 0:
        return CheckResult(name=NAME, status="pass", metrics={"pairs": 0}, flags=empty_flags(), summary="no pairs")
    # the decided pairs' confidences without their ids (a copy of a million ids: ~30 MB); the ids of the few
    # that abstain taken from the pairs
    dec = pairs.select("annotator_kind", confidence=confidence_expr()).filter(c("confidence").is_not_null())
    low = ABSTAIN_BELOW
    abst = pairs.filter(abstains()).select("pair_id", confidence=confidence_expr())
    flags = make_flags(
        abst["pair_id"], subject_kind="pair", check=NAME, reason="ambiguous", severity="info",
        detail=abst.select(pl.format("consensus abstains: confidence {} < {} (the weighted evidence for the two sides "
                                     "nearly cancels)", c("confidence").round(3), pl.lit(low))).to_series(),
    ) if abst.height else empty_flags()

    def summary_of(frame: pl.DataFrame) -> dict[str, Any]:
        conf = np.sort(frame["confidence"].to_numpy())  # (sorted: a float sum depends on its order, the pairs' order on how they were computed)
        n_abs = int((conf < low).sum())
        return {
            "decided_pairs": frame.height, "abstained": n_abs,
            "abstained_share": n_abs / frame.height if frame.height else None,
            "mean_confidence": float(conf.mean()) if frame.height else None,
            "confidence_quantiles": [round(float(x), 4) for x in np.quantile(conf, [0.05, 0.25, 0.5, 0.75, 0.95])]
            if frame.height else None,
        }

    metrics: dict[str, Any] = {"pairs": pairs.height, "abstain_below": low, **summary_of(dec)}
    kinds = dec["annotator_kind"].unique().drop_nulls().to_list() if dec.height else []
    metrics["by_kind"] = {k: summary_of(dec.filter(c("annotator_kind") == k)) for k in sorted(kinds)}
    summary = f"{abst.height} of {dec.height} decided pairs abstained (confidence < {low})"
    return CheckResult(name=NAME, status="pass", metrics=metrics, flags=flags, summary=summary)


CHECK = CheckSpec(name=NAME, run=run, emits=("ambiguous",), judgment_columns=(),
                  pair_columns=("pair_id", "annotator_kind", "label_consensus", "p_a_weighted"),
                  doc="the consensus abstains where the weighted evidence nearly cancels")
