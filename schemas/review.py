"""Review tasks and the judgments that come back from them (``../shared/spec/raw-comparisons.md``,
"Reviews of routed pairs"; ``../shared/spec/outputs.md``, ``review export`` / ``review import``).

A :class:`ReviewTask` is one routed pair sent to a person, with the display order it is shown in
(``shown_first``: the stable side ``a`` or ``b`` shown first / left) and content hashes of the
texts, so that an import can tell whether the texts that come back are the pair's.  A
:class:`ReviewAnswer` is what one reviewer said about one task, in display terms (``first`` /
``second``); :meth:`ReviewAnswer.label` maps it back to the stable names through the task's
``shown_first``.  A :class:`ReviewJudgment` is the canonical raw judgment written by
``review import`` (a :class:`~schemas.records.RawJudgment` plus ``review_of``).
"""
from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from schemas.ids import is_safe_id
from schemas.records import AnnotatorKind, Message, RawJudgment, Side, Unit
from schemas.text import content_hash, normalize_text

#: routing reasons a task may carry (select routes tie / both_bad / escalate today; low agreement
#: and ambiguity are accepted so that a policy that routes them instead of dropping them can export)
ROUTE_REASONS: tuple[str, ...] = ("tie", "both_bad", "escalate", "low_agreement", "ambiguous")
REVIEW_FORMATS: tuple[str, ...] = ("jsonl", "label-studio", "argilla")
DIMENSION_NAME = re.compile(r"[a-z][a-z0-9_]*")
#: a dimension name may not shadow one of the tool controls every task has
RESERVED_DIMENSIONS = frozenset({"overall", "overall_other", "critique", "prompt", "response_1", "response_2"})

Display = Literal["first", "second", "tie", "both_bad", "escalate"]
DimensionDisplay = Literal["first", "second", "tie", "both_bad"]
SKIP_REASONS: tuple[str, ...] = (
    "unanswered",  # a task nobody answered
    "cancelled",  # Label Studio: the annotator skipped the task (was_cancelled)
    "draft",  # saved but never submitted (Label Studio drafts, Argilla status "draft")
    "discarded",  # Argilla status "discarded"
    "status_missing",  # Argilla records exported without response statuses: a draft cannot be told from a submission
    "no_verdict",  # answered, but without an overall verdict (e.g. only a critique)
    "conflicting_verdict",  # a side picked and also tie / both bad / escalate
)

SafeId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


def text_hash(text: str) -> str:
    """Hash of a text as shown to a reviewer (normalised, so a tool's trailing newline does not count)."""
    return content_hash(normalize_text(text))


def dimension_name(name: str) -> str:
    """``name`` if it is a valid rubric dimension (``[a-z][a-z0-9_]*``, not a reserved control name)."""
    if not DIMENSION_NAME.fullmatch(name) or len(name) > 64:
        raise ValueError(f"dimension {name!r} is not allowed: use [a-z][a-z0-9_]* (at most 64 characters)")
    if name in RESERVED_DIMENSIONS:
        raise ValueError(f"dimension {name!r} is reserved (it names a control every task has: "
                         f"{', '.join(sorted(RESERVED_DIMENSIONS))})")
    return name


class ReviewTask(BaseModel):
    """One routed pair as a review task.  ``response_a`` / ``response_b`` are the stable names;
    the tool shows ``first`` then ``second`` (left, right)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: SafeId
    version_id: SafeId
    pair_id: str = Field(min_length=1)
    route: str
    shown_first: Side
    prompt: list[Message] = Field(min_length=1)
    prompt_text: str
    response_a: str
    response_b: str
    model_a: str | None = None
    model_b: str | None = None
    locale: str | None = None
    rubric: str | None = None  # the pair's (the first its judgments give): what a reviewer must be qualified for
    tags: list[str] = Field(default_factory=list)

    @field_validator("task_id", "version_id")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not is_safe_id(v):
            raise ValueError(f"{v!r} is not a safe id ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}, no '..')")
        return v

    @property
    def first(self) -> str:
        return self.response_a if self.shown_first == "a" else self.response_b

    @property
    def second(self) -> str:
        return self.response_b if self.shown_first == "a" else self.response_a

    def hashes(self) -> dict[str, str]:
        """Content hashes of the texts in display terms, recorded in every exported task."""
        return {"prompt_hash": text_hash(self.prompt_text), "response_1_hash": text_hash(self.first),
                "response_2_hash": text_hash(self.second)}

    def side(self, display: str) -> str:
        """``first`` / ``second`` -> the stable side shown there; other verdicts unchanged."""
        if display == "first":
            return self.shown_first
        if display == "second":
            return "b" if self.shown_first == "a" else "a"
        return display

    def response_json(self, side: Side) -> str | dict:
        """A candidate as the canonical format writes it: a string, or ``{text, model}`` with a model."""
        text, model = (self.response_a, self.model_a) if side == "a" else (self.response_b, self.model_b)
        return {"text": text, "model": model} if model else text


class ReviewAnswer(BaseModel):
    """One reviewer's answer to one task, in display terms, as read from a tool's export."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: ReviewTask
    annotator_id: str = Field(min_length=1)
    annotator_kind: AnnotatorKind = "human"
    verdict: Display
    dimensions: dict[str, DimensionDisplay] = Field(default_factory=dict)
    critique: str | None = None
    created_at: datetime | None = None
    strength: Unit | None = None
    confidence: Unit | None = None
    rubric: str | None = None
    tool: str
    answer_key: str = Field(description="what makes this answer unique in its export (task index, annotation id, user)")
    extra: dict[str, object] = Field(default_factory=dict, description="tool provenance carried into the judgment")

    @field_validator("dimensions")
    @classmethod
    def _dimension_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            dimension_name(name)
        return v

    def judgment(self) -> ReviewJudgment:
        """The canonical raw judgment: display choices mapped back to ``a`` / ``b``."""
        t = self.task
        created = self.created_at.isoformat().replace("+00:00", "Z") if self.created_at else None
        row = {
            "comparison_id": "rv-" + content_hash(f"{self.tool}|{t.version_id}|{t.task_id}|{self.answer_key}"),
            "pair_id": t.pair_id,
            "review_of": t.pair_id,
            "prompt": [m.model_dump() for m in t.prompt],
            "response_a": t.response_json("a"),
            "response_b": t.response_json("b"),
            "shown_first": t.shown_first,
            "label": t.side(self.verdict),
            "annotator_id": self.annotator_id,
            "annotator_kind": self.annotator_kind,
            "strength": self.strength,
            "confidence": self.confidence,
            # the task's rubric is the pair's (the export's, or the store's with --store): a rubric the reviewer's
            # row names (JSONL) counts only where the task has none
            "rubric": t.rubric or self.rubric,
            "locale": t.locale,
            "tags": list(t.tags) or None,
            "critique": self.critique or None,
            "created_at": created,
            "dimensions": {k: t.side(v) for k, v in sorted(self.dimensions.items())} or None,
            "review_task_id": t.task_id,
            "review_version": t.version_id,
            "review_route": t.route,
            "review_tool": self.tool,
            **self.extra,
        }
        return ReviewJudgment.model_validate({k: v for k, v in row.items() if v is not None})


class ReviewJudgment(RawJudgment):
    """A raw judgment that reviews a routed pair (``review_of``); the tool's provenance rides along
    as extra fields (``review_task_id``, ``review_version``, ``review_route``, ``review_tool``)."""

    review_of: str = Field(min_length=1)
    dimensions: dict[str, Literal["a", "b", "tie", "both_bad"]] | None = None

    @model_validator(mode="after")
    def _reviews_its_own_pair(self) -> ReviewJudgment:
        if self.pair_id != self.review_of:
            raise ValueError(f"review_of {self.review_of!r} differs from pair_id {self.pair_id!r}")
        return self


class ImportLedger(BaseModel):
    """Where every answer of an import went.  ``items_in`` counts each answer (annotation, response
    set, reviewed row) plus one per task that nobody answered; ``items_in == judgments_out + skipped``."""

    tasks_in: int = 0
    items_in: int = 0
    judgments_out: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _adds_up(self) -> ImportLedger:
        if self.items_in != self.judgments_out + sum(self.skipped.values()):
            raise ValueError(f"import ledger does not add up: items in {self.items_in} != judgments out "
                             f"{self.judgments_out} + skipped {sum(self.skipped.values())}")
        unknown = set(self.skipped) - set(SKIP_REASONS)
        if unknown:
            raise ValueError(f"unknown skip reasons {sorted(unknown)}; known: {', '.join(SKIP_REASONS)}")
        return self


__all__ = ["DIMENSION_NAME", "REVIEW_FORMATS", "ROUTE_REASONS", "SKIP_REASONS", "ImportLedger", "ReviewAnswer",
           "ReviewJudgment", "ReviewTask", "dimension_name", "text_hash"]
