"""Fits with some annotators' parameters fixed (a child's rule, docs/incremental.md): fixing
annotators at the values an unconstrained fit gave them leaves the others at (nearly) theirs,
and with everyone fixed nothing is fitted."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import position_ds
from pipeline.aggregate import dawid_skene


def _panel(seed: int, n_pairs: int = 400, n_judges: int = 7):
    rng = np.random.default_rng(seed)
    truth = rng.random(n_pairs) < 0.5
    acc = rng.uniform(0.55, 0.95, n_judges)
    pair = np.repeat(np.arange(n_pairs), 4)
    judge = np.concatenate([rng.choice(n_judges, 4, replace=False) for _ in range(n_pairs)])
    right = rng.random(len(pair)) < acc[judge]
    chose_a = np.where(right, truth[pair], ~truth[pair])
    shown_a = rng.integers(0, 2, len(pair)).astype(np.int8)
    return pair, judge, chose_a, shown_a, n_pairs, n_judges


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dawid_skene_with_fixed_annotators_keeps_the_free_ones_near_the_joint_fit(seed):
    pair, judge, chose_a, _, P, J = _panel(seed)
    vote = np.where(chose_a, 1.0, -1.0)
    kw = dict(n_pairs=P, n_annotators=J, iterations=200)
    free = dawid_skene(pair, judge, vote, np.ones(len(pair)), **kw)
    fixed = free.copy()
    fixed[J // 2:] = np.nan
    part = dawid_skene(pair, judge, vote, np.ones(len(pair)), fixed=fixed, **kw)
    assert np.array_equal(part[: J // 2], free[: J // 2])
    assert np.allclose(part, free, atol=2e-3)
    pinned = np.full(J, 0.8)
    assert np.array_equal(dawid_skene(pair, judge, vote, np.ones(len(pair)), fixed=pinned, **kw), pinned)


@pytest.mark.parametrize("seed", [0, 1])
def test_order_aware_fit_with_fixed_judges(seed):
    pair, judge, chose_a, shown_a, P, J = _panel(seed)
    unit_keys, unit = np.unique(pair * J + judge, return_inverse=True)
    kw = dict(pair=pair, judge=judge, unit=unit, n_units=len(unit_keys), chose_a=chose_a, shown_a=shown_a,
              weight=np.ones(len(pair)), n_pairs=P, n_judges=J, iterations=200, decorrelate=False)
    free = position_ds.fit(**kw)
    fa, fb, ff = free.alpha.copy(), free.beta.copy(), free.engaged.copy()
    for x in (fa, fb, ff):
        x[J // 2:] = np.nan
    part = position_ds.fit(**kw, fixed=(fa, fb, ff))
    assert np.array_equal(part.alpha[: J // 2], free.alpha[: J // 2])
    assert np.allclose(part.alpha, free.alpha, atol=2e-3) and np.allclose(part.beta, free.beta, atol=2e-3)
    everyone = position_ds.fit(**kw, fixed=(free.alpha, free.beta, free.engaged))
    assert everyone.iterations == 0 and np.allclose(everyone.evidence, free.evidence, atol=1e-9)
