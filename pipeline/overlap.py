"""Agreement on the independent-overlap subset: what certification requires before it trusts labels.

A pair is in the overlap subset of a kind (``human`` or ``ai``) when at least two *different*
annotators of that kind judged it.  The same AI judge asked twice (both display orders) is
one annotator: its two verdicts measure its consistency, not agreement between judges.
Annotators of kind ``unknown`` (adapters whose source does not say who judged) never form
an overlap.

Each (pair, annotator) contributes one rating: the annotator's verdict on the pair in
canonical orientation (``a`` / ``b`` / ``tie``); an annotator whose repeated verdicts on the
pair disagree (e.g. flips with the display order) contributes the most frequent one, or no
rating when there is no single most frequent one; ``both_bad`` / ``escalate`` are missing
values (they do not answer "which is better").  Krippendorff's alpha (nominal) over the
overlap pairs is then computed from those ratings (:mod:`pipeline.stats`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from pipeline.aggregate import TIE, encode
from pipeline.stats import alpha_from_sums

KINDS = ("human", "ai")
COLUMNS = ("pair_id", "a_hash", "b_hash", "label", "annotator_id", "annotator_kind")


def overlap_agreement(judgments: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Per kind: ``pairs`` (pairs with a judgment of that kind), ``overlap_pairs`` (pairs with
    ratings from >= 2 different annotators of that kind) and ``krippendorff_alpha`` over those
    (None when not computable).  Also ``unknown_only_pairs``: pairs judged only by annotators
    of unknown kind."""
    return from_state(overlap_state(judgments))


def annotator_kinds(judgments: pl.DataFrame) -> dict[str, str | None]:
    """Each annotator's kind: the kind of its first judgment in the frame (as :func:`encode` takes it)."""
    if judgments.height == 0:
        return {}
    first = judgments.select("annotator_id", "annotator_kind").unique("annotator_id", keep="first", maintain_order=True)
    return dict(first.iter_rows())


def overlap_state(judgments: pl.DataFrame, kinds: dict[str, str | None] | None = None) -> dict[str, Any]:
    """What :func:`from_state` needs, as sums over pairs of integers: the state of two sets of pairs
    is the sum of theirs (:func:`add_states`), so a child's state is its parent's minus the old
    contributions of the pairs its batch touched plus their new ones.  ``kinds``: each annotator's
    kind when the frame holds only some of its judgments (default: from the frame)."""
    state: dict[str, Any] = {k: {"pairs": 0, "overlap_pairs": 0, "m": 0, "n_c": [0, 0, 0], "d_by_m": {}} for k in KINDS}
    state["unknown"] = {"pairs": 0, "unknown_only_pairs": 0}
    if judgments.height == 0:
        return state
    e = encode(judgments.select([c for c in COLUMNS if c in judgments.columns]))
    if kinds is None:
        kind_of_ann = e.ann_kind.to_numpy()
    else:
        kind_of_ann = np.array([kinds.get(a) for a in e.ann_ids.to_list()], dtype=object)
    # one rating per (pair, annotator): the most frequent of a / b / tie, none when it is not unique
    cat = np.where(e.label <= TIE, e.label, -1)
    per_unit = e.per_unit(codes=cat, k=3).astype(np.int64)  # (U, 3)
    top = per_unit.max(axis=1)
    unique_top = (per_unit == top[:, None]).sum(axis=1) == 1
    rated = (top > 0) & unique_top
    rating = np.argmax(per_unit, axis=1)
    unit_kind = kind_of_ann[e.unit_ann]
    for kind in KINDS:
        in_kind = unit_kind == kind
        sel = in_kind & rated
        counts = np.zeros((e.n_pairs, 3), np.int64)
        np.add.at(counts, (e.unit_pair[sel], rating[sel]), 1)
        m = counts.sum(axis=1)
        overlap = m >= 2
        num = m * m - (counts * counts).sum(axis=1)  # (m^2 - sum_c n_c^2): D_u is num / (m - 1)
        ms, inv = np.unique(m[overlap], return_inverse=True)
        tot = np.zeros(ms.size, np.int64)
        np.add.at(tot, inv.ravel(), num[overlap])
        by_m = {str(int(mv)): int(nv) for mv, nv in zip(ms, tot, strict=True) if nv}
        state[kind] = {"pairs": int(np.unique(e.unit_pair[in_kind]).size), "overlap_pairs": int(overlap.sum()),
                       "m": int(m[overlap].sum()), "n_c": [int(x) for x in counts[overlap].sum(axis=0)], "d_by_m": by_m}
    known = np.zeros(e.n_pairs, bool)
    known[e.unit_pair[np.isin(unit_kind, KINDS)]] = True
    any_unknown = np.zeros(e.n_pairs, bool)
    any_unknown[e.unit_pair[~np.isin(unit_kind, KINDS)]] = True
    state["unknown"] = {"pairs": int(any_unknown.sum()), "unknown_only_pairs": int((any_unknown & ~known).sum())}
    return state


def add_states(a: dict[str, Any], b: dict[str, Any], sign: int = 1) -> dict[str, Any]:
    """``a + sign * b``, field by field."""
    out: dict[str, Any] = {}
    for key, va in a.items():
        vb = b[key]
        out[key] = {}
        for f, x in va.items():
            y = vb[f]
            if isinstance(x, dict):
                merged = {k: x.get(k, 0) + sign * y.get(k, 0) for k in sorted(set(x) | set(y), key=int)}
                out[key][f] = {k: v for k, v in merged.items() if v}
            elif isinstance(x, list):
                out[key][f] = [p + sign * q for p, q in zip(x, y, strict=True)]
            else:
                out[key][f] = x + sign * y
    return out


def from_state(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The figures of :func:`overlap_agreement` from a state (nominal alpha from exact sums)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        s = state[kind]
        alpha = None
        if s["overlap_pairs"]:
            d = sum(v / (int(m) - 1) for m, v in sorted(s["d_by_m"].items(), key=lambda kv: int(kv[0])))
            n = float(s["m"])
            sums = np.array([d, n, *map(float, s["n_c"])])
            a = float(alpha_from_sums(sums))
            alpha = None if np.isnan(a) else a
        out[kind] = {"pairs": s["pairs"], "overlap_pairs": s["overlap_pairs"], "krippendorff_alpha": alpha}
    out["unknown"] = dict(state["unknown"])
    return out


def required_overlap(pairs: int, share: float, cap: int) -> int:
    """Overlap pairs a kind needs: ``min(ceil(share * pairs), cap)``, at least 1 when it judged anything."""
    if pairs <= 0:
        return 0
    return max(1, min(int(np.ceil(share * pairs - 1e-9)), cap))


__all__ = ["KINDS", "add_states", "annotator_kinds", "from_state", "overlap_agreement", "overlap_state", "required_overlap"]
