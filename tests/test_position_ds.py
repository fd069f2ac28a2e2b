"""Order-aware Dawid-Skene (pipeline/position_ds.py) against a plain-Python reference, and
on hand-planted panels with exact expected labels and abstentions."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from pipeline import position_ds
from pipeline.aggregate import aggregate, encode, order_aware
from pipeline.checks import consensus
from pipeline.ingest import judgments_from_records
from tests.synth import both_orders, verdict_records


# ---------------------------------------------------------------- plain reference
def _reference(rows: list[tuple[int, int, int, bool, int, float]], n_pairs: int, n_judges: int, gold: list[int],
               iterations: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """rows: (pair, judge, unit, chose_a, shown_a (1 a first / 0 b first / -1), weight); loops only."""
    pr, pw = position_ds.PRIOR_RIGHT, position_ds.PRIOR_WRONG
    lo, hi = position_ds.CLIP
    orders: dict[int, set[int]] = {}
    for _, _, u, _, s, _ in rows:
        if s >= 0:
            orders.setdefault(u, set()).add(s)
    # engagement: share of a verdicts per (unit, order), consistency per judge
    share: dict[tuple[int, int], list[int]] = {}
    unit_judge = {}
    for _, j, u, a, s, _ in rows:
        unit_judge[u] = j
        if s >= 0:
            share.setdefault((u, s), []).append(int(a))
    same = [0.0] * n_judges
    both = [0] * n_judges
    for u, j in unit_judge.items():
        if (u, 1) in share and (u, 0) in share:
            x = sum(share[(u, 1)]) / len(share[(u, 1)])
            y = sum(share[(u, 0)]) / len(share[(u, 0)])
            same[j] += x * y + (1 - x) * (1 - y)
            both[j] += 1
    pi = [max(2 * (same[j] / both[j]) - 1, 0) / max(same[j] / both[j], 1e-9) if both[j] else 1.0 for j in range(n_judges)]
    n_gold = [0] * n_judges
    for p, j, *_ in rows:
        n_gold[j] += gold[p] >= 0
    use_gold_only = [n_gold[j] >= position_ds.MIN_GOLD_JUDGMENTS for j in range(n_judges)]

    def evidence(p_row, al, be):
        _, j, u, a, s, _ = p_row
        v = 1.0 if a else -1.0
        single = s >= 0 and len(orders[u]) == 1
        if single:
            first = a == (s == 1)
            e = math.log(al[j] / (1 - be[j])) if first else math.log(be[j] / (1 - al[j]))
            return pi[j] * v * e
        r = (al[j] + be[j]) / 2
        return pi[j] * v * math.log(r / (1 - r))

    s0 = [0.0] * n_pairs
    for p, _, _, a, _, w in rows:
        s0[p] += w * (1.0 if a else -1.0)
    q = [1 / (1 + math.exp(-x)) for x in s0]
    al = [pr / (pr + pw)] * n_judges
    be = list(al)
    for _ in range(iterations):
        ka, na, kb, nb = [0.0] * n_judges, [0.0] * n_judges, [0.0] * n_judges, [0.0] * n_judges
        for p, j, u, a, s, w in rows:
            if use_gold_only[j] and gold[p] < 0:
                continue
            qp = (1.0 if gold[p] == 0 else 0.0) if gold[p] >= 0 else q[p]
            right = qp if a else 1 - qp
            if s < 0:
                ka[j] += 0.5 * right
                kb[j] += 0.5 * right
                na[j] += 0.5
                nb[j] += 0.5
                continue
            pbf = qp if s == 1 else 1 - qp
            first = a == (s == 1)
            na[j] += pbf
            nb[j] += 1 - pbf
            ka[j] += pbf * first
            kb[j] += (1 - pbf) * (not first)
        al = [min(max((pr + ka[j]) / (pr + pw + na[j]), lo), hi) for j in range(n_judges)]
        be = [min(max((pr + kb[j]) / (pr + pw + nb[j]), lo), hi) for j in range(n_judges)]
        ev = [0.0] * n_pairs
        for row in rows:
            ev[row[0]] += row[5] * evidence(row, al, be)
        q = [1 / (1 + math.exp(-x)) for x in ev]
    ev = [0.0] * n_pairs
    for row in rows:
        ev[row[0]] += row[5] * evidence(row, al, be)
    return al, be, ev, pi


@pytest.mark.parametrize(("seed", "n_pairs", "n_judges", "gold_share"), [(0, 7, 3, 0.0), (1, 23, 5, 0.0), (2, 41, 4, 0.3)])
def test_matches_plain_reference(seed: int, n_pairs: int, n_judges: int, gold_share: float) -> None:
    rng = random.Random(seed)
    rows = []
    unit = 0
    for p in range(n_pairs):
        for j in range(n_judges):
            if rng.random() < 0.25:
                continue
            shows = rng.choice([[1, 0], [1], [0], [-1], [1, 1, 0]])
            for s in shows:
                rows.append((p, j, unit, rng.random() < (0.7 if s != 0 else 0.4), s, 0.0))
            unit += 1
    k = np.bincount([r[2] for r in rows])
    rows = [(p, j, u, a, s, 1.0 / k[u]) for p, j, u, a, s, _ in rows]
    gold = [rng.choice([0, 1]) if rng.random() < gold_share else -1 for _ in range(n_pairs)]
    arr = {name: np.array([r[i] for r in rows]) for i, name in enumerate(("pair", "judge", "unit", "chose_a", "shown_a", "weight"))}
    m = position_ds.fit(pair=arr["pair"], judge=arr["judge"], unit=arr["unit"], n_units=unit, chose_a=arr["chose_a"].astype(bool),
                        shown_a=arr["shown_a"], weight=arr["weight"], n_pairs=n_pairs, n_judges=n_judges,
                        gold=np.array(gold), iterations=7, tol=0.0, decorrelate=False)
    al, be, ev, pi = _reference(rows, n_pairs, n_judges, gold, 7)
    np.testing.assert_allclose(m.alpha, al, atol=1e-12)
    np.testing.assert_allclose(m.beta, be, atol=1e-12)
    np.testing.assert_allclose(m.engaged, pi, atol=1e-12)
    has = np.bincount(arr["pair"], minlength=n_pairs) > 0
    np.testing.assert_allclose(m.evidence[has], np.array(ev)[has], atol=1e-9)
    assert m.iterations == 7


# ---------------------------------------------------------------- planted panels
def _panel() -> tuple[list, dict[str, str]]:
    """30 calibration pairs (truth alternates a/b): good-1 always right in both orders, good-2
    right except on pair c0, good-3 right; first-1..4 always pick the first position (their
    verdicts flip); flipper picks the first position on even pairs, the second on odd ones."""
    rows, truth = [], {}
    for p in range(30):
        key, t = f"c{p}", "ab"[p % 2]
        truth[key] = t
        for g in ("good-1", "good-2", "good-3"):
            rows += both_orders(key, g, "wrong" if (g == "good-2" and p == 0) else "right", t)
        for f in ("first-1", "first-2", "first-3", "first-4"):
            rows += both_orders(key, f, "first", t)
        rows += both_orders(key, "flipper", "first" if p % 2 == 0 else "second", t)
    return rows, truth


def test_planted_panel_labels_and_abstentions() -> None:
    rows, truth = _panel()
    # T1: the good judges say b in both orders; the first-biased judges saw it once, a first,
    # and said a: 4 one-order "a" votes against 3 -- plurality a, the order-aware consensus b
    rows += both_orders("T1", "good-1", "right", "b") + both_orders("T1", "good-2", "right", "b") \
        + both_orders("T1", "good-3", "right", "b")
    rows += [("T1", f, "a", "a") for f in ("first-1", "first-2", "first-3", "first-4")]
    # T2: every verdict flips with the display order: no evidence at all -> escalate (routed)
    for jdg in ("good-1", "first-1", "first-2", "flipper"):
        rows += both_orders("T2", jdg, "first", "a")
    # T3: good-1 (never wrong) says a, good-2 (wrong once) says b, the rest flip: decided a by a
    # hair -> abstains (ambiguous)
    rows += both_orders("T3", "good-1", "right", "a") + both_orders("T3", "good-2", "wrong", "a")
    for jdg in ("first-1", "first-2", "first-3", "first-4", "flipper"):
        rows += both_orders("T3", jdg, "first", "a")
    j = judgments_from_records(verdict_records(rows))
    pairs = aggregate(j).pairs
    by = {r["prompt_text"].removeprefix("question "): r for r in pairs.iter_rows(named=True)}
    for key, t in truth.items():
        assert by[key]["label_consensus"] == t, key
    assert (by["T1"]["count_a"], by["T1"]["count_b"]) == (4, 6)  # one vote per judge: 4 a against 3 b
    assert by["T1"]["label_consensus"] == "b"
    assert by["T1"]["p_a_weighted"] < 0.05  # the first-biased judges' "a" is (nearly) no evidence
    assert by["T2"]["label_consensus"] == "escalate" and by["T2"]["p_a_weighted"] == 0.5
    assert by["T3"]["label_consensus"] == "a" and 0.5 < by["T3"]["p_a_weighted"] < 0.55
    res = consensus.run(j, pairs=pairs)
    flagged = {r["subject_id"] for r in res.flags.iter_rows(named=True)}
    pid = dict(zip(pairs["prompt_text"], pairs["pair_id"], strict=True))
    assert flagged == {pid["question T3"]} and set(res.flags["reason"]) == {"ambiguous"}
    assert res.metrics["abstained"] == 1 and res.metrics["decided_pairs"] == 32
    # the judges: the first-biased ones and the flipper carry no weight (never consistent)
    e = encode(j)
    _, m = order_aware(e)
    eng = dict(zip(e.ann_ids.to_list(), m.engaged, strict=True))
    assert eng["first-1"] == 0.0 and eng["flipper"] == 0.0
    assert eng["good-2"] == 1.0  # wrong twice, but consistently: consistency is not accuracy
    assert eng["good-1"] == pytest.approx(31 / 32)  # flipped on T2: kappa 32/33, pi = (2 kappa - 1) / kappa


def test_gold_measures_judges_that_err_together() -> None:
    """5 judges of one family are wrong together on every third pair, 2 good judges never: without
    gold the family outvotes them there; with gold on 15 pairs (each judge 30 gold judgments)
    the judges are measured on gold and the contested non-gold pairs are decided right."""
    rows, truth = [], {}
    for p in range(45):
        key, t = f"p{p}", "ab"[p % 2]
        truth[key] = t
        for g in ("good-1", "good-2"):
            rows += both_orders(key, g, "right", t)
        for f in range(5):
            rows += both_orders(key, f"fam-{f}", "wrong" if p % 3 == 0 else "right", t)
    gold = {f"p{p}": truth[f"p{p}"] for p in range(15)}
    contested = [f"p{p}" for p in range(15, 45) if p % 3 == 0]
    for g, expect_right in ((None, False), (gold, True)):
        pairs = aggregate(judgments_from_records(verdict_records(rows, gold=g))).pairs
        lab = {r["prompt_text"].removeprefix("question "): r["label_consensus"] for r in pairs.iter_rows(named=True)}
        assert all((lab[k] == truth[k]) == expect_right for k in contested), (g is not None, [lab[k] for k in contested])
        assert all(lab[k] == truth[k] for k in truth if k not in contested and int(k[1:]) % 3 != 0)


# ---------------------------------------------------------------- independence weights
def _independence_reference(verdicts: dict[tuple[int, int], int], p_a: list[float], n_judges: int) -> list[float]:
    """verdicts: (pair, judge) -> +1 / -1 (net vote's sign); plain loops and the formulas of the docstring."""
    right = [0.0] * n_judges
    cnt = [0] * n_judges
    for (p, j), v in verdicts.items():
        right[j] += p_a[p] if v > 0 else 1 - p_a[p]
        cnt[j] += 1
    lo, hi = position_ds.CLIP
    s = [2 * min(max(right[j] / cnt[j], lo), hi) - 1 if cnt[j] else 2 * lo - 1 for j in range(n_judges)]
    pairs_of = {j: {p for (p, jj) in verdicts if jj == j} for j in range(n_judges)}
    stats = {}
    for j in range(n_judges):
        for k in range(n_judges):
            shared = pairs_of[j] & pairs_of[k]
            if j == k or len(shared) < position_ds.MIN_SHARED:
                continue
            n = len(shared)
            m = sum(verdicts[(p, j)] * verdicts[(p, k)] for p in shared) / n
            scale = math.sqrt(max(1 - s[j] ** 2, 1e-3) * max(1 - s[k] ** 2, 1e-3))
            stats[(j, k)] = (n, m, scale, (m - s[j] * s[k]) / scale)
    med = []
    for j in range(n_judges):
        row = sorted(v[3] for (a, _), v in stats.items() if a == j)
        med.append(0.5 * (row[(len(row) - 1) // 2] + row[len(row) // 2]) if row else 0.0)
    tails: dict[tuple[int, int], float] = {}
    for (j, k), (n, m, scale, rho) in stats.items():
        base = 0.5 * (med[j] + med[k])
        d0 = min(max(0.5 * (1 - s[j] * s[k] - base * scale), 1e-9), 1.0)
        dis = round(0.5 * n * (1 - m))
        tails[(j, k)] = sum(math.comb(n, i) * d0 ** i * (1 - d0) ** (n - i) for i in range(dis + 1))
    found = set()  # Benjamini-Hochberg at EXCESS_P over each judge's comparisons
    for j in range(n_judges):
        mine = sorted((t, k) for (a, k), t in tails.items() if a == j)
        passing = [i + 1 for i, (t, _) in enumerate(mine) if t <= position_ds.EXCESS_P * (i + 1) / len(mine)]
        found |= {(j, k) for _, k in mine[:max(passing, default=0)]}
    total = [0.0] * n_judges
    for (j, k), (n, m, scale, rho) in stats.items():
        base = 0.5 * (med[j] + med[k])
        if (j, k) in found and rho > base:
            total[j] += rho - base
    return [1 / (1 + t) for t in total]


def test_independence_matches_plain_reference() -> None:
    rng = random.Random(5)
    n_pairs, n_judges = 60, 6
    truth = [rng.random() < 0.5 for _ in range(n_pairs)]
    rows = []  # (pair, judge, unit, chose_a)
    unit = 0
    for p in range(n_pairs):
        taste = rng.random() < 0.3  # judges 0-2 share a taste: wrong together on 30 % of the pairs
        for j in range(n_judges):
            if rng.random() < 0.15:
                continue
            right = (not taste) if j < 3 else rng.random() < 0.75
            lab = truth[p] if right else not truth[p]
            for _ in range(rng.choice([1, 2])):  # some units twice (both orders), sometimes flipping
                rows.append((p, j, unit, lab if rng.random() < 0.9 else not lab))
            unit += 1
    arr = {k: np.array([r[i] for r in rows]) for i, k in enumerate(("pair", "judge", "unit", "chose_a"))}
    p_a = [rng.uniform(0.05, 0.95) if rng.random() < 0.2 else (0.9 if t else 0.1) for t in truth]
    got = position_ds.independence(pair=arr["pair"], judge=arr["judge"], unit=arr["unit"], n_units=unit,
                                   chose_a=arr["chose_a"].astype(bool), n_pairs=n_pairs, n_judges=n_judges, p_a=np.array(p_a))
    net: dict[tuple[int, int], float] = {}
    for p, j, _, a in rows:
        net[(p, j)] = net.get((p, j), 0.0) + (1 if a else -1)
    verdicts = {key: (1 if x > 0 else -1) for key, x in net.items() if x != 0}
    np.testing.assert_allclose(got, _independence_reference(verdicts, p_a, n_judges), atol=1e-12)
    assert np.sort(got[:3])[1] < 0.8 and got[3:].min() > 0.9  # the family shares its vote, the others keep theirs


def test_family_shares_one_vote_and_independent_panels_lose_nothing() -> None:
    """make_judge_panel: with families of 8 the family members' verdicts are discounted, the good
    judges' much less.  On panels whose judges err independently the good judges are discounted
    too -- shared difficulty (hard pairs are hard for every good judge) and a posterior that
    underrates accurate judges read as a shared error -- but alike, so the labels barely move."""
    from tests.synth import make_judge_panel

    p = make_judge_panel(0, family_size=8, taste=2.0, appeal=1.0, clarity=(0.3, 1.0))
    e = encode(p.judgments())
    _, m = order_aware(e)
    w = dict(zip(e.ann_ids.to_list(), m.independence, strict=True))
    good = [w[a] for a, role in p.judges.items() if role == "good"]
    rest = [w[a] for a, role in p.judges.items() if role != "good"]
    assert min(good) > 2 * np.median(rest) and np.median(rest) < 0.4, (good, rest)
    acc = []
    for seed in range(6):
        p = make_judge_panel(seed, appeal=0.0, clarity=(0.5, 1.0))
        e = encode(p.judgments())
        dec = e.label <= 1
        truth = np.array([0 if p.truth[x] == "a" else 1 for x in e.pair_ids.to_list()])
        for decorrelate in (False, True):
            fitted = position_ds.fit(pair=e.pair[dec], judge=e.ann[dec], unit=e.unit[dec], n_units=e.n_units,
                                     chose_a=e.label[dec] == 0, shown_a=np.where(e.shown[dec] < 0, -1, (e.shown[dec] == 0)),
                                     weight=1.0 / np.bincount(e.unit)[e.unit][dec], n_pairs=e.n_pairs, n_judges=e.n_annotators,
                                     decorrelate=decorrelate)
            acc.append(np.mean(np.where(fitted.evidence > 0, 0, 1) == truth))
    without, with_ = np.mean(acc[0::2]), np.mean(acc[1::2])
    assert with_ >= without - 0.01, (without, with_)  # per seed within +-0.02


def test_independent_judges_of_a_large_panel_keep_their_vote() -> None:
    """120 judges that err independently (accuracy 0.85), 12 per pair: each is compared with ~119
    others, so uncorrected tests at EXCESS_P found ~3 chance 'families' per judge and cut the median
    factor to 0.58 (96 of 120 below 0.9); Benjamini-Hochberg over each judge's comparisons keeps it at 1."""
    rng = np.random.default_rng(0)
    n_pairs, n_judges, per = 6000, 120, 12
    truth = rng.random(n_pairs) < 0.5
    pair = np.repeat(np.arange(n_pairs), per)
    judge = np.concatenate([rng.choice(n_judges, per, replace=False) for _ in range(n_pairs)])
    chose_a = np.where(rng.random(pair.size) < 0.85, truth[pair], ~truth[pair])
    w = position_ds.independence(pair=pair, judge=judge, unit=np.arange(pair.size), n_units=pair.size, chose_a=chose_a,
                                 n_pairs=n_pairs, n_judges=n_judges, p_a=np.where(truth, 0.97, 0.03))
    assert np.median(w) == 1.0 and (w < 0.9).sum() <= 3, np.sort(w)[:10]


def test_judgment_evidence_is_the_per_judgment_formula_bit_for_bit() -> None:
    """The evidence gathered from each judge's three values equals the formula over every judgment (its
    logarithms taken per judgment), value for value: the EM's results do not move."""
    from scipy.special import logit

    rng = np.random.default_rng(5)
    n, j = 5_000, 40
    judge, first, single = rng.integers(0, j, n), rng.random(n) < 0.5, rng.random(n) < 0.4
    v = np.where(rng.random(n) < 0.6, 1.0, -1.0)
    alpha, beta = rng.uniform(*position_ds.CLIP, j), rng.uniform(*position_ds.CLIP, j)
    alpha[:3], beta[:3] = position_ds.CLIP[0], position_ds.CLIP[1]  # (the clipped extremes too)
    al, be = alpha[judge], beta[judge]
    for_chosen = np.where(first, np.log(al / (1.0 - be)), np.log(be / (1.0 - al)))
    want = np.where(single, v * for_chosen, v * logit(0.5 * (al + be)))
    got = position_ds._judgment_evidence(judge, v, first, single, alpha, beta)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert np.array_equal(got, position_ds._judgment_evidence(judge, v, first, single, alpha, beta,
                                                              position_ds._evidence_codes(judge, first, single)))


def _em_by_selects(pair, judge, unit, n_units, chose_a, shown_a, weight, n_pairs, n_judges, gold, iterations):
    """position_ds.fit's EM (decorrelate=False, nothing fixed) written with a select over every judgment
    (np.where per judgment, fresh arrays): what its gathers from the pairs' tables must equal bit for bit."""
    from scipy.special import expit

    v = np.where(chose_a, 1.0, -1.0)
    known = shown_a >= 0
    first = known & (chose_a == (shown_a == 1))
    n_af = np.bincount(unit, weights=known & (shown_a == 1), minlength=n_units)
    n_bf = np.bincount(unit, weights=known & (shown_a == 0), minlength=n_units)
    single = known & ((n_af > 0) != (n_bf > 0))[unit]
    engaged = position_ds.engaged_share(unit=unit, n_units=n_units, judge=judge, n_judges=n_judges, chose_a=chose_a,
                                        shown_a=shown_a)
    codes = position_ds._evidence_codes(judge, first, single)
    clamp, g0 = gold >= 0, (gold == 0).astype(float)
    mw = position_ds._mstep_weights(judge, clamp[pair], n_judges)
    wf = weight * engaged[judge]
    q = expit(np.bincount(pair, weights=weight * v, minlength=n_pairs))
    alpha = np.full(n_judges, position_ds.PRIOR_RIGHT / (position_ds.PRIOR_RIGHT + position_ds.PRIOR_WRONG))
    beta = alpha
    pr, pw = position_ds.PRIOR_RIGHT, position_ds.PRIOR_WRONG
    for _ in range(iterations):
        qp = np.where(clamp, g0, q)[pair]
        pbf = np.where(shown_a == 1, qp, 1.0 - qp)
        half_right = 0.5 * np.where(chose_a, qp, 1.0 - qp)
        ompbf = 1.0 - pbf
        na = np.bincount(judge, weights=mw * np.where(known, pbf, 0.5), minlength=n_judges)
        ka = np.bincount(judge, weights=mw * np.where(~known, half_right, pbf * first), minlength=n_judges)
        nb = np.bincount(judge, weights=mw * np.where(known, ompbf, 0.5), minlength=n_judges)
        kb = np.bincount(judge, weights=mw * np.where(~known, half_right, ompbf * (known & ~first)), minlength=n_judges)
        alpha = np.clip((pr + ka) / (pr + pw + na), *position_ds.CLIP)
        beta = np.clip((pr + kb) / (pr + pw + nb), *position_ds.CLIP)
        t = v * position_ds._evidence_table(alpha, beta)[codes]
        q = expit(np.bincount(pair, weights=wf * t, minlength=n_pairs))
    return alpha, beta, q


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_ems_gathers_equal_the_selects_over_every_judgment_bit_for_bit(seed: int) -> None:
    """Both EMs read each judgment's share of its pair's posterior by a gather from a (pairs, 2) table
    (not a select by a mask): the same values as the per-judgment selects, every bit, with unknown
    display orders, gold pairs (clamped; judges measured on gold only) and judges with few verdicts."""
    from scipy.special import expit

    from pipeline.aggregate import dawid_skene

    rng = np.random.default_rng(seed)
    n_pairs, n_judges = 700, 25
    units = [(p, j) for p in range(n_pairs) for j in range(n_judges) if rng.random() < 0.15]
    rows = [(p, j, u) for u, (p, j) in enumerate(units) for _ in range(rng.integers(1, 3))]
    pair, judge, unit = (np.array(x, np.int64) for x in zip(*rows, strict=True))
    n = len(pair)
    chose_a = rng.random(n) < 0.6
    shown_a = rng.choice(np.array([-1, 0, 1], np.int8), n, p=[0.2, 0.4, 0.4])
    weight = 1.0 / np.bincount(unit)[unit]
    gold = np.where(rng.random(n_pairs) < 0.3, rng.integers(0, 2, n_pairs), -1)
    m = position_ds.fit(pair=pair, judge=judge, unit=unit, n_units=len(units), chose_a=chose_a, shown_a=shown_a,
                        weight=weight, n_pairs=n_pairs, n_judges=n_judges, gold=gold, iterations=6, tol=0.0,
                        decorrelate=False)
    alpha, beta, _ = _em_by_selects(pair, judge, unit, len(units), chose_a, shown_a, weight, n_pairs, n_judges, gold, 6)
    assert m.iterations == 6 and np.array_equal(m.alpha, alpha) and np.array_equal(m.beta, beta)
    assert len(np.unique(m.alpha)) > 10  # (not every judge at a clip or at the prior)
    # the one-coin EM: accuracies from [1 - q, q] by vote, its E-step's weights as weight * vote * llr
    vote = np.where(chose_a, 1.0, -1.0)
    got = dawid_skene(pair, judge, vote, weight, n_pairs=n_pairs, n_annotators=n_judges, iterations=6)
    s, t = np.bincount(pair, weights=weight * vote, minlength=n_pairs), np.bincount(pair, weights=weight, minlength=n_pairs)
    q = np.where(t > 0, 0.5 + 0.5 * s / np.maximum(t, 1e-9), 0.5)
    n_j = np.bincount(judge, minlength=n_judges).astype(float)
    from pipeline.aggregate import _ACC_CLIP, _PRIOR_A, _PRIOR_B

    acc = None
    for _ in range(6):
        qp = q[pair]
        new = np.clip((_PRIOR_A + np.bincount(judge, weights=np.where(vote > 0, qp, 1.0 - qp), minlength=n_judges))
                      / (_PRIOR_A + _PRIOR_B + n_j), *_ACC_CLIP)
        q = expit(np.bincount(pair, weights=weight * vote * np.log(new / (1.0 - new))[judge], minlength=n_pairs))
        if acc is not None and np.max(np.abs(new - acc)) < 1e-6:
            acc = new
            break
        acc = new
    assert np.array_equal(got, acc) and len(np.unique(got)) > 10
