"""Containers: stream raw rows out of JSONL (optionally gzip), Parquet and CSV files.

A reader yields lists of :class:`RawRow` in bounded batches so that memory stays flat on
large inputs.  A row carries its 1-based line number, its raw text (for quarantine) and
the decoded object, or the reason it could not be decoded.  JSON Lines are also available
as :class:`LineBlock` objects (whole lines in one bytes block plus newline offsets), which
the vectorised ingest path parses without creating an object per line.  A file that cannot
be read as a whole (missing, not UTF-8, unknown container, a duplicated CSV column) raises
:class:`UnreadableFile` before anything is yielded; damage found while streaming (a corrupt
gzip or Parquet page, a line longer than ``ingest.max_line_bytes``, more decompressed bytes
than ``ingest.max_decompressed_bytes``) raises it with the line where reading stopped.

Input is never silently changed: a UTF-8 byte-order mark before line 1 is skipped; a JSON
object with a duplicated key, or nested deeper than :data:`MAX_JSON_DEPTH`, is not decoded
(the row is quarantined, see :func:`loads_json`); CSV bytes that are not UTF-8 quarantine
their record instead of becoming U+FFFD.
"""
from __future__ import annotations

import csv
import ctypes
import functools
import gzip
import json
import re
import sys
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from schemas.policy import IngestConfig

SNIFF_BYTES = 64 * 1024
SNIFF_PIECE = 4 * 1024
# JSONL is read in blocks of whole lines of about this size: below glibc's largest mmap threshold
# (32 MB), so freed buffers are reused instead of mapped and faulted in afresh (1M rows of 1.6 KB:
# 2-4x fewer page faults, about 2 s less system time than with 32 MB blocks)
BLOCK_BYTES = 16 << 20
FIRST_READ_BYTES = 1 << 20
UTF8_BOM = b"\xef\xbb\xbf"
# orjson writes at most 254 nesting levels, and a row's unknown fields are written back as JSON
# (the ``extra`` column): a row nested deeper is refused when it is read, on every path
MAX_JSON_DEPTH = 254
DEFAULT_LIMITS = IngestConfig()


class UnreadableFile(Exception):
    """The file as a whole cannot be read; nothing from it is used.  ``line``: where reading
    stopped, when the damage was found while streaming (1-based; Parquet: row)."""

    def __init__(self, path: str | Path, why: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self._why = why
        self.why = why if line is None else f"line {line}: {why}"
        super().__init__(f"{self.path}: {self.why}")

    def __reduce__(self):  # survives pickling (a Dask worker's error reaches the driver as this type)
        return (type(self), (self.path, self._why, self.line))


class JSONValueError(ValueError):
    """Well-formed JSON that is refused anyway: a duplicated key, or nested too deep."""


_KEY_END = re.compile(rb'"[ \t\r\n]*:')
_BLANK_AFTER_QUOTE = re.compile(rb'"[ \t\r\n]')


def _entries_and_containers(value: Any) -> tuple[int, int]:
    """(key/value entries of all objects, number of objects and arrays) of a decoded JSON value."""
    entries = containers = 0
    stack = [value]
    pop, push = stack.pop, stack.append
    while stack:
        x = pop()
        containers += 1
        if type(x) is dict:
            entries += len(x)
            x = x.values()
        for v in x:
            t = type(v)
            if t is dict or t is list:
                push(v)
    return entries, containers


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (1 for a flat object or array), level by level."""
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [v for x in level for v in (x.values() if type(x) is dict else x) if type(v) is dict or type(v) is list]
    return depth


def _duplicate_key(text: bytes) -> str | None:
    """The first key that an object of ``text`` (valid JSON) repeats, or None."""
    found: list[str] = []

    def pairs(kv: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(kv)
        if len(d) < len(kv) and not found:
            seen: set[str] = set()
            found.append(next(k for k, _ in kv if k in seen or seen.add(k)))
        return d

    try:
        json.loads(text, object_pairs_hook=pairs)
    except ValueError:  # e.g. an integer beyond Python's digit limit: orjson's reading stands
        return None
    return found[0] if found else None


def _may_repeat_a_key(text: bytes, entries: int) -> bool:
    """False when ``text`` provably names no key twice, given the entries its objects decoded to.

    Every key is followed by a colon, and a colon outside strings is always written as such,
    so a text with no more colons than entries repeats nothing (the usual case, ~1 us).  Else
    the key ends are counted: a closing quote and a colon (``"\\":`` inside a string counts too,
    an upper bound), or, where a quote is followed by a blank, the regex allowing blanks.
    """
    if text.count(b":") <= entries:
        return False
    key_ends = text.count(b'":')
    if key_ends <= entries and _BLANK_AFTER_QUOTE.search(text) is not None:
        key_ends = len(_KEY_END.findall(text))
    return key_ends > entries


# an integer literal this long may lie beyond 64 bits, which orjson reads as a float (rounded)
_LONG_DIGITS = re.compile(rb"\d{19,}")


def int_beyond_64_bits(text: bytes) -> str | None:
    """The first integer of ``text`` (valid JSON) outside [-2**63, 2**64): one orjson would read as
    a rounded float; None if there is none.  Cheap unless ``text`` has a run of 19+ digits."""
    if _LONG_DIGITS.search(text) is None:
        return None
    found: list[str] = []

    def parse_int(literal: str) -> int:
        value = int(literal)
        if not found and not -(1 << 63) <= value < 1 << 64:
            found.append(literal)
        return value

    try:
        json.loads(text, parse_int=parse_int)
    except ValueError:  # e.g. beyond Python's digit limit: orjson's reading stands
        return None
    return found[0] if found else None


def loads_json(text: bytes) -> Any:
    """``orjson.loads``, refusing what it would silently change or what cannot be written back.

    Raises ``orjson.JSONDecodeError`` for malformed JSON and :class:`JSONValueError` for a
    duplicated key (orjson keeps the last value), nesting deeper than :data:`MAX_JSON_DEPTH` or an
    integer beyond 64 bits (orjson rounds it to a float: :func:`int_beyond_64_bits`).
    Duplicates are ruled out by counting (:func:`_may_repeat_a_key`); only a text that could
    repeat a key is parsed again, by Python's parser, which sees every pair.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        if str(err).startswith("depth limit"):  # orjson stops at 1,024 levels
            raise JSONValueError(f"expected JSON nested at most {MAX_JSON_DEPTH} levels deep, found more than 1,024 "
                                 "levels") from err
        raise
    if type(value) is not dict and type(value) is not list:
        return value
    entries, containers = _entries_and_containers(value)
    if containers > MAX_JSON_DEPTH:  # only then can it be nested that deep
        depth = _depth(value)
        if depth > MAX_JSON_DEPTH:
            raise JSONValueError(f"expected JSON nested at most {MAX_JSON_DEPTH} levels deep, found {depth} levels")
    if _may_repeat_a_key(text, entries):
        key = _duplicate_key(text)
        if key is not None:
            raise JSONValueError(f"expected a JSON object with unique keys, found key {key!r} twice "
                                 "(a JSON reader would keep only one of its values)")
    big = int_beyond_64_bits(text)
    if big is not None:
        shown = big if len(big) <= 40 else f"{big[:37]}..."
        raise JSONValueError(f"expected integers of at most 64 bits, found {shown} (a JSON reader here would round it "
                             "to a float; write it as a string)")
    return value


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


ACCEPTED_SUFFIXES = ".jsonl, .ndjson or .json (JSON Lines; each also .gz), .parquet, .pq or .csv"


def container_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, kind in ((".jsonl.gz", "jsonl"), (".ndjson.gz", "jsonl"), (".json.gz", "jsonl"),
                         (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"),
                         (".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv")):
        if name.endswith(suffix):
            return kind
    raise UnreadableFile(path, f"unknown file type {path.suffix or '(no suffix)'!r}; expected {ACCEPTED_SUFFIXES}")


class _Stream:
    """A binary input file read through one object: decompressed (``.gz``) bytes are counted
    against ``ingest.max_decompressed_bytes``, and read errors (a damaged or truncated gzip
    stream, an I/O error) become :class:`UnreadableFile` naming the file."""

    def __init__(self, path: Path, limits: IngestConfig):
        self.path = path
        self.gz = path.name.lower().endswith(".gz")
        self.cap = int(limits.max_decompressed_bytes)
        self.total = 0
        try:
            self.fh = gzip.open(path, "rb") if self.gz else open(path, "rb")  # noqa: SIM115 - closed by __exit__
        except OSError as err:
            raise UnreadableFile(path, f"cannot read: {err}") from err

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def _counted(self, data: Any) -> Any:
        self.total += len(data)
        if self.gz and self.total > self.cap:
            raise UnreadableFile(self.path, f"decompresses to more than ingest.max_decompressed_bytes ({self.cap:,} bytes); "
                                 "not read further (raise the cap with --max-decompressed-bytes or the policy if the file is genuine)")
        return data

    def read(self, size: int) -> bytes:
        try:
            return self._counted(self.fh.read(size))
        except (OSError, EOFError, zlib.error) as err:
            raise UnreadableFile(self.path, f"{'damaged gzip data' if self.gz else 'read error'}: {err}") from err

    def readinto(self, buf: memoryview) -> int:
        """Up to ``len(buf)`` bytes into ``buf`` (fewer only at the end of the input); how many."""
        try:
            n = self.fh.readinto(buf)
        except (OSError, EOFError, zlib.error) as err:
            raise UnreadableFile(self.path, f"{'damaged gzip data' if self.gz else 'read error'}: {err}") from err
        self._counted(buf[:n])
        return n

    def readline(self, limit: int) -> bytes:
        try:
            return self._counted(self.fh.readline(limit))
        except (OSError, EOFError, zlib.error) as err:
            raise UnreadableFile(self.path, f"{'damaged gzip data' if self.gz else 'read error'}: {err}") from err


def _at_line(err: UnreadableFile, line: int) -> UnreadableFile:
    """``err`` with the line where reading stopped (unless it names one already)."""
    return err if err.line is not None else UnreadableFile(err.path, err.why, line)


def _line_too_long(path: Path, line: int, cap: int) -> UnreadableFile:
    return UnreadableFile(path, f"longer than ingest.max_line_bytes ({cap:,} bytes); not read (raise the cap with "
                          "--max-line-bytes or the policy if the line is genuine)", line)


def _check_utf8(path: Path, limits: IngestConfig = DEFAULT_LIMITS) -> None:
    """Sniff the head of the file: a file that is not UTF-8 is rejected as a whole."""
    head = b""
    with _Stream(path, limits) as fh:
        try:  # in small reads: damage met here (a short .gz) names the line it stopped at, as later reads do
            while len(head) < SNIFF_BYTES and (piece := fh.read(min(SNIFF_PIECE, SNIFF_BYTES - len(head)))):
                head += piece
        except UnreadableFile as err:
            raise _at_line(err, head.count(b"\n") + 1) from err
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


@dataclass(slots=True)
class LineBlock:
    """Whole lines of a JSON Lines file, read as one block of bytes (no per-line objects).

    ``data`` ends with a newline; ``ends[i]`` is the offset of the newline that ends line
    ``first_line + i`` (1-based physical line numbers, blank lines included).
    """

    first_line: int
    data: bytes | bytearray
    ends: np.ndarray  # int64 offsets of the b"\n" of each line

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def starts(self) -> np.ndarray:
        starts = np.empty(len(self.ends), dtype=np.int64)
        if len(starts):
            starts[0] = 0
            starts[1:] = self.ends[:-1] + 1
        return starts

    def line(self, i: int) -> bytes:
        start = int(self.ends[i - 1]) + 1 if i else 0
        return bytes(memoryview(self.data)[start:int(self.ends[i])])

    def raw_rows(self, indices: Iterable[int] | None = None) -> list[RawRow]:
        """Decode lines one by one (the per-row path); blank lines are not rows."""
        if indices is None:
            lines = bytes(self.data).split(b"\n")
            rows = (decode_line(self.first_line + i, ln) for i, ln in enumerate(lines[:len(self.ends)]))
        else:
            rows = (decode_line(self.first_line + int(i), self.line(int(i))) for i in indices)
        return [r for r in rows if r is not None]


def decode_line(lineno: int, line: bytes) -> RawRow | None:
    """One JSONL line -> a row (``None`` for a blank line, which is not a row)."""
    stripped = line.strip()
    if not stripped:
        return None
    try:
        obj = loads_json(stripped)
    except orjson.JSONDecodeError as err:
        why = "invalid UTF-8" if "utf-8" in str(err).lower() else str(err)
        return RawRow(lineno, stripped, None, f"expected a JSON object, found invalid JSON ({why})")
    except JSONValueError as err:
        return RawRow(lineno, stripped, None, str(err))
    if type(obj) is dict:
        return RawRow(lineno, stripped, obj)
    return RawRow(lineno, stripped, None, f"expected a JSON object, found {type(obj).__name__}")


def _newlines(data: bytes) -> np.ndarray:
    """Offsets of every b"\\n" (memchr per line: faster than a vectorised byte compare)."""
    out = []
    find = data.find
    pos = find(b"\n")
    while pos != -1:
        out.append(pos)
        pos = find(b"\n", pos + 1)
    return np.array(out, dtype=np.int64)


_resize = ctypes.pythonapi.PyByteArray_Resize  # (no temporary bytes, unlike ``+=`` or slice assignment)
_resize.argtypes, _resize.restype = [ctypes.py_object, ctypes.c_ssize_t], ctypes.c_int
READ_BUFFERS = 4  # a block being parsed on each of ingest's two threads, one taken by its caller, one being read


class _ReadBuffers:
    """The read buffers of one file, each used again once nothing refers to it any more (its block parsed
    and dropped).  A fresh 16 MiB buffer per read -- the read's and the carried line's join's -- was ~15 %
    of a 1M-judgment build's page faults, each a fault on fresh memory (docs/scale-out.md, "Session 42")."""

    def __init__(self, n: int = READ_BUFFERS) -> None:
        self.n, self.bufs = n, []

    def take(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes (contents unspecified) that no one else refers to."""
        for buf in self.bufs:
            if sys.getrefcount(buf) == 3:  # this list, the loop's name, the call's argument: free
                _resize(buf, size)
                return buf
        buf = bytearray(size)
        if len(self.bufs) < self.n:
            self.bufs.append(buf)
        return buf


def iter_line_blocks(path: str | Path, max_lines: int, block_bytes: int = BLOCK_BYTES,
                     limits: IngestConfig = DEFAULT_LIMITS) -> Iterator[LineBlock]:
    """Stream a JSONL file (optionally gzip) as blocks of at most ``max_lines`` whole lines.

    Blocks are cut at newlines; the first reads are small (a format sniff needs only a few
    lines) and grow to ``block_bytes``.  A final line without a newline gets one; a UTF-8
    byte-order mark before line 1 is skipped.  A line longer than ``limits.max_line_bytes``
    raises :class:`UnreadableFile` as soon as it is that long (memory stays below the cap
    plus one read), as does damaged gzip data or too many decompressed bytes.  A block's
    ``data`` is a ``bytearray`` that a later block reuses once the block is no longer referred to.
    """
    p = Path(path)
    cap = int(limits.max_line_bytes)
    line = 1  # the line that ``carry`` starts
    carry: list[bytes] = []  # the start of a line that no read has ended yet
    carried = 0
    size = min(FIRST_READ_BYTES, block_bytes)
    first = True
    buffers = _ReadBuffers()
    with _Stream(p, limits) as fh:
        while True:
            data = buffers.take(carried + size)
            pos = 0
            for piece in carry:  # the carried line's start, then the read behind it
                data[pos:pos + len(piece)] = piece
                pos += len(piece)
            try:
                with memoryview(data) as view:
                    n = fh.readinto(view[carried:])
            except UnreadableFile as err:
                raise _at_line(err, line) from err
            end = carried + n
            if first and data.startswith(UTF8_BOM):
                data, end = bytearray(memoryview(data)[len(UTF8_BOM):end]), end - len(UTF8_BOM)  # (a small first read)
            first = False
            size = min(size * 4, block_bytes)
            if not n:
                if not carry:
                    return
                _resize(data, end)
                if not data.endswith(b"\n"):
                    data.append(10)
                carry, carried = [], 0
            else:
                cut = data.rfind(b"\n", carried, end) + 1
                if cut == 0:  # no line ends in this read
                    carry.append(bytes(memoryview(data)[carried:end]))
                    carried = end
                    if carried > cap:
                        raise _line_too_long(p, line, cap)
                    del data
                    continue
                carry = [bytes(memoryview(data)[cut:end])] if cut < end else []
                carried = end - cut
                _resize(data, cut)
            ends = _newlines(data)
            if len(data) > cap:  # only then can a line of it be longer than the cap
                long = np.flatnonzero(np.diff(ends, prepend=-1) - 1 > cap)
                if len(long):
                    raise _line_too_long(p, line + int(long[0]), cap)
            for k in range(0, len(ends), max_lines):
                part = ends[k:k + max_lines]
                lo = int(ends[k - 1]) + 1 if k else 0
                hi = int(part[-1]) + 1
                yield LineBlock(line + k, data if (lo, hi) == (0, len(data)) else data[lo:hi], part - lo)
            line += len(ends)
            if carried > cap:
                raise _line_too_long(p, line, cap)
            if not n:
                return
            del data  # (the block's buffer is free again once its reader lets go of it)


def _jsonl_rows(path: Path, batch_rows: int, limits: IngestConfig) -> Iterator[list[RawRow]]:
    for block in iter_line_blocks(path, batch_rows, limits=limits):
        rows = block.raw_rows()
        if rows:
            yield rows


def _duplicate_field(fields: Iterable[Any], where: str = "") -> str | None:
    """The first name a Parquet schema (or one of its structs) uses twice, as ``a.b``; None."""
    import pyarrow as pa

    seen: set[str] = set()
    for f in fields:
        if f.name in seen:
            return where + f.name
        seen.add(f.name)
        t = f.type
        while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            t = t.value_type
        if pa.types.is_struct(t):
            found = _duplicate_field([t.field(i) for i in range(t.num_fields)], f"{where}{f.name}.")
            if found:
                return found
    return None


def _open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise UnreadableFile(path, f"not a readable Parquet file: {err}") from err
    dup = _duplicate_field(schema)
    if dup is not None:
        raise UnreadableFile(path, f"Parquet column {dup!r} is defined twice; every column name must be unique "
                             "(a reader would keep only one of its values)")
    return pf


def _parquet_row_not_utf8(one: Any, row: int) -> RawRow:
    """A one-row batch whose strings do not all decode: the row to quarantine (``raw`` with
    U+FFFD for the bad bytes), naming the first column at fault."""
    import pyarrow as pa

    raw: dict[str, Any] = {}
    bad: list[str] = []
    for name, col in zip(one.schema.names, one.columns, strict=True):
        try:
            raw[name] = col.to_pylist()[0]
        except UnicodeDecodeError:
            bad.append(name)
            binary = col.view(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary()) \
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) else None
            raw[name] = binary.to_pylist()[0].decode("utf-8", "replace") if binary is not None else "<not UTF-8>"
    return RawRow(row, json.dumps(raw, ensure_ascii=False, default=str), None,
                  f"expected UTF-8 text, found invalid UTF-8 in column {bad[0]!r}")


def _parquet_rows(pf, batch_rows: int, path: Path) -> Iterator[list[RawRow]]:
    import pyarrow as pa

    row = 0
    batches = pf.iter_batches(batch_size=batch_rows)
    while True:
        try:
            rb = next(batches, None)
        except (OSError, pa.ArrowException) as err:  # a damaged page or column chunk
            why = " ".join(str(err).split())
            raise UnreadableFile(path, f"damaged Parquet data (reading rows from {row + 1:,} on): {why}") from err
        if rb is None:
            return
        try:
            objs = rb.to_pylist()
        except UnicodeDecodeError:  # Parquet does not check that strings are UTF-8: find the rows
            objs = []
            for i in range(rb.num_rows):
                try:
                    objs.append(rb.slice(i, 1).to_pylist()[0])
                except UnicodeDecodeError:
                    objs.append(_parquet_row_not_utf8(rb.slice(i, 1), row + i + 1))
        out = []
        for obj in objs:
            row += 1
            out.append(obj if isinstance(obj, RawRow) else RawRow(row, json.dumps(obj, ensure_ascii=False, default=str), obj))
        yield out


_CSV_JSON_FIELDS = {"prompt", "response_a", "response_b", "tags", "chosen", "rejected", "completions", "dimensions"}


def _csv_value(key: str, value: str | None) -> Any:
    """A CSV cell as a value (docs/input-format.md); raises :class:`JSONValueError` for a JSON
    cell with a duplicated key or nested too deep (JSON that is not well-formed stays text)."""
    if value is None or value == "":
        return None
    v = value.strip()
    if key in _CSV_JSON_FIELDS and v[:1] in "[{":
        try:
            return loads_json(v.encode())
        except orjson.JSONDecodeError:
            return value
        except JSONValueError as err:
            raise JSONValueError(f"field {key!r}: {err}") from err
    if key == "tags":
        return [t.strip() for t in v.split(";") if t.strip()]
    if key in ("strength", "confidence"):
        try:
            return float(v)
        except ValueError:
            return value  # left as text: validation reports the field
    return value


def _csv_lines(fh: _Stream, path: Path, cap: int, bad_bytes: list[tuple[int, int]]) -> Iterator[str]:
    """Physical lines of a CSV file (as ``open(newline="")`` splits them), read at most
    ``cap`` bytes at a time.  A line that is not UTF-8 is decoded with surrogate escapes and
    recorded in ``bad_bytes`` as (line, first bad byte), so that its record is quarantined."""
    lineno = 0
    while True:
        try:
            b = fh.readline(cap + 1)
        except UnreadableFile as err:
            raise _at_line(err, lineno + 1) from err
        if not b:
            return
        if len(b) > cap and not b.endswith(b"\n"):
            raise _line_too_long(path, lineno + 1, cap)
        if lineno == 0 and b.startswith(UTF8_BOM):
            b = b[len(UTF8_BOM):]
        parts = b.splitlines(keepends=True) if b"\r" in b[:-2] else [b]  # a lone CR ends a line too
        for part in parts:
            lineno += 1
            try:
                yield part.decode("utf-8")
            except UnicodeDecodeError as err:
                bad_bytes.append((lineno, part[err.start]))
                yield part.decode("utf-8", "surrogateescape")


def _printable(text: str) -> str:
    """Text with the surrogate escapes of undecodable bytes shown as U+FFFD (for ``raw``)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _csv_rows(path: Path, batch_rows: int, limits: IngestConfig) -> Iterator[list[RawRow]]:
    cap = int(limits.max_line_bytes)
    if csv.field_size_limit() < cap:  # a field may be as long as a line (the csv default is 128 KiB)
        csv.field_size_limit(cap)
    bad_bytes: list[tuple[int, int]] = []
    with _Stream(path, limits) as fh:
        reader = csv.reader(_csv_lines(fh, path, cap, bad_bytes))
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise UnreadableFile(path, f"CSV header: {err}", reader.line_num) from err
        if header is None:
            return
        if bad_bytes:
            raise UnreadableFile(path, f"CSV header: not UTF-8 (byte 0x{bad_bytes[0][1]:02x})", bad_bytes[0][0])
        header = [h.strip() for h in header]
        for i, h in enumerate(header):
            if h in header[:i]:
                raise UnreadableFile(path, f"CSV header names column {h!r} twice (columns {header.index(h) + 1} and "
                                     f"{i + 1}); every column name must be unique", 1)
        batch: list[RawRow] = []
        start = reader.line_num + 1
        while True:
            try:
                values = next(reader, None)
            except csv.Error as err:  # e.g. a field longer than the cap over several lines
                raise UnreadableFile(path, f"CSV record starting here: {err}", start) from err
            if values is None:
                break
            if not values or (len(values) == 1 and not values[0].strip()):  # a blank line is not a row (as in JSONL)
                start = reader.line_num + 1
                continue
            raw = ",".join(values)
            if bad_bytes and bad_bytes[0][0] <= reader.line_num:
                at, byte = bad_bytes[0]
                batch.append(RawRow(start, _printable(raw), None, f"expected UTF-8 text, found invalid UTF-8 "
                                    f"(byte 0x{byte:02x} on line {at})"))
                del bad_bytes[:sum(1 for ln, _ in bad_bytes if ln <= reader.line_num)]
            elif len(values) != len(header):
                batch.append(RawRow(start, raw, None, f"expected {len(header)} CSV columns, found {len(values)}"))
            else:
                try:
                    obj = {k: _csv_value(k, v) for k, v in zip(header, values, strict=True)}
                except JSONValueError as err:
                    batch.append(RawRow(start, raw, None, str(err)))
                else:
                    batch.append(RawRow(start, raw, {k: v for k, v in obj.items() if v is not None}))
            start = reader.line_num + 1
            if len(batch) >= batch_rows:
                yield batch
                batch = []
        if batch:
            yield batch


def _checked_kind(p: Path) -> str:
    if not p.exists():
        raise UnreadableFile(p, "no such file")
    if not p.is_file():
        raise UnreadableFile(p, "not a regular file")
    return container_of(p)


def iter_raw_rows(path: str | Path, batch_rows: int = 50_000, limits: IngestConfig = DEFAULT_LIMITS) -> Iterator[list[RawRow]]:
    """Yield batches of raw rows. Raises :class:`UnreadableFile` before the first batch for a
    file unusable as a whole, and while streaming for damage found on the way."""
    p = Path(path)
    kind = _checked_kind(p)
    if kind == "parquet":
        return _parquet_rows(_open_parquet(p), batch_rows, p)
    _check_utf8(p, limits)
    return _jsonl_rows(p, batch_rows, limits) if kind == "jsonl" else _csv_rows(p, batch_rows, limits)


def jsonl_blocks(path: str | Path, max_lines: int = 50_000, limits: IngestConfig = DEFAULT_LIMITS) -> Iterator[LineBlock]:
    """:func:`iter_line_blocks` after the checks of :func:`iter_raw_rows` (raises :class:`UnreadableFile`)."""
    p = Path(path)
    if _checked_kind(p) != "jsonl":
        raise UnreadableFile(p, "not a JSON Lines file")
    _check_utf8(p, limits)
    return iter_line_blocks(p, max_lines, BLOCK_BYTES, limits)


def peek_objects(path: str | Path, n: int = 20, limits: IngestConfig = DEFAULT_LIMITS) -> list[dict[str, Any]]:
    """The first ``n`` decodable objects of a file (for format detection)."""
    return peek_rows(path, n, limits)[0]


def peek_rows(path: str | Path, n: int = 20,
              limits: IngestConfig = DEFAULT_LIMITS) -> tuple[list[dict[str, Any]], RawRow | None, int]:
    """(the first ``n`` decodable objects, the first row that did not decode or None, the rows read): what
    format detection votes with, and what it says when nothing votes."""
    out: list[dict[str, Any]] = []
    first_bad: RawRow | None = None
    seen = 0
    for batch in iter_raw_rows(path, batch_rows=max(n, 1), limits=limits):
        seen += len(batch)
        out.extend(r.obj for r in batch if r.obj is not None)
        first_bad = first_bad or next((r for r in batch if r.obj is None), None)
        if len(out) >= n:
            break
    return out[:n], first_bad, seen


# ---------------------------------------------------------------- strict Arrow parse of JSONL blocks
# Arrow's JSON reader with an explicit schema is strict where the per-row path is (wrong JSON
# types, duplicate keys, bad surrogates and malformed JSON all fail), so a row it accepts
# decodes to the same values as ``orjson.loads``.  What it lets through is checked: UTF-8 of
# the bytes here; NaN/Infinity, -0, huge integers and nulls inside lists by the caller.  A
# failure names the row; that line goes the per-row way and the rest is parsed again.
_ERR_ROW = re.compile(r" in row (\d+)")
_ERR_COLUMN = re.compile(r"Column\(/([^/)]*)")
THREADED_PARSE_BYTES = 8 << 20  # buffers above this are parsed in parallel chunks


@dataclass(slots=True)
class ArrowPart:
    """Rows parsed by Arrow: ``table`` row k is line ``lines[k]`` of the block."""

    table: Any  # pa.Table: the explicit schema of ``shape`` plus any inferred unknown fields
    lines: np.ndarray
    shape: tuple[bool, ...]  # per polymorphic field: True = a JSON string, False = structured


def _lines_buffer(block: LineBlock, starts: np.ndarray, idx: np.ndarray) -> bytes | memoryview:
    """The bytes of lines ``idx`` (ascending), newline-terminated, as one buffer: the block's own when
    ``idx`` is every line, else a copy in this thread's scratch buffer, valid until the thread's next call
    (what reads it -- the UTF-8 check, Arrow's JSON reader -- copies what it keeps).  A fresh buffer a
    call was ~10 % of a 1M-judgment build's page faults: nearly every block of a messy batch has a line
    that is not a candidate, so the copy is ~the whole input (docs/scale-out.md, "Session 30")."""
    if len(idx) == len(block.ends):
        return block.data
    brk = np.flatnonzero(idx[1:] != idx[:-1] + 1)
    lo = starts[idx[np.r_[0, brk + 1]]]
    hi = block.ends[idx[np.r_[brk, len(idx) - 1]]] + 1
    size = int((hi - lo).sum())
    scratch = getattr(_SCRATCH, "buf", None)
    if scratch is None or len(scratch) < size:  # (a new one: a view of the old one may still be alive)
        scratch = _SCRATCH.buf = bytearray(max(size, 2 * len(scratch) if scratch is not None else size))
    out, src, pos = memoryview(scratch), memoryview(block.data), 0
    for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
        out[pos:pos + b - a] = src[a:b]
        pos += b - a
    return out[:size]


_SCRATCH = threading.local()


def lines_array(block: LineBlock) -> Any:
    """All lines of a block as an Arrow binary array (zero-copy), for vectorised text tests."""
    import pyarrow as pa

    offsets = np.empty(len(block.ends) + 1, dtype=np.int64)
    offsets[0] = 0
    offsets[1:] = block.ends + 1
    return pa.Array.from_buffers(pa.large_binary(), len(block.ends), [None, pa.py_buffer(offsets), pa.py_buffer(block.data)])


# Arrow infers a type for every unknown field; an array nested d levels deep costs it ~0.1 us per
# row of the block per level (1,000 levels in a block of 100k rows: 10 s; objects cost far less)
# and ~15,000 levels of either overflow its stack (a crash, not an error).  A line that could
# nest that deep goes the per-row way, where orjson refuses more than 1,024 levels and
# ``loads_json`` more than MAX_JSON_DEPTH.  Only a line longer than DEEP_CHECK_BYTES can hold
# that many '[', so only such lines are counted (one pass over them); '{' (at least 4 bytes a
# level: '{"":') only in lines longer than DEEP_OBJECT_CHECK_BYTES.
DEEP_CHECK_BYTES = 2048
DEEP_OBJECT_CHECK_BYTES = 32 << 10
_MAX_OPENERS = MAX_JSON_DEPTH + 2  # the row's own object and one level of slack


def candidate_lines(block: LineBlock, starts: np.ndarray) -> np.ndarray:
    """Lines that start with '{' and end with '}' (optionally '\\r') and cannot nest deeper
    than Arrow's parse handles well (above).

    Only such lines go to Arrow: then one row can never span two lines (a value ending in '}'
    followed by one starting with '{' is not JSON), so equal row and line counts prove that
    row k is line k.  Everything else (blank, truncated, indented lines) goes the per-row way.
    """
    arr = np.frombuffer(block.data, dtype=np.uint8)
    ends = block.ends
    last = ends - 1
    last = last - ((last >= starts) & (arr[np.maximum(last, 0)] == 13))  # a CR before the newline
    cand = (last > starts) & (arr[starts] == 123) & (arr[np.maximum(last, 0)] == 125)
    long = np.flatnonzero(cand & (ends - starts > DEEP_CHECK_BYTES))
    if len(long):
        count = block.data.count
        for i, a, b in zip(long.tolist(), starts[long].tolist(), ends[long].tolist(), strict=True):
            if count(b"[", a, b) > _MAX_OPENERS or (b - a > DEEP_OBJECT_CHECK_BYTES and count(b"{", a, b) > _MAX_OPENERS):
                cand[i] = False
    return cand


def _is_utf8(buf: bytes) -> bool:
    """Whether ``buf`` is valid UTF-8 (Arrow's vectorised check; its JSON reader does not check string bytes)."""
    import pyarrow as pa

    arr = pa.Array.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(np.array([0, len(buf)], dtype=np.int64)),
                                                       pa.py_buffer(buf)])
    try:
        arr.cast(pa.large_string())
    except pa.ArrowInvalid:
        return False
    return True


def _invalid_utf8(block: LineBlock, starts: np.ndarray, idx: np.ndarray) -> list[int]:
    """Lines of ``idx`` that are not UTF-8 (bisection with the vectorised check)."""
    bad: list[int] = []
    todo = [idx]
    while todo:
        sub = todo.pop()
        if not len(sub) or _is_utf8(_lines_buffer(block, starts, sub)):
            continue
        if len(sub) <= 8:
            for i in sub.tolist():
                try:
                    block.line(i).decode("utf-8")
                except UnicodeDecodeError:
                    bad.append(i)
        else:
            todo += [sub[:len(sub) // 2], sub[len(sub) // 2:]]
    return bad


@functools.cache
def _json_pool() -> Any:
    """mimalloc for the parse's many short-lived buffers: less CPU and fewer page faults than
    the default jemalloc pool here (measured: 1M rows, ~15 % less CPU)."""
    import pyarrow as pa

    try:
        return pa.mimalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without it
        return pa.default_memory_pool()


def _read_json(buf: bytes, schema: Any, threads: bool) -> Any:
    import pyarrow as pa
    import pyarrow.json as pj

    ro = pj.ReadOptions(use_threads=threads, block_size=max(1 << 20, len(buf) // 8) if threads else len(buf) + 1)
    po = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer")
    return pj.read_json(pa.BufferReader(pa.py_buffer(buf)), read_options=ro, parse_options=po, memory_pool=_json_pool())


def parse_block_arrow(block: LineBlock, idx: np.ndarray, schema_of: Callable[[tuple[bool, ...]], Any],
                      poly: tuple[str, ...], string_patterns: tuple[str, ...], shape: tuple[bool, ...],
                      split_first: frozenset[str] = frozenset()) -> tuple[list[ArrowPart], list[int], frozenset[str]]:
    """Parse lines ``idx`` of a block with Arrow's strict JSON reader.

    ``poly`` names the fields that may be either a JSON string or structured; each has a
    regex in ``string_patterns`` that matches a line where it is a string.  Lines are tried
    with ``shape`` first; when Arrow reports a polymorphic field of another shape, the lines
    are split by shape (up front for the fields in ``split_first``: the previous block's).
    Returns the parsed parts, the lines for the per-row path and the fields split on.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    starts = block.starts
    parts: list[ArrowPart] = []
    slow: list[int] = []
    split_fields: set[str] = set()
    budget = 16 + len(idx) // 200  # parse failures allowed before the rest goes the per-row way
    string_shape: dict[str, np.ndarray] = {}

    def by_shape(sub: np.ndarray, shp: tuple[bool, ...], field: str) -> list[tuple[np.ndarray, tuple[bool, ...]]]:
        k = poly.index(field)
        if field not in string_shape:
            string_shape[field] = pc.match_substring_regex(lines_array(block), string_patterns[k]).to_numpy(zero_copy_only=False)
        split_fields.add(field)
        is_str = string_shape[field][sub]
        return [(sub[is_str == flag], shp[:k] + (flag,) + shp[k + 1:]) for flag in (True, False)]

    utf8_checked = _is_utf8(block.data)  # else each buffer is checked before it is parsed
    # work items: (lines, shape, fields already split on, parse in threads, lines known to be UTF-8)
    todo: list[tuple[np.ndarray, tuple[bool, ...], frozenset[str], bool, bool]] = [(idx, shape, frozenset(), True, utf8_checked)]
    for field in sorted(split_first):
        todo = [(g, gs, done | {field}, True, ok) for sub, shp, done, _, ok in todo for g, gs in by_shape(sub, shp, field)]
    while todo:
        sub, shp, split_on, threads, utf8 = todo.pop()
        if not len(sub):
            continue
        if budget <= 0:
            slow.extend(sub.tolist())
            continue
        buf = _lines_buffer(block, starts, sub)
        if not utf8 and not _is_utf8(buf):
            bad = _invalid_utf8(block, starts, sub)
            slow.extend(bad)
            todo.append((np.setdiff1d(sub, bad), shp, split_on, threads, True))
            continue
        threaded = threads and len(buf) > THREADED_PARSE_BYTES
        try:
            table = _read_json(buf, schema_of(shp), threaded)
        except pa.ArrowException as err:
            msg = str(err)
            col = _ERR_COLUMN.search(msg)
            field = col.group(1) if col else None
            if field in poly and field not in split_on and "changed from" in msg:
                todo += [(g, gs, split_on | {field}, True, True) for g, gs in by_shape(sub, shp, field)]
                continue
            if threaded:  # chunk-relative row numbers: parse again as one chunk to find the row
                todo.append((sub, shp, split_on, False, True))
                continue
            budget -= 1
            row = _ERR_ROW.search(msg)
            if row is not None and int(row.group(1)) < len(sub):
                r = int(row.group(1))
                slow.append(int(sub[r]))
                todo += [(sub[:r], shp, split_on, True, True), (sub[r + 1:], shp, split_on, True, True)]
            elif len(sub) <= 64:
                slow.extend(sub.tolist())
            else:
                todo += [(sub[:len(sub) // 2], shp, split_on, True, True), (sub[len(sub) // 2:], shp, split_on, True, True)]
            continue
        if table.num_rows != len(sub):  # a line held more than one JSON value
            budget -= 1
            if len(sub) <= 64:
                slow.extend(sub.tolist())
            else:
                todo += [(sub[:len(sub) // 2], shp, split_on, True, True), (sub[len(sub) // 2:], shp, split_on, True, True)]
            continue
        parts.append(ArrowPart(table, sub, shp))
    return parts, slow, frozenset(split_fields)
