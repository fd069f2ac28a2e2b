"""Small human-facing tables of a version (for Prefect artifacts and terminals).

The tables are data (Prefect shows table artifacts cell by cell); the Markdown summary escapes
every value like ``report.md`` does (``md_table``)."""
from __future__ import annotations

from typing import Any

import polars as pl

from pipeline.escape import md_escape
from pipeline.report import ingest_rows, md_table
from pipeline.store import VersionHandle


def version_tables(h: VersionHandle) -> dict[str, Any]:
    m = h.manifest()
    led = m.ledger
    ledger = [
        {"stage": "rows in", "count": led.rows_in},
        {"stage": "quarantined", "count": led.quarantined},
        *[{"stage": k, "count": v} for k, v in ingest_rows(m)],
        {"stage": "judgments valid", "count": led.judgments_valid},
        *[{"stage": f"judgments dropped: {k}", "count": v} for k, v in led.judgments_dropped.items()],
        {"stage": "pairs", "count": led.pairs},
        *[{"stage": f"routed: {k}", "count": v} for k, v in led.routed.items()],
        *[{"stage": f"pairs dropped: {k}", "count": v} for k, v in led.dropped.items()],
        {"stage": "pairs kept (DPO rows)", "count": led.pairs_kept},
        *[{"stage": f"split {k}", "count": v} for k, v in led.splits.items()],
    ]
    if led.reviews is not None and led.reviews.routed_ever:  # the review funnel (docs/reviews.md)
        r = led.reviews
        ledger += [{"stage": f"reviews: {k}", "count": v} for k, v in (
            ("routed pairs (lineage)", r.routed_ever), ("exported", r.exported), ("reviewed", r.reviewed),
            ("resolved", r.resolved), ("resolved by reviews", r.resolved_by_reviews), ("open", r.open),
            ("review judgments", r.judgments))]
    checks = [{"check": c.name, "status": c.status, "flags": ", ".join(f"{k}={v}" for k, v in c.flag_counts.items()),
               "summary": c.summary} for c in m.checks]
    ann = h.read("annotators.parquet")
    cols = [c for c in ("annotator_id", "annotator_kind", "n_judgments", "agreement_with_consensus", "gold_accuracy",
                        "first_shown_rate", "position_p_value", "order_consistency", "longer_chosen_rate", "status", "flags")
            if c in ann.columns]
    # three significant figures, not three decimals: a position p-value of 2e-19 is not 0.0
    annotators = ann.select(cols).with_columns(pl.col("flags").list.join(",")).with_columns(
        pl.col(pl.Float64).round_sig_figs(3)).to_dicts() if ann.height else []
    md = [f"# prefpipe version {md_escape(m.version_id)}", "", md_table(["stage", "count"], [[r["stage"], r["count"]] for r in ledger]), "",
          md_table(["check", "status", "flags"], [[c["check"], c["status"], c["flags"]] for c in checks])]
    return {"ledger": ledger, "checks": checks, "annotators": annotators, "markdown": "\n".join(md)}


def report_markdown(h: VersionHandle, summary: str) -> str:
    """The Markdown to publish for a version: its ``report.md`` when this code version wrote it,
    else ``summary`` (built now).  A report.md written by other code may predate the escaping of
    user text, and the version is immutable, so it is never published as is.  report.md is read
    through the manifest (:meth:`VersionHandle.read_bytes`): one edited after the version was
    written raises :class:`~pipeline.store.IntegrityError` instead of being published."""
    from schemas.version import code_version

    if h.has("report.md") and h.manifest().code_version == code_version():
        return h.read_bytes("report.md").decode("utf-8")
    return summary
