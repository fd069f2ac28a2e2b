"""Ledger, sources, splits, manifest and certification records."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, computed_field, model_validator

from schemas.policy import Policy


class IngestLedger(BaseModel):
    """Where every input row went at ingest.  ``rows_in == rows_valid + quarantined``."""

    rows_in: int = 0
    rows_valid: int = 0
    quarantined: int = 0
    quarantined_by_reason: dict[str, int] = Field(default_factory=dict)
    judgments: int = Field(0, description="judgments produced by valid rows (adapters may expand one row into several)")
    skipped: dict[str, int] = Field(default_factory=dict, description="candidate pairs not formed, by reason")

    @model_validator(mode="after")
    def _adds_up(self) -> IngestLedger:
        if self.rows_in != self.rows_valid + self.quarantined:
            raise ValueError(f"ledger does not add up: rows_in {self.rows_in} != valid {self.rows_valid} + quarantined {self.quarantined}")
        if sum(self.quarantined_by_reason.values()) != self.quarantined:
            raise ValueError("ledger does not add up: quarantined_by_reason does not sum to quarantined")
        return self

    def merged(self, other: IngestLedger) -> IngestLedger:
        def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))}

        return IngestLedger(
            rows_in=self.rows_in + other.rows_in,
            rows_valid=self.rows_valid + other.rows_valid,
            quarantined=self.quarantined + other.quarantined,
            quarantined_by_reason=add(self.quarantined_by_reason, other.quarantined_by_reason),
            judgments=self.judgments + other.judgments,
            skipped=add(self.skipped, other.skipped),
        )


class SourceInfo(BaseModel):
    path: str
    sha256: str
    bytes: int
    format: str
    rows_in: int
    rows_valid: int
    quarantined: int
    judgments: int


class SplitInfo(BaseModel):
    path: str
    rows: int
    sha256: str
    bytes: int | None = Field(None, description="file size (a cheap first check before hashing; absent in old manifests)")


class TableInfo(BaseModel):
    """A table stored as a folder of Parquet parts (each part a hard link into the store's
    content-addressed ``objects/``, shared by every version whose part has the same bytes).
    ``sha256`` hashes the ordered list of (part path, part sha256)."""

    path: str
    rows: int
    sha256: str
    parts: list[SplitInfo]


class ReviewLedger(BaseModel):
    """``ledger.reviews``: reviews of routed pairs and what became of the pairs (``pipeline/reviews_resolve.py``).

    ``routed_ever`` counts the pairs any version of the lineage (this one included) routed away
    from training; each is now ``resolved`` (it leaves as a DPO row or a drop) or ``open`` (still
    routed: waiting for a review).  The funnel ``routed_ever >= exported``, ``reviewed``
    (>= 1 review judgment), ``resolved`` is what the report draws."""

    mode: Literal["resolve", "vote"] = "resolve"
    judgments: int = Field(0, description="judgment rows with review_of")
    judgments_of_routed: int = Field(0, description="... of them reviewing a pair the lineage routed")
    routed_ever: int = 0
    exported: int = Field(0, description="routed pairs in a `review export` of a version of the lineage before this one")
    reviewed: int = Field(0, description="routed pairs with at least one review judgment")
    resolved: int = Field(0, description="routed pairs that now leave as DPO rows or drops")
    resolved_by_reviews: int = Field(0, description="... of them decided by the reviews' majority (mode resolve)")
    kept_routed_by_review_tie: int = Field(0, description="reviewed pairs kept routed: the reviews tie")
    open: int = Field(0, description="routed pairs still waiting (= the routed pairs of this version)")

    @model_validator(mode="after")
    def _adds_up(self) -> ReviewLedger:
        if self.routed_ever != self.resolved + self.open:
            raise ValueError(f"ledger.reviews does not add up: routed_ever {self.routed_ever} != resolved {self.resolved} "
                             f"+ open {self.open}")
        if max(self.exported, self.reviewed) > self.routed_ever or self.resolved_by_reviews > self.resolved \
                or self.judgments_of_routed > self.judgments:
            raise ValueError(f"ledger.reviews does not add up: {self.model_dump()}")
        return self


class Ledger(BaseModel):
    """The version-level ledger (``manifest.json``); every number adds up."""

    rows_in: int
    quarantined: int
    judgments_valid: int
    judgments_dropped: dict[str, int] = Field(default_factory=dict)
    pairs: int
    pairs_kept: int
    routed: dict[str, int] = Field(default_factory=lambda: {"tie": 0, "both_bad": 0, "escalate": 0})
    dropped: dict[str, int] = Field(default_factory=dict)
    splits: dict[str, int] = Field(default_factory=dict)
    reviews: ReviewLedger | None = None  # null in versions written before reviews resolved routed pairs

    @model_validator(mode="after")
    def _adds_up(self) -> Ledger:
        if self.reviews is not None and self.reviews.open != sum(self.routed.values()):
            raise ValueError(f"ledger does not add up: reviews.open {self.reviews.open} != routed {sum(self.routed.values())}")
        if self.pairs != self.pairs_kept + sum(self.routed.values()) + sum(self.dropped.values()):
            raise ValueError(
                f"ledger does not add up: pairs {self.pairs} != kept {self.pairs_kept} + routed "
                f"{sum(self.routed.values())} + dropped {sum(self.dropped.values())}"
            )
        if self.splits and sum(self.splits.values()) != self.pairs_kept:
            raise ValueError(f"ledger does not add up: split rows {sum(self.splits.values())} != pairs_kept {self.pairs_kept}")
        return self


class CheckSummary(BaseModel):
    """What the manifest keeps of one check: status, metrics (JSON), flag counts by reason, summary."""

    name: str
    status: Literal["pass", "warn", "fail"]
    metrics: dict[str, Any] = Field(default_factory=dict)
    flag_counts: dict[str, int] = Field(default_factory=dict)
    summary: str = ""


EMPTY_CHECK = CheckSummary(name="(not run)", status="pass")


class Manifest(BaseModel):
    version_id: str
    created_at: datetime
    parent_version: str | None = None
    code_version: str
    policy_hash: str
    policy: Policy = Field(description="the resolved policy the version was built with (every reason's action)")
    ledger: Ledger
    ingest: IngestLedger
    sources: list[SourceInfo]
    splits: dict[str, SplitInfo]
    files: dict[str, SplitInfo] = Field(default_factory=dict, description="other files of the version with sha256")
    tables: dict[str, TableInfo] = Field(default_factory=dict, description="tables stored as folders of parts, by name "
                                         "('judgments', 'data/train', ...); every part's sha256 is listed")
    checks: list[CheckSummary]
    annotators: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, Any] = Field(default_factory=dict)

    @computed_field(description="sha256 of the canonical JSON of the annotator registry the version was built with "
                    "(policy.annotators; null without one): written into manifest.json, so a certificate binds it")
    @property
    def registry_sha256(self) -> str | None:
        return self.policy.annotators.sha256() if self.policy.annotators is not None else None

    def check(self, name: str) -> CheckSummary:
        """The summary of check ``name`` (an empty one, status pass, if the version has none)."""
        return next((c for c in self.checks if c.name == name), EMPTY_CHECK)


class GateResult(BaseModel):
    name: str
    value: Any
    threshold: Any
    passed: bool
    detail: str = ""


class PartFactsRef(BaseModel):
    """The per-part facts file a certification wrote (``pipeline.certify_parts``), bound by sha256."""

    path: str = Field(description="relative to the store root: certifications/VERSION/part-facts-<sha12>.parquet")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rows: int = Field(ge=0)
    key: str = Field(description="facts format and code version: facts are reused only by the same code")


class Certification(BaseModel):
    """One certification record.  It binds the version's content: ``manifest_sha256`` is the
    sha256 of the exact ``manifest.json`` bytes that were evaluated (the manifest holds every
    file's sha256), so a record counts only for that content (``pipeline.store.verify_chain``)."""

    version_id: str
    verdict: Literal["certified", "rejected"]
    gates: list[GateResult]
    policy_hash: str
    policy: dict[str, Any]
    certified_at: datetime
    code_version: str
    manifest_sha256: str | None = Field(None, description="sha256 of the certified manifest.json bytes")
    opt_outs: list[str] = Field(default_factory=list, description="gates the policy explicitly opted out of")
    part_facts: PartFactsRef | None = Field(None, description="per-part facts (GX result, counts, file stat when "
                                            "hashed) a later certification of this version or a child may reuse")
    agreement_state: dict[str, Any] | None = Field(None, description="the agreement gates' sums over pairs and each "
                                                   "annotator's kind (pipeline.overlap), which a child's certification "
                                                   "updates with its new judgments")
