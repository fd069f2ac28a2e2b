"""The checks: each module has ``run(frame, cfg, ...) -> CheckResult`` and never drops rows.

:func:`run_checks` runs them all in a fixed order with one calling convention
(``run(judgments, checks_cfg, pairs=preliminary_pairs)``), except the near-duplicates check,
which also takes the persisted prompt index of the parent version.
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

import polars as pl

from schemas.check import CheckResult
from schemas.policy import ChecksConfig

# module name -> reason codes it can emit (documentation + report grouping)
CHECK_MODULES: dict[str, tuple[str, ...]] = {
    "duplicates": ("exact_duplicate", "identical_responses"),
    "pair_id_conflict": ("pair_id_conflict",),
    "near_duplicates": ("near_duplicate",),
    "language": ("language_mismatch",),
    "agreement": ("low_agreement",),
    "reliability": ("low_reliability",),
    "position_bias": ("position_bias", "order_inconsistent"),
    "length_bias": ("length_bias",),
    "routing": ("label_imbalance", "too_easy", "ambiguous"),
    "consensus": ("ambiguous",),
}


def check_module(name: str):
    return importlib.import_module(f"pipeline.checks.{name}")


def run_checks(
    judgments: pl.DataFrame,
    cfg: ChecksConfig,
    *,
    pairs: pl.DataFrame,
    extra_kwargs: dict[str, dict[str, Any]] | None = None,
    on_check: Callable[[str, float], None] | None = None,
) -> dict[str, CheckResult]:
    """Run every check; returns results by module name (timings via ``on_check``)."""
    results: dict[str, CheckResult] = {}
    for name in CHECK_MODULES:
        mod = check_module(name)
        t0 = time.perf_counter()
        kwargs = {"pairs": pairs, **(extra_kwargs or {}).get(name, {})}
        results[name] = mod.run(judgments, cfg, **kwargs)
        if on_check:
            on_check(name, time.perf_counter() - t0)
    return results


def all_flags(results: dict[str, CheckResult]) -> pl.DataFrame:
    from schemas.check import empty_flags

    frames = [r.flags for r in results.values() if r.flags.height]
    return pl.concat(frames) if frames else empty_flags()
