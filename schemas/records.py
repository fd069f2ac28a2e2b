"""Record shapes: the raw judgment (input contract), the canonical judgment row, the pair,
the DPO row, quarantine rows, flags and annotator statistics.

These Pydantic models are the single source of truth: Arrow/Parquet/Polars schemas are
derived from them by :mod:`schemas.arrow`.  The hot path validates whole columns with
Polars; ``RawJudgment`` is run only on rows that failed, to produce the precise message.
"""
from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

Label = Literal["a", "b", "tie", "both_bad", "escalate"]
DecisiveLabel = Literal["a", "b"]
Side = Literal["a", "b"]
# "unknown": the source does not say who judged (trl / hh / rated rows without --annotator-kind);
# such judgments never count as human
AnnotatorKind = Literal["human", "ai", "unknown"]
# a pair: the kind of the judgments used for its label, "mixed" when they are of more than one kind
PairAnnotatorKind = Literal["human", "ai", "unknown", "mixed"]
Role = Literal["system", "user", "assistant", "tool"]

LABELS: tuple[str, ...] = ("a", "b", "tie", "both_bad", "escalate")
ROUTED_LABELS: tuple[str, ...] = ("tie", "both_bad", "escalate")
ANNOTATOR_KINDS: tuple[str, ...] = ("human", "ai", "unknown")
PAIR_ANNOTATOR_KINDS: tuple[str, ...] = ("human", "ai", "unknown", "mixed")
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

NonEmptyStr = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
# per-dimension verdicts (helpfulness, harmlessness, ...): a name, and a verdict without ``escalate``
DimensionName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
DimensionLabel = Literal["a", "b", "tie", "both_bad"]
DIMENSION_LABELS: tuple[str, ...] = ("a", "b", "tie", "both_bad")
DIMENSION_NAME_RE = r"^[a-z][a-z0-9_]*$"
DIMENSION_NAME_MAX = 64
Unit = Annotated[float, Field(ge=0.0, le=1.0)]


class QuarantineReason(StrEnum):
    """Why a row was quarantined at ingest."""

    INVALID_JSON = "invalid_json"  # the line is not a JSON object
    MISSING_FIELD = "missing_field"  # a required field is absent or null
    INVALID_TYPE = "invalid_type"  # a field has the wrong JSON type
    INVALID_VALUE = "invalid_value"  # right type, value outside what is allowed
    EMPTY_TEXT = "empty_text"  # prompt or response is empty after normalisation
    DUPLICATE_ID = "duplicate_comparison_id"  # comparison_id seen before with different content
    UNPAIRABLE = "unpairable"  # adapter could not build a pair (e.g. < 2 candidates)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Role
    content: str


class ResponseObject(BaseModel):
    """A candidate given as an object rather than a bare string."""

    model_config = ConfigDict(extra="allow")
    text: str
    model: str | None = None
    model_version: str | None = None
    generation: Any = None


class DimensionVerdictInput(BaseModel):
    """A dimension's verdict given as an object (``dimensions.<name>`` of a raw row)."""

    model_config = ConfigDict(extra="forbid", strict=False)
    label: DimensionLabel
    strength: Unit | None = None
    critique: str | None = None


class DimensionVerdict(BaseModel):
    """One per-dimension verdict of a judgment (``Judgment.dimensions``), as written: ``a``/``b``
    name the judgment's own ``response_a``/``response_b`` (aggregation orients them like ``label``)."""

    name: str
    label: DimensionLabel
    strength: float | None = None
    critique: str | None = None


class DimensionConsensus(BaseModel):
    """A pair's consensus on one dimension (``PairRecord.dimensions``), in the pair's orientation."""

    name: str
    label: Label | None = None
    agreement: float | None = None
    strength: float | None = None
    n_judgments: int = 0


class DPODimension(BaseModel):
    """A DPO row's consensus on one dimension: ``label`` is ``chosen`` / ``rejected`` (the side the
    dimension prefers, in the row's own terms), ``tie``, ``both_bad`` or ``escalate``."""

    name: str
    label: Literal["chosen", "rejected", "tie", "both_bad", "escalate"] | None = None
    agreement: float | None = None


class RawJudgment(BaseModel):
    """One line of a canonical raw batch (``../shared/spec/raw-comparisons.md``).

    Unknown extra fields are allowed and carried through as metadata.
    """

    model_config = ConfigDict(extra="allow", strict=False)

    comparison_id: NonEmptyStr
    batch_id: str | None = None
    pair_id: str | None = None
    prompt: str | list[Message]
    response_a: str | ResponseObject
    response_b: str | ResponseObject
    shown_first: Side | None = None
    label: Label | None = Field(None, description="required unless `dimensions` is given and the policy has a dimension "
                                "rule that derives it")
    strength: Unit | None = None
    confidence: Unit | None = None
    annotator_id: NonEmptyStr
    annotator_kind: AnnotatorKind
    rubric: str | None = None
    critique: str | None = None
    locale: str | None = None
    tags: list[str] | None = None
    created_at: datetime | None = None
    gold_label: Label | None = None
    dimensions: dict[DimensionName, DimensionLabel | DimensionVerdictInput] | None = None
    review_of: str | None = Field(None, description="this judgment reviews the routed pair with this pair_id "
                                  "(`prefpipe review import` writes it); pair_id defaults to it and must equal it")

    @field_validator("review_of")
    @classmethod
    def _review_of_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("expected a pair_id, found an empty string")
        return v

    @field_validator("pair_id")
    @classmethod
    def _pair_id_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():  # one empty id would make every such judgment one pair
            raise ValueError("expected a non-empty pair_id or none, found an empty string")
        return v

    @model_validator(mode="after")
    def _review_of_is_the_pair(self) -> RawJudgment:
        if self.review_of is not None and self.pair_id is not None and self.pair_id != self.review_of:
            raise ValueError(f"review_of {self.review_of!r} differs from pair_id {self.pair_id!r} (a review is a "
                             "judgment of the pair it reviews)")
        return self

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: str | list[Message]) -> str | list[Message]:
        if isinstance(v, list):
            if not v:
                raise ValueError("expected a non-empty list of messages")
            if v[-1].role != "user":
                raise ValueError(f"a conversation must end with a user turn, found role {v[-1].role!r}")
            if not any(m.content.strip() for m in v):
                raise ValueError("expected non-empty text, found only empty messages")
        elif not v.strip():
            raise ValueError("expected non-empty text, found an empty string")
        return v

    @model_validator(mode="after")
    def _responses_not_empty(self) -> RawJudgment:
        for side in ("response_a", "response_b"):
            r = getattr(self, side)
            text = r.text if isinstance(r, ResponseObject) else r
            if not text.strip():
                raise ValueError(f"{side}: expected non-empty text, found an empty string")
        return self


class Judgment(BaseModel):
    """The canonical judgment row after ingest (one row of the judgments frame).

    Texts are normalised (:func:`schemas.text.normalize_text`); ``*_hash`` are content
    hashes of the normalised texts; ``pair_id`` is given or derived from content.
    """

    comparison_id: str
    batch_id: str
    pair_id: str
    prompt: list[Message]
    prompt_text: str
    response_a: str
    response_b: str
    model_a: str | None = None
    model_b: str | None = None
    model_version_a: str | None = None
    model_version_b: str | None = None
    shown_first: Side | None = None
    label: Label
    strength: float | None = None
    confidence: float | None = None
    annotator_id: str
    annotator_kind: AnnotatorKind
    rubric: str | None = None
    critique: str | None = None
    locale: str | None = None
    tags: list[str] = Field(default_factory=list)
    created_at: datetime | None = None
    gold_label: Label | None = None
    dimensions: list[DimensionVerdict] | None = Field(None, description="per-dimension verdicts, sorted by name (null: none given)")
    label_derived: bool = Field(False, description="the row had no label: it was derived from `dimensions` by the policy's dimension rule")
    review_of: str | None = Field(None, description="the routed pair this judgment reviews (equal to pair_id; null: "
                                  "an ordinary judgment); pipeline/reviews_resolve.py")
    extra: str | None = Field(None, description="unknown input fields and response generation info, as JSON")
    source_file: str
    source_line: int = Field(description="1-based line (JSONL/CSV: physical line; Parquet: row number)")
    prompt_hash: str
    a_hash: str
    b_hash: str


class PairRecord(BaseModel):
    """Judgments of one pair aggregated (``pipeline.aggregate``)."""

    pair_id: str
    prompt: list[Message]
    prompt_text: str
    response_a: str
    response_b: str
    model_a: str | None = None
    model_b: str | None = None
    locale: str | None = None
    tags: list[str] = Field(default_factory=list)
    n_judgments: int
    n_human: int
    n_ai: int
    count_a: int
    count_b: int
    count_tie: int
    count_both_bad: int
    count_escalate: int
    label_majority: Label | None = None
    label_human: Label | None = None
    label_ai: Label | None = None
    label_consensus: Label | None = Field(None, description="final label under the policy's human/AI combination")
    p_a_weighted: float | None = Field(None, description="Dawid-Skene-style accuracy-weighted P(a beats b)")
    agreement: float | None = Field(None, description="share of judgments agreeing with the consensus label (null without consensus)")
    strength: float | None = None
    annotator_kind: PairAnnotatorKind
    source_comparison_ids: list[str]
    dimensions: list[DimensionConsensus] | None = Field(None, description="per-dimension consensus, sorted by name "
                                                         "(null when no judgment of the pair gave dimensions)")


class DPORow(BaseModel):
    """One row of ``data/{train,validation,test}.parquet`` (TRL conversational format)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    pair_id: str
    weight: float = 1.0
    agreement: float
    n_judgments: int
    strength: float | None = None
    locale: str | None = None
    annotator_kind: PairAnnotatorKind
    chosen_model: str | None = None
    rejected_model: str | None = None
    source_comparison_ids: list[str]
    near_dup_cluster: str | None = None
    dimensions: list[DPODimension] | None = None


class QuarantineRow(BaseModel):
    """One row of ``quarantine.parquet``."""

    source_file: str
    line: int = Field(description="1-based line number (Parquet: 1-based row number)")
    raw: str = Field(description="the raw text of the row as read")
    reason: QuarantineReason
    field: str | None = None
    error: str = Field(description="names the field, what was expected and what was found")


class Flag(BaseModel):
    """One finding of a check (``flags.parquet``)."""

    subject_kind: Literal["judgment", "pair", "annotator", "batch", "slice"]
    subject_id: str
    check: str
    reason: str = Field(description="a reason code declared by a check (pipeline/checks registry; `prefpipe policy reasons`)")
    severity: Literal["info", "warn", "error"] = "warn"
    detail: str = ""


class AnnotatorStats(BaseModel):
    """One row of ``annotators.parquet``."""

    annotator_id: str
    annotator_kind: AnnotatorKind
    n_judgments: int
    n_decisive: int = 0
    agreement_with_consensus: float | None = None
    gold_n: int = 0
    gold_accuracy: float | None = None
    ds_accuracy: float | None = Field(None, description="Dawid-Skene estimated accuracy")
    first_shown_rate: float | None = None
    position_p_value: float | None = None
    order_consistency: float | None = None
    longer_chosen_rate: float | None = None
    length_p_value: float | None = None
    reliability_p_value: float | None = None
    status: Literal["ok", "flagged", "insufficient_data"] = "ok"
    flags: list[str] = Field(default_factory=list)
