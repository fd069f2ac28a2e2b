"""Per-dimension verdicts: consensus, agreement and bias per dimension; ``dimension_conflict`` per pair.

Method
------
* Consensus per (pair, dimension): :func:`pipeline.dimensions.consensus` (the aggregation's
  plurality + Dawid-Skene / order-aware DS, run once over every dimension's verdicts).  A
  re-delivered copy (:func:`pipeline.checks.agreement.ratings`, the preliminary consensus's
  votes) gives no verdict: not in the consensus, nor in the per-dimension figures below
  (``per_dimension[d].judgments`` counts the judgments that vote on d); ``judgments_with_dimensions``
  and ``labels_derived`` count every delivery, as the totals do.
* ``dimension_conflict`` (subject ``pair``): the pair's consensus verdicts on two dimensions
  name opposite sides (one ``a``, another ``b``).  Default action ``warn``: the policy's
  dimension rule (``[dimensions]`` priority or primary + veto) decides such a pair's label
  (:func:`pipeline.dimensions.apply_rule`); a policy may drop or down-weight them instead.
  Found on the preliminary consensus (every judgment); select acts on the flag only where the
  final pair's per-dimension consensus (``PairRecord.dimensions``, of the judgments it keeps)
  still names both sides (``Reason.holds``): a conflict made only by a dropped annotator's or a
  re-delivered copy's verdicts does not drop the pair.
  ``metrics.conflict_matrix[d1][d2]``: pairs in conflict on d1 and d2 (symmetric).
* Per dimension d, on the judgments that gave a verdict on d with ``label`` / ``strength``
  taken from it (:func:`pipeline.dimensions.dimension_frame` of the judgments that vote): the agreement check
  (Krippendorff's alpha and Fleiss' kappa with bootstrap CIs per annotator kind, per-pair
  agreement), the position-bias check and the length-bias check, run exactly as on the
  overall labels; their figures go into ``metrics.per_dimension[d]``.  Their annotator flags
  are *not* emitted: an annotator is flagged on the overall verdicts (the position and length
  checks); per dimension the flagged annotators are listed in the metrics, so a judge biased
  on one dimension only is visible without being dropped twice.

Status: ``warn`` when any pair is in conflict; ``pass`` otherwise (also without dimensions).
"""
from __future__ import annotations

from typing import Any

import polars as pl

from pipeline import dimensions as dims
from pipeline.checks import agreement, length_bias, position_bias
from pipeline.checks.agreement import ratings
from pipeline.checks.spec import CheckSpec, Reason
from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import ChecksConfig

NAME = "dimensions"
_AGREEMENT_KEYS = ("krippendorff_alpha", "krippendorff_alpha_ci", "fleiss_kappa", "fleiss_kappa_ci", "n_pairs",
                   "n_ratings", "fleiss_m", "fleiss_n_pairs")


def _agreement_metrics(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: {x: m[k].get(x) for x in _AGREEMENT_KEYS if x in m[k]}
                           for k in agreement.KINDS if k in m}
    for k in ("pairs_scored", "low_agreement_pairs", "low_agreement_rate", "mean_agreement", "ratings_treated_as_missing"):
        out[k] = m.get(k)
    return out


def _flagged(result: CheckResult) -> dict[str, list[str]]:
    f = result.flags.filter(pl.col("subject_kind") == "annotator")
    return {r: sorted(set(f.filter(pl.col("reason") == r)["subject_id"].to_list())) for r in sorted(set(f["reason"].to_list()))}


def per_dimension(judgments: pl.DataFrame, cfg: ChecksConfig, long: pl.DataFrame, pairs: pl.DataFrame | None,
                  name: str, lengths: pl.DataFrame | None = None, sums: dict[str, Any] | None = None,
                  rated: Any = None) -> dict[str, Any]:
    """Consensus counts, agreement (alpha / kappa with CIs), position and length bias on one dimension
    (``lengths``: the pairs' response lengths, :func:`pipeline.checks.length_bias.pair_lengths`).
    ``sums``: those checks' states of the dimension's verdicts and its ``counts``
    (:func:`pipeline.partition_checks.check_sums` with ``dimension``): the judgments are then not read.
    ``rated``: the judgments that vote (:func:`pipeline.checks.agreement.ratings`; default all)."""
    fd = dims.dimension_frame(judgments, name, rated) if sums is None else judgments.clear()
    pd = dims.as_written(long.filter(pl.col("name") == name))
    if pairs is not None and {"locale", "tags"} <= set(pairs.columns):
        pd = pd.join(pairs.select("pair_id", "locale", "tags"), on="pair_id", how="left", maintain_order="left")
    s: dict[str, Any] = sums or {}
    ag = agreement.run(fd, cfg, pairs=pd, sums=s.get("agreement"))
    pb = position_bias.run(fd, cfg, sums=s.get("position_bias"))
    lb = length_bias.run(fd, cfg, pairs=pd, lengths=lengths, sums=s.get("length_bias"))
    labels = dict(long.filter(pl.col("name") == name).group_by("label").len().sort("label").iter_rows())
    return {
        "judgments": fd.height if sums is None else int(sums["counts"]["judgments"][0]), "pairs": pd.height,
        "consensus": {str(k) if k is not None else "none": int(v) for k, v in labels.items()},
        "agreement": _agreement_metrics(ag.metrics),
        "position_bias": {k: pb.metrics.get(k) for k in ("first_shown_win_rate", "randomised", "shown_first_a_share",
                                                          "missing_shown_first_share", "decisive_with_shown_first")
                          if k in pb.metrics} | {"flagged": _flagged(pb)},
        "length_bias": {k: lb.metrics.get(k) for k in ("chosen_longer_rate_judgments", "chosen_longer_rate_pairs",
                                                        "judgments_with_length_difference")
                        if k in lb.metrics} | {"flagged": _flagged(lb)},
    }


def run(judgments: pl.DataFrame, cfg: ChecksConfig | None = None, *, pairs: pl.DataFrame | None = None,
        lengths: pl.DataFrame | None = None, long: pl.DataFrame | None = None,
        sums: dict[str, dict[str, Any]] | None = None) -> CheckResult:
    """``long`` and ``sums`` (given together: a run over partitions): the per-dimension consensus
    rows (:func:`pipeline.dimensions.consensus` of these judgments) and, per dimension, the states
    :func:`per_dimension` reads; the judgments are then not read."""
    cfg = cfg if isinstance(cfg, ChecksConfig) else ChecksConfig()
    rated = None
    if sums is None:  # (the preliminary consensus's rows: cached when it aggregated this frame)
        rated = ratings(judgments) if dims.has_dimensions(judgments) else None
        long = dims.consensus(judgments, cfg.aggregation, rated=rated)
    if long is None:
        return CheckResult(name=NAME, status="pass", flags=empty_flags(), summary="no per-dimension verdicts",
                           metrics={"dimensions": [], "pairs_with_dimensions": 0, "conflict_pairs": 0, "conflict_matrix": {}})
    conf = dims.conflicts(long)
    per_pair = conf.group_by("pair_id", maintain_order=True).agg(
        pl.format("{}={} vs {}={}", "name", "label", "name_2", "label_2").str.join("; ").alias("detail"))
    flags = make_flags(per_pair["pair_id"], subject_kind="pair", check=NAME, reason="dimension_conflict",
                       detail=per_pair["detail"])
    names = sorted(long["name"].unique().to_list())
    metrics: dict[str, Any] = {
        "dimensions": names,
        "pairs_with_dimensions": long["pair_id"].n_unique(),
        "judgments_with_dimensions": judgments.height - judgments["dimensions"].null_count(),
        "labels_derived": int(judgments["label_derived"].sum()) if "label_derived" in judgments.columns else 0,
        "conflict_pairs": per_pair.height,
        "conflict_matrix": dims.conflict_matrix(long),
        "per_dimension": {n: per_dimension(judgments, cfg, long, pairs, n, lengths, None if sums is None else sums[n],
                                           rated) for n in names},
    }
    if sums is not None:  # (every dimension's counts carry the same totals)
        counts = sums[names[0]]["counts"]
        metrics["judgments_with_dimensions"] = int(counts["with_dimensions"][0])
        metrics["labels_derived"] = int(counts["labels_derived"][0])
    alphas = ", ".join(f"{n} {_fmt(metrics['per_dimension'][n]['agreement']['all'].get('krippendorff_alpha'))}"
                       for n in names)
    summary = f"{per_pair.height} pairs in conflict across {len(names)} dimensions; alpha (all) {alphas}"
    return CheckResult(name=NAME, status="warn" if per_pair.height else "pass", metrics=metrics, flags=flags,
                       summary=summary)


def _still_in_conflict(checks: ChecksConfig) -> pl.Expr:  # noqa: ARG001 - the signature of Reason.holds
    """The ``dimension_conflict`` rule over PairRecord columns (select's test that it still holds):
    the pair's per-dimension consensus names ``a`` on one dimension and ``b`` on another (a
    dimension has one verdict a pair: :func:`pipeline.dimensions.conflicts` on the list)."""
    labels = pl.col("dimensions").list.eval(pl.element().struct.field("label"))
    return labels.list.contains("a") & labels.list.contains("b")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


CHECK = CheckSpec(
    name=NAME, run=run, config="aggregation", inputs=("pairs", "lengths"), pair_columns=("pair_id", "locale", "tags"),
    # (with dimension verdicts it reads every column of their judgments: a child completes every row then)
    judgment_columns=("dimensions", "label_derived"),
    doc="per-dimension consensus, agreement and bias; pairs whose dimensions name opposite sides",
    reasons=(
        Reason("dimension_conflict", "pair", "warn", "the pair's consensus verdicts on two dimensions name opposite "
               "sides (one a, another b); the policy's dimension rule decides the label", precedence=85,
               holds=_still_in_conflict),
    ))
