"""The hostile-input corpus: files that try to change, hide or crash what ``validate`` and
``curate`` read.  Generated, never kept as binary blobs in git.

    python tests/hostile/make_corpus.py OUT_DIR        # writes every case into OUT_DIR

``tests/test_hostile_input.py`` builds the cases it needs into ``tmp_path`` with
:func:`build`.  Each builder writes its file(s) into a directory and returns the path of
the input to give the CLI; the docstring says what the file is and what a correct
pipeline does with it.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path

CSV_HEADER = ["comparison_id", "prompt", "response_a", "response_b", "label", "annotator_id", "annotator_kind",
              "shown_first", "locale"]


def row(i: int, **over) -> dict:
    """A valid canonical judgment (English, human), any field overridden."""
    r = {
        "comparison_id": f"h-{i:04d}",
        "prompt": [{"role": "user", "content": f"How do I water plant number {i}?"}],
        "response_a": {"text": f"Water it weekly, a cup at a time ({i}).", "model": "m-1"},
        "response_b": f"Plants do not need water ({i}).",
        "shown_first": "a",
        "label": "a",
        "annotator_id": "rev-01",
        "annotator_kind": "human",
        "locale": "en",
    }
    r.update(over)
    return r


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _write_lines(path: Path, lines: list[str], *, prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def _csv_line(values: list[str]) -> str:
    import csv

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _csv_values(r: dict) -> list[str]:
    out = []
    for k in CSV_HEADER:
        v = r.get(k, "")
        out.append(json.dumps(v, ensure_ascii=False) if isinstance(v, list | dict) else str(v))
    return out


# ---------------------------------------------------------------- 1. input is never silently changed
def duplicate_keys_jsonl(d: Path) -> Path:
    """Line 2 says ``label`` twice ("a" then "b"); line 3 has ``text`` twice inside
    ``response_a``; line 5 writes the second ``label`` with an escape (``"l\\u0061bel"``).
    These lines: quarantined ``invalid_json`` naming the key; lines 1, 4 valid."""
    dup_top = _line(row(1))[:-1] + ', "label": "b"}'
    dup_nested = _line(row(2)).replace('"text": ', '"text": "first", "text": ', 1)
    dup_escaped = _line(row(4))[:-1] + ', "l\\u0061bel": "b"}'
    return _write_lines(d / "duplicate_keys.jsonl", [_line(row(0)), dup_top, dup_nested, _line(row(3)), dup_escaped])


def duplicate_keys_trl_jsonl(d: Path) -> Path:
    """TRL rows (the per-row path): line 2 names ``chosen`` twice; quarantined, line 1 valid."""
    ok = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
    dup = '{"prompt": "Capital of Spain?", "chosen": "Madrid.", "rejected": "Seville.", "chosen": "Seville."}'
    return _write_lines(d / "duplicate_keys_trl.jsonl", [_line(ok), dup])


def bom_jsonl(d: Path) -> Path:
    """A UTF-8 byte-order mark before line 1; every line is valid."""
    return _write_lines(d / "bom.jsonl", [_line(row(i)) for i in range(3)], prefix=b"\xef\xbb\xbf")


def bom_csv(d: Path) -> Path:
    """A UTF-8 byte-order mark before the CSV header; every row is valid."""
    text = _csv_line(CSV_HEADER) + "".join(_csv_line(_csv_values(row(i))) for i in range(3))
    p = d / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return p


def bad_bytes_csv(d: Path) -> Path:
    """Row 2 (line 3) has the bytes ``\\xff\\xfe`` in ``response_b``: quarantined, rows 1 and 3 valid."""
    lines = [_csv_line(CSV_HEADER).encode()] + [_csv_line(_csv_values(row(i))).encode() for i in range(3)]
    lines[2] = lines[2].replace(b"Plants do not", b"Plants do \xff\xfenot")
    p = d / "bad_bytes.csv"
    p.write_bytes(b"".join(lines))
    return p


def duplicate_header_csv(d: Path) -> Path:
    """The header names ``label`` twice: exit 2 naming the file and the column."""
    header = CSV_HEADER + ["label"]
    lines = [_csv_line(header)] + [_csv_line(_csv_values(row(i)) + ["b"]) for i in range(2)]
    p = d / "duplicate_header.csv"
    p.write_text("".join(lines), encoding="utf-8")
    return p


def pair_id_conflict_jsonl(d: Path) -> Path:
    """pair_id ``shared`` with two different prompts (lines 1-2 vs 3), and pair_id ``swap``
    given once as (a, b) and once as (b, a) (the same pair, not a conflict).  Every judgment
    of ``shared`` is flagged ``pair_id_conflict`` and dropped; ``swap`` is one DPO row."""
    p1 = [{"role": "user", "content": "Is the sky blue?"}]
    p2 = [{"role": "user", "content": "Is the grass green?"}]
    lines = [
        _line(row(0, pair_id="shared", prompt=p1, response_a="Yes.", response_b="No.", annotator_id="r1")),
        _line(row(1, pair_id="shared", prompt=p1, response_a="Yes.", response_b="No.", annotator_id="r2")),
        _line(row(2, pair_id="shared", prompt=p2, response_a="Yes.", response_b="No.", annotator_id="r3")),
        _line(row(3, pair_id="swap", prompt=p1, response_a="Blue, yes.", response_b="Green.", annotator_id="r1")),
        _line(row(4, pair_id="swap", prompt=p1, response_a="Green.", response_b="Blue, yes.", label="b",
                  shown_first="b", annotator_id="r2")),
    ]
    return _write_lines(d / "pair_id_conflict.jsonl", lines)


def pair_id_conflict_files(d: Path) -> tuple[Path, Path]:
    """The same pair_id in two files with different responses (one judgment each)."""
    a = _write_lines(d / "conflict_1.jsonl", [_line(row(10, pair_id="cross", response_a="One.", response_b="Two."))])
    b = _write_lines(d / "conflict_2.jsonl", [_line(row(11, pair_id="cross", response_a="One.", response_b="Three.",
                                                        annotator_id="rev-02"))])
    return a, b


# ---------------------------------------------------------------- 2. unknown judges are unknown
def trl_without_annotator_jsonl(d: Path) -> Path:
    """TRL rows that do not say who judged: ``annotator_kind`` is ``unknown``."""
    rows = [{"prompt": f"Name a prime number above {i}.", "chosen": f"{[2, 3, 5, 7, 11, 13][i]}", "rejected": "8"}
            for i in range(4)]
    return _write_lines(d / "trl_no_kind.jsonl", [_line(r) for r in rows])


# ---------------------------------------------------------------- 3. unreadable input: exit 2 or quarantine, never a traceback
def _jsonl_bytes(n: int) -> bytes:
    return ("\n".join(_line(row(i, critique="x" * 200)) for i in range(n)) + "\n").encode()


def corrupt_gzip(d: Path) -> Path:
    """A gzip file whose compressed bytes are damaged after the first 64 KiB of output: exit 2."""
    data = bytearray(gzip.compress(_jsonl_bytes(3000), compresslevel=1))
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)  # zeros inside the deflate stream
    p = d / "corrupt.jsonl.gz"
    p.write_bytes(bytes(data))
    return p


def truncated_gzip(d: Path) -> Path:
    """A gzip file cut in the middle (no end-of-stream marker): exit 2."""
    data = gzip.compress(_jsonl_bytes(3000), compresslevel=1)
    p = d / "truncated.jsonl.gz"
    p.write_bytes(data[: len(data) * 2 // 3])
    return p


def small_truncated_gzip(d: Path) -> Path:
    """A gzip file of less than 64 KiB of text cut in the middle: the damage is met by the first read (the
    UTF-8 sniff), and is exit 2 naming the line all the same."""
    data = gzip.compress(_jsonl_bytes(60), compresslevel=1)
    p = d / "small_truncated.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    return p


def gzip_bomb(d: Path, gib: int = 2) -> Path:
    """``gib`` GiB of ``x`` without a newline, as repeated gzip members (~2 MB on disk).
    Rejected by the line or decompressed-size cap early, memory bounded."""
    chunk = gzip.compress(b"x" * (16 << 20), compresslevel=9)  # 16 MiB -> ~16 KB
    p = d / "bomb.jsonl.gz"
    with open(p, "wb") as fh:
        for _ in range(gib * 64):
            fh.write(chunk)
    return p


def long_line_jsonl(d: Path, line_bytes: int = 1 << 20) -> Path:
    """Line 2 is a JSON object of ``line_bytes`` bytes (a huge critique); lines 1, 3 are normal."""
    big = _line(row(1, critique="y" * line_bytes))
    return _write_lines(d / "long_line.jsonl", [_line(row(0)), big, _line(row(2))])


def _parquet_table(n: int = 40):
    import pyarrow as pa

    rows = [row(i, response_a=f"Water it weekly ({i}).") for i in range(n)]
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    cols["prompt"] = [r["prompt"][0]["content"] for r in rows]
    return pa.table(cols)


def corrupt_parquet_page(d: Path) -> Path:
    """A Parquet file whose footer is intact but whose first data pages are overwritten: exit 2."""
    import pyarrow.parquet as pq

    p = d / "corrupt_page.parquet"
    pq.write_table(_parquet_table(400), p, compression="snappy", row_group_size=100)
    data = bytearray(p.read_bytes())
    # the pages start after the 4-byte magic; damage the first row group's pages
    data[4:4 + 600] = bytes(range(256)) * 2 + bytes(88)
    p.write_bytes(bytes(data))
    return p


def parquet_extra_types(d: Path) -> Path:
    """Extra (unknown) columns of binary, decimal and duration type: carried into ``extra`` as text."""
    import datetime as dt
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    t = _parquet_table(3)
    t = t.append_column("blob", pa.array([b"\x00\xffraw", b"", None], type=pa.binary()))
    t = t.append_column("price", pa.array([decimal.Decimal("12.50"), decimal.Decimal("-0.001"), None], type=pa.decimal128(10, 3)))
    t = t.append_column("took", pa.array([dt.timedelta(seconds=90, microseconds=500), dt.timedelta(0), None], type=pa.duration("us")))
    p = d / "extra_types.parquet"
    pq.write_table(t, p)
    return p


def parquet_not_utf8(d: Path) -> Path:
    """Row 2's ``response_b`` string holds bytes that are not UTF-8 (Parquet does not check):
    row 2 quarantined, rows 1 and 3 valid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = _parquet_table(3)
    bad = pa.array([b"Plants need no water.", b"Plants do \xff\xfenot", b"Never."], type=pa.binary()).view(pa.string())
    t = t.set_column(t.schema.get_field_index("response_b"), "response_b", bad)
    p = d / "not_utf8.parquet"
    pq.write_table(t, p)
    return p


def deep_csv(d: Path, depth: int = 5000) -> Path:
    """Row 1's ``prompt`` cell is a list nested ``depth`` deep: quarantined; row 2 valid."""
    deep = _csv_values(row(0))
    deep[CSV_HEADER.index("prompt")] = "[" * depth + "]" * depth
    p = d / "deep.csv"
    p.write_text(_csv_line(CSV_HEADER) + _csv_line(deep) + _csv_line(_csv_values(row(1))), encoding="utf-8")
    return p


def deep_jsonl(d: Path, depth: int = 100_000) -> Path:
    """Line 2 has an unknown field nested ``depth`` deep (Arrow's parser overflows its stack
    on this); line 3 one nested 300 deep (deeper than the ``extra`` JSON can be written).
    Both quarantined; lines 1 and 4 valid."""
    base = _line(row(1))[:-1]
    deep = base + ', "x": ' + "[" * depth + "]" * depth + "}"
    mid = _line(row(2))[:-1] + ', "x": ' + '{"k": ' * 300 + "1" + "}" * 300 + "}"
    return _write_lines(d / "deep.jsonl", [_line(row(0)), deep, mid, _line(row(3))])


def long_field_csv(d: Path, chars: int = 200_000) -> Path:
    """Row 1's ``response_b`` is longer than the csv module's default field limit (131,072): row
    1 is read like any other (within ``ingest.max_line_bytes``), row 2 too."""
    big = _csv_values(row(0))
    big[CSV_HEADER.index("response_b")] = "z" * chars
    p = d / "long_field.csv"
    p.write_text(_csv_line(CSV_HEADER) + _csv_line(big) + _csv_line(_csv_values(row(1))), encoding="utf-8")
    return p


def latin1_policy(d: Path) -> Path:
    """A policy file in Latin-1 (not UTF-8): exit 2 naming the file."""
    p = d / "latin1-policy.toml"
    p.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    return p


BUILDERS: dict[str, Callable[[Path], object]] = {
    f.__name__: f for f in (
        duplicate_keys_jsonl, duplicate_keys_trl_jsonl, bom_jsonl, bom_csv, bad_bytes_csv, duplicate_header_csv,
        pair_id_conflict_jsonl, pair_id_conflict_files, trl_without_annotator_jsonl, corrupt_gzip, truncated_gzip,
        small_truncated_gzip,
        gzip_bomb, long_line_jsonl, corrupt_parquet_page, parquet_extra_types, parquet_not_utf8, deep_csv, deep_jsonl, long_field_csv,
        latin1_policy,
    )
}


def build(name: str, d: Path) -> object:
    """Write case ``name`` into ``d``; returns its path (or paths)."""
    d.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    for name in BUILDERS:
        print(name, build(name, a.out))


if __name__ == "__main__":
    main()
