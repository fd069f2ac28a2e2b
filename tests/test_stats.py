"""pipeline.stats against independent references (scipy.stats.binomtest, the krippendorff
package, plain-loop formulas)."""
from __future__ import annotations

import math

import krippendorff
import numpy as np
import pytest
from scipy import stats

from pipeline.stats import (
    alpha_from_sums,
    bh_adjust,
    bh_reject,
    binom_greater,
    binom_two_sided_half,
    bootstrap_sums_ci,
    compress_rows,
    fleiss_kappa,
    fractional_sign_test,
    kappa_from_sums,
    krippendorff_alpha_nominal,
    reliability_power,
    unit_terms_alpha,
    unit_terms_fleiss,
)


# ---------------------------------------------------------------- binomial
@pytest.mark.parametrize("n", [1, 2, 7, 20, 53, 200])
def test_two_sided_half_matches_scipy(n: int) -> None:
    k = np.arange(n + 1)
    ours = binom_two_sided_half(k, np.full_like(k, n))
    ref = [stats.binomtest(int(x), n, 0.5).pvalue for x in k]
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-14)


def test_two_sided_half_nan_without_trials() -> None:
    assert np.isnan(binom_two_sided_half(np.array([0]), np.array([0]))[0])


@pytest.mark.parametrize("p", [0.1, 0.37, 0.5, 0.83])
def test_greater_matches_scipy(p: float) -> None:
    n = 41
    k = np.arange(n + 1)
    ours = binom_greater(k, np.full_like(k, n), p)
    ref = [stats.binomtest(int(x), n, p, alternative="greater").pvalue for x in k]
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-14)


def test_fractional_sign_test_is_exact_mcnemar_on_integers() -> None:
    for wp, wm in [(0, 0), (0, 5), (3, 3), (9, 1), (17, 4), (40, 0)]:
        ours = fractional_sign_test(np.array([wp]), np.array([wm]))[0]
        if wp + wm == 0:
            assert np.isnan(ours)
            continue
        ref = stats.binomtest(wp, wp + wm, 0.5, alternative="greater").pvalue
        assert ours == pytest.approx(ref, rel=1e-9, abs=1e-14)


def test_fractional_sign_test_interpolates_monotonically() -> None:
    wp = np.linspace(5, 15, 41)
    p = fractional_sign_test(wp, np.full_like(wp, 5.0))
    assert np.all(np.diff(p) < 0)  # more '+' discordance -> stronger evidence
    lo, hi = fractional_sign_test(np.array([10.0, 11.0]), np.array([5.0, 5.0]))
    mid = fractional_sign_test(np.array([10.5]), np.array([5.0]))[0]
    assert hi < mid < lo


def test_reliability_power_matches_brute_force() -> None:
    for n, c, p1, a in [(20, 0.5, 0.75, 0.05), (33, 0.5, 0.75, 0.05), (60, 0.3, 0.65, 0.01), (7, 0.5, 0.9, 0.05)]:
        pmf0 = stats.binom.pmf(np.arange(n + 1), n, c)
        tail0 = np.cumsum(pmf0[::-1])[::-1]  # P(X >= k)
        kcrit = next(k for k in range(n + 2) if k == n + 1 or tail0[k] <= a)
        brute = float(stats.binom.pmf(np.arange(kcrit, n + 1), n, p1).sum())
        assert reliability_power(np.array([n]), np.array([c]), np.array([p1]), a)[0] == pytest.approx(brute, abs=1e-12)


# ---------------------------------------------------------------- Benjamini-Hochberg
def _bh_reference(p: list[float]) -> list[float]:
    """q_i = min over j with p_j >= p_i of p_j * m / rank_j (plain loops)."""
    vals = [x for x in p if not math.isnan(x)]
    m = len(vals)
    srt = sorted(vals)
    out = []
    for x in p:
        if math.isnan(x):
            out.append(math.nan)
            continue
        best = 1.0
        for r, y in enumerate(srt, start=1):
            if y >= x:
                best = min(best, y * m / r)
        out.append(best)
    return out


def test_bh_adjust_matches_reference_with_ties_and_nan() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = rng.random(rng.integers(1, 30)) ** 3
        p[rng.random(p.size) < 0.2] = np.nan
        if p.size > 3:
            p[1] = p[2]  # ties
        np.testing.assert_allclose(bh_adjust(p), _bh_reference(p.tolist()), rtol=1e-12, equal_nan=True)


def test_bh_reject_is_the_step_up_rule() -> None:
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    # textbook example: the largest k with p_(k) <= k * 0.05 / 10 is k = 2
    assert bh_reject(p, 0.05).tolist() == [True, True] + [False] * 8
    assert not bh_reject(np.array([np.nan, np.nan]), 0.05).any()
    assert bh_adjust(np.array([])).size == 0


# ---------------------------------------------------------------- Krippendorff / Fleiss
def _counts_from_matrix(data: np.ndarray, categories: int) -> np.ndarray:
    """coders x units matrix with NaN for missing -> (units, categories) counts."""
    units = data.shape[1]
    out = np.zeros((units, categories))
    for u in range(units):
        for v in data[:, u]:
            if not np.isnan(v):
                out[u, int(v)] += 1
    return out


@pytest.mark.parametrize(("coders", "units", "missing", "seed"), [(2, 9, 0.0, 0), (3, 31, 0.2, 1), (5, 77, 0.45, 2), (4, 13, 0.6, 3)])
def test_krippendorff_alpha_matches_package_with_missing_data(coders: int, units: int, missing: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, units)
    data = np.where(rng.random((coders, units)) < 0.7, truth, rng.integers(0, 3, (coders, units))).astype(float)
    data[rng.random(data.shape) < missing] = np.nan
    ref = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal", value_domain=[0, 1, 2])
    ours = krippendorff_alpha_nominal(_counts_from_matrix(data, 3))
    assert ours == pytest.approx(ref, abs=1e-9)


def test_alpha_undefined_cases() -> None:
    assert math.isnan(krippendorff_alpha_nominal(np.zeros((0, 3))))
    assert math.isnan(krippendorff_alpha_nominal(np.array([[2, 0, 0], [3, 0, 0]])))  # one category: no expected disagreement
    assert math.isnan(krippendorff_alpha_nominal(np.array([[1, 0, 0], [0, 1, 0]])))  # no pairable unit
    assert krippendorff_alpha_nominal(np.array([[2, 0, 0], [0, 2, 0]])) == pytest.approx(1.0)


def _fleiss_reference(table: list[list[int]]) -> float:
    """Fleiss (1971) written out with loops."""
    n_units = len(table)
    m = sum(table[0])
    k = len(table[0])
    p_j = [sum(row[j] for row in table) / (n_units * m) for j in range(k)]
    p_i = [(sum(x * x for x in row) - m) / (m * (m - 1)) for row in table]
    p_bar = sum(p_i) / n_units
    p_e = sum(x * x for x in p_j)
    return (p_bar - p_e) / (1 - p_e)


def test_fleiss_kappa_textbook_example() -> None:
    # Fleiss' kappa example (10 subjects, 14 raters, 5 categories): kappa = 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(np.array(table)) == pytest.approx(0.20993, abs=1e-5)
    assert fleiss_kappa(np.array(table)) == pytest.approx(_fleiss_reference(table), abs=1e-12)


@pytest.mark.parametrize(("units", "m", "seed"), [(3, 2, 0), (17, 3, 1), (101, 5, 2), (250, 4, 3)])
def test_fleiss_kappa_matches_reference(units: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet([1, 1, 1], size=units)
    table = np.array([rng.multinomial(m, row) for row in p])
    assert fleiss_kappa(table) == pytest.approx(_fleiss_reference(table.tolist()), abs=1e-9)


def test_fleiss_kappa_rejects_unequal_ratings() -> None:
    with pytest.raises(ValueError, match="same number of ratings"):
        fleiss_kappa(np.array([[1, 1, 0], [2, 1, 0]]))


def test_sums_are_additive_over_units() -> None:
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 4, (60, 3))
    whole = krippendorff_alpha_nominal(counts)
    assert float(alpha_from_sums(unit_terms_alpha(counts[:25]).sum(0) + unit_terms_alpha(counts[25:]).sum(0))) == pytest.approx(whole)
    eq = np.array([rng.multinomial(4, [0.5, 0.3, 0.2]) for _ in range(40)])
    assert float(kappa_from_sums(unit_terms_fleiss(eq).sum(0))) == pytest.approx(fleiss_kappa(eq))


# ---------------------------------------------------------------- bootstrap
def test_compress_rows_round_trip() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 3, (500, 3))
    rows, mult = compress_rows(counts)
    assert mult.sum() == 500 and len(rows) == len({tuple(r) for r in counts.tolist()})
    expanded = sorted(tuple(r) for r, k in zip(rows.tolist(), mult.tolist(), strict=True) for _ in range(k))
    assert expanded == sorted(tuple(r) for r in counts.tolist())


def test_bootstrap_ci_brackets_estimate_and_compressed_matches_units() -> None:
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 400)
    counts = np.array([rng.multinomial(3, [0.8, 0.15, 0.05] if t == 0 else [0.15, 0.8, 0.05]) for t in truth])
    est = krippendorff_alpha_nominal(counts)
    lo, hi = bootstrap_sums_ci(unit_terms_alpha(counts), alpha_from_sums, resamples=400, seed=0)
    rows, mult = compress_rows(counts)
    lo2, hi2 = bootstrap_sums_ci(unit_terms_alpha(rows), alpha_from_sums, resamples=400, seed=0, multiplicity=mult)
    assert lo < est < hi and lo2 < est < hi2
    assert 0.02 < hi - lo < 0.3
    assert lo2 == pytest.approx(lo, abs=0.03) and hi2 == pytest.approx(hi, abs=0.03)  # same distribution


def test_bootstrap_degenerate_inputs() -> None:
    assert bootstrap_sums_ci(np.zeros((0, 5)), alpha_from_sums, resamples=50, seed=0) == (None, None)
    assert bootstrap_sums_ci(unit_terms_alpha(np.array([[2, 0, 0]])), alpha_from_sums, resamples=0, seed=0) == (None, None)
    # every resample undefined (a single category everywhere)
    assert bootstrap_sums_ci(unit_terms_alpha(np.array([[2, 0, 0], [3, 0, 0]])), alpha_from_sums, resamples=20, seed=0) == (None, None)


def test_binomial_tails_equal_scipy_stats():
    """pipeline.stats computes binomial tails with scipy.special (scipy.stats costs ~0.5 s to import)."""
    from scipy import stats as st

    from pipeline import stats as ps

    rng = np.random.default_rng(5)
    n = np.concatenate([np.arange(0, 60), rng.integers(60, 3000, 200)]).astype(float)
    p = rng.uniform(0.01, 0.99, n.size)
    k = np.floor(rng.uniform(-2, 1.1, n.size) * n)
    np.testing.assert_allclose(ps._sf(k, n, p), st.binom.sf(k, n, p), rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(ps._cdf(k, n, p), st.binom.cdf(k, n, p), rtol=1e-9, atol=1e-300)
    for q in (1e-6, 0.01, 0.05, 0.5, 0.999, 1.0):  # q = 0 depends on where a tail underflows
        np.testing.assert_array_equal(ps._isf(q, n, p), st.binom.isf(q, n, p))
    ns = np.arange(1, 200, dtype=float)
    np.testing.assert_allclose(ps.reliability_power(ns, 0.5, 0.75, 0.05),
                               st.binom.sf(st.binom.isf(0.05, ns, 0.5), ns, 0.75), rtol=1e-9)
