"""Containers: stream raw rows out of JSONL (optionally gzip), Parquet and CSV files.

A reader yields lists of :class:`RawRow` in bounded batches so that memory stays flat on
large inputs.  A row carries its 1-based line number, its raw text (for quarantine) and
the decoded object, or the reason it could not be decoded.  A file that cannot be read
as a whole (missing, not UTF-8, unknown container) raises :class:`UnreadableFile`
before anything is yielded.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

SNIFF_BYTES = 64 * 1024


class UnreadableFile(Exception):
    """The file as a whole cannot be read; nothing from it is used."""

    def __init__(self, path: str | Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path = str(path)
        self.why = why


@dataclass(slots=True)
class RawRow:
    line: int
    raw_data: str | bytes  # decoded lazily: only quarantined rows need their text
    obj: dict[str, Any] | None
    error: str | None = None  # set when obj is None: why it could not be decoded

    @property
    def raw(self) -> str:
        d = self.raw_data
        return d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d


def container_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, kind in ((".jsonl.gz", "jsonl"), (".ndjson.gz", "jsonl"), (".json.gz", "jsonl"),
                         (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"),
                         (".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv")):
        if name.endswith(suffix):
            return kind
    raise UnreadableFile(path, f"unknown file type {path.suffix or '(no suffix)'!r}; expected .jsonl, .jsonl.gz, .parquet or .csv")


def _open_binary(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _check_utf8(path: Path) -> None:
    """Sniff the head of the file: a file that is not UTF-8 is rejected as a whole."""
    try:
        with _open_binary(path) as fh:
            head = fh.read(SNIFF_BYTES)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UnreadableFile(path, f"cannot read: {err}") from err
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UnreadableFile(path, "not UTF-8: found a UTF-16 byte-order mark")
    # a few bad lines are quarantined row by row; a file that is mostly not UTF-8 is rejected
    lines = [ln for ln in head.split(b"\n")[:-1] if ln.strip()] or [head]
    bad = 0
    first_err = None
    for ln in lines:
        try:
            ln.decode("utf-8")
        except UnicodeDecodeError as err:
            bad += 1
            first_err = first_err or f"invalid byte 0x{ln[err.start]:02x}"
    if bad and bad >= max(2, len(lines) // 10) or (bad and len(lines) == 1):
        raise UnreadableFile(path, f"not UTF-8: {bad} of the first {len(lines)} lines do not decode ({first_err})")


def _jsonl_rows(path: Path, batch_rows: int) -> Iterator[list[RawRow]]:
    batch: list[RawRow] = []
    loads = orjson.loads
    with _open_binary(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            stripped = line.strip()
            if not stripped:
                continue  # blank lines are not rows
            try:
                obj = loads(stripped)
            except orjson.JSONDecodeError as err:
                why = "invalid UTF-8" if "utf-8" in str(err).lower() else str(err)
                batch.append(RawRow(lineno, stripped, None, f"expected a JSON object, found invalid JSON ({why})"))
            else:
                if type(obj) is dict:
                    batch.append(RawRow(lineno, stripped, obj))
                else:
                    batch.append(RawRow(lineno, stripped, None, f"expected a JSON object, found {type(obj).__name__}"))
            if len(batch) >= batch_rows:
                yield batch
                batch = []
    if batch:
        yield batch


def _open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise UnreadableFile(path, f"not a readable Parquet file: {err}") from err


def _parquet_rows(pf, batch_rows: int) -> Iterator[list[RawRow]]:
    row = 0
    for rb in pf.iter_batches(batch_size=batch_rows):
        out = []
        for obj in rb.to_pylist():
            row += 1
            out.append(RawRow(row, json.dumps(obj, ensure_ascii=False, default=str), obj))
        yield out


_CSV_JSON_FIELDS = {"prompt", "response_a", "response_b", "tags", "chosen", "rejected", "completions"}


def _csv_value(key: str, value: str | None) -> Any:
    if value is None or value == "":
        return None
    v = value.strip()
    if key in _CSV_JSON_FIELDS and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return value
    if key == "tags":
        return [t.strip() for t in v.split(";") if t.strip()]
    if key in ("strength", "confidence"):
        try:
            return float(v)
        except ValueError:
            return value  # left as text: validation reports the field
    return value


def _csv_rows(path: Path, batch_rows: int) -> Iterator[list[RawRow]]:
    with _open_binary(path) as bfh:
        fh = io.TextIOWrapper(bfh, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        batch: list[RawRow] = []
        start = reader.line_num + 1
        for values in reader:
            raw = ",".join(values)
            if len(values) != len(header):
                batch.append(RawRow(start, raw, None, f"expected {len(header)} CSV columns, found {len(values)}"))
            else:
                obj = {k: _csv_value(k, v) for k, v in zip(header, values, strict=True)}
                batch.append(RawRow(start, raw, {k: v for k, v in obj.items() if v is not None}))
            start = reader.line_num + 1
            if len(batch) >= batch_rows:
                yield batch
                batch = []
        if batch:
            yield batch


def iter_raw_rows(path: str | Path, batch_rows: int = 50_000) -> Iterator[list[RawRow]]:
    """Yield batches of raw rows. Raises :class:`UnreadableFile` before the first batch."""
    p = Path(path)
    if not p.exists():
        raise UnreadableFile(p, "no such file")
    if not p.is_file():
        raise UnreadableFile(p, "not a regular file")
    kind = container_of(p)
    if kind == "parquet":
        return _parquet_rows(_open_parquet(p), batch_rows)
    _check_utf8(p)
    return _jsonl_rows(p, batch_rows) if kind == "jsonl" else _csv_rows(p, batch_rows)


def peek_objects(path: str | Path, n: int = 20) -> list[dict[str, Any]]:
    """The first ``n`` decodable objects of a file (for format detection)."""
    out: list[dict[str, Any]] = []
    for batch in iter_raw_rows(path, batch_rows=max(n, 1)):
        out.extend(r.obj for r in batch if r.obj is not None)
        if len(out) >= n:
            break
    return out[:n]
