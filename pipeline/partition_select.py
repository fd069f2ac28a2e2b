"""Select and split over partitions (issue 15; docs/scale-out.md, "The flow the bricks add up
to", rows 4-5): after the checks (:func:`pipeline.partitioned.analyze`), the driver broadcasts
what is not a function of one pair -- the flags about annotators and slices, the near-duplicate
clusters, the final annotator parameters, each cluster's split -- and every partition decides its
own pairs.

1. :func:`drops_step`: each partition drops the judgments the flags drop
   (:func:`pipeline.select.filter_judgments` with its own pair and judgment flags plus the
   broadcast ones) and sends the compact codes of the kept ones (as
   :func:`pipeline.partition_consensus.codes_step`) and its counts by reason; the driver fits the
   final annotator parameters on the codes laid out in the canonical order
   (:func:`pipeline.partition_consensus.fit`): the one-process fit over the kept judgments.
2. :func:`select_step` (bound to both fits): each partition's final pairs
   (:func:`pipeline.aggregate.aggregate` with the parameters given; texts from its own preliminary
   pairs), :func:`pipeline.select.select_pairs`, and :func:`pipeline.split.cluster_counts` of its
   DPO rows.  The rows with texts (pairs, DPO rows, routed pairs) stay in the partition's cached
   state, read back one partition at a time (:func:`dpo_rows`; a version's build keeps no DPO rows:
   it makes them from the pair rows as it writes them); the driver receives each pair's
   fate (id, decision, reason, cluster), the routed ids and the counts.
3. The driver adds the cluster counts and assigns every cluster a split once
   (:func:`pipeline.split.assign_clusters`): a near-duplicate cluster whose pairs sit in several
   partitions gets one split.

Tested equal to the one-process path (``tests/test_partition_select.py``): the judgment drops,
the final parameters, every pair's row, the DPO rows and their splits, the routed pairs and the
counts by reason.  Dimension verdicts: the final per-dimension consensus is fitted on the kept
judgments' per-dimension codes as the overall one is.  Not covered yet: reviews that resolve a
routed pair (a child's), prior split assignments (a child's sticky clusters:
:func:`pipeline.split.sticky_ranks` per partition is the piece, tested in
``tests/test_partition_split.py``).
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import partition_consensus as pc
from pipeline import select as sel
from pipeline import split as sp
from pipeline.aggregate import PARAM_SCHEMA, aggregate
from pipeline.distributed import PartitionChanged, PartitionRef, State, Step, cached_table, map_partitions, read_ipc
from pipeline.partition_write import keyed_by_part
from pipeline.store import sha256_file
from schemas.records import ROUTED_LABELS
from schemas.policy import Policy

__all__ = ["Broadcast", "Selection", "select", "dpo_rows", "partition_rows"]

VERSION = "5"
# the state tables of select_step the driver reads; the others (rows with texts) stay cached
FATE_TABLES = ("fate", "routed_ids", "dropped", "routed_by", "cluster_counts")
BUILD_TABLES = ("prompts", "flagged_pairs", "label_counts")  # ... and these, for a version's build


_READ_LOCK = threading.Lock()
_READ: dict[tuple[str, str], pl.DataFrame] = {}  # (path, sha256) -> the table, verified once in this process
_KEEP = 2  # tables a process keeps (a build's flags and clusters)


@dataclass(frozen=True)
class Broadcast:
    """A table every task reads (the flags, the clusters): one Parquet file under the work
    directory, named by its content, checked against its sha256 when a task opens it.  A process
    reads and verifies it once and keeps the last :data:`_KEEP` tables: its tasks (64 select and
    64 drop tasks of a 10M-judgment build, in one process or on a few workers) share one copy
    (:meth:`forget` lets them go)."""

    path: str
    sha256: str

    @classmethod
    def write(cls, frame: pl.DataFrame, directory: Path, name: str) -> Broadcast:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        frame.write_parquet(tmp, compression="zstd", statistics=False)
        sha = sha256_file(tmp)
        final = directory / f"{name}-{sha[:16]}.parquet"
        os.replace(tmp, final)  # (equal content, equal name: a concurrent writer's copy is the same bytes)
        return cls(str(final.resolve()), sha)

    def read(self) -> pl.DataFrame:
        key = (self.path, self.sha256)
        with _READ_LOCK:
            kept = _READ.get(key)
        if kept is not None:
            return kept
        got = sha256_file(self.path)
        if got != self.sha256:
            raise PartitionChanged(f"{self.path}: sha256 {got[:12]}..., the driver wrote {self.sha256[:12]}...")
        frame = pl.read_parquet(self.path, glob=False)
        with _READ_LOCK:
            _READ[key] = frame
            while len(_READ) > _KEEP:
                del _READ[next(iter(_READ))]
        return frame

    @staticmethod
    def forget() -> None:
        """Let go of the tables this process keeps (the driver, once its tasks are done)."""
        with _READ_LOCK:
            _READ.clear()


def _part_flags(flags: Broadcast, part: pl.DataFrame) -> pl.DataFrame:
    """The flags a partition's select reads: those of its pairs and judgments, and every flag of
    another subject (annotators, slices, the batch)."""
    c = pl.col
    f = flags.read()
    return f.filter(((c("subject_kind") == "pair") & c("subject_id").is_in(part["pair_id"].unique().implode()))
                    | ((c("subject_kind") == "judgment") & c("subject_id").is_in(part["comparison_id"].implode()))
                    | ~c("subject_kind").is_in(["pair", "judgment"]))


def _counts(counts: dict[str, int], key: str) -> pl.DataFrame:
    return pl.DataFrame({key: list(counts), "n": list(counts.values())}, schema={key: pl.String, "n": pl.Int64})


def _params_blob(params: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    params.sort("annotator_id").select(list(PARAM_SCHEMA)).cast(PARAM_SCHEMA).write_ipc_stream(  # type: ignore[arg-type]
        buf, compat_level=pl.CompatLevel.oldest())
    return buf.getvalue()


def _params(blob: bytes) -> pl.DataFrame:
    return read_ipc(blob)


# ---------------------------------------------------------------- pass 4: judgment drops, the kept judgments' codes
def _drops_run(flags: Broadcast, policy_json: str, paths: list[str]) -> State:
    policy = Policy.model_validate_json(policy_json)
    part = pc._read(paths, [*pc.FIT_COLUMNS, "comparison_id"], ())
    jsel = sel.filter_judgments(part, _part_flags(flags, part), policy.select)
    state = pc.codes_with_dimensions(pc.canonical(jsel.kept.select(pc.FIT_COLUMNS)))
    state["drops"] = _counts(jsel.dropped_by_reason, "reason")
    return state


def drops_step(flags: Broadcast, policy: Policy) -> Step:
    """Pass 4 (map only: :func:`select` fits on its states)."""
    policy_json = policy.model_dump_json()
    version = f"{VERSION}-{pc._digest((flags.sha256, policy_json))}"
    return Step("select-drops", version, functools.partial(_drops_run, flags, policy_json), _no_reduce)


def _no_reduce(states: list[State]) -> State:  # pragma: no cover - the driver fits on the mapped states
    raise NotImplementedError("select-drops is reduced by pipeline.partition_select.select")


# ---------------------------------------------------------------- pass 5: final pairs, select, cluster counts
def _select_run(prelim_blob: bytes, final_blob: bytes, final_dim_blob: bytes, flags: Broadcast, clusters: Broadcast | None,
                policy_json: str, version_id: str | None, layout: tuple[str, int] | None,
                texts: tuple[tuple[str, str, str], ...], paths: list[str]) -> State:
    policy = Policy.model_validate_json(policy_json)
    cfg = policy.checks.aggregation
    # the partition's pairs as the preliminary consensus decided them: their texts and ids (first-seen order), as the
    # decide step left them in its cache (the judgments are then read without their texts: select and the final
    # aggregation take them from the pairs) -- or aggregated again
    where = {p: (f, sha) for p, f, sha in texts}.get(paths[0])
    if where is not None:
        import pyarrow.parquet as pq

        from pipeline.aggregate import PAIR_TEXT_COLUMNS
        from pipeline.distributed import read_cached_file

        part = pc._read(paths, [n for n in pq.read_schema(paths[0]).names if n not in PAIR_TEXT_COLUMNS], ())
        pair_texts = read_cached_file(*where)
    else:
        part = pc._read(paths, None, ())
        pair_texts = aggregate(part, cfg, params=_params(prelim_blob), fitted=True).texts()
    pair_ids = pair_texts["pair_id"]
    pf = _part_flags(flags, part)
    jsel = sel.filter_judgments(part, pf, policy.select)
    extra: State = {}
    if version_id is not None:
        from pipeline.report import label_counts

        c = pl.col
        jf = pf.filter(c("subject_kind") == "judgment")["subject_id"]
        extra = {
            # each pair's prompt (its first judgment's): the split's leakage and the report's clusters
            "prompts": part.filter(c("pair_id").is_first_distinct()).select("pair_id", "prompt_hash").sort("pair_id"),
            # the pair of each flagged judgment (its flags are kept in that pair's part)
            "flagged_pairs": part.filter(c("comparison_id").is_in(jf.implode())).select(subject_id="comparison_id",
                                                                                         _jp="pair_id"),
            "label_counts": label_counts(part),
        }
    del part
    kept = jsel.kept
    final = aggregate(kept, cfg, texts=pair_texts, params=_params(final_blob), fitted=True,
                      dim_params=pc.params_of(final_dim_blob), dimensions=policy.dimensions)
    del pair_texts
    cl = clusters.read() if clusters is not None else None
    if cl is not None:
        cl = cl.filter(pl.col("pair_id").is_in(pair_ids.implode()))
    psel = sel.select_pairs(final.pairs, pf, policy.select, all_pair_ids=pair_ids, clusters=cl,
                            downweight_share=sel.downweight_shares(kept, jsel.downweighted_annotators), judgments=kept,
                            checks=policy.checks)
    del final, kept, jsel
    narrow: State = {
        "fate": psel.pairs.select("pair_id", "decision", "reason", "near_dup_cluster").sort("pair_id"),
        "routed_ids": psel.routed.select("pair_id", "route").sort("pair_id"),
        "dropped": _counts(psel.dropped_by_reason, "reason"),
        "routed_by": _counts(psel.routed_by_label, "label"),
        "cluster_counts": sp.cluster_counts(psel.dpo),
    }
    if version_id is None or layout is None:
        return {"pairs": psel.pairs, "dpo": psel.dpo, "routed": psel.routed, **extra, **narrow}
    # the rows a version's pair tables hold, keyed and sorted by part (pipeline/partition_write.py); each text table
    # sorted while its unsorted rows are let go (a task holds one copy of the texts at a time, not three)
    # (a version's DPO rows are not kept: the build makes them from its pair rows, part by part, pipeline.select.dpo_of)
    pairs, routed = psel.pairs, psel.routed
    del psel
    pairs = keyed_by_part(pairs.drop("_reasons").with_columns(flag_reasons=pairs["_reasons"], first_version=pl.lit(version_id)),
                   layout)
    return {"pairs": pairs,  # (a version's narrow pair rows are the pairs without texts: written from them)
            "routed": keyed_by_part(routed.drop("_reasons", strict=False), layout), **extra, **narrow}


def select_step(prelim_params: pl.DataFrame, final_params: pl.DataFrame, flags: Broadcast, clusters: Broadcast | None,
                policy: Policy, version_id: str | None = None, layout: tuple[str, int] | None = None,
                texts: dict[str, tuple[str, str]] | None = None, final_dim_params: pl.DataFrame | None = None) -> Step:
    """Pass 5.  ``version_id`` and ``layout`` (this version's generation group and its bucket
    count): the rows in the version's table layout (keyed by ``_part``, sorted by it) and the
    narrow tables a build needs (each pair's prompt, the flagged judgments' pairs, label counts)."""
    pb, fb, policy_json = _params_blob(prelim_params), _params_blob(final_params), policy.model_dump_json()
    fdb = pc.params_blob(final_dim_params)
    where = tuple(sorted((p, f, sha) for p, (f, sha) in (texts or {}).items()))
    # (the texts' files are named by the decide step's key and checked by their sha256: only their digests key this step)
    version = f"{VERSION}-" + pc._digest((hashlib.sha256(pb).hexdigest(), hashlib.sha256(fb).hexdigest(), flags.sha256,
                                         clusters.sha256 if clusters is not None else None, policy_json, version_id,
                                         list(layout) if layout is not None else None, sorted(sha for *_, sha in where),
                                         hashlib.sha256(fdb).hexdigest()))
    return Step("select-pairs", version,
                functools.partial(_select_run, pb, fb, fdb, flags, clusters, policy_json, version_id, layout, where),
                _no_reduce)


# ---------------------------------------------------------------- the driver
@dataclass
class Selection:
    params: pl.DataFrame  # the final annotator parameters, by annotator_id
    fate: pl.DataFrame  # every pair with a row: pair_id, decision, reason, near_dup_cluster, _p (its partition), by pair_id
    routed: pl.DataFrame  # pair_id, route
    splits: pl.DataFrame  # _cl -> split: every kept cluster's (a pair's _cl: its near_dup_cluster, else its id)
    split_sizes: dict[str, int]
    judgments_dropped: dict[str, int]
    dropped_by_reason: dict[str, int]
    routed_by_label: dict[str, int]
    step: Step  # the select step, whose cached states hold each partition's rows (:func:`partition_rows`)
    cache_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    kept_annotators: pl.Series | None = None  # the annotators with a kept judgment (sorted)
    prompts: pl.DataFrame | None = None  # with a version id: pair_id -> prompt_hash (its first judgment's)
    flagged_pairs: pl.DataFrame | None = None  # with a version id: flagged judgment (subject_id) -> its pair (_jp)
    label_counts: pl.DataFrame | None = None  # with a version id: pipeline.report.label_counts of every judgment
    cluster_counts: pl.DataFrame | None = None  # the DPO rows per (_cl, _stratum)


def _sum_counts(states: list[State], table: str, key: str, first: tuple[str, ...] = (),
                last: tuple[str, ...] = ()) -> dict[str, int]:
    """The counts added over the partitions, in the order the one-process dict has them: ``first``
    (every one, also at 0), then the others by name, then ``last`` (when counted)."""
    total: Counter[str] = Counter()
    for s in states:
        total.update(dict(s[table].iter_rows()))
    out = {k: int(total[k]) for k in first}
    out.update({k: int(total[k]) for k in sorted(total) if k not in first and k not in last})
    out.update({k: int(total[k]) for k in last if k in total})
    return out


def select(refs: list[PartitionRef], work: str | Path, policy: Policy, prelim_params: pl.DataFrame,
           flags: pl.DataFrame, clusters: pl.DataFrame | None, *, client: Any = None, version_id: str | None = None,
           layout: tuple[str, int] | None = None, texts: dict[str, tuple[str, str]] | None = None) -> Selection:
    """Rows 4-5 over the partitions ``refs`` (``prelim_params``, ``flags``, ``clusters``: what
    :func:`pipeline.partitioned.analyze` gave; states cached under ``work``).  ``version_id``,
    ``layout``: see :func:`select_step`."""
    import time

    work = Path(work)
    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    shared = work / "broadcast"
    fb = Broadcast.write(flags.sort(flags.columns, nulls_last=True), shared, "flags")
    cb = Broadcast.write(clusters.sort(clusters.columns, nulls_last=True), shared, "clusters") \
        if clusters is not None and clusters.height else None
    states, _ = map_partitions(drops_step(fb, policy), refs, work / "states", client=client)
    judgments_dropped = _sum_counts(states, "drops", "reason")
    # (one EM after the other: the Dawid-Skene EM on a thread beside the order-aware one took 3M's fit 8.1 -> 7.3 s, but
    # at 10M made this fit the build's highest point -- 3,467 MiB sampled, VmHWM 3.59 -> 3.82 GB; docs/scale-out.md,
    # "Session 34")
    final_params = pc.fit(states, policy.checks.aggregation)
    final_dim_params = pc.fit_dimensions(states, policy.checks.aggregation)
    secs["final fit"] = round(time.perf_counter() - t0, 3)
    kept_annotators = pl.concat([s["annotators"]["annotator_id"] for s in states]).unique().sort()
    del states
    step = select_step(prelim_params, final_params, fb, cb, policy, version_id, layout, texts, final_dim_params)
    narrow = (*FATE_TABLES, *(BUILD_TABLES if version_id is not None else ()))
    states, _ = map_partitions(step, refs, work / "states", client=client, keep=narrow)
    Broadcast.forget()  # (the tasks that ran in this process read them)
    secs["select"] = round(time.perf_counter() - t0 - secs["final fit"], 3)
    counts = sp.add_counts([s["cluster_counts"] for s in states])
    sticky = sp.sticky_splits(sp.add_ranks([pl.DataFrame(schema=sp.RANKS_SCHEMA)]), counts.select("_cl").unique())
    splits = sp.assign_clusters(counts, sticky, policy.split).sort("_cl")
    sizes = dict(counts.join(splits, on="_cl").group_by("split").agg(pl.col("n").sum()).iter_rows())
    def union(name: str) -> pl.DataFrame | None:
        return pl.concat([s[name] for s in states]) if version_id is not None else None

    return Selection(
        params=final_params,
        kept_annotators=kept_annotators,
        prompts=union("prompts"),
        flagged_pairs=union("flagged_pairs"),
        label_counts=_add_label_counts([s["label_counts"] for s in states]) if version_id is not None else None,
        cluster_counts=counts,
        # (_p: the partition that holds the pair's rows -- where a build reads a few pairs' texts)
        fate=pl.concat([s["fate"].with_columns(_p=pl.lit(r.index, pl.Int32)) for r, s in zip(refs, states, strict=True)])
        .sort("pair_id"),
        routed=pl.concat([s["routed_ids"] for s in states]).sort("pair_id"),
        splits=splits,
        split_sizes={s: int(sizes.get(s, 0)) for s in sp.SPLITS},
        judgments_dropped=judgments_dropped,
        dropped_by_reason=_sum_counts(states, "dropped", "reason", last=("all_judgments_dropped",)),
        routed_by_label=_sum_counts(states, "routed_by", "label", first=tuple(ROUTED_LABELS)),
        step=step, cache_dir=work / "states", seconds=secs)


def _add_label_counts(parts: list[pl.DataFrame]) -> pl.DataFrame:
    from pipeline.report import _SLICE

    return pl.concat(parts).group_by(_SLICE).agg(pl.col("n").sum()).sort(_SLICE, nulls_last=False)


def partition_rows(selection: Selection, ref: PartitionRef, table: str) -> pl.DataFrame:
    """One partition's ``pairs``, ``dpo`` or ``routed`` rows (with texts), from its cached state."""
    return cached_table(selection.step, ref, selection.cache_dir, table)


def dpo_rows(selection: Selection, ref: PartitionRef) -> pl.DataFrame:
    """One partition's DPO rows with their ``split``."""
    dpo = partition_rows(selection, ref, "dpo")
    return dpo.with_columns(_cl=sp._cluster_expr()).join(selection.splits, on="_cl", how="left",
                                                          maintain_order="left").drop("_cl")
