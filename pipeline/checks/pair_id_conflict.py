"""Pair-id conflicts: one ``pair_id`` naming different texts in different judgments.

Method
------
A pair is a prompt and two responses; ``a``/``b`` are names, not positions, so the same two
responses in the other order are the same pair.  Per ``pair_id``, the judgments' prompt
(``prompt_hash`` of the normalised prompt) and their unordered responses
({``a_hash``, ``b_hash``}, compared as min / max) are counted; a pair_id with more than one
distinct prompt or response set is a conflict, and **every** judgment carrying it is flagged
``pair_id_conflict`` (subject ``judgment``, severity ``error``) -- not only those that differ
from the first, so the outcome does not depend on the order of files, lines or versions.
The policy drops them (``select.flag_actions.pair_id_conflict`` accepts only ``drop``), so
such judgments are never merged into one DPO row: the pair leaves as
``all_judgments_dropped`` and its judgments are counted in ``judgments_dropped``.

A child version runs the checks over its parent's judgments plus the new batch, so a
pair_id that a later batch re-uses with other texts takes the parent's judgments of it out
as well.  Derived pair ids are content hashes of exactly this key and conflict only on a
64-bit hash collision (which this check would catch too); given ids can conflict.

Statistics: ``conflicting_pair_ids``, ``flagged_judgments``, and how many conflicts differ
in the prompt / in the responses.  Status ``warn`` when anything is flagged.
"""
from __future__ import annotations

import polars as pl

from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import ChecksConfig
from pipeline.checks.spec import CheckSpec, Reason

NAME = "pair_id_conflict"


def conflicts(judgments: pl.DataFrame) -> pl.DataFrame:
    """pair_ids with more than one content: ``pair_id``, ``n_prompts``, ``n_response_sets``
    (upper bound: distinct min and max response hashes), ``n_judgments``."""
    c = pl.col
    lo, hi = pl.min_horizontal("a_hash", "b_hash"), pl.max_horizontal("a_hash", "b_hash")
    per = judgments.group_by("pair_id").agg(
        n_prompts=c("prompt_hash").n_unique(), _lo=lo.n_unique(), _hi=hi.n_unique(), n_judgments=pl.len())
    return per.filter((c("n_prompts") > 1) | (c("_lo") > 1) | (c("_hi") > 1)).select(
        "pair_id", "n_prompts", n_response_sets=pl.max_horizontal("_lo", "_hi"), n_judgments=c("n_judgments")).sort("pair_id")


def run(judgments: pl.DataFrame, cfg: ChecksConfig | None = None, *, pairs: pl.DataFrame | None = None) -> CheckResult:  # noqa: ARG001 - one check signature
    if judgments.height == 0:
        return summarize(conflicts(judgments.clear() if judgments.width else _EMPTY_J), empty_flags())
    bad = conflicts(judgments)
    if bad.height == 0:
        return summarize(bad, empty_flags())
    c = pl.col
    flagged = judgments.select("comparison_id", "pair_id").join(bad, on="pair_id", how="inner").sort("pair_id", "comparison_id")
    detail = flagged.select(pl.format(
        "pair_id {} names {} prompt(s) and {} response pair(s) across {} judgments; none of them is used",
        c("pair_id"), c("n_prompts"), c("n_response_sets"), c("n_judgments"))).to_series()
    flags = make_flags(flagged["comparison_id"], subject_kind="judgment", check=NAME, reason="pair_id_conflict",
                       severity="error", detail=detail)
    return summarize(bad, flags)


_EMPTY_J = pl.DataFrame(schema={"pair_id": pl.String, "prompt_hash": pl.String, "a_hash": pl.String, "b_hash": pl.String})


def summarize(bad: pl.DataFrame, flags: pl.DataFrame) -> CheckResult:
    """The result from the conflicts table and the flags (a child merges its parent's rows with the
    touched pairs', ``pipeline/incremental.py``)."""
    if bad.height == 0:
        return CheckResult(name=NAME, status="pass", metrics={"conflicting_pair_ids": 0, "flagged_judgments": 0},
                           flags=empty_flags(), tables={"conflicts": bad},
                           summary="every pair_id names one prompt and one pair of responses")
    bad = bad.sort("pair_id")
    metrics = {
        "conflicting_pair_ids": bad.height,
        "flagged_judgments": flags.height,
        "prompt_differs": int((bad["n_prompts"] > 1).sum()),
        "responses_differ": int((bad["n_response_sets"] > 1).sum()),
        "examples": bad["pair_id"].head(10).to_list(),
    }
    return CheckResult(name=NAME, status="warn", metrics=metrics, flags=flags, tables={"conflicts": bad},
                       summary=f"{bad.height} pair_id(s) name different texts: {flags.height} judgments flagged")


CHECK = CheckSpec(
    name=NAME, run=run, inputs=(), doc="one pair_id naming different texts",
    reasons=(
        Reason("pair_id_conflict", "judgment", "drop", "the judgment's pair_id is used elsewhere with a different prompt "
               "or different responses; never merged (drop is the only action)", actions=("drop",)),
    ))
