"""The one result type every check returns (``run(frame, cfg) -> CheckResult``)."""
from __future__ import annotations

from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.arrow import polars_schema
from schemas.records import Flag

CheckStatus = Literal["pass", "warn", "fail"]

FLAG_SCHEMA = polars_schema(Flag)


def empty_flags() -> pl.DataFrame:
    return pl.DataFrame(schema=FLAG_SCHEMA)


class CheckResult(BaseModel):
    """Outcome of one check.

    ``metrics`` are JSON-serialisable numbers/strings/dicts that go into the manifest.
    ``flags`` is a Polars frame with the columns of :class:`schemas.records.Flag`
    (one row per finding; checks never drop rows).  ``tables`` carries optional
    per-subject frames (e.g. per-annotator statistics) for later stages and the report.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    status: CheckStatus
    metrics: dict[str, Any] = Field(default_factory=dict)
    flags: pl.DataFrame = Field(default_factory=empty_flags)
    tables: dict[str, pl.DataFrame] = Field(default_factory=dict)
    summary: str = ""

    @field_validator("flags")
    @classmethod
    def _flags_schema(cls, v: pl.DataFrame) -> pl.DataFrame:
        missing = set(FLAG_SCHEMA) - set(v.columns)
        if missing:
            raise ValueError(f"flags frame lacks columns {sorted(missing)}; expected {list(FLAG_SCHEMA)}")
        return v.select(list(FLAG_SCHEMA)).cast(FLAG_SCHEMA)  # type: ignore[arg-type]

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest stores for this check (``schemas.manifest.CheckSummary``)."""
        counts = (
            self.flags.group_by("reason").len().sort("reason").rows()
            if self.flags.height
            else []
        )
        return {
            "name": self.name,
            "status": self.status,
            "metrics": self.metrics,
            "flag_counts": {r: n for r, n in counts},
            "summary": self.summary,
        }


def make_flags(
    subject_ids: pl.Series | list[str],
    *,
    subject_kind: str,
    check: str,
    reason: str,
    severity: str = "warn",
    detail: pl.Series | list[str] | str = "",
) -> pl.DataFrame:
    """Build a flags frame for many subjects at once (vectorised helper for checks)."""
    ids = pl.Series("subject_id", subject_ids, dtype=pl.String)
    n = len(ids)
    det = pl.Series("detail", [detail] * n if isinstance(detail, str) else detail, dtype=pl.String)
    return pl.DataFrame(
        {
            "subject_kind": [subject_kind] * n,
            "subject_id": ids,
            "check": [check] * n,
            "reason": [reason] * n,
            "severity": [severity] * n,
            "detail": det,
        }
    ).cast(FLAG_SCHEMA)  # type: ignore[arg-type]
