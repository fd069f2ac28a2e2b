"""A first version's checks over partitions: the bricks of issue 15 composed (docs/scale-out.md,
"The flow the bricks add up to", rows 1-3), driver and maps as they will run inside ``curate``.

:func:`analyze` runs, over a partition set, the preliminary consensus (codes -> one fit -> pairs
decided per partition), the pair-scoped checks, the near-duplicate check (signatures per
partition) and the checks with declared states (counted per partition, added) -- the results
``run_checks`` gives over the whole frame for the same checks, and the preliminary pairs and
annotator parameters (tested equal); then the checks that read only the pairs (routing with the
judgments per label, consensus; dimensions: the per-dimension consensus rows the decide step
gives, each dimension's agreement and biases counted per partition).  The driver holds the states, the codes while it fits and the
signatures while it indexes, never a judgment's text.

Not composed here: the registry check (:func:`pipeline.partition_checks.registry_check`, run by
the build) and the reviews check (it needs its context; nothing to do without reviews), judgment drops, the final consensus, select, split and the
version's parts.  Refused with the reason: a given pair id whose contents span partitions (the
preliminary consensus needs its judgments on one worker: a build puts them in one first,
:func:`pipeline.partitioned_build._together`) and judgments with dimension verdicts.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline import partition_checks as pk
from pipeline import partition_consensus as pc
from pipeline.aggregate import annotator_params
from schemas.records import LABELS
from pipeline.checks import agreement, consensus, dimensions, length_bias, position_bias, reliability, routing
from pipeline.distributed import PartitionRef, cached_file, map_partitions
from pipeline.incremental import Totals
from pipeline.parts import first_layout
from schemas.check import CheckResult
from schemas.arrow import empty_frame
from schemas.records import Judgment
from schemas.policy import ChecksConfig, DimensionsConfig

__all__ = ["Analysis", "analyze"]


@dataclass
class Analysis:
    params: pl.DataFrame  # the preliminary consensus's annotator parameters, by annotator_id
    pairs: pl.DataFrame  # the preliminary pairs (no texts), by pair_id
    results: dict[str, CheckResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    lengths: pl.DataFrame | None = None  # pair_id, len_a, len_b (by pair_id)
    seen: pl.DataFrame | None = None  # pair_id, a_hash, source_file, source_line of its first judgment (by pair_id; see prelim)
    near_dup_state: Any = None  # with ``version_id``: the near-duplicate IncrementalResult (writes the state tables)
    n_judgments: int = 0
    texts: dict[str, tuple[str, str]] = field(default_factory=dict)  # partition's first file -> its pairs' texts (cached file, sha256)
    # with ``version_id``: the state rows left in the partitions' caches, keyed by the version's parts (the language
    # check's), by check; and that layout (:func:`pipeline.parts.first_layout`)
    cached: dict[str, pk.CachedRows] = field(default_factory=dict)
    layout: tuple[str, int] | None = None
    # with ``version_id``: the preliminary pairs' state rows (``_o``: each pair's place in the input, in place of
    # ``seen``) left in the partitions' caches, and every pair's ``_o``, sorted (``pairs`` then has the columns the
    # checks read; ``seen`` is None)
    prelim: pk.CachedRows | None = None
    first_seen: np.ndarray | None = None


def analyze(refs: list[PartitionRef], work: str | Path, cfg: ChecksConfig, sources: list[str], *,
            client: Any = None, version_id: str | None = None,
            near_dup_sink: Callable[[Any], None] | None = None,
            dimension_rule: DimensionsConfig | None = None) -> Analysis:
    """The checks above over the partitions ``refs`` (``sources``: the input files in order, as the
    partition ledger lists them); states are cached under ``work``.  ``version_id``: the near
    duplicates through the state tables a version keeps (:func:`pipeline.partition_checks.near_duplicates_state`),
    and the language check's rows left in the partitions' caches keyed by that first version's parts
    (``Analysis.cached``: the build merges them into its table; the result's table is empty).
    ``near_dup_sink``: given that state as soon as it exists (a build writes its tables then), and
    then let go of (``Analysis.near_dup_state`` is None).

    The near duplicates run first: their index is the driver's largest statistic, and before the
    consensus the driver holds nothing else (at 3M judgments the build's peak was the index on top
    of the decided pairs)."""
    import time

    work = Path(work)
    secs: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        secs[name] = round(now - t, 3)
        t = now

    near_state = None
    if version_id is None:
        results = {"near_duplicates": pk.near_duplicates(refs, work / "states", cfg, client=client)}
    else:
        entry, near_state = pk.near_duplicates_state(refs, work / "states", cfg, version_id, client=client)
        results = {"near_duplicates": entry}
        if near_dup_sink is not None:
            near_dup_sink(near_state)
            near_state = None
    lap("near duplicates")
    # the preliminary consensus: codes -> one fit on the driver -> every partition's pairs
    states, _ = map_partitions(pc.codes_step(cfg.aggregation), refs, work / "states", client=client)
    dim_params = pc.fit_dimensions(states, cfg.aggregation)
    e = pc.assemble(states)  # the votes (refuses a pair id in several partitions)
    # every judgment (a re-delivered copy is one too: the routing check's labels and the totals count it)
    raw = pl.concat([s["codes"].select("raw_label") for s in states])["raw_label"].to_numpy()
    del states
    n_judgments, n_pairs = len(raw), e.n_pairs
    label_counts = {lab: int(k) for lab, k in zip(LABELS, np.bincount(raw[raw >= 0], minlength=len(LABELS)),
                                                  strict=True) if k}
    del raw
    params = annotator_params(e, cfg.aggregation).sort("annotator_id")
    rel_params = reliability.fit_params(None, params.select("annotator_id", "ds_accuracy"), cfg.aggregation, encoded=e,
                                        laid_out=True)
    del e
    lap("consensus fit")
    layout = None if version_id is None else first_layout(version_id, n_pairs)
    prelim = None if layout is None or version_id is None else \
        pc.Prelim(version_id=version_id, group=layout[0], buckets=layout[1], sources=sources)
    step = pc.decide_step(params, cfg.aggregation, dim_params=dim_params, dimensions=dimension_rule, prelim=prelim)
    decided = pc._concat_pairs(map_partitions(step, refs, work / "states", client=client, keep=pc.DECIDED)[0])
    long = decided.get("dimensions")
    texts = {r.paths[0]: cached_file(step, r, work / "states", "texts") for r in refs}
    pairs, lengths, seen = decided["pairs"], decided["lengths"], decided.get("seen")
    prelim_rows = None if prelim is None else pk.CachedRows(step, sorted(refs, key=lambda r: r.index), work / "states",
                                                            pc.PRELIM, pl.DataFrame())
    first_seen = decided["first_seen"]["_o"].to_numpy() if "first_seen" in decided else None
    del decided
    lap("consensus pairs")
    cached: dict[str, pk.CachedRows] | None = None if version_id is None else {}
    results.update(pk.pair_scoped(refs, work / "states", cfg, Totals(judgments=n_judgments, pairs=n_pairs), sources,
                                  client=client, layout=layout, cached=cached))
    lap("pair-scoped checks")
    sums = pk.check_sums(refs, work / "states", cfg, rel_params, client=client)
    none = pl.DataFrame(schema={"pair_id": pl.String})  # (with its state a check reads no judgment)
    results["agreement"] = agreement.run(none, cfg, pairs=pairs, sums=sums["agreement"])
    results["reliability"] = reliability.run(none, cfg, ds_accuracy=params.select("annotator_id", "ds_accuracy"),
                                             sums=sums["reliability"], sums_params=rel_params)
    results["position_bias"] = position_bias.run(none, cfg, sums=sums["position_bias"])
    results["length_bias"] = length_bias.run(none, cfg, pairs=pairs, lengths=lengths, sums=sums["length_bias"])
    lap("checks with states")
    # the checks over the pairs alone (and the judgments per label)
    results["routing"] = routing.run(none, cfg, pairs=pairs, label_counts=label_counts)
    results["consensus"] = consensus.run(none, cfg, pairs=pairs)
    if long is None:  # (no dimension verdicts: nothing to count)
        results["dimensions"] = dimensions.run(empty_frame(Judgment), cfg, pairs=pairs)
    else:  # each dimension's agreement and biases counted per partition on its verdicts, added
        dim_sums = {n: pk.check_sums(refs, work / "states", cfg, None, client=client, dimension=n)
                    for n in sorted(long["name"].unique().to_list())}
        results["dimensions"] = dimensions.run(empty_frame(Judgment), cfg, pairs=pairs, lengths=lengths, long=long,
                                               sums=dim_sums)
    lap("checks over pairs")
    return Analysis(params, pairs, results, secs, lengths=lengths, seen=seen, near_dup_state=near_state,
                    n_judgments=n_judgments, texts=texts, cached=cached or {}, layout=layout, prelim=prelim_rows,
                    first_seen=first_seen)
