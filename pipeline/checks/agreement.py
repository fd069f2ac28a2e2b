"""Inter-annotator agreement: Krippendorff's alpha and Fleiss' kappa, per annotator kind
and per slice, with bootstrap confidence intervals; per-pair ``low_agreement`` flags.

Method
------
* Ratings are labels in canonical orientation (:func:`pipeline.aggregate.orient`), so a
  judgment that named the responses the other way round is compared correctly.
* Categories are nominal ``a`` / ``b`` / ``tie``.  ``both_bad`` and ``escalate`` are not
  answers to "which is better" (one rejects both candidates, the other declines to
  answer), so they are treated as **missing values**: they neither agree nor disagree.
* Each judgment is one rating.  An annotator who judged a pair twice (an AI judge in
  both display orders) contributes two ratings, so order inconsistency lowers alpha --
  intended: an answer that flips with the display order is not reproducible.  A re-delivered
  copy (``exact_duplicate``: same annotator, pair, display order and verdict) is not a
  rating: it would count one answer twice and inflate agreement (:func:`ratings`).
* **Krippendorff's alpha (nominal)** over all pairs with >= 2 ratings (missing data
  allowed): alpha = 1 - (n - 1) * sum_u D_u / (n^2 - sum_c n_c^2), see
  :mod:`pipeline.stats`.  **Fleiss' kappa** needs a constant number of ratings per unit,
  so it uses the pairs with the modal number m of ratings (ties -> the larger m).
* Both are computed for ``human``, ``ai``, ``unknown`` (judges of an unknown kind, e.g. TRL
  rows without ``--annotator-kind``: never counted as human or AI) and ``all`` judgments; each with a 95 %
  percentile bootstrap CI over pairs (``AgreementConfig.bootstrap`` resamples, seeded).
  Per slice (``locale=<x>``, ``tag=<t>``, locale and tags of the pair) the point estimates
  only (CIs would multiply the cost by the number of slices).
* ``low_agreement`` (subject ``pair``): the pair's ``agreement`` (share of the judgments
  used for its consensus that agree with it, :mod:`pipeline.aggregate`) is below
  ``low_agreement_threshold`` and at least ``min_judgments`` judgments were used.  Under
  the default ``human_first`` mode these are the human judgments whenever a human judged
  the pair (AI-only pairs are scored on the AI judgments).  Pairs without a consensus are
  not scored.

Status: ``warn`` when human alpha (or, without human pairs, AI alpha) is below 0.2 --
Krippendorff's "no reliable agreement" zone; certification applies its own threshold.
"""
from __future__ import annotations

import math
import weakref
from typing import Any

import numpy as np
import polars as pl

from pipeline.aggregate import TIE, Encoded, aggregate, dense_codes, encode, n_used_expr, pair_locale, pair_tags
from pipeline.checks.duplicates import _ORDER, exact_duplicates
from pipeline.stats import (
    alpha_from_sums,
    bootstrap_sums_ci,
    compress_rows,
    kappa_from_sums,
    unit_terms_alpha,
    unit_terms_fleiss,
)
from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import AgreementConfig, ChecksConfig
from pipeline.checks.spec import CheckSpec, Reason, Sums

NAME = "agreement"
CATEGORIES = ("a", "b", "tie")
KINDS = ("human", "ai", "unknown", "all")
_KIND_CODE = {"human": 0, "ai": 1, "unknown": 2}
WARN_ALPHA = 0.2
MAX_SLICES_IN_METRICS = 200
_SLICE_SCHEMA = {"slice": pl.String, "kind": pl.String, "n_pairs": pl.Int64, "krippendorff_alpha": pl.Float64,
                 "fleiss_kappa": pl.Float64}


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


_RATED: list[tuple[weakref.ref, int, tuple[str, ...], np.ndarray]] = []  # one-entry cache of :func:`ratings`
# what :func:`ratings` reads of a judgment (the duplicates check's key and its order of deliveries)
RATING_COLUMNS = list(dict.fromkeys(["comparison_id", "pair_id", "annotator_id", "prompt_hash", "a_hash", "b_hash",
                                     "shown_first", "label", *_ORDER]))


def ratings(judgments: pl.DataFrame) -> np.ndarray:
    """Which judgments are ratings (bool, in frame order): all but the later copies of re-delivered
    ones -- the duplicates check's ``exact_duplicate`` judgments, which select drops and the
    certify gate's one rating per annotator never counted.  A copy is the same answer delivered
    again, not another annotation: counted, a re-delivered pair looked like more raters agreeing.
    The position and length bias checks, reliability and the preliminary consensus
    (:func:`pipeline.aggregate.aggregate`'s ``rated``) count the same judgments (each delivery
    once); the last result is cached by frame identity, as :func:`pipeline.aggregate.encode` is,
    so the checks that run on one frame find the copies once (read-only: it is shared).
    A frame with a ``_rated`` column says itself which judgments vote: a dimension's verdicts
    (:func:`pipeline.dimensions.dimension_frame`), whose copies were found on the overall labels.

    Copies under the same pair id only: a pair's ratings depend on its own judgments (the states'
    contract, :class:`pipeline.checks.spec.Sums`: they add over disjoint sets of pairs).  A copy
    under *another* given pair id counts here as a judgment of that pair, although the duplicates
    check's key has no pair id -- select drops it as ``exact_duplicate`` (its pair then has the
    other judgments it has, or leaves as ``all_judgments_dropped``).  Left so on purpose: counted
    across ids, a pair's ratings would depend on the judgments of every pair of the same content
    (prompt and response set).  The first version's builds could do it exactly -- the whole frame,
    and partitions keyed by the content key, a given id's contents moved together
    (``partitioned_build._together``) -- but a child could not: it counts its merged states and its
    preliminary consensus over the pairs of its batch (and, for reliability, the pairs some
    annotators judged), not over their closure by content, so a batch's copy under a new id of an
    old judgment (or an earlier delivery that makes the old one the copy) would be counted
    differently than a full build counts it.  Doing it means counting a child's states and
    preliminary pairs over that closure (:func:`pipeline.incremental.touched_pairs`, which the
    pair-scoped checks use) and masking order consistency's first judgments with the same rule."""
    if "_rated" in judgments.columns:  # (a dimension's frame: its copies already left out, pipeline.dimensions.RATED)
        given = judgments["_rated"].fill_null(False).to_numpy().copy()
        given.flags.writeable = False
        return given
    if _RATED:
        ref, height, names, rated = _RATED[0]
        if ref() is judgments and height == judgments.height and names == tuple(judgments.columns):
            return rated
    copies = exact_duplicates(judgments, per_pair=True)["comparison_id"]
    rated = judgments.select(~pl.col("comparison_id").is_in(copies.implode())).to_series().to_numpy()
    rated.flags.writeable = False
    _RATED[:] = [(weakref.ref(judgments), judgments.height, tuple(judgments.columns), rated)]
    return rated


def unit_counts(e: Encoded, kinds: pl.Series | None = None, rated: np.ndarray | None = None) -> np.ndarray:
    """(P, 3, 3) counts of a / b / tie ratings per pair and kind (0 human, 1 ai, 2 unknown),
    canonical orientation; both_bad / escalate are missing values.  ``kinds``: the judgments'
    ``annotator_kind`` (without it, every judgment that is not human counts as ai); ``rated``:
    the judgments counted (:func:`ratings`; default all)."""
    cat = np.where(e.label <= TIE, e.label, -1)
    if rated is not None:
        cat = np.where(rated, cat, -1)
    if kinds is None:
        kind = np.where(e.human, 0, 1)
    else:
        kind = kinds.replace_strict(_KIND_CODE, default=1, return_dtype=pl.Int8).to_numpy()
    codes = np.where(cat >= 0, 3 * kind + cat, -1)
    return e.per_pair(codes=codes, k=9).reshape(e.n_pairs, 3, 3)


def profile_metrics(rows: np.ndarray, mult: np.ndarray, bootstrap: int, seed: int) -> dict[str, Any]:
    """Alpha and Fleiss' kappa (+ bootstrap CIs over pairs) from distinct rating-count rows
    ``(k, 3)`` and how many pairs have each (``mult``).  Fleiss runs over the pairs with the modal
    number of ratings (ties -> the larger m).  Raw figures: NaN where undefined, CIs ``(None, None)``.
    One implementation for the check (per-pair counts, compressed) and for merged partition profiles
    (:func:`pipeline.partition_stats.agreement_from_profiles`)."""
    a_terms = unit_terms_alpha(rows)
    out: dict[str, Any] = {
        "n_pairs": int(mult.sum()), "n_ratings": int((rows.sum(axis=1) * mult).sum()),
        "krippendorff_alpha": float(alpha_from_sums(mult @ a_terms)) if rows.shape[0] else float("nan"),
        "alpha_ci": bootstrap_sums_ci(a_terms, alpha_from_sums, resamples=bootstrap, seed=seed, multiplicity=mult),
        "fleiss_m": None, "fleiss_n_pairs": 0, "fleiss_kappa": None, "kappa_ci": (None, None)}
    if rows.shape[0]:
        pm = rows.sum(axis=1)
        per_m = np.bincount(pm, weights=mult)
        modal = int(np.flatnonzero(per_m == per_m.max())[-1])  # ties -> the larger m
        sel = pm == modal
        f_terms = unit_terms_fleiss(rows[sel])
        out.update(fleiss_m=modal, fleiss_n_pairs=int(mult[sel].sum()),
                   fleiss_kappa=float(kappa_from_sums(mult[sel] @ f_terms)),
                   kappa_ci=bootstrap_sums_ci(f_terms, kappa_from_sums, resamples=bootstrap, seed=seed + 1,
                                              multiplicity=mult[sel]))
    return out


def _kind_metrics(rows: np.ndarray, mult: np.ndarray, cfg: AgreementConfig, seed: int) -> dict[str, Any]:
    """Alpha and kappa (+ bootstrap CIs over pairs) from distinct rating-count rows and how many pairs have each."""
    f = profile_metrics(rows, mult, cfg.bootstrap, seed)
    a_lo, a_hi = f["alpha_ci"]
    k_lo, k_hi = f["kappa_ci"]
    kappa = f["fleiss_kappa"]
    return {"n_pairs": f["n_pairs"], "n_ratings": f["n_ratings"], "krippendorff_alpha": _num(f["krippendorff_alpha"]),
            "krippendorff_alpha_ci": [a_lo, a_hi] if a_lo is not None else None,
            "fleiss_m": f["fleiss_m"], "fleiss_n_pairs": f["fleiss_n_pairs"],
            "fleiss_kappa": _num(kappa) if kappa is not None else None,
            "fleiss_kappa_ci": [k_lo, k_hi] if k_lo is not None else None}


# ---------------------------------------------------------------- the check's mergeable state
SUMS_KEYS = ("slice", "kind", "n_a", "n_b", "n_tie")
SUMS_SCHEMA = {"slice": pl.String, "kind": pl.String, "n_a": pl.Int64, "n_b": pl.Int64, "n_tie": pl.Int64, "n": pl.Int64}
MISSING = "missing"  # the kind of the one row that counts the ratings treated as missing (in ``n``)
_ALL = ""  # the slice of every pair


def count_sums(judgments: pl.DataFrame, encoded: Encoded | None = None) -> pl.DataFrame:
    """The check's state: everything its figures are computed from, as counts that add over
    disjoint sets of pairs.  Re-delivered copies are not counted (:func:`ratings`).

    Per slice (``""``: every pair; ``locale=<x>``, ``tag=<t>``) and kind (human, ai, unknown,
    all), the histogram of per-pair rating counts ``(n_a, n_b, n_tie)`` of the pairs with at
    least two ratings of that kind (``n``: how many pairs), and one row (slice ``""``, kind
    ``missing``) whose ``n`` counts the ratings treated as missing.  A pair's rows depend on
    its own judgments only (its locale and tags too, :func:`pipeline.aggregate.pair_locale`),
    so a child's state is its parent's minus the rows of the pairs its batch touches, as the
    parent saw them, plus theirs now (:meth:`pipeline.checks.spec.Sums.merge`).  ``judgments`` must hold every
    judgment of each pair it has, in their order.  Sorted by the keys."""
    if judgments.height == 0:
        return pl.DataFrame(schema=SUMS_SCHEMA)
    e = encoded or encode(judgments)
    rated = ratings(judgments)
    kinds = judgments["annotator_kind"] if "annotator_kind" in judgments.columns else None
    uc = unit_counts(e, kinds, rated).astype(np.int64)
    mp, ms, names = _slice_members(judgments, e, None)
    frames = []
    for kind, counts in (("human", uc[:, 0]), ("ai", uc[:, 1]), ("unknown", uc[:, 2]), ("all", uc.sum(axis=1))):
        ok = counts.sum(axis=1) >= 2
        every = np.flatnonzero(ok)
        sel = ok[mp]
        p = np.concatenate([every, mp[sel]])
        sl = np.concatenate([np.full(every.size, -1, np.int64), ms[sel]])
        f = pl.DataFrame({"_s": sl, "n_a": counts[p, 0], "n_b": counts[p, 1], "n_tie": counts[p, 2]},
                         schema={"_s": pl.Int64, "n_a": pl.Int64, "n_b": pl.Int64, "n_tie": pl.Int64})
        frames.append(f.group_by("_s", "n_a", "n_b", "n_tie").agg(n=pl.len().cast(pl.Int64)).with_columns(kind=pl.lit(kind)))
    names_s = pl.Series("slice", [_ALL, *names], pl.String)
    hist = pl.concat(frames)
    hist = hist.with_columns(slice=names_s.gather(hist["_s"] + 1))
    missing = pl.DataFrame({"slice": [_ALL], "kind": [MISSING], "n_a": [0], "n_b": [0], "n_tie": [0],
                            "n": [int(((e.label > TIE) & rated).sum())]}, schema=SUMS_SCHEMA)
    return pl.concat([hist.select(*SUMS_SCHEMA), missing]).filter(pl.col("n") != 0).sort(*SUMS_KEYS)


def _profiles(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, multiplicity) in :func:`pipeline.stats.compress_rows`' order (the profile as a
    mixed-radix number, last category most significant), C-ordered: the same bootstrap draws and
    float sums as the check computed from per-pair counts."""
    prof = frame.sort("n_tie", "n_b", "n_a")
    rows = np.ascontiguousarray(prof.select("n_a", "n_b", "n_tie").to_numpy(), dtype=np.int64).reshape(-1, 3)
    return rows, prof["n"].to_numpy().astype(np.int64)


def from_sums(state: pl.DataFrame, cfg: AgreementConfig) -> tuple[dict[str, Any], pl.DataFrame]:
    """The check's figures (per kind, with bootstrap CIs) and its slice table from its state."""
    metrics: dict[str, Any] = {}
    every = state.filter(pl.col("slice") == _ALL)
    for i, kind in enumerate(("human", "ai", "all", "unknown")):
        rows, mult = _profiles(every.filter(pl.col("kind") == kind))
        metrics[kind] = _kind_metrics(rows, mult, cfg, cfg.seed + 10 * i)
    metrics["ratings_treated_as_missing"] = int(every.filter(pl.col("kind") == MISSING)["n"].sum())
    return metrics, _slice_table(state.filter((pl.col("slice") != _ALL) & (pl.col("kind") != MISSING)))


def _slice_members(judgments: pl.DataFrame, e: Encoded, pairs: pl.DataFrame | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Slice membership of pairs: (pair code, slice code) arrays and the slice names
    (``locale=<x>`` and ``tag=<t>`` of each pair)."""
    ids = pl.DataFrame({"pair_id": e.pair_ids, "_p": np.arange(e.n_pairs)})
    if pairs is not None and {"locale", "tags"} <= set(pairs.columns):
        meta = ids.join(pairs.select("pair_id", "locale", "tags"), on="pair_id", how="left", maintain_order="left")
    else:
        meta = ids.with_columns(locale=pair_locale(judgments, e), tags=pair_tags(judgments, e))
    loc = meta.select("_p", slice=pl.lit("locale=") + pl.col("locale").fill_null("unknown"))
    tags = meta.select("_p", "tags").explode("tags").drop_nulls("tags").select("_p", slice=pl.lit("tag=") + pl.col("tags"))
    members = pl.concat([loc, tags])  # a pair's tags are already unique (pair_tags / PairRecord)
    codes, first = dense_codes(members["slice"])
    return members["_p"].to_numpy(), codes, members["slice"].gather(first).to_list()


def _slice_table(hist: pl.DataFrame) -> pl.DataFrame:
    """Alpha and kappa per (slice, kind) from the slices' profile histograms: the unit terms of each
    distinct profile times its multiplicity, summed per slice in the state's (sorted) order."""
    if hist.height == 0:
        return pl.DataFrame(schema=_SLICE_SCHEMA)
    hist = hist.sort(*SUMS_KEYS)
    rows = np.ascontiguousarray(hist.select("n_a", "n_b", "n_tie").to_numpy(), dtype=np.int64).reshape(-1, 3)
    n = hist["n"].to_numpy().astype(np.int64)
    g, first = dense_codes(hist.select(pl.concat_str("slice", "kind", separator="\x00")).to_series())
    n_g = len(first)
    terms = unit_terms_alpha(rows) * n[:, None]
    sums_ = np.column_stack([np.bincount(g, weights=terms[:, i], minlength=n_g) for i in range(terms.shape[1])])
    n_pairs = np.bincount(g, weights=n, minlength=n_g).astype(np.int64)
    m = rows.sum(axis=1)
    top = int(m.max()) + 1
    per_m = np.bincount(g * top + m, weights=n, minlength=n_g * top).reshape(n_g, top)
    modal = top - 1 - np.argmax(per_m[:, ::-1], axis=1)  # most frequent m, ties -> the larger
    sel = m == modal[g]
    f_terms = unit_terms_fleiss(rows[sel]) * n[sel][:, None]
    f_sums = np.column_stack([np.bincount(g[sel], weights=f_terms[:, i], minlength=n_g) for i in range(f_terms.shape[1])])
    return pl.DataFrame({
        "slice": hist["slice"].gather(first), "kind": hist["kind"].gather(first), "n_pairs": n_pairs,
        "krippendorff_alpha": pl.Series(alpha_from_sums(sums_)).fill_nan(None),
        "fleiss_kappa": pl.Series(kappa_from_sums(f_sums)).fill_nan(None),
    }, schema=_SLICE_SCHEMA).sort("slice", "kind")


def run(
    judgments: pl.DataFrame,
    cfg: AgreementConfig | ChecksConfig | None = None,
    *,
    pairs: pl.DataFrame | None = None,
    encoded: Encoded | None = None,
    sums: pl.DataFrame | None = None,
) -> CheckResult:
    """Agreement over a judgments frame; ``pairs`` from :func:`pipeline.aggregate.aggregate`
    (computed with the default/ChecksConfig aggregation settings when not given);
    ``encoded``: :func:`pipeline.aggregate.encode` of the same frame, to share work;
    ``sums``: the check's state of these judgments when it is known (a child's, :meth:`pipeline.checks.spec.Sums.merge`):
    then only the pairs are read (the per-pair ``low_agreement`` flags)."""
    agg_cfg = cfg.aggregation if isinstance(cfg, ChecksConfig) else None
    cfg = cfg.agreement if isinstance(cfg, ChecksConfig) else (cfg or AgreementConfig())
    if judgments.height == 0 and sums is None:  # (with its state the judgments are not read)
        return CheckResult(name=NAME, status="pass", metrics={k: {"n_pairs": 0} for k in KINDS}, flags=empty_flags(),
                           summary="no judgments", tables={"sums": pl.DataFrame(schema=SUMS_SCHEMA)})
    if sums is None:
        sums = count_sums(judgments, encoded)
    if pairs is None:
        pairs = aggregate(judgments, agg_cfg, encoded=encoded or encode(judgments), rated=ratings(judgments)).pairs
    metrics, slices = from_sums(sums, cfg)
    top = slices.group_by("slice").agg(pl.col("n_pairs").max()).sort("n_pairs", "slice", descending=True).head(MAX_SLICES_IN_METRICS)
    metrics["slices"] = {}
    for s, kind, n, a, k in slices.filter(pl.col("slice").is_in(top["slice"].implode())).iter_rows():
        metrics["slices"].setdefault(s, {})[kind] = {"n_pairs": int(n), "krippendorff_alpha": _num(a), "fleiss_kappa": _num(k)}

    # the scored pairs' figures by expressions, and only the low ones' rows copied: a filter copies every column
    # of the rows it keeps (a million pairs' rows: ~0.3 GB)
    is_scored = _is_scored(cfg)
    # the mean of the sorted values: a float sum depends on its order, the pairs' order on how they were computed
    n_scored, mean_agreement = pairs.select(is_scored.sum().alias("n"), pl.col("agreement").filter(is_scored).sort().mean()).row(0)
    low = pairs.select("pair_id", "agreement", "label_consensus", "annotator_kind", "n_human", "n_ai", "n_judgments") \
        .filter(_is_low(cfg))
    detail = low.select(
        pl.format("agreement {} over {} judgments (consensus {})", pl.col("agreement").round(3), n_used_expr(),
                  pl.col("label_consensus"))
    ).to_series()
    flags = make_flags(low["pair_id"], subject_kind="pair", check=NAME, reason="low_agreement", detail=detail)
    metrics.update(
        pairs_scored=n_scored,
        low_agreement_pairs=low.height,
        low_agreement_rate=(low.height / n_scored) if n_scored else None,
        mean_agreement=_num(mean_agreement) if n_scored else None,
    )
    ref = metrics["human"] if metrics["human"]["n_pairs"] else metrics["ai"]
    alpha = ref.get("krippendorff_alpha")
    status = "warn" if alpha is not None and alpha < WARN_ALPHA else "pass"
    summary = (
        f"alpha human={_fmt(metrics['human'].get('krippendorff_alpha'))} ai={_fmt(metrics['ai'].get('krippendorff_alpha'))}; "
        f"{low.height} of {n_scored} scored pairs below agreement {cfg.low_agreement_threshold}"
    )
    return CheckResult(name=NAME, status=status, metrics=metrics, flags=flags, tables={"slices": slices, "sums": sums},
                       summary=summary)


def _is_scored(cfg: AgreementConfig) -> pl.Expr:
    return pl.col("agreement").is_not_null() & (n_used_expr() >= cfg.min_judgments)


def _is_low(cfg: AgreementConfig) -> pl.Expr:
    """The ``low_agreement`` rule over PairRecord columns (the flags here; select's test that it still holds)."""
    return _is_scored(cfg) & (pl.col("agreement") < cfg.low_agreement_threshold)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


CHECK = CheckSpec(
    name=NAME, run=run, config="agreement", doc="inter-annotator agreement (alpha, kappa with CIs); per-pair agreement",
    inputs=("pairs", "sums"), sums=Sums(count_sums, SUMS_KEYS, format="2"),  # 2: re-delivered copies not counted
    pair_columns=("pair_id", "locale", "tags", "agreement", "label_consensus", "annotator_kind", "n_human", "n_ai",
                  "n_judgments"),
    reasons=(
        Reason("low_agreement", "pair", "drop", "judgments disagree beyond the policy threshold", precedence=60,
               holds=lambda checks: _is_low(checks.agreement)),
    ))
