"""The checks' declared states counted per partition and added (issue 15, step 2 of
docs/scale-out.md "Next").

Every check that declares a mergeable state (:class:`pipeline.checks.spec.Sums`: agreement,
position bias, length bias, reliability) counts it as integers that add over disjoint sets of
pairs -- which is what a partition is (a pair's judgments are all in one).  So each partition
counts its state (:func:`sums_step`, a :class:`pipeline.distributed.Step`), the reduce adds the
states by key (:meth:`Sums.add`: exact in any order), and the check's ``run`` computes its figures
from the total on the driver, as a child does from its merged state: the same result as counting
every judgment at once (tested, every check, every figure).

What a count needs from outside its partition is computed first and broadcast:

* reliability counts with its parameters (:func:`pipeline.checks.reliability.fit_params`: the
  consensus accuracy and each annotator's independence), fitted on the driver over every
  judgment's codes (:func:`pipeline.partition_consensus.assemble`, canonical layout: the same
  parameters as the one-process fit, bit for bit);
* length bias leaves the annotators its pass 1 finds biased out of pass 2's reference: pass 1's
  sums do not depend on that set, so the step counts with the set empty; when the total's pass 1
  excludes somebody, pass 2 is counted again with that set (a second map over the partitions).
"""
from __future__ import annotations

import functools
import hashlib
import io
from typing import Any

import polars as pl

from pipeline.aggregate import encode
from pipeline.checks import length_bias, reliability
from pipeline.checks.spec import Sums
from pipeline.distributed import State, Step, map_partitions
from pipeline.incremental import declared_sums
from pipeline.partition import read_partition
from schemas.policy import ChecksConfig

VERSION = "1"


def _frame_bytes(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.write_ipc_stream(buf, compat_level=pl.CompatLevel.oldest())
    return buf.getvalue()


def _frame(blob: bytes) -> pl.DataFrame:
    return pl.read_ipc_stream(io.BytesIO(blob))


def _count(name: str, part: pl.DataFrame, cfg: ChecksConfig, given: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """One check's state of a partition, counted as its ``run`` counts it over every judgment."""
    e = encode(part)
    if name == "reliability":
        return reliability.count_sums(part, given["reliability_params"], encoded=e)
    if name == "length_bias":
        return length_bias.count_sums(part, cfg, given["length_bias_excluded"]["annotator_id"], encoded=e)
    return declared_sums()[name].count(part, encoded=e)


def _sums_run(names: tuple[str, ...], cfg_json: str, given_ipc: tuple[tuple[str, bytes], ...], drop: tuple[str, ...],
              paths: list[str]) -> State:
    part = read_partition(paths)
    if drop:
        part = part.filter(~pl.col("pair_id").is_in(pl.Series(drop, dtype=pl.String).implode()))
    cfg = ChecksConfig.model_validate_json(cfg_json)
    given = {k: _frame(b) for k, b in given_ipc}
    return {name: _count(name, part, cfg, given) for name in names}


def sums_step(names: tuple[str, ...], cfg: ChecksConfig, given: dict[str, pl.DataFrame],
              drop: tuple[str, ...] = ()) -> Step:
    """Count the states of the checks ``names`` in each partition; the reduce adds them per check.
    ``given``: what the counts read besides the partition (``reliability_params``,
    ``length_bias_excluded``); ``drop``: pair ids left out."""
    given_ipc = tuple((k, _frame_bytes(v)) for k, v in sorted(given.items()))
    drop = tuple(sorted(set(drop)))
    cfg_json = cfg.model_dump_json()
    key = hashlib.sha256(repr((names, cfg_json, [(k, hashlib.sha256(b).hexdigest()) for k, b in given_ipc], drop))
                         .encode()).hexdigest()[:16]
    specs = {n: declared_sums()[n] for n in names}
    return Step("check-sums", f"{VERSION}-{key}", functools.partial(_sums_run, tuple(names), cfg_json, given_ipc, drop),
                functools.partial(_add, specs))


def _add(specs: dict[str, Sums], states: list[State]) -> State:
    return {name: spec.add([s[name] for s in states]) for name, spec in specs.items()}


def check_sums(refs: list[Any], cache_dir: Any, cfg: ChecksConfig, reliability_params: pl.DataFrame, *,
               drop: tuple[str, ...] = (), client: Any = None) -> State:
    """Every declared state over the partitions ``refs``: one map for all checks (length bias's pass
    2 with nobody excluded), and a second one for length bias when its total's pass 1 excludes
    some annotators.  ``reliability_params``: :func:`pipeline.checks.reliability.fit_params` of
    every judgment (fitted on the driver from the assembled codes)."""
    names = tuple(sorted(declared_sums()))
    none = pl.DataFrame({"annotator_id": []}, schema={"annotator_id": pl.String})
    given = {"reliability_params": reliability_params, "length_bias_excluded": none}
    states, _ = map_partitions(sums_step(names, cfg, given, drop), refs, cache_dir, client=client)
    total = _add({n: declared_sums()[n] for n in names}, states)
    excluded = length_bias.excluded_ids(total["length_bias"], cfg)
    if excluded.len():
        again, _ = map_partitions(sums_step(("length_bias",), cfg, {**given, "length_bias_excluded": excluded.to_frame()},
                                            drop), refs, cache_dir, client=client)
        total["length_bias"] = declared_sums()["length_bias"].add([s["length_bias"] for s in again])
    return total
