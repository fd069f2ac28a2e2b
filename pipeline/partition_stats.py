"""A pair-scoped step over one partition, and its reduce: the first mergeable states of issue 15.

Per partition (``run``, on a worker, reading only its partition file):

* ``exact_duplicates``: the later copies of re-delivered judgments
  (:func:`pipeline.checks.duplicates.exact_duplicates`; its key contains the content key, so a
  partition holds every copy of a delivery);
* ``annotator_sums``: per annotator, the counts behind the first-shown rate
  (``decisive_shown``: a/b verdicts with ``shown_first``; ``first_chosen``: of those, the
  first-shown response won) and the longer-chosen rate (``decisive_len``: a/b verdicts on
  pairs whose responses differ in length; ``longer_chosen``), plus ``judgments``; each delivery
  once, as the bias checks count (re-delivered copies are not counted,
  :func:`pipeline.checks.agreement.ratings`).  Sums merge by addition -- no rate is averaged;
* ``given_id_keys``: the distinct (``pair_id``, content key) of rows whose ``pair_id`` is not
  the derived one (given ids, ``review_of``): a conflicting given id may span partitions, so
  conflicts are found in the reduce, from this small table (empty for derived ids);
* ``identical_response_pairs``: pairs whose two responses are the same text
  (:func:`pipeline.checks.duplicates.identical_response_pairs`, pair-scoped);
* ``order_sums``: per annotator, pairs judged in both display orders and how many got the same
  verdict (any label, and a/b only): the counts behind order consistency
  (:func:`pipeline.checks.position_bias.order_consistency`), summed in the reduce;
* ``counts``: judgments and distinct content keys (pairs);
* ``agreement_profiles``: Krippendorff's alpha and Fleiss' kappa are sums of per-pair terms of
  the pair's a / b / tie rating counts (re-delivered copies are no ratings,
  :func:`pipeline.checks.agreement.ratings`), so a partition sends the histogram of those count
  profiles per annotator kind (few distinct rows) -- the same compression the agreement check
  bootstraps over; pairs with a given id go as ``agreement_given_units`` (one row per pair and
  kind) and are merged by id in the reduce, since a conflicting given id may span partitions.
  The reduce computes alpha, kappa and their bootstrap CIs exactly as
  :mod:`pipeline.checks.agreement` does on the whole input (same profiles in the same order,
  same seeds); a conflicting id whose contents name the same two responses the other way
  round in different partitions is oriented per partition (documented limit; such judgments
  are dropped as ``pair_id_conflict`` anyway).

``reduce`` concatenates the states in partition order and merges them: sums by annotator,
duplicates and id keys sorted, conflicts = given ids with more than one content key.  The
result is independent of the partition count and of where the tasks ran.
"""
from __future__ import annotations

import polars as pl

import numpy as np

from pipeline.aggregate import encode
from pipeline.checks.agreement import profile_metrics, ratings, unit_counts
from pipeline.checks.duplicates import exact_duplicates, identical_response_pairs
from pipeline.checks.position_bias import order_consistency
from pipeline.distributed import State, Step
from pipeline.partition import content_key_hash, read_partition
from schemas.policy import AgreementConfig

VERSION = "5"
COLUMNS = ["comparison_id", "pair_id", "prompt_hash", "a_hash", "b_hash", "annotator_id", "annotator_kind", "shown_first",
           "label", "response_a", "response_b", "created_at", "batch_id", "source_file", "source_line"]
KINDS = ("human", "ai", "all", "unknown")  # the agreement check's order: its bootstrap seed is cfg.seed + 10 * index
_PROFILE = {"kind": pl.String, "n_a": pl.Int64, "n_b": pl.Int64, "n_tie": pl.Int64}
_SUM_COLUMNS = ["judgments", "decisive_shown", "first_chosen", "decisive_len", "longer_chosen"]


def annotator_sums(judgments: pl.DataFrame) -> pl.DataFrame:
    """Per annotator: the sufficient statistics of the first-shown and longer-chosen rates (copies not counted)."""
    c = pl.col
    decisive = c("label").is_in(["a", "b"])
    len_a, len_b = c("len_a"), c("len_b")
    longer = pl.when(len_a > len_b).then(pl.lit("a")).when(len_b > len_a).then(pl.lit("b")).otherwise(None)
    rows = judgments.select("annotator_id", "label", "shown_first", len_a=c("response_a").str.len_chars(),
                            len_b=c("response_b").str.len_chars()).filter(pl.Series(ratings(judgments)))
    return rows.group_by("annotator_id").agg(
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


def _kind_counts(uc: np.ndarray) -> dict[str, np.ndarray]:
    return {"human": uc[:, 0], "ai": uc[:, 1], "all": uc.sum(axis=1), "unknown": uc[:, 2]}


def agreement_states(judgments: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(profiles: kind, n_a, n_b, n_tie, pairs -- pairs with a derived id and >= 2 ratings;
    given units: pair_id, kind, n_a, n_b, n_tie -- one row per pair with a given id)."""
    if judgments.height == 0:
        return (pl.DataFrame(schema={**_PROFILE, "pairs": pl.Int64}),
                pl.DataFrame(schema={"pair_id": pl.String, **_PROFILE}))
    e = encode(judgments)
    uc = unit_counts(e, judgments["annotator_kind"], ratings(judgments))
    given_j = judgments.select((pl.col("pair_id") != content_key_hash()).alias("g"))["g"].to_numpy()
    given = given_j[e.pair_first]
    profiles, units = [], []
    for kind, counts in _kind_counts(uc).items():
        mine = counts[~given]
        mine = mine[mine.sum(axis=1) >= 2]
        prof = pl.DataFrame({"n_a": mine[:, 0], "n_b": mine[:, 1], "n_tie": mine[:, 2]}, schema={k: pl.Int64 for k in ("n_a", "n_b", "n_tie")})
        profiles.append(prof.group_by("n_a", "n_b", "n_tie").agg(pairs=pl.len().cast(pl.Int64)).select(pl.lit(kind).alias("kind"), pl.all()))
        keep = given & (counts.sum(axis=1) > 0)  # a kind with no rating adds nothing to the merged unit
        g = counts[keep]
        units.append(pl.DataFrame({"pair_id": e.pair_ids.filter(pl.Series(keep)), "kind": [kind] * len(g),
                                   "n_a": g[:, 0], "n_b": g[:, 1], "n_tie": g[:, 2]}, schema={"pair_id": pl.String, **_PROFILE}))
    return (pl.concat(profiles).sort("kind", "n_tie", "n_b", "n_a"), pl.concat(units).sort("pair_id", "kind"))


def agreement_from_profiles(profiles: pl.DataFrame, cfg: AgreementConfig | None = None) -> pl.DataFrame:
    """Per kind, the agreement check's alpha / kappa figures from merged count profiles.

    The same :func:`pipeline.checks.agreement.profile_metrics` the check runs, on the merged
    (distinct rows, multiplicity) histogram instead of the check's compressed per-pair counts;
    ``tests/test_distributed.py`` pins the two to the last bit."""
    cfg = cfg or AgreementConfig()
    out = []
    for i, kind in enumerate(KINDS):
        # compress_rows' order: the profile as a mixed-radix number, last category most significant
        prof = profiles.filter(pl.col("kind") == kind).sort("n_tie", "n_b", "n_a")
        # C order, as compress_rows returns it: a float sum over a Fortran-ordered array can differ in the last bit
        rows = np.ascontiguousarray(prof.select("n_a", "n_b", "n_tie").to_numpy(), dtype=np.int64).reshape(-1, 3)
        f = profile_metrics(rows, prof["pairs"].to_numpy().astype(np.int64), cfg.bootstrap, cfg.seed + 10 * i)
        row = {"kind": kind, "n_pairs": f["n_pairs"], "n_ratings": f["n_ratings"],
               "krippendorff_alpha": f["krippendorff_alpha"], "alpha_lo": f["alpha_ci"][0], "alpha_hi": f["alpha_ci"][1],
               "fleiss_m": f["fleiss_m"], "fleiss_n_pairs": f["fleiss_n_pairs"], "fleiss_kappa": f["fleiss_kappa"],
               "kappa_lo": f["kappa_ci"][0], "kappa_hi": f["kappa_ci"][1]}
        out.append(row)
    schema = {"kind": pl.String, "n_pairs": pl.Int64, "n_ratings": pl.Int64, "krippendorff_alpha": pl.Float64,
              "alpha_lo": pl.Float64, "alpha_hi": pl.Float64, "fleiss_m": pl.Int64, "fleiss_n_pairs": pl.Int64,
              "fleiss_kappa": pl.Float64, "kappa_lo": pl.Float64, "kappa_hi": pl.Float64}
    return pl.DataFrame(out, schema=schema).with_columns(pl.col(pl.Float64).fill_nan(None))


_ORDER_SUMS = {"annotator_id": pl.String, "order_pairs": pl.Int64, "order_same": pl.Int64,
               "decisive_order_pairs": pl.Int64, "decisive_order_same": pl.Int64}


def order_sums(judgments: pl.DataFrame) -> pl.DataFrame:
    """Per annotator: pairs judged in both display orders and how many got the same verdict (any
    label / a-b only): the counts behind :mod:`pipeline.checks.position_bias`'s order
    consistency and order-inconsistency test.  Annotators without such pairs are left out."""
    if judgments.height == 0:
        return pl.DataFrame(schema=_ORDER_SUMS)
    e = encode(judgments)  # the frame agreement_states encoded: a cache hit
    n, same = order_consistency(e)
    nd, samed = order_consistency(e, decisive=True)
    out = pl.DataFrame({"annotator_id": e.ann_ids, "order_pairs": n, "order_same": same, "decisive_order_pairs": nd,
                        "decisive_order_same": samed}).cast({k: v for k, v in _ORDER_SUMS.items() if k != "annotator_id"})
    return out.filter(pl.col("order_pairs") > 0).sort("annotator_id")


def run(paths: list[str]) -> State:
    judgments = read_partition(paths, columns=COLUMNS)
    profiles, given_units = agreement_states(judgments)
    return {
        "order_sums": order_sums(judgments),
        "identical_response_pairs": identical_response_pairs(judgments).to_frame(),
        "agreement_profiles": profiles,
        "agreement_given_units": given_units,
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
    units = cat("agreement_given_units").group_by("pair_id", "kind").agg(pl.col("n_a", "n_b", "n_tie").sum())
    units = units.filter(pl.sum_horizontal("n_a", "n_b", "n_tie") >= 2)
    profiles = pl.concat([cat("agreement_profiles"),
                          units.group_by("kind", "n_a", "n_b", "n_tie").agg(pairs=pl.len().cast(pl.Int64))], how="diagonal")
    profiles = profiles.group_by("kind", "n_a", "n_b", "n_tie").agg(pl.col("pairs").sum()).sort("kind", "n_tie", "n_b", "n_a")
    order = cat("order_sums").group_by("annotator_id").agg(pl.exclude("annotator_id").sum()).sort("annotator_id")
    out = {
        "order_consistency": order.with_columns(order_consistency=pl.col("order_same") / pl.col("order_pairs")),
        "identical_response_pairs": cat("identical_response_pairs").unique().sort("pair_id"),
        "agreement": agreement_from_profiles(profiles),
        "exact_duplicates": cat("exact_duplicates").sort("comparison_id"),
        "annotator_sums": sums.with_columns(
            first_shown_rate=pl.col("first_chosen") / pl.col("decisive_shown"),
            longer_chosen_rate=pl.col("longer_chosen") / pl.col("decisive_len")),
        "pair_id_conflicts": conflicts,
        "counts": cat("counts").sum(),
    }
    return {name: frame.rechunk() for name, frame in out.items()}  # one chunk: the same bytes for any partition count


STEP = Step(name="partition_stats", version=VERSION, run=run, reduce=reduce)
