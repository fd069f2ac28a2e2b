"""The checks: one module each, declared once (``CHECK = CheckSpec(...)``, :mod:`pipeline.checks.spec`).

``CHECKS`` below is the registry: the run order, and the one list from which the reason
codes, their default policy actions, select's order of precedence and the policy docs are
derived.  A check never drops rows; it flags them with reason codes and only select decides.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

import polars as pl

from pipeline.checks import (
    agreement,
    consensus,
    dimensions,
    duplicates,
    language,
    length_bias,
    near_duplicates,
    pair_id_conflict,
    position_bias,
    registry,
    reliability,
    reviews,
    routing,
)
from pipeline.checks.spec import CheckSpec, Reason
from schemas.check import CheckResult
from schemas.policy import ChecksConfig, Policy, PolicyError, SelectConfig

# the registry: adding a check is its module + one line here
CHECKS: tuple[CheckSpec, ...] = (
    duplicates.CHECK,
    pair_id_conflict.CHECK,
    registry.CHECK,
    reviews.CHECK,
    near_duplicates.CHECK,
    language.CHECK,
    agreement.CHECK,
    reliability.CHECK,
    position_bias.CHECK,
    length_bias.CHECK,
    routing.CHECK,
    consensus.CHECK,
    dimensions.CHECK,
)


def _reasons() -> dict[str, Reason]:
    out: dict[str, Reason] = {}
    for check in CHECKS:
        for r in check.reasons:
            if r.code in out:
                raise ValueError(f"reason {r.code!r} is declared twice (checks {check.name} and another)")
            out[r.code] = r
    for check in CHECKS:
        missing = [c for c in check.emits if c not in out]
        if missing:
            raise ValueError(f"check {check.name} emits undeclared reason(s) {missing}")
    return out


REASONS: dict[str, Reason] = _reasons()
# module name -> reason codes it can emit (report grouping, docs)
CHECK_MODULES: dict[str, tuple[str, ...]] = {c.name: c.codes for c in CHECKS}


def default_flag_actions() -> dict[str, str]:
    return {code: r.default_action for code, r in sorted(REASONS.items())}


def flag_actions(cfg: SelectConfig) -> dict[str, str]:
    """The effective action of every reason: the declared defaults, overridden by the policy."""
    return {**default_flag_actions(), **cfg.flag_actions}


def pair_reasons() -> list[Reason]:
    """Pair-level reasons in select's order of precedence."""
    return sorted((r for r in REASONS.values() if r.subject == "pair"), key=lambda r: (r.precedence, r.code))


def resolve_policy(policy: Policy) -> Policy:
    """The policy with every declared reason's action filled in (the declared default where the
    policy says nothing); raises :class:`PolicyError` for an unknown reason or an action the
    reason does not allow.  Idempotent: curate and certify resolve once per run and record the
    resolved policy (so its hash names every action in effect)."""
    given = policy.select.flag_actions
    unknown = sorted(set(given) - set(REASONS))
    if unknown:
        raise PolicyError(f"select.flag_actions: unknown reason(s) {unknown}; declared reasons: {sorted(REASONS)}")
    for code, action in given.items():
        allowed = REASONS[code].actions
        if action not in allowed:
            raise PolicyError(f"select.flag_actions.{code}: expected one of {list(allowed)}, found {action!r} "
                              f"({REASONS[code].doc})")
    full = flag_actions(policy.select)
    if full == given:
        return policy
    return policy.model_copy(update={"select": policy.select.model_copy(update={"flag_actions": full})})


def reasons_table() -> str:
    """The Markdown table of every reason (the generated block of docs/policy.md)."""
    lines = ["| reason | subject | check | default action | allowed actions | meaning |", "|---|---|---|---|---|---|"]
    owner = {r.code: c.name for c in CHECKS for r in c.reasons}
    for code, r in sorted(REASONS.items(), key=lambda kv: (kv[1].subject, kv[0])):
        lines.append(f"| `{code}` | {r.subject} | {owner[code]} | {r.default_action} | {', '.join(r.actions)} | {r.doc} |")
    return "\n".join(lines)


def run_checks(
    judgments: pl.DataFrame,
    cfg: ChecksConfig,
    *,
    pairs: pl.DataFrame,
    extra_kwargs: dict[str, dict[str, Any]] | None = None,
    on_check: Callable[[str, float], None] | None = None,
    given: dict[str, CheckResult] | None = None,
) -> dict[str, CheckResult]:
    """Run every registered check in order; returns results by name (timings via ``on_check``).
    Each check gets the inputs it declares: ``pairs`` and any of ``extra_kwargs[name]``.
    ``given``: results computed another way (a child's merged pair-scoped checks), not run again."""
    results: dict[str, CheckResult] = {}
    for check in CHECKS:
        if given and check.name in given:
            results[check.name] = given[check.name]
            continue
        t0 = time.perf_counter()
        inputs = {"pairs": pairs if check.pair_columns is None else pairs.select(check.pair_columns),
                  **(extra_kwargs or {}).get(check.name, {})}
        kwargs = {k: v for k, v in inputs.items() if k in check.inputs}
        results[check.name] = check.run(judgments, cfg, **kwargs)
        if on_check:
            on_check(check.name, time.perf_counter() - t0)
    return results


def pair_columns() -> tuple[str, ...] | None:
    """The columns of the preliminary pairs the checks read (None: some check reads any)."""
    out: dict[str, None] = {}
    for check in CHECKS:
        if "pairs" in check.inputs:
            if check.pair_columns is None:
                return None
            out.update(dict.fromkeys(check.pair_columns))
    return tuple(out)


def judgment_columns(skip: Collection[str] = ()) -> tuple[str, ...] | None:
    """The judgment columns the checks not in ``skip`` read (None: some check reads any)."""
    out: dict[str, None] = {}
    for check in CHECKS:
        if check.name not in skip:
            if check.judgment_columns is None:
                return None
            out.update(dict.fromkeys(check.judgment_columns))
    return tuple(out)


def all_flags(results: dict[str, CheckResult]) -> pl.DataFrame:
    """Every check's flags, in registry order, each check's sorted by subject (the same rows give
    the same bytes however they were computed: a full run or a child's merge)."""
    from schemas.check import empty_flags

    order = ["subject_kind", "subject_id", "reason", "detail"]
    frames = [r.flags.sort(order) for r in results.values() if r.flags.height]
    return pl.concat(frames) if frames else empty_flags()


__all__ = ["CHECKS", "CHECK_MODULES", "REASONS", "CheckSpec", "Reason", "all_flags", "default_flag_actions",
           "flag_actions", "judgment_columns", "pair_columns", "pair_reasons", "reasons_table", "resolve_policy", "run_checks"]
