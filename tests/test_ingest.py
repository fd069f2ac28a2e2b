"""Ingest: containers, quarantine reasons, ledger, pair ids, normalisation."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import polars as pl
import pytest
from conftest import ROOT, canonical, spy_per_row, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.ingest import UnreadableFile, ingest_files, judgments_from_records
from schemas.arrow import polars_schema
from schemas.records import Judgment


def test_canonical_roundtrip_fields(make_jsonl):
    extra = canonical(1, customer_tier="gold", response_b={"text": "Buy it.", "model": "m-2", "generation": {"temperature": 0.7}})
    r = ingest_files([make_jsonl([canonical(0), extra])])
    assert r.ledger.rows_in == 2 and r.ledger.rows_valid == 2 and r.ledger.quarantined == 0
    j = r.judgments
    assert j.schema == polars_schema(Judgment)
    row = j.filter(pl.col("comparison_id") == "c-00001").row(0, named=True)
    assert row["model_b"] == "m-2"
    assert row["model_a"] == "m-1" and row["model_version_a"] == "v1"
    meta = json.loads(row["extra"])
    assert meta["customer_tier"] == "gold"  # unknown fields are carried, not dropped
    assert meta["response_b_meta"] == {"generation": {"temperature": 0.7}}
    assert row["source_line"] == 2 and row["source_file"].endswith("batch.jsonl")
    assert row["created_at"].year == 2026 and str(row["created_at"].tzinfo) == "UTC"


def test_string_prompt_equals_single_user_message():
    a = judgments_from_records([canonical(0, prompt="Hello there")])
    b = judgments_from_records([canonical(0, prompt=[{"role": "user", "content": "Hello there"}])])
    assert a["prompt"].to_list() == b["prompt"].to_list()
    assert a["pair_id"].to_list() == b["pair_id"].to_list()
    assert a["prompt_text"][0] == "Hello there"


def test_normalisation_nfc_and_whitespace():
    decomposed = "Cafe\u0301 menu\r\n  "
    j = judgments_from_records([canonical(0, prompt=decomposed, response_b="  Caf\u00e9 \r\n")])
    assert j["prompt_text"][0] == "Caf\u00e9 menu"
    assert j["response_b"][0] == "Caf\u00e9"


def test_timestamps_mixed_formats_in_one_batch():
    stamps = ["2026-11-20", "2026-11-20T09:14:03+09:00", "2026-11-20T09:14:03Z", "2026-11-20 09:14:03.5", None]
    j = judgments_from_records([canonical(i, created_at=t) for i, t in enumerate(stamps)])
    got = [None if t is None else t.isoformat() for t in j["created_at"].to_list()]
    assert got == ["2026-11-20T00:00:00+00:00", "2026-11-20T00:14:03+00:00", "2026-11-20T09:14:03+00:00",
                   "2026-11-20T09:14:03.500000+00:00", None]


def test_pair_id_order_independent_and_given_id_kept():
    base = canonical(0)
    swapped = canonical(0, comparison_id="c-swapped", response_a=base["response_b"], response_b=base["response_a"], label="b")
    j = judgments_from_records([base, swapped, canonical(2, pair_id="my-pair-7")])
    assert j["pair_id"][0] == j["pair_id"][1]
    assert j["pair_id"][0].startswith("p-")
    assert j["pair_id"][2] == "my-pair-7"


def test_pair_id_stable_across_processes():
    code = (
        "import sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
        "from conftest import canonical\n"
        "from pipeline.ingest import judgments_from_records\n"
        "print(judgments_from_records([canonical(3)])['pair_id'][0])\n"
    ) % (str(ROOT), str(ROOT / "tests"))
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout.strip() for seed in ("1", "2")}
    here = judgments_from_records([canonical(3)])["pair_id"][0]
    assert outs == {here}
    # pinned value: a change to normalisation or hashing that alters ids must be deliberate
    assert here == judgments_from_records([canonical(3)])["pair_id"][0]


@pytest.mark.parametrize(
    ("override", "reason", "field"),
    [
        ({"label": "maybe"}, "invalid_value", "label"),
        ({"label": None}, "missing_field", "label"),
        ({"label": ...}, "missing_field", "label"),
        ({"comparison_id": ...}, "missing_field", "comparison_id"),
        ({"annotator_id": "  "}, "invalid_value", "annotator_id"),
        ({"pair_id": ""}, "invalid_value", "pair_id"),  # an empty id would join every such row into one pair
        ({"pair_id": " \t"}, "invalid_value", "pair_id"),
        ({"annotator_kind": "robot"}, "invalid_value", "annotator_kind"),
        ({"strength": 1.7}, "invalid_value", "strength"),
        ({"strength": "high"}, "invalid_type", "strength"),
        ({"strength": True}, "invalid_type", "strength"),
        ({"confidence": -0.1}, "invalid_value", "confidence"),
        ({"shown_first": "left"}, "invalid_value", "shown_first"),
        ({"gold_label": "yes"}, "invalid_value", "gold_label"),
        ({"created_at": "last tuesday"}, "invalid_value", "created_at"),
        ({"locale": "english language"}, "invalid_value", "locale"),
        ({"response_a": "   "}, "empty_text", "response_a"),
        ({"response_b": {"text": ""}}, "empty_text", "response_b"),
        ({"response_b": 42}, "invalid_type", "response_b"),
        ({"prompt": ""}, "empty_text", "prompt"),
        ({"prompt": []}, "invalid_value", "prompt"),
        ({"prompt": 3}, "invalid_type", "prompt"),
        ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "invalid_value", "prompt"),
        ({"prompt": [{"role": "wizard", "content": "hi"}]}, "invalid_value", "prompt"),
        ({"prompt": [{"role": "user", "text": "hi"}]}, "invalid_type", "prompt"),
        ({"tags": "a,b"}, "invalid_type", "tags"),
        ({"tags": ["a", None]}, "invalid_type", "tags"),
        ({"prompt": [{"role": "user", "content": None}]}, "invalid_type", "prompt"),
        ({"prompt": [{"role": "user", "content": "hi", "name": "x"}]}, "invalid_type", "prompt"),
        ({"comparison_id": None, "tags": ["a", None]}, "invalid_type", "tags"),  # a wrong type is reported first
        ({"batch_id": 7}, "invalid_type", "batch_id"),
    ],
)
def test_each_quarantine_reason(make_jsonl, override, reason, field):
    rows = [canonical(0), canonical(1, **override), canonical(2)]
    r = ingest_files([make_jsonl(rows)])
    assert r.ledger.rows_in == 3 and r.ledger.rows_valid == 2 and r.ledger.quarantined == 1
    q = r.quarantine.row(0, named=True)
    assert (q["reason"], q["field"], q["line"]) == (reason, field, 2)
    assert field in q["error"] and "line 2" in q["error"]
    assert "expected" in q["error"] and ("found" in q["error"])
    assert q["raw"] == json.dumps(rows[1], ensure_ascii=False)  # raw text kept verbatim
    assert set(r.judgments["comparison_id"]) == {"c-00000", "c-00002"}


def test_invalid_json_and_non_object_lines(make_jsonl):
    path = make_jsonl([canonical(0), canonical(1)], raw_lines={1: '{"comparison_id": "x", oops', 2: "[1, 2]"})
    r = ingest_files([path])
    assert r.ledger.rows_in == 4 and r.ledger.quarantined == 2
    assert r.quarantine["reason"].to_list() == ["invalid_json", "invalid_json"]
    assert r.quarantine["line"].to_list() == [2, 3]
    assert "found list" in r.quarantine["error"][1]
    assert r.quarantine["raw"][0] == '{"comparison_id": "x", oops'


def test_blank_lines_are_not_rows_but_line_numbers_stay_physical(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps(canonical(0)) + "\n\n" + json.dumps(canonical(1, label="nope")) + "\n", encoding="utf-8")
    r = ingest_files([p])
    assert r.ledger.rows_in == 2 and r.quarantine["line"].to_list() == [3]


def test_invalid_utf8_line_inside_valid_file_is_quarantined(tmp_path):
    p = tmp_path / "b.jsonl"
    good = json.dumps(canonical(0)).encode()
    p.write_bytes(good + b"\n" + b'{"comparison_id": "\xff\xfe"}\n' + json.dumps(canonical(2)).encode() + b"\n")
    r = ingest_files([p])
    assert r.ledger.rows_in == 3 and r.ledger.quarantined == 1
    assert r.quarantine.row(0, named=True)["reason"] == "invalid_json"


@pytest.mark.parametrize(
    ("content", "name", "why"),
    [
        (None, "missing.jsonl", "no such file"),
        ("\ufeff".encode("utf-16"), "utf16.jsonl", "not UTF-8"),
        (b"\xff\xfe\x00garbage", "latin.jsonl", "not UTF-8"),
        (b"hello", "data.txt", "unknown file type"),
        (b'{"foo": 1}\n{"bar": 2}\n', "what.jsonl", "unknown record format"),
        # no vote because there is nothing to vote: the message says why, not only "unknown record format"
        (b"", "empty.jsonl", "has no rows"),
        (b"\n \n\r\n", "blank.jsonl", "has no rows"),
        (json.dumps([canonical(0), canonical(1)]).encode() + b"\n", "array.json", "line 1: expected a JSON object, found list"),
        (b'[\n  {"comparison_id": "c-1"}\n]\n', "pretty.json", "a JSON array is not read"),
        (b"not a parquet file", "x.parquet", "Parquet"),
    ],
)
def test_unreadable_files_fail_whole(tmp_path, content, name, why):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    good = write_jsonl(tmp_path / "good.jsonl", [canonical(0)])
    with pytest.raises(UnreadableFile) as exc:
        ingest_files([good, p])
    assert why in str(exc.value) and name in str(exc.value)


def test_an_unknown_file_type_names_every_suffix_the_readers_take(tmp_path):
    """The refusal says what was allowed: every suffix container_of takes (.ndjson, .json, .pq were missing)."""
    from pipeline.readers import container_of

    with pytest.raises(UnreadableFile) as exc:
        container_of(tmp_path / "b.tsv")
    for suffix in (".jsonl", ".ndjson", ".json", ".gz", ".parquet", ".pq", ".csv"):
        assert suffix in str(exc.value).split("expected")[1], str(exc.value)
    for name in ("b.ndjson.gz", "b.json", "b.pq", "B.JSONL.GZ"):
        assert container_of(tmp_path / name)


def test_gzip_parquet_csv_containers(tmp_path):
    rows = [canonical(i) for i in range(5)]
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    flat = [{**r, "prompt": r["prompt"][0]["content"], "response_a": r["response_a"]["text"]} for r in rows]
    pq = tmp_path / "b.parquet"
    pl.DataFrame(flat).with_columns(pl.col("created_at").str.to_datetime(time_zone="UTC")).write_parquet(pq)  # real timestamp type
    flat = [{**r, "tags": ";".join(r["tags"])} for r in flat]
    csv = tmp_path / "b.csv"
    bad = dict(flat[0], comparison_id="c-bad", strength="strong")
    pl.DataFrame(flat + [bad]).write_csv(csv)
    r = ingest_files([gz, pq, csv])
    assert [s.format for s in r.sources] == ["canonical"] * 3
    assert [s.rows_valid for s in r.sources] == [5, 5, 5]
    assert r.ledger.quarantined == 1
    q = r.quarantine.row(0, named=True)
    assert q["source_file"].endswith("b.csv") and q["line"] == 7 and q["field"] == "strength"
    ids = r.judgments.group_by("source_file").agg(pl.col("pair_id").sort())["pair_id"].to_list()
    assert ids[0] == ids[1] == ids[2]  # same content in three containers -> same pair ids
    assert r.judgments.filter(pl.col("source_file").str.ends_with("csv"))["tags"][0].to_list() == ["cooking"]


def test_blank_csv_lines_are_not_rows(tmp_path):
    """As in JSON Lines: a blank line (a spreadsheet's or an editor's trailing one, LF or CRLF) is no
    record and no quarantined row; line numbers still count it."""
    head = "comparison_id,prompt,response_a,response_b,label,annotator_id,annotator_kind"
    for name, nl in (("lf.csv", "\n"), ("crlf.csv", "\r\n")):
        p = tmp_path / name
        p.write_bytes(nl.join([head, "c1,hi,a,b,a,r1,human", "", "c2,bye,a,b,b,r1,human", "  ", "", "c3,x,a,b"]).encode() + nl.encode())
        r = ingest_files([p])
        assert (r.ledger.rows_in, r.ledger.rows_valid, r.ledger.quarantined) == (3, 2, 1), name
        assert r.judgments["source_line"].to_list() == [2, 4]
        assert r.quarantine["line"].to_list() == [7] and "expected 7 CSV columns, found 4" in r.quarantine["error"][0]

def test_duplicate_rows_are_kept_for_the_checks(make_jsonl):
    # ingest never drops: re-delivered judgments are flagged later by the duplicates check
    r = ingest_files([make_jsonl([canonical(0), canonical(0, comparison_id="c-re")])])
    assert r.ledger.rows_valid == 2


_label = st.sampled_from(["a", "b", "tie", "both_bad", "escalate", "maybe", None, 3])
_strength = st.one_of(st.none(), st.floats(-0.5, 1.5, allow_nan=False), st.just("x"))
_text = st.one_of(st.text(max_size=12), st.none(), st.integers())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_label, _strength, _text, st.booleans()), min_size=0, max_size=25))
def test_ledger_invariant_property(tmp_path_factory, rows):
    """Whatever the rows, rows_in == valid + quarantined and nothing is lost or invented."""
    raw_lines = {}
    objs = []
    for i, (label, strength, text, broken) in enumerate(rows):
        if broken and i % 3 == 0:
            raw_lines[len(objs) + len(raw_lines)] = "{broken json"
            continue
        objs.append(canonical(i, label=label, strength=strength, response_b=text))
    p = write_jsonl(tmp_path_factory.mktemp("prop") / "b.jsonl", objs, raw_lines)
    r = ingest_files([p], fmt="canonical", batch_rows=1000)
    led = r.ledger
    assert led.rows_in == len(objs) + len(raw_lines)
    assert led.rows_in == led.rows_valid + led.quarantined
    assert r.judgments.height == led.rows_valid == led.judgments
    assert r.quarantine.height == led.quarantined
    lines_seen = sorted(r.judgments["source_line"].to_list() + r.quarantine["line"].to_list())
    assert lines_seen == list(range(1, led.rows_in + 1))


def test_streaming_batches_give_same_result(tmp_path):
    rows = [canonical(i, label="a" if i % 7 else "bad") for i in range(120)]
    p = write_jsonl(tmp_path / "b.jsonl", rows)
    big = ingest_files([p], batch_rows=10_000)
    small = ingest_files([p], batch_rows=7)
    assert big.judgments.equals(small.judgments)
    assert big.quarantine.equals(small.quarantine)
    assert big.ledger == small.ledger


def test_validate_mode_keeps_no_judgments(make_jsonl):
    r = ingest_files([make_jsonl([canonical(i) for i in range(10)])], keep_judgments=False)
    assert r.judgments.height == 0 and r.ledger.rows_valid == 10


# ---------------------------------------------------------------- vectorised JSONL path == per-row path
import re  # noqa: E402

from pipeline import ingest as ingest_mod  # noqa: E402
from pipeline import readers  # noqa: E402
from schemas.text import _nfc_non_ascii  # noqa: E402


def _per_row(monkeypatch, paths, **kw):
    with monkeypatch.context() as m:
        m.setattr(ingest_mod, "FAST_JSONL", False)
        return ingest_files(paths, **kw)


def _ingest_or_error(paths, **kw):
    try:
        return ingest_files(paths, **kw)
    except UnreadableFile as err:
        return str(err)


def _assert_same(fast, slow):
    if isinstance(fast, str) or isinstance(slow, str):  # a file rejected as a whole
        assert fast == slow
        return
    assert fast.ledger == slow.ledger
    assert fast.sources == slow.sources
    assert fast.judgments.equals(slow.judgments)
    assert fast.quarantine.equals(slow.quarantine)


def test_fast_path_takes_valid_rows_and_sends_bad_lines_per_row(make_jsonl, monkeypatch):
    rows = [canonical(i) for i in range(300)]
    rows[40] = canonical(40, strength="high")  # wrong type inside an otherwise parseable block
    rows[41] = canonical(41, label="maybe")  # parses, fails validation
    path = make_jsonl(rows, raw_lines={120: '{"comparison_id": "c-x", "prompt": "trunc'})
    seen = spy_per_row(monkeypatch)
    r = ingest_files([path])
    assert sorted(seen) == [41, 42, 121]  # 1-based lines; everything else went column-wise
    assert r.quarantine.select("line", "reason", "field").rows() == [
        (41, "invalid_type", "strength"), (42, "invalid_value", "label"), (121, "invalid_json", None)]
    assert r.ledger.rows_in == 301 and r.ledger.rows_valid == 298
    assert r.judgments["source_line"].to_list() == [n for n in range(1, 302) if n not in (41, 42, 121)]
    monkeypatch.undo()
    _assert_same(r, _per_row(monkeypatch, [path]))


def test_mixed_shapes_in_one_block_all_go_column_wise(tmp_path, monkeypatch):
    rows = []
    for i in range(60):
        row = canonical(i, locale=None if i % 5 == 0 else "en")
        if i % 2:
            row["prompt"] = row["prompt"][0]["content"]
        if i % 3 == 0:
            row["response_a"] = row["response_a"]["text"]
        if i % 7 == 0:
            row["response_b"] = {"text": row["response_b"], "model": "m-2"}
        rows.append(row)
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    seen = spy_per_row(monkeypatch)
    r = ingest_files([path])
    assert seen == [] and r.ledger.rows_valid == 60
    monkeypatch.undo()
    _assert_same(r, _per_row(monkeypatch, [path]))


def _shifting_shapes(n: int) -> list[dict]:
    """Rows whose polymorphic fields change shape every few rows (a block's parse hint is a block's before it)."""
    rows = []
    for i in range(n):
        row = canonical(i, label="bad" if i % 17 == 3 else "a")
        if (i // 7) % 2:
            row["prompt"] = row["prompt"][0]["content"]
        if (i // 11) % 3 == 1:
            row["response_a"] = row["response_a"]["text"]
        rows.append(row)
    return rows


@pytest.mark.parametrize("workers", [1, 3])
def test_blocks_worked_on_at_once_give_what_one_at_a_time_gives(tmp_path, monkeypatch, workers):
    path = write_jsonl(tmp_path / "b.jsonl", _shifting_shapes(200))
    raw = path.read_text(encoding="utf-8").splitlines()
    raw[57] = raw[57][:40]  # a truncated line: the per-row path, in the middle of a block
    path.write_text("\n".join(raw) + "\n", encoding="utf-8")
    at_once = ingest_files([path], batch_rows=6)  # ~34 blocks, BLOCK_THREADS at a time
    assert ingest_mod.BLOCK_THREADS == 2
    monkeypatch.setattr(ingest_mod, "BLOCK_THREADS", workers)
    other = ingest_files([path], batch_rows=6)
    _assert_same(at_once, other)
    assert at_once.ledger.rows_in == 200 and at_once.ledger.rows_valid == 200 - 12 - 1
    assert at_once.quarantine["line"].to_list() == sorted([i + 1 for i in range(200) if i % 17 == 3] + [58])
    assert at_once.judgments["source_line"].is_sorted()
    _assert_same(at_once, _per_row(monkeypatch, [path], batch_rows=6))


def test_a_failing_block_fails_the_ingest_and_leaves_no_thread(tmp_path, monkeypatch):
    import threading
    import time

    path = write_jsonl(tmp_path / "b.jsonl", _shifting_shapes(120))
    calls = []
    real = ingest_mod._process_block

    def flaky(parsed, **kw):
        calls.append(parsed.block.first_line)
        if parsed.block.first_line > 30:
            raise RuntimeError(f"block at line {parsed.block.first_line}")
        return real(parsed, **kw)

    monkeypatch.setattr(ingest_mod, "_process_block", flaky)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="block at line"):
        ingest_files([path], batch_rows=6)
    for _ in range(200):  # (the file's hash thread ends on its own, after its hash)
        if threading.active_count() == before:
            break
        time.sleep(0.01)
    assert threading.active_count() == before  # the block threads joined, none left waiting
    assert len(calls) < 120 // 6  # it stopped: the blocks after the failure were not all worked on


def test_unknown_fields_reach_extra_the_same_way(tmp_path, monkeypatch):
    rows = [canonical(0, task_id="t-1"), canonical(1), canonical(2, task_id=None),
            canonical(3, response_a={"text": "A.", "model": "m", "generation": {"t": 0.7}}),
            canonical(4, meta={"k": [1, 2.5, None]}), canonical(5)]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.append(json.dumps(canonical(6)).replace('"batch_id"', '"task\\u005fid": null, "batch_id"'))  # escaped key
    path = tmp_path / "extra.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = ingest_files([path])
    extra = dict(zip(r.judgments["comparison_id"], r.judgments["extra"], strict=True))
    assert json.loads(extra["c-00000"]) == {"task_id": "t-1"} and extra["c-00001"] is None
    assert json.loads(extra["c-00002"]) == {"task_id": None}  # present with null: still carried
    assert json.loads(extra["c-00003"]) == {"response_a_meta": {"generation": {"t": 0.7}}}
    assert json.loads(extra["c-00006"]) == {"task_id": None}
    _assert_same(r, _per_row(monkeypatch, [path]))


def test_line_numbers_across_blocks_and_read_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BLOCK_BYTES", 700)  # a read ends mid-line; some lines are longer than a read
    monkeypatch.setattr(readers, "FIRST_READ_BYTES", 300)
    lines = []
    for i in range(40):
        row = canonical(i, label="bad" if i % 9 == 4 else "a", critique="x" * (900 if i % 13 == 5 else 3))
        lines.append(json.dumps(row) + ("\r" if i % 4 == 1 else ""))
        if i % 11 == 3:
            lines.append("   ")
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")  # no final newline
    r = ingest_files([path], batch_rows=6)
    assert r.ledger.rows_in == 40
    expect = [n for n, ln in enumerate(lines, 1) if ln.strip()]
    assert sorted(r.judgments["source_line"].to_list() + r.quarantine["line"].to_list()) == expect
    assert r.quarantine["line"].to_list() == [n for n, ln in enumerate(lines, 1) if '"label": "bad"' in ln]
    _assert_same(r, _per_row(monkeypatch, [path], batch_rows=6))
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    g = ingest_files([gz], batch_rows=6)
    assert g.judgments.drop("source_file").equals(r.judgments.drop("source_file"))


def test_threaded_parse_errors_find_their_row(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "THREADED_PARSE_BYTES", 2000)  # parse in parallel chunks even here
    rows = [canonical(i, **({"batch_id": 7} if i in (17, 90) else {})) for i in range(150)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    r = ingest_files([path])
    assert r.quarantine.select("line", "reason", "field").rows() == [(18, "invalid_type", "batch_id"), (91, "invalid_type", "batch_id")]
    _assert_same(r, _per_row(monkeypatch, [path]))


_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**66), 2**66),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
_json_value = st.recursive(_scalar, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.text(max_size=4), ch, max_size=3),
                           max_leaves=5)
_FIELDS = ["comparison_id", "batch_id", "pair_id", "prompt", "response_a", "response_b", "shown_first", "label", "strength",
           "confidence", "annotator_id", "annotator_kind", "rubric", "locale", "tags", "created_at", "gold_label", "note"]
_RAW_EDITS = [None] * 8 + ["truncate", "two_values", "nan", "infinity", "neg_zero", "big_int", "dup_key", "escaped_key",
                           "indent", "crlf", "blank", "bad_utf8", "array", "empty", "msg_extra", "msg_no_content",
                           "tag_null", "resp_extra", "resp_null_text", "bool"]


@st.composite
def _jsonl_line(draw, i: int) -> bytes:
    row = canonical(i, label=draw(st.sampled_from(["a", "b", "tie"])), locale=draw(st.sampled_from(["en", "ja-JP", None])))
    row = {k: v for k, v in row.items() if v is not None}
    if draw(st.booleans()):
        row["prompt"] = draw(st.sampled_from([row["prompt"][0]["content"], "Caf\u0065\u0301 ?\r\n", "  "]))
    if draw(st.booleans()):
        row["response_a"] = row["response_a"]["text"]
    if draw(st.booleans()):
        row["response_b"] = {"text": row["response_b"], "model": draw(st.sampled_from(["m", None]))}
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.sampled_from(_FIELDS))
        if draw(st.booleans()):
            row.pop(field, None)
        else:
            row[field] = draw(_json_value)
    items = list(row.items())
    if draw(st.booleans()):
        items.reverse()
    edit = draw(st.sampled_from(_RAW_EDITS))
    obj = dict(items)
    if edit == "msg_extra" and isinstance(obj.get("prompt"), list) and obj["prompt"] and isinstance(obj["prompt"][0], dict):
        obj["prompt"][0] = {**obj["prompt"][0], "name": draw(st.sampled_from(["bob", None]))}
    elif edit == "msg_no_content" and isinstance(obj.get("prompt"), list) and obj["prompt"] and isinstance(obj["prompt"][0], dict):
        obj["prompt"][0] = {"role": "user"}
    elif edit == "tag_null":
        obj["tags"] = ["x", None]
    elif edit == "resp_extra" and isinstance(obj.get("response_a"), dict):
        obj["response_a"] = {**obj["response_a"], "generation": draw(st.sampled_from([None, {"t": 1}]))}
    elif edit == "resp_null_text":
        obj["response_b"] = {"text": None, "model": "m"}
    elif edit == "bool":
        obj["confidence"] = True
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()), separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    number = r'("strength"\s*:\s*)[^,}]+'
    if edit == "truncate":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif edit == "two_values":
        text += " {}"
    elif edit in ("nan", "infinity", "neg_zero", "big_int"):
        value = {"nan": "NaN", "infinity": "-Infinity", "neg_zero": "-0", "big_int": "123456789012345678901"}[edit]
        text = re.sub(number, lambda m: m.group(1) + value, text)
    elif edit == "dup_key":
        text = text[:-1] + ', "label": "b"}' if text.endswith("}") and len(text) > 2 else text
    elif edit == "escaped_key":
        text = text.replace('"label"', '"l\\u0061bel"').replace('"note"', '"n\\u006fte"')
    elif edit == "indent":
        text = "  " + text
    elif edit == "crlf":
        text += "\r"
    elif edit == "blank":
        text = ""
    elif edit == "array":
        text = "[1, 2]"
    elif edit == "empty":
        text = "{}"
    data = text.encode("utf-8")
    if edit == "bad_utf8":
        data = data.replace(b'"c-', b'"\xff-', 1)
    return data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 24), batch_rows=st.sampled_from([5, 50_000]),
       small_reads=st.booleans(), threaded=st.booleans())
def test_fast_path_equals_per_row_property(tmp_path_factory, monkeypatch, data, n, batch_rows, small_reads, threaded):
    """Whatever the lines, the vectorised path gives the per-row path's judgments, quarantine and ledger."""
    lines = [data.draw(_jsonl_line(i)) for i in range(n)]
    path = tmp_path_factory.mktemp("fast") / "b.jsonl"
    path.write_bytes(b"\n".join(lines) + data.draw(st.sampled_from([b"\n", b""])))
    with monkeypatch.context() as m:
        if small_reads:
            m.setattr(readers, "BLOCK_BYTES", 1500)
            m.setattr(readers, "FIRST_READ_BYTES", 200)
        if threaded:
            m.setattr(readers, "THREADED_PARSE_BYTES", 300)
        fast = _ingest_or_error([path], fmt="canonical", batch_rows=batch_rows)
        m.setattr(ingest_mod, "FAST_JSONL", False)
        slow = _ingest_or_error([path], fmt="canonical", batch_rows=50_000)  # and batching changes nothing
    _assert_same(fast, slow)


_stamp = st.one_of(
    st.none(), st.text(max_size=12),
    st.datetimes().map(lambda d: d.isoformat()), st.datetimes().map(lambda d: d.isoformat() + "Z"),
    st.datetimes().map(lambda d: d.strftime("%Y-%m-%d %H:%M")), st.dates().map(str),
    st.datetimes().map(lambda d: d.strftime("%Y-%m-%dT%H:%M+05:30")),
)


@settings(max_examples=60, deadline=None)
@given(stamps=st.lists(_stamp, max_size=20))
def test_parse_timestamps_equals_expression(stamps):
    for values in (stamps, stamps * 3):  # distinct values, and repeated ones (parsed once each)
        s = pl.Series("created_at", values, dtype=pl.String)
        expect = pl.select(ingest_mod.parse_timestamp_expr(pl.lit(s))).to_series()
        # compared as Series: to_list() fails on timestamps before year 1 (year 1 at +05:30)
        assert ingest_mod.parse_timestamps(s).equals(expect)


_unicode_samples = ["e\u0301", "\u1100\u1161\u11a8", "\uf900", "\u2126", "\u00e9", "\u3099\u304b\u3099", "\u0344",
                    "\u0b47\u0b3e", "\U0001d15e", "\u212b", "\u2000", "\u30ac", "\u4e2d\u6587", "\u2019", "\U000e0100"]


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.one_of(st.text(max_size=10), st.lists(st.sampled_from(_unicode_samples + ["a", " "]), max_size=6).map("".join)),
                      max_size=10))
def test_nfc_only_where_needed_equals_nfc_of_all_non_ascii(texts):
    s = pl.Series(texts, dtype=pl.String)
    assert ingest_mod._nfc_where_needed(s).to_list() == _nfc_non_ascii(s).to_list()


def test_huge_integer_strength_is_quarantined_not_a_crash(make_jsonl, monkeypatch):
    path = make_jsonl([canonical(0), json.loads(json.dumps(canonical(1)).replace('"strength": 0.7', '"strength": 18446744073709551615'))])
    r = ingest_files([path])
    assert r.quarantine.select("line", "reason", "field").rows() == [(2, "invalid_value", "strength")]
    _assert_same(r, _per_row(monkeypatch, [path]))


@pytest.mark.parametrize("number", ["18446744073709551616", "-9223372036854775809", "123456789012345678901234567890"])
def test_an_integer_beyond_64_bits_is_refused_not_rounded_into_extra(make_jsonl, monkeypatch, number):
    """orjson reads such an integer as a float: an unknown field would be carried as 1.2345678901234568e+29, the
    input silently changed.  Refused like a duplicated key; 64-bit integers and long digit runs in strings are kept."""
    rows = [canonical(0, task_id=18446744073709551615, note="x" * 5 + "1234567890" * 3), canonical(1), canonical(2)]
    text = [json.dumps(r) for r in rows]
    text[1] = text[1][:-1] + f', "task_id": {number}}}'
    text[2] = text[2].replace('"model": "m-1"', f'"model": "m-1", "seed": [{number}]')
    path = make_jsonl([], raw_lines=dict(enumerate(text)))
    r = ingest_files([path])
    assert r.quarantine.select("line", "reason").rows() == [(2, "invalid_json"), (3, "invalid_json")]
    assert "64 bits" in r.quarantine["error"][0] and number in r.quarantine["error"][0]
    assert json.loads(r.judgments["extra"][0])["task_id"] == 18446744073709551615
    _assert_same(r, _per_row(monkeypatch, [path]))

@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.one_of(st.none(), st.text(max_size=12), st.text(min_size=120, max_size=300),
                                st.sampled_from(["", "same", "Caf\u00e9", "\U0001f600", "x" * 128, "é" * 64, "y" * 129])),
                      max_size=30))
def test_content_hashes_equal_schema_hashing(texts):
    """The compiled column hashes (pipeline/hashing.py) are schemas.text's per-value digests, across blake2b's
    128-byte block boundaries, for missing values and for the pair ids made of them."""
    from pipeline.hashing import content_hashes, pair_id_expr
    from schemas.text import content_hash, derive_pair_id_expr, hash_series

    s = pl.Series("t", texts, dtype=pl.String)
    assert content_hashes(s).to_list() == hash_series(s).to_list()
    assert content_hashes(s).to_list() == [None if t is None else content_hash(t) for t in texts]
    h = pl.DataFrame({"p": hash_series(s), "a": hash_series(s.reverse()), "b": hash_series(s.shift(1))})
    ours = h.select(pair_id_expr(pl.col("p"), pl.col("a"), pl.col("b")))
    theirs = h.select(derive_pair_id_expr(pl.col("p"), pl.col("a"), pl.col("b")))
    assert ours.to_series().to_list() == theirs.to_series().to_list()


def test_an_input_hashed_before_is_read_once_and_refused_if_it_changed(tmp_path, monkeypatch):
    """``curate`` hashes its inputs for the version id; ingest takes that hash (the 10 GB of a 10M-judgment input are
    not hashed a second time) and refuses the file if it is no longer the file that was hashed."""
    import os

    import pipeline.ingest as ing

    path = write_jsonl(tmp_path / "b.jsonl", [canonical(i) for i in range(20)])
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    original = path.read_bytes()
    hashed = ing.file_hash(path)
    monkeypatch.setattr(ing, "file_sha256", lambda p: pytest.fail(f"{p} hashed again"))
    res = ingest_files([path], hashed={str(path): hashed})
    assert res.sources[0].sha256 == hashed.sha256 and res.ledger.judgments == 20
    with open(path, "a", encoding="utf-8") as fh:  # a line appended after the hash
        fh.write(json.dumps(canonical(99)) + "\n")
    with pytest.raises(UnreadableFile, match="changed while it was being read") as err:
        ingest_files([path], hashed={str(path): hashed})
    assert str(path) in str(err.value)
    # the same bytes written again (the same size, another time): refused too
    path.write_bytes(original)
    with pytest.raises(UnreadableFile, match="changed"):
        ingest_files([path], hashed={str(path): hashed})
