"""How a check is declared: once, in its own module, as ``CHECK = CheckSpec(...)``.

A declaration names the check, the reason codes it emits (each with its subject kind, its
default policy action, the actions a policy may choose, and for pair reasons its place in
select's order of precedence), the policy section it reads, and its ``run`` function.
Everything else is derived from the registry (``pipeline/checks/__init__.py``): the reason
codes the policy accepts, the default ``select.flag_actions``, the order in which select
applies pair-level drops, the run order, and the reasons table of ``docs/policy.md``
(``prefpipe policy reasons``; a test keeps the two equal).

Adding a check = one module with ``run`` and ``CHECK`` + one line in the registry
(``docs/checks-howto.md``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from schemas.check import CheckResult

SubjectKind = Literal["judgment", "pair", "annotator", "slice"]
Action = Literal["drop", "downweight", "warn"]
ALL_ACTIONS: tuple[Action, ...] = ("drop", "downweight", "warn")


@dataclass(frozen=True)
class Reason:
    """One reason code of ``flags.parquet``.

    ``precedence`` orders pair-level drops in select (smaller first: a pair dropped for two
    reasons is counted under the first); select's own reasons sit at 10 (identical
    responses) ... 110 (below min strength), see ``pipeline/select.py``."""

    code: str
    subject: SubjectKind
    default_action: Action
    doc: str
    actions: tuple[Action, ...] = ALL_ACTIONS
    precedence: int = 75

    def __post_init__(self) -> None:
        if self.default_action not in self.actions:
            raise ValueError(f"reason {self.code}: default action {self.default_action!r} not in {self.actions}")


@dataclass(frozen=True)
class CheckSpec:
    """A check: ``run(judgments, checks_cfg, **inputs) -> CheckResult`` plus what it declares.

    ``inputs`` names the keyword arguments the runner passes besides the judgments and the
    config: ``pairs`` (the preliminary aggregation) and, for checks that keep an index across
    versions, ``index_path`` (the parent's persisted state).  ``emits`` lists reasons declared
    by another check that this one may also emit."""

    name: str
    run: Callable[..., CheckResult]
    reasons: tuple[Reason, ...] = ()
    emits: tuple[str, ...] = ()
    config: str | None = None  # the ChecksConfig section it reads, for the docs
    inputs: tuple[str, ...] = ("pairs",)
    doc: str = ""
    codes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "codes", tuple(r.code for r in self.reasons) + tuple(self.emits))


__all__ = ["ALL_ACTIONS", "Action", "CheckSpec", "Reason", "SubjectKind"]
