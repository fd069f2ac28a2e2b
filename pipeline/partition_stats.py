"""A pair-scoped step over one partition, and its reduce: the first mergeable states of issue 15.

Per partition (``run``, on a worker, reading only its partition file):

* ``exact_duplicates``: the later copies of re-delivered judgments
  (:func:`pipeline.checks.duplicates.exact_duplicates`; its key contains the content key, so a
  partition holds every copy of a delivery);
* ``annotator_sums``: per annotator, the counts behind the first-shown rate
  (``decisive_shown``: a/b verdicts with ``shown_first``; ``first_chosen``: of those, the
  first-shown response won) and the longer-chosen rate (``decisive_len``: a/b verdicts on
  pairs whose responses differ in length; ``longer_chosen``), plus ``judgments``.  Sums merge
  by addition -- no rate is averaged;
* ``given_id_keys``: the distinct (``pair_id``, content key) of rows whose ``pair_id`` is not
  the derived one (given ids, ``review_of``): a conflicting given id may span partitions, so
  conflicts are found in the reduce, from this small table (empty for derived ids);
* ``counts``: judgments and distinct content keys (pairs).

``reduce`` concatenates the states in partition order and merges them: sums by annotator,
duplicates and id keys sorted, conflicts = given ids with more than one content key.  The
result is independent of the partition count and of where the tasks ran.
"""
from __future__ import annotations

import polars as pl

from pipeline.checks.duplicates import exact_duplicates
from pipeline.distributed import State, Step
from pipeline.partition import content_key_hash, read_partition

VERSION = "1"
COLUMNS = ["comparison_id", "pair_id", "prompt_hash", "a_hash", "b_hash", "annotator_id", "shown_first", "label",
           "response_a", "response_b", "created_at", "batch_id", "source_file", "source_line"]
_SUM_COLUMNS = ["judgments", "decisive_shown", "first_chosen", "decisive_len", "longer_chosen"]


def annotator_sums(judgments: pl.DataFrame) -> pl.DataFrame:
    """Per annotator: the sufficient statistics of the first-shown and longer-chosen rates."""
    c = pl.col
    decisive = c("label").is_in(["a", "b"])
    len_a, len_b = c("response_a").str.len_chars(), c("response_b").str.len_chars()
    longer = pl.when(len_a > len_b).then(pl.lit("a")).when(len_b > len_a).then(pl.lit("b")).otherwise(None)
    return judgments.group_by("annotator_id").agg(
        judgments=pl.len().cast(pl.Int64),
        decisive_shown=(decisive & c("shown_first").is_not_null()).sum().cast(pl.Int64),
        first_chosen=(decisive & (c("label") == c("shown_first"))).fill_null(False).sum().cast(pl.Int64),
        decisive_len=(decisive & longer.is_not_null()).sum().cast(pl.Int64),
        longer_chosen=(decisive & (c("label") == longer)).fill_null(False).sum().cast(pl.Int64),
    ).sort("annotator_id")


def given_id_keys(judgments: pl.DataFrame) -> pl.DataFrame:
    """Distinct (pair_id, content key) where the pair_id is not the content-derived one."""
    keyed = judgments.select("pair_id", _key=content_key_hash())
    return keyed.filter(pl.col("pair_id") != pl.col("_key")).unique().rename({"_key": "content_key"}).sort("pair_id", "content_key")


def run(paths: list[str]) -> State:
    judgments = read_partition(paths, columns=COLUMNS)
    return {
        "exact_duplicates": exact_duplicates(judgments).sort("comparison_id"),
        "annotator_sums": annotator_sums(judgments),
        "given_id_keys": given_id_keys(judgments),
        "counts": pl.DataFrame({"judgments": [judgments.height],
                                "pairs": [judgments.select(content_key_hash().n_unique()).item() if judgments.height else 0]},
                               schema={"judgments": pl.Int64, "pairs": pl.Int64}),
    }


def reduce(states: list[State]) -> State:
    def cat(name: str) -> pl.DataFrame:
        return pl.concat([s[name] for s in states], how="vertical")

    sums = cat("annotator_sums").group_by("annotator_id").agg(pl.col(_SUM_COLUMNS).sum()).sort("annotator_id")
    keys = cat("given_id_keys").unique().sort("pair_id", "content_key")
    conflicts = keys.group_by("pair_id").agg(content_keys=pl.len().cast(pl.Int64)).filter(pl.col("content_keys") > 1).sort("pair_id")
    out = {
        "exact_duplicates": cat("exact_duplicates").sort("comparison_id"),
        "annotator_sums": sums.with_columns(
            first_shown_rate=pl.col("first_chosen") / pl.col("decisive_shown"),
            longer_chosen_rate=pl.col("longer_chosen") / pl.col("decisive_len")),
        "pair_id_conflicts": conflicts,
        "counts": cat("counts").sum(),
    }
    return {name: frame.rechunk() for name, frame in out.items()}  # one chunk: the same bytes for any partition count


STEP = Step(name="partition_stats", version=VERSION, run=run, reduce=reduce)
