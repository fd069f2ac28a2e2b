"""Reviews (judgments with ``review_of``) against the pairs the lineage routed.

Method
------
The statuses of :func:`pipeline.reviews_resolve.classify` (one per review judgment) give the
flags (subject ``judgment``):

* ``review_text_mismatch``: the review's prompt or responses differ from the pair it names (the
  review was given its own content-derived pair_id, so the pair is not touched); dropped by default;
* ``review_unknown_pair``: no judgment of the version's lineage names the pair (a typo, an id
  from another store, ``../`` or markup in the id); dropped by default;
* ``review_not_routed``: the pair exists but no version of the lineage routed it; the review
  counts as an ordinary judgment of the pair (default ``warn``).

Without a review context (no parent) every review of a known pair is ``review_not_routed``.
Reviews by AI judges or by annotators the registry does not qualify are not flagged here (the
registry check flags the latter); they only never resolve a pair.  Statistics: review judgments
by status, reviewed pairs.  Status ``warn`` when anything is flagged.
"""
from __future__ import annotations

import polars as pl

from pipeline.checks.spec import CheckSpec, Reason
from pipeline.reviews_resolve import STATUSES, ReviewContext, classify
from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import ChecksConfig

NAME = "reviews"
_FLAGS = {"text_mismatch": "review_text_mismatch", "unknown_pair": "review_unknown_pair", "not_routed": "review_not_routed"}


def run(judgments: pl.DataFrame, cfg: ChecksConfig | None = None,  # noqa: ARG001 - one check signature
        *, reviews: ReviewContext | None = None, classified: pl.DataFrame | None = None) -> CheckResult:
    """``classified``: :func:`~pipeline.reviews_resolve.classify` of these judgments and ``reviews``, when the caller
    has it (a child whose union lacks some of the columns it reads: then no judgment column is read here)."""
    rv = classify(judgments, reviews) if classified is None else classified
    counts = {s: 0 for s in STATUSES} | dict(rv.group_by("status").len().iter_rows())
    metrics = {"review_judgments": rv.height, "by_status": counts,
               "reviewed_pairs": rv.filter(pl.col("status") != "text_mismatch")["review_of"].n_unique() if rv.height else 0}
    if rv.height == 0:
        return CheckResult(name=NAME, status="pass", metrics=metrics, flags=empty_flags(), summary="no review judgments")
    c = pl.col
    frames = []
    for status, reason in _FLAGS.items():
        g = rv.filter(c("status") == status)
        if not g.height:
            continue
        detail = {
            "text_mismatch": pl.format("the review's prompt or responses differ from pair {}'s: not merged into it", c("review_of")),
            "unknown_pair": pl.format("review_of names pair {}, which no judgment of this version's lineage names", c("review_of")),
            "not_routed": pl.format("pair {} was never routed by this version's lineage: an ordinary judgment", c("review_of")),
        }[status]
        frames.append(make_flags(g["comparison_id"], subject_kind="judgment", check=NAME, reason=reason,
                                 severity="warn", detail=g.select(detail).to_series()))
    flags = pl.concat(frames) if frames else empty_flags()
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
    return CheckResult(name=NAME, status="warn" if flags.height else "pass", metrics=metrics, flags=flags,
                       summary=f"{rv.height} review judgments: {summary}")


CHECK = CheckSpec(
    name=NAME, run=run, inputs=("reviews", "classified"),
    # (a review's status reads no strength: classify gives it null without the column)
    judgment_columns=("comparison_id", "pair_id", "review_of", "annotator_id", "annotator_kind", "label", "a_hash", "locale",
                      "rubric", "created_at"),
    doc="reviews (review_of) against the pairs the version's lineage routed (docs/reviews.md)",
    reasons=(
        Reason("review_text_mismatch", "judgment", "drop", "a review's prompt or responses differ from the pair its "
               "review_of names (never merged into that pair)", actions=("drop", "warn")),
        Reason("review_unknown_pair", "judgment", "drop", "a review's review_of names a pair no judgment of the "
               "version's lineage names", actions=("drop", "warn")),
        Reason("review_not_routed", "judgment", "warn", "a review of a pair the version's lineage never routed "
               "(an ordinary judgment of the pair)", actions=("warn", "drop")),
    ),
)
