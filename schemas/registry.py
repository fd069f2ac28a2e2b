"""The annotator registry: who may judge what (``../shared/spec/raw-comparisons.md``, "Annotator registry").

One entry per annotator: ``annotator_id``, ``annotator_kind`` (``human`` | ``ai``), and the
qualification -- ``locales`` (a language tag covers its regions: ``ja`` covers ``ja-JP``),
``rubrics`` (empty = any), ``qualified_from`` / ``qualified_until`` (ISO dates, inclusive).
Read from CSV (a header row, one annotator per row, lists ``;``-separated) or TOML (one
``[[annotator]]`` table per entry, lists as ``;``-separated strings or arrays) by
:func:`load_registry`; a file that cannot be used as a whole raises :class:`RegistryError`
naming the file, the line and the field of every problem (at most ``MAX_PROBLEMS``).

The registry is a *set*: entries are sorted by id, lists deduplicated and sorted, locale tags
in BCP 47 case, so a CSV and a TOML file of the same content give the same
:meth:`AnnotatorRegistry.sha256` (of the canonical JSON) -- the hash that version ids and
manifests carry.  Ids and rubric ids follow the safe-id rule of :mod:`schemas.ids` (no
markup, no path separators, no ``..``): they are printed, and an id is never interpreted.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import tomllib
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from schemas.ids import is_safe_id

FIELDS = ("annotator_id", "annotator_kind", "locales", "rubrics", "qualified_from", "qualified_until")
MAX_BYTES = 64 << 20  # a registry is a small table; a file beyond this is a mistake (or hostile)
MAX_PROBLEMS = 20
_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
Problem = tuple[int | None, str, str]  # (line, field, message)
_SAFE_RULE = "1-128 characters of A-Z a-z 0-9 . _ - (not starting with '.' or '-', no '..')"


class RegistryError(ValueError):
    """A registry file that cannot be used; the message names the file, and each problem's line and field."""

    def __init__(self, path: str | Path, problems: list[Problem]):
        self.path, self.problems = str(path), problems
        shown = [f"  line {line}, field {fld}: {msg}" if line else f"  field {fld}: {msg}" if fld else f"  {msg}"
                 for line, fld, msg in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"  ... and {len(problems) - MAX_PROBLEMS} more")
        super().__init__(f"annotator registry {path} cannot be used (nothing written):\n" + "\n".join(shown))


def canonical_locale(tag: str) -> str:
    """BCP 47 case (``ja-JP``, ``zh-Hant-TW``, ``es-419``); ``_`` as separator is read as ``-``."""
    parts = tag.replace("_", "-").split("-")
    out = [parts[0].lower()]
    for p in parts[1:]:
        out.append(p.upper() if len(p) == 2 or p.isdigit() else p.title() if len(p) == 4 else p.lower())
    return "-".join(out)


def _split_list(v: Any) -> Any:
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(s.strip() for s in v.split(";") if s.strip())
    if isinstance(v, list | tuple):
        return tuple(s.strip() if isinstance(s, str) else s for s in v)
    return v


class AnnotatorEntry(BaseModel):
    """One annotator and its qualification (empty ``locales`` / ``rubrics`` = any; no date = open)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    annotator_id: str
    annotator_kind: Literal["human", "ai"]
    locales: tuple[str, ...] = ()
    rubrics: tuple[str, ...] = ()
    qualified_from: date | None = None
    qualified_until: date | None = None

    @field_validator("annotator_id", mode="before")
    @classmethod
    def _safe_id(cls, v: Any) -> Any:
        if not isinstance(v, str):
            raise ValueError(f"expected a string, found {v!r}")
        if not v.strip():
            raise ValueError("required: a non-empty id")
        if not is_safe_id(v.strip()):
            raise ValueError(f"expected {_SAFE_RULE}, found {v!r}")
        return v.strip()

    @field_validator("annotator_kind", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        if v not in ("human", "ai"):
            raise ValueError(f"expected 'human' or 'ai', found {v!r}")
        return v

    @field_validator("locales", mode="before")
    @classmethod
    def _locales(cls, v: Any) -> Any:
        tags = _split_list(v)
        bad = [t for t in tags if not isinstance(t, str) or not _LOCALE.fullmatch(t)]
        if bad:
            raise ValueError(f"expected BCP 47 tags such as 'ja' or 'ja-JP' separated by ';', found {bad[0]!r}")
        return tuple(sorted({canonical_locale(t) for t in tags}))

    @field_validator("rubrics", mode="before")
    @classmethod
    def _rubrics(cls, v: Any) -> Any:
        ids = _split_list(v)
        bad = [r for r in ids if not is_safe_id(r)]
        if bad:
            raise ValueError(f"expected rubric ids of {_SAFE_RULE} separated by ';', found {bad[0]!r}")
        return tuple(sorted(set(ids)))

    @field_validator("qualified_from", "qualified_until", mode="before")
    @classmethod
    def _iso_date(cls, v: Any) -> Any:
        if v is None or v == "":
            return None
        if isinstance(v, datetime) or not isinstance(v, str | date):
            raise ValueError(f"expected an ISO date YYYY-MM-DD, found {v!r}")
        if isinstance(v, date):
            return v
        try:
            if not _DATE.fullmatch(v):
                raise ValueError
            return date.fromisoformat(v)
        except ValueError:
            raise ValueError(f"expected an ISO date YYYY-MM-DD, found {v!r}") from None

    @field_validator("qualified_until")
    @classmethod
    def _window(cls, v: date | None, info: ValidationInfo) -> date | None:
        start = info.data.get("qualified_from")
        if v and start and start > v:
            raise ValueError(f"{v} is before qualified_from {start}")
        return v


class AnnotatorRegistry(BaseModel):
    """The registry: entries sorted by ``annotator_id``, ids unique."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    annotator: tuple[AnnotatorEntry, ...] = Field(min_length=1, description="one entry per annotator")

    @field_validator("annotator")
    @classmethod
    def _unique_sorted(cls, v: tuple[AnnotatorEntry, ...]) -> tuple[AnnotatorEntry, ...]:
        seen: set[str] = set()
        for e in v:
            if e.annotator_id in seen:
                raise ValueError(f"duplicate annotator_id {e.annotator_id!r}")
            seen.add(e.annotator_id)
        return tuple(sorted(v, key=lambda e: e.annotator_id))

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def sha256(self) -> str:
        """sha256 of the canonical JSON: the same content gives the same hash, whatever the file format."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


# ----------------------------------------------------------------------------- reading files

Row = tuple[dict[str, Any], int, dict[str, int]]  # (the entry's fields, its line, the line of each field)


def _entry_problems(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        fld = str(e["loc"][0]) if e["loc"] else "(entry)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field; expected one of {', '.join(FIELDS)}"
        elif e["type"] == "missing":
            msg = "required"
        out.append((fld, msg))
    return out


def _entries(path: Path, rows: list[Row], problems: list[Problem]) -> AnnotatorRegistry:
    """Validate (row, line, field lines) triples into a registry, collecting every problem."""
    entries: list[AnnotatorEntry] = []
    first_line: dict[str, int] = {}
    for row, line, field_lines in rows:
        rid = row.get("annotator_id")
        id_line = field_lines.get("annotator_id", line)
        if isinstance(rid, str) and rid.strip():
            if rid.strip() in first_line:
                problems.append((id_line, "annotator_id",
                                 f"duplicate id {rid.strip()!r} (first at line {first_line[rid.strip()]})"))
            else:
                first_line[rid.strip()] = id_line
        try:
            entries.append(AnnotatorEntry.model_validate(row))
        except ValidationError as err:
            problems += [(field_lines.get(f, line), f, m) for f, m in _entry_problems(err)]
    if not rows and not problems:
        problems.append((None, "", "no annotators: a registry lists at least one"))
    if problems:
        raise RegistryError(path, problems)
    return AnnotatorRegistry(annotator=tuple(entries))


def _csv_rows(text: str, problems: list[Problem]) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as err:
        problems.append((1, "(header)", f"not valid CSV: {err}"))
        return []
    if header is None:
        problems.append((None, "", "empty file: expected a header row with annotator_id, annotator_kind, ..."))
        return []
    header = [h.strip() for h in header]
    for col in header:
        if col not in FIELDS:
            problems.append((1, col or "(empty)", f"unknown column; expected {', '.join(FIELDS)}"))
    for col in ("annotator_id", "annotator_kind"):
        if col not in header:
            problems.append((1, col, "required column missing from the header"))
    dups = sorted({c for c in header if header.count(c) > 1})
    if dups:
        problems.append((1, dups[0], "column named twice in the header"))
    if problems:
        return []
    rows = []
    start = reader.line_num + 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue  # blank line
            if len(cells) > len(header):
                problems.append((line, "(row)", f"{len(cells)} fields, the header has {len(header)}"))
                continue
            row = {h: (c.strip() or None) for h, c in zip(header, cells, strict=False)}
            rows.append(({k: v for k, v in row.items() if v is not None}, line, {}))
    except csv.Error as err:
        problems.append((reader.line_num, "(row)", f"not valid CSV: {err}"))
    return rows


_HEADER = re.compile(r"\s*\[\[\s*annotator\s*\]\]\s*(#.*)?")
_KEY = re.compile(r"\s*\"?([A-Za-z_][A-Za-z0-9_-]*)\"?\s*=")


def _toml_rows(text: str, problems: list[Problem]) -> list[Row]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"at line (\d+)", str(err))
        problems.append((int(m.group(1)) if m else None, "(syntax)", f"not valid TOML: {err}"))
        return []
    lines = text.splitlines()
    for key in sorted(set(data) - {"annotator"}):
        line = next((i + 1 for i, s in enumerate(lines) if (k := _KEY.match(s)) and k.group(1) == key), None)
        problems.append((line, key, "unknown top-level key; expected [[annotator]] tables"))
    tables = data.get("annotator", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.append((None, "annotator", "expected [[annotator]] tables"))
        return []
    headers: list[int] = [i for i, s in enumerate(lines) if _HEADER.fullmatch(s)]
    if len(headers) != len(tables):  # an inline array of tables: every entry is on the `annotator =` line
        at = next((i for i, s in enumerate(lines) if (k := _KEY.match(s)) and k.group(1) == "annotator"), 0)
        headers = [at] * len(tables)
    rows = []
    for table, start in zip(tables, headers, strict=True):
        field_lines: dict[str, int] = {}
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        for i in range(start + 1, end):
            if (k := _KEY.match(lines[i])) and k.group(1) not in field_lines:
                field_lines[k.group(1)] = i + 1
        rows.append((table, start + 1, field_lines))
    return rows


def load_registry(path: str | Path) -> AnnotatorRegistry:
    """Read a CSV or TOML registry; raises :class:`RegistryError` (file, line, field) if it cannot be used."""
    p = Path(path)
    if p.suffix.lower() not in (".csv", ".toml"):
        raise RegistryError(p, [(None, "", f"expected a .csv or .toml file, found {p.suffix or 'no suffix'!r}")])
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise RegistryError(p, [(None, "", f"{size} bytes: larger than {MAX_BYTES} bytes, not a registry")])
        raw = p.read_bytes()
    except OSError as err:
        raise RegistryError(p, [(None, "", f"cannot read: {err.strerror}")]) from err
    try:
        text = raw.decode("utf-8-sig")  # a byte order mark is fine
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise RegistryError(p, [(line, _field_at(raw, err.start, p.suffix.lower()), f"not UTF-8 text: byte "
                                 f"0x{raw[err.start]:02x} at offset {err.start}")]) from err
    problems: list[Problem] = []
    rows = _csv_rows(text, problems) if p.suffix.lower() == ".csv" else _toml_rows(text, problems)
    return _entries(p, rows, problems)


def _field_at(raw: bytes, offset: int, suffix: str) -> str:
    """The field a byte offset falls in (for the not-UTF-8 message): the CSV column or the TOML key."""
    start = raw.rfind(b"\n", 0, offset) + 1
    prefix = raw[start:offset].decode("utf-8-sig", errors="replace")  # its line, up to the bad byte
    if suffix == ".toml":
        k = _KEY.match(prefix)
        return k.group(1) if k else "(unknown)"
    header = next(csv.reader([raw.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")]), [])
    column = max(len(next(csv.reader([prefix]), [])) - 1, 0)
    return header[column].strip() if column < len(header) else "(unknown)"


__all__ = ["FIELDS", "AnnotatorEntry", "AnnotatorRegistry", "RegistryError", "canonical_locale", "load_registry"]
