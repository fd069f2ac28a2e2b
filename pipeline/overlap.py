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
from pipeline.stats import alpha_from_sums, unit_terms_alpha

KINDS = ("human", "ai")
COLUMNS = ("pair_id", "a_hash", "b_hash", "label", "annotator_id", "annotator_kind")


def overlap_agreement(judgments: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Per kind: ``pairs`` (pairs with a judgment of that kind), ``overlap_pairs`` (pairs with
    ratings from >= 2 different annotators of that kind) and ``krippendorff_alpha`` over those
    (None when not computable).  Also ``unknown_only_pairs``: pairs judged only by annotators
    of unknown kind."""
    out: dict[str, dict[str, Any]] = {k: {"pairs": 0, "overlap_pairs": 0, "krippendorff_alpha": None} for k in KINDS}
    if judgments.height == 0:
        out["unknown"] = {"pairs": 0, "unknown_only_pairs": 0}
        return out
    e = encode(judgments.select([c for c in COLUMNS if c in judgments.columns]))
    kind_of_ann = e.ann_kind.to_numpy()
    # one rating per (pair, annotator): the most frequent of a / b / tie, none when it is not unique
    cat = np.where(e.label <= TIE, e.label, -1)
    per_unit = e.per_unit(codes=cat, k=3)  # (U, 3)
    top = per_unit.max(axis=1)
    unique_top = (per_unit == top[:, None]).sum(axis=1) == 1
    rated = (top > 0) & unique_top
    rating = np.argmax(per_unit, axis=1)
    unit_kind = kind_of_ann[e.unit_ann]
    for kind in KINDS:
        in_kind = unit_kind == kind
        out[kind]["pairs"] = int(np.unique(e.unit_pair[in_kind]).size)
        sel = in_kind & rated
        counts = np.zeros((e.n_pairs, 3))
        np.add.at(counts, (e.unit_pair[sel], rating[sel]), 1.0)
        overlap = counts.sum(axis=1) >= 2
        out[kind]["overlap_pairs"] = int(overlap.sum())
        if overlap.any():
            alpha = float(alpha_from_sums(unit_terms_alpha(counts[overlap]).sum(axis=0)))
            out[kind]["krippendorff_alpha"] = None if np.isnan(alpha) else alpha
    known = np.zeros(e.n_pairs, bool)
    known[e.unit_pair[np.isin(unit_kind, KINDS)]] = True
    any_unknown = np.zeros(e.n_pairs, bool)
    any_unknown[e.unit_pair[~np.isin(unit_kind, KINDS)]] = True
    out["unknown"] = {"pairs": int(any_unknown.sum()), "unknown_only_pairs": int((any_unknown & ~known).sum())}
    return out


def required_overlap(pairs: int, share: float, cap: int) -> int:
    """Overlap pairs a kind needs: ``min(ceil(share * pairs), cap)``, at least 1 when it judged anything."""
    if pairs <= 0:
        return 0
    return max(1, min(int(np.ceil(share * pairs - 1e-9)), cap))


__all__ = ["overlap_agreement", "required_overlap"]
