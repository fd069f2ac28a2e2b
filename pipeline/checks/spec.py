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
from typing import Any, Literal

import polars as pl

from schemas.check import CheckResult

SubjectKind = Literal["judgment", "pair", "annotator", "slice"]
Action = Literal["drop", "downweight", "warn"]
ALL_ACTIONS: tuple[Action, ...] = ("drop", "downweight", "warn")


@dataclass(frozen=True)
class Reason:
    """One reason code of ``flags.parquet``.

    ``precedence`` orders pair-level drops in select (smaller first: a pair dropped for two
    reasons is counted under the first); select's own reasons sit at 10 (identical
    responses) ... 110 (below min strength), see ``pipeline/select.py``.

    ``holds``: for a pair reason found on the preliminary consensus (every judgment), the rule
    again as an expression over the *final* pairs (``PairRecord`` columns, after select's
    judgment drops), given the policy's ``ChecksConfig``; select acts on the flag only where it
    still holds (a re-delivered copy or a dropped annotator's vote made the finding, not the
    judgments that decide the pair).  The flag itself stays in ``flags.parquet``."""

    code: str
    subject: SubjectKind
    default_action: Action
    doc: str
    actions: tuple[Action, ...] = ALL_ACTIONS
    precedence: int = 75
    holds: Callable[[Any], pl.Expr] | None = None

    def __post_init__(self) -> None:
        if self.default_action not in self.actions:
            raise ValueError(f"reason {self.code}: default action {self.default_action!r} not in {self.actions}")


@dataclass(frozen=True)
class Child:
    """What a child's update of a check's state gets (:func:`pipeline.incremental.merged_sums`)."""

    state: pl.DataFrame  # the parent's state
    params: pl.DataFrame | None  # the fixed parameters the parent counted with (``Sums.params``)
    old: pl.DataFrame  # the judgments of the pairs the batch touches, as the parent had them
    new: pl.DataFrame  # their judgments now
    cfg: Any  # the policy's ChecksConfig
    inputs: dict[str, Any]  # the check's other inputs (e.g. ``ds_accuracy``)
    # (old, new) judgments of the touched pairs and of every pair these annotators judged
    pairs_of: Callable[[pl.Series], tuple[pl.DataFrame, pl.DataFrame]]


@dataclass(frozen=True)
class Sums:
    """A check's state as counts that add over disjoint sets of pairs.

    ``count(judgments)`` returns the state of a frame that holds every judgment of each pair it
    has (in their order): rows keyed by ``keys``, every other column a count, no all-zero row,
    sorted by the keys.  Because a pair's rows depend on its own judgments only, a child's state
    is its parent's minus the touched pairs' rows as the parent counted them plus theirs now
    (:meth:`merge`), exactly the state of a count over every judgment.  The check's ``run`` takes
    the state as its ``sums`` input and computes its figures from it alone (the pairs table may
    still give per-pair flags)."""

    count: Callable[..., pl.DataFrame]
    keys: tuple[str, ...]
    # bump when what a count means changes: a child merges only into a parent's state of the same format
    format: str = "1"
    # a state counted with fixed parameters (a fit over every judgment, kept by the version as
    # ``state/<check>_params``; the check's result table ``sums_params``): a child counts with the
    # parent's (a rule, docs/incremental.md), so its old rows subtract exactly
    params: bool = False
    # a check whose state needs more than parent - old + new (its own rule): ``update(spec, child)``
    update: Callable[[Sums, Child], tuple[pl.DataFrame, pl.DataFrame | None]] | None = None

    def advance(self, child: Child) -> tuple[pl.DataFrame, pl.DataFrame | None]:
        """A child's state (and the parameters it was counted with)."""
        if self.update is not None:
            return self.update(self, child)
        return self.merge(child.state, self.count(child.old), self.count(child.new)), None

    def merge(self, parent: pl.DataFrame, old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
        """``parent`` - ``old`` + ``new``; raises when a count would go negative (``old`` was not
        counted into ``parent``: the state does not belong to these judgments)."""
        values = [c for c in parent.columns if c not in self.keys]
        out = self.add([parent, old.cast(parent.schema).with_columns(-pl.col(values)), new])  # type: ignore[arg-type]
        if out.height and bool(out.select(pl.any_horizontal(pl.col(values) < 0).any()).item()):
            raise ValueError("a check's state: the parent's counts are smaller than the rows taken out of them "
                             "(the state does not belong to these judgments)")
        return out

    def add(self, states: list[pl.DataFrame]) -> pl.DataFrame:
        """The state of the union of disjoint sets of pairs from each set's (a partition's): their
        counts added by key, all-zero rows left out, sorted by the keys (integers: exact in any order)."""
        first = states[0]
        values = [c for c in first.columns if c not in self.keys]
        both = pl.concat([first, *(s.cast(first.schema) for s in states[1:])])  # type: ignore[arg-type]
        out = both.group_by(*self.keys).agg(pl.col(values).sum()) \
            .filter(pl.any_horizontal(pl.col(values) != 0)).sort(*self.keys)
        return out.select(first.columns)


@dataclass(frozen=True)
class CheckSpec:
    """A check: ``run(judgments, checks_cfg, **inputs) -> CheckResult`` plus what it declares.

    ``inputs`` names the keyword arguments the runner passes besides the judgments and the
    config: ``pairs`` (the preliminary aggregation) and, for checks that keep an index across
    versions, ``index_path`` (the parent's persisted state).  ``emits`` lists reasons declared
    by another check that this one may also emit.  ``pair_columns``: the columns of ``pairs`` it
    reads (None: any; the runner passes it those only, and a child reads those of its parent's
    rows of every pair, :func:`pipeline.checks.pair_columns`).  ``judgment_columns``: the judgment
    columns ``run`` reads when it counts every judgment itself (None: any; a child whose union
    holds some columns for some rows only completes every row before such a check runs)."""

    name: str
    run: Callable[..., CheckResult]
    reasons: tuple[Reason, ...] = ()
    emits: tuple[str, ...] = ()
    config: str | None = None  # the ChecksConfig section it reads, for the docs
    inputs: tuple[str, ...] = ("pairs",)
    pair_columns: tuple[str, ...] | None = None
    judgment_columns: tuple[str, ...] | None = None
    doc: str = ""
    sums: Sums | None = None  # the check's mergeable state, when its figures are computed from one
    codes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "codes", tuple(r.code for r in self.reasons) + tuple(self.emits))


__all__ = ["ALL_ACTIONS", "Action", "CheckSpec", "Child", "Reason", "SubjectKind", "Sums"]
