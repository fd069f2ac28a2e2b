"""End-to-end tests of `prefpipe curate` (issue 5) on the three sample batches.

Versions are built once per module (fixtures ``full`` and ``chain``) through the CLI; the
planted problems come from ``data/samples/answer_key/planted.json`` (see data/samples/README).
Crash and concurrency tests run real ``prefpipe`` processes and are marked slow.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT
from typer.testing import CliRunner

from flows.cli import app
from pipeline.store import SPLITS, Store, VersionHandle

SAMPLES = ROOT / "data" / "samples"
B1, B2, B3 = (SAMPLES / f"batch-2026-11-{d}.jsonl" for d in ("02", "09", "16"))
PLANTED = json.loads((SAMPLES / "answer_key" / "planted.json").read_text(encoding="utf-8"))
DPO_COLUMNS = {"prompt", "chosen", "rejected", "pair_id", "weight", "agreement", "n_judgments", "strength", "locale",
               "annotator_kind", "chosen_model", "rejected_model", "source_comparison_ids"}
ANNOTATOR_COLUMNS = {"annotator_id", "annotator_kind", "n_judgments", "agreement_with_consensus", "gold_accuracy",
                     "first_shown_rate", "position_p_value", "order_consistency", "longer_chosen_rate", "flags"}
runner = CliRunner()


# ---------------------------------------------------------------- helpers
def cli(*args: str | Path, code: int | None = 0):
    res = runner.invoke(app, [str(a) for a in args])
    assert code is None or res.exit_code == code, (res.exit_code, res.output, res.exception)
    return res


def curate_cli(*args: str | Path) -> str:
    """Run `prefpipe curate ARGS` in-process; the version id is the last line of stdout."""
    return cli("curate", *args).stdout.strip().splitlines()[-1]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with (size, mtime_ns): equal snapshots = nothing written."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def pair_of(h: VersionHandle, comparison_ids: list[str]) -> set[str]:
    j = h.read("judgments.parquet")
    return set(j.filter(pl.col("comparison_id").is_in(comparison_ids))["pair_id"].to_list())


def kept(h: VersionHandle) -> pl.DataFrame:
    """pair_id, split, chosen text of every DPO row of a version, read straight from the files."""
    return pl.concat([pl.read_parquet(h.split_path(s)).select(
        "pair_id", "near_dup_cluster", split=pl.lit(s), chosen=pl.col("chosen").list.first().struct.field("content"))
        for s in SPLITS])


def raw_rows(path: Path) -> dict[str, dict]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[row["comparison_id"]] = row
    return out


def prefpipe() -> list[str]:
    exe = Path(sys.executable).parent / "prefpipe"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]


@dataclass
class Built:
    store: Path
    vid: str

    @property
    def st(self) -> Store:
        return Store(self.store)

    @property
    def h(self) -> VersionHandle:
        return self.st.get(self.vid)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Built:
    """All three sample batches in one version."""
    store = tmp_path_factory.mktemp("full") / "store"
    return Built(store, curate_cli(B1, B2, B3, "--store", store))


@dataclass
class Chain:
    store: Path
    v1: str
    v2: str
    hashed_texts: int  # texts the MinHash function saw while V2 was built

    def h(self, vid: str) -> VersionHandle:
        return Store(self.store).get(vid)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    """V1 = batches 1+2; V2 = batch 3 as a child of V1 (MinHash calls counted)."""
    import pipeline.checks.near_duplicates as nd

    store = tmp_path_factory.mktemp("chain") / "store"
    v1 = curate_cli(B1, B2, "--store", store)
    seen: list[int] = []
    real = nd.signatures

    def counting(texts, *a, **kw):
        seen.append(len(texts))
        return real(texts, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nd, "signatures", counting)
        v2 = curate_cli(B3, "--store", store, "--parent", v1)
    return Chain(store, v1, v2, sum(seen))


# ---------------------------------------------------------------- one version from the three batches
def test_version_has_every_file_of_the_spec(full):
    h = full.h
    files = {p.relative_to(h.path).as_posix() for p in h.path.rglob("*") if p.is_file()}
    # the spec's NAME.parquet tables are folders NAME/ of Parquet parts (outputs.md, "shared parts")
    tables = {"data/train", "data/validation", "data/test", "quarantine", "flags", "routed", "annotators", "judgments",
              "pairs", "split_assignments", "state/duplicates", "state/pair_id_conflict", "state/language", "review_state",
              "state/part_fingerprints", "state/annotator_params", "state/pair_rows", "state/generation_groups",
              "state/judgment_rows", "label_counts", "state/placement",
              "state/preliminary", "state/preliminary_params", "state/agreement_sums", "state/position_bias_sums",
              "state/reliability_sums", "state/reliability_params", "state/length_bias_sums",
              *(f"state/near_dup_{t}" for t in ("prompts", "signatures", "edges", "pair_prompts", "links", "summary"))}
    for t in tables:
        assert [f for f in files if f.startswith(t + "/part-") and f.endswith(".parquet")], t
    assert {"manifest.json", "report.html", "report.md"} <= files and "prompt_index.npz" not in files
    m = h.manifest()
    assert set(m.tables) == tables
    parts = {p.path for t in m.tables.values() for p in t.parts}
    assert set(m.files) | parts | {"manifest.json"} == files  # nothing unlisted
    assert h.verify() == []
    assert m.version_id == full.vid and m.parent_version is None and m.code_version
    assert [s.path for s in m.sources] == [str(B1), str(B2), str(B3)]
    assert [s.sha256 for s in m.sources] == [sha256(p) for p in (B1, B2, B3)]
    assert {c.name for c in m.checks} >= {"duplicates", "near_duplicates", "language", "agreement", "reliability",
                                             "position_bias", "length_bias", "routing", "split_leakage"}
    agreement = m.check("agreement").metrics
    for kind in ("human", "ai"):
        assert {"krippendorff_alpha", "fleiss_kappa"} <= set(agreement[kind])
    for s in SPLITS:
        assert DPO_COLUMNS <= set(pl.read_parquet_schema(h.split_files(s)[0]))
    assert ANNOTATOR_COLUMNS <= set(h.read("annotators.parquet").columns)
    assert {"source_file", "line", "raw", "reason", "error"} <= set(h.read("quarantine.parquet").columns)
    assert {"subject_kind", "subject_id", "check", "reason", "severity", "detail"} <= set(h.read("flags.parquet").columns)
    html = h.file("report.html").read_text(encoding="utf-8")
    assert full.vid in html and "<svg" in html
    assert full.vid in h.file("report.md").read_text(encoding="utf-8")


def test_ledger_adds_up(full):
    h = full.h
    m = h.manifest()
    led = m.ledger
    # rows: in = valid judgments + quarantined; valid = used + dropped with a reason
    assert led.rows_in == 1156 == sum(s.rows_in for s in m.sources)
    assert led.quarantined == 2 == h.read("quarantine.parquet").height == sum(s.quarantined for s in m.sources)
    assert led.rows_in == led.judgments_valid + led.quarantined
    pairs = h.read("pairs.parquet")
    used = int(pairs["n_judgments"].sum())
    assert led.judgments_valid == used + sum(led.judgments_dropped.values())
    assert led.judgments_dropped == {"exact_duplicate": 4, "low_reliability": 112}  # the re-deliveries, rev-en-07
    pre_check = sum(led.judgments_dropped.get(k, 0) for k in ("duplicate_comparison_id", "already_in_parent"))
    assert h.read("judgments.parquet").height == led.judgments_valid - pre_check
    # pairs: every pair is a DPO row, routed, or dropped with a reason
    assert led.pairs == 324 == pairs.height
    assert led.pairs == led.pairs_kept + sum(led.routed.values()) + sum(led.dropped.values())
    decisions = dict(pairs.group_by("decision").len().iter_rows())
    assert decisions == {"keep": led.pairs_kept, "route": sum(led.routed.values()), "drop": sum(led.dropped.values())}
    assert dict(pairs.filter(pl.col("decision") == "drop").group_by("reason").len().iter_rows()) == led.dropped
    routed = h.read("routed.parquet")
    assert {k: v for k, v in led.routed.items() if v} == dict(routed.group_by("route").len().iter_rows())
    rows = {s: pl.read_parquet(h.split_path(s)).height for s in SPLITS}
    assert rows == led.splits == {s: i.rows for s, i in m.splits.items()}
    assert sum(rows.values()) == led.pairs_kept
    assert {"identical_responses": 1, "language_mismatch": 1}.items() <= led.dropped.items()


def test_split_sha256s_match_the_files(full):
    h = full.h
    m = h.manifest()
    assert set(m.splits) == set(SPLITS)
    for s, info in m.splits.items():
        t = m.tables[f"data/{s}"]
        assert info.path == t.path == f"data/{s}" and info.sha256 == t.sha256 and info.rows == t.rows
        assert pl.read_parquet(h.path / info.path).height == info.rows  # the folder reads as one table
        for part in t.parts:
            assert sha256(h.path / part.path) == part.sha256 and pl.read_parquet(h.path / part.path).height == part.rows
    for name, info in m.files.items():
        assert sha256(h.path / info.path) == info.sha256, name


def test_malformed_and_invalid_rows_are_quarantined_with_file_and_line(full):
    q = full.h.read("quarantine.parquet").sort("line")
    assert [(Path(f).name, line, reason) for f, line, reason in q.select("source_file", "line", "reason").iter_rows()] == [
        ("batch-2026-11-16.jsonl", 182, "invalid_value"), ("batch-2026-11-16.jsonl", 235, "invalid_json")]
    assert q["source_file"].to_list() == [str(B3)] * 2
    bad_value, bad_json = q.to_dicts()
    assert bad_value["field"] == "label" and "maybe" in bad_value["error"] and "cmp-20261116-0182" in bad_value["raw"]
    assert "cmp-20261116-0235" in bad_json["raw"]
    lines = B3.read_text(encoding="utf-8").splitlines()
    assert bad_json["raw"] == lines[234] and bad_value["raw"] == lines[181]  # 1-based line numbers


def test_near_duplicate_prompts_share_a_cluster_and_never_straddle_splits(full):
    h = full.h
    flags = h.read("flags.parquet")
    near = set(flags.filter(pl.col("reason") == "near_duplicate")["subject_id"].to_list())
    pairs = h.read("pairs.parquet")
    planted_pairs = set()
    for nd in PLANTED["near_duplicate_prompts"]:
        edited, original = pair_of(h, nd["comparison_ids"]), pair_of(h, nd["near_duplicate_of"]["comparison_ids"])
        assert len(edited) == len(original) == 1 and edited != original
        both = edited | original
        planted_pairs |= both
        assert both <= near, nd["task_id"]
        assert pairs.filter(pl.col("pair_id").is_in(list(both)))["near_dup_cluster"].n_unique() == 1
        in_splits = kept(h).filter(pl.col("pair_id").is_in(list(both)))
        assert in_splits["split"].n_unique() <= 1, in_splits
    assert near == planted_pairs  # and nothing else
    rows = kept(h)
    assert rows.group_by("near_dup_cluster").agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height == 0
    assert rows["pair_id"].is_unique().all()
    leak = h.manifest().check("split_leakage").model_dump()
    assert leak["status"] == "pass"
    assert {k: v for k, v in leak["metrics"].items() if k != "rows"} == {
        "clusters_in_several_splits": 0, "pairs_in_several_splits": 0, "prompts_in_several_splits": 0}


def test_exact_duplicates_are_flagged(full):
    flags = full.h.read("flags.parquet").filter(pl.col("reason") == "exact_duplicate")
    assert set(flags["subject_kind"]) == {"judgment"}
    got = dict(zip(flags["subject_id"], flags["detail"]))
    want = {d["comparison_id"]: d["duplicate_of"] for d in PLANTED["exact_duplicates"]}
    assert set(got) == set(want)
    for cid, original in want.items():
        assert original in got[cid]


def test_position_biased_annotator_is_flagged(full):
    h = full.h
    planted = PLANTED["position_bias"]
    flags = h.read("flags.parquet").filter(pl.col("reason") == "position_bias")
    assert flags.select("subject_kind", "subject_id").rows() == [("annotator", planted["annotator_id"])]
    ann = h.read("annotators.parquet").filter(pl.col("annotator_id") == planted["annotator_id"]).to_dicts()[0]
    assert "position_bias" in ann["flags"]
    assert ann["n_judgments"] == planted["n_judgments"]
    assert ann["first_shown_rate"] == pytest.approx(planted["first_shown_rate"], abs=1e-3)
    assert planted["annotator_id"] in h.manifest().annotators["flagged"]


# ---------------------------------------------------------------- idempotency
def test_rerun_returns_the_same_version_and_writes_nothing(full):
    from pipeline.curate import code_version

    if code_version.__wrapped__() != full.h.manifest().code_version:  # pipeline/ edited since the fixture ran
        pytest.skip("pipeline sources changed while the tests ran: a new process computes a new code version")
    before = snapshot(full.store)
    res = cli("curate", B1, B2, B3, "--store", full.store)
    assert res.stdout.strip().splitlines()[-1] == full.vid
    assert "already exists (nothing written)" in res.output
    assert snapshot(full.store) == before
    # a real process: exit code 0, the id as the last line of stdout, still nothing written
    proc = subprocess.run([*prefpipe(), "curate", str(B3), str(B1), str(B2), "--store", str(full.store)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == full.vid
    assert snapshot(full.store) == before


def test_changed_policy_gives_a_new_version(tmp_path):
    store = tmp_path / "store"
    v_default = curate_cli(B1, "--store", store)
    pol = tmp_path / "p.toml"
    pol.write_text("[checks.agreement]\nlow_agreement_threshold = 0.7\n")
    v_strict = curate_cli(B1, "--store", store, "--policy", pol)
    assert v_strict != v_default
    st = Store(store)
    assert sorted(st.list_ids()) == sorted([v_default, v_strict])
    assert st.get(v_strict).manifest().policy.checks.agreement.low_agreement_threshold == 0.7
    assert st.get(v_strict).manifest().policy_hash != st.get(v_default).manifest().policy_hash
    before = snapshot(store)
    assert curate_cli(B1, "--store", store, "--policy", pol) == v_strict  # same policy again: same id
    assert snapshot(store) == before


def test_input_order_gives_the_same_id_and_the_same_split_bytes(chain, tmp_path):
    """The id ignores the order of the files, so the DPO files must not depend on it either
    (the trainer's epoch permutations run over the file's row order)."""
    vid = curate_cli(B2, B1, "--store", tmp_path / "store")
    assert vid == chain.v1
    mine, theirs = Store(tmp_path / "store").get(vid).manifest(), chain.h(chain.v1).manifest()
    assert {s: i.sha256 for s, i in mine.splits.items()} == {s: i.sha256 for s, i in theirs.splits.items()}
    assert mine.ledger == theirs.ledger


# ---------------------------------------------------------------- incremental
def test_child_names_its_parent_and_holds_the_union(chain):
    p, c = chain.h(chain.v1), chain.h(chain.v2)
    m = c.manifest()
    assert chain.v2 != chain.v1
    assert m.parent_version == chain.v1 == m.lineage["parent_version"]
    assert [s["path"] for s in m.lineage["new_sources"]] == [str(B3)]
    assert [s.path for s in m.sources] == [str(B1), str(B2), str(B3)]
    new_ids = set(raw_rows(B3)) - {"cmp-20261116-0182"}  # the invalid row is quarantined (the cut-off one never parses)
    pj, cj = set(p.read("judgments.parquet")["comparison_id"]), set(c.read("judgments.parquet")["comparison_id"])
    assert cj == pj | new_ids and not pj & new_ids
    assert c.verify() == []
    # the same child again (parent by id prefix): same id, nothing read or written
    before = snapshot(chain.store)
    assert curate_cli(B3, "--store", chain.store, "--parent", chain.v1[:10]) == chain.v2
    assert snapshot(chain.store) == before


def test_child_finds_duplicates_of_parent_prompts_without_rehashing_them(chain):
    p, c = chain.h(chain.v1), chain.h(chain.v2)
    parent_prompts = set(p.read("judgments.parquet")["prompt_hash"])
    child_prompts = set(c.read("judgments.parquet")["prompt_hash"])
    new_prompts = child_prompts - parent_prompts
    assert 0 < len(new_prompts) < len(child_prompts)
    # only the new batch's prompts went through MinHash; the parent's came from its persisted index
    assert chain.hashed_texts == len(new_prompts)
    nd = c.manifest().check("near_duplicates").metrics
    assert nd["prompts_hashed"] == len(new_prompts)
    assert nd["index_prompts_before"] == len(parent_prompts) and nd["index_prompts"] == len(child_prompts)
    # the near duplicate whose original lives in the parent (task-0219 of batch 3 ~ task-0310 of batch 2)
    planted = next(x for x in PLANTED["near_duplicate_prompts"] if x["batch"] == "batch-2026-11-16")
    original = pair_of(p, planted["near_duplicate_of"]["comparison_ids"])
    edited = pair_of(c, planted["comparison_ids"])
    assert original and original <= pair_of(c, planted["near_duplicate_of"]["comparison_ids"])
    near = set(c.read("flags.parquet").filter(pl.col("reason") == "near_duplicate")["subject_id"])
    assert edited | original <= near
    pairs = c.read("pairs.parquet").filter(pl.col("pair_id").is_in(list(edited | original)))
    assert pairs["near_dup_cluster"].n_unique() == 1
    # exact duplicates of judgments that live in the parent
    dup = set(c.read("flags.parquet").filter(pl.col("reason") == "exact_duplicate")["subject_id"])
    assert dup == {d["comparison_id"] for d in PLANTED["exact_duplicates"]}


def test_child_equals_building_everything_at_once(chain, full):
    """Incremental = the union: the same ledger, annotator stats and DPO pairs as one build of all three
    batches; the chosen side as well, except where the rule of a child (the parent's annotator parameters) decides."""
    c, f = chain.h(chain.v2), full.h
    assert c.manifest().ledger == f.manifest().ledger
    # batch 3 adds ~49 % to its parent's judgments (> checks.refit_growth): reliability's parameters are
    # fitted again over every judgment, so its figures are --full's (docs/incremental.md)
    assert c.manifest().lineage["check_sums"]["counted_again"] == ["reliability"]
    cols = ["annotator_id", "n_judgments", "first_shown_rate", "agreement_with_consensus", "flags"]
    ca, fa = (x.read("annotators.parquet").select(cols).sort("annotator_id") for x in (c, f))
    assert ca.equals(fa)
    # each delivery once (the checks' tables leave re-delivered copies out: select drops them)
    copies = c.read("flags.parquet").filter(pl.col("reason") == "exact_duplicate")["subject_id"]
    assert copies.len() > 0
    counts = c.read("judgments.parquet").filter(~pl.col("comparison_id").is_in(copies.implode())) \
        .group_by("annotator_id").len().sort("annotator_id")
    assert dict(counts.iter_rows()) == dict(ca.select("annotator_id", "n_judgments").iter_rows())
    biased = ca.filter(pl.col("annotator_id") == PLANTED["position_bias"]["annotator_id"]).to_dicts()[0]
    assert biased["n_judgments"] == PLANTED["position_bias"]["n_judgments"]  # judgments from batches 2 and 3
    # the same DPO rows; splits differ by design: the child keeps its parent's assignments (sticky
    # splits), a one-shot build of all batches assigns everything fresh
    mine, one = (kept(x).drop("split").sort("pair_id") for x in (c, f))
    assert mine.select("pair_id", "near_dup_cluster").equals(one.select("pair_id", "near_dup_cluster"))
    differ = mine.join(one, on="pair_id", suffix="_one").filter(pl.col("chosen") != pl.col("chosen_one"))
    # the rule of a child (docs/incremental.md): its recomputed pairs use its parent's annotator
    # parameters, fitted on batch 1 only here; a one-shot build fits them on everything (3 of 232)
    assert differ.height <= 0.02 * mine.height, differ
    parent_split = dict(kept(chain.h(chain.v1)).select("pair_id", "split").iter_rows())
    child_split = dict(kept(c).select("pair_id", "split").iter_rows())
    assert all(child_split[p] == s for p, s in parent_split.items() if p in child_split)


def _flip_batch(chain: Chain, path: Path) -> tuple[Path, str, list[str]]:
    """A batch that re-delivers 5 judgments of V1 verbatim and outvotes one kept pair of V1:
    4 new humans pick the response its 2 judges rejected."""
    h = chain.h(chain.v1)
    pairs = h.read("pairs.parquet").filter(
        (pl.col("decision") == "keep") & (pl.col("n_human") == 2) & (pl.col("n_ai") == 0) & (pl.col("locale") == "en")
        & (pl.col("count_a") + pl.col("count_b") == 2) & ((pl.col("count_a") == 2) | (pl.col("count_b") == 2))
    ).sort("pair_id")
    target = pairs.row(0, named=True)
    raw = {**raw_rows(B1), **raw_rows(B2)}
    judged = [raw[cid] for cid in target["source_comparison_ids"]]
    judges = {r["annotator_id"] for r in judged}
    others = [a for a in ("rev-en-01", "rev-en-02", "rev-en-03", "rev-en-04", "rev-en-05", "rev-en-06") if a not in judges][:4]
    assert len(others) == 4
    rows = [raw[cid] for cid in sorted(raw)[:5]]  # re-delivered as they were
    for i, ann in enumerate(others):
        old = judged[i % 2]
        label = "b" if old["label"] == "a" else "a"
        rows.append({**old, "comparison_id": f"cmp-flip-{i}", "annotator_id": ann, "label": label,
                     "shown_first": "ab"[i % 2], "gold_label": None, "critique": None})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, target["pair_id"], [r["comparison_id"] for r in rows[:5]]


@pytest.fixture(scope="module")
def flipped(chain, tmp_path_factory) -> tuple[str, str, list[str]]:
    """V3 = the flip batch as a child of V2 (whose batch 3 has two quarantined rows)."""
    path, pair_id, redelivered = _flip_batch(chain, tmp_path_factory.mktemp("flip") / "flip.jsonl")
    return curate_cli(path, "--store", chain.store, "--parent", chain.v2), pair_id, redelivered


def test_grandchild_ledger_carries_quarantine_and_redeliveries(chain, flipped):
    v3, pair_id, redelivered = flipped
    h, parent = chain.h(v3), chain.h(chain.v2)
    m, pm = h.manifest(), parent.manifest()
    led = m.ledger
    assert m.parent_version == chain.v2
    assert led.rows_in == pm.ledger.rows_in + 9
    assert led.quarantined == pm.ledger.quarantined == 2
    assert h.read("quarantine.parquet").equals(parent.read("quarantine.parquet"))  # the version is self-contained
    assert led.rows_in == led.judgments_valid + led.quarantined
    assert led.judgments_dropped.get("already_in_parent") == len(redelivered)
    used = int(h.read("pairs.parquet")["n_judgments"].sum())
    assert led.judgments_valid == used + sum(led.judgments_dropped.values())
    assert h.read("judgments.parquet").height == parent.read("judgments.parquet").height + 4
    assert led.pairs == led.pairs_kept + sum(led.routed.values()) + sum(led.dropped.values())


# ---------------------------------------------------------------- versions / show / diff
def test_versions_table_and_json(chain, flipped):
    v3 = flipped[0]
    res = cli("certify", chain.v1, "--store", chain.store, "--no-expectations", "--policy", _no_gx_policy(chain.store),
              code=None)
    certified = res.exit_code == 0
    assert res.exit_code in (0, 3)
    rows = json.loads(cli("versions", "--store", chain.store, "--json").stdout)
    by_id = {r["version_id"]: r for r in rows}
    assert [r["version_id"] for r in rows] == [chain.v1, chain.v2, v3]  # oldest first
    assert by_id[chain.v1]["parent"] is None and by_id[chain.v2]["parent"] == chain.v1 and by_id[v3]["parent"] == chain.v2
    for vid, r in by_id.items():
        assert r["pairs_kept"] == chain.h(vid).manifest().ledger.pairs_kept
    assert by_id[chain.v1]["certified"] is certified and by_id[chain.v2]["certified"] is None
    text = cli("versions", "--store", chain.store).stdout
    lines = {ln.split("│")[1].strip(): ln for ln in text.splitlines() if "│" in ln and "v-" in ln}
    assert set(lines) == {chain.v1, chain.v2, v3}
    assert chain.v1 in lines[chain.v2] and f"{by_id[chain.v2]['pairs_kept']:,}" in lines[chain.v2]
    assert ("yes" if certified else "rejected") in lines[chain.v1]


def _no_gx_policy(root: Path) -> Path:
    p = root.parent / "no-gx.toml"
    p.write_text("[certify]\nrequire_expectations = false\n")
    return p


def test_show_table_and_json(chain):
    m = chain.h(chain.v2).manifest()
    data = json.loads(cli("show", chain.v2, "--store", chain.store, "--json").stdout)
    assert data["version_id"] == chain.v2 and data["parent_version"] == chain.v1
    assert data["ledger"] == m.ledger.model_dump()
    assert data["splits"]["train"]["sha256"] == m.splits["train"].sha256
    assert data["certification"] is None and data["path"] == str(chain.h(chain.v2).path)
    assert json.loads(cli("show", chain.v2[:8], "--store", chain.store, "--json").stdout)["version_id"] in (chain.v2,)
    text = cli("show", chain.v2, "--store", chain.store).stdout
    assert text.startswith(chain.v2) and f"parent {chain.v1}" in text
    assert f"pairs {m.ledger.pairs:,} = kept {m.ledger.pairs_kept:,}" in text
    assert "split_leakage" in text and "certification: none yet" in text
    res = cli("show", "v-nope", "--store", chain.store, code=2)
    assert "no version 'v-nope'" in res.output


def _expected_diff(a: VersionHandle, b: VersionHandle) -> dict:
    ka, kb = kept(a), kept(b)
    both = ka.join(kb, on="pair_id", suffix="_b")
    return {"pairs_added": len(set(kb["pair_id"]) - set(ka["pair_id"])),
            "pairs_removed": len(set(ka["pair_id"]) - set(kb["pair_id"])),
            "pairs_common": both.height,
            "label_flips": both.filter(pl.col("chosen") != pl.col("chosen_b")).height}


def test_diff_parent_child(chain):
    a, b = chain.h(chain.v1), chain.h(chain.v2)
    d = json.loads(cli("diff", chain.v1, chain.v2, "--store", chain.store, "--json").stdout)
    assert d["a"] == chain.v1 and d["b"] == chain.v2
    want = _expected_diff(a, b)
    assert {k: d[k] for k in want} == want
    assert want["pairs_added"] > 0
    ma, mb = a.manifest().ledger, b.manifest().ledger
    assert d["metrics"]["ledger.pairs"] == [ma.pairs, mb.pairs]
    assert d["metrics"]["ledger.pairs_kept"] == [ma.pairs_kept, mb.pairs_kept]
    assert d["metrics"]["ledger.quarantined"] == [0, 2]
    assert "ledger.routed.tie" not in d["metrics"] or ma.routed["tie"] != mb.routed["tie"]  # only what changed
    text = cli("diff", chain.v1, chain.v2, "--store", chain.store).stdout
    assert f"+{want['pairs_added']} added, -{want['pairs_removed']} removed, {want['label_flips']} label flips" in text
    assert "ledger.pairs_kept" in text
    same = json.loads(cli("diff", chain.v2, chain.v2, "--store", chain.store, "--json").stdout)
    assert same["pairs_added"] == same["pairs_removed"] == same["label_flips"] == 0 and same["metrics"] == {}


def test_diff_reports_a_label_flip(chain, flipped):
    v3, pair_id, _ = flipped
    a, b = chain.h(chain.v2), chain.h(v3)
    ka, kb = kept(a).filter(pl.col("pair_id") == pair_id), kept(b).filter(pl.col("pair_id") == pair_id)
    assert ka.height == kb.height == 1 and ka["chosen"][0] != kb["chosen"][0], "the planted flip did not flip"
    d = json.loads(cli("diff", chain.v2, v3, "--store", chain.store, "--json").stdout)
    want = _expected_diff(a, b)
    assert {k: d[k] for k in want} == want and d["label_flips"] >= 1
    assert pair_id in d["label_flip_pair_ids"] and len(d["label_flip_pair_ids"]) == d["label_flips"]
    assert pair_id in cli("diff", chain.v2, v3, "--store", chain.store).stdout
    assert d["metrics"]["ledger.rows_in"] == [a.manifest().ledger.rows_in, b.manifest().ledger.rows_in]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(("text", "message"), [
    ("[select]\nwat = 1\n", "select.wat: unknown key"),
    ("[checks.agreement]\nlow_agreement_threshold = 1.5\n", "checks.agreement.low_agreement_threshold"),
])
def test_bad_policy_exit_2_nothing_written(tmp_path, text, message):
    pol = tmp_path / "bad.toml"
    pol.write_text(text)
    store = tmp_path / "store"
    res = cli("curate", B1, "--store", store, "--policy", pol, code=2)
    assert message in res.stderr and "invalid policy" in res.stderr
    assert res.stdout == ""
    assert not store.exists()


def test_missing_input_exit_2_store_untouched(full, tmp_path):
    before = snapshot(full.store)
    res = cli("curate", B1, tmp_path / "nope.jsonl", "--store", full.store, code=2)
    assert "nope.jsonl" in res.stderr and "no such file" in res.stderr
    assert snapshot(full.store) == before
    res = cli("curate", B1, "--store", full.store, "--parent", "v-nope", code=2)
    assert "no version 'v-nope'" in res.stderr
    proc = subprocess.run([*prefpipe(), "curate", str(tmp_path / "nope.jsonl"), "--store", str(tmp_path / "s")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "no such file" in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "s").exists()
    assert snapshot(full.store) == before


def test_the_same_input_file_given_twice_exit_2_nothing_written(tmp_path):
    """One file named twice (the same path, another spelling of it, a link) would be read twice: its rows
    counted twice in the ledger and, on curate's partitioned build, two rows at one (file, line).  Refused
    before anything is read, naming both names."""
    link = tmp_path / "again.jsonl"
    link.symlink_to(B1)
    for second in (B1, link):
        store = tmp_path / "s"
        res = cli("curate", B1, second, "--store", store, code=2)
        assert "given twice" in res.stderr and str(second) in res.stderr and "Traceback" not in res.stderr
        assert res.stdout == "" and not (store / "versions").exists()
        res = cli("validate", B1, B2, second, code=2)
        assert "given twice" in res.stderr and "Ingest ledger" not in res.stdout
        res = cli("validate", B1, second, "--json", code=2)
        assert json.loads(res.stdout)["ok"] is False and "given twice" in json.loads(res.stdout)["error"]


# ---------------------------------------------------------------- faults (real processes)
def _spawn_curate(store: Path, *files: Path) -> subprocess.Popen:
    return subprocess.Popen([*prefpipe(), "curate", *map(str, files), "--store", str(store), "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_minus_9_mid_curate_leaves_no_visible_version(tmp_path):
    store = tmp_path / "store"
    proc = _spawn_curate(store, B1, B2)
    staging = store / ".staging"
    deadline = time.time() + 120
    while not (staging.is_dir() and any(staging.iterdir())) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"curate finished before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    st = Store(store)
    assert st.list_ids() == [] and not any((store / "versions").iterdir())
    assert any(staging.iterdir())  # the half-built stage, invisible to readers
    vid = curate_cli(B1, B2, "--store", store)  # the next run succeeds
    assert st.list_ids() == [vid] and st.get(vid).verify() == []
    assert not any(staging.iterdir())  # and swept the dead writer's stage


@pytest.mark.slow
def test_two_concurrent_curates_write_one_version(tmp_path):
    store = tmp_path / "store"
    procs = [_spawn_curate(store, B1, B2) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    payloads = [json.loads(o[0]) for o in outs]  # (--json: one JSON document)
    ids = [p["version_id"] for p in payloads]
    assert ids[0] == ids[1]
    assert sorted(p["created"] for p in payloads) == [False, True]  # written once
    st = Store(store)
    assert st.list_ids() == [ids[0]] and [d.name for d in (store / "versions").iterdir()] == [ids[0]]
    assert not any((store / ".staging").iterdir())
    assert st.get(ids[0]).verify() == []


def test_a_child_without_the_history_texts_writes_what_reading_them_writes(tmp_path, monkeypatch):
    """The samples as a chain of four children (reviews, planted defects, per-dimension verdicts):
    each child reads its parent's judgments without their texts (texts only for the pairs its
    batch touches) and writes the same tables, checks and ledger as a child that reads every text."""
    import pipeline.curate as cur

    dims_batch = SAMPLES / "dimensions" / "batch-2026-11-23-dimensions.jsonl"
    narrow, wide = tmp_path / "n", tmp_path / "w"
    pa = pb = None
    for step, batch in enumerate((B1, B2, B3, dims_batch)):
        a = curate_cli(batch, "--store", narrow, *(("--parent", pa) if pa else ()))
        with monkeypatch.context() as m:
            m.setattr(cur.inc, "narrow_applies", lambda parent: False)
            b = curate_cli(batch, "--store", wide, *(("--parent", pb) if pb else ()))
        assert a == b
        ha, hb = Store(narrow).get(a), Store(wide).get(b)
        ma, mb = ha.manifest(), hb.manifest()
        if step:
            assert ma.lineage["union"]["texts"] == "touched pairs" and mb.lineage["union"]["texts"] == "all"
        # review_state carries the version's creation time (routed_at): compared without it
        assert {k: t.sha256 for k, t in ma.tables.items() if k != "review_state"} == \
            {k: t.sha256 for k, t in mb.tables.items() if k != "review_state"}
        assert ma.checks == mb.checks and ma.ledger == mb.ledger
        times = pl.selectors.datetime()
        assert ha.read("review_state").drop(times).equals(hb.read("review_state").drop(times))
        pa, pb = a, b
    assert ma.check("dimensions").metrics["per_dimension"]  # the last batch's verdicts were checked


def test_low_agreement_is_decided_on_the_judgments_select_keeps(tmp_path):
    """A 2-1 pair (agreement 0.67, kept) whose minority judgment is re-delivered once: the
    preliminary consensus does not count the copy (counted, it read 2-2, agreement 0.5, and flagged
    ``low_agreement``), select drops the copy and recomputes the consensus (2-1); the pair is kept,
    not dropped as ``low_agreement`` on a figure that never held."""
    batch = tmp_path / "batch.jsonl"
    base = {"prompt": "How do I reset my router to factory settings?", "response_a": "Hold the reset button for 10 s.",
            "response_b": "Unplug it.", "annotator_kind": "human", "locale": "en"}
    rows = [{**base, "comparison_id": f"c{i}", "annotator_id": who, "label": lab, "shown_first": "a",
             "created_at": f"2026-01-01T00:00:0{i}Z"} for i, (who, lab) in enumerate([("h1", "a"), ("h2", "a"), ("h3", "b")])]
    redelivered = {**rows[2], "comparison_id": "c3", "created_at": "2026-01-02T00:00:00Z",
                   "response_a": base["response_b"], "response_b": base["response_a"], "label": "a", "shown_first": "b"}
    batch.write_text("".join(json.dumps(r) + "\n" for r in [*rows, redelivered]), encoding="utf-8")
    store = tmp_path / "store"
    h = Store(store).get(curate_cli(batch, "--store", store))
    flags = h.read("flags.parquet")
    assert set(flags["reason"]) == {"exact_duplicate"}  # (the copy is no vote in the preliminary consensus either)
    pair = h.read("pairs.parquet").row(0, named=True)
    assert (pair["n_judgments"], pair["agreement"]) == (3, pytest.approx(2 / 3))
    assert (pair["decision"], pair["reason"]) == ("keep", None)
    assert h.manifest().ledger.dropped == {}


def _reliable_and_random_history(path: Path) -> Path:
    """120 pairs judged by three humans right 92 % of the time and by ``rnd``, who answers at
    random (flagged ``low_reliability``: select drops its judgments)."""
    import random

    from conftest import canonical, write_jsonl

    rng, rows = random.Random(7), []
    for i in range(120):
        truth = "ab"[i % 2]
        for who in ("h1", "h2", "h3"):
            rows.append((i, who, truth if rng.random() < 0.92 else "ba"["ab".index(truth)]))
        rows.append((i, "rnd", rng.choice("ab")))
    return write_jsonl(path, [canonical(n, prompt=[{"role": "user", "content": f"question {i}"}], response_a=f"good {i}",
                                        response_b=f"bad {i}", annotator_id=who, label=lab, strength=0.8)
                              for n, (i, who, lab) in enumerate(rows)])


def _planted_version(tmp_path, history, rows: list[dict], name_of_row: dict[str, str], policy, path: str):
    """The version of ``history`` + the planted ``rows`` on ``path`` (one process, partitions, or a
    child of ``history``) and its planted pairs' names (pair id -> the name of its rows)."""
    from conftest import write_jsonl

    from pipeline.curate import CurateOptions, curate

    batch = write_jsonl(tmp_path / "planted.jsonl", rows)
    store = Store(tmp_path / "store")
    if path == "child":
        vid = curate([batch], store, policy, parent=curate([history], store, policy).version_id).version_id
    else:
        vid = curate([history, batch], store, policy, options=CurateOptions(partitioned=path == "partitions")).version_id
    h = store.get(vid)
    name_of = dict(h.read("judgments.parquet").filter(pl.col("comparison_id").is_in(list(name_of_row)))
                   .select("pair_id", pl.col("comparison_id").replace_strict(name_of_row)).unique().iter_rows())
    return h, name_of


@pytest.mark.parametrize("path", ["one process", "partitions", "child"])
def test_ambiguous_and_too_easy_are_decided_on_the_judgments_select_keeps(tmp_path, path):
    """``ambiguous`` and ``too_easy`` flags come from the preliminary consensus (every judgment but
    re-delivered copies); select drops ``rnd``'s judgments and exact duplicates, and a flag acts
    (here: drop) only where its rule still holds on the judgments kept.  ``split``: 2-1 and weak
    only through rnd's vote (unanimous without it); ``copied``: one strong judgment and its
    re-delivery -- one judgment, never too easy (counted, the copy made two unanimous judgments
    and a flag select had to set aside).  ``weak`` and ``easy`` are still ambiguous and too easy
    on the kept judgments and are dropped.  On the first version's two builds and a child."""
    from conftest import canonical

    from schemas.policy import policy_from_dict

    history = _reliable_and_random_history(tmp_path / "history.jsonl")
    planted = {"split": [("h1", "a", 0.2), ("h2", "a", 0.2), ("rnd", "b", 0.2)],
               "copied": [("h1", "a", 0.95), ("h1", "a", 0.95)],
               "weak": [("h1", "a", 0.2), ("h2", "b", 0.2), ("h3", "a", 0.2)],
               "easy": [("h1", "a", 0.95), ("h2", "a", 0.95)]}
    rows, name_of_row = [], {}
    for name, judged in planted.items():
        for who, lab, s in judged:
            rows.append(canonical(1000 + len(rows), prompt=[{"role": "user", "content": f"planted {name}"}],
                                  response_a=f"good {name}", response_b=f"bad {name}", annotator_id=who, label=lab, strength=s))
            name_of_row[rows[-1]["comparison_id"]] = name
    policy = policy_from_dict({"select": {"flag_actions": {"ambiguous": "drop", "too_easy": "drop"}}})
    h, name_of = _planted_version(tmp_path, history, rows, name_of_row, policy, path)
    flags = h.read("flags.parquet")
    found = {(name_of[s], r) for s, r in flags.filter(pl.col("subject_id").is_in(list(name_of))).select("subject_id", "reason").rows()}
    assert {("split", "ambiguous"), ("weak", "ambiguous"), ("easy", "too_easy")} <= found
    assert not {r for n, r in found if n == "copied"} & {"too_easy", "ambiguous"}
    assert flags.filter(pl.col("subject_id") == "rnd")["reason"].to_list() == ["low_reliability"]
    fate = {name_of[p]: (d, r) for p, d, r in h.read("pairs.parquet").filter(pl.col("pair_id").is_in(list(name_of)))
            .select("pair_id", "decision", "reason").rows()}
    assert fate == {"split": ("keep", None), "copied": ("keep", None), "weak": ("drop", "ambiguous"),
                    "easy": ("drop", "too_easy")}


def _built_with_and_without_copies(tmp_path, rows: list[dict], n_first: int, path: str):
    """(copies, store, version id) for ``rows`` curated without, then with re-delivered copies (every
    4th judgment again under a new id, the responses named the other way round) on ``path``: one
    process, partitions, or a child of ``rows[:n_first]`` (whose copies include its parent's)."""
    from conftest import redelivered, write_jsonl

    from pipeline.curate import CurateOptions, curate
    from schemas.policy import Policy

    first, second = rows[:n_first], rows[n_first:]
    for copies in (False, True):
        store = Store(tmp_path / f"store-{copies}")
        if path == "child":
            parent = curate([write_jsonl(tmp_path / "first.jsonl", first)], store, Policy()).version_id
            batch = redelivered(first + second, 4)[len(first):] if copies else second
            vid = curate([write_jsonl(tmp_path / f"second-{copies}.jsonl", batch)], store, Policy(), parent=parent).version_id
        else:
            batch = write_jsonl(tmp_path / f"all-{copies}.jsonl", redelivered(rows, 4) if copies else rows)
            vid = curate([batch], store, Policy(), options=CurateOptions(partitioned=path == "partitions")).version_id
        assert store.get(vid).manifest().check("duplicates").metrics["exact_duplicates"] == (len(rows[::4]) if copies else 0)
        yield copies, store, vid


@pytest.mark.parametrize("path", ["one process", "partitions", "child"])
def test_the_agreement_figures_do_not_count_re_delivered_copies(tmp_path, path):
    """A version's agreement figures (alpha, kappa, CIs, per kind and slice) are those of the same
    judgments without re-delivered copies (every 4th judgment delivered again under a new id, the
    responses named the other way round; a child's copies also of its parent's judgments): the
    copies ``select`` drops as ``exact_duplicate`` are no annotations.  On the first version's two
    builds and a child."""
    from pipeline.checks.agreement import KINDS

    rows = [json.loads(line) for line in _reliable_and_random_history(tmp_path / "history.jsonl").read_text().splitlines()]
    figures = {}
    for copies, store, vid in _built_with_and_without_copies(tmp_path, rows, 240, path):
        m = store.get(vid).manifest()
        figures[copies] = {k: m.check("agreement").metrics[k] for k in (*KINDS, "slices", "ratings_treated_as_missing")}
    assert figures[True] == figures[False]


def _biased_panel() -> list[dict]:
    """120 pairs, each judged by three humans right 90 % of the time, ``pos`` (the first-shown
    response, always) and ``long`` (the longer response, always); the better response is the
    longer one and is shown first on half the pairs each."""
    import random

    from conftest import canonical

    rng, rows = random.Random(11), []
    for i in range(120):
        truth, longer, shown = "ab"[i % 2], "ab"[i // 2 % 2], "ab"[i // 4 % 2]
        text = {s: ("good" if s == truth else "bad") + (" and a much longer answer" if s == longer else "") + f" {i}"
                for s in "ab"}
        verdicts = [(who, truth if rng.random() < 0.9 else "ba"["ab".index(truth)]) for who in ("h1", "h2", "h3")]
        for who, lab in [*verdicts, ("pos", shown), ("long", longer)]:
            rows.append(canonical(len(rows), prompt=[{"role": "user", "content": f"question {i}"}], response_a=text["a"],
                                  response_b=text["b"], shown_first=shown, annotator_id=who, label=lab))
    return rows


@pytest.mark.parametrize("path", ["one process", "partitions", "child"])
def test_the_bias_figures_do_not_count_re_delivered_copies(tmp_path, path):
    """A version's position- and length-bias figures and flags are those of the same judgments
    without re-delivered copies (every 4th judgment delivered again under a new id, the responses
    named the other way round; a child's copies also of its parent's judgments): a copy is one
    delivery, not another judgment of its annotator.  On the first version's two builds and a
    child (which merges its parent's states)."""
    figures = {}
    for copies, store, vid in _built_with_and_without_copies(tmp_path, _biased_panel(), 300, path):
        h = store.get(vid)
        m = h.manifest()
        if path == "child":
            assert {"length_bias", "position_bias"} <= set(m.lineage["check_sums"]["checks"])  # merged states
        flags = h.read("flags.parquet").filter(pl.col("check").is_in(["position_bias", "length_bias"]))
        figures[copies] = {"position_bias": m.check("position_bias").metrics, "length_bias": m.check("length_bias").metrics,
                           "flags": sorted(flags.select("subject_id", "reason", "detail").rows())}
    assert {(s, r) for s, r, _ in figures[False]["flags"]} == {("pos", "position_bias"), ("long", "length_bias")}
    assert figures[True] == figures[False]


@pytest.mark.parametrize("path", ["one process", "partitions", "child"])
def test_dimension_conflict_is_decided_on_the_judgments_select_keeps(tmp_path, path):
    """``dimension_conflict`` is found on the per-dimension consensus of every judgment; select
    drops ``rnd``'s judgments (``low_reliability``), and the flag acts (here: drop) only where the
    final pair's per-dimension consensus still names both sides.  ``unreliable``: helpfulness a
    from h1, harmlessness b from rnd only (one dimension left once rnd is dropped); ``opposed``:
    the same verdicts from h1 and h2 -- still a conflict, dropped.  On the first version's two
    builds and a child."""
    from conftest import canonical

    from schemas.policy import policy_from_dict

    history = _reliable_and_random_history(tmp_path / "history.jsonl")
    planted = {"unreliable": [("h1", {"helpfulness": "a"}), ("rnd", {"harmlessness": "b"})],
               "opposed": [("h1", {"helpfulness": "a"}), ("h2", {"harmlessness": "b"})]}
    rows, name_of_row = [], {}
    for name, judged in planted.items():
        for who, verdicts in judged:
            rows.append(canonical(1000 + len(rows), prompt=[{"role": "user", "content": f"planted {name}"}],
                                  response_a=f"good {name}", response_b=f"bad {name}", annotator_id=who, label="a",
                                  dimensions=verdicts))
            name_of_row[rows[-1]["comparison_id"]] = name
    policy = policy_from_dict({"select": {"flag_actions": {"dimension_conflict": "drop"}}})
    h, name_of = _planted_version(tmp_path, history, rows, name_of_row, policy, path)
    flags = h.read("flags.parquet")
    assert {name_of[s] for s in flags.filter(pl.col("reason") == "dimension_conflict")["subject_id"]} == {"unreliable", "opposed"}
    assert flags.filter(pl.col("subject_id") == "rnd")["reason"].to_list() == ["low_reliability"]
    fate = {name_of[p]: (d, r) for p, d, r in h.read("pairs.parquet").filter(pl.col("pair_id").is_in(list(name_of)))
            .select("pair_id", "decision", "reason").rows()}
    assert fate == {"unreliable": ("keep", None), "opposed": ("drop", "dimension_conflict")}


def _judges_in_both_orders() -> list[dict]:
    """``_reliable_and_random_history``'s panel (three humans right 92 % of the time, ``rnd`` at random)
    plus two AI judges that judged every pair in both display orders: ``ai-good`` (right 85 % of the
    time in each order) and ``ai-flip`` (always the first-shown response: its two verdicts cancel)."""
    import random

    from conftest import canonical

    rng, rows = random.Random(5), []
    for i in range(120):
        truth, other = "ab"[i % 2], "ba"[i % 2]
        panel = [(who, "a", truth if rng.random() < 0.92 else other) for who in ("h1", "h2", "h3")]
        panel.append(("rnd", "a", rng.choice("ab")))
        panel += [("ai-good", shown, truth if rng.random() < 0.85 else other) for shown in "ab"]
        panel += [("ai-flip", shown, shown) for shown in "ab"]
        for who, shown, lab in panel:
            rows.append(canonical(len(rows), prompt=[{"role": "user", "content": f"question {i}"}], response_a=f"good {i}",
                                  response_b=f"bad {i}", annotator_id=who, annotator_kind="ai" if who.startswith("ai") else "human",
                                  shown_first=shown, label=lab, strength=0.8))
    return rows


@pytest.mark.parametrize("path", ["one process", "partitions", "child"])
def test_reliability_and_the_preliminary_consensus_do_not_count_re_delivered_copies(tmp_path, path):
    """A version's reliability figures (agreement with the others' consensus, gold, the accuracies
    they are weighed with, the judgment counts, the flags) and the preliminary consensus's pair
    figures (the agreement check's scored and low-agreement pairs, the length-bias check's pair
    rates) are those of the same judgments without re-delivered copies (every 3rd judgment delivered
    again, the responses named the other way round; a child's copies also of its parent's
    judgments): a copy is no second vote -- counted, it weighed twice in the accuracy fits, outweighed
    an AI judge's other display order, and made a pair's panel look larger.  On the first version's
    two builds (the partitioned one at several partition counts) and a child."""
    from conftest import redelivered, write_jsonl

    from pipeline.checks import resolve_policy
    from pipeline.curate import CurateOptions, curate
    from pipeline.partition import partition_files
    from pipeline.partitioned_build import build_first
    from schemas.policy import Policy

    rows = _judges_in_both_orders()
    first, second = rows[:720], rows[720:]
    # (a child merges reliability's state while its union has at most 1 + refit_growth times the judgments its
    # parameters were fitted on: with the copies, 1280 of 720)
    child_policy = Policy.model_validate({"checks": {"refit_growth": 1.0}})
    figures = {}
    for copies in (False, True):
        for n in ((2, 5) if path == "partitions" else (None,)):
            store = Store(tmp_path / f"store-{copies}-{n}")
            if path == "child":
                parent = curate([write_jsonl(tmp_path / "first.jsonl", first)], store, child_policy).version_id
                batch = redelivered(first + second, 3)[len(first):] if copies else second
                vid = curate([write_jsonl(tmp_path / f"second-{copies}.jsonl", batch)], store, child_policy,
                             parent=parent).version_id
            elif n is None:
                batch = write_jsonl(tmp_path / f"all-{copies}.jsonl", redelivered(rows, 3) if copies else rows)
                vid = curate([batch], store, Policy(), options=CurateOptions(partitioned=False)).version_id
            else:  # (curate sizes partitions by policy.ingest.partition_rows, at least 1000 rows: one or two here)
                batch = write_jsonl(tmp_path / f"all-{copies}.jsonl", redelivered(rows, 3) if copies else rows)
                policy = resolve_policy(Policy())
                pset = partition_files([batch], tmp_path / f"set-{copies}-{n}", n_partitions=n, limits=policy.ingest,
                                       batch_rows=policy.ingest.batch_rows, dimensions=policy.dimensions)
                vid = f"v-{copies}-{n}"
                store.write_version(vid, lambda stage, v=vid, p=pset, pol=policy: build_first(
                    store, stage, v, p, pol, work=tmp_path / f"work-{copies}-{n}"))
            h = store.get(vid)
            m = h.manifest()
            assert m.check("duplicates").metrics["exact_duplicates"] == (len(rows[::3]) if copies else 0)
            if path == "child":
                assert m.lineage["preliminary"]["mode"] == "incremental" and "reliability" in m.lineage["check_sums"]["checks"]
            flags = h.read("flags.parquet").filter(pl.col("check").is_in(["reliability", "agreement", "length_bias"]))
            figures[copies, n] = {
                **{name: m.check(name).metrics for name in ("reliability", "agreement", "length_bias", "position_bias")},
                "flags": sorted(flags.select("subject_id", "reason", "detail").rows()),
                "annotators": h.read("annotators.parquet").sort("annotator_id").to_dicts()}
    want = figures[False, (2 if path == "partitions" else None)]
    assert ("rnd", "low_reliability") in {(s, r) for s, r, _ in want["flags"]}
    for key, got in figures.items():
        for name in want:
            assert got[name] == want[name], (key, name)
