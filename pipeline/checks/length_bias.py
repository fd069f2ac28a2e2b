"""Length (verbosity) bias: does an annotator choose the longer response more often than
the other annotators do on the same pairs?

Method
------
* Length = number of Unicode characters of the normalised response (a token estimate
  such as chars/4 would give the same ratios; characters need no tokenizer and work the
  same for CJK, where each character is roughly a token, as for Latin scripts -- both
  responses of a pair are in the same language, so only the ratio matters).  Pairs whose
  longer/shorter ratio is below ``min_length_ratio`` (1.1) are ignored: "longer" means
  nothing there.
* Per decisive judgment on such a pair: x = 1 when the longer response was chosen.  Each
  delivery counts once: a re-delivered copy (``exact_duplicate`` within the pair; select drops
  it) is not counted anywhere in this check (:func:`pipeline.checks.agreement.ratings`) --
  counted, it doubled its judgment's weight in both passes.
* **Paired comparison with the leave-one-out consensus rate.**  For annotator j on pair
  p, e = the other annotators' rate of choosing the longer response on p (one vote each:
  the mean x of each one's decisive judgments).  Discordance weights: W+ = sum x (1 - e)
  ("j chose longer, the others shorter"), W- = sum (1 - x) e.  This is the McNemar /
  sign test on discordant (j, other) comparisons with each judgment's comparisons
  weighted 1/K (K others), so a judgment counts at most once; one-sided (H1: j prefers
  longer more than the others), the exact binomial tail extended to fractional counts
  (:func:`pipeline.stats.fractional_sign_test`).
* Why the others' *individual* choices and not the majority label: when length
  correlates with quality, an annotator's honest errors point to the shorter (or
  longer) response exactly as often as a colleague's errors do, but a majority label
  errs much less -- every annotator would look length-biased against it.  (A stratified
  test against a confident consensus was tried: consensus errors concentrate in the rare
  stratum and gave false flags when longer is usually better.)
* **Two passes.**  A strongly biased colleague shifts e for everyone who shares pairs with
  them (a brevity-biased one would make honest annotators look verbose).  Pass 1 tests
  every annotator two-sided against everyone; those biased either way (BH at ``alpha``)
  are dropped from the reference (``reference_excluded``), and pass 2 runs the one-sided
  test against the remaining annotators.
* Annotators with fewer than ``min_judgments`` comparable judgments are not tested
  (``insufficient_data``).  Benjamini-Hochberg at ``alpha`` -> ``length_bias``.  Brevity
  bias is not flagged (the reason code means "prefers the longer candidate").
* Batch level: chosen-longer rate over decisive judgments and over pairs with a decisive
  consensus, and the chosen/rejected character-ratio distribution of consensus pairs
  (quantiles; ``tables["length_ratio_hist"]`` with log2-ratio bins for the report).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from pipeline.aggregate import A, B, Encoded, encode
from pipeline.checks.agreement import ratings
from pipeline.checks.position_bias import kind_counts, majority_kind
from pipeline.stats import bh_adjust, bh_reject, fractional_sign_test
from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import AnnotatorTestConfig, ChecksConfig
from pipeline.checks.spec import CheckSpec, Child, Reason, Sums

NAME = "length_bias"
HIST_EDGES = np.arange(-3.0, 3.01, 0.25)  # log2(chosen/rejected), clipped to the outer bins
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# shares in fixed point (lcm(1..16): the share of a unit of up to 16 judgments is exact): the state's
# sums are integers, so they add and subtract exactly (:class:`pipeline.checks.spec.Sums`)
FP = 720_720
SUMS_COLUMNS = ("n_human", "n_ai", "n_unknown", "n_decisive", "n_length", "n_longer",
                "p1_n", "p1_plus", "p1_minus", "p2_n", "p2_plus", "p2_minus", "p2_others")
SUMS_SCHEMA = {"annotator_id": pl.String, **{k: pl.Int64 for k in SUMS_COLUMNS}}


def pair_lengths(judgments: pl.DataFrame, e: Encoded, lengths: pl.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(P,) character lengths of the canonical response a and b (the pair's first judgment), from
    the judgments' texts or, given, from ``lengths`` (pair_id, a_hash, len_a, len_b: each pair's
    lengths in the orientation of its ``a_hash``, kept as state by a version,
    :func:`pipeline.incremental.pair_lengths`; then the judgments need no texts).  Given lengths
    are turned to these judgments' orientation (swapped where their canonical ``b`` is the
    state's ``a``: a frame of one dimension's verdicts may start a pair with another judgment);
    a judgment whose responses are not its pair's (a given pair id with other texts, dropped by
    ``pair_id_conflict``) takes its pair's lengths."""
    if lengths is not None:
        rows = pl.DataFrame({"pair_id": e.pair_ids, "_a": judgments["a_hash"].gather(e.pair_first),
                             "_b": judgments["b_hash"].gather(e.pair_first)})
        first = rows.join(lengths.select("pair_id", "a_hash", "len_a", "len_b"), on="pair_id", how="left",
                          maintain_order="left")
        if first["len_a"].null_count():
            raise ValueError(f"length_bias: lengths lack {first['len_a'].null_count()} of the pairs")
        swap = ((first["_a"] != first["a_hash"]) & (first["_b"] == first["a_hash"])).to_numpy()
        la, lb = first["len_a"].to_numpy(), first["len_b"].to_numpy()
        return np.where(swap, lb, la), np.where(swap, la, lb)
    first = judgments.select("response_a", "response_b").filter(e.first_mask())
    return (first["response_a"].str.len_chars().cast(pl.Int64).to_numpy(),
            first["response_b"].str.len_chars().cast(pl.Int64).to_numpy())


def _config(cfg: AnnotatorTestConfig | ChecksConfig | None) -> AnnotatorTestConfig:
    return cfg.length_bias if isinstance(cfg, ChecksConfig) else (cfg or AnnotatorTestConfig())


def _two_sided(st: pl.DataFrame, cfg: AnnotatorTestConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 from a state: (tested, excluded) per row -- annotators biased either way (two-sided,
    BH) against everyone, who are then left out of the reference."""
    n = st["p1_n"].to_numpy().astype(float)
    w_plus, w_minus = st["p1_plus"].to_numpy() / FP, st["p1_minus"].to_numpy() / FP
    tested = n >= cfg.min_judgments
    two_sided = np.minimum(1.0, 2 * np.fmin(fractional_sign_test(w_plus, w_minus), fractional_sign_test(w_minus, w_plus)))
    return tested, bh_reject(np.where(tested, two_sided, np.nan), cfg.alpha)


def excluded_ids(st: pl.DataFrame, cfg: AnnotatorTestConfig | ChecksConfig | None = None) -> pl.Series:
    """The annotators pass 1 of a state leaves out of the reference (sorted ids)."""
    return st["annotator_id"].filter(pl.Series(_two_sided(st, _config(cfg))[1])).sort()


def count_sums(judgments: pl.DataFrame, cfg: AnnotatorTestConfig | ChecksConfig | None = None,
               excluded: pl.Series | None = None, *, encoded: Encoded | None = None,
               lengths: pl.DataFrame | None = None) -> pl.DataFrame:
    """The check's state: per annotator, its judgments per kind, its decisive ones, those on pairs
    whose lengths differ and how many chose the longer response, and both passes' sums (comparable
    judgments ``n``, W+ ``plus``, W- ``minus``, pass 2's sum of the others' rate; shares x ``FP``);
    re-delivered copies are not counted (:func:`pipeline.checks.agreement.ratings`).  Pass 2
    leaves ``excluded`` out of the reference (None: pass 1 of these judgments decides).  A
    pair's contribution depends on its own judgments and the excluded set only, so with the set
    fixed the state adds over disjoint sets of pairs.  ``lengths``: see :func:`pair_lengths`.
    Sorted by annotator."""
    cfg = _config(cfg)
    if judgments.height == 0:
        return pl.DataFrame(schema=SUMS_SCHEMA)
    e = encoded or encode(judgments)
    na = e.n_annotators
    len_a, len_b = pair_lengths(judgments, e, lengths)
    ratio = np.maximum(len_a, len_b) / np.maximum(np.minimum(len_a, len_b), 1)
    longer = np.where(len_a > len_b, A, B)
    delivered = ratings(judgments)
    dec = (e.label >= A) & (e.label <= B) & delivered
    d = dec & (ratio >= cfg.min_length_ratio)[e.pair]  # decisive, lengths differ
    x = d & (e.label == longer[e.pair])  # chose the longer response
    nd = np.bincount(e.unit, weights=d, minlength=e.n_units)  # per (pair, annotator) unit
    has = nd > 0
    xm = np.where(has, np.rint(np.bincount(e.unit, weights=x, minlength=e.n_units) * FP / np.maximum(nd, 1)), 0.0)

    def per(group: np.ndarray, n: int, w: np.ndarray) -> np.ndarray:  # integers below 2**53: exact float sums
        return np.bincount(group, weights=w, minlength=n)

    def compare(ref: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per annotator: comparable judgments, W+, W- and the sum of the others' rate (x FP),
        against the annotators with ``ref`` (bool per annotator code) as the reference."""
        r = ref[e.unit_ann] & has
        k = per(e.unit_pair, e.n_pairs, r)[e.unit_pair] - r
        s_ = per(e.unit_pair, e.n_pairs, xm * r)[e.unit_pair] - xm * r  # the others' shares, x FP
        comp = has & (k >= 1)
        w = nd * comp
        kk = np.maximum(k, 1) * FP
        return tuple(per(e.unit_ann, na, v).astype(np.int64) for v in (
            w, np.rint(w * xm * (kk - s_) / kk), np.rint(w * (FP - xm) * s_ / kk), np.rint(w * s_ / np.maximum(k, 1))))

    def per_ann(w: np.ndarray) -> np.ndarray:
        return np.bincount(e.ann, weights=w, minlength=na).astype(np.int64)

    p1 = compare(np.ones(na, bool))
    out = pl.DataFrame({"annotator_id": e.ann_ids, "p1_n": p1[0], "p1_plus": p1[1], "p1_minus": p1[2]})
    if excluded is None:
        excluded = excluded_ids(out, cfg)
    p2 = compare(~e.ann_ids.is_in(excluded.implode()).to_numpy())
    return pl.DataFrame({
        "annotator_id": e.ann_ids, **kind_counts(judgments, e, delivered), "n_decisive": per_ann(dec), "n_length": per_ann(d),
        "n_longer": per_ann(x), "p1_n": p1[0], "p1_plus": p1[1], "p1_minus": p1[2],
        "p2_n": p2[0], "p2_plus": p2[1], "p2_minus": p2[2], "p2_others": p2[3],
    }, schema=SUMS_SCHEMA).sort("annotator_id")


def _update(spec: Sums, child: Child) -> tuple[pl.DataFrame, None]:
    """A child's state: parent - old + new with the parent's excluded set; when the merged pass 1
    excludes other annotators, the pairs of those whose exclusion changed are counted again
    (their old rows with the parent's set, their rows now with the child's): exact."""
    before, lengths = excluded_ids(child.state, child.cfg), child.inputs.get("lengths")
    state = spec.merge(child.state, count_sums(child.old, child.cfg, before, lengths=lengths),
                       count_sums(child.new, child.cfg, before, lengths=lengths))
    after = excluded_ids(state, child.cfg)
    if not after.equals(before):
        both = pl.concat([before, after])
        flipped = both.filter(~both.is_duplicated())  # in one set only
        old, new = child.pairs_of(flipped)
        state = spec.merge(child.state, count_sums(old, child.cfg, before, lengths=lengths),
                           count_sums(new, child.cfg, after, lengths=lengths))
    return state, None


def run(
    judgments: pl.DataFrame,
    cfg: AnnotatorTestConfig | ChecksConfig | None = None,
    *,
    pairs: pl.DataFrame | None = None,
    encoded: Encoded | None = None,
    lengths: pl.DataFrame | None = None,
    sums: pl.DataFrame | None = None,
) -> CheckResult:
    """Length bias per annotator.  ``pairs`` (from aggregation) is used only for the
    batch-level consensus figures, with the pairs' lengths from ``lengths`` (pair_id, len_a,
    len_b in the pairs' orientation: :func:`pipeline.incremental.pair_lengths`) or else from
    the judgments; ``encoded``:
    :func:`pipeline.aggregate.encode` of the same frame, to share work; ``sums``: the check's
    state of these judgments when it is known (a child's): the judgments are then not read."""
    cfg = _config(cfg)
    if judgments.height == 0 and sums is None:  # (with its state the judgments are not read)
        return CheckResult(name=NAME, status="pass", metrics={"annotators": 0}, flags=empty_flags(), summary="no judgments",
                           tables={"sums": pl.DataFrame(schema=SUMS_SCHEMA)})
    c = pl.col
    st = count_sums(judgments, cfg, encoded=encoded, lengths=lengths) if sums is None else sums
    na = st.height

    def col(name: str) -> np.ndarray:
        return st[name].to_numpy().astype(float)

    _, excluded = _two_sided(st, cfg)
    n, w_plus, w_minus, others_sum = col("p2_n"), col("p2_plus") / FP, col("p2_minus") / FP, col("p2_others") / FP
    tested = n >= cfg.min_judgments
    p = np.where(tested, fractional_sign_test(w_plus, w_minus), np.nan)
    p = np.where(tested & np.isnan(p), 1.0, p)  # tested but no discordance at all: no evidence of bias
    q = bh_adjust(p)
    biased = np.where(np.isnan(q), False, q <= cfg.alpha)
    n_d, n_x = col("n_length"), col("n_longer")
    with np.errstate(invalid="ignore", divide="ignore"):
        table = pl.DataFrame({
            "annotator_id": st["annotator_id"], "annotator_kind": majority_kind(st),
            "n_judgments": (col("n_human") + col("n_ai") + col("n_unknown")).astype(np.int64), "n_decisive": st["n_decisive"],
            "length_n": n.astype(np.int64),
            "longer_chosen_rate": pl.Series(n_x / n_d).fill_nan(None),
            "others_longer_rate": pl.Series(others_sum / n).fill_nan(None),
            "reference_excluded": excluded,
            "length_p_value": pl.Series(p).fill_nan(None), "length_q_value": pl.Series(q).fill_nan(None),
            "status": np.where(biased, "flagged", np.where(tested, "ok", "insufficient_data")),
            "_biased": biased,
        })
    bad = table.filter(c("_biased"))
    detail = bad.select(
        pl.format(
            "chose the longer response at rate {} vs {} for the other annotators on the same pairs "
            "({} comparable judgments, p={}, BH q={})",
            c("longer_chosen_rate").round(3), c("others_longer_rate").round(3), c("length_n"),
            c("length_p_value").round(6), c("length_q_value").round(6),
        )
    ).to_series()
    flags = make_flags(bad["annotator_id"], subject_kind="annotator", check=NAME, reason="length_bias", detail=detail)

    metrics: dict[str, Any] = {
        "annotators": na,
        "tested": int(tested.sum()),
        "insufficient_data": int((~tested).sum()),
        "length_biased": int(biased.sum()),
        "min_length_ratio": cfg.min_length_ratio,
        "judgments_with_length_difference": int(n_d.sum()),
        "chosen_longer_rate_judgments": float(n_x.sum() / n_d.sum()) if n_d.sum() else None,
    }
    tables = {"annotators": table.drop("_biased"), "sums": st}
    if pairs is not None and "label_consensus" in pairs.columns:
        if lengths is None or sums is None:  # in these judgments' orientation (the pairs' consensus is in it)
            e = encoded or encode(judgments)
            len_a, len_b = pair_lengths(judgments, e, lengths)
            lengths = pl.DataFrame({"pair_id": e.pair_ids, "len_a": len_a, "len_b": len_b})
        metrics.update(_ratio_metrics(pairs, lengths, cfg.min_length_ratio, tables))
    status = "warn" if biased.any() else "pass"
    summary = f"{int(biased.sum())} of {int(tested.sum())} tested annotators prefer longer responses more than the others do"
    return CheckResult(name=NAME, status=status, metrics=metrics, flags=flags, tables=tables, summary=summary)


def _ratio_metrics(pairs: pl.DataFrame, lengths: pl.DataFrame, min_ratio: float, tables: dict[str, pl.DataFrame]) -> dict[str, Any]:
    c = pl.col
    decided = c("label_consensus").is_in(["a", "b"])
    if pairs.height == lengths.height and pairs["pair_id"].equals(lengths["pair_id"]):  # a row a pair in the same order
        cp = pl.concat([pairs.select("label_consensus"), lengths.select("len_a", "len_b")], how="horizontal").filter(decided)
    else:
        cp = pairs.select("pair_id", "label_consensus").filter(decided).join(lengths, on="pair_id", how="inner")
    if cp.height == 0:
        tables["length_ratio_hist"] = pl.DataFrame(schema={"log2_ratio_lo": pl.Float64, "log2_ratio_hi": pl.Float64, "pairs": pl.Int64})
        return {"chosen_longer_rate_pairs": None, "chosen_rejected_ratio_quantiles": None}
    la, lb = cp["len_a"].to_numpy().astype(float), cp["len_b"].to_numpy().astype(float)
    is_a = (cp["label_consensus"] == "a").to_numpy()
    chosen, rejected = np.where(is_a, la, lb), np.where(is_a, lb, la)
    r = chosen / np.maximum(rejected, 1)
    differ = np.maximum(la, lb) / np.maximum(np.minimum(la, lb), 1) >= min_ratio
    lr = np.clip(np.log2(np.maximum(r, 1e-9)), HIST_EDGES[0], HIST_EDGES[-1])
    counts, _ = np.histogram(lr, bins=HIST_EDGES)
    tables["length_ratio_hist"] = pl.DataFrame(
        {"log2_ratio_lo": HIST_EDGES[:-1], "log2_ratio_hi": HIST_EDGES[1:], "pairs": counts.astype(np.int64)}
    )
    return {
        "chosen_longer_rate_pairs": float((r[differ] > 1).mean()) if differ.any() else None,
        "chosen_rejected_ratio_quantiles": {str(qq): float(v) for qq, v in zip(QUANTILES, np.quantile(r, QUANTILES), strict=True)},
        "consensus_pairs_with_length_difference": int(differ.sum()),
    }


CHECK = CheckSpec(
    name=NAME, run=run, config="length_bias", doc="annotators preferring the longer response more than the consensus does",
    inputs=("pairs", "lengths", "sums"), sums=Sums(count_sums, ("annotator_id",), format="2", update=_update),  # 2: copies not counted
    pair_columns=("pair_id", "label_consensus"),
    reasons=(
        Reason("length_bias", "annotator", "downweight", "prefers the longer candidate significantly more than the "
               "consensus does"),
    ))
