from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect state (database, cached task results) of a test session lives in a fresh directory,
# never in the user's ~/.prefect: cached results from an earlier session must not leak in.
if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefpipe-test-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)  # and gone after the session


def canonical(i: int = 0, **over) -> dict:
    """A valid canonical raw judgment; override any field."""
    row = {
        "comparison_id": f"c-{i:05d}",
        "batch_id": "b-test",
        "prompt": [{"role": "user", "content": f"How do I bake bread number {i}?"}],
        "response_a": {"text": f"Mix flour, water, yeast and salt, then knead ({i}).", "model": "m-1", "model_version": "v1"},
        "response_b": f"Buy it at the store ({i}).",
        "shown_first": "a",
        "label": "a",
        "strength": 0.7,
        "confidence": 0.9,
        "annotator_id": "rev-01",
        "annotator_kind": "human",
        "locale": "en",
        "tags": ["cooking"],
        "created_at": "2026-11-20T09:14:03Z",
    }
    row.update(over)
    return {k: v for k, v in row.items() if v is not ...}


def redelivered(records: list[dict], every: int) -> list[dict]:
    """``records`` plus a re-delivery of every ``every``-th one: a new comparison id, a later time,
    the responses named the other way round (label, display order, gold label and dimension verdicts
    swapped with them)."""
    swap = {"a": "b", "b": "a"}

    def turned(v):  # a dimension verdict: a bare label or {label, strength, critique}
        return {**v, "label": swap.get(v["label"], v["label"])} if isinstance(v, dict) else swap.get(v, v)

    copies = [{**r, "comparison_id": f"{r['comparison_id']}-again", "created_at": "2027-01-01T00:00:00Z",
               "response_a": r["response_b"], "response_b": r["response_a"], "label": swap.get(r["label"], r["label"]),
               **{k: swap[r[k]] for k in ("shown_first", "gold_label") if r.get(k) in swap},
               **({"dimensions": {d: turned(v) for d, v in r["dimensions"].items()}} if r.get("dimensions") else {})}
              for r in records[::every]]
    return records + copies


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Write rows as JSONL; ``raw_lines`` maps 0-based positions to literal lines to insert."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for pos, text in sorted((raw_lines or {}).items()):
        lines.insert(pos, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def make_jsonl(tmp_path):
    def _make(rows, name="batch.jsonl", raw_lines=None):
        return write_jsonl(tmp_path / name, rows, raw_lines)

    return _make


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001 - pytest hook signature
    """Prefect stops its temporary server at interpreter exit and logs that (INFO) to a stream
    pytest has closed by then ('--- Logging error ---' in the CI output): keep only warnings."""
    import logging

    logging.getLogger("prefect").setLevel(logging.WARNING)


def spy_per_row(monkeypatch) -> list[int]:
    """Record the lines that go through ingest's per-row validation path (the fast path skips it)."""
    from pipeline import ingest as ingest_mod

    seen: list[int] = []
    real = ingest_mod._validate_rows

    def spy(rows, *a, **kw):
        seen.extend(r.line for r in rows)
        return real(rows, *a, **kw)

    monkeypatch.setattr(ingest_mod, "_validate_rows", spy)
    return seen
