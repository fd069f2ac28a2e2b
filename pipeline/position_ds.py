"""Order-aware Dawid-Skene: a consensus that reads display order and order consistency.

Why
---
A judge (an LLM judge above all) may prefer a display *position* instead of a response:
one that picks whatever is shown first says "a" when a is shown first and "b" when b is,
and a judge may do so on some pairs only.  Plurality counts those verdicts as votes;
Dawid-Skene, which trusts a judge by its agreement with the panel, is pulled towards
judges that share their errors (one model family, the same surface preferences).  This
model weighs each verdict by what it can carry.

Model (per judge j; a/b are names, so the two classes are symmetric, flat class prior)
-------------------------------------------------------------------------------------
* alpha_j = P(right | the better response was shown first), beta_j = P(right | it was
  shown second): the judge's confusion conditioned on display order (a judge biased to the
  first position has alpha_j > beta_j); r_j = (alpha_j + beta_j) / 2 its accuracy in a
  random display order.
* **A verdict that flips with the display order carries no evidence for that pair**: one of
  the two verdicts is right and one wrong whichever response is better.  The flip counts
  as one right and one wrong verdict for r_j, so order-inconsistent judges weigh less on
  every pair.  A consistent verdict is evidence logit(r_j) for its side (one vote per judge
  per pair: the k verdicts of a judge on a pair each weigh 1/k, times the caller's weight).
* A verdict given in **one display order only** is weighed by its position: choosing the
  first-shown response is evidence log(alpha_j / (1 - beta_j)) for it, the second-shown
  log(beta_j / (1 - alpha_j)) -- a judge that nearly always picks the first position says
  little when it does.  A verdict without display order is evidence logit(r_j).
* **Engagement** pi_j (:func:`engaged_share`): every verdict's evidence is scaled by the share
  of the judge's consistent verdicts that a fallback no better than a coin cannot explain,
  pi_j = max(2 kappa_j - 1, 0) / kappa_j with kappa_j its order consistency.  A judge that
  is consistent on only half of the pairs it judged in both orders says nothing; one that
  is always consistent keeps its full weight; a judge never seen in both orders keeps 1.
  Order consistency is the one signal a group of judges that err together cannot inflate
  by agreeing with each other.
* **Independence** omega_j (:func:`independence`): judges whose verdicts agree beyond what
  their accuracies explain -- one model family, one prompt template -- share one vote.  The
  model is fitted, omega_j computed from the pairwise agreement of the judges' verdicts
  against the fitted posterior's accuracies, and fitted again with every verdict of judge j
  scaled by pi_j omega_j.  Without gold this is where families are caught (issue-like
  panels: +0.09 accuracy); pi_j cannot see a family that is order-consistent.

Why logit(r_j) for a consistent verdict rather than the two-coin likelihood logit(alpha_j)
+ logit(beta_j), and why pi_j: both would be unnecessary if judges erred independently
given the pair (then the exact likelihood is optimal, and on such panels this model is
within 0.01-0.02 of it).  Real judges' strong preferences come partly from features they
share, so a position-biased judge's rare consistent verdict and a family's common taste
err together; the one-coin weight and pi_j discount exactly the judges whose verdicts
depend on the display order.  Measured in ``benchmarks/consensus_quality.py`` (docs/
benchmarks.md): on panels with correlated judges pi_j adds 0.02-0.07 accuracy.

Estimation: EM (Dawid & Skene 1979).  E-step: ``logit q_p`` = sum of the weighted evidence
of pair p.  M-step, every judgment once: alpha_j = share of right verdicts among the
judge's judgments whose better response was shown first (expected under q), with a
Beta(3.5, 1.5) prior (mean 0.7, weight of 5 judgments: small judges stay near a typical
judge, and the a <-> b label switch is excluded); beta_j the same for shown second;
judgments without display order count half to each; clipped to [0.02, 0.98].  Start: the
plain vote with flips cancelling.  **Gold**: pairs with a gold label have q fixed to it in
the M-step (their own posterior is still the judgments'), and a judge with >= 10
judgments on gold pairs is measured on those alone: unlike agreement with the panel, gold
accuracy cannot be inflated by errors shared with others (10 % gold: +0.04-0.10 accuracy on
correlated panels, against +0.01-0.02 when gold only anchors the EM).  All sums are
``np.bincount``; one EM round is O(judgments).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.special import expit, logit

from pipeline.stats import binom_less

__all__ = ["OrderAwareDS", "engaged_share", "fit", "independence"]

PRIOR_RIGHT, PRIOR_WRONG = 3.5, 1.5  # Beta prior on alpha_j and beta_j: mean 0.7, weight 5
CLIP = (0.02, 0.98)


@dataclass(frozen=True)
class OrderAwareDS:
    """Fitted model.  ``alpha`` / ``beta`` (J,): P(right) when the better response was shown
    first / second; ``engaged`` (J,): :func:`engaged_share`, the factor on each of the
    judge's verdicts; ``p_a`` (P,): posterior P(a better) from the weighted judgments (NaN for
    pairs without one); ``evidence`` (P,): its log-odds; ``judgment_evidence`` (N,): each
    judgment's own log-odds for a (unweighted; the pair's is the weighted sum);
    ``iterations`` run (in the last fit); ``independence`` (J,): :func:`independence`."""

    alpha: np.ndarray
    beta: np.ndarray
    engaged: np.ndarray
    p_a: np.ndarray
    evidence: np.ndarray
    judgment_evidence: np.ndarray
    iterations: int
    independence: np.ndarray | None = None  # (J,) :func:`independence`, the other factor on each verdict

    @property
    def accuracy(self) -> np.ndarray:
        """(J,) P(right) of one verdict in a random display order."""
        return 0.5 * (self.alpha + self.beta)


def fit(
    *,
    pair: np.ndarray,
    judge: np.ndarray,
    unit: np.ndarray,
    n_units: int,
    chose_a: np.ndarray,
    shown_a: np.ndarray,
    weight: np.ndarray,
    n_pairs: int,
    n_judges: int,
    gold: np.ndarray | None = None,
    iterations: int = 50,
    tol: float = 1e-6,
    decorrelate: bool = True,
    fixed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> OrderAwareDS:
    """EM over decisive judgments (all arrays (N,) over the judgments to use).

    ``unit``: dense code (< ``n_units``) of (pair, judge); ``chose_a``: bool verdict; ``shown_a``: 1 canonical a shown first, 0 b shown
    first, -1 unknown; ``weight``: the judgment's weight in the pair posterior (one vote per
    judge: 1/k, times e.g. ``ai_weight``; 0 = estimate the judge, do not use for the pair);
    ``gold`` (P,): 0 a / 1 b / -1 none, canonical.  ``decorrelate``: fit once, weigh judges by
    :func:`independence`, fit again (else every judge's independence is 1).
    ``fixed``: (alpha, beta, factor) (J,) each, NaN where the judge is free: a judge with a
    value keeps it (its verdicts weigh ``factor`` = engagement x independence as given) and
    only the free judges are estimated, with the fixed ones' evidence in the posterior (a
    child version's rule, docs/incremental.md).  With every judge fixed there is no EM.
    """
    from pipeline import kernels

    v = np.where(chose_a, 1.0, -1.0)
    known = shown_a >= 0
    first = known & (chose_a == (shown_a == 1))  # chose the first-shown response
    # units judged in one display order only get the position-aware evidence
    n_af = np.bincount(unit, weights=known & (shown_a == 1), minlength=n_units)
    n_bf = np.bincount(unit, weights=known & (shown_a == 0), minlength=n_units)
    single = known & ((n_af > 0) != (n_bf > 0))[unit]
    engaged = engaged_share(unit=unit, n_units=n_units, judge=judge, n_judges=n_judges, chose_a=chose_a, shown_a=shown_a)
    w = np.asarray(weight, float)
    codes = _evidence_codes(judge, first, single)
    g = np.full(n_pairs, -1) if gold is None else np.asarray(gold)
    clamp = g >= 0
    g0 = (g == 0).astype(float)
    shown_first, known_second = shown_a == 1, known & ~first
    mw = _mstep_weights(judge, clamp[pair], n_judges)
    indep = np.ones(n_judges)
    if fixed is not None:
        fa, fb, ff = (np.asarray(x, float) for x in fixed)
        pinned = ~np.isnan(fa)
        if pinned.all():
            e = ff[judge] * _judgment_evidence(judge, v, first, single, fa, fb, codes)
            ev = np.bincount(pair, weights=w * e, minlength=n_pairs)
            has = np.bincount(pair, weights=(w > 0).astype(float), minlength=n_pairs) > 0
            return OrderAwareDS(fa, fb, engaged, np.where(has, expit(ev), np.nan),
                                np.where(has, ev, np.nan), e, 0, np.ones(n_judges))
    else:
        pinned = np.zeros(n_judges, bool)
        fa = fb = ff = np.zeros(n_judges)
    for rnd in range(2 if decorrelate else 1):
        if rnd:
            indep = independence(pair=pair, judge=judge, unit=unit, n_units=n_units, chose_a=chose_a, n_pairs=n_pairs,
                                 n_judges=n_judges, p_a=np.where(clamp, g0, q), measure=mw)
        factor = np.where(pinned, ff, engaged * indep)[judge]
        # both fits start from the vote (flips cancel): started where the first ended, the second
        # stays near the family-led fixed point (development seeds: -0.04 to -0.08 on family panels)
        q = expit(np.bincount(pair, weights=w * v, minlength=n_pairs))
        alpha = np.where(pinned, fa, PRIOR_RIGHT / (PRIOR_RIGHT + PRIOR_WRONG))
        beta = np.where(pinned, fb, alpha)
        it = 0
        wf = w * factor
        for it in range(1, max(iterations, 1) + 1):
            # the M-step's four sums per judge and the pairs' evidence: one compiled pass over the judgments each,
            # the per-judgment formulas value for value, summed in judgment order (np.bincount's order: the same
            # bits without a temporary over every judgment)
            qc = np.where(clamp, g0, q)
            sums = np.zeros((4, n_judges))
            kernels.order_aware_msums(qc, pair, judge, mw, shown_first, chose_a, known, first, known_second, sums)
            na, ka, nb, kb = sums
            new_a = np.clip((PRIOR_RIGHT + ka) / (PRIOR_RIGHT + PRIOR_WRONG + na), *CLIP)
            new_b = np.clip((PRIOR_RIGHT + kb) / (PRIOR_RIGHT + PRIOR_WRONG + nb), *CLIP)
            new_a, new_b = np.where(pinned, fa, new_a), np.where(pinned, fb, new_b)
            ev = np.zeros(n_pairs)
            kernels.evidence_sums(_evidence_table(new_a, new_b), codes, v, wf, pair, ev)
            q = expit(ev)
            done = max(float(np.max(np.abs(new_a - alpha), initial=0.0)), float(np.max(np.abs(new_b - beta), initial=0.0))) < tol
            alpha, beta = new_a, new_b
            if done:
                break
    e = factor * _judgment_evidence(judge, v, first, single, alpha, beta, codes)
    ev = np.bincount(pair, weights=w * e, minlength=n_pairs)
    has = np.bincount(pair, weights=(w > 0).astype(float), minlength=n_pairs) > 0
    return OrderAwareDS(alpha, beta, engaged, np.where(has, expit(ev), np.nan), np.where(has, ev, np.nan), e, it, indep)


MIN_GOLD_JUDGMENTS = 10  # a judge with this many judgments on gold pairs is measured on gold only


def _mstep_weights(judge: np.ndarray, on_gold: np.ndarray, n_judges: int) -> np.ndarray:
    """(N,) weight of each judgment in the M-step: a judge with >= MIN_GOLD_JUDGMENTS judgments
    on gold pairs is estimated from those alone (the panel's agreement would pull a judge
    that shares its errors with many others towards them); any other judge from all."""
    n_gold = np.bincount(judge, weights=on_gold, minlength=n_judges)
    return np.where((n_gold >= MIN_GOLD_JUDGMENTS)[judge], on_gold.astype(float), 1.0)


def engaged_share(*, unit: np.ndarray, n_units: int, judge: np.ndarray, n_judges: int, chose_a: np.ndarray,
                  shown_a: np.ndarray) -> np.ndarray:
    """(J,) pi_j = max(2 kappa_j - 1, 0) / kappa_j, 1 for a judge with no pair judged in both orders.

    kappa_j: the judge's order consistency, the share of its pairs judged (decisively) in
    both display orders whose verdict was the same in both (with several verdicts in one
    order, the expected share under a random pairing of the verdicts).  A judge that does
    not engage with a pair falls back on something unrelated to the pair (the display
    position, a coin, a surface feature) and, with a fallback no better than a coin, gives
    the same verdict in both orders at most half the time; so kappa_j = e_j + (1 - e_j) / 2
    at most, e_j >= 2 kappa_j - 1 engaged, and pi_j = e_j / kappa_j is the share of its
    consistent verdicts that the fallback cannot explain.  Its verdicts' evidence is scaled
    by pi_j: a judge consistent on only half of the pairs says nothing, one always
    consistent keeps its full weight."""
    known = shown_a >= 0
    af, bf = known & (shown_a == 1), known & (shown_a == 0)
    n_af = np.bincount(unit, weights=af, minlength=n_units)
    n_bf = np.bincount(unit, weights=bf, minlength=n_units)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.bincount(unit, weights=af & chose_a, minlength=n_units) / n_af  # share of "a" with a shown first
        y = np.bincount(unit, weights=bf & chose_a, minlength=n_units) / n_bf
    both = (n_af > 0) & (n_bf > 0)
    same = np.where(both, x * y + (1 - x) * (1 - y), 0.0)
    unit_judge = np.zeros(n_units, np.int64)
    unit_judge[unit] = judge
    n = np.bincount(unit_judge, weights=both, minlength=n_judges)
    kappa = np.bincount(unit_judge, weights=same, minlength=n_judges) / np.maximum(n, 1)
    return np.where(n > 0, np.maximum(2 * kappa - 1, 0.0) / np.maximum(kappa, 1e-9), 1.0)


MIN_SHARED = 20  # judge pairs with fewer shared verdicts are not compared
EXCESS_P = 0.025  # an excess is counted only when the exact test against the baseline rejects at this level (BH per judge)


def independence(*, pair: np.ndarray, judge: np.ndarray, unit: np.ndarray, n_units: int, chose_a: np.ndarray,
                 n_pairs: int, n_judges: int, p_a: np.ndarray, measure: np.ndarray | None = None) -> np.ndarray:
    """(J,) omega_j = 1 / (1 + sum_k x_jk): the share of a judge's vote left once the judges
    whose errors go with its errors beyond what the accuracies explain are accounted for.

    Verdicts are per (pair, judge) unit, v = sign of the net vote (+1 a, -1 b; a verdict that
    flips with the display order, 0, is left out).  For judges j, k with >= MIN_SHARED shared
    verdicts: M_jk = mean v_j v_k.  Judges that err independently given the better response
    have E[v_j v_k] = s_j s_k with s = 2 r - 1 and r the accuracy of a judge's verdicts (under
    the posterior ``p_a``, on gold pairs alone for a judge with ``measure`` 0 elsewhere -- the
    M-step's weights: a posterior the panel's errors pull is a poor yardstick for accurate
    judges; clipped to [0.02, 0.98]), so rho_jk = (M_jk - s_j s_k) /
    sqrt((1 - s_j^2)(1 - s_k^2)) is the correlation of their errors.  Some correlation is
    common to every pair of judges (hard pairs are hard for all; a surface appeal fools all),
    so the baseline is b_jk = (median_k rho_jk + median_j rho_jk) / 2, the typical
    correlation of each of the two with the rest of the panel; x_jk = rho_jk - b_jk when the
    exact binomial test of their disagreements against the count the baseline explains
    (n_jk (1 - s_j s_k - b_jk sqrt(...)) / 2) says fewer at level EXCESS_P, Benjamini-Hochberg over
    the judge's comparisons (uncorrected, a judge compared with 200 others collects a few chance
    excesses and loses half its vote with no family at all), else 0 (two nearly
    perfect judges that never disagree on 30 pairs are no family: too few disagreements were
    expected to tell).  A family of m judges whose errors correlate by x gets omega = 1 / (1 +
    (m - 1) x): together its m votes count m / (1 + (m - 1) x), the effective number of
    independent judges in an exchangeable group; a judge outside any family keeps 1.  A family
    that is most of the panel sets the medians itself and is not discounted (no method without
    gold can tell such a family's agreement from the truth); the few judges outside it then
    look like a family of their own and are discounted instead (measured: docs/benchmarks.md).

    Sparse products over (pair x judge) verdicts: O(sum over pairs of judges^2) for the
    agreement counts, then O(judge pairs that share verdicts)."""
    v = np.bincount(unit, weights=np.where(chose_a, 1.0, -1.0), minlength=n_units)
    unit_judge = np.zeros(n_units, np.int64)
    unit_pair = np.zeros(n_units, np.int64)
    unit_judge[unit], unit_pair[unit] = judge, pair
    verdict = np.sign(v) != 0  # absent units have v = 0 too
    up, uj, uv = unit_pair[verdict], unit_judge[verdict], np.sign(v[verdict])
    q = np.nan_to_num(p_a, nan=0.5)[up]
    right = np.where(uv > 0, q, 1.0 - q)
    um = np.ones(n_units)
    if measure is not None:
        um[unit] = measure
    um = um[verdict]
    # no prior here: a prior pulls an accurate judge's r down, and two accurate judges that
    # never disagree would then look like a family (judges compared have >= MIN_SHARED verdicts)
    r = np.bincount(uj, weights=um * right, minlength=n_judges) / np.maximum(np.bincount(uj, weights=um, minlength=n_judges), 1e-9)
    s = 2.0 * np.clip(r, *CLIP) - 1.0
    shape = (n_pairs, n_judges)
    votes = sp.csr_matrix((uv, (up, uj)), shape=shape)  # (P, J) +-1
    present = votes.copy()
    present.data = np.abs(present.data)
    shared = (present.T @ present).tocoo()  # verdicts two judges share
    net = (votes.T @ votes).tocsr()  # agreements - disagreements
    j, k, n = shared.row, shared.col, shared.data
    keep = (j != k) & (n >= MIN_SHARED)
    j, k, n = j[keep], k[keep], n[keep]
    if not len(j):
        return np.ones(n_judges)
    m = np.asarray(net[j, k]).ravel() / n
    scale = np.sqrt(np.maximum(1.0 - s[j] ** 2, 1e-3) * np.maximum(1.0 - s[k] ** 2, 1e-3))
    rho = (m - s[j] * s[k]) / scale
    med = _group_median(j, rho, n_judges)
    base = 0.5 * (med[j] + med[k])
    # disagreements expected at the baseline correlation: exact one-sided binomial test of fewer
    d0 = np.clip(0.5 * (1.0 - s[j] * s[k] - base * scale), 1e-9, 1.0)
    p = binom_less(np.round(0.5 * n * (1.0 - m)), n, d0)
    # one test per pair of judges (the matrix is symmetric: j < k), Benjamini-Hochberg across all of
    # them: uncorrected, a judge compared with 200 others collected ~5 chance excesses, and its
    # factor fell to ~0.4 with no family at all (measured on 3M generated judgments, 200 humans)
    fewer = _bh_by_group(j, p, EXCESS_P)
    x = np.where(fewer & (rho > base), rho - base, 0.0)
    return 1.0 / (1.0 + np.bincount(j, weights=x, minlength=n_judges))


def _bh_by_group(group: np.ndarray, p: np.ndarray, alpha: float) -> np.ndarray:
    """Benjamini-Hochberg rejections at ``alpha`` within each group (vectorised by one sort)."""
    order = np.lexsort((p, group))
    g, ps = group[order], p[order]
    count = np.bincount(g)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    rank = np.arange(len(ps)) - start[g] + 1  # 1-based rank within the group
    ok = ps <= alpha * rank / count[g]
    # the largest passing rank of each group rejects every smaller p
    last = np.full(len(count), -1)
    np.maximum.at(last, g[ok], rank[ok])
    out = np.zeros(len(p), bool)
    out[order] = rank <= last[g]
    return out


def _group_median(group: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups,) median of ``values`` per group (0 for an empty group), vectorised by one sort."""
    order = np.lexsort((values, group))
    g, x = group[order], values[order]
    count = np.bincount(g, minlength=n_groups)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    lo = start + (count - 1) // 2
    hi = start + count // 2
    ok = count > 0
    out = np.zeros(n_groups)
    out[ok] = 0.5 * (x[lo[ok]] + x[hi[ok]])
    return out


def _judgment_evidence(judge: np.ndarray, v: np.ndarray, first: np.ndarray, single: np.ndarray,
                       alpha: np.ndarray, beta: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
    """(N,) log-odds of a per judgment: one-coin logit(r_j), position-aware for single-order units.

    Each judgment's evidence for the response it chose is one of three numbers of its judge (chose the
    first-shown response of a single-order unit: log(alpha / (1 - beta)); the second-shown: log(beta /
    (1 - alpha)); otherwise logit of the judge's accuracy), so they are computed per judge and gathered
    (``codes``: :func:`_evidence_codes`, fixed over an EM): the values of the per-judgment formula, bit
    for bit, without its logarithms and temporaries over every judgment (at 10M judgments an EM
    iteration's arrays were most of the fit's time, half of it the kernel zeroing fresh pages)."""
    codes = _evidence_codes(judge, first, single) if codes is None else codes
    return v * _evidence_table(alpha, beta)[codes]


def _evidence_table(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """(3 J,) each judge's three evidence values (:func:`_judgment_evidence`), row by row."""
    return np.stack([np.log(alpha / (1.0 - beta)), np.log(beta / (1.0 - alpha)), logit(0.5 * (alpha + beta))], axis=1).ravel()


def _evidence_codes(judge: np.ndarray, first: np.ndarray, single: np.ndarray) -> np.ndarray:
    """(N,) each judgment's entry of its judge's three evidence values (:func:`_judgment_evidence`)."""
    return np.asarray(judge, np.int64) * 3 + np.where(single, np.where(first, 0, 1), 2)
