"""Annotator reliability: agreement with the leave-one-out consensus, gold accuracy and
Dawid-Skene accuracy per annotator; ``low_reliability`` when the evidence says an annotator
is at chance or worse.

Method
------
* **Verdicts, not judgments.**  Every comparison is made per (pair, annotator) unit, one vote
  per annotator per pair (k judgments of a unit weigh 1/k each, as in the aggregation).  A
  unit whose a and b votes cancel -- an AI judge that named a different response in each
  display order -- is **no verdict** and is left out when the reference is a or b: one of
  the two is right whichever response is better, so counting it as one right and one wrong
  would call a judge that is often order-inconsistent "at chance" even when its consistent
  verdicts are accurate.  Order inconsistency has its own reason (``order_inconsistent``,
  checks/position_bias.py) and its own weight in the consensus (pipeline/position_ds.py).
  For an annotator with one judgment per pair (humans) unit = judgment.  A re-delivered copy
  (``exact_duplicate`` within the pair; select drops it) is not counted anywhere in this check
  (:func:`pipeline.checks.agreement.ratings`): in a unit with other verdicts it outweighed them.
* **Leave-one-out (LOO) consensus** (:func:`pipeline.aggregate.loo_reference`).  For each
  unit of annotator j, the reference is the Dawid-Skene weighted a/b estimate of the *other*
  annotators on that pair (one vote per annotator, canonical orientation, any kind), used
  only when it is confident (P >= 0.9: typically two agreeing colleagues).  A random
  colleague has weight ~0, so the reference stays accurate (~97 % on the planted batches vs
  ~92 % for a plain plurality).  Agreement = j's vote share on the reference's label (a tie
  or both_bad answer counts as disagreement).
* **Gold.**  On pairs with ``gold_label``: j's vote share on the gold label (canonical
  orientation; a judgment writes label and gold in its own).
* **Chance rate** of each comparison = sum_c p_j(c) * q_j(c), with p_j the annotator's
  own label distribution and q_j the reference (or gold) label distribution on the same
  units -- the agreement an annotator would reach by answering independently of the item
  (e.g. always "a" in a batch where the reference says "a" 70 % of the time).
* **Two one-sided exact binomial tests per family** (gold; LOO), rate = agreement:

  - *better than chance*: H0 rate <= p0 = chance + ``chance_margin`` * (1 - chance) (0.525
    at chance 0.5), Benjamini-Hochberg at ``alpha`` across annotators.
  - *at chance*: the exact one-sided 1 - ``alpha`` upper confidence bound of the rate is
    below the useful level p_u = chance + ``useful_margin`` * (1 - chance) (0.7 at chance 0.5),
    and the annotator is not shown better than chance.  **Power rule**: this test is run
    only when it finds an annotator exactly at chance with probability >= ``power`` (about
    60 units at chance 0.5), and the annotator has >= ``min_judgments`` decisive judgments.

* **Flag** ``low_reliability`` when gold says at chance, or the LOO consensus says at chance
  and gold does not show the annotator better than chance.  The asymmetry is deliberate:
  agreement with the others can be inflated by errors shared with them (one family of AI
  judges), so it may neither clear an annotator whom gold finds at chance nor flag one whom
  gold shows better than chance; gold accuracy cannot be inflated that way.
* **Status**: ``flagged``; else ``ok`` when a family shows the annotator better than chance
  or had the power to find it at chance; else ``insufficient_data`` (never a flag).

Error rates (exact, per annotator, one family at chance 0.5; the table in docs/checks-stats.md):
an annotator at the useful level or above is flagged with probability <= ``alpha`` at any
number of units; one exactly at chance is found with probability >= ``power`` once the test
runs (>= 0.92 at 60 units, 0.99 at 115); one between (0.6, say) is flagged at most about half
the time near 100 units and less and less as units accumulate (the better-than-chance test
clears it).  No rule separates 0.5 from 0.6 reliably at 100 units; 0.7 keeps every planted
random annotator of the synthetic batches found (tests/test_planted_targets.py).

``reliability_p_value`` in the table is the LOO better-than-chance test's p-value (small =
reliable), ``gold_p_value`` the gold one's, each where that family was tested (powered, or
shown better than chance).  ``ds_accuracy`` comes from the aggregation's Dawid-Skene model
(passed in, or computed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from pipeline.aggregate import A, B, NONE, Encoded, canonical_encoding, encode, loo_independence, loo_reference
from pipeline.aggregate import ds_accuracy as ds_accuracy_of
from pipeline.checks.agreement import ratings
from pipeline.checks.position_bias import kind_counts, majority_kind
from pipeline.stats import bh_reject, binom_greater, binom_less, binom_upper_bound, chance_power
from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import AggregationConfig, AnnotatorTestConfig, ChecksConfig
from pipeline.checks.spec import CheckSpec, Child, Reason, Sums

NAME = "reliability"


@dataclass(frozen=True)
class _Family:
    """One family of comparisons (gold or LOO), per annotator."""

    p_value: np.ndarray  # better-than-chance test
    better: np.ndarray  # shown better than chance (BH)
    powered: np.ndarray  # the at-chance test would find an annotator at chance with probability >= power
    at_chance: np.ndarray  # upper confidence bound below the useful level, powered, not better
    upper: np.ndarray  # the upper confidence bound of the rate
    useful: np.ndarray  # the useful level p_u

    @property
    def tested(self) -> np.ndarray:
        return self.powered | self.better


def _test(k: np.ndarray, n: np.ndarray, chance: np.ndarray, enough: np.ndarray, cfg: AnnotatorTestConfig) -> _Family:
    """Both one-sided tests of one family for every annotator: ``k`` agreeing of ``n`` units
    (vote shares, rounded), chance rate ``chance``; ``enough``: >= ``min_judgments`` decisive."""
    k = np.round(k)
    ok = enough & (n > 0)
    p0 = chance + cfg.chance_margin * (1.0 - chance)
    pu = chance + cfg.useful_margin * (1.0 - chance)
    p = binom_greater(k, n, p0)
    better = bh_reject(np.where(ok, p, np.nan), cfg.alpha)
    powered = ok & (chance_power(n, chance, pu, cfg.alpha) >= cfg.power)
    below = np.nan_to_num(binom_less(k, n, pu), nan=1.0) <= cfg.alpha
    return _Family(p, better, powered, powered & below & ~better, binom_upper_bound(k, n, cfg.alpha), pu)


# vote shares in fixed point: lcm(1..16), so the share of a unit of up to 16 judgments is exact and
# the state's sums are integers (they add and subtract exactly, :class:`pipeline.checks.spec.Sums`)
FP = 720_720
_FAMILIES = ("loo", "gold")
SUMS_COLUMNS = ("n_human", "n_ai", "n_unknown", "n_decisive",
                *(f"{f}_{x}" for f in _FAMILIES for x in ("n", "k", *(f"p{c}" for c in range(5)), *(f"q{c}" for c in range(5)))))
SUMS_SCHEMA = {"annotator_id": pl.String, **{k: pl.Int64 for k in SUMS_COLUMNS}}
PARAMS_SCHEMA = {"annotator_id": pl.String, "ds_accuracy": pl.Float64, "independence": pl.Float64}


def _unit_sums(e: Encoded, ref: np.ndarray, family: str) -> dict[str, np.ndarray]:
    """Per annotator code, the sums behind one family's agreement with ``ref`` (U,) label codes
    (-1 none): ``n`` units counted, ``k`` their vote share on the reference's label, ``p<c>`` their
    vote share on label c, ``q<c>`` units whose reference is c (shares x ``FP``).  One vote per
    unit (a unit's k judgments weigh 1/k); units whose a and b votes cancel are left out when
    ``ref`` is a or b (no verdict).  Chance = sum_c p(c) q(c) / n^2."""
    counts = e.per_unit()  # (U, 5) judgments per label
    n_unit = np.maximum(counts.sum(axis=1), 1)
    own = np.rint(counts * FP / n_unit[:, None])  # each unit's vote shares, fixed point
    no_verdict = (counts[:, A] > 0) & (counts[:, A] == counts[:, B]) & ((ref == A) | (ref == B))
    valid = (ref >= 0) & ~no_verdict
    rows = np.arange(e.n_units)

    def s(wts: np.ndarray) -> np.ndarray:  # integers below 2**53: exact in a float sum
        return np.bincount(e.unit_ann, weights=wts, minlength=e.n_annotators).astype(np.int64)

    return {f"{family}_n": s(valid.astype(float)), f"{family}_k": s(np.where(valid, own[rows, np.clip(ref, 0, 4)], 0.0)),
            **{f"{family}_p{c}": s(own[:, c] * valid) for c in range(5)},
            **{f"{family}_q{c}": s(((ref == c) & valid).astype(float)) for c in range(5)}}


def _gold_ref(e: Encoded) -> np.ndarray:
    g = np.where(e.flipped & (e.gold >= A) & (e.gold <= B), 1 - e.gold, e.gold)  # canonical, like the labels
    ref = np.full(e.n_units, NONE, np.int64)
    rows = np.flatnonzero(g >= 0)
    ref[e.unit[rows]] = g[rows]
    return ref


def _accuracy(e: Encoded, ds_accuracy: pl.DataFrame | None, cfg: AggregationConfig | None) -> np.ndarray:
    """(A,) Dawid-Skene accuracy per annotator code: ``ds_accuracy`` (annotator_id, ds_accuracy: the
    aggregation's), or fitted; NaN for an annotator without a decisive judgment."""
    if ds_accuracy is None:
        return np.where(np.bincount(e.ann, weights=(e.label >= A) & (e.label <= B), minlength=e.n_annotators) > 0,
                        ds_accuracy_of(e, cfg), np.nan)
    return _by_code(e, ds_accuracy, "ds_accuracy")


def _by_code(e: Encoded, frame: pl.DataFrame, col: str) -> np.ndarray:
    return e.ann_ids.to_frame("annotator_id").join(frame.select("annotator_id", col), on="annotator_id", how="left",
                                                   maintain_order="left")[col].cast(pl.Float64).fill_null(np.nan).to_numpy()


def fit_params(judgments: pl.DataFrame | None, ds_accuracy: pl.DataFrame | None = None,
               cfg: AggregationConfig | None = None, *, encoded: Encoded | None = None,
               laid_out: bool = False) -> pl.DataFrame:
    """The parameters the state is counted with: per annotator its Dawid-Skene accuracy (the
    aggregation's ``ds_accuracy`` when given) and the independence factor of its evidence in the
    others' consensus (:func:`pipeline.aggregate.loo_independence`), fitted over these judgments
    in their canonical layout (:func:`pipeline.aggregate.canonical_encoding`: the same parameters in
    any order of the judgments, and over any partitioning of them; ``encoded``: :func:`encode` of
    ``judgments``; ``laid_out``: ``encoded`` is in that layout already, e.g.
    :func:`pipeline.partition_consensus.assemble`'s).  Re-delivered copies are no verdicts
    (:func:`pipeline.checks.agreement.ratings` of ``judgments``; with ``judgments`` None, ``encoded``
    holds the votes only, as :func:`pipeline.partition_consensus.assemble`'s does)."""
    e = encoded or encode(judgments)
    e = e.only(ratings(judgments)) if judgments is not None else e
    e = e if laid_out else canonical_encoding(e)
    acc = _accuracy(e, ds_accuracy, cfg)
    return pl.DataFrame({"annotator_id": e.ann_ids, "ds_accuracy": pl.Series(acc).fill_nan(None),
                         "independence": loo_independence(e, acc)}, schema=PARAMS_SCHEMA).sort("annotator_id")


def count_sums(judgments: pl.DataFrame, params: pl.DataFrame | None = None, *, encoded: Encoded | None = None,
               ds_accuracy: pl.DataFrame | None = None) -> pl.DataFrame:
    """The check's state: per annotator, its judgments per kind, its decisive ones, and the sums
    behind its agreement with the others' consensus (LOO) and with gold (:func:`_unit_sums`).
    Re-delivered copies are not counted (:func:`pipeline.checks.agreement.ratings`: a copy is one
    delivery, and in a unit with other verdicts -- an AI judge's two display orders -- it shifted the
    unit's vote shares and the others' reference).  With ``params`` (:func:`fit_params`) fixed, a pair's contribution depends on its own judgments
    only, so the state adds over disjoint sets of pairs; without, they are fitted on these
    judgments.  Sorted by annotator."""
    if judgments.height == 0:
        return pl.DataFrame(schema=SUMS_SCHEMA)
    full = encoded or encode(judgments)
    params = fit_params(judgments, ds_accuracy, encoded=full) if params is None else params
    delivered = ratings(judgments)
    e = full.only(delivered)
    acc, indep = _by_code(e, params, "ds_accuracy"), _by_code(e, params, "independence")
    if np.isnan(indep).any():
        missing = e.ann_ids.filter(pl.Series(np.isnan(indep))).head(3).to_list()
        raise ValueError(f"reliability: no parameters for annotator(s) {missing}")
    ref = loo_reference(e, acc, independence=indep)
    dec = (e.label >= A) & (e.label <= B)
    return pl.DataFrame({
        "annotator_id": e.ann_ids, **kind_counts(judgments, full, delivered),
        "n_decisive": np.bincount(e.ann, weights=dec, minlength=e.n_annotators).astype(np.int64),
        **_unit_sums(e, ref, "loo"), **_unit_sums(e, _gold_ref(e), "gold"),
    }, schema=SUMS_SCHEMA).sort("annotator_id")


def child_params(parent: pl.DataFrame, new: pl.DataFrame, ds_accuracy: pl.DataFrame | None) -> pl.DataFrame:
    """A child's parameters (the rule, docs/incremental.md): the parent's row of every annotator it
    has; an annotator new to it gets the aggregation's accuracy and an independence factor fitted
    on ``new`` (the judgments of the pairs the batch touches) with the others' accuracies as given."""
    if new.height == 0:
        return parent
    fitted = fit_params(new, ds_accuracy)
    return pl.concat([parent, fitted.join(parent, on="annotator_id", how="anti")]).sort("annotator_id")


def _update(spec: Sums, child: Child) -> tuple[pl.DataFrame, pl.DataFrame]:
    assert child.params is not None
    params = child_params(child.params, child.new, child.inputs.get("ds_accuracy"))
    return spec.merge(child.state, count_sums(child.old, params), count_sums(child.new, params)), params


def run(
    judgments: pl.DataFrame,
    cfg: AnnotatorTestConfig | ChecksConfig | None = None,
    *,
    pairs: pl.DataFrame | None = None,  # noqa: ARG001 - same signature as the other checks
    ds_accuracy: pl.DataFrame | None = None,
    encoded: Encoded | None = None,
    sums: pl.DataFrame | None = None,
    sums_params: pl.DataFrame | None = None,
) -> CheckResult:
    """Reliability per annotator.  ``ds_accuracy``: ``Aggregation.params`` (annotator_id,
    ds_accuracy), computed with the default/ChecksConfig aggregation when not given;
    ``encoded``: :func:`pipeline.aggregate.encode` of the same frame, to share work;
    ``sums`` and ``sums_params``: the check's state of these judgments and the parameters it was
    counted with, when they are known (a child's): the judgments are then not read."""
    agg_cfg = cfg.aggregation if isinstance(cfg, ChecksConfig) else None
    cfg = cfg.reliability if isinstance(cfg, ChecksConfig) else (cfg or AnnotatorTestConfig())
    if judgments.height == 0 and sums is None:  # (with its state the judgments are not read)
        return CheckResult(name=NAME, status="pass", metrics={"annotators": 0}, flags=empty_flags(), summary="no judgments",
                           tables={"sums": pl.DataFrame(schema=SUMS_SCHEMA), "sums_params": pl.DataFrame(schema=PARAMS_SCHEMA)})
    c = pl.col
    if sums is None:
        e = encoded or encode(judgments)
        sums_params = fit_params(judgments, ds_accuracy, agg_cfg, encoded=e)
        sums = count_sums(judgments, sums_params, encoded=e)
    assert sums_params is not None
    st = sums

    def col(name: str) -> np.ndarray:
        return st[name].to_numpy().astype(float)

    fam = {}
    for f in _FAMILIES:
        n = col(f"{f}_n")
        p = np.column_stack([col(f"{f}_p{c_}") for c_ in range(5)]) / FP
        q = np.column_stack([col(f"{f}_q{c_}") for c_ in range(5)])
        with np.errstate(invalid="ignore", divide="ignore"):
            fam[f] = (n, col(f"{f}_k") / FP, (p * q).sum(axis=1) / (n * n))
    (loo_n, loo_k, loo_chance), (gold_n, gold_k, gold_chance) = fam["loo"], fam["gold"]
    acc_given = ds_accuracy.select("annotator_id", "ds_accuracy") if ds_accuracy is not None \
        else sums_params.select("annotator_id", "ds_accuracy")
    n_judgments = sum(col(f"n_{k}") for k in ("human", "ai", "unknown"))
    t = pl.DataFrame({
        "annotator_id": st["annotator_id"], "annotator_kind": majority_kind(st),
        "n_judgments": n_judgments.astype(np.int64), "n_decisive": st["n_decisive"],
        "loo_n": loo_n.astype(np.int64), "loo_k": loo_k, "loo_chance": pl.Series(loo_chance).fill_nan(None),
        "gold_n": gold_n.astype(np.int64), "gold_k": gold_k, "gold_chance": pl.Series(gold_chance).fill_nan(None),
    }).join(acc_given, on="annotator_id", how="left", maintain_order="left")
    enough = (t["n_decisive"] >= cfg.min_judgments).to_numpy()
    lf = _test(loo_k, loo_n, np.nan_to_num(loo_chance, nan=0.5), enough, cfg)
    gf = _test(gold_k, gold_n, np.nan_to_num(gold_chance, nan=0.5), enough, cfg)
    # gold decides where it can; the others' consensus only where gold does not show the
    # annotator better than chance, and it never clears one gold finds at chance: agreement
    # with the others can be inflated by errors shared with them, gold accuracy cannot
    flag_gold = gf.at_chance
    flag_loo = ~flag_gold & lf.at_chance & ~gf.better
    flagged = flag_loo | flag_gold
    tested = lf.tested | gf.tested
    t = t.with_columns(
        agreement_with_consensus=pl.when(c("loo_n") > 0).then(c("loo_k") / c("loo_n")),
        gold_accuracy=pl.when(c("gold_n") > 0).then(c("gold_k") / c("gold_n")),
        reliability_p_value=pl.Series(np.where(lf.tested, lf.p_value, np.nan)).fill_nan(None),
        gold_p_value=pl.Series(np.where(gf.tested, gf.p_value, np.nan)).fill_nan(None),
        _loo_upper=pl.Series(lf.upper).fill_nan(None), _loo_useful=pl.Series(lf.useful),
        _gold_upper=pl.Series(gf.upper).fill_nan(None), _gold_useful=pl.Series(gf.useful),
        _flag_loo=pl.Series(flag_loo),
        _flag_gold=pl.Series(flag_gold),
        status=pl.Series(np.where(flagged, "flagged", np.where(tested, "ok", "insufficient_data"))),
    )
    bad = t.filter(c("_flag_loo") | c("_flag_gold"))
    detail = bad.select(
        pl.concat_str(
            [
                pl.when(c("_flag_loo")).then(pl.format(
                    "agreement with the others' consensus {} over {} (chance {}; upper bound {} < useful {}); ",
                    c("agreement_with_consensus").round(3), c("loo_n"), c("loo_chance").round(3), c("_loo_upper").round(3),
                    c("_loo_useful").round(3),
                )).otherwise(pl.lit("")),
                pl.when(c("_flag_gold")).then(pl.format(
                    "gold accuracy {} over {} (chance {}; upper bound {} < useful {})",
                    c("gold_accuracy").round(3), c("gold_n"), c("gold_chance").round(3), c("_gold_upper").round(3),
                    c("_gold_useful").round(3),
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
        "tested": int((tested | flagged).sum()),
        "insufficient_data": int((~(tested | flagged)).sum()),
        "low_reliability": int(flagged.sum()),
        "flagged_by_consensus": int(flag_loo.sum()),
        "flagged_by_gold": int(flag_gold.sum()),
        "median_agreement_with_consensus": _median(table["agreement_with_consensus"]),
        "median_gold_accuracy": _median(table["gold_accuracy"]),
    }
    status = "warn" if flagged.any() else "pass"
    summary = f"{int(flagged.sum())} of {int((tested | flagged).sum())} testable annotators at chance or worse"
    return CheckResult(name=NAME, status=status, metrics=metrics, flags=flags, summary=summary,
                       tables={"annotators": table, "sums": st, "sums_params": sums_params})


def _median(s: pl.Series) -> float | None:
    v = s.drop_nulls()
    return float(v.median()) if v.len() else None  # type: ignore[arg-type]


CHECK = CheckSpec(
    name=NAME, run=run, config="reliability", doc="annotator reliability: gold accuracy, agreement with the consensus",
    inputs=("ds_accuracy", "sums", "sums_params"),
    sums=Sums(count_sums, ("annotator_id",), params=True, format="2", update=_update),  # 2: re-delivered copies not counted
    reasons=(
        Reason("low_reliability", "annotator", "drop", "agreement with consensus / gold accuracy no better than chance"),
    ))
