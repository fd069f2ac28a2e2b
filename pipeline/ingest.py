"""Ingest: read raw batch files, adapt, validate, normalise -> judgments + quarantine + ledger.

Hot path (per streaming batch of rows):
1. the container reader decodes rows (orjson for JSONL);
2. an adapter maps non-canonical rows to canonical judgments;
3. one light Python pass pulls fields into column lists (the input is polymorphic:
   prompts are strings or message lists, responses strings or objects);
4. columns are built strictly typed; Polars validates all rows at once (required
   fields, value sets, ranges, empty text, timestamps) and normalises/hashes texts
   (each distinct text hashed once);
5. only rows that failed are run through the Pydantic model ``RawJudgment`` to get a
   precise message (field, what was expected, what was found), then quarantined.

Nothing is lost: every input row is either valid or in quarantine, and the ledger says
so (``rows_in == rows_valid + quarantined``), per file and in total.
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
from pydantic import ValidationError

from pipeline.adapters import FORMATS, AdapterContext, AdapterError, adapt, detect_format
from pipeline.readers import RawRow, UnreadableFile, iter_raw_rows, peek_objects
from schemas.arrow import conform, empty_frame, polars_schema
from schemas.manifest import IngestLedger, SourceInfo
from schemas.records import ANNOTATOR_KINDS, LABELS, ROLES, Judgment, QuarantineRow, RawJudgment
from schemas.text import derive_pair_id_expr, hash_series, normalize_text_expr, prompt_text_expr

__all__ = ["IngestResult", "UnreadableFile", "ingest_files", "judgments_from_records", "file_sha256"]

KNOWN_FIELDS = frozenset(RawJudgment.model_fields)
_MSG = pl.Struct({"role": pl.String, "content": pl.String})
_RESPONSE_KEYS = frozenset({"text", "model", "model_version"})
_LOCALE_RE = r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$"

# columns extracted in the Python pass, with the strict dtype each must have
_RAW_COLUMNS: dict[str, pl.DataType] = {
    "comparison_id": pl.String, "batch_id": pl.String, "pair_id": pl.String,
    "prompt": pl.List(_MSG),
    "response_a": pl.String, "response_b": pl.String,
    "model_a": pl.String, "model_b": pl.String, "model_version_a": pl.String, "model_version_b": pl.String,
    "shown_first": pl.String, "label": pl.String, "strength": pl.Float64, "confidence": pl.Float64,
    "annotator_id": pl.String, "annotator_kind": pl.String, "rubric": pl.String, "critique": pl.String,
    "locale": pl.String, "tags": pl.List(pl.String), "created_at": pl.String, "gold_label": pl.String,
    "extra": pl.String,
}
QUARANTINE_SCHEMA = polars_schema(QuarantineRow)


@dataclass
class IngestResult:
    judgments: pl.DataFrame
    quarantine: pl.DataFrame
    ledger: IngestLedger
    sources: list[SourceInfo] = field(default_factory=list)

    def save(self, directory: Path) -> Path:
        """Persist (for flows: tasks pass paths, not frames).  Written to a temp dir, then renamed."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        self.judgments.write_parquet(tmp / "judgments.parquet")
        self.quarantine.write_parquet(tmp / "quarantine.parquet")
        meta = {"ledger": self.ledger.model_dump(), "sources": [s.model_dump() for s in self.sources]}
        (tmp / "ingest.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, directory)
        except OSError:  # another worker saved the same content first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: Path) -> IngestResult:
        directory = Path(directory)
        meta = json.loads((directory / "ingest.json").read_text())
        return cls(pl.read_parquet(directory / "judgments.parquet"), pl.read_parquet(directory / "quarantine.parquet"),
                   IngestLedger(**meta["ledger"]), [SourceInfo(**s) for s in meta["sources"]])

    @classmethod
    def merge(cls, parts: list[IngestResult]) -> IngestResult:
        ledger = IngestLedger()
        for p in parts:
            ledger = ledger.merged(p.ledger)
        js = [p.judgments for p in parts if p.judgments.height]
        qs = [p.quarantine for p in parts if p.quarantine.height]
        return cls(pl.concat(js) if js else empty_frame(Judgment),
                   pl.concat(qs) if qs else pl.DataFrame(schema=QUARANTINE_SCHEMA),
                   ledger, [s for p in parts for s in p.sources])


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- extraction (one Python pass)
def _extract(records: list[dict[str, Any]]) -> tuple[dict[str, list[Any]], dict[int, tuple[str, str]]]:
    """Pull fields into column lists. Returns (columns, structural errors by record index).

    Only structure is looked at here (which shape a polymorphic field has); values are
    validated later, vectorised.
    """
    cols: dict[str, list[Any]] = {k: [] for k in _RAW_COLUMNS}
    errors: dict[int, tuple[str, str]] = {}
    dumps = orjson.dumps
    for i, d in enumerate(records):
        g = d.get
        prompt = g("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif prompt is not None and not isinstance(prompt, list):
            errors[i] = ("prompt", "invalid_type")
            prompt = None
        extra = {k: d[k] for k in d.keys() - KNOWN_FIELDS} if len(d) > 0 else {}
        for side, col in (("a", "response_a"), ("b", "response_b")):
            r = g(col)
            model = version = None
            if isinstance(r, dict):
                model, version = r.get("model"), r.get("model_version")
                more = {k: v for k, v in r.items() if k not in _RESPONSE_KEYS}
                if more:
                    extra[f"{col}_meta"] = more
                r = r.get("text")
            elif r is not None and not isinstance(r, str):
                errors.setdefault(i, (col, "invalid_type"))
                r = None
            cols[col].append(r)
            cols[f"model_{side}"].append(model)
            cols[f"model_version_{side}"].append(version)
        cols["prompt"].append(prompt)
        for k in ("comparison_id", "batch_id", "pair_id", "shown_first", "label", "strength", "confidence",
                  "annotator_id", "annotator_kind", "rubric", "critique", "locale", "tags", "created_at",
                  "gold_label"):
            cols[k].append(g(k))
        if isinstance(cols["created_at"][-1], datetime):  # Parquet timestamps arrive as datetime
            ts = cols["created_at"][-1]
            cols["created_at"][-1] = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).isoformat()
        cols["extra"].append(dumps(extra, option=orjson.OPT_SORT_KEYS).decode() if extra else None)
    return cols, errors


_ARROW_TYPES: dict[str, pa.DataType] = {}


def _arrow_type(dtype: pl.DataType) -> pa.DataType:
    key = str(dtype)
    if key not in _ARROW_TYPES:
        _ARROW_TYPES[key] = pl.Series([], dtype=dtype).to_arrow().type
    return _ARROW_TYPES[key]


def _strict_series(name: str, values: list[Any], dtype: pl.DataType) -> tuple[pl.Series, list[int]]:
    """Build a typed Series (via Arrow, in C); on a type error find the offending rows and null them."""
    if isinstance(dtype, pl.List) and not all(type(v) is list for v in values if v is not None):
        return _strict_series_slow(name, values, dtype)  # Arrow would read a string as a list of chars
    try:
        arr = pa.array(values, type=_arrow_type(dtype), from_pandas=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
        return _strict_series_slow(name, values, dtype)
    return pl.Series(name, arr), []


def _strict_series_slow(name: str, values: list[Any], dtype: pl.DataType) -> tuple[pl.Series, list[int]]:
    bad = [i for i, v in enumerate(values) if v is not None and not _fits(v, dtype)]
    bad_set = set(bad)
    cleaned = [None if i in bad_set else v for i, v in enumerate(values)] if bad else values
    return pl.Series(name, pa.array(cleaned, type=_arrow_type(dtype))), bad


def _fits(v: Any, dtype: pl.DataType) -> bool:
    if dtype == pl.String:
        return isinstance(v, str)
    if dtype == pl.Float64:
        return isinstance(v, int | float) and not isinstance(v, bool)
    if dtype == pl.List(pl.String):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if dtype == pl.List(_MSG):
        return isinstance(v, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) and len(m) == 2
            for m in v
        )
    return False


# ---------------------------------------------------------------- vectorised validation
def _error_columns(df: pl.DataFrame) -> pl.DataFrame:
    """Normalise texts, then add ``_err_field`` / ``_err_reason``: the first failed rule per row (null if valid)."""
    c = pl.col
    df = df.with_columns(
        prompt=c("prompt").list.eval(pl.struct(
            role=pl.element().struct.field("role"), content=normalize_text_expr(pl.element().struct.field("content")))),
        response_a=normalize_text_expr(c("response_a")),
        response_b=normalize_text_expr(c("response_b")),
    )
    roles_ok = c("prompt").list.eval(pl.element().struct.field("role").is_in(list(ROLES))).list.all()
    last_role = c("prompt").list.last().struct.field("role")
    last_content = c("prompt").list.last().struct.field("content")
    rules: list[tuple[str, str, pl.Expr]] = [
        ("comparison_id", "missing_field", c("comparison_id").is_null()),
        ("comparison_id", "invalid_value", c("comparison_id").str.strip_chars() == ""),
        ("prompt", "missing_field", c("prompt").is_null()),
        ("prompt", "invalid_value", c("prompt").list.len() == 0),
        ("prompt", "invalid_type", c("prompt").list.eval(
            pl.element().struct.field("role").is_null() | pl.element().struct.field("content").is_null()).list.any()),
        ("prompt", "invalid_value", ~roles_ok),
        ("prompt", "invalid_value", last_role != "user"),
        ("prompt", "empty_text", last_content == ""),
        ("response_a", "missing_field", c("response_a").is_null()),
        ("response_a", "empty_text", c("response_a") == ""),
        ("response_b", "missing_field", c("response_b").is_null()),
        ("response_b", "empty_text", c("response_b") == ""),
        ("label", "missing_field", c("label").is_null()),
        ("label", "invalid_value", ~c("label").is_in(list(LABELS))),
        ("shown_first", "invalid_value", c("shown_first").is_not_null() & ~c("shown_first").is_in(["a", "b"])),
        ("strength", "invalid_value", ~c("strength").is_between(0.0, 1.0) | c("strength").is_nan()),
        ("confidence", "invalid_value", ~c("confidence").is_between(0.0, 1.0) | c("confidence").is_nan()),
        ("annotator_id", "missing_field", c("annotator_id").is_null()),
        ("annotator_id", "invalid_value", c("annotator_id").str.strip_chars() == ""),
        ("annotator_kind", "missing_field", c("annotator_kind").is_null()),
        ("annotator_kind", "invalid_value", ~c("annotator_kind").is_in(list(ANNOTATOR_KINDS))),
        ("gold_label", "invalid_value", c("gold_label").is_not_null() & ~c("gold_label").is_in(list(LABELS))),
        ("locale", "invalid_value", c("locale").is_not_null() & ~c("locale").str.contains(_LOCALE_RE)),
        ("created_at", "invalid_value", c("created_at").is_not_null() & c("_created").is_null()),
    ]
    field_expr = pl.lit(None, dtype=pl.String)
    reason_expr = pl.lit(None, dtype=pl.String)
    for fname, reason, cond in reversed(rules):  # first rule wins
        cond = cond.fill_null(False)
        field_expr = pl.when(cond).then(pl.lit(fname)).otherwise(field_expr)
        reason_expr = pl.when(cond).then(pl.lit(reason)).otherwise(reason_expr)
    return df.with_columns(_created=parse_timestamp_expr(c("created_at"))).with_columns(_err_field=field_expr, _err_reason=reason_expr)


def parse_timestamp_expr(expr: pl.Expr) -> pl.Expr:
    """ISO 8601 text -> UTC timestamp (null when unparseable); naive times are taken as UTC.

    Explicit formats, coalesced: Polars' format inference looks at the first value only.
    """
    e = expr.str.strip_chars().str.replace(r"[Zz]$", "+00:00").str.replace(r"^(\d{4}-\d\d-\d\d) ", "${1}T")
    aware = [e.str.strptime(pl.Datetime("us", "UTC"), f, strict=False)
             for f in ("%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M%:z")]
    naive = [e.str.strptime(pl.Datetime("us"), f, strict=False).dt.replace_time_zone("UTC")
             for f in ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d")]
    return pl.coalesce(aware + naive)


_EXPECTED = {
    "comparison_id": "a non-empty string", "prompt": "a non-empty string or a list of {role, content} messages ending with a user turn",
    "response_a": "a non-empty string or an object with non-empty 'text'", "response_b": "a non-empty string or an object with non-empty 'text'",
    "label": f"one of {list(LABELS)}", "shown_first": "'a' or 'b'", "strength": "a number in [0, 1]",
    "confidence": "a number in [0, 1]", "annotator_id": "a non-empty string", "annotator_kind": "'human' or 'ai'",
    "gold_label": f"one of {list(LABELS)}", "locale": "a BCP 47 tag such as 'en' or 'ja-JP'",
    "created_at": "an ISO 8601 timestamp", "tags": "a list of strings", "batch_id": "a string", "pair_id": "a string",
    "rubric": "a string", "critique": "a string",
}


def _found(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def error_message(record: dict[str, Any], field_name: str, reason: str) -> str:
    """A precise message for one failed row: the field, what was expected, what was found.

    Pydantic's own error for the field is appended when it has one.
    """
    value = record.get(field_name)
    if field_name in ("response_a", "response_b") and isinstance(value, dict):
        value = value.get("text")
    if reason == "missing_field":
        msg = f"field {field_name!r}: required, expected {_EXPECTED.get(field_name, 'a value')}, found nothing"
    elif reason == "empty_text":
        msg = f"field {field_name!r}: expected non-empty text, found {_found(value)} (empty after normalisation)"
    else:
        msg = f"field {field_name!r}: expected {_EXPECTED.get(field_name, 'a valid value')}, found {_found(value)}"
    try:
        RawJudgment.model_validate(record)
    except ValidationError as err:
        for e in err.errors():
            if e["loc"] and e["loc"][0] == field_name:
                msg += f" [{e['msg']}]"
                break
    return msg


# ---------------------------------------------------------------- one batch
@dataclass
class _BatchOut:
    valid: pl.DataFrame
    quarantine: list[dict[str, Any]]
    rows_valid: int
    judgments: int
    skipped: int


def _quarantine_row(source: str, row: RawRow, reason: str, fname: str | None, error: str) -> dict[str, Any]:
    return {"source_file": source, "line": row.line, "raw": row.raw, "reason": reason, "field": fname, "error": error}


def _process_batch(rows: list[RawRow], fmt: str, ctx: AdapterContext, source: str) -> _BatchOut:
    quarantine: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    owner: list[int] = []  # index into rows for each record
    skipped = 0
    for ri, row in enumerate(rows):
        if row.obj is None:
            quarantine.append(_quarantine_row(source, row, "invalid_json", None, f"line {row.line}: {row.error}"))
            continue
        try:
            out, sk = adapt(fmt, row.obj, ctx, row.line)
        except AdapterError as err:
            quarantine.append(_quarantine_row(source, row, err.reason, err.field, str(err)))
            continue
        skipped += sk
        records.extend(out)
        owner.extend([ri] * len(out))

    cols, struct_errors = _extract(records)
    series = []
    bad_type: dict[int, str] = {i: f for i, (f, _) in struct_errors.items()}
    for name, dtype in _RAW_COLUMNS.items():
        s, bad = _strict_series(name, cols[name], dtype)
        for i in bad:
            bad_type.setdefault(i, name)
        series.append(s)
    df = pl.DataFrame(series).with_columns(
        _rec=pl.int_range(pl.len(), dtype=pl.Int64),
        _line=pl.Series([rows[o].line for o in owner], dtype=pl.Int64),
    )
    df = _error_columns(df)
    if bad_type:
        idx = pl.Series("_rec", list(bad_type), dtype=pl.Int64)
        fld = pl.Series("_tf", list(bad_type.values()), dtype=pl.String)
        df = df.join(pl.DataFrame([idx, fld]), on="_rec", how="left").with_columns(
            _err_field=pl.coalesce("_tf", "_err_field"),
            _err_reason=pl.when(pl.col("_tf").is_not_null()).then(pl.lit("invalid_type")).otherwise("_err_reason"),
        ).drop("_tf")

    # a row expanded into several judgments is valid only if all of them are
    bad_recs = df.filter(pl.col("_err_reason").is_not_null()).select("_rec", "_err_field", "_err_reason")
    bad_owner_rows: dict[int, tuple[int, str, str]] = {}
    for rec, fname, reason in bad_recs.iter_rows():
        bad_owner_rows.setdefault(owner[rec], (rec, fname, reason))
    for ri, (rec, fname, reason) in sorted(bad_owner_rows.items()):
        row = rows[ri]
        quarantine.append(_quarantine_row(source, row, reason, fname, f"line {row.line}: " + error_message(records[rec], fname, reason)))
    if bad_owner_rows:
        bad_rec_ids = [r for r, o in enumerate(owner) if o in bad_owner_rows]
        df = df.filter(~pl.col("_rec").is_in(bad_rec_ids))
    valid_rows = len({owner[r] for r in df["_rec"].to_list()}) if df.height else 0
    return _BatchOut(_finish(df, ctx.batch_id, source), quarantine, valid_rows, df.height, skipped)


def _finish(df: pl.DataFrame, batch_id: str, source: str) -> pl.DataFrame:
    """Hash the (already normalised) texts, derive ids: the canonical judgments frame."""
    if df.height == 0:
        return empty_frame(Judgment)
    c = pl.col
    df = df.with_columns(  # texts were normalised before validation
        batch_id=c("batch_id").fill_null(pl.lit(batch_id)),
        created_at=c("_created"),
        tags=c("tags").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        source_file=pl.lit(source),
        source_line=c("_line"),
    ).with_columns(prompt_text=prompt_text_expr(c("prompt")))
    df = df.with_columns(
        prompt_hash=hash_series(df["prompt_text"]),
        a_hash=hash_series(df["response_a"]),
        b_hash=hash_series(df["response_b"]),
    ).with_columns(pair_id=c("pair_id").fill_null(derive_pair_id_expr(c("prompt_hash"), c("a_hash"), c("b_hash"))))
    return conform(df, Judgment).select(list(polars_schema(Judgment)))


# ---------------------------------------------------------------- files
def _batch_name(path: Path) -> str:
    name = path.name
    for suf in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".csv"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
    return name


def resolve_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise UnreadableFile(path, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    detected = detect_format(peek_objects(path, 50))
    if detected is None:
        raise UnreadableFile(
            path,
            "unknown record format: expected canonical rows (response_a/response_b/label), TRL rows "
            "(prompt/chosen/rejected), HH-RLHF transcripts (chosen/rejected) or rated candidate lists; "
            "force one with --format",
        )
    return detected


def ingest_files(
    paths: Iterable[str | Path],
    *,
    fmt: str | None = None,
    batch_id: str | None = None,
    annotator_id: str | None = None,
    annotator_kind: str | None = None,
    batch_rows: int = 50_000,
    keep_judgments: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> IngestResult:
    """Ingest files; raises :class:`UnreadableFile` before reading rows if any file is unusable.

    With ``keep_judgments=False`` valid rows are counted and discarded batch by batch
    (``validate``: memory stays flat whatever the input size).
    """
    paths = [Path(p) for p in paths]
    plans = []
    for p in paths:  # check every file before any work: unreadable input writes nothing
        if not p.exists():
            raise UnreadableFile(p, "no such file")
        plans.append((p, resolve_format(p, fmt)))

    ledger = IngestLedger()
    frames: list[pl.DataFrame] = []
    quarantine: list[dict[str, Any]] = []
    sources: list[SourceInfo] = []
    for p, f in plans:
        ctx = AdapterContext(stem=_batch_name(p), batch_id=batch_id or _batch_name(p),
                             annotator_id=annotator_id, annotator_kind=annotator_kind)
        n_in = n_valid = n_j = n_skip = 0
        q_before = len(quarantine)
        for rows in iter_raw_rows(p, batch_rows):
            out = _process_batch(rows, f, ctx, str(p))
            n_in += len(rows)
            n_valid += out.rows_valid
            n_j += out.judgments
            n_skip += out.skipped
            quarantine.extend(out.quarantine)
            if keep_judgments and out.valid.height:
                frames.append(out.valid)
            if on_progress:
                on_progress(len(rows))
        quarantine[q_before:] = sorted(quarantine[q_before:], key=lambda q: q["line"])
        n_q = len(quarantine) - q_before
        by_reason: dict[str, int] = {}
        for q in quarantine[q_before:]:
            by_reason[q["reason"]] = by_reason.get(q["reason"], 0) + 1
        file_ledger = IngestLedger(rows_in=n_in, rows_valid=n_valid, quarantined=n_q, quarantined_by_reason=by_reason,
                                   judgments=n_j, skipped={"identical_candidates": n_skip} if n_skip else {})
        ledger = ledger.merged(file_ledger)
        sources.append(SourceInfo(path=str(p), sha256=file_sha256(p), bytes=p.stat().st_size, format=f,
                                  rows_in=n_in, rows_valid=n_valid, quarantined=n_q, judgments=n_j))
    judgments = pl.concat(frames, how="vertical") if frames else empty_frame(Judgment)
    qframe = pl.DataFrame(quarantine, schema=QUARANTINE_SCHEMA) if quarantine else pl.DataFrame(schema=QUARANTINE_SCHEMA)
    return IngestResult(judgments, qframe, ledger, sources)


def judgments_from_records(records: list[dict[str, Any]], source_file: str = "<memory>", batch_id: str = "memory") -> pl.DataFrame:
    """Canonical raw dicts -> judgments frame (for tests and programmatic use).

    Raises ``ValueError`` listing the first errors if any record is invalid.
    """
    rows = [RawRow(i + 1, json.dumps(r, ensure_ascii=False, default=str), r) for i, r in enumerate(records)]
    out = _process_batch(rows, "canonical", AdapterContext(stem=source_file, batch_id=batch_id), source_file)
    if out.quarantine:
        errs = "; ".join(q["error"] for q in out.quarantine[:5])
        raise ValueError(f"{len(out.quarantine)} invalid record(s): {errs}")
    return out.valid
