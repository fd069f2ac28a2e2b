"""Shared statistics for the checks: exact binomial tests, Benjamini-Hochberg, a
bootstrap over units for statistics that are functions of column sums, Krippendorff's
alpha (nominal) and Fleiss' kappa from per-unit category counts.

Everything is vectorised over numpy arrays (one test per annotator / slice at once);
the tests in ``tests/test_stats.py`` compare each function with an independent
reference (scipy's ``binomtest``, the ``krippendorff`` package, plain-loop formulas).
Binomial tails come from ``scipy.special`` (``bdtr``/``bdtrc``), not ``scipy.stats``, whose
import alone costs ~0.5 s of every CLI call.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import special

__all__ = [
    "binom_sf",
    "binom_two_sided_half",
    "binom_greater",
    "binom_less",
    "fractional_sign_test",
    "bh_adjust",
    "bh_reject",
    "reliability_power",
    "chance_power",
    "binom_upper_bound",
    "unit_terms_alpha",
    "alpha_from_sums",
    "krippendorff_alpha_nominal",
    "unit_terms_fleiss",
    "kappa_from_sums",
    "fleiss_kappa",
    "compress_rows",
    "bootstrap_sums_ci",
]


# ---------------------------------------------------------------- binomial tests
def binom_sf(k: np.ndarray, n: np.ndarray, p: np.ndarray | float) -> np.ndarray:
    """P(X >= k) for X ~ Binomial(n, p), element-wise; NaN where n == 0."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    out = _sf(k - 1, n, p)
    return np.where(n > 0, out, np.nan)


def _sf(k: np.ndarray, n: np.ndarray, p: np.ndarray | float) -> np.ndarray:
    """P(X > k) for X ~ Binomial(n, p) (``scipy.stats.binom.sf``): 1 for k < 0, 0 for k >= n."""
    k, n_i = np.floor(np.asarray(k, dtype=float)), np.nan_to_num(np.asarray(n, dtype=float)).astype(np.int64)
    inner = special.bdtrc(np.clip(k, 0, np.maximum(n_i - 1, 0)).astype(np.int64), n_i, p)
    return np.where(k < 0, 1.0, np.where(k >= n_i, 0.0, inner))


def _cdf(k: np.ndarray, n: np.ndarray, p: np.ndarray | float) -> np.ndarray:
    """P(X <= k) (``scipy.stats.binom.cdf``): 0 for k < 0, 1 for k >= n."""
    k, n_i = np.floor(np.asarray(k, dtype=float)), np.nan_to_num(np.asarray(n, dtype=float)).astype(np.int64)
    inner = special.bdtr(np.clip(k, 0, np.maximum(n_i - 1, 0)).astype(np.int64), n_i, p)
    return np.where(k < 0, 0.0, np.where(k >= n_i, 1.0, inner))


def _isf(q: float, n: np.ndarray, p: np.ndarray | float) -> np.ndarray:
    """Smallest integer k in [-1, n] with P(X > k) <= q (``scipy.stats.binom.isf``), by a
    vectorised bisection on the monotone tail."""
    n = np.asarray(n, dtype=float)
    p = np.broadcast_to(np.asarray(p, dtype=float), n.shape)
    if q >= 1:
        return np.full(n.shape, -1.0)
    lo, hi = np.full(n.shape, -1.0), np.floor(n)  # P(X > -1) = 1 > q, P(X > n) = 0 <= q
    while np.any(hi - lo > 1):
        mid = np.floor((lo + hi) / 2)
        ok = _sf(mid, n, p) <= q
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    return hi


def binom_greater(k: np.ndarray, n: np.ndarray, p: np.ndarray | float) -> np.ndarray:
    """One-sided exact binomial p-value for H1: success rate > ``p`` (``P(X >= k)``)."""
    return binom_sf(k, n, p)


def binom_less(k: np.ndarray, n: np.ndarray, p: np.ndarray | float) -> np.ndarray:
    """One-sided exact binomial p-value for H1: success rate < ``p`` (``P(X <= k)``); NaN where n == 0.
    ``binom_less(k, n, p) <= alpha`` <=> the exact (Clopper-Pearson) one-sided 1 - alpha upper
    confidence bound of the rate is below ``p``."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    return np.where(n > 0, _cdf(k, n, p), np.nan)


def binom_two_sided_half(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Exact two-sided binomial p-value against 0.5, element-wise; NaN where n == 0.

    The null distribution is symmetric, so the "sum of outcomes no more likely than the
    observed one" p-value (scipy's ``binomtest``) equals twice the smaller tail, capped at 1.
    """
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    lo = _cdf(k, n, 0.5)
    hi = _sf(k - 1, n, 0.5)
    out = np.minimum(1.0, 2.0 * np.minimum(lo, hi))
    return np.where(n > 0, out, np.nan)


def fractional_sign_test(w_plus: np.ndarray, w_minus: np.ndarray) -> np.ndarray:
    """One-sided sign test (H1: '+' more often than '-') for possibly fractional counts.

    For integer counts this is exactly ``P(X >= w_plus)``, X ~ Bin(w_plus + w_minus, 1/2)
    (the exact McNemar test on discordant pairs).  Fractional counts (discordances
    weighted 1/K when a judgment is compared with K other annotators) use the same
    regularised incomplete beta function ``I_{1/2}(w_plus, w_minus + 1)``, the continuous
    extension of that tail.  NaN where there is no discordance.
    """
    wp = np.asarray(w_plus, dtype=float)
    wm = np.asarray(w_minus, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(wp > 0, special.betainc(np.maximum(wp, 1e-12), wm + 1.0, 0.5), 1.0)
    return np.where(wp + wm > 0, out, np.nan)


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); NaN entries are ignored and stay NaN.

    q_(i) = min_{k >= i} m * p_(k) / k over the m non-NaN p-values, capped at 1.
    """
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    pv = p[ok]
    order = np.argsort(pv, kind="mergesort")
    ranked = pv[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    adj = np.empty(m)
    adj[order] = np.minimum(q, 1.0)
    out[ok] = adj
    return out


def bh_reject(p: np.ndarray, alpha: float) -> np.ndarray:
    """Boolean rejections of the BH procedure at FDR ``alpha`` (False where p is NaN)."""
    q = bh_adjust(p)
    return np.where(np.isnan(q), False, q <= alpha)


def reliability_power(n: np.ndarray, chance: np.ndarray, p1: np.ndarray, alpha: float) -> np.ndarray:
    """Power of the one-sided exact test 'better than ``chance``' at level ``alpha``
    against the alternative rate ``p1``, for ``n`` trials (element-wise; 0 where n == 0)."""
    n = np.asarray(n, dtype=float)
    chance = np.clip(np.asarray(chance, dtype=float), 1e-9, 1 - 1e-9)
    # smallest k with P(X >= k | chance) <= alpha is isf(alpha) + 1
    kcrit = _isf(alpha, n, chance)
    power = _sf(kcrit, n, p1)
    return np.where(n > 0, np.nan_to_num(power, nan=0.0), 0.0)


def binom_upper_bound(k: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """Exact (Clopper-Pearson) one-sided 1 - ``alpha`` upper confidence bound of a binomial rate
    from ``k`` successes in ``n`` trials (element-wise; NaN where n == 0, 1 where k == n)."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ub = special.betaincinv(k + 1.0, np.maximum(n - k, 1e-12), 1.0 - alpha)
    return np.where(n > 0, np.where(k >= n, 1.0, ub), np.nan)


def chance_power(n: np.ndarray, chance: np.ndarray, useful: np.ndarray, alpha: float) -> np.ndarray:
    """Power of the one-sided exact test 'below ``useful``' (:func:`binom_less` <= ``alpha``)
    against an annotator exactly at ``chance``, for ``n`` trials (element-wise; 0 where n == 0):
    the probability that the test finds an annotator at chance."""
    n = np.asarray(n, dtype=float)
    useful = np.broadcast_to(np.clip(np.asarray(useful, dtype=float), 1e-9, 1 - 1e-9), n.shape)
    # largest k in [-1, n] with P(X <= k | useful) <= alpha, by a vectorised bisection on the monotone cdf
    lo, hi = np.full(n.shape, -1.0), np.floor(np.nan_to_num(n)) + 1.0  # cdf(-1) = 0 <= alpha; cdf(n) = 1 > alpha
    while np.any(hi - lo > 1):
        mid = np.floor((lo + hi) / 2)
        ok = _cdf(mid, n, useful) <= alpha
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    power = _cdf(lo, n, np.clip(np.asarray(chance, dtype=float), 1e-9, 1 - 1e-9))
    return np.where(n > 0, np.nan_to_num(power, nan=0.0), 0.0)


# ---------------------------------------------------------------- Krippendorff's alpha (nominal)
def unit_terms_alpha(counts: np.ndarray) -> np.ndarray:
    """Per-unit additive terms of nominal alpha: columns ``[D_u, m_u, n_u1..n_uC]``.

    ``counts`` is (units, categories): how many values of each category a unit got.
    Units with fewer than two values are not pairable and get all-zero rows.
    ``D_u = (m_u^2 - sum_c n_uc^2) / (m_u - 1)`` is the unit's (scaled) count of
    disagreeing ordered value pairs.
    """
    counts = np.asarray(counts, dtype=float)
    m = counts.sum(axis=1)
    pairable = m >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(pairable, (m * m - (counts * counts).sum(axis=1)) / (m - 1.0), 0.0)
    cnt = np.where(pairable[:, None], counts, 0.0)
    return np.column_stack([d, np.where(pairable, m, 0.0), cnt])


def alpha_from_sums(sums: np.ndarray) -> np.ndarray:
    """Nominal alpha from summed unit terms (last axis as in :func:`unit_terms_alpha`).

    alpha = 1 - (n - 1) * sum_u D_u / (n^2 - sum_c n_c^2); NaN when undefined (no
    pairable values, or all values in one category: no expected disagreement).
    """
    sums = np.asarray(sums, dtype=float)
    d, n, nc = sums[..., 0], sums[..., 1], sums[..., 2:]
    expected = n * n - (nc * nc).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = 1.0 - (n - 1.0) * d / expected
    return np.where((n >= 2) & (expected > 0), a, np.nan)


def krippendorff_alpha_nominal(counts: np.ndarray) -> float:
    """Krippendorff's alpha, nominal metric, from (units, categories) value counts.

    Missing values are simply absent from the counts (a unit rated by 2 of 5 coders
    has m_u = 2); units with a single value carry no information and drop out.
    """
    return float(alpha_from_sums(unit_terms_alpha(counts).sum(axis=0)))


# ---------------------------------------------------------------- Fleiss' kappa
def unit_terms_fleiss(counts: np.ndarray) -> np.ndarray:
    """Per-unit additive terms of Fleiss' kappa: ``[P_i, 1, n_i1..n_iC]`` for units that
    all have the same number of ratings m (the caller selects them).

    ``P_i = (sum_c n_ic^2 - m) / (m (m - 1))`` is the unit's observed agreement.
    """
    counts = np.asarray(counts, dtype=float)
    m = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_i = np.where(m >= 2, ((counts * counts).sum(axis=1) - m) / (m * (m - 1.0)), 0.0)
    return np.column_stack([p_i, (m >= 2).astype(float), np.where((m >= 2)[:, None], counts, 0.0)])


def kappa_from_sums(sums: np.ndarray) -> np.ndarray:
    """Fleiss' kappa from summed unit terms: (P_bar - P_e) / (1 - P_e), P_e = sum_c p_c^2."""
    sums = np.asarray(sums, dtype=float)
    sp, n_units, nc = sums[..., 0], sums[..., 1], sums[..., 2:]
    total = nc.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_bar = sp / n_units
        pc = nc / total[..., None]
        p_e = (pc * pc).sum(axis=-1)
        k = (p_bar - p_e) / (1.0 - p_e)
    return np.where((n_units > 0) & (p_e < 1.0), k, np.nan)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa over units that all have the same number m >= 2 of ratings."""
    counts = np.asarray(counts, dtype=float)
    m = counts.sum(axis=1)
    if counts.shape[0] and not np.all(m == m[0]):
        raise ValueError(f"fleiss_kappa needs the same number of ratings per unit, found {sorted(set(m.tolist()))[:5]}")
    return float(kappa_from_sums(unit_terms_fleiss(counts).sum(axis=0)))


# ---------------------------------------------------------------- bootstrap
def compress_rows(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of an integer (units, k) array and how many units have each.

    Category counts of pairs take few distinct values (a pair has a handful of ratings),
    so statistics and bootstraps over 300k pairs run over a few dozen patterns."""
    counts = np.asarray(counts)
    if counts.shape[0] == 0:
        return counts.reshape(0, counts.shape[1] if counts.ndim == 2 else 0), np.zeros(0, np.int64)
    counts = counts.astype(np.int64)
    base = int(counts.max()) + 1 if counts.size else 1
    if counts.min(initial=0) >= 0 and base ** counts.shape[1] < 2**62:  # one int64 key per row: fast path
        key = counts @ (base ** np.arange(counts.shape[1], dtype=np.int64))
        _, first, mult = np.unique(key, return_index=True, return_counts=True)
        return counts[first], mult
    rows, mult = np.unique(counts, axis=0, return_counts=True)
    return rows, mult


def bootstrap_sums_ci(
    terms: np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray],
    *,
    resamples: int,
    seed: int,
    level: float = 0.95,
    multiplicity: np.ndarray | None = None,
    chunk: int = 25,
) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI over units for a statistic of column sums.

    ``terms`` is (rows, k) additive per-unit terms; ``multiplicity[r]`` says how many units
    share row r (:func:`compress_rows`; default one unit per row).  A resample draws the
    units with replacement, i.e. multinomial counts over rows with probabilities
    multiplicity / total -- exactly the unit bootstrap, at a cost of O(resamples * rows).
    Sums are one matrix product; ``stat`` maps (resamples, k) sums to (resamples,) values.
    ``(None, None)`` when there are no units, no resamples, or the statistic is undefined
    in every resample.
    """
    terms = np.asarray(terms, dtype=float)
    rows = terms.shape[0]
    mult = np.ones(rows, np.int64) if multiplicity is None else np.asarray(multiplicity, np.int64)
    total = int(mult.sum())
    if rows == 0 or total == 0 or resamples <= 0:
        return None, None
    rng = np.random.default_rng(seed)
    if multiplicity is not None:
        draws = rng.multinomial(total, mult / total, size=resamples).astype(float)
        v = stat(draws @ terms)
    else:
        values = []
        done = 0
        while done < resamples:
            b = min(chunk, resamples - done)
            idx = rng.integers(0, rows, size=(b, rows))
            flat = (idx + (np.arange(b) * rows)[:, None]).ravel()
            w = np.bincount(flat, minlength=b * rows).reshape(b, rows).astype(float)
            values.append(stat(w @ terms))
            done += b
        v = np.concatenate(values)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return None, None
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [tail, 1.0 - tail])
    return float(lo), float(hi)
