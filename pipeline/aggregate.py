"""Aggregation: judgments -> one row per pair (``PairRecord``) + per-annotator accuracies.

Method
------
1. **Encoding** (:func:`encode`, shared with the checks).  Pairs, annotators and
   (pair, annotator) units become dense integer codes in first-seen order; labels become
   codes 0..4 (a, b, tie, both_bad, escalate).  Every statistic below is then a
   ``np.bincount`` (the EMs' per-iteration sums: compiled passes that sum in the same order,
   :mod:`pipeline.kernels`) -- no per-row Python, no string group-bys.
2. **Canonical orientation.**  Judgments of a derived ``pair_id`` may name the two
   responses in either a/b order.  The orientation of the pair's *first judgment in frame
   order* is canonical (for data given consistently that is the input's own orientation,
   and the pair's texts are that judgment's texts).  A judgment whose ``a_hash``/``b_hash``
   are that orientation swapped is *flipped*: its label, ``shown_first`` and
   ``gold_label`` have ``a`` and ``b`` exchanged.  All counts are in canonical orientation.
3. **One vote per annotator per pair.**  An annotator who judged a pair k times (an AI
   judge run in both display orders) gives each of those judgments weight 1/k, so
   repeating a judgment never outvotes a second opinion.  A re-delivered copy is no
   judgment at all where the caller says so (``rated``: the preliminary consensus, which
   sees the copies select drops; :meth:`Encoded.only`).
4. **Per-kind labels.**  ``label_human``: plurality of the human votes over the five labels;
   a tie of exactly ``a`` and ``b`` is broken by the Dawid-Skene estimate (below) from the
   same judgments; any other tie, or exactly balanced evidence, gives ``escalate``.
   ``label_ai``: the plurality of the AI votes says whether the judges gave a verdict (a or
   b leading, alone or tied) or tie / both_bad / escalate; the verdict's side is the sign
   of the **order-aware Dawid-Skene** evidence (:mod:`pipeline.position_ds`: a verdict that
   flips with the display order is no evidence, one-order verdicts are weighed by display
   position, judges by order consistency and gold), ``escalate`` when it is exactly 0.
   ``label_majority`` is the plain plurality of all raw judgments (null on a tie), for
   reference only.
5. **Dawid-Skene (one-coin)** on decisive (a/b) judgments, :func:`dawid_skene`: annotator
   j has accuracy r_j; ``logit P(a) = sum_i w_i v_i log(r_j / (1 - r_j))`` (v = +1 for a,
   -1 for b; flat class prior, because a/b are names, not positions).  r_j is
   re-estimated as the posterior-expected share of j's decisive judgments that are
   right, with a Beta(3.5, 1.5) prior (mean 0.7, weight of 5 judgments) so annotators
   with few judgments stay near a typical accuracy; clipped to [0.02, 0.98].  EM for
   ``ds_iterations`` rounds (stops early on convergence).  AI judgments enter the pair
   posterior with weight ``ai_weight`` (0 under ``ignore_ai``); every annotator's
   accuracy is estimated.
6. **Consensus** ``label_consensus`` per ``AggregationConfig.ai_mode`` -- an AI judge never
   silently outvotes a human:

   * ``human_first`` (default): ``label_human`` when any human judged the pair, else
     ``label_ai``.
   * ``separate``: the label both kinds agree on; when only one kind judged, that kind's
     label; when they disagree, ``escalate``.
   * ``vote``: plurality of human votes + ``ai_weight`` x AI votes (DS tie-break with
     the same weights).
   * ``ignore_ai``: ``label_human`` only; AI-only pairs get no consensus (null label and
     null agreement).

   "Judgments used" are those of the kinds the mode consults for the pair (human only,
   or AI only when no human judged it, under ``human_first``; both under
   ``separate``/``vote``; human under ``ignore_ai``).  ``agreement`` = share of the used
   judgments whose label equals the consensus; ``strength`` = mean strength of the used
   judgments agreeing with it; ``annotator_kind`` = human / ai / mixed from the used
   judgments (all judgments when none was used); ``p_a_weighted`` = the share of the
   accuracy-weighted evidence of the used judgments that points to a
   (:func:`evidence_share`; order-aware evidence for AI judgments), the consensus'
   confidence that ``select`` weighs DPO rows by and ``checks/consensus.py`` abstains on.  ``count_*`` and ``n_*`` count all judgments.  ``locale`` is the
   first non-null locale of the pair, ``tags`` the sorted union of its judgments' tags.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy.special import expit

from pipeline import position_ds
from schemas.arrow import empty_frame, polars_schema
from schemas.check import CheckResult
from schemas.policy import AggregationConfig, DimensionsConfig
from schemas.records import LABELS, AnnotatorStats, PairRecord

__all__ = ["PARAM_SCHEMA", "PAIR_TEXT_COLUMNS", "oriented_texts", "Aggregation", "Encoded", "aggregate", "encode", "dense_codes", "dawid_skene", "ds_accuracy", "loo_independence", "loo_reference", "plurality", "label_strings",
           "pair_locale", "pair_tags", "n_used_expr", "annotator_table", "order_aware", "pair_gold", "evidence_share"]

A, B, TIE, BOTH_BAD, ESCALATE = range(5)
NONE = -1  # "no label" code
_LABEL_ENUM = pl.Enum(list(LABELS))
_SIDE_ENUM = pl.Enum(["a", "b"])
_EPS = 1e-9
_PRIOR_A, _PRIOR_B = 3.5, 1.5  # Beta prior on annotator accuracy: mean 0.7, weight 5
_ACC_CLIP = (0.02, 0.98)


# ---------------------------------------------------------------- encoding
def dense_codes(s: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(codes in first-seen order, first row of each code) for a string column without nulls.

    A column Polars knows sorted (a frame in the canonical order) has its equal ids side by side, so the
    codes count the changes; any other is coded by a join with its first occurrences (exact: no hash
    decides equality).  At 156k judgments (a 10M build's partition) 20 ms -> 3 ms sorted, 17 ms -> 11 ms
    for the few annotator ids.
    """
    n = len(s)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    s = s.rechunk()
    if s.is_sorted() or s.is_sorted(descending=True):
        new = np.empty(n, bool)
        new[0] = True
        new[1:] = (s.slice(1) != s.slice(0, n - 1)).to_numpy()
        return np.cumsum(new, dtype=np.int64) - 1, np.flatnonzero(new).astype(np.int64)
    first = np.flatnonzero(s.is_first_distinct().to_numpy()).astype(np.int64)
    f = s.to_frame("k")
    firsts = f[first].with_columns(_c=pl.int_range(len(first), dtype=pl.Int64))
    return f.join(firsts, on="k", how="left", maintain_order="left")["_c"].to_numpy(), first


def unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)``, faster for keys nearly in order (units' keys sorted by
    pair, a pair's few judgments in any order): a stable sort finds their runs (10M: 0.95 -> 0.22 s)."""
    if not len(keys):
        return keys.copy(), np.zeros(0, np.int64)
    perm = np.argsort(keys, kind="stable")
    ordered = keys[perm]
    new = np.empty(len(keys), bool)
    new[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    inverse = np.empty(len(keys), np.int64)
    inverse[perm] = np.cumsum(new) - 1
    return ordered[new], inverse


def _codes(s: pl.Series, enum: pl.Enum) -> np.ndarray:
    return s.cast(enum).to_physical().cast(pl.Int8).fill_null(NONE).to_numpy()


@dataclass(frozen=True)
class Encoded:
    """Integer view of a judgments frame (row i of every (N,) array is judgment i)."""

    pair: np.ndarray  # (N,) pair code, first-seen order
    pair_first: np.ndarray  # (P,) row of each pair's first judgment (ascending)
    pair_ids: pl.Series  # (P,) pair_id per code
    ann: np.ndarray  # (N,) annotator code, first-seen order
    ann_ids: pl.Series  # (A,)
    ann_kind: pl.Series  # (A,) annotator_kind of the annotator's first judgment
    human: np.ndarray  # (N,) bool
    label: np.ndarray  # (N,) int8 canonical label code (0 a, 1 b, 2 tie, 3 both_bad, 4 escalate)
    raw_label: np.ndarray  # (N,) label code as written
    shown: np.ndarray  # (N,) int8 canonical shown_first (0 a, 1 b, -1 missing)
    raw_shown: np.ndarray  # (N,) shown_first as written
    gold: np.ndarray  # (N,) int8 gold_label code as written (-1 missing)
    flipped: np.ndarray  # (N,) bool: named the responses the other way round
    strength: np.ndarray  # (N,) float, NaN when missing
    unit: np.ndarray  # (N,) code of (pair, annotator)
    unit_pair: np.ndarray  # (U,)
    unit_ann: np.ndarray  # (U,)

    @property
    def n(self) -> int:
        return len(self.pair)

    @property
    def n_pairs(self) -> int:
        return len(self.pair_first)

    @property
    def n_annotators(self) -> int:
        return len(self.ann_ids)

    @property
    def n_units(self) -> int:
        return len(self.unit_pair)

    def first_mask(self) -> pl.Series:
        """Boolean mask of each pair's first (canonical) judgment; filtering by it gives one
        row per pair in pair-code order (much cheaper than a gather of text columns)."""
        m = np.zeros(self.n, bool)
        m[self.pair_first] = True
        return pl.Series(m)

    def per_pair(self, weights: np.ndarray | None = None, codes: np.ndarray | None = None, k: int = 5) -> np.ndarray:
        """(P, k) sums of ``weights`` by pair and ``codes`` (default: canonical label); rows
        with a negative code are skipped."""
        return _by(self.pair, self.n_pairs, self.label if codes is None else codes, weights, k)

    def per_ann(self, weights: np.ndarray | None = None, codes: np.ndarray | None = None, k: int = 5) -> np.ndarray:
        """(A, k) sums by annotator and code (default: canonical label)."""
        return _by(self.ann, self.n_annotators, self.label if codes is None else codes, weights, k)

    def per_unit(self, weights: np.ndarray | None = None, codes: np.ndarray | None = None, k: int = 5) -> np.ndarray:
        """(U, k) sums by (pair, annotator) unit and code (default: canonical label)."""
        return _by(self.unit, self.n_units, self.label if codes is None else codes, weights, k)

    def only(self, rows: np.ndarray | None) -> Encoded:
        """The judgments ``rows`` (bool (N,)) marks, with every code kept: ``rows`` must leave each
        (pair, annotator) unit a judgment -- true of :func:`pipeline.checks.agreement.ratings`, which
        leaves out only later copies of a judgment the same unit keeps.  Labels keep the canonical
        orientation of ``self`` (its pairs' first judgments, marked or not); ``pair_first`` is each
        pair's first marked row.  ``None`` or every row marked: ``self``."""
        if rows is None or rows.all():
            return self
        idx = np.flatnonzero(rows)
        pair, unit = self.pair[idx], self.unit[idx]
        if len(idx) and np.bincount(unit, minlength=self.n_units).min() == 0:
            raise ValueError("Encoded.only: the rows left out every judgment of a (pair, annotator) unit")
        if np.all(pair[1:] >= pair[:-1]):  # pairs in runs (the canonical layout): where each run starts
            first = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        else:  # each pair code's first marked row (by code; ascending unless a pair's first row was left out)
            first = np.unique(pair, return_index=True)[1]
        return Encoded(pair=pair, pair_first=first.astype(np.int64), pair_ids=self.pair_ids, ann=self.ann[idx],
                       ann_ids=self.ann_ids, ann_kind=self.ann_kind, human=self.human[idx], label=self.label[idx],
                       raw_label=self.raw_label[idx], shown=self.shown[idx], raw_shown=self.raw_shown[idx],
                       gold=self.gold[idx], flipped=self.flipped[idx], strength=self.strength[idx], unit=unit,
                       unit_pair=self.unit_pair, unit_ann=self.unit_ann)


def _by(group: np.ndarray, n_groups: int, codes: np.ndarray, weights: np.ndarray | None, k: int) -> np.ndarray:
    ok = codes >= 0
    w = None if weights is None else np.asarray(weights, float)[ok]
    out = np.bincount(group[ok] * k + codes[ok], weights=w, minlength=n_groups * k)
    return out.reshape(n_groups, k).astype(float)


_LAST: list[tuple[weakref.ref, int, tuple[str, ...], Encoded]] = []  # one-entry cache


def encode(judgments: pl.DataFrame) -> Encoded:
    """Encode a judgments frame (``schemas.records.Judgment`` columns; at least pair_id,
    a_hash, b_hash, label, annotator_id, annotator_kind).

    The last result is cached by frame identity (weak reference, plus height and column
    names), so aggregation and the checks run on the same frame encode it once.
    """
    if _LAST:
        ref, height, names, enc = _LAST[0]
        if ref() is judgments and height == judgments.height and names == tuple(judgments.columns):
            return enc
    enc = _encode(judgments)
    _LAST[:] = [(weakref.ref(judgments), judgments.height, tuple(judgments.columns), enc)]
    return enc


def _encode(judgments: pl.DataFrame) -> Encoded:
    cols = judgments.columns
    pair, pair_first = dense_codes(judgments["pair_id"])
    ann, ann_first = dense_codes(judgments["annotator_id"])
    a_hash = judgments["a_hash"].rechunk()
    canon_a = a_hash.gather(pair_first[pair]) if len(pair) else a_hash
    flipped = ((a_hash != canon_a) & (judgments["b_hash"] == canon_a)).fill_null(False).to_numpy()
    raw_label = _codes(judgments["label"], _LABEL_ENUM)
    raw_shown = _codes(judgments["shown_first"], _SIDE_ENUM) if "shown_first" in cols else np.full(len(pair), NONE, np.int8)
    gold = _codes(judgments["gold_label"], _LABEL_ENUM) if "gold_label" in cols else np.full(len(pair), NONE, np.int8)

    def canon(x: np.ndarray) -> np.ndarray:
        return np.where(flipped & (x >= 0) & (x <= 1), 1 - x, x).astype(np.int8)

    n_ann = len(ann_first)
    keys = pair.astype(np.int64) * max(n_ann, 1) + ann
    ukeys, unit = unique_inverse(keys)
    strength = judgments["strength"].cast(pl.Float64).fill_null(np.nan).to_numpy() if "strength" in cols \
        else np.full(len(pair), np.nan)
    return Encoded(
        pair=pair, pair_first=pair_first, pair_ids=judgments["pair_id"].rechunk().gather(pair_first),
        ann=ann, ann_ids=judgments["annotator_id"].rechunk().gather(ann_first),
        ann_kind=judgments["annotator_kind"].rechunk().gather(ann_first),
        human=(judgments["annotator_kind"] == "human").fill_null(False).to_numpy(),
        label=canon(raw_label), raw_label=raw_label, shown=canon(raw_shown), raw_shown=raw_shown,
        gold=gold, flipped=flipped, strength=strength, unit=unit.ravel(),
        unit_pair=ukeys // max(n_ann, 1), unit_ann=ukeys % max(n_ann, 1),
    )


# ---------------------------------------------------------------- plurality and Dawid-Skene
def plurality(votes: np.ndarray, p_a: np.ndarray | None = None, unresolved: int = NONE) -> np.ndarray:
    """Row-wise label code with the most votes in (n, 5) ``votes``.

    A tie of exactly ``a`` and ``b`` is broken by ``p_a`` (P(a), e.g. the DS estimate) when
    it is not 0.5 / NaN; any other tie gives ``unresolved``.  No votes -> ``NONE``.
    """
    mx = votes.max(axis=1) if votes.size else np.zeros(votes.shape[0])
    top = votes >= (mx - _EPS)[:, None]
    n_top = top.sum(axis=1)
    out = np.where(n_top == 1, top.argmax(axis=1), unresolved)
    if p_a is not None:
        ab = (n_top == 2) & top[:, A] & top[:, B]
        with np.errstate(invalid="ignore"):
            out = np.where(ab & (p_a > 0.5 + _EPS), A, np.where(ab & (p_a < 0.5 - _EPS), B, out))
    return np.where(mx <= _EPS, NONE, out).astype(np.int64)


def label_strings(codes: np.ndarray) -> pl.Series:
    """Label codes -> strings (``NONE`` -> null)."""
    return pl.Series(codes, dtype=pl.Int64).replace_strict(
        {i: x for i, x in enumerate(LABELS)}, default=None, return_dtype=pl.String
    )


def dawid_skene(
    pair_idx: np.ndarray,
    ann_idx: np.ndarray,
    vote: np.ndarray,
    weight: np.ndarray,
    *,
    n_pairs: int,
    n_annotators: int,
    iterations: int,
    fixed: np.ndarray | None = None,
) -> np.ndarray:
    """One-coin Dawid-Skene EM on decisive judgments; returns the accuracy per annotator.

    ``vote`` is +1 (a) / -1 (b); ``weight`` the judgment's weight in the pair posterior
    (the M-step counts every judgment once).  ``fixed`` (A,): an accuracy per annotator, NaN
    where it is free; the others keep theirs (no EM when none is free).
    """
    pinned = np.zeros(n_annotators, bool) if fixed is None else ~np.isnan(fixed)
    if pinned.all() and n_annotators:
        return np.asarray(fixed, float)
    vote = vote.astype(float)
    s = np.bincount(pair_idx, weights=weight * vote, minlength=n_pairs)
    t = np.bincount(pair_idx, weights=weight, minlength=n_pairs)
    q = np.where(t > 0, 0.5 + 0.5 * s / np.maximum(t, _EPS), 0.5)  # start: weighted vote share of a
    n_j = np.bincount(ann_idx, minlength=n_annotators).astype(float)
    acc = np.full(n_annotators, _PRIOR_A / (_PRIOR_A + _PRIOR_B))
    if fixed is not None:
        acc = np.where(pinned, fixed, acc)
    # P(the vote is right) summed per annotator, the pairs' evidence summed per pair: one compiled pass over the
    # judgments each, in judgment order (np.bincount's: the same bits, no temporary over every judgment)
    from pipeline import kernels

    for_a = vote > 0
    wv = weight * vote
    for _ in range(max(iterations, 1)):
        right = np.zeros(n_annotators)
        kernels.right_sums(q, pair_idx, for_a, ann_idx, right)
        new = (_PRIOR_A + right) / (_PRIOR_A + _PRIOR_B + n_j)
        new = np.clip(new, *_ACC_CLIP)
        if fixed is not None:
            new = np.where(pinned, fixed, new)
        ev = np.zeros(n_pairs)
        kernels.gathered_sums(np.log(new / (1.0 - new)), ann_idx, wv, pair_idx, ev)
        q = expit(ev)
        done = np.max(np.abs(new - acc), initial=0.0) < 1e-6
        acc = new
        if done:
            break
    return acc


def ds_accuracy(e: Encoded, cfg: AggregationConfig | None = None, fixed: np.ndarray | None = None) -> np.ndarray:
    """(A,) Dawid-Skene accuracy per annotator code, as used by :func:`aggregate`
    (``fixed``: :func:`dawid_skene`'s)."""
    cfg = cfg or AggregationConfig()
    dec = (e.label >= A) & (e.label <= B)
    w = (1.0 / np.bincount(e.unit)[e.unit])[dec]
    ai_w = 0.0 if cfg.ai_mode == "ignore_ai" else cfg.ai_weight
    return dawid_skene(e.pair[dec], e.ann[dec], np.where(e.label[dec] == A, 1.0, -1.0), w * np.where(e.human[dec], 1.0, ai_w),
                       n_pairs=e.n_pairs, n_annotators=e.n_annotators, iterations=cfg.ds_iterations, fixed=fixed)


def evidence_share(pair_idx: np.ndarray, evidence: np.ndarray, weight: np.ndarray, n_pairs: int) -> np.ndarray:
    """(P,) share of the weighted evidence that points to ``a``: sum w max(e, 0) / sum w |e|.

    ``evidence``: each judgment's log-odds for a (a vote for b by a worse-than-chance
    annotator points to a).  Same side as the posterior, but bounded by the split of the
    evidence: an evenly split panel gives 0.5 however many judged, a unanimous one 1 -- with
    equally reliable annotators it is the share of votes for a.  0.5 when the evidence is
    all zero, NaN for pairs without a judgment of positive weight."""
    pos = np.bincount(pair_idx, weights=weight * np.maximum(evidence, 0.0), minlength=n_pairs)
    tot = np.bincount(pair_idx, weights=weight * np.abs(evidence), minlength=n_pairs)
    has = np.bincount(pair_idx, weights=(weight > 0).astype(float), minlength=n_pairs) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(has, np.where(tot > _EPS, pos / tot, 0.5), np.nan)


def pair_gold(e: Encoded) -> np.ndarray:
    """(P,) canonical gold label code per pair: 0 a / 1 b from its judgments' ``gold_label``
    (the last one given wins), -1 when none is a or b."""
    g = np.full(e.n_pairs, NONE, np.int64)
    rows = np.flatnonzero((e.gold == A) | (e.gold == B))
    g[e.pair[rows]] = np.where(e.flipped[rows], 1 - e.gold[rows], e.gold[rows])
    return g


def order_aware(e: Encoded, cfg: AggregationConfig | None = None,
                fixed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, position_ds.OrderAwareDS]:
    """Order-aware Dawid-Skene (:mod:`pipeline.position_ds`) over the decisive judgments of
    the pairs an AI judge judged (AI and human judgments: humans anchor the AI judges on
    shared pairs; human-only pairs are decided by the human plurality and left out, which
    keeps the EM to the AI part of a batch), one vote per annotator per pair, anchored on
    gold labels.  Returns (mask (N,) of the judgments used, fitted model; its
    ``judgment_evidence`` is aligned with the masked rows)."""
    cfg = cfg or AggregationConfig()
    has_ai = np.bincount(e.pair, weights=~e.human, minlength=e.n_pairs) > 0
    dec = (e.label >= A) & (e.label <= B) & has_ai[e.pair]
    w = (1.0 / np.bincount(e.unit, minlength=e.n_units)[e.unit])[dec]
    shown = e.shown[dec]
    model = position_ds.fit(
        pair=e.pair[dec], judge=e.ann[dec], unit=e.unit[dec], n_units=e.n_units, chose_a=e.label[dec] == A,
        shown_a=np.where(shown < 0, -1, (shown == A).astype(np.int8)), weight=w, n_pairs=e.n_pairs,
        n_judges=e.n_annotators, gold=pair_gold(e), iterations=cfg.ds_iterations, fixed=fixed,
    )
    return dec, model


def decide_side(votes: np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """Label codes from (n, 5) ``votes`` where the evidence decides a vs b: when a or b leads
    the vote (alone, or a and b tied) the side is the sign of ``evidence`` (0 or NaN ->
    ``ESCALATE``); otherwise the plurality (tie / both_bad / escalate; other ties escalate)."""
    base = plurality(votes, None, ESCALATE)
    mx = votes.max(axis=1) if votes.size else np.zeros(votes.shape[0])
    top = votes >= (mx - _EPS)[:, None]
    ab_lead = (top[:, A] | top[:, B]) & ~top[:, TIE:].any(axis=1) & (mx > _EPS)
    with np.errstate(invalid="ignore"):
        side = np.where(evidence > _EPS, A, np.where(evidence < -_EPS, B, ESCALATE))
    return np.where(ab_lead, side, base).astype(np.int64)


LOO_MIN_POSTERIOR = 0.9


def loo_reference(e: Encoded, accuracy: np.ndarray | None = None, *, decorrelate: bool = False,
                  independence: np.ndarray | None = None) -> np.ndarray:
    """(U,) label code of the *other* annotators' consensus for each (pair, annotator) unit.

    One vote per annotator (all of the annotator's own judgments on the pair are left
    out).  With ``accuracy`` (per annotator code, e.g. :func:`ds_accuracy`) this is the
    Dawid-Skene weighted estimate from the others' a/b votes, used only when it is
    confident: P >= ``LOO_MIN_POSTERIOR`` (0.9; with typical accuracies that takes two
    agreeing colleagues, and a random colleague -- weight ~0 -- cannot sway it).  Without
    ``accuracy``: the others' plain plurality over all labels.  ``NONE`` when there is no
    (confident, unique) reference.  ``decorrelate`` (with ``accuracy``): each annotator's
    evidence is scaled by :func:`pipeline.position_ds.independence` (from the posterior of all
    annotators' weighted votes), so a group that errs together -- one family of AI judges --
    does not make the reference its own.  ``independence`` (per annotator code): those factors as
    given (a child's rule: the parent's, :mod:`pipeline.checks.reliability`) instead of fitted.
    With both given, a unit's reference depends on its pair's judgments only.
    """
    n_unit = np.bincount(e.unit, minlength=e.n_units).astype(float)
    own = e.per_unit() / np.maximum(n_unit, 1)[:, None]  # each unit's vote shares
    if accuracy is None:
        tot = np.column_stack([np.bincount(e.unit_pair, weights=own[:, k], minlength=e.n_pairs) for k in range(5)])
        return plurality(tot[e.unit_pair] - own, None, NONE)
    evidence = _loo_evidence(e, accuracy, own)
    if independence is not None:
        evidence = evidence * independence[e.unit_ann]
    elif decorrelate:
        evidence = evidence * loo_independence(e, accuracy)[e.unit_ann]
    others = np.bincount(e.unit_pair, weights=evidence, minlength=e.n_pairs)[e.unit_pair] - evidence
    t = float(np.log(LOO_MIN_POSTERIOR / (1 - LOO_MIN_POSTERIOR)))
    return np.where(others >= t - _EPS, A, np.where(others <= -t + _EPS, B, NONE))


def _loo_evidence(e: Encoded, accuracy: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
    """(U,) each unit's log-odds for ``a`` (one vote per annotator, its accuracy's weight)."""
    if own is None:
        own = e.per_unit() / np.maximum(np.bincount(e.unit, minlength=e.n_units).astype(float), 1)[:, None]
    r = np.clip(np.nan_to_num(accuracy, nan=0.5), *_ACC_CLIP)
    return np.log(r / (1 - r))[e.unit_ann] * (own[:, A] - own[:, B])


def loo_independence(e: Encoded, accuracy: np.ndarray) -> np.ndarray:
    """(A,) the independence factor of every annotator code that :func:`loo_reference` scales its
    evidence by (``decorrelate``): :func:`pipeline.position_ds.independence` under the posterior of
    all annotators' weighted votes."""
    evidence = _loo_evidence(e, accuracy)
    dec = (e.label >= A) & (e.label <= B)
    p_a = expit(np.bincount(e.unit_pair, weights=evidence, minlength=e.n_pairs))
    return position_ds.independence(pair=e.pair[dec], judge=e.ann[dec], unit=e.unit[dec], n_units=e.n_units,
                                    chose_a=e.label[dec] == A, n_pairs=e.n_pairs, n_judges=e.n_annotators, p_a=p_a)


# ---------------------------------------------------------------- aggregate
# columns of a pair's texts: the same for every judgment of the pair (up to a/b orientation)
PAIR_TEXT_COLUMNS = ("prompt", "prompt_text", "response_a", "response_b", "model_a", "model_b")
_SWAP = {"response_a": "response_b", "response_b": "response_a", "model_a": "model_b", "model_b": "model_a"}


# the annotator parameters of a consensus (state/annotator_params of a version; docs/incremental.md):
# Dawid-Skene accuracy (null: no decisive judgment), order-aware alpha / beta / engagement and the
# factor its verdicts weigh (engagement x independence; all four null: not in the order-aware fit)
PARAM_SCHEMA = {"annotator_id": pl.String, "ds_accuracy": pl.Float64, "oa_alpha": pl.Float64, "oa_beta": pl.Float64,
                "oa_engaged": pl.Float64, "oa_factor": pl.Float64}


def _given(e: Encoded, params: pl.DataFrame | None) -> tuple[np.ndarray | None, tuple[np.ndarray, ...] | None, np.ndarray]:
    """The given parameters by annotator code (NaN: free), and the given engagement."""
    if params is None:
        return None, None, np.full(e.n_annotators, np.nan)
    m = e.ann_ids.to_frame("annotator_id").join(params, on="annotator_id", how="left", maintain_order="left")

    def col(c: str) -> np.ndarray:
        return m[c].cast(pl.Float64).fill_null(np.nan).to_numpy()

    fa, fb, ff = col("oa_alpha"), col("oa_beta"), col("oa_factor")
    free = np.isnan(fa) | np.isnan(fb) | np.isnan(ff)
    fa, fb, ff = (np.where(free, np.nan, x) for x in (fa, fb, ff))
    return col("ds_accuracy"), (fa, fb, ff), np.where(free, np.nan, col("oa_engaged"))


@dataclass(frozen=True)
class Aggregation:
    """``pairs``: PairRecord columns, one row per pair (first-seen order).
    ``annotators``: annotator_id, annotator_kind, n_judgments, n_decisive, ds_accuracy.
    ``a_hash``: (P,) hash of each pair's canonical response ``a`` (the orientation of ``pairs``)."""

    pairs: pl.DataFrame
    annotators: pl.DataFrame
    a_hash: pl.Series | None = None
    params: pl.DataFrame | None = None  # :data:`PARAM_SCHEMA`: the annotator parameters used (fitted or given)
    dimensions: pl.DataFrame | None = None  # the per-dimension consensus rows (pipeline.dimensions.consensus), if any

    def texts(self) -> pl.DataFrame:
        """pair_id, a_hash and :data:`PAIR_TEXT_COLUMNS`: the ``texts`` argument of a later
        :func:`aggregate` over a subset of the same judgments."""
        assert self.a_hash is not None
        return self.pairs.select("pair_id", *PAIR_TEXT_COLUMNS).with_columns(a_hash=self.a_hash)


def aggregate(judgments: pl.DataFrame, cfg: AggregationConfig | None = None, *, encoded: Encoded | None = None,
              texts: pl.DataFrame | None = None, dimensions: DimensionsConfig | None = None,
              params: pl.DataFrame | None = None, fitted: bool = False,
              dim_params: pl.DataFrame | None = None, rated: np.ndarray | None = None) -> Aggregation:
    """Judgments frame (``schemas.records.Judgment`` columns) -> :class:`Aggregation`.
    ``encoded``: :func:`encode` of the same frame, to share the work with the checks.
    ``texts``: the pairs' texts (:meth:`Aggregation.texts` of an aggregation that covered
    every pair); the judgments may then lack :data:`PAIR_TEXT_COLUMNS`, which saves
    copying the large text columns when aggregating a filtered frame.  A pair whose
    canonical orientation here differs from the one in ``texts`` gets its responses and
    models swapped to match.  Judgments with per-dimension verdicts give the pairs their
    per-dimension consensus (:func:`pipeline.dimensions.consensus`); ``dimensions`` (the
    policy section) decides pairs whose dimensions conflict by its rule
    (:func:`pipeline.dimensions.apply_rule`).  ``params`` (:data:`PARAM_SCHEMA`): annotator
    parameters to use as they are (a child's rule, docs/incremental.md); only the annotators
    without them are fitted, with the given ones fixed; ``fitted``: ``params`` are a finished fit
    over a superset of these judgments (:func:`fit_annotators`); ``dim_params``: the same for the
    per-dimension consensus (:func:`pipeline.dimensions.consensus`).  ``rated`` (bool (N,)): the
    judgments that vote (:func:`pipeline.checks.agreement.ratings`: a re-delivered copy is no second
    vote -- the preliminary consensus, which sees the copies select drops); the others count nowhere
    (votes, fit, agreement, ``n_*``, ``count_*``, the per-dimension consensus and its fit) but keep
    the pair's texts, orientation, locale, tags and ``source_comparison_ids``.  Default: every judgment."""
    cfg = cfg or AggregationConfig()
    if judgments.height == 0:
        return Aggregation(empty_frame(PairRecord), _empty_annotators(), pl.Series("a_hash", [], pl.String),
                           pl.DataFrame(schema=PARAM_SCHEMA))
    full = encoded or encode(judgments)
    e = full.only(rated)  # the votes (``full``: every row of the frame, what is read of the frame)
    P, h = e.n_pairs, e.human
    w = 1.0 / np.bincount(e.unit)[e.unit]  # one vote per annotator per pair
    n_h = np.bincount(e.pair, weights=h, minlength=P)
    used = {"human_first": h | (n_h[e.pair] == 0), "separate": np.ones(e.n, bool), "vote": np.ones(e.n, bool),
            "ignore_ai": h}[cfg.ai_mode]

    dec = (e.label >= A) & (e.label <= B)
    p_idx, a_idx, hd, wd = e.pair[dec], e.ann[dec], h[dec], w[dec]
    vote = np.where(e.label[dec] == A, 1.0, -1.0)
    fit = fit_annotators(e, cfg, params, fitted=fitted)
    acc, used_oa, oa, fitted = fit.accuracy, fit.used_oa, fit.order_aware, fit.fitted
    ev_h = vote * np.log(acc / (1.0 - acc))[a_idx]  # one-coin evidence: humans, and the vote modes
    p_h = evidence_share(p_idx, ev_h, wd * hd, P)
    p_vote = evidence_share(p_idx, ev_h, wd * np.where(hd, 1.0, cfg.ai_weight), P)
    ai_oa = ~h[used_oa]  # AI: order-aware evidence
    wo = w[used_oa] * ai_oa
    p_ai = evidence_share(e.pair[used_oa], oa.judgment_evidence, wo, P)
    ev_ai = np.bincount(e.pair[used_oa], weights=wo * oa.judgment_evidence, minlength=P)

    counts = e.per_pair()
    hv, av = e.per_pair(w * h), e.per_pair(w * ~h)
    label_h = plurality(hv, p_h, ESCALATE)
    label_ai = decide_side(av, ev_ai)
    has_h = n_h > 0
    if cfg.ai_mode == "human_first":
        cons, p_w = np.where(has_h, label_h, label_ai), np.where(has_h, p_h, p_ai)
    elif cfg.ai_mode == "ignore_ai":
        cons, p_w = label_h, p_h
    elif cfg.ai_mode == "vote":
        cons, p_w = plurality(hv + cfg.ai_weight * av, p_vote, ESCALATE), p_vote
    else:  # separate
        cons = np.where(label_h == NONE, label_ai, np.where((label_ai == NONE) | (label_h == label_ai), label_h, ESCALATE))
        p_w = p_vote
    u = e.per_pair(used.astype(float))
    st = np.nan_to_num(e.strength)
    us, un = e.per_pair(used * st), e.per_pair(used * ~np.isnan(e.strength))
    rows = np.arange(P)
    ci = np.maximum(cons, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        agreement = np.where(cons >= 0, u[rows, ci] / u.sum(axis=1), np.nan)
        strength = np.where((cons >= 0) & (un[rows, ci] > 0), us[rows, ci] / un[rows, ci], np.nan)
    used_h = np.bincount(e.pair, weights=used & h, minlength=P) > 0
    used_ai = np.bincount(e.pair, weights=used & ~h, minlength=P) > 0
    any_h, any_ai = has_h, np.bincount(e.pair, weights=~h, minlength=P) > 0
    kind_h = np.where(used_h | used_ai, used_h, any_h)
    kind_ai = np.where(used_h | used_ai, used_ai, any_ai)
    pair_kind = np.where(kind_h & kind_ai, "mixed", np.where(kind_h, "human", "ai"))

    canon_a = judgments["a_hash"].rechunk().gather(full.pair_first)
    texts = _pair_texts(judgments, full, canon_a, texts)
    n_j = np.bincount(e.pair, minlength=P)
    pairs = pl.DataFrame({
        "pair_id": e.pair_ids,
        **texts.to_dict(),
        "locale": pair_locale(judgments, full),
        "tags": pair_tags(judgments, full),
        "n_judgments": n_j, "n_human": n_h.astype(np.int64), "n_ai": n_j - n_h.astype(np.int64),
        **{f"count_{x}": counts[:, i].astype(np.int64) for i, x in enumerate(LABELS)},
        "label_majority": label_strings(plurality(counts)),
        "label_human": label_strings(label_h), "label_ai": label_strings(label_ai),
        "label_consensus": label_strings(cons),
        # rounded: a sum of floats depends on the judgments' order, the DPO weight (select) must not
        "p_a_weighted": pl.Series(np.round(p_w, 9)).fill_nan(None),
        "agreement": pl.Series(agreement).fill_nan(None),
        "strength": pl.Series(strength).fill_nan(None),
        "annotator_kind": pair_kind,
        "source_comparison_ids": _pair_lists(judgments["comparison_id"], full),
    })
    from pipeline import dimensions as dims  # imports this module

    long = dims.consensus(judgments, cfg, encoded=full, params=dim_params, rated=rated) \
        if dims.has_dimensions(judgments) else None
    pairs = pairs.with_columns(dimensions=dims.pair_column(long, e.pair_ids))
    pairs = pairs.select([pl.col(k).cast(t) for k, t in polars_schema(PairRecord).items()])
    pairs = dims.apply_rule(pairs, long, dimensions)
    engaged = fit.engaged
    annotators = pl.DataFrame({
        "annotator_id": e.ann_ids, "annotator_kind": e.ann_kind,
        "n_judgments": np.bincount(e.ann, minlength=e.n_annotators).astype(np.int64),
        "n_decisive": np.bincount(e.ann, weights=dec, minlength=e.n_annotators).astype(np.int64),
        "ds_accuracy": acc,
        "accuracy_better_first": np.where(fitted, oa.alpha, np.nan), "accuracy_better_second": np.where(fitted, oa.beta, np.nan),
        "order_engagement": np.where(fitted, engaged, np.nan),
    }).with_columns(ds_accuracy=pl.when(pl.col("n_decisive") > 0).then(pl.col("ds_accuracy"))).fill_nan(None)
    return Aggregation(pairs, annotators, canon_a.alias("a_hash"), fit.params, long)


@dataclass(frozen=True)
class AnnotatorFit:
    """The annotator parameters of a consensus (:func:`fit_annotators`), by annotator code."""

    accuracy: np.ndarray  # (A,) one-coin Dawid-Skene accuracy
    used_oa: np.ndarray  # (N,) mask of the judgments in the order-aware fit
    order_aware: position_ds.OrderAwareDS
    fitted: np.ndarray  # (A,) in the order-aware fit
    engaged: np.ndarray  # (A,) order engagement (given, or fitted)
    params: pl.DataFrame  # PARAM_SCHEMA, one row per annotator code


def first_seen(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(code of each row in first-seen order of ``keys``, first row of each code, ascending)."""
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inv.ravel()], np.sort(first).astype(np.int64)


def canonical_encoding(e: Encoded) -> Encoded:
    """``e`` re-laid in the canonical order -- pairs by ``pair_id``, a pair's judgments in their
    order in ``e`` -- with codes in first-seen order of that layout: what :func:`encode` gives for
    the frame sorted that way (``ann_kind`` aside: the kind of an annotator's first judgment in
    ``e``).  A fit's float sums run in this order, so they do not depend on the order of the input
    or on how it was cut into partitions (:mod:`pipeline.partition_consensus`)."""
    pos = np.empty(e.n_pairs, np.int64)
    pos[e.pair_ids.arg_sort().to_numpy()] = np.arange(e.n_pairs)
    key = pos[e.pair]
    rows = np.argsort(key, kind="stable")
    pair = key[rows]
    ann, ann_first = first_seen(e.ann[rows])
    n_ann = len(ann_first)
    old = e.ann[rows][ann_first]
    ukeys, unit = np.unique(pair * max(n_ann, 1) + ann, return_inverse=True)
    n = np.bincount(pair, minlength=e.n_pairs)
    return Encoded(pair=pair, pair_first=(np.cumsum(n) - n).astype(np.int64), pair_ids=e.pair_ids.sort(),
                   ann=ann, ann_ids=e.ann_ids.gather(old), ann_kind=e.ann_kind.gather(old),
                   human=e.human[rows], label=e.label[rows], raw_label=e.raw_label[rows], shown=e.shown[rows],
                   raw_shown=e.raw_shown[rows], gold=e.gold[rows], flipped=e.flipped[rows], strength=e.strength[rows],
                   unit=unit.ravel(), unit_pair=ukeys // max(n_ann, 1), unit_ann=ukeys % max(n_ann, 1))


def fit_annotators(e: Encoded, cfg: AggregationConfig | None = None, params: pl.DataFrame | None = None, *,
                   fitted: bool = False) -> AnnotatorFit:
    """The annotator parameters :func:`aggregate` decides pairs with: fitted over every judgment of
    ``e`` (the global step of a consensus: with them given, each pair is decided from its own
    judgments), the ones in ``params`` kept as given.  The fit runs on
    :func:`canonical_encoding` of ``e``; the pairs of ``e`` are then weighed with its result: the
    same parameters whatever the order of the judgments (and bit for bit those of
    :mod:`pipeline.partition_consensus` over any partitioning).  ``fitted``: ``params`` are a
    finished fit over a superset of ``e`` (a partition's pairs decided with the global fit): no EM."""
    cfg = cfg or AggregationConfig()
    if not fitted:
        params = annotator_params(canonical_encoding(e), cfg, params)
    assert params is not None
    return _fit(e, cfg, _placeholders(params))


def annotator_params(e: Encoded, cfg: AggregationConfig | None = None, params: pl.DataFrame | None = None) -> pl.DataFrame:
    """The fitted parameters only (:data:`PARAM_SCHEMA`, one row per annotator code), of judgments
    already in their canonical layout (:func:`canonical_encoding`, or
    :func:`pipeline.partition_consensus.assemble`): what a driver broadcasts."""
    return _fit(e, cfg or AggregationConfig(), params).params


def _placeholders(params: pl.DataFrame) -> pl.DataFrame:
    """A finished fit with a value in every null: a null accuracy belongs to an annotator without a
    decisive judgment, null order-aware values to one outside the order-aware fit -- neither has a
    verdict they weigh -- so a fixed value changes no pair and spares an EM over the others (the
    outputs keep their nulls: they are masked by the same counts)."""
    return params.with_columns(pl.col("ds_accuracy", "oa_alpha", "oa_beta").fill_null(0.5),
                               pl.col("oa_engaged").fill_null(1.0), pl.col("oa_factor").fill_null(0.0))


def _fit(e: Encoded, cfg: AggregationConfig, params: pl.DataFrame | None) -> AnnotatorFit:
    fixed_ds, fixed_oa, given_engaged = _given(e, params)
    acc = ds_accuracy(e, cfg, fixed_ds)
    used_oa, oa = order_aware(e, cfg, fixed_oa)
    fitted = np.bincount(e.ann[used_oa], minlength=e.n_annotators) > 0
    engaged = np.where(np.isnan(given_engaged), oa.engaged, given_engaged)
    indep = oa.independence if oa.independence is not None else np.ones(e.n_annotators)
    factor = oa.engaged * indep if fixed_oa is None else np.where(np.isnan(fixed_oa[2]), oa.engaged * indep, fixed_oa[2])
    dec = (e.label >= A) & (e.label <= B)
    n_dec = np.bincount(e.ann, weights=dec, minlength=e.n_annotators)
    frame = pl.DataFrame({
        "annotator_id": e.ann_ids, "ds_accuracy": np.where(n_dec > 0, acc, np.nan),
        **{k: np.where(fitted, x, np.nan) for k, x in
           (("oa_alpha", oa.alpha), ("oa_beta", oa.beta), ("oa_engaged", engaged), ("oa_factor", factor))},
    }).fill_nan(None).cast(PARAM_SCHEMA)  # type: ignore[arg-type]
    return AnnotatorFit(acc, used_oa, oa, fitted, engaged, frame)


def _pair_texts(judgments: pl.DataFrame, e: Encoded, canon_a: pl.Series, texts: pl.DataFrame | None) -> pl.DataFrame:
    """(P rows) :data:`PAIR_TEXT_COLUMNS` in pair-code order and canonical orientation."""
    if texts is None:
        return judgments.select(*PAIR_TEXT_COLUMNS).filter(e.first_mask())
    return oriented_texts(e.pair_ids, canon_a, texts)


def oriented_texts(pair_ids: pl.Series, canon_a: pl.Series, texts: pl.DataFrame) -> pl.DataFrame:
    """:data:`PAIR_TEXT_COLUMNS` of ``pair_ids`` (in that order) from ``texts``
    (:meth:`Aggregation.texts`), responses and models swapped where the canonical ``a``
    (``canon_a``) is the other response."""
    keys = pl.DataFrame({"pair_id": pair_ids, "_canon_a": canon_a})
    t = keys.join(texts, on="pair_id", how="left", maintain_order="left")
    missing = t["a_hash"].null_count()
    if missing:
        raise ValueError(f"aggregate: texts lack {missing} of the pairs (first: {t.filter(pl.col('a_hash').is_null())['pair_id'][0]})")
    swap = pl.col("a_hash") != pl.col("_canon_a")
    return t.select([pl.when(swap).then(pl.col(_SWAP[c])).otherwise(pl.col(c)).alias(c) if c in _SWAP else pl.col(c)
                     for c in PAIR_TEXT_COLUMNS])


def pair_locale(judgments: pl.DataFrame, e: Encoded) -> pl.Series:
    """(P,) first non-null locale of each pair (usually the first judgment's)."""
    loc = judgments["locale"].rechunk()
    first = loc.filter(e.first_mask())
    if first.null_count() and loc.null_count() < len(loc):
        rows = np.flatnonzero(loc.is_not_null().to_numpy())
        pcodes, idx = np.unique(e.pair[rows], return_index=True)
        fill = np.full(e.n_pairs, -1)
        fill[pcodes] = rows[idx]
        alt = loc.gather(np.maximum(fill, 0)).to_frame("x").select(pl.when(pl.Series(fill >= 0)).then(pl.col("x"))).to_series()
        first = first.fill_null(alt)
    return first


def pair_tags(judgments: pl.DataFrame, e: Encoded) -> pl.Series:
    """(P,) sorted union of the tags of each pair's judgments.

    Usually every judgment of a pair carries the same tags and they need no work: only
    pairs whose judgments differ (or whose list has several tags) are exploded, deduped
    and sorted.  (Polars' ``list.sort`` is avoided: it is very slow on many short lists.)
    """
    tags = judgments["tags"].rechunk()
    first = tags.filter(e.first_mask())
    th = tags.hash().to_numpy()
    differ_rows = th != th[e.pair_first[e.pair]]
    differ = np.zeros(e.n_pairs, bool)
    differ[e.pair[differ_rows]] = True
    need = differ | (first.list.len().fill_null(0).to_numpy() >= 2)
    if not need.any():
        return first.fill_null(pl.lit([], dtype=pl.List(pl.String))).alias("tags")
    is_first = np.zeros(e.n, bool)
    is_first[e.pair_first] = True
    rows = need[e.pair] & (differ[e.pair] | is_first)
    fixed = (
        pl.DataFrame({"_p": e.pair[rows], "tags": tags.filter(pl.Series(rows))})
        .explode("tags").drop_nulls("tags").unique().sort("_p", "tags")
        .group_by("_p", maintain_order=True).agg("tags")
    )
    out = pl.DataFrame({"_p": np.arange(e.n_pairs), "tags": first}).join(fixed, on="_p", how="left", suffix="_u")
    out = out.with_columns(tags=pl.when(pl.Series(need)).then(pl.col("tags_u").fill_null(pl.lit([], dtype=pl.List(pl.String))))
                           .otherwise(pl.col("tags")))
    return out["tags"].fill_null(pl.lit([], dtype=pl.List(pl.String))).alias("tags")


def _pair_lists(values: pl.Series, e: Encoded) -> pl.Series:
    """Per pair, the list of ``values`` of its judgments in frame order."""
    order = np.argsort(e.pair, kind="stable")
    df = pl.DataFrame({"_p": pl.Series(e.pair[order]).set_sorted(), "v": values.rechunk().gather(order)})
    return df.group_by("_p", maintain_order=True).agg("v")["v"]


def n_used_expr() -> pl.Expr:
    """Number of judgments a pair's consensus used, from PairRecord columns: the pair's
    ``annotator_kind`` names the kinds used (human -> n_human, ai -> n_ai, mixed -> all)."""
    k = pl.col("annotator_kind")
    return pl.when(k == "human").then(pl.col("n_human")).when(k == "ai").then(pl.col("n_ai")).otherwise(pl.col("n_judgments"))


def _empty_annotators() -> pl.DataFrame:
    return pl.DataFrame(schema={"annotator_id": pl.String, "annotator_kind": pl.String, "n_judgments": pl.Int64,
                                "n_decisive": pl.Int64, "ds_accuracy": pl.Float64, "accuracy_better_first": pl.Float64,
                                "accuracy_better_second": pl.Float64, "order_engagement": pl.Float64})


# ---------------------------------------------------------------- annotators.parquet
def annotator_table(
    results: Iterable[CheckResult] | Mapping[str, CheckResult],
    ds_accuracy: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Merge the per-check ``tables["annotators"]`` into one ``AnnotatorStats`` table.

    Columns present in several tables (``annotator_kind``, ``n_judgments``,
    ``n_decisive``...) are coalesced in the order the results are given (``ds_accuracy``,
    when given, first).  ``flags`` is the
    sorted list of reason codes of all annotator flags of the given results;
    ``status`` is ``flagged`` when there is any, else ``insufficient_data`` when some check
    had too few judgments to test the annotator, else ``ok``.  ``ds_accuracy`` may come
    from :attr:`Aggregation.annotators`.  Extra columns of the check tables are kept after
    the ``AnnotatorStats`` columns.
    """
    res = list(results.values()) if isinstance(results, Mapping) else list(results)
    schema = polars_schema(AnnotatorStats)
    tables = [r.tables["annotators"] for r in res if "annotators" in r.tables]
    if ds_accuracy is not None:  # given explicitly: takes precedence over the checks' own estimate
        tables.insert(0, ds_accuracy)
    tables = [t for t in tables if t.height]
    if not tables:
        return empty_frame(AnnotatorStats)
    merged = None
    for i, t in enumerate(tables):
        t = t.rename({"status": f"_status_{i}"}) if "status" in t.columns else t
        if merged is None:
            merged = t
            continue
        common = [x for x in t.columns if x in merged.columns and x != "annotator_id"]
        merged = merged.join(t, on="annotator_id", how="full", coalesce=True, suffix="__r")
        merged = merged.with_columns([pl.coalesce(x, f"{x}__r").alias(x) for x in common]).drop([f"{x}__r" for x in common])
    assert merged is not None
    flag_frames = [r.flags.filter(pl.col("subject_kind") == "annotator").select("subject_id", "reason") for r in res]
    flags = pl.concat(flag_frames) if flag_frames else pl.DataFrame(schema={"subject_id": pl.String, "reason": pl.String})
    per_ann = flags.group_by("subject_id").agg(pl.col("reason").unique().sort().alias("flags")).rename({"subject_id": "annotator_id"})
    merged = merged.drop("flags", strict=False).join(per_ann, on="annotator_id", how="left")
    status_cols = [x for x in merged.columns if x.startswith("_status_")]
    insufficient = pl.any_horizontal([pl.col(x) == "insufficient_data" for x in status_cols]) if status_cols else pl.lit(False)
    merged = merged.with_columns(flags=pl.col("flags").fill_null(pl.lit([], dtype=pl.List(pl.String)))).with_columns(
        status=pl.when(pl.col("flags").list.len() > 0).then(pl.lit("flagged"))
        .when(insufficient.fill_null(False)).then(pl.lit("insufficient_data")).otherwise(pl.lit("ok"))
    ).drop(status_cols)
    for name, dtype in schema.items():
        if name not in merged.columns:
            default = {"n_judgments": 0, "n_decisive": 0, "gold_n": 0}.get(name)
            merged = merged.with_columns(pl.lit(default, dtype=dtype).alias(name))
    extra = [x for x in merged.columns if x not in schema]
    return merged.select([pl.col(n).cast(t) for n, t in schema.items()] + extra).sort("annotator_id")
