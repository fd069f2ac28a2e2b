"""Judgments against the annotator registry: unknown annotators, contradicted kinds, unqualified reviewers.

Method
------
With a registry (``--annotators FILE`` or the policy's ``annotators``; :mod:`schemas.registry`),
every judgment is looked up by ``annotator_id`` and gets at most one reason, the first that
applies:

* ``unknown_annotator``: the id is not in the registry;
* ``kind_mismatch``: the judgment's ``annotator_kind`` is not the registry's (``unknown``
  included: a check never relabels a row, so a judgment that does not say who judged cannot
  vote as the registry's kind -- give ``--annotator-kind``);
* ``unqualified_reviewer``: the judgment is outside the annotator's qualification -- its
  ``locale`` is not covered by the registry's locales (a tag covers itself and its regions:
  ``ja`` covers ``ja-JP``, ``ja-JP`` does not cover ``ja``; case and ``_``/``-`` ignored), its
  ``rubric`` is not one of the registry's rubrics, or the UTC date of its ``created_at`` is
  before ``qualified_from`` or after ``qualified_until`` (both inclusive).  An empty list
  qualifies for any value; a judgment without a locale, rubric or ``created_at`` is not
  checked on that field (there is nothing to compare: the language check looks at locales).
  A *review* (``review_of``) is checked against the locale and rubric of the pair it reviews
  (the first its non-review judgments give), not the ones its own row names: those come back
  from a review tool, editable (an en-only reviewer's review of a ja-JP pair whose locale was
  edited to ``en`` is unqualified; under ``reviews.mode = "vote"`` it does not vote).

The qualification is decided once per distinct (annotator, locale, rubric) -- a few thousand
combinations at most -- and joined back to the judgments; dates are compared per row.  So
the cost is two joins and a few comparisons over the judgments, whatever their number.

The check flags; only select decides (defaults: ``drop`` for all three: a judgment whose
annotator is unknown, whose kind is contradicted or who is not qualified does not vote,
which also keeps "AI and human judgments stay apart" true when an AI judge writes
``human``).  Without a registry the check does nothing (status pass, ``registry: null``).

Statistics: the registry's sha256 (of its canonical JSON: the same content as CSV or TOML
hashes the same) and size, judgments checked, flags per reason, unqualified judgments per
field (one judgment may be outside on several), the unknown ids (first 20) and the
registered annotators with no judgment.  Status ``warn`` when anything is flagged.
"""
from __future__ import annotations

import polars as pl

from pipeline.checks.spec import CheckSpec, Reason
from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import ChecksConfig
from schemas.registry import AnnotatorRegistry

NAME = "registry"
REASONS = ("unknown_annotator", "kind_mismatch", "unqualified_reviewer")
_NONE = ""  # stands for a missing locale / rubric in join keys


def registry_frame(registry: AnnotatorRegistry) -> pl.DataFrame:
    """One row per registered annotator (small): kind, lower-cased locale tags, rubrics, dates."""
    rows = [{"annotator_id": e.annotator_id, "_kind": e.annotator_kind,
             "_locales": [t.lower() for t in e.locales], "_rubrics": list(e.rubrics),
             "_from": e.qualified_from, "_until": e.qualified_until,
             "_locales_s": ";".join(e.locales), "_rubrics_s": ";".join(e.rubrics)} for e in registry.annotator]
    return pl.DataFrame(rows, schema={"annotator_id": pl.String, "_kind": pl.String, "_locales": pl.List(pl.String),
                                      "_rubrics": pl.List(pl.String), "_from": pl.Date, "_until": pl.Date,
                                      "_locales_s": pl.String, "_rubrics_s": pl.String})


def _combos(keys: pl.DataFrame, reg: pl.DataFrame) -> pl.DataFrame:
    """Per distinct (annotator_id, _loc, _rubric): is the locale / rubric inside the qualification."""
    c = pl.col
    out = keys.join(reg.select("annotator_id", "_locales", "_rubrics"), on="annotator_id", how="inner")
    tags = out.select("annotator_id", "_loc", "_rubric", _tag=c("_locales")).explode("_tag").drop_nulls("_tag")
    covered = tags.group_by("annotator_id", "_loc", "_rubric").agg(
        _loc_in=((c("_loc") == c("_tag")) | c("_loc").str.starts_with(c("_tag") + "-")).any())
    return out.join(covered, on=["annotator_id", "_loc", "_rubric"], how="left").select(
        "annotator_id", "_loc", "_rubric",
        _loc_ok=(c("_loc") == _NONE) | (c("_locales").list.len() == 0) | c("_loc_in").fill_null(False),
        _rub_ok=(c("_rubric") == _NONE) | (c("_rubrics").list.len() == 0) | c("_rubrics").list.contains(c("_rubric")),
    )


def _column(judgments: pl.DataFrame, name: str, dtype: pl.DataType) -> pl.Expr:
    return pl.col(name) if name in judgments.columns else pl.lit(None, dtype).alias(name)


def pair_values(rows: pl.DataFrame) -> pl.DataFrame:
    """Per ``pair_id`` of ``rows`` (a pair's non-review judgments, in input order): ``_ploc`` and
    ``_prub``, the first locale and rubric they give -- the pair's language and rubric, as
    :func:`pipeline.aggregate.pair_locale` takes the locale."""
    return rows.group_by("pair_id", maintain_order=True).agg(
        _ploc=_column(rows, "locale", pl.String).cast(pl.String).drop_nulls().first(),
        _prub=_column(rows, "rubric", pl.String).cast(pl.String).drop_nulls().first())


def as_reviewed(reviews: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """``reviews`` (review rows) with the locale and rubric of the pair each reviews (``pairs``:
    :func:`pair_values`, joined on ``pair_id``) where the pair has one.  A review row's own
    locale and rubric are what a tool sent back (a JSONL column, Label Studio task data or Argilla
    metadata edited between export and import, a hand-written batch): they do not say which
    language the reviewer read nor under which rubric, so they never qualify a reviewer."""
    out = reviews.join(pairs.select("pair_id", "_ploc", "_prub"), on="pair_id", how="left", maintain_order="left")
    return out.with_columns(locale=pl.coalesce("_ploc", _column(reviews, "locale", pl.String).cast(pl.String)),
                            rubric=pl.coalesce("_prub", _column(reviews, "rubric", pl.String).cast(pl.String))) \
        .drop("_ploc", "_prub")


def _of_pairs(judgments: pl.DataFrame) -> pl.DataFrame:
    """``judgments`` with every review row (``review_of``) taking its pair's locale and rubric where the
    pair has one (the rule of :func:`as_reviewed`); the same frame without review rows.  The pair is the review's
    ``pair_id``: the pair it names (ingest and review import keep the two equal), or its own
    content's when its texts differ from that pair's (:func:`pipeline.reviews_resolve.attach`) --
    both in the review's partition, so a partitioned build decides as a whole one does."""
    if "review_of" not in judgments.columns or judgments["review_of"].null_count() == judgments.height:
        return judgments
    c = pl.col
    is_review = c("review_of").is_not_null()
    named = judgments.filter(is_review).select("pair_id").unique()
    pairs = pair_values(judgments.filter(~is_review).join(named, on="pair_id", how="semi"))
    # (a join on the few reviewed pairs, in row order: no row is moved)
    out = judgments.join(pairs, on="pair_id", how="left", maintain_order="left")
    own_loc = _column(judgments, "locale", pl.String).cast(pl.String)
    own_rub = _column(judgments, "rubric", pl.String).cast(pl.String)
    return out.with_columns(locale=pl.when(is_review).then(pl.coalesce("_ploc", own_loc)).otherwise(own_loc),
                            rubric=pl.when(is_review).then(pl.coalesce("_prub", own_rub)).otherwise(own_rub)) \
        .drop("_ploc", "_prub")


def findings(judgments: pl.DataFrame, registry: AnnotatorRegistry) -> pl.DataFrame:
    """The judgments that get a reason: ``comparison_id``, ``reason``, ``detail``, and ``_loc_out``,
    ``_rub_out``, ``_date_out`` (which qualification fields an unqualified judgment is outside).
    A review (``review_of``) is qualified for its pair's locale and rubric, not its own (:func:`_of_pairs`)."""
    c = pl.col
    reg = registry_frame(registry)
    judgments = _of_pairs(judgments.select([k for k in CHECK.judgment_columns or () if k in judgments.columns]))
    j = judgments.select(
        "comparison_id", "annotator_id", "annotator_kind", _locale=_column(judgments, "locale", pl.String),
        _loc=_column(judgments, "locale", pl.String).str.replace_all("_", "-", literal=True).str.to_lowercase()
        .fill_null(_NONE),
        _rubric=_column(judgments, "rubric", pl.String).fill_null(_NONE),
        _day=_column(judgments, "created_at", pl.Datetime("us", "UTC")).dt.date(),
    )
    combos = _combos(j.select("annotator_id", "_loc", "_rubric").unique(), reg)
    j = j.join(reg.select("annotator_id", "_kind", "_from", "_until"), on="annotator_id", how="left", maintain_order="left") \
        .join(combos, on=["annotator_id", "_loc", "_rubric"], how="left", maintain_order="left")
    early = c("_day").is_not_null() & c("_from").is_not_null() & (c("_day") < c("_from"))
    late = c("_day").is_not_null() & c("_until").is_not_null() & (c("_day") > c("_until"))
    j = j.with_columns(_loc_out=~c("_loc_ok").fill_null(True), _rub_out=~c("_rub_ok").fill_null(True),
                       _early=early, _late=late)
    reason = (pl.when(c("_kind").is_null()).then(pl.lit("unknown_annotator"))
              .when(c("_kind") != c("annotator_kind")).then(pl.lit("kind_mismatch"))
              .when(c("_loc_out") | c("_rub_out") | c("_early") | c("_late")).then(pl.lit("unqualified_reviewer")))
    flagged = j.with_columns(reason=reason).filter(c("reason").is_not_null())
    if flagged.height == 0:
        return flagged.select("comparison_id", "reason", detail=pl.lit(None, pl.String), _loc_out="_loc_out",
                              _rub_out="_rub_out", _date_out=c("_early") | c("_late"), annotator_id="annotator_id")
    # details only for the flagged rows, from the registry's (small) lists
    flagged = flagged.join(reg.select("annotator_id", "_locales_s", "_rubrics_s"), on="annotator_id", how="left",
                           maintain_order="left")
    ann = c("annotator_id")
    unq = pl.concat_str([
        pl.when(c("_loc_out")).then(pl.format("locale {} outside the qualified locales ({})", c("_locale"), c("_locales_s"))),
        pl.when(c("_rub_out")).then(pl.format("rubric {} outside the qualified rubrics ({})", c("_rubric"), c("_rubrics_s"))),
        pl.when(c("_early")).then(pl.format("judged on {}, before qualified_from {}", c("_day"), c("_from"))),
        pl.when(c("_late")).then(pl.format("judged on {}, after qualified_until {}", c("_day"), c("_until"))),
    ], separator="; ", ignore_nulls=True)
    detail = (pl.when(c("reason") == "unknown_annotator").then(pl.format("annotator {} is not in the registry", ann))
              .when(c("reason") == "kind_mismatch")
              .then(pl.format("annotator {}: the judgment says {}, the registry says {}", ann, c("annotator_kind"), c("_kind")))
              .otherwise(pl.format("annotator {}: ", ann) + unq))
    return flagged.select("comparison_id", "reason", detail=detail, _loc_out="_loc_out", _rub_out="_rub_out",
                          _date_out=c("_early") | c("_late"), annotator_id=ann)


def run(judgments: pl.DataFrame, cfg: ChecksConfig | None = None,  # noqa: ARG001 - one check signature
        *, registry: AnnotatorRegistry | None = None) -> CheckResult:
    """Flag judgments the registry does not vouch for (nothing to do without a registry)."""
    if registry is None:
        return result(None, judgments.height)
    return result(registry, judgments.height, *part_state(judgments, registry))


def part_state(judgments: pl.DataFrame, registry: AnnotatorRegistry) -> tuple[pl.DataFrame, pl.Series]:
    """What :func:`result` needs of some judgments: their findings and their annotators (distinct).
    Disjoint sets of judgments (a partition each) give parts that concatenate to the whole's."""
    seen = judgments["annotator_id"].unique() if judgments.height else pl.Series("annotator_id", [], pl.String)
    return findings(judgments, registry), seen


def result(registry: AnnotatorRegistry | None, n: int, found: pl.DataFrame | None = None,
           seen: pl.Series | None = None) -> CheckResult:
    """The check's result over ``n`` judgments from their findings and the annotators seen
    (:func:`part_state`, or its parts concatenated: the flags are sorted when they are gathered)."""
    if registry is None:
        return CheckResult(name=NAME, status="pass", metrics={"registry": None, "judgments": n},
                           summary="no annotator registry given: judgments not checked against one")
    assert found is not None and seen is not None
    counts = {r: 0 for r in REASONS} | dict(found.group_by("reason").len().iter_rows())
    unq = found.filter(pl.col("reason") == "unqualified_reviewer")
    seen_ids = set(seen.to_list())
    registered = [e.annotator_id for e in registry.annotator]
    unknown_ids = sorted(found.filter(pl.col("reason") == "unknown_annotator")["annotator_id"].unique().to_list()) \
        if found.height else []
    metrics = {
        "registry": registry.sha256(),
        "annotators_registered": len(registered),
        "registered_by_kind": {k: sum(e.annotator_kind == k for e in registry.annotator) for k in ("human", "ai")},
        "judgments": n,
        **counts,
        "unqualified_by_field": {"locale": int(unq["_loc_out"].sum()), "rubric": int(unq["_rub_out"].sum()),
                                 "date": int(unq["_date_out"].sum())},
        "unknown_annotator_ids": unknown_ids[:20],
        "registered_without_judgments": sum(a not in seen_ids for a in registered),
    }
    flags = empty_flags() if found.height == 0 else pl.concat([
        make_flags(g["comparison_id"], subject_kind="judgment", check=NAME, reason=r, detail=g["detail"])
        for r in REASONS if (g := found.filter(pl.col("reason") == r)).height])
    problems = [f"{counts[r]} {r}" for r in REASONS if counts[r]]
    return CheckResult(
        name=NAME, status="warn" if problems else "pass", metrics=metrics, flags=flags,
        summary=(", ".join(problems) if problems else "every judgment by a registered, qualified annotator")
        + f" ({len(registered)} annotators registered, sha256 {registry.sha256()[:12]})")


_ACTIONS = ("drop", "warn")  # a judgment flag has no weight to lower: downweight would be warn in disguise

CHECK = CheckSpec(
    name=NAME, run=run, inputs=("registry",),
    judgment_columns=("comparison_id", "annotator_id", "annotator_kind", "locale", "rubric", "created_at", "pair_id",
                      "review_of"),
    doc="judgments against the annotator registry (--annotators / policy `annotators`); no-op without one",
    reasons=(
        Reason("unknown_annotator", "judgment", "drop", "a registry is given and the annotator is not in it (does not vote)",
               actions=_ACTIONS),
        Reason("kind_mismatch", "judgment", "drop", "the judgment's `annotator_kind` differs from the registry's "
               "(does not vote: AI and human judgments stay apart)", actions=_ACTIONS),
        Reason("unqualified_reviewer", "judgment", "drop", "the judgment's locale, rubric or date is outside the "
               "annotator's qualification in the registry", actions=_ACTIONS),
    ),
)

__all__ = ["CHECK", "REASONS", "as_reviewed", "findings", "pair_values", "part_state", "registry_frame", "result", "run"]
