"""Hostile input changes nothing: every file of the corpus (``tests/hostile/make_corpus.py``)
through the real ``validate`` / ``curate`` commands.  Each test asserts the exit code, the
message (file, line, field), that no traceback is printed, and that the ledger adds up.

In-process through Typer's runner (an exception would show as ``res.exception``), except the
two cases that could take the process down with them (a native crash, a memory blow-up):
those run ``python -m flows.cli`` in a child process.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT
from hostile import make_corpus as corpus
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def cli(*args: object) -> tuple[int, str, str]:
    """Run prefpipe in-process: (exit code, stdout, stderr); fails on an uncaught exception."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), (res.exception, res.output)
    assert "Traceback" not in res.stdout + res.stderr
    return res.exit_code, res.stdout, res.stderr


def validate_json(*args: object) -> tuple[int, dict]:
    code, out, _ = cli("validate", *args, "--json")
    data = json.loads(out)
    if "ledger" in data:  # rows were read: they all ended valid or quarantined
        led = data["ledger"]
        assert led["rows_in"] == led["rows_valid"] + led["quarantined"] == sum(s["rows_in"] for s in data["sources"])
        assert sum(led["quarantined_by_reason"].values()) == led["quarantined"]
    return code, data


def curate(store: Path, *args: object) -> tuple[int, str, dict | None]:
    """curate -> (exit code, stderr, manifest of the version written, if any)."""
    code, out, err = cli("curate", *args, "--store", store)
    if code:
        return code, err, None
    vid = out.strip().splitlines()[-1]
    return code, err, json.loads((store / "versions" / vid / "manifest.json").read_text())


def read(store: Path, m: dict, table: str) -> pl.DataFrame:
    """A table of the version written (through the store's verified reader)."""
    from pipeline.store import Store

    return Store(store).get(m["version_id"]).read(table)


def dpo_rows(store: Path, m: dict) -> pl.DataFrame:
    from pipeline.store import Store

    h = Store(store).get(m["version_id"])
    return pl.concat([h.read_split(s) for s in ("train", "validation", "test")])


def assert_ledger_adds_up(m: dict) -> None:
    led = m["ledger"]
    assert led["pairs"] == led["pairs_kept"] + sum(led["routed"].values()) + sum(led["dropped"].values())
    assert sum(led["splits"].values()) == led["pairs_kept"]
    assert m["ingest"]["rows_in"] == m["ingest"]["rows_valid"] + m["ingest"]["quarantined"]


def nothing_written(store: Path) -> bool:
    return not (store / "versions").exists() or not any((store / "versions").iterdir())


# ---------------------------------------------------------------- 1. input is never silently changed
@pytest.mark.parametrize("fast", [True, False], ids=["arrow-path", "per-row-path"])
def test_duplicate_json_keys_quarantine_the_row_naming_the_key(tmp_path, monkeypatch, fast):
    from pipeline import ingest

    monkeypatch.setattr(ingest, "FAST_JSONL", fast)
    path = corpus.build("duplicate_keys_jsonl", tmp_path)
    code, data = validate_json(path)
    assert code == 1 and data["ledger"]["rows_valid"] == 2
    errs = {e["line"]: e for e in data["errors"]}
    assert set(errs) == {2, 3, 5} and {e["reason"] for e in errs.values()} == {"invalid_json"}
    assert "key 'label' twice" in errs[2]["error"] and "line 2" in errs[2]["error"]
    assert "key 'text' twice" in errs[3]["error"] and "key 'label' twice" in errs[5]["error"]


def test_duplicate_json_keys_in_an_adapted_format(tmp_path):
    code, data = validate_json(corpus.build("duplicate_keys_trl_jsonl", tmp_path))
    assert code == 1 and data["ledger"]["rows_valid"] == 1
    assert [(e["line"], e["reason"]) for e in data["errors"]] == [(2, "invalid_json")]
    assert "key 'chosen' twice" in data["errors"][0]["error"]


def test_a_key_repeated_only_inside_a_text_is_no_duplicate(tmp_path):
    from pipeline.readers import loads_json

    text = b'{"a": "x\\": 1, \\"a\\": 2", "b" : {"a": 1}, "c": [{"a": 1}, {"a": 2}]}'
    assert loads_json(text) == {"a": 'x": 1, "a": 2', "b": {"a": 1}, "c": [{"a": 1}, {"a": 2}]}


def _json_text(value, draw) -> str:
    """``value`` as JSON text written the many ways JSON allows: blanks around colons and
    commas, characters written as \\u escapes (quotes and colons too), and sometimes a key
    written twice (``{"k": 1, "k": 2}``)."""
    import hypothesis.strategies as st

    blank = lambda: draw(st.sampled_from(["", "", " ", "\t", "  \r"]))  # noqa: E731

    def string(t: str) -> str:
        out = []
        for ch in t:
            how = draw(st.integers(0, 3)) if ch in '":' else 0
            out.append(f"\\u{ord(ch):04x}" if how == 1 else '\\"' if ch == '"' else json.dumps(ch)[1:-1])
        return '"' + "".join(out) + '"'

    if isinstance(value, dict):
        items = list(value.items())
        if items and draw(st.booleans()):
            items.insert(draw(st.integers(0, len(items))), draw(st.sampled_from(items)))  # a repeated key
        return "{" + ",".join(f"{blank()}{string(k)}{blank()}:{blank()}{_json_text(v, draw)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(blank() + _json_text(v, draw) for v in value) + "]"
    return string(value) if isinstance(value, str) else json.dumps(value)


def test_loads_json_refuses_exactly_the_texts_that_repeat_a_key():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pipeline.readers import JSONValueError, loads_json

    keys = st.text(alphabet='ab":\\ ', min_size=0, max_size=3)
    values = st.recursive(st.none() | st.integers(-5, 5) | st.text(alphabet='xy":\\ ', max_size=4),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4), max_leaves=12)

    def repeats(text: str) -> bool:  # reference: Python's parser sees every pair
        seen = []
        json.loads(text, object_pairs_hook=lambda kv: seen.append(len(kv) != len(dict(kv))) or dict(kv))
        return any(seen)

    @settings(max_examples=100, deadline=None)
    @given(st.dictionaries(keys, values, min_size=1, max_size=4), st.data())
    def check(value, data):
        text = _json_text(value, data.draw)
        try:
            got = loads_json(text.encode())
        except JSONValueError:
            assert repeats(text)
        else:
            assert not repeats(text) and got == json.loads(text)

    check()


@pytest.mark.parametrize("builder", ["bom_jsonl", "bom_csv"])
def test_utf8_bom_before_line_1_is_accepted(tmp_path, builder):
    path = corpus.build(builder, tmp_path)
    code, data = validate_json(path)
    assert code == 0 and data["ledger"]["rows_in"] == data["ledger"]["rows_valid"] == 3
    code, _, m = curate(tmp_path / "store", path)
    assert code == 0 and m["ledger"]["pairs_kept"] == 3  # before: a BOM CSV lost every row and still exited 0
    assert_ledger_adds_up(m)


def test_undecodable_csv_bytes_quarantine_the_row(tmp_path):
    path = corpus.build("bad_bytes_csv", tmp_path)
    code, data = validate_json(path)
    assert code == 1 and data["ledger"]["rows_valid"] == 2
    [e] = data["errors"]
    assert (e["source_file"], e["line"], e["reason"]) == (str(path), 3, "invalid_json")
    assert "invalid UTF-8" in e["error"] and "0xff" in e["error"]
    _, _, m = curate(tmp_path / "store", path)
    texts = dpo_rows(tmp_path / "store", m).select(pl.col("rejected").list.first().struct.field("content")).to_series()
    assert not texts.str.contains("\ufffd").any()  # no replacement character in a "valid" row


def test_duplicated_csv_header_column_is_exit_2(tmp_path):
    path = corpus.build("duplicate_header_csv", tmp_path)
    code, _, err = cli("validate", path)
    assert code == 2 and str(path) in err and "'label' twice" in err and "line 1" in err
    code, err, _ = curate(tmp_path / "store", path)
    assert code == 2 and "'label'" in err and nothing_written(tmp_path / "store")


def _conflict_flags(store: Path, m: dict) -> pl.DataFrame:
    return read(store, m, "flags.parquet").filter(pl.col("reason") == "pair_id_conflict")


def test_pair_id_with_different_texts_is_never_merged(tmp_path):
    path = corpus.build("pair_id_conflict_jsonl", tmp_path)
    code, _, m = curate(tmp_path / "store", path)
    assert code == 0
    assert_ledger_adds_up(m)
    assert m["ledger"]["judgments_dropped"] == {"pair_id_conflict": 3}  # every judgment of "shared"
    assert sorted(_conflict_flags(tmp_path / "store", m)["subject_id"]) == ["h-0000", "h-0001", "h-0002"]
    rows = dpo_rows(tmp_path / "store", m)
    assert rows["pair_id"].to_list() == ["swap"]  # a/b swapped is the same pair: one row, both judgments
    assert sorted(rows["source_comparison_ids"][0]) == ["h-0003", "h-0004"]
    # the same lines in the other order: the same decisions
    lines = path.read_text().splitlines()
    rev = tmp_path / "reversed.jsonl"
    rev.write_text("\n".join(reversed(lines)) + "\n")
    _, _, m2 = curate(tmp_path / "store2", rev)
    assert m2["ledger"]["judgments_dropped"] == m["ledger"]["judgments_dropped"]
    assert dpo_rows(tmp_path / "store2", m2)["pair_id"].to_list() == ["swap"]


def test_pair_id_conflict_across_files_and_across_versions(tmp_path):
    one, two = corpus.build("pair_id_conflict_files", tmp_path)
    code, _, both = curate(tmp_path / "together", one, two)
    assert code == 0 and both["ledger"]["judgments_dropped"] == {"pair_id_conflict": 2} and both["ledger"]["pairs_kept"] == 0
    # parent -> child: the parent used its "cross" judgment; the child that re-uses the id with other texts drops both
    store = tmp_path / "chain"
    _, _, parent = curate(store, one)
    assert dpo_rows(store, parent)["pair_id"].to_list() == ["cross"]
    code, _, child = curate(store, two, "--parent", parent["version_id"])
    assert code == 0
    assert_ledger_adds_up(child)
    assert child["ledger"]["judgments_dropped"] == {"pair_id_conflict": 2} and child["ledger"]["pairs_kept"] == 0
    assert sorted(_conflict_flags(store, child)["subject_id"]) == ["h-0010", "h-0011"]


def test_a_pair_id_conflict_is_the_reason_a_judgment_is_dropped_for_whatever_else_flags_it():
    from pipeline.select import filter_judgments
    from schemas.check import make_flags
    from schemas.policy import SelectConfig

    judgments = pl.DataFrame({"comparison_id": ["c1", "c2", "c3"], "annotator_id": ["r", "r", "s"], "pair_id": ["p", "p", "q"]})
    flags = pl.concat([
        make_flags(["c1", "c2"], subject_kind="judgment", check="duplicates", reason="exact_duplicate"),
        make_flags(["c1"], subject_kind="judgment", check="pair_id_conflict", reason="pair_id_conflict"),
    ])
    sel = filter_judgments(judgments, flags, SelectConfig())
    assert sel.dropped_by_reason == {"exact_duplicate": 1, "pair_id_conflict": 1}
    assert sel.kept["comparison_id"].to_list() == ["c3"]


# ---------------------------------------------------------------- 2. unknown judges are unknown
def test_formats_without_a_judge_are_unknown_never_human(tmp_path):
    path = corpus.build("trl_without_annotator_jsonl", tmp_path)
    code, _, m = curate(tmp_path / "store", path)
    assert code == 0
    assert_ledger_adds_up(m)
    j = read(tmp_path / "store", m, "judgments.parquet")
    assert set(j["annotator_kind"]) == {"unknown"}
    assert set(dpo_rows(tmp_path / "store", m)["annotator_kind"]) == {"unknown"}
    agreement = next(c for c in m["checks"] if c["name"] == "agreement")["metrics"]
    assert agreement["human"]["n_ratings"] == 0 and agreement["ai"]["n_ratings"] == 0
    code, _, m_ai = curate(tmp_path / "store", path, "--annotator-kind", "ai")
    assert code == 0 and set(dpo_rows(tmp_path / "store", m_ai)["annotator_kind"]) == {"ai"}


def test_agreement_never_counts_unknown_judges_as_human():
    from pipeline.checks import agreement
    from pipeline.ingest import judgments_from_records

    rows = [corpus.row(10 * p + k, prompt=f"Question {p}?", response_a=f"Answer {p}.", response_b=f"No answer {p}.",
                       annotator_id=f"judge-{k}", annotator_kind=kind, label="ab"[(p + (k == 2)) % 2])
            for p in range(6) for k, kind in enumerate(["unknown", "unknown", "human"])]
    metrics = agreement.run(judgments_from_records(rows)).metrics
    assert metrics["human"]["n_pairs"] == 0 and metrics["ai"]["n_pairs"] == 0  # one human rating per pair: nothing to agree with
    assert metrics["unknown"]["n_pairs"] == 6 and metrics["unknown"]["krippendorff_alpha"] == 1.0
    assert metrics["all"]["n_pairs"] == 6


def test_unknown_and_ai_judges_of_one_pair_make_it_mixed():
    from pipeline.select import with_unknown_kinds

    pairs = pl.DataFrame({"pair_id": ["p1", "p2", "p3", "p4"], "annotator_kind": ["ai", "ai", "human", "mixed"]})
    judgments = pl.DataFrame({"pair_id": ["p1", "p1", "p2", "p3", "p3", "p4"],
                              "annotator_kind": ["unknown", "ai", "unknown", "human", "unknown", "unknown"]})
    assert with_unknown_kinds(pairs, judgments)["annotator_kind"].to_list() == ["mixed", "unknown", "human", "mixed"]


# ---------------------------------------------------------------- 3. unreadable input: exit 2 naming file, line, reason
@pytest.mark.parametrize(("builder", "why", "line"), [
    ("corrupt_gzip", "damaged gzip data", "line "),
    ("truncated_gzip", "damaged gzip data", "line "),
    ("small_truncated_gzip", "damaged gzip data", "line "),
    ("corrupt_parquet_page", "damaged Parquet data", "rows from 1"),
])
def test_damaged_containers_are_exit_2_and_write_nothing(tmp_path, builder, why, line):
    path = corpus.build(builder, tmp_path)
    code, _, err = cli("validate", path)
    assert code == 2 and str(path) in err and why in err and line in err
    code, out, _ = cli("validate", path, "--json")
    assert code == 2 and json.loads(out)["file"] == str(path)
    if "gzip" in builder:
        assert isinstance(json.loads(out)["line"], int)
    code, err, _ = curate(tmp_path / "store", path)
    assert code == 2 and why in err and "nothing written" in err and nothing_written(tmp_path / "store")


def test_parquet_extra_columns_of_binary_decimal_duration_are_carried_as_text(tmp_path):
    path = corpus.build("parquet_extra_types", tmp_path)
    code, data = validate_json(path)
    assert code == 0 and data["ledger"]["rows_valid"] == 3
    _, _, m = curate(tmp_path / "store", path)
    j = read(tmp_path / "store", m, "judgments.parquet").sort("source_line")
    extra = [json.loads(e) for e in j["extra"]]
    assert extra[0] == {"blob": "AP9yYXc=", "price": "12.500", "took": "PT90.0005S"}  # base64, exact decimal, ISO 8601
    assert extra[2] == {"blob": None, "price": None, "took": None}


def test_parquet_strings_that_are_not_utf8_quarantine_the_row(tmp_path):
    path = corpus.build("parquet_not_utf8", tmp_path)
    code, data = validate_json(path)
    assert code == 1 and data["ledger"]["rows_valid"] == 2
    [e] = data["errors"]
    assert (e["line"], e["reason"]) == (2, "invalid_json") and "invalid UTF-8 in column 'response_b'" in e["error"]


def test_csv_cell_nested_thousands_deep_is_quarantined(tmp_path):
    path = corpus.build("deep_csv", tmp_path)
    code, data = validate_json(path)
    assert code == 1 and data["ledger"]["rows_valid"] == 1
    [e] = data["errors"]
    assert (e["line"], e["reason"]) == (2, "invalid_json") and "'prompt'" in e["error"] and "levels deep" in e["error"]


def test_csv_field_beyond_the_csv_module_limit_is_read(tmp_path):
    path = corpus.build("long_field_csv", tmp_path)
    code, data = validate_json(path)
    assert code == 0 and data["ledger"]["rows_valid"] == 2
    code, _, err = cli("validate", path, "--max-line-bytes", "100KiB")  # within the cap only
    assert code == 2 and "line 2" in err and "max_line_bytes" in err


def test_policy_file_that_is_not_utf8_is_exit_2(tmp_path):
    policy = corpus.build("latin1_policy", tmp_path)
    data = corpus.build("bom_jsonl", tmp_path)
    code, err, _ = curate(tmp_path / "store", data, "--policy", policy)
    assert code == 2 and str(policy) in err and "UTF-8" in err and "0xe9" in err and nothing_written(tmp_path / "store")


def test_line_cap_is_exit_2_naming_the_line(tmp_path):
    path = corpus.build("long_line_jsonl", tmp_path)
    code, data = validate_json(path)
    assert code == 0 and data["ledger"]["rows_valid"] == 3  # 1 MiB is far below the default 64 MiB
    code, _, err = cli("validate", path, "--max-line-bytes", "64KiB")
    assert code == 2 and f"{path}: line 2: longer than ingest.max_line_bytes (65,536 bytes)" in err
    policy = tmp_path / "p.toml"
    policy.write_text('[ingest]\nmax_line_bytes = "64KiB"\n')
    code, err, _ = curate(tmp_path / "store", path, "--policy", policy)
    assert code == 2 and "line 2" in err and nothing_written(tmp_path / "store")
    code, _, err = cli("validate", path, "--max-line-bytes", "lots")
    assert code == 2 and "max_line_bytes" in err


def test_decompressed_size_cap_is_exit_2(tmp_path):
    import gzip

    path = tmp_path / "big.jsonl.gz"
    rows = "".join(json.dumps(corpus.row(i, critique="c" * 1000)) + "\n" for i in range(2000))  # ~2.4 MB
    path.write_bytes(gzip.compress(rows.encode()))
    code, _, err = cli("validate", path, "--max-decompressed-bytes", "1MiB")
    assert code == 2 and str(path) in err and "max_decompressed_bytes (1,048,576 bytes)" in err and "line " in err
    assert cli("validate", path)[0] == 0


def _run_real_cli(*args: object) -> tuple[subprocess.CompletedProcess, int]:
    """``python -m flows.cli ARGS`` in a child process: (result, its peak RSS in MiB)."""
    # VmHWM, not ru_maxrss: Linux carries the forking process's peak RSS (here pytest's, ~1 GB late in
    # the suite) into the child's ru_maxrss across exec; VmHWM belongs to the child's own address space.
    code = ("import atexit, runpy, sys\n"
            "def _hwm():\n"
            "    for ln in open('/proc/self/status'):\n"
            "        if ln.startswith('VmHWM:'): return int(ln.split()[1])\n"
            "atexit.register(lambda: print('PEAK_RSS_KB', _hwm(), file=sys.stderr))\n"
            f"sys.argv = ['prefpipe', *{[str(a) for a in args]!r}]\n"
            "runpy.run_module('flows.cli', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    peak = [int(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    return proc, peak[0] // 1024 if peak else -1


def test_gzip_bomb_is_rejected_early_with_bounded_memory(tmp_path):
    path = corpus.build("gzip_bomb", tmp_path)  # ~2 MB expanding to 2 GiB, no newline (before: MemoryError)
    proc, peak_mib = _run_real_cli("validate", path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{path}: line 1: longer than ingest.max_line_bytes" in proc.stderr
    assert 0 < peak_mib < 1024  # the cap (64 MiB) + one read, not the 2 GiB line


def test_jsonl_nested_100k_deep_is_quarantined_not_a_crash(tmp_path):
    path = corpus.build("deep_jsonl", tmp_path)  # before: Arrow's parser overflowed its stack (SIGSEGV)
    proc, _ = _run_real_cli("validate", path, "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert data["ledger"]["rows_in"] == 4 == data["ledger"]["rows_valid"] + data["ledger"]["quarantined"]
    assert [(e["line"], e["reason"]) for e in data["errors"]] == [(2, "invalid_json"), (3, "invalid_json")]
    assert all("levels deep" in e["error"] for e in data["errors"])


def test_blocks_a_caller_still_holds_are_never_overwritten_by_later_reads(tmp_path):
    # the reader reuses a block's buffer once nothing refers to it: blocks kept whole, or only through a view
    # of their bytes (a NumPy array, a memoryview), keep their lines while many more are read
    import numpy as np

    from pipeline.readers import iter_line_blocks

    lines = [f'{{"i": {i}, "t": "{"x" * (i % 97)}"}}\n'.encode() for i in range(40_000)]
    path = tmp_path / "many.jsonl"
    path.write_bytes(b"".join(lines))
    kept, views = [], []
    for k, block in enumerate(iter_line_blocks(path, 1 << 30, block_bytes=64 << 10)):
        if k % 3 == 0:
            kept.append((block.first_line, bytes(block.data), block))
        elif k % 3 == 1:
            views.append((block.first_line, bytes(block.data), np.frombuffer(block.data, dtype=np.uint8)))
    assert len(kept) + len(views) > 25
    for first, want, block in kept:
        assert bytes(block.data) == want == b"".join(lines[first - 1:first - 1 + len(block)])
    for _first, want, view in views:
        assert view.tobytes() == want
