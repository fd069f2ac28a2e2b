"""Ingest: read raw batch files, adapt, validate, normalise -> judgments + quarantine + ledger.

Hot path for canonical JSON Lines (per block of whole lines, no Python object per row):
1. Arrow's JSON reader parses the block with an explicit canonical schema, once per shape
   (prompt / responses as strings or structured); it is as strict as ``orjson`` except in a
   few checked places, so the columns are what the per-row path would build;
2. Polars validates all rows at once (required fields, value sets, ranges, empty text,
   timestamps) and normalises texts; hashes and ids are derived per distinct text;
3. lines Arrow cannot take and rows that fail validation go the per-row path below, where
   the Pydantic model ``RawJudgment`` gives a failed row its precise message (field, what
   was expected, what was found), and they are quarantined;
4. the next block is read and parsed in a thread meanwhile (Arrow and Polars release the GIL).

Per-row path (other formats and containers, and the lines above): the reader decodes rows
(orjson for JSONL), an adapter maps them to canonical judgments, one light Python pass pulls
fields into strictly typed columns, then the same vectorised validation.

Nothing is lost: every input row is either valid or in quarantine, and the ledger says
so (``rows_in == rows_valid + quarantined``), per file and in total.
"""
from __future__ import annotations

import base64
import functools
import json
import os
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from pipeline.adapters import FORMATS, AdapterContext, AdapterError, adapt, detect_format
from pipeline.dimensions import DIM_STRUCT, derive_labels, parse_dimensions
from pipeline.dimensions import from_arrow as dimensions_from_arrow
from pipeline.hashing import pair_id_expr, text_hashes
from pipeline.readers import (
    ArrowPart,
    LineBlock,
    RawRow,
    UnreadableFile,
    candidate_lines,
    container_of,
    decode_line,
    int_beyond_64_bits,
    iter_raw_rows,
    jsonl_blocks,
    lines_array,
    parse_block_arrow,
    peek_rows,
)
from schemas.arrow import conform, empty_frame, polars_schema
from schemas.manifest import IngestLedger, SourceInfo
from schemas.policy import DimensionsConfig, IngestConfig
from schemas.records import ANNOTATOR_KINDS, LABELS, ROLES, Judgment, QuarantineRow, RawJudgment
from schemas.text import WHITESPACE, prompt_text_expr

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
    "extra": pl.String, "dimensions": pl.List(DIM_STRUCT), "review_of": pl.String,
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

    def take_judgments(self) -> pl.DataFrame:
        """Hand the judgments frame over to the caller; this result keeps an empty frame of
        the same schema.  Curate takes the rows so that it can release the wide frame once
        it is written, which bounds its peak memory."""
        frame, self.judgments = self.judgments, self.judgments.clear()
        return frame

    @classmethod
    def load(cls, directory: Path) -> IngestResult:
        directory = Path(directory)
        meta = json.loads((directory / "ingest.json").read_text())
        return cls(pl.read_parquet(directory / "judgments.parquet", glob=False), pl.read_parquet(directory / "quarantine.parquet", glob=False),
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


def quarantine_line(row: dict[str, Any]) -> str:
    """One quarantined row as ``prefpipe validate`` lists it, and a curate refused for holding no valid judgment:
    ``FILE:LINE  REASON  ERROR`` (the error names the field, what was expected and what was found)."""
    return f"{row['source_file']}:{row['line']}  {row['reason']}  {row['error']}"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (the content key of a source); :class:`UnreadableFile` if it cannot be read."""
    return file_hash(path).sha256


@dataclass(frozen=True)
class FileHash:
    """A file's sha256 and the size and modification time it had when it was hashed: a reader given
    it does not hash the file again, and refuses it if it is no longer that file (:meth:`check`)."""

    sha256: str
    size: int
    mtime_ns: int
    source: str | None = None  # what its rows record as their source file (None: its path; a URL it was copied from)

    def check(self, path: str | Path) -> None:
        """:class:`UnreadableFile` unless ``path`` still has the size and time it had when hashed."""
        try:
            st = os.stat(path)
        except OSError as err:
            raise UnreadableFile(path, f"cannot read: {err.strerror or err}") from err
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            raise UnreadableFile(path, "the file changed while it was being read (its size or modification time "
                                       "differs from when it was hashed): run again on a file that is not being written")


def file_hash(path: str | Path) -> FileHash:
    """:class:`FileHash` of ``path`` (stat before and after the hash: a file written meanwhile is refused)."""
    from pipeline.store import sha256_file

    try:
        st = os.stat(path)
        sha = sha256_file(path)
    except OSError as err:
        raise UnreadableFile(path, f"cannot read: {err.strerror or err}") from err
    out = FileHash(sha, st.st_size, st.st_mtime_ns)
    out.check(path)
    return out


# ---------------------------------------------------------------- extraction (one Python pass)
def _extract(records: list[dict[str, Any]]) -> tuple[dict[str, list[Any]], dict[int, tuple[str, str]],
                                                       dict[int, tuple[str, str, str]]]:
    """Pull fields into column lists. Returns (columns, structural errors by record index,
    ``dimensions`` errors by record index: (field, reason, message)).

    Only structure is looked at here (which shape a polymorphic field has); values are
    validated later, vectorised -- except ``dimensions``, parsed here (:func:`parse_dimensions`).
    """
    cols: dict[str, list[Any]] = {k: [] for k in _RAW_COLUMNS}
    errors: dict[int, tuple[str, str]] = {}
    dim_errors: dict[int, tuple[str, str, str]] = {}
    for i, d in enumerate(records):
        g = d.get
        prompt = g("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif prompt is not None and not isinstance(prompt, list):
            errors[i] = ("prompt", "invalid_type")
            prompt = None
        for side, col in (("a", "response_a"), ("b", "response_b")):
            r = g(col)
            model = version = None
            if isinstance(r, dict):
                model, version = r.get("model"), r.get("model_version")
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
                  "gold_label", "review_of"):
            cols[k].append(g(k))
        if isinstance(cols["created_at"][-1], datetime):  # Parquet timestamps arrive as datetime
            ts = cols["created_at"][-1]
            cols["created_at"][-1] = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).isoformat()
        cols["extra"].append(_extra_json(d))
        dims = g("dimensions")
        if dims is not None:
            dims, err = parse_dimensions(dims)
            if err is not None:
                dim_errors[i] = err
        cols["dimensions"].append(dims)
    return cols, errors, dim_errors


def _iso_duration(td: timedelta) -> str:
    ns = getattr(td, "value", None)  # pandas.Timedelta (Arrow's nanosecond durations): total nanoseconds
    if type(ns) is not int:
        ns = td // timedelta(microseconds=1) * 1000
    seconds, frac = divmod(abs(ns), 1_000_000_000)
    return f"{'-' if ns < 0 else ''}PT{seconds}{f'.{frac:09d}'.rstrip('0') if frac else ''}S"


def _json_text(value: Any) -> Any:
    """A value with no JSON type (Parquet extra columns), as the text that ``extra`` carries:
    binary as base64, decimals exactly (``"12.500"``), durations as ISO 8601 (``"PT90.0005S"``)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, timedelta):
        return _iso_duration(value)
    if isinstance(value, tuple):  # e.g. month-day-nano intervals
        return list(value)
    return str(value)


def _extra_json(d: dict[str, Any]) -> str | None:
    """Unknown fields and extra response-object keys of one raw row, as sorted JSON (or None)."""
    extra = {k: v for k, v in d.items() if k not in KNOWN_FIELDS}
    for col in ("response_a", "response_b"):
        r = d.get(col)
        if isinstance(r, dict):
            more = {k: v for k, v in r.items() if k not in _RESPONSE_KEYS}
            if more:
                extra[f"{col}_meta"] = more
    return orjson.dumps(extra, default=_json_text, option=orjson.OPT_SORT_KEYS).decode() if extra else None


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
    # Arrow is more lenient than ``_fits`` in places (and then only in some batches): true as 1.0,
    # messages with missing or extra keys, nulls inside lists
    if dtype == pl.Float64 and any(type(v) is bool for v in values):
        return _strict_series_slow(name, values, dtype)
    if dtype == pl.List(_MSG) and not all(_fits(v, dtype) for v in values if v is not None):
        return _strict_series_slow(name, values, dtype)
    try:
        arr = pa.array(values, type=_arrow_type(dtype), from_pandas=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
        return _strict_series_slow(name, values, dtype)
    if dtype == pl.List(pl.String) and arr.flatten().null_count:
        return _strict_series_slow(name, values, dtype)
    return pl.Series(name, arr), []


def _strict_series_slow(name: str, values: list[Any], dtype: pl.DataType) -> tuple[pl.Series, list[int]]:
    bad = [i for i, v in enumerate(values) if v is not None and not _fits(v, dtype)]
    bad_set = set(bad)
    cleaned = [None if i in bad_set else v for i, v in enumerate(values)] if bad else values
    if dtype == pl.Float64:  # Arrow refuses integers a double cannot hold exactly; the range rule reports them
        cleaned = [float(v) if type(v) is int else v for v in cleaned]
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
@functools.cache
def _nfc_unstable_class() -> str:
    """Regex class of the characters a text must contain for NFC to change it.

    A character outside it is assigned (in this Python's Unicode version), has combining
    class 0, is unchanged by NFC and never combines with a preceding character (not the
    second of a canonical pair, not a Hangul vowel/trailing jamo): NFC_Quick_Check=Yes.  A
    text of such characters is NFC, and by Unicode's normalization stability it stays NFC in
    later versions, so Polars' (slow) NFC pass would return it unchanged.
    """
    decomposition, category, combining, normalize = (unicodedata.decomposition, unicodedata.category,
                                                      unicodedata.combining, unicodedata.normalize)
    unstable = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))  # Hangul V and T jamo
    for cp in range(0x80, 0x32000):
        if 0xD800 <= cp < 0xE000:
            continue  # surrogates never occur in text
        ch = chr(cp)
        d = decomposition(ch)
        if d and d[0] != "<":  # canonical decomposition
            parts = d.split()
            if len(parts) == 2:
                unstable.add(int(parts[1], 16))
            if normalize("NFC", ch) != ch:
                unstable.add(cp)
                continue
        if combining(ch) or category(ch) == "Cn":
            unstable.add(cp)
    ranges: list[list[int]] = []
    for cp in sorted(unstable):
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    ranges += [[0x32000, 0xDFFFF], [0xE1000, 0x10FFFF]]  # rarely used planes: always normalised
    return "[" + "".join(f"\\x{{{a:x}}}" + (f"-\\x{{{b:x}}}" if b > a else "") for a, b in ranges) + "]"


def _nfc_where_needed(s: pl.Series) -> pl.Series:
    """NFC, applied only to the texts it could change (``schemas.text._nfc_non_ascii`` does it
    to every non-ASCII text; the results are the same, see ``_nfc_unstable_class``)."""
    non_ascii = (s.str.len_bytes() != s.str.len_chars()).fill_null(False)
    if not non_ascii.any():
        return s
    unstable = _nfc_unstable_class()
    if not s.filter(non_ascii).unique().str.contains(unstable).any():  # texts repeat: test each once
        return s
    idx = s.str.contains(unstable).fill_null(False).arg_true()
    return s.scatter(idx, s.gather(idx).str.normalize("NFC"))


def _lf_nfc(s: pl.Series) -> pl.Series:
    if s.str.contains("\r", literal=True).any():
        s = s.str.replace_all(r"\r\n?", "\n")
    return _nfc_where_needed(s)


def _normalize_expr(expr: pl.Expr) -> pl.Expr:
    """Same result as :func:`schemas.text.normalize_text_expr` (CRLF/CR -> LF, NFC, strip), faster."""
    return expr.map_batches(_lf_nfc, return_dtype=pl.String, is_elementwise=True).str.strip_chars(WHITESPACE)


def _error_columns(df: pl.DataFrame, dimension_rule: DimensionsConfig | None = None) -> pl.DataFrame:
    """Normalise texts, derive missing labels from ``dimensions`` (the policy's dimension rule,
    :func:`pipeline.dimensions.derive_labels`), then add ``_err_field`` / ``_err_reason``: the
    first failed rule per row (null if valid)."""
    c = pl.col
    df = derive_labels(df, dimension_rule).with_columns(
        prompt=c("prompt").list.eval(pl.struct(
            role=pl.element().struct.field("role"), content=_normalize_expr(pl.element().struct.field("content")))),
        response_a=_normalize_expr(c("response_a")),
        response_b=_normalize_expr(c("response_b")),
        _created=parse_timestamps(df["created_at"]),
    )
    roles_ok = c("prompt").list.eval(pl.element().struct.field("role").is_in(list(ROLES))).list.all()
    last_role = c("prompt").list.last().struct.field("role")
    last_content = c("prompt").list.last().struct.field("content")
    rules: list[tuple[str, str, pl.Expr]] = [
        ("comparison_id", "missing_field", c("comparison_id").is_null()),
        ("comparison_id", "invalid_value", c("comparison_id").str.strip_chars() == ""),
        ("pair_id", "invalid_value", c("pair_id").str.strip_chars() == ""),  # (absent: derived from the content)
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
        ("label", "invalid_value", c("label").is_null() & c("dimensions").is_not_null()),  # no rule derived it
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
        # a review is a judgment of the pair it reviews: pair_id (when given) must name that pair
        ("review_of", "invalid_value", c("review_of").str.strip_chars() == ""),
        ("review_of", "invalid_value", c("review_of").is_not_null() & c("pair_id").is_not_null()
         & (c("pair_id") != c("review_of"))),
    ]
    failed = df.select([cond.fill_null(False).alias(str(i)) for i, (_, _, cond) in enumerate(rules)]).to_numpy()
    rows = np.flatnonzero(failed.any(axis=1))
    if not len(rows):
        return df.with_columns(_err_field=pl.lit(None, dtype=pl.String), _err_reason=pl.lit(None, dtype=pl.String))
    first = failed[rows].argmax(axis=1)  # the first rule that failed wins
    err_field: list[str | None] = [None] * df.height
    err_reason: list[str | None] = [None] * df.height
    for r, k in zip(rows.tolist(), first.tolist(), strict=True):
        err_field[r], err_reason[r] = rules[k][0], rules[k][1]
    return df.with_columns(_err_field=pl.Series(err_field, dtype=pl.String), _err_reason=pl.Series(err_reason, dtype=pl.String))


_AWARE_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M%:z")
_NAIVE_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d")


def _timestamp_text(expr: pl.Expr) -> pl.Expr:
    return expr.str.strip_chars().str.replace(r"[Zz]$", "+00:00").str.replace(r"^(\d{4}-\d\d-\d\d) ", "${1}T")


def _strptime(expr: pl.Expr, fmt: str) -> pl.Expr:
    if fmt in _AWARE_FORMATS:
        return expr.str.strptime(pl.Datetime("us", "UTC"), fmt, strict=False)
    return expr.str.strptime(pl.Datetime("us"), fmt, strict=False).dt.replace_time_zone("UTC")


def parse_timestamp_expr(expr: pl.Expr) -> pl.Expr:
    """ISO 8601 text -> UTC timestamp (null when unparseable); naive times are taken as UTC.

    Explicit formats, coalesced: Polars' format inference looks at the first value only.
    """
    e = _timestamp_text(expr)
    return pl.coalesce([_strptime(e, f) for f in _AWARE_FORMATS + _NAIVE_FORMATS])


def parse_timestamps(s: pl.Series) -> pl.Series:
    """:func:`parse_timestamp_expr` on a Series, trying a format only on the values still
    unparsed, and each distinct value once when values repeat."""
    uniq = s.unique()
    if len(uniq) * 2 < len(s):
        parsed = _parse_timestamps(uniq.drop_nulls())
        return s.replace_strict(uniq.drop_nulls(), parsed, default=None, return_dtype=parsed.dtype).alias("_created")
    return _parse_timestamps(s)


def _parse_timestamps(s: pl.Series) -> pl.Series:
    text = pl.select(_timestamp_text(pl.lit(s))).to_series()
    out = None
    for fmt in _AWARE_FORMATS + _NAIVE_FORMATS:
        if out is None:
            out = pl.select(_strptime(pl.lit(text), fmt)).to_series()
        else:
            todo = (out.is_null() & text.is_not_null()).arg_true()
            if not len(todo):
                break
            out = out.scatter(todo, pl.select(_strptime(pl.lit(text.gather(todo)), fmt)).to_series())
    return out.alias("_created")


_EXPECTED = {
    "comparison_id": "a non-empty string", "prompt": "a non-empty string or a list of {role, content} messages ending with a user turn",
    "response_a": "a non-empty string or an object with non-empty 'text'", "response_b": "a non-empty string or an object with non-empty 'text'",
    "label": f"one of {list(LABELS)}", "shown_first": "'a' or 'b'", "strength": "a number in [0, 1]",
    "confidence": "a number in [0, 1]", "annotator_id": "a non-empty string", "annotator_kind": "'human', 'ai' or 'unknown'",
    "gold_label": f"one of {list(LABELS)}", "locale": "a BCP 47 tag such as 'en' or 'ja-JP'",
    "created_at": "an ISO 8601 timestamp", "tags": "a list of strings", "batch_id": "a string",
    "pair_id": "a non-empty string (or no pair_id at all: it is then derived from the content)",
    "rubric": "a string", "critique": "a string", "dimensions": "an object of dimension name -> verdict",
    "review_of": "the pair_id of the routed pair this judgment reviews (a non-empty string equal to pair_id when both are given)",
}


def _found(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _underived_label(dimension_rule: DimensionsConfig | None) -> str:
    if dimension_rule is None or not dimension_rule.has_rule:
        return ("field 'label': required, found nothing; the row gives 'dimensions' but the policy has no dimension "
                "rule to derive the label from them (set [dimensions] priority, or primary with veto)")
    named = dimension_rule.priority or [dimension_rule.primary]
    return (f"field 'label': required, found nothing; the dimension rule cannot derive it: 'dimensions' gives a "
            f"verdict on none of {named}")


def error_message(record: dict[str, Any], field_name: str, reason: str,
                  dimension_rule: DimensionsConfig | None = None) -> str:
    """A precise message for one failed row: the field, what was expected, what was found.

    Pydantic's own error for the field is appended when it has one.
    """
    if field_name == "label" and reason == "invalid_value" and record.get("label") is None:
        return _underived_label(dimension_rule)
    if field_name == "review_of" and reason == "invalid_value" and isinstance(record.get("review_of"), str) \
            and record["review_of"].strip() and record.get("pair_id") is not None:
        return (f"field 'review_of': {_found(record['review_of'])} differs from pair_id {_found(record['pair_id'])}; "
                "a review is a judgment of the pair it reviews (give the same id, or leave pair_id out)")
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


# ---------------------------------------------------------------- one batch, row by row
@dataclass
class _BatchOut:
    valid: pl.DataFrame  # judgments (empty when not finished: validate-only runs skip hashing)
    quarantine: list[dict[str, Any]]
    rows_in: int
    rows_valid: int
    judgments: int
    skipped: int


@dataclass
class _Checked:
    """Rows validated, texts normalised; hashes and ids not derived yet (see :func:`_finish`)."""

    valid: pl.DataFrame
    quarantine: list[dict[str, Any]]
    rows_valid: int
    skipped: int


def _quarantine_row(source: str, row: RawRow, reason: str, fname: str | None, error: str) -> dict[str, Any]:
    return {"source_file": source, "line": row.line, "raw": row.raw, "reason": reason, "field": fname, "error": error}


def _validate_rows(rows: list[RawRow], fmt: str, ctx: AdapterContext, source: str) -> _Checked:
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

    cols, struct_errors, dim_errors = _extract(records)
    series = []
    bad_type: dict[int, str] = {i: f for i, (f, _) in struct_errors.items()}
    for name, dtype in _RAW_COLUMNS.items():
        if name == "dimensions":  # parsed and checked by _extract
            series.append(pl.Series(name, pa.array(cols[name], type=_arrow_type(dtype))))
            continue
        s, bad = _strict_series(name, cols[name], dtype)
        for i in bad:
            bad_type.setdefault(i, name)
        series.append(s)
    df = pl.DataFrame(series).with_columns(
        _rec=pl.int_range(pl.len(), dtype=pl.Int64),
        _line=pl.Series([rows[o].line for o in owner], dtype=pl.Int64),
    )
    df = _error_columns(df, ctx.dimension_rule)
    bad_reason = {i: "invalid_type" for i in bad_type}
    for i, (fname, reason, _) in dim_errors.items():
        if i not in bad_type:
            bad_type[i], bad_reason[i] = fname, reason
    if bad_type:
        idx = pl.Series("_rec", list(bad_type), dtype=pl.Int64)
        fld = pl.Series("_tf", list(bad_type.values()), dtype=pl.String)
        why = pl.Series("_tr", [bad_reason[i] for i in bad_type], dtype=pl.String)
        df = df.join(pl.DataFrame([idx, fld, why]), on="_rec", how="left").with_columns(
            _err_field=pl.coalesce("_tf", "_err_field"),
            _err_reason=pl.coalesce("_tr", "_err_reason"),
        ).drop("_tf", "_tr")

    # a row expanded into several judgments is valid only if all of them are
    bad_recs = df.filter(pl.col("_err_reason").is_not_null()).select("_rec", "_err_field", "_err_reason")
    bad_owner_rows: dict[int, tuple[int, str, str]] = {}
    for rec, fname, reason in bad_recs.iter_rows():
        bad_owner_rows.setdefault(owner[rec], (rec, fname, reason))
    for ri, (rec, fname, reason) in sorted(bad_owner_rows.items()):
        row = rows[ri]
        dim_err = dim_errors.get(rec)
        msg = dim_err[2] if dim_err is not None and dim_err[0] == fname else \
            error_message(records[rec], fname, reason, ctx.dimension_rule)
        quarantine.append(_quarantine_row(source, row, reason, fname, f"line {row.line}: " + msg))
    if bad_owner_rows:
        bad_rec_ids = [r for r, o in enumerate(owner) if o in bad_owner_rows]
        df = df.filter(~pl.col("_rec").is_in(bad_rec_ids))
    valid_rows = len({owner[r] for r in df["_rec"].to_list()}) if df.height else 0
    return _Checked(df, quarantine, valid_rows, skipped)


def _process_batch(rows: list[RawRow], fmt: str, ctx: AdapterContext, source: str, finish: bool = True) -> _BatchOut:
    ch = _validate_rows(rows, fmt, ctx, source)
    valid = _finish(ch.valid, ctx.batch_id, source) if finish else empty_frame(Judgment)
    if fmt == "rated":  # a row's several judgments share its place: in the order of their pair ids (then their ids)
        valid = valid.sort(*IN_ROW_ORDER, maintain_order=True)
    return _BatchOut(valid, ch.quarantine, len(rows), ch.rows_valid, ch.valid.height, ch.skipped)


# the order of the judgments of one input row (a rated row gives several, all at its place -- its file and line):
# by pair id, then comparison id.  A build over partitions, whose partitions each hold some of a row's judgments,
# merges them back in this order (pipeline/partitioned_build.py); the pairs first seen at one place rank by pair id
IN_ROW_ORDER = ("source_line", "pair_id", "comparison_id")


# ---------------------------------------------------------------- one JSONL block, vectorised (canonical rows)
# Lines that Arrow's strict reader parses are taken column-wise; a line it cannot parse, or
# whose values it may read differently from orjson, and every row that fails validation go
# through the per-row path above, which decides the quarantine reason and message.  So the
# result is the per-row result (tests/test_ingest.py compares the two).
FAST_JSONL = True  # tests switch it off to compare with the per-row path

_PA_MSG = pa.struct([("role", pa.string()), ("content", pa.string())])
_PA_RESPONSE = pa.struct([("text", pa.string()), ("model", pa.string()), ("model_version", pa.string())])
_POLY = ("prompt", "response_a", "response_b")  # a JSON string or structured (messages / response object)
_STRING_SHAPE = tuple(rf'"{f}"\s*:\s*"' for f in _POLY)
_KEY_WITH_ESCAPE = r'\\(?:[^"\\]|\\.)*"\s*:'  # a key written with an escape (the regexes below would miss it)
_EXACT_INT = 2.0 ** 53  # orjson keeps larger integers exact; Arrow rounds them to float


@functools.cache
def _canonical_schema(shape: tuple[bool, ...]) -> pa.Schema:
    """Explicit Arrow schema of a canonical row; ``shape`` says which of ``_POLY`` are strings."""
    structured = {"prompt": pa.list_(_PA_MSG), "response_a": _PA_RESPONSE, "response_b": _PA_RESPONSE}
    other = {"strength": pa.float64(), "confidence": pa.float64(), "tags": pa.list_(pa.string())}
    return pa.schema([
        pa.field(name, (pa.string() if shape[_POLY.index(name)] else structured[name]) if name in _POLY
                 else other.get(name, pa.string()))
        for name in RawJudgment.model_fields if name not in _INFERRED
    ])


# fields Arrow infers like unknown ones (an object of free keys); ``_part_frame`` takes them per row
_INFERRED = frozenset({"dimensions"})


def _unknown_children(got: pa.DataType, want: pa.DataType) -> list[str]:
    if pa.types.is_list(got):
        got, want = got.value_type, want.value_type
    known = {want.field(i).name for i in range(want.num_fields)}
    return [got.field(i).name for i in range(got.num_fields) if got.field(i).name not in known]


def _known_only(arr: pa.Array, typ: pa.DataType) -> pa.Array:
    """A struct (or list of structs) array cut down to the children of ``typ``."""
    if pa.types.is_list(typ):
        return pa.ListArray.from_arrays(arr.offsets, _known_only(arr.values, typ.value_type), mask=arr.is_null())
    children = dict(zip([arr.type.field(i).name for i in range(arr.type.num_fields)], arr.flatten(), strict=True))
    names = [typ.field(i).name for i in range(typ.num_fields)]
    return pa.StructArray.from_arrays([children[n] for n in names], names=names, mask=arr.is_null())


def _part_frame(part: ArrowPart, block: LineBlock) -> tuple[pl.DataFrame, list[int]]:
    """Raw columns (as ``_extract`` + ``_strict_series`` build them) of the rows of one parsed
    part, and the lines that must go the per-row way instead."""
    table, shape = part.table, part.shape
    schema = _canonical_schema(shape)
    # rows with dimensions (Arrow inferred the object): column-wise where Arrow typed them as
    # expected, the others (dims_np) from the line itself, below
    dims_np = np.zeros(table.num_rows, dtype=bool)
    dims_col: pl.Series | None = None
    if "dimensions" in table.column_names:
        dims_col, dims_np = dimensions_from_arrow(table["dimensions"])
        table = table.drop_columns(["dimensions"])
    unknown = [n for n in table.column_names if n not in schema.names]
    nested = {f: _unknown_children(table.schema.field(f).type, schema.field(f).type)
              for f in _POLY if table.schema.field(f).type != schema.field(f).type}
    if unknown or nested:  # Polars sees only the canonical fields
        table = pa.table([table[f.name] if f.type == table.schema.field(f.name).type else
                          pa.chunked_array([_known_only(ch, f.type) for ch in table[f.name].chunks], type=f.type)
                          for f in schema], schema=schema)
    df = pl.from_arrow(table)
    c = pl.col
    # Arrow accepts NaN/Infinity (orjson does not), reads -0 as -0.0 (orjson: int 0) and rounds
    # huge integers; a null inside a list is a type error per row
    suspect = pl.lit(False)
    for f in ("strength", "confidence"):
        x = c(f)
        suspect = suspect | (x.is_nan() | x.is_infinite() | (x.abs() >= _EXACT_INT) | ((x == 0) & (1.0 / x < 0))).fill_null(False)
    if not shape[0]:
        msg = pl.element().struct
        suspect = suspect | c("prompt").list.eval(msg.field("role").is_null() | msg.field("content").is_null()).list.any().fill_null(False)
    suspect = suspect | (c("tags").list.len() != c("tags").list.drop_nulls().list.len()).fill_null(False)
    suspect_np = df.select(suspect.alias("suspect"))["suspect"].to_numpy().copy()
    # rows with unknown keys need their ``extra`` JSON from the row itself: a key is in the line
    # as written (any value, null too) or written with an escape
    present_np = np.zeros(df.height, dtype=bool)
    if unknown or nested:
        names = unknown + [ch for children in nested.values() for ch in children]
        lines = lines_array(block).take(pa.array(part.lines))
        present_np |= pc.match_substring_regex(lines, "(?:" + "|".join(re.escape(json.dumps(n)) for n in names) + r")\s*:").to_numpy(zero_copy_only=False)
        present_np |= pc.match_substring_regex(lines, _KEY_WITH_ESCAPE).to_numpy(zero_copy_only=False)
    if "prompt" in nested:  # messages with unknown keys are invalid: the per-row path says how
        suspect_np |= present_np
    extra: list[str | None] = [None] * df.height
    dims: dict[int, list[dict[str, Any]] | None] = {}
    todo = np.flatnonzero((present_np | dims_np) & ~suspect_np)
    data, loads = block.data, orjson.loads
    for k, a, b in zip(todo.tolist(), block.starts[part.lines[todo]].tolist(), block.ends[part.lines[todo]].tolist(), strict=True):
        try:
            line = data[a:b]  # the line parsed before, so it has no surrounding blanks but maybe a CR
            obj = loads(line)
            if type(obj) is not dict:
                raise ValueError("not an object")
            if int_beyond_64_bits(line) is not None:  # (orjson would round it into ``extra``)
                raise ValueError("an integer beyond 64 bits")
            if present_np[k]:
                extra[k] = _extra_json(obj)
            if dims_np[k]:
                dims[k], err = parse_dimensions(obj.get("dimensions"))  # type: ignore[index]
                if err is not None:
                    raise ValueError(err[2])
        except Exception:  # noqa: BLE001 - whatever it is, the per-row path reports it
            suspect_np[k] = True
    prompt = c("prompt")
    if shape[0]:
        prompt = pl.when(prompt.is_not_null()).then(pl.concat_list(pl.struct(role=pl.lit("user"), content=prompt)))
    cols: dict[str, pl.Expr] = {"prompt": prompt}
    for side, f in (("a", "response_a"), ("b", "response_b")):
        if shape[_POLY.index(f)]:
            cols[f], cols[f"model_{side}"], cols[f"model_version_{side}"] = c(f), pl.lit(None), pl.lit(None)
        else:
            cols[f] = c(f).struct.field("text")
            cols[f"model_{side}"] = c(f).struct.field("model")
            cols[f"model_version_{side}"] = c(f).struct.field("model_version")
    cols["extra"] = pl.Series(extra, dtype=pl.String) if present_np.any() else pl.lit(None)
    if dims:  # the rows parsed from their line replace the column-wise nulls
        full: list[list[dict[str, Any]] | None] = [None] * df.height
        for i, v in dims.items():
            full[i] = v
        per_row = pl.Series(pa.array(full, type=_arrow_type(_RAW_COLUMNS["dimensions"])))
        taken = np.zeros(df.height, dtype=bool)
        taken[list(dims)] = True
        dims_col = pl.select(pl.when(pl.Series(taken)).then(pl.lit(per_row)).otherwise(pl.lit(dims_col))).to_series()
    cols["dimensions"] = dims_col if dims_col is not None else pl.lit(None)
    out = df.select(
        *[(cols[name] if name in cols else c(name)).cast(dtype).alias(name) for name, dtype in _RAW_COLUMNS.items()],
        _line=pl.Series(part.lines + block.first_line, dtype=pl.Int64),
    )
    if suspect_np.any():
        out = out.filter(pl.Series(~suspect_np))
    return out, part.lines[suspect_np].tolist()


def _shape_of(obj: dict[str, Any] | None) -> tuple[bool, ...]:
    return tuple(isinstance((obj or {}).get(f), str) for f in _POLY)


@dataclass
class _ParsedBlock:
    block: LineBlock
    parts: list[ArrowPart]
    slow: set[int]  # block line indices for the per-row path


_Hint = tuple[tuple[bool, ...] | None, frozenset[str]]  # (a block's main shape, the fields split on)


def _parse_block(block: LineBlock, hint: _Hint) -> tuple[_ParsedBlock, _Hint]:
    """Arrow-parse a block of canonical JSONL, trying the shape of ``hint`` first (a block parsed before it;
    ``None``: the block's first row's); returns the parse and this block's hint for a later one."""
    shape, split = hint
    cand = candidate_lines(block, block.starts)
    slow: set[int] = set(np.flatnonzero(~cand).tolist())  # blank lines too: they are dropped as rows
    idx = np.flatnonzero(cand)
    parts: list[ArrowPart] = []
    if len(idx):
        if shape is None:
            first = decode_line(0, block.line(int(idx[0])))
            shape = _shape_of(first.obj if first is not None else None)
        parts, failed, split = parse_block_arrow(block, idx, _canonical_schema, _POLY, _STRING_SHAPE, shape, split)
        slow.update(failed)
        if parts:
            shape = max(parts, key=lambda p: p.table.num_rows).shape
    return _ParsedBlock(block, parts, slow), (shape, split)


def _process_block(parsed: _ParsedBlock, ctx: AdapterContext, source: str, finish: bool) -> _BatchOut:
    """One block of canonical JSONL: Arrow-parsed columns, per-row path for the rest."""
    block, slow = parsed.block, parsed.slow
    frames: list[pl.DataFrame] = []
    for part in parsed.parts:
        df, lines = _part_frame(part, block)
        slow.update(lines)
        if df.height:
            frames.append(df)
    fast = None
    if frames:
        fast = pl.concat(frames, how="vertical")
        if len(frames) > 1:
            fast = fast.sort("_line")
        fast = _error_columns(fast.with_columns(_rec=pl.int_range(pl.len(), dtype=pl.Int64)).select(*_RAW_COLUMNS, "_rec", "_line"),
                              ctx.dimension_rule)
        failed_rows = fast["_err_reason"].is_not_null()
        if failed_rows.any():  # the per-row path gives them their reason and message
            slow.update((fast.filter(failed_rows)["_line"] - block.first_line).to_list())
            fast = fast.filter(~failed_rows)
    rows = block.raw_rows(sorted(slow))
    checked = _validate_rows(rows, "canonical", ctx, source) if rows else None
    valid = [d for d in (fast, checked.valid if checked else None) if d is not None and d.height]
    if len(valid) == 2:
        valid = [pl.concat([valid[0], valid[1].select(valid[0].columns)], how="vertical").sort("_line")]
    n_fast = fast.height if fast is not None else 0
    n_valid = n_fast + (checked.rows_valid if checked else 0)
    judgments = sum(d.height for d in valid)
    out = _finish(valid[0], ctx.batch_id, source) if finish and valid else empty_frame(Judgment)
    return _BatchOut(out, checked.quarantine if checked else [], n_fast + len(rows), n_valid, judgments,
                     checked.skipped if checked else 0)


# canonical JSONL blocks parsed and processed at once, each on a thread of its own (the parse's Python share -- the
# line scan, the shape checks -- and the processing's -- the content hashes -- hold the GIL part of the time; one
# block at a time left ~0.3 of two cores idle, the parse of the next block waiting on none of it)
BLOCK_THREADS = 2


def _blocks_in_order(blocks: Iterator[LineBlock], work: Callable[[_ParsedBlock], Any],
                     pool: ThreadPoolExecutor) -> Iterator[Any]:
    """``work`` of each parsed block, yielded in input order; while the caller takes one, the next blocks (one per
    worker of ``pool``) are parsed and worked on.  Block k is parsed with the hint of block k - workers (known by then: the same hint whatever the
    timing, so the same parse).  Leaving early (an error, the caller's) cancels what has not started and waits
    for the rest."""
    depth = pool._max_workers  # noqa: SLF001 - the pool is this module's own
    hints: deque[Future[_Hint] | _Hint] = deque([(None, frozenset())] * depth)
    pending: deque[Future[Any]] = deque()

    def one(block: LineBlock, hint: _Hint, hint_out: Future[_Hint]) -> Any:
        try:
            parsed, after = _parse_block(block, hint)
        except BaseException as err:
            hint_out.set_exception(err)
            raise
        hint_out.set_result(after)
        return work(parsed)

    try:
        for block in blocks:
            hint = hints.popleft()
            hint_out: Future[_Hint] = Future()
            pending.append(pool.submit(one, block, hint.result() if isinstance(hint, Future) else hint, hint_out))
            hints.append(hint_out)
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
        wait(pending)


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
    (pt, ph), (ra, ah), (rb, bh) = (text_hashes(df[c], dedup=True) for c in ("prompt_text", "response_a", "response_b"))
    df = df.with_columns(prompt_text=pt, response_a=ra, response_b=rb, prompt_hash=ph, a_hash=ah, b_hash=bh).with_columns(pair_id=pl.coalesce(c("pair_id"), c("review_of"), pair_id_expr(c("prompt_hash"), c("a_hash"), c("b_hash"))))
    return conform(df, Judgment).select(list(polars_schema(Judgment)))


# ---------------------------------------------------------------- files
def _batch_name(path: Path) -> str:
    name = path.name
    for suf in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".csv"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
    return name


def resolve_format(path: Path, fmt: str | None, limits: IngestConfig | None = None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise UnreadableFile(path, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    objects, first_bad, n_rows = peek_rows(path, 50, limits or IngestConfig())
    detected = detect_format(objects)
    if detected is None:
        # (nothing to vote with is said as such: an empty file or a JSON array is no question of format)
        if not n_rows:
            why = "the file has no rows (it is empty or holds only blank lines)"
        elif first_bad is not None and (not objects or first_bad.raw.startswith("[")):
            why = f"line {first_bad.line}: {first_bad.error}"
            if first_bad.raw.startswith("["):
                why += "; JSON Lines holds one JSON object per line: a JSON array is not read (convert it, e.g. jq -c '.[]')"
        else:
            why = ("expected canonical rows (response_a/response_b/label), TRL rows (prompt/chosen/rejected), HH-RLHF "
                   "transcripts (chosen/rejected) or rated candidate lists; force one with --format")
        raise UnreadableFile(path, f"unknown record format: {why}")
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
    limits: IngestConfig | None = None,
    dimensions: DimensionsConfig | None = None,
    on_judgments: Callable[[pl.DataFrame], None] | None = None,
    hashed: Mapping[str, FileHash | Future[FileHash]] | None = None,
) -> IngestResult:
    """Ingest files; raises :class:`UnreadableFile` before reading rows if any file is unusable
    as a whole, and while reading for damage found on the way (a corrupt gzip stream or Parquet
    page, a line or a decompressed size beyond the caps of ``limits``, the policy's ``ingest``).

    With ``keep_judgments=False`` valid rows are counted and discarded batch by batch
    (``validate``: memory stays flat whatever the input size).  ``dimensions``: the policy's
    dimension section; its rule derives the label of rows that give ``dimensions`` but no ``label``.
    ``on_judgments``: each block's valid judgments (in input order) are handed to it instead of
    being kept (the result's judgments are then empty): ``pipeline.partition`` spills them.
    ``hashed``: files (by ``str(path)``) hashed already (``curate`` hashes its inputs for the version
    id first): not hashed again, and refused if they changed since (:meth:`FileHash.check`, before
    and after they are read); or a ``Future`` of the :class:`FileHash` another thread is computing
    meanwhile (a first version's partitioning: the hash beside the parse), checked after the read.
    """
    limits = limits or IngestConfig()
    paths = [Path(p) for p in paths]
    plans = []
    for p in paths:  # check every file before any work: unreadable input writes nothing
        if not p.exists():
            raise UnreadableFile(p, "no such file")
        plans.append((p, resolve_format(p, fmt, limits)))

    ledger = IngestLedger()
    pool = ThreadPoolExecutor(1)  # the file's hash beside its parse (hashlib releases the GIL)
    work = ThreadPoolExecutor(BLOCK_THREADS, thread_name_prefix="prefpipe-ingest")  # blocks processed at once
    try:
        frames: list[pl.DataFrame] = []
        quarantine: list[dict[str, Any]] = []
        sources: list[SourceInfo] = []
        for p, f in plans:
            ctx = AdapterContext(stem=_batch_name(p), batch_id=batch_id or _batch_name(p),
                                 annotator_id=annotator_id, annotator_kind=annotator_kind, dimension_rule=dimensions)
            known = (hashed or {}).get(str(p))
            pending: Future[FileHash] | None = None
            if isinstance(known, Future):  # being hashed on the caller's thread while it is read here
                pending, known = known, None
            source = known.source if known is not None and known.source else str(p)
            if known is not None:
                known.check(p)
                sha: Future[str] = Future()
                sha.set_result(known.sha256)
            elif pending is None:
                sha = pool.submit(file_sha256, p)
            n_in = n_valid = n_j = n_skip = 0
            q_before = len(quarantine)
            if FAST_JSONL and f == "canonical" and container_of(p) == "jsonl":
                batches = _blocks_in_order(jsonl_blocks(p, batch_rows, limits),
                                           functools.partial(_process_block, ctx=ctx, source=source, finish=keep_judgments),
                                           work)
            else:
                batches = (_process_batch(rows, f, ctx, source, keep_judgments) for rows in iter_raw_rows(p, batch_rows, limits))
            for out in batches:
                n_in += out.rows_in
                n_valid += out.rows_valid
                n_j += out.judgments
                n_skip += out.skipped
                quarantine.extend(out.quarantine)
                if keep_judgments and out.valid.height:
                    if on_judgments is not None:
                        on_judgments(out.valid)
                    else:
                        frames.append(out.valid)
                if on_progress:
                    on_progress(out.rows_in)
            if pending is not None:  # (the file as hashed: the same size and time now, after it was read)
                known = pending.result()
                known.check(p)
                sha = Future()
                sha.set_result(known.sha256)
            elif known is not None:
                known.check(p)
            quarantine[q_before:] = sorted(quarantine[q_before:], key=lambda q: q["line"])
            n_q = len(quarantine) - q_before
            by_reason: dict[str, int] = {}
            for q in quarantine[q_before:]:
                by_reason[q["reason"]] = by_reason.get(q["reason"], 0) + 1
            file_ledger = IngestLedger(rows_in=n_in, rows_valid=n_valid, quarantined=n_q, quarantined_by_reason=by_reason,
                                       judgments=n_j, skipped={"identical_candidates": n_skip} if n_skip else {})
            ledger = ledger.merged(file_ledger)
            sources.append(SourceInfo(path=source, sha256=sha.result(), bytes=p.stat().st_size, format=f,
                                      rows_in=n_in, rows_valid=n_valid, quarantined=n_q, judgments=n_j))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        work.shutdown(wait=True, cancel_futures=True)
    judgments = pl.concat(frames, how="vertical") if frames else empty_frame(Judgment)
    qframe = pl.DataFrame(quarantine, schema=QUARANTINE_SCHEMA) if quarantine else pl.DataFrame(schema=QUARANTINE_SCHEMA)
    return IngestResult(judgments, qframe, ledger, sources)


def judgments_from_records(records: list[dict[str, Any]], source_file: str = "<memory>", batch_id: str = "memory",
                           dimensions: DimensionsConfig | None = None) -> pl.DataFrame:
    """Canonical raw dicts -> judgments frame (for tests and programmatic use).

    Raises ``ValueError`` listing the first errors if any record is invalid.
    """
    rows = [RawRow(i + 1, json.dumps(r, ensure_ascii=False, default=str), r) for i, r in enumerate(records)]
    out = _process_batch(rows, "canonical", AdapterContext(stem=source_file, batch_id=batch_id, dimension_rule=dimensions),
                         source_file)
    if out.quarantine:
        errs = "; ".join(q["error"] for q in out.quarantine[:5])
        raise ValueError(f"{len(out.quarantine)} invalid record(s): {errs}")
    return out.valid
