"""Seeded planted-defect generator with known truth (canonical raw dicts -> ingest).

A batch has pairs with a hidden true preference and annotators whose behaviour is
known, so the checks can be scored: every planted defect should be found with the
exact reason code, clean subjects should not be flagged.

Truth model
-----------
* **Pairs** (``n_pairs`` regular ones): a prompt, two responses whose lengths differ by a
  log-normal ratio (about 15 % of pairs are within 10 % of each other), a hidden better
  side; the better one is the longer one with probability ``longer_better``.  Locales
  ``en`` / ``ja-JP`` (Japanese text) / ``zh`` (Chinese text) are balanced (the truth is
  ``a`` half of the time); the planted slice ``locale=de-DE`` has the truth ``a`` with
  probability ``imbalance_share`` -> ``label_imbalance``.
* Each regular pair gets 3 judgments by distinct **honest humans** (accuracy
  U(0.8, 0.9), 2 % ties).  Each judgment shows a random side first, and 30 % of the
  judgments name the responses the other way round (response_a <-> response_b, label
  and shown_first swapped accordingly) -- except the first judgment of each pair, so the
  canonical orientation is the generator's.  Pair ids are derived (none given).
* **Gold**: the first ``n_gold`` regular pairs carry ``gold_label`` = the truth.
* **Planted pair defects**: ``low_agreement`` pairs judged by 4 honest humans split
  2-2 (a/b) or by 3 split a/b/tie; ``too_easy`` pairs all correct with strength >= 0.92.
* **Planted annotators** (each adds a 4th judgment to ``per_defect`` random regular pairs):
  ``pos-first-*`` / ``pos-second-*`` pick the first/second-shown response with
  probability U(0.55, 0.8), else behave honestly; ``len-*`` pick the longer response with
  probability U(0.55, 0.8), else honest; ``rand-*`` answer a/b uniformly at random (two
  of them also judge every gold pair); ``few-*`` have 3-12 judgments of always-first or
  random answers (must be ``insufficient_data``, never flagged).
* **AI judges** judge in both display orders: ``ai-good`` (accuracy 0.9, order
  independent) and ``ai-posbias`` (picks the first-shown response with probability 0.6);
  each judges ``ai_shared`` pairs also judged by humans and the ``ai_only`` AI-only pairs.

``truth`` maps each defect class to the subject ids that carry it; ``clean_annotators`` /
``clean_pairs`` / ``clean_slices`` are the subjects without any planted defect (clean
pairs are judged by honest humans only).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from pipeline.ingest import judgments_from_records
from schemas.text import content_hash, derive_pair_id

LOCALES = (("en", 0.45), ("ja-JP", 0.2), ("zh", 0.2), ("de-DE", 0.15))
_WORDS = {
    "en": "the answer explains each step clearly and gives a short example before the summary".split(),
    "ja-JP": list("注文履歴からキャンセルできます。手順を説明します。まず設定を開いてください。"),
    "zh": list("我们可以通过订单历史取消订单。下面说明具体步骤，首先打开设置页面。"),
    "de-DE": "die Antwort erklärt jeden Schritt klar und gibt ein kurzes Beispiel vor der Zusammenfassung".split(),
}


@dataclass
class _Pair:
    key: str
    prompt: str
    a: str
    b: str
    truth: str  # "a" or "b"
    locale: str
    tags: list[str]
    gold: bool = False
    kind: str = "regular"  # regular | low_agreement | easy | ai_only

    @property
    def longer(self) -> str:
        return "a" if len(self.a) > len(self.b) else "b"

    @property
    def pair_id(self) -> str:
        return derive_pair_id(content_hash(self.prompt), content_hash(self.a), content_hash(self.b))


@dataclass
class Planted:
    records: list[dict[str, Any]]
    truth: dict[str, set[str]]
    clean_annotators: set[str]
    clean_pairs: set[str]
    clean_slices: set[str]
    insufficient: set[str]
    annotator_kinds: dict[str, str] = field(default_factory=dict)
    pair_truth: dict[str, str] = field(default_factory=dict)  # pair_id -> better side (canonical a/b)

    def judgments(self) -> pl.DataFrame:
        return judgments_from_records(self.records)


def _text(rng: random.Random, locale: str, n_chars: int, tag: str) -> str:
    words = _WORDS[locale]
    sep = "" if locale in ("ja-JP", "zh") else " "
    out = [tag]
    size = len(tag)
    while size < n_chars:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + len(sep)
    return sep.join(out)


def _flip(x: str | None) -> str | None:
    return {"a": "b", "b": "a"}.get(x, x) if x is not None else None


def make_planted(
    seed: int,
    *,
    n_pairs: int = 900,
    n_honest: int = 30,
    per_defect: int = 120,
    n_gold: int = 80,
    n_low_agreement: int = 40,
    n_easy: int = 30,
    ai_shared: int = 150,
    ai_only: int = 80,
    longer_better: float = 0.6,
    imbalance_share: float = 0.88,
) -> Planted:
    rng = random.Random(seed)
    pairs: list[_Pair] = []

    def new_pair(kind: str, locale: str | None = None) -> _Pair:
        i = len(pairs)
        if locale is None:
            locale = rng.choices([x for x, _ in LOCALES], weights=[w for _, w in LOCALES])[0]
        base = rng.randint(60, 500)
        ratio = 2 ** rng.gauss(0.0, 0.7)
        la, lb = base, max(20, int(base * ratio))
        ta = _text(rng, locale, la, f"s{seed}p{i}a")
        tb = _text(rng, locale, lb, f"s{seed}p{i}b")
        longer = "a" if len(ta) > len(tb) else "b"
        share_a = imbalance_share if locale == "de-DE" else 0.5
        truth = "a" if rng.random() < share_a else "b"
        if locale != "de-DE" and kind == "regular":  # the longer one is better with prob longer_better
            truth = longer if rng.random() < longer_better else _flip(longer)  # type: ignore[assignment]
            if rng.random() < 0.5:  # keep a/b balanced: swap the texts, the truth follows
                ta, tb = tb, ta
                truth = _flip(truth)  # type: ignore[assignment]
        p = _Pair(f"{seed}-{i}", _text(rng, locale, rng.randint(20, 80), f"q{seed}-{i}"), ta, tb, truth, locale,
                  [rng.choice(["support", "code", "safety"])], kind=kind)
        pairs.append(p)
        return p

    regular = [new_pair("regular") for _ in range(n_pairs)]
    for p in regular[:n_gold]:
        p.gold = True
    low = [new_pair("low_agreement", rng.choice(["en", "ja-JP", "zh"])) for _ in range(n_low_agreement)]
    easy = [new_pair("easy", rng.choice(["en", "ja-JP", "zh"])) for _ in range(n_easy)]
    ai_pairs = [new_pair("ai_only", rng.choice(["en", "ja-JP", "zh"])) for _ in range(ai_only)]

    honest = {f"h{k:02d}": rng.uniform(0.8, 0.9) for k in range(n_honest)}
    judg: list[dict[str, Any]] = []  # canonical-orientation judgments, rendered later

    def add(p: _Pair, ann: str, kind: str, label: str, first: str, strength: float) -> None:
        judg.append({"pair": p, "ann": ann, "kind": kind, "label": label, "first": first, "strength": strength})

    def honest_label(p: _Pair, acc: float) -> tuple[str, float]:
        if rng.random() < 0.02:
            return "tie", rng.uniform(0.1, 0.4)
        if rng.random() < acc:
            return p.truth, rng.uniform(0.35, 0.85)
        return _flip(p.truth), rng.uniform(0.2, 0.5)  # type: ignore[return-value]

    honest_ids = list(honest)
    for p in regular:
        for ann in rng.sample(honest_ids, 3):
            lab, st = honest_label(p, honest[ann])
            add(p, ann, "human", lab, rng.choice("ab"), st)
    for p in easy:
        for ann in rng.sample(honest_ids, 3):
            add(p, ann, "human", p.truth, rng.choice("ab"), rng.uniform(0.92, 1.0))
    for i, p in enumerate(low):
        if i % 2 == 0:
            labels = [p.truth, p.truth, _flip(p.truth), _flip(p.truth)]
        else:
            labels = [p.truth, _flip(p.truth), "tie"]
        for ann, lab in zip(rng.sample(honest_ids, len(labels)), labels, strict=True):
            add(p, ann, "human", lab, rng.choice("ab"), rng.uniform(0.2, 0.6))  # type: ignore[arg-type]

    truth: dict[str, set[str]] = {k: set() for k in
                                  ("position_bias", "length_bias", "low_reliability", "low_agreement", "label_imbalance", "too_easy")}
    defect_pairs: set[str] = set()

    def defect(ann: str, behave, targets: list[_Pair]) -> None:  # noqa: ANN001
        for p in targets:
            first = rng.choice("ab")
            lab, st = behave(p, first)
            add(p, ann, "human", lab, first, st)
            defect_pairs.add(p.key)

    def biased(kind: str, b: float):  # noqa: ANN202
        def f(p: _Pair, first: str) -> tuple[str, float]:
            if rng.random() < b:
                side = {"first": first, "second": _flip(first), "longer": p.longer}[kind]
                return side, rng.uniform(0.4, 0.9)  # type: ignore[return-value]
            return honest_label(p, 0.85)
        return f

    def random_label(p: _Pair, first: str) -> tuple[str, float]:  # noqa: ARG001
        return rng.choice("ab"), rng.uniform(0.2, 0.9)

    for k, kind in enumerate(["first", "first", "second", "second"]):
        ann = f"pos-{kind}-{k}"
        defect(ann, biased(kind, rng.uniform(0.55, 0.8)), rng.sample(regular, per_defect))
        truth["position_bias"].add(ann)
    for k in range(3):
        ann = f"len-{k}"
        defect(ann, biased("longer", rng.uniform(0.55, 0.8)), rng.sample(regular, per_defect))
        truth["length_bias"].add(ann)
    for k in range(3):
        ann = f"rand-{k}"
        targets = regular[:n_gold] + rng.sample(regular[n_gold:], max(per_defect - n_gold, 0)) if k < 2 else rng.sample(regular, per_defect)
        defect(ann, random_label, targets)
        truth["low_reliability"].add(ann)
    insufficient = set()
    for k in range(4):
        ann = f"few-{k}"
        defect(ann, biased("first", 1.0) if k % 2 == 0 else random_label, rng.sample(regular, rng.randint(3, 12)))
        insufficient.add(ann)

    # AI judges: both display orders
    shared = rng.sample(regular, ai_shared)
    for ann, kind in (("ai-good", "good"), ("ai-posbias", "posbias")):
        for p in shared + ai_pairs:
            if kind == "good":
                lab, st = (p.truth, rng.uniform(0.5, 0.9)) if rng.random() < 0.9 else (_flip(p.truth), rng.uniform(0.3, 0.6))
                labels = [(lab, "a"), (lab, "b")]
            else:
                labels = []
                for first in "ab":
                    if rng.random() < 0.6:
                        labels.append((first, first))
                    else:
                        labels.append((p.truth if rng.random() < 0.9 else _flip(p.truth), first))
                st = rng.uniform(0.4, 0.9)
            for lab, first in labels:
                add(p, ann, "ai", lab, first, st)  # type: ignore[arg-type]
            if kind == "posbias":
                defect_pairs.add(p.key)
    truth["position_bias"].add("ai-posbias")

    # render: shuffle, swap presentation of 30 % (never the first judgment of a pair)
    rng.shuffle(judg)
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    for n, j in enumerate(judg):
        p: _Pair = j["pair"]
        swap = p.key in seen and rng.random() < 0.3
        seen.add(p.key)
        ra, rb = (p.b, p.a) if swap else (p.a, p.b)
        tr = _flip if swap else (lambda x: x)
        rec: dict[str, Any] = {
            "comparison_id": f"s{seed}-c{n:06d}", "prompt": p.prompt, "response_a": ra, "response_b": rb,
            "label": tr(j["label"]), "shown_first": tr(j["first"]), "strength": round(j["strength"], 3),
            "annotator_id": j["ann"], "annotator_kind": j["kind"], "locale": p.locale, "tags": p.tags,
        }
        if p.gold:
            rec["gold_label"] = tr(p.truth)
        records.append(rec)

    truth["low_agreement"] = {p.pair_id for p in low}
    truth["too_easy"] = {p.pair_id for p in easy}
    truth["label_imbalance"] = {"locale=de-DE"}
    clean_pairs = {p.pair_id for p in regular if p.key not in defect_pairs}
    kinds = {a: "human" for a in honest_ids} | {"ai-good": "ai", "ai-posbias": "ai"}
    return Planted(
        records=records,
        truth=truth,
        clean_annotators=set(honest_ids) | {"ai-good"},
        clean_pairs=clean_pairs,
        clean_slices={"locale=en", "locale=ja-JP", "locale=zh", "annotator_kind=human", "annotator_kind=ai"},
        insufficient=insufficient,
        annotator_kinds=kinds,
        pair_truth={p.pair_id: p.truth for p in pairs},
    )


# ---------------------------------------------------------------- judge panels (consensus benchmark)
@dataclass
class Panel:
    """A judge panel with known answers: ``records`` (canonical raw dicts), ``truth``
    (pair_id -> better side in canonical a/b), ``gold`` (pair ids whose judgments carry
    ``gold_label``), ``judges`` (annotator_id -> role) and ``first_rate`` (annotator_id ->
    the judge's expected first-shown rate)."""

    records: list[dict[str, Any]]
    truth: dict[str, str]
    gold: set[str]
    judges: dict[str, str]
    first_rate: dict[str, float]

    def judgments(self) -> pl.DataFrame:
        return judgments_from_records(self.records)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


def _solve_offset(target: float, us: list[float]) -> float:
    """Position offset beta with mean_u (sigmoid(u + beta) + sigmoid(-u + beta)) / 2 = target (bisection)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        rate = sum(_sig(u + mid) + _sig(-u + mid) for u in us) / (2 * len(us))
        lo, hi = (mid, hi) if rate < target else (lo, mid)
    return (lo + hi) / 2


def make_judge_panel(
    seed: int,
    *,
    n_pairs: int = 400,
    n_good: int = 3,
    n_biased: int = 10,
    n_inconsistent: int = 3,
    n_weak: int = 2,
    bias_range: tuple[float, float] = (0.6, 0.95),
    clarity: tuple[float, float] = (1.0, 1.0),
    appeal: float = 1.0,
    family_size: int = 1,
    taste: float = 0.0,
    both_orders: float = 1.0,
    coverage: float = 1.0,
    judges_per_pair: int | None = None,
    gold_share: float = 0.0,
    tie_rate: float = 0.02,
    swap_share: float = 0.3,
    kind: str = "ai",
) -> Panel:
    """A judge panel with position-biased and order-inconsistent judges and known answers.

    The generator is a latent-preference (Thurstone / Bradley-Terry) judge, *not* the
    consensus model: judge j's view of pair i is ``u = s_j c_i + l_j a_i + e_ij`` (its
    preference for the better response; shared by both display orders), where ``c_i ~
    |N(clarity)|`` is how clear the pair is, ``a_i ~ N(0, appeal)`` a surface appeal of the
    better (> 0) or worse (< 0) response that every judge sees (length, style: errors
    correlated across judges), ``e_ij ~ N(0, 1)`` the judge's own view.  In each display order
    the judge picks the first-shown response with probability ``sigmoid(+-u + beta_j +
    z_ij)`` (+ when the better one is shown first); beta_j is a position bias, z_ij a
    per-pair position preference.  A preference weaker than the position bias flips with
    the display order; a strong one gives the same verdict in both orders, right or wrong.

    * **good** (``n_good``): skill 1.5-2.5, appeal weight 0-0.3, first-shown rate 0.5-0.6;
    * **biased** (``n_biased``): skill 0.3-1.2, appeal weight 0.5-1.5, beta set so that the
      first-shown rate is U(``bias_range``), towards the first or the second position at random;
    * **inconsistent** (``n_inconsistent``): skill 0.3-1.0, appeal weight 0.5-1, no overall
      bias but z_ij ~ N(0, 3): per pair, a strong preference for one position (first-shown
      rate ~0.5, verdicts flip with the order on most pairs);
    * **weak** (``n_weak``): skill 0-0.3, appeal weight 1, first-shown rate 0.5-0.7.

    **Families**: the judges other than the good ones form groups of ``family_size`` (one
    model family, one prompt template) that share a per-pair taste ``f ~ N(0, taste)``
    added to u: verdicts that agree within the family, whatever the truth.

    Each judge judges a share ``coverage`` of the pairs (or ``judges_per_pair`` judges per
    pair), in both orders with probability ``both_orders`` (else one random order);
    ``tie_rate`` of the verdicts are ``tie``; ``gold_share`` of the pairs carry
    ``gold_label``; ``swap_share`` of the judgments (never a pair's first) name the
    responses the other way round.  ``kind="human"`` labels every judge human.
    """
    rng = random.Random(seed)
    pairs = []
    for i in range(n_pairs):
        prompt = f"panel {seed} question {i}"
        ra, rb = f"answer one to {i} (seed {seed})", f"answer two to {i}, worded otherwise (seed {seed})"
        pairs.append({"prompt": prompt, "a": ra, "b": rb, "truth": rng.choice("ab"), "c": abs(rng.gauss(*clarity)),
                      "appeal": rng.gauss(0.0, appeal), "gold": rng.random() < gold_share})
    roles = ["good"] * n_good + ["biased"] * n_biased + ["inconsistent"] * n_inconsistent + ["weak"] * n_weak
    judges: dict[str, str] = {}
    par: dict[str, tuple[float, float, float, float]] = {}  # skill, appeal weight, beta, z sd
    first_rate: dict[str, float] = {}
    count: dict[str, int] = {}
    for role in roles:
        a = f"{role}-{count.setdefault(role, 0)}"
        count[role] += 1
        judges[a] = role
        skill, lam, target, zsd = {
            "good": (rng.uniform(1.5, 2.5), rng.uniform(0.0, 0.3), rng.uniform(0.5, 0.6), 0.0),
            "biased": (rng.uniform(0.3, 1.2), rng.uniform(0.5, 1.5), rng.uniform(*bias_range), 0.0),
            "inconsistent": (rng.uniform(0.3, 1.0), rng.uniform(0.5, 1.0), 0.5, 3.0),
            "weak": (rng.uniform(0.0, 0.3), 1.0, rng.uniform(0.5, 0.7), 0.0),
        }[role]
        if rng.random() < 0.5:
            target = 1.0 - target
        us = [skill * p["c"] + lam * p["appeal"] + rng.gauss(0.0, 1.0) for p in pairs[:200]]
        beta = 0.0 if zsd else _solve_offset(target, us)
        par[a] = (skill, lam, beta, zsd)
        first_rate[a] = target
    names = list(judges)
    family = {a: f"fam{k // max(family_size, 1)}" for k, a in enumerate(x for x in names if judges[x] != "good")}
    out: list[dict[str, Any]] = []
    truth: dict[str, str] = {}
    gold: set[str] = set()
    for i, p in enumerate(pairs):
        fam_taste = {f: rng.gauss(0.0, taste) if taste else 0.0 for f in sorted(set(family.values()))}
        pid = derive_pair_id(content_hash(p["prompt"]), content_hash(p["a"]), content_hash(p["b"]))
        truth[pid] = p["truth"]
        if p["gold"]:
            gold.add(pid)
        panel = rng.sample(names, judges_per_pair) if judges_per_pair else [a for a in names if rng.random() < coverage]
        rows = []
        for a in panel:
            skill, lam, beta, zsd = par[a]
            u = skill * p["c"] + lam * p["appeal"] + rng.gauss(0.0, 1.0) + (fam_taste[family[a]] if a in family else 0.0)
            z = rng.gauss(0.0, zsd) if zsd else 0.0
            for first in (["a", "b"] if rng.random() < both_orders else [rng.choice("ab")]):
                if rng.random() < tie_rate:
                    rows.append((a, "tie", first))
                    continue
                better_first = first == p["truth"]
                pick_first = rng.random() < _sig((u if better_first else -u) + beta + z)
                rows.append((a, first if pick_first else _flip(first), first))
        rng.shuffle(rows)
        for n, (a, lab, first) in enumerate(rows):
            swap = n > 0 and rng.random() < swap_share
            tr = _flip if swap else (lambda x: x)
            rec: dict[str, Any] = {
                "comparison_id": f"panel{seed}-{i}-{n}", "prompt": p["prompt"],
                "response_a": p["b"] if swap else p["a"], "response_b": p["a"] if swap else p["b"],
                "label": tr(lab), "shown_first": tr(first), "annotator_id": a, "annotator_kind": kind,
            }
            if p["gold"]:
                rec["gold_label"] = tr(p["truth"])
            out.append(rec)
    return Panel(out, truth, gold, judges, first_rate)


def verdict_records(verdicts: list[tuple[str, str, str, str]], *, kind: str = "ai",
                    gold: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Raw judgments from (pair key, judge, shown_first, label) rows: pair ``k`` has prompt
    ``"question k"`` and responses ``"answer A to k"`` / ``"answer B to k"``; ``gold``: pair key
    -> gold label.  For hand-planted panels with exact expectations."""
    out = []
    for n, (key, judge, first, label) in enumerate(verdicts):
        r: dict[str, Any] = {"comparison_id": f"v{n}", "prompt": f"question {key}", "response_a": f"answer A to {key}",
                             "response_b": f"answer B to {key}", "label": label, "shown_first": first,
                             "annotator_id": judge, "annotator_kind": kind}
        if gold and key in gold:
            r["gold_label"] = gold[key]
        out.append(r)
    return out


def both_orders(key: str, judge: str, behaviour: str, truth: str) -> list[tuple[str, str, str, str]]:
    """One judge's verdicts on one pair in both display orders: ``right`` / ``wrong`` (the
    same verdict twice), ``first`` / ``second`` (the position, so the verdict flips)."""
    rows = []
    for first in "ab":
        lab = {"right": truth, "wrong": _flip(truth), "first": first, "second": _flip(first)}[behaviour]
        rows.append((key, judge, first, lab))
    return rows
