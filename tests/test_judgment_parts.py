"""A version's judgments (and the columns a child reads of every row) are kept in parts of at most
``ingest.partition_rows`` rows: a child reads its parent's history one part at a time, whatever its
size (a 10M-judgment version in one part made its 10k-judgment child hold the whole 1.7 GB file's
bytes while it filtered them).  The layout changes no content: both first-version builds write the
same rows in the same parts, and a child's tables are those of a parent in one part."""
from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest

from pipeline import incremental as inc
from pipeline.checks import resolve_policy
from pipeline.curate import CurateOptions, curate
from pipeline.parts import appended_key, appended_slices, parts_to_merge
from pipeline.store import Store
from schemas.policy import Policy
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from gen_judgments import generate  # noqa: E402

CAP = 1_000  # the smallest partition size the policy allows
SMALL = resolve_policy(Policy.model_validate({"ingest": {"partition_rows": CAP}}))
WHOLE = resolve_policy(Policy())  # 250k rows a part: one part here


def test_slices_of_new_rows():
    assert appended_slices(0, CAP) == [(0, 0)]  # no rows: one empty part (readers see the schema)
    assert appended_slices(CAP, CAP) == [(0, CAP)]
    assert appended_slices(2_500, CAP) == [(0, 1_000), (1_000, 1_000), (2_000, 500)]
    assert appended_slices(2_500, None) == [(0, 2_500)]
    keys = [appended_key("v-ab", k) for k in range(3)]
    assert keys == ["v-ab", "v-ab.r0001", "v-ab.r0002"]
    assert [f"part-{k}.parquet" for k in keys] == sorted(f"part-{k}.parquet" for k in keys)  # name order = arrival


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("in")
    generate(d / "parent.jsonl", 3_300, 600, seed=5)
    generate(d / "batch.jsonl", 400, 600, seed=6)
    lines = (d / "batch.jsonl").read_text().splitlines()  # (the generator numbers every file's ids from 0)
    (d / "batch.jsonl").write_text("".join(ln.replace('"comparison_id": "', '"comparison_id": "b-', 1)
                                           .replace('"comparison_id":"', '"comparison_id":"b-', 1) + "\n" for ln in lines))
    return d / "parent.jsonl", d / "batch.jsonl"


def _parts(handle, table: str) -> list[int]:
    return [p.rows for p in handle.table(table).parts]


@pytest.mark.parametrize("partitioned", [True, False], ids=["partitioned", "one-process"])
def test_a_first_version_keeps_its_judgments_in_capped_parts(batches, tmp_path, partitioned):
    parent, _ = batches
    opts = CurateOptions(partitioned=partitioned)
    small = Store(tmp_path / "small")
    h = small.get(curate([parent], small, SMALL, options=opts).version_id)
    whole = Store(tmp_path / "whole")
    w = whole.get(curate([parent], whole, WHOLE, options=opts).version_id)
    n = h.manifest().ledger.judgments_valid - sum(h.manifest().ledger.judgments_dropped.get(k, 0)
                                                  for k in ("duplicate_comparison_id",))
    rows = _parts(h, "judgments")
    assert len(rows) == -(-n // CAP) >= 4 and all(r == CAP for r in rows[:-1]) and 0 < rows[-1] <= CAP, rows
    assert _parts(h, inc.JUDGMENT_ROWS) == rows  # the same rows part for part: a child reads them narrow
    assert _parts(w, "judgments") == [n]
    names = [p.path for p in h.table("judgments").parts]
    assert names == sorted(names) and names[0].endswith(f"part-{h.version_id}.parquet")
    for table in ("judgments", inc.JUDGMENT_ROWS):  # the same rows, in input order
        assert h.read(table).equals(w.read(table)), table
    assert h.verify() == []


def test_a_child_of_a_version_in_parts_is_the_child_of_one_in_one_part(batches, tmp_path):
    parent, batch = batches
    got = {}
    for name, policy in (("small", SMALL), ("whole", WHOLE)):
        st = Store(tmp_path / name)
        p = curate([parent], st, policy).version_id
        c = st.get(curate([batch], st, policy, parent=p).version_id)
        before = st.get(p).table("judgments").parts
        after = c.table("judgments").parts
        # the parent's parts linked as they are but those the batch's part absorbs (while it holds at least half
        # their rows and stays within a part's rows: here the short last part of the capped parent), then the batch's
        fresh = sum(x.rows for x in after) - sum(x.rows for x in before)
        merged = parts_to_merge([x.rows for x in before], fresh, policy.ingest.partition_rows)
        assert merged == (1 if name == "small" else 0)
        kept = before[:len(before) - merged]
        assert [x.sha256 for x in after[:-1]] == [x.sha256 for x in kept]
        assert after[-1].rows == fresh + sum(x.rows for x in before[len(kept):]) <= policy.ingest.partition_rows
        assert _parts(c, inc.JUDGMENT_ROWS) == _parts(c, "judgments")
        assert c.verify() == []
        got[name] = (c, {p: "parent", c.version_id: "child"})
    (small, s_ids), (whole, w_ids) = got["small"], got["whole"]
    assert small.manifest().ledger == whole.manifest().ledger
    for table in ("judgments", "pairs", "flags", "routed", "split_assignments", *(f"data/{s}" for s in ("train", "validation", "test"))):
        a, b = _named(small.read(table), s_ids), _named(whole.read(table), w_ids)  # (a pair's generation: a version id)
        key = [c for c in ("pair_id", "comparison_id", "subject_id", "check", "reason") if c in a.columns]
        assert a.height and a.sort(key).equals(b.sort(key)), table


def _named(frame: pl.DataFrame, ids: dict[str, str]) -> pl.DataFrame:
    return frame.with_columns(pl.col(c).replace(ids) for c, t in frame.schema.items() if t == pl.String)


@pytest.mark.parametrize("rows", [0, 2 * CAP, 2 * CAP + 7])
def test_the_streamed_table_cuts_parts_at_the_cap_whatever_the_batches(tmp_path, rows):
    """The partitioned build's writer of a table that only grows: parts of ``CAP`` rows (an exact multiple: no empty
    part after them; no rows: one empty part), each part's rows in order, batches of any size."""
    from pipeline.partitioned_build import _Streamed

    store = Store(tmp_path / "s")
    store.ensure()
    schema = pl.Schema({"i": pl.Int64, "s": pl.String})
    w = _Streamed(store, tmp_path / "stage", "t", "v-ab", schema, cap=CAP)
    frame = pl.DataFrame({"i": range(rows), "s": [str(i) for i in range(rows)]}, schema=schema)
    for a in range(0, rows, 333):  # (batches that straddle the parts' ends)
        w.add(frame.slice(a, 333).to_arrow())
    info = w.finish()
    want = [n for _, n in appended_slices(rows, CAP)]
    assert [p.rows for p in info.parts] == want and info.rows == rows
    assert [p.path for p in info.parts] == [f"t/part-{appended_key('v-ab', k)}.parquet" for k in range(len(want))]
    got = pl.concat([pl.read_parquet(tmp_path / "stage" / p.path) for p in info.parts])
    assert got.equals(frame)
