"""Position-aware Dawid-Skene: a consensus that reads display order and order consistency.

Why
---
An LLM judge (or a human) may prefer a display *position* instead of a response: a judge
that picks whatever is shown first gives "a" when a is shown first and "b" when b is,
and a judge may do so on some pairs only.  One-coin Dawid-Skene and plurality see those
verdicts as votes; here they carry exactly the information they have.

Model (per judge j; a/b are names, the classes are symmetric)
------------------------------------------------------------
The observation is a *unit*: judge j's decisive (a/b) verdicts on pair i.  Relative to the
unknown better response, a unit judged in both display orders has one of four outcomes:

* ``cc`` right both times, ``ww`` wrong both times (consistent verdicts),
* ``ff`` the first-shown response both times, ``ss`` the second-shown both times (the
  verdict flips with the display order).

theta_j = (cc, ww, ff, ss) sums to 1.  A flip has the same probability whichever response
is better, so **a flipped verdict carries no evidence about the pair** (likelihood ratio
1), however biased the judge; a consistent verdict carries log(cc / ww).  A unit judged in
one order only is the marginal of the same outcomes: P(right | better shown first) =
cc + ff, P(right | better shown second) = cc + ss (position bias in either direction, and a
judge's confusion conditioned on display order); without a display order, P(right) =
cc + (ff + ss) / 2.  Several verdicts of one judge in one order enter as their share (a
soft observation), so every unit weighs one judge's opinion once.  Units with no display
order at all are used only when the judge gave no verdict with a known order on the pair.

Estimation: EM (Dawid & Skene 1979) over the pair posteriors q_i = P(a better) with a flat
class prior: E-step ``logit q_i = sum_units w_u (log L(a) - log L(b))``; M-step theta_j =
(Dirichlet prior + expected outcome counts), single-order units split over the outcomes
they are a marginal of in proportion to the current theta_j.  The prior
(:data:`PRIOR`, the weight of 4 units, mean cc 0.6, ww 0.1, ff = ss 0.15) keeps judges
with few units near a typical judge and breaks the a <-> b label-switching symmetry (a
judge is assumed right more often than wrong when consistent).  Start: the vote of
consistent verdicts (flips abstain), i.e. the order-consistency vote.  Pairs with a gold
label have q fixed to it in the M-step (their own posterior is still computed from the
verdicts), so 5-10 % gold anchors every judge's theta.

All sums are ``np.bincount`` over units; one EM round is O(units).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

__all__ = ["PRIOR", "PositionDS", "UnitObs", "fit", "unit_observations"]

# Dirichlet pseudo-counts for (cc, ww, ff, ss): mean (0.6, 0.1, 0.15, 0.15), weight 4 units
PRIOR = np.array([2.4, 0.4, 0.6, 0.6])
_CLIP = 1e-4


@dataclass(frozen=True)
class UnitObs:
    """Per (pair, judge) unit with at least one decisive verdict (U,).

    ``x`` / ``y``: share of ``a`` among the verdicts with a / b shown first (NaN: none);
    ``z``: share of ``a`` among the verdicts without display order (NaN: none, or the unit
    has verdicts with a display order)."""

    pair: np.ndarray
    judge: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    weight: np.ndarray  # weight in the pair posterior (0 = estimated, not used for the pair)

    @property
    def n(self) -> int:
        return len(self.pair)


def unit_observations(unit: np.ndarray, unit_pair: np.ndarray, unit_ann: np.ndarray, label: np.ndarray,
                      shown: np.ndarray, keep: np.ndarray, unit_weight: np.ndarray) -> UnitObs:
    """Reduce judgments to units.  ``unit`` (N,) unit code of each judgment, ``unit_pair`` /
    ``unit_ann`` (U,) its pair and judge; ``label`` (N,) canonical code (0 a, 1 b, else not
    decisive), ``shown`` (N,) canonical shown_first (0 a, 1 b, -1 missing); ``keep`` (N,)
    judgments to use; ``unit_weight`` (U,) posterior weight per unit."""
    n_units = len(unit_pair)
    dec = keep & (label >= 0) & (label <= 1)
    is_a = (label == 0) & dec

    def cnt(m: np.ndarray) -> np.ndarray:
        return np.bincount(unit[m], minlength=n_units).astype(float)

    af, bf, nf = dec & (shown == 0), dec & (shown == 1), dec & (shown < 0)
    n_af, n_bf, n_nf = cnt(af), cnt(bf), cnt(nf)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.where(n_af > 0, cnt(af & is_a) / n_af, np.nan)
        y = np.where(n_bf > 0, cnt(bf & is_a) / n_bf, np.nan)
        z = np.where((n_nf > 0) & (n_af == 0) & (n_bf == 0), cnt(nf & is_a) / n_nf, np.nan)
    has = (n_af > 0) | (n_bf > 0) | (n_nf > 0)
    u = np.flatnonzero(has)
    return UnitObs(unit_pair[u], unit_ann[u], x[u], y[u], z[u], np.asarray(unit_weight, float)[u])


@dataclass(frozen=True)
class PositionDS:
    """Fitted model: ``theta`` (J, 4) per judge (cc, ww, ff, ss); ``p_a`` (P,) posterior
    P(a better) from the weighted units (NaN for pairs without one); ``evidence`` (P,) its
    log-odds; ``iterations`` run."""

    theta: np.ndarray
    p_a: np.ndarray
    evidence: np.ndarray
    iterations: int

    @property
    def accuracy(self) -> np.ndarray:
        """(J,) P(right) of one verdict in a random display order: cc + (ff + ss) / 2."""
        return self.theta[:, 0] + 0.5 * (self.theta[:, 2] + self.theta[:, 3])


def _cells(o: UnitObs) -> dict[str, np.ndarray]:
    """Outcome weights of each unit under 'a is better' (suffix _a) and 'b is better' (_b).

    Both orders: cc/ww/ff/ss shares (soft: x, y are shares).  One order: (chose first,
    better first) combinations.  No order: right/wrong shares."""
    x, y, z = o.x, o.y, o.z
    two = ~np.isnan(x) & ~np.isnan(y)
    only_a = ~np.isnan(x) & np.isnan(y)
    only_b = np.isnan(x) & ~np.isnan(y)
    none = ~np.isnan(z)
    x0, y0, z0 = np.nan_to_num(x), np.nan_to_num(y), np.nan_to_num(z)
    t = two.astype(float)
    c: dict[str, np.ndarray] = {
        # both orders: outcome shares; flips are the same under a and b
        "cc_a": t * x0 * y0, "ww_a": t * (1 - x0) * (1 - y0),
        "cc_b": t * (1 - x0) * (1 - y0), "ww_b": t * x0 * y0,
        "ff": t * x0 * (1 - y0), "ss": t * (1 - x0) * y0,
    }
    # one order: chose-first share f, and whether the better one was shown first (a better & a first, ...)
    fa, fb = only_a * x0, only_b * (1 - y0)  # chose first: chose a when a first / chose b when b first
    sa, sb = only_a * (1 - x0), only_b * y0  # chose second
    # under a better: a-first units have the better one first, b-first units have it second
    c["rf_a"], c["ws_a"], c["wf_a"], c["rs_a"] = fa, sa, fb, sb  # right-first, wrong-second, wrong-first, right-second
    c["rf_b"], c["ws_b"], c["wf_b"], c["rs_b"] = fb, sb, fa, sa
    n = none.astype(float)
    c["r0_a"], c["w0_a"] = n * z0, n * (1 - z0)
    c["r0_b"], c["w0_b"] = n * (1 - z0), n * z0
    return c


def _loglik(c: dict[str, np.ndarray], th: np.ndarray, side: str) -> np.ndarray:
    """(U,) log-likelihood of each unit's verdicts if ``side`` is better; th (U, 4)."""
    cc, ww, ff, ss = th[:, 0], th[:, 1], th[:, 2], th[:, 3]
    rho = cc + 0.5 * (ff + ss)
    lg = np.log
    s = side
    return (c[f"cc_{s}"] * lg(cc) + c[f"ww_{s}"] * lg(ww) + c["ff"] * lg(ff) + c["ss"] * lg(ss)
            + c[f"rf_{s}"] * lg(cc + ff) + c[f"ws_{s}"] * lg(ww + ss) + c[f"wf_{s}"] * lg(ww + ff) + c[f"rs_{s}"] * lg(cc + ss)
            + c[f"r0_{s}"] * lg(rho) + c[f"w0_{s}"] * lg(1 - rho))


def _expected_counts(c: dict[str, np.ndarray], q: np.ndarray, th: np.ndarray) -> np.ndarray:
    """(U, 4) expected outcome counts given q (U,) = P(a better) and the current th (U, 4)."""
    cc, ww, ff, ss = th[:, 0], th[:, 1], th[:, 2], th[:, 3]
    p = 1 - q
    out = np.zeros((len(q), 4))
    out[:, 0] = q * c["cc_a"] + p * c["cc_b"]
    out[:, 1] = q * c["ww_a"] + p * c["ww_b"]
    out[:, 2] = c["ff"]
    out[:, 3] = c["ss"]
    # one order: right & better-first -> cc or ff; wrong & better-second (chose first) -> ww or ff;
    # wrong & better-first (chose second) -> ww or ss; right & better-second -> cc or ss
    rf = q * c["rf_a"] + p * c["rf_b"]
    wf = q * c["wf_a"] + p * c["wf_b"]
    ws = q * c["ws_a"] + p * c["ws_b"]
    rs = q * c["rs_a"] + p * c["rs_b"]
    out[:, 0] += rf * cc / (cc + ff) + rs * cc / (cc + ss)
    out[:, 2] += rf * ff / (cc + ff) + wf * ff / (ww + ff)
    out[:, 1] += wf * ww / (ww + ff) + ws * ww / (ww + ss)
    out[:, 3] += ws * ss / (ww + ss) + rs * ss / (cc + ss)
    # no order: right -> cc, ff/2, ss/2; wrong -> ww, ff/2, ss/2
    rho = cc + 0.5 * (ff + ss)
    r0 = q * c["r0_a"] + p * c["r0_b"]
    w0 = q * c["w0_a"] + p * c["w0_b"]
    out[:, 0] += r0 * cc / rho
    out[:, 1] += w0 * ww / (1 - rho)
    out[:, 2] += 0.5 * ff * (r0 / rho + w0 / (1 - rho))
    out[:, 3] += 0.5 * ss * (r0 / rho + w0 / (1 - rho))
    return out


def fit(o: UnitObs, *, n_pairs: int, n_judges: int, gold: np.ndarray | None = None, iterations: int = 50,
        tol: float = 1e-6) -> PositionDS:
    """EM for the position-aware model.  ``gold`` (P,) int: 0 a / 1 b / -1 none (canonical)."""
    c = _cells(o)
    w = o.weight
    # start: consistent verdicts vote (+1 a, -1 b), flips abstain; single-order verdicts vote at half weight
    v = (c["cc_a"] - c["ww_a"]) + 0.5 * (c["rf_a"] + c["rs_a"] - c["wf_a"] - c["ws_a"]) + 0.5 * (c["r0_a"] - c["w0_a"])
    s = np.bincount(o.pair, weights=np.where(w > 0, 1.0, 0.5) * v, minlength=n_pairs)
    q_pair = expit(s)
    g = np.full(n_pairs, -1) if gold is None else gold
    clamp = g >= 0

    def anchored(qp: np.ndarray) -> np.ndarray:
        return np.where(clamp, (g == 0).astype(float), qp)

    theta = np.tile(PRIOR / PRIOR.sum(), (n_judges, 1))
    it = 0
    for it in range(1, max(iterations, 1) + 1):
        qu = anchored(q_pair)[o.pair]
        counts = _expected_counts(c, qu, theta[o.judge])
        new = PRIOR[None, :] + np.column_stack([np.bincount(o.judge, weights=counts[:, k], minlength=n_judges) for k in range(4)])
        new = np.clip(new / new.sum(axis=1, keepdims=True), _CLIP, None)
        new /= new.sum(axis=1, keepdims=True)
        th_u = new[o.judge]
        llr = _loglik(c, th_u, "a") - _loglik(c, th_u, "b")
        q_pair = expit(np.bincount(o.pair, weights=w * llr, minlength=n_pairs))
        done = float(np.max(np.abs(new - theta), initial=0.0)) < tol
        theta = new
        if done:
            break
    th_u = theta[o.judge]
    llr = _loglik(c, th_u, "a") - _loglik(c, th_u, "b")
    ev = np.bincount(o.pair, weights=w * llr, minlength=n_pairs)
    has = np.bincount(o.pair, weights=(w > 0).astype(float), minlength=n_pairs) > 0
    return PositionDS(theta, np.where(has, expit(ev), np.nan), np.where(has, ev, np.nan), it)
