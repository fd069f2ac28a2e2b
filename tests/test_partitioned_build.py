"""pipeline/partitioned_build.py: a first version built over partitions is the version the
one-process build writes for the same input -- every table's rows (and, for the tables keyed by
pair, every part's bytes), the ledger, the checks, the annotators."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl
import pytest

from pipeline.checks import resolve_policy
from pipeline.curate import CurateOptions, curate
from pipeline.partition import partition_files
from pipeline.partitioned_build import build_first
from pipeline.split import SPLITS
from pipeline.store import Store
from schemas.policy import Policy
from tests.conftest import ROOT, canonical, write_jsonl

sys.path.insert(0, str(ROOT / "benchmarks"))
from gen_judgments import generate  # noqa: E402

POLICY = resolve_policy(Policy())
ONE_PROCESS = CurateOptions(partitioned=False)  # the reference: a first version built in one process
# written with the build's time (routed_at) or by another writer (the judgments stream): rows compared, not bytes
ROWS_ONLY = {"judgments", "state/judgment_rows", "review_state"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("in")
    generate(d / "gen.jsonl", 6000, 700, seed=21)
    same = canonical(100, annotator_id="rev-9")
    planted = [same, {**same, "annotator_id": "rev-2"},  # a comparison id used twice (another content: kept once)
               {**canonical(101), "comparison_id": same["comparison_id"]}]
    return [d / "gen.jsonl", write_jsonl(d / "planted.jsonl", planted),
            *sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))]


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("one") / "store")
    res = curate(inputs, store, POLICY, options=ONE_PROCESS)
    return store.resolve(res.version_id)


def _partitioned(inputs: list[Path], root: Path, version_id: str, n: int):
    pset = partition_files(inputs, root / "set", n_partitions=n, batch_rows=POLICY.ingest.batch_rows, limits=POLICY.ingest,
                           dimensions=POLICY.dimensions)
    store = Store(root / "store")
    store.write_version(version_id, lambda stage: build_first(store, stage, version_id, pset, POLICY, work=root / "work"))
    return store.resolve(version_id)


RUN_COUNTERS = ("distinct_texts", "langdetect_calls", "langdetect_skipped")  # the language check's work, per run


def _checks(manifest) -> str:
    out = []
    for c in manifest.checks:
        d = c.model_dump()
        d["metrics"] = {k: v for k, v in d["metrics"].items() if not (d["name"] == "language" and k in RUN_COUNTERS)}
        out.append(d)
    return json.dumps(out, sort_keys=True, default=str)


def _rows(handle, name: str) -> pl.DataFrame:
    frame = handle.read(name)
    return frame.drop("routed_at") if name == "review_state" else frame


@pytest.mark.parametrize("n", [1, 4])
def test_the_partitioned_first_version_is_the_one_process_version(inputs, one_process, tmp_path, n):
    want = one_process
    got = _partitioned(inputs, tmp_path, want.version_id, n)
    wm, gm = want.manifest(), got.manifest()
    assert wm.ledger.judgments_dropped.get("duplicate_comparison_id") == 2
    _assert_same(got, want)  # (the ledger's JSON: the dicts' order too, the manifest's bytes)
    assert gm.annotators == wm.annotators and gm.sources == wm.sources and gm.ingest == wm.ingest
    assert sorted(gm.files) == sorted(wm.files)


def _registry():
    from schemas.registry import AnnotatorRegistry, load_registry

    samples = load_registry(ROOT / "data" / "samples" / "annotators.csv").annotator
    gen = [{"annotator_id": f"rev-{i:03d}", "annotator_kind": "human", "locales": ["en"] if i < 50 else []}
           for i in range(150)]  # rev-150..199 unknown; rev-000..049 judge ja-JP / zh-CN pairs too
    ais = [{"annotator_id": "judge-alpha", "annotator_kind": "human"},  # an AI judge registered as a human
           {"annotator_id": "judge-beta", "annotator_kind": "ai", "qualified_until": "2026-11-10"},
           {"annotator_id": "judge-gamma", "annotator_kind": "ai"}, {"annotator_id": "judge-delta", "annotator_kind": "ai"},
           {"annotator_id": "rev-999", "annotator_kind": "human"}]  # registered, no judgment
    return AnnotatorRegistry.model_validate({"annotator": [e.model_dump() for e in samples] + gen + ais})


def test_with_an_annotator_registry_the_partitioned_version_is_the_one_process_version(inputs, tmp_path):
    """The registry check runs per partition (its flags then drop judgments in every partition's
    select): the version equals the one-process build's, and the check found what was planted."""
    want, got = _build(inputs, tmp_path, resolve_policy(Policy(annotators=_registry())), 3)
    m = {c.name: c for c in want.manifest().checks}["registry"].metrics
    assert min(m["unknown_annotator"], m["kind_mismatch"], m["unqualified_reviewer"]) > 0, m
    assert m["unqualified_by_field"]["locale"] > 0 and m["unqualified_by_field"]["date"] > 0
    assert m["registered_without_judgments"] >= 1 and "rev-150" in m["unknown_annotator_ids"]
    assert 0 < want.manifest().ledger.judgments_dropped.get("unknown_annotator", 0) <= m["unknown_annotator"]  # (one reason a drop)
    _assert_same(got, want)


STEPS: set[str] = set()  # the steps the last _build ran (their names, as partition_progress reports them)


def _build(inputs: list[Path], root: Path, policy: Policy, n: int):
    """(the one-process version, the version built over ``n`` partitions) of ``inputs``."""
    from pipeline.distributed import partition_progress

    want = curate(inputs, Store(root / "one"), policy, options=ONE_PROCESS).handle
    pset = partition_files(inputs, root / "set", n_partitions=n, batch_rows=policy.ingest.batch_rows,
                           limits=policy.ingest, dimensions=policy.dimensions)
    store = Store(root / "store")
    STEPS.clear()
    with partition_progress(lambda step, _i, _n: STEPS.add(step)):
        store.write_version(want.version_id, lambda stage: build_first(store, stage, want.version_id, pset, policy,
                                                                       work=root / "work"))
    return want, store.resolve(want.version_id)


def _assert_same(got, want) -> None:
    gm, wm = got.manifest(), want.manifest()
    assert _checks(gm) == _checks(wm)
    assert gm.lineage["check_sums"] == wm.lineage["check_sums"]
    assert gm.ledger.model_dump_json() == wm.ledger.model_dump_json()
    assert sorted(gm.tables) == sorted(wm.tables)
    for name, table in wm.tables.items():
        mine = gm.tables[name]
        if name in ROWS_ONLY:
            assert _rows(got, name).equals(_rows(want, name)), name
        else:
            assert [(p.path, p.rows, p.sha256) for p in mine.parts] == [(p.path, p.rows, p.sha256) for p in table.parts], name


def test_the_report_says_what_the_one_process_report_says(inputs, one_process, tmp_path):
    got = _partitioned(inputs, tmp_path, one_process.version_id, 3)
    a, b = _report_lines(one_process.path), _report_lines(got.path)
    assert a == b
    assert any("near-duplicate" in line.lower() for line in a)


def _report_lines(version_dir: Path) -> list[str]:
    """The Markdown report's lines with the build's own minute blanked: the time is not the report's content (two
    builds a second apart can straddle a minute)."""
    text = (version_dir / "report.md").read_text(encoding="utf-8")
    return [line.split(" · ", 1)[-1] if line.startswith("created ") else line for line in text.splitlines()]


def _small_partitions() -> Policy:
    return resolve_policy(Policy.model_validate({"ingest": {"partition_rows": 1000}}))


def test_curate_builds_a_first_version_over_partitions_and_a_failed_task_leaves_no_version(inputs, tmp_path, monkeypatch):
    """``curate`` of a first version runs the partitioned build (its lineage says so); a partition's
    task that fails fails the run with that partition named and writes no version; the retry
    computes only what is missing and gives the version the one-process build gives."""
    import pipeline.partition_select as ps
    from pipeline.distributed import PartitionTaskError

    policy = _small_partitions()
    calls: list[str] = []
    failed: list[bool] = []
    real = ps._select_run

    def flaky(*args):
        paths = args[-1]
        calls.append(Path(paths[0]).name[:10])  # (part-NNNNN: a partition rewritten without a repeated id has a longer name)
        if calls[-1] == "part-00002" and not failed:
            failed.append(True)
            raise RuntimeError("worker lost")
        return real(*args)

    monkeypatch.setattr(ps, "_select_run", flaky)
    store = Store(tmp_path / "store")
    opts = CurateOptions()  # (the default: over partitions)
    with pytest.raises(PartitionTaskError, match=r"partition 2 \(part-00002[-0-9a-f]*\.parquet.*RuntimeError: worker lost"):
        curate(inputs, store, policy, options=opts)
    assert not any((tmp_path / "store" / "versions").iterdir())
    n_parts = len(set(calls))
    assert n_parts >= 3 and (tmp_path / "store" / ".work").is_dir()  # kept for the retry
    calls.clear()
    res = curate(inputs, store, policy, options=opts)
    assert calls == ["part-00002"]  # only the failed partition's task ran again
    m = res.handle.manifest()
    assert m.lineage["partitions"]["n"] == n_parts
    # select's sub-laps end to end from the stage's start (benchmarks/stages.py places them so)
    laps = m.lineage["timings_s"]
    subs = [k for k in laps if k.startswith("partitions:select/")]
    assert subs == ["partitions:select/state tables", "partitions:select/final fit", "partitions:select/select"]
    assert sum(laps[k] for k in subs) <= laps["partitions:select"] + 0.01
    assert not (tmp_path / "store" / ".work" / res.version_id).exists()  # removed once the version is written
    one = Store(tmp_path / "one")
    monkeypatch.setattr(ps, "_select_run", real)

    want = curate(inputs, one, policy, options=ONE_PROCESS).handle  # (the reference)
    assert "partitions" not in want.manifest().lineage
    assert m.ledger.model_dump_json() == want.manifest().ledger.model_dump_json()
    assert res.version_id != want.version_id  # (a partitioned build is its own version: docs/scale-out.md)
    for name in ("data/train", "data/validation", "data/test", "flags"):
        assert [p.sha256 for p in m.tables[name].parts] == [p.sha256 for p in want.manifest().tables[name].parts], name
    assert res.handle.read("pairs").drop("first_version").equals(want.read("pairs").drop("first_version"))


def test_dimension_verdicts_are_built_over_partitions_as_in_one_process(inputs, tmp_path):
    """The per-dimension consensus (its own fit), the dimension rule, the dimensions check's
    conflicts and per-dimension figures: equal to the one-process build's."""
    dim = ROOT / "data" / "samples" / "dimensions" / "batch-2026-11-23-dimensions.jsonl"
    policy = resolve_policy(Policy.model_validate({"dimensions": {"priority": ["harmlessness", "helpfulness"]}}))
    want, got = _build([*inputs, dim], tmp_path, policy, 4)
    assert "partitions" in got.manifest().lineage
    m = {c.name: c for c in want.manifest().checks}["dimensions"].metrics
    assert m["conflict_pairs"] == 40 and m["dimensions"] == ["harmlessness", "helpfulness"], m
    assert m["per_dimension"]["helpfulness"]["agreement"]["all"]["krippendorff_alpha"] is not None
    assert got.read("pairs")["dimensions"].drop_nulls().len() == 60
    _assert_same(got, want)


@pytest.mark.parametrize("n", [2, 5])
def test_dimension_verdicts_with_re_delivered_copies_are_built_over_partitions_as_in_one_process(tmp_path, n):
    """With re-delivered copies (the dimension sample's every 4th judgment again, and a planted pair
    whose tied helpfulness two copies used to sway: :func:`tests.test_dimensions._with_copies`), the
    partitions' per-dimension codes, fit, decisions and sums leave the copies out as the one-process
    build does: every table, check and count equal."""
    from tests.test_dimensions import _with_copies

    _, rows, copies = _with_copies()
    policy = resolve_policy(Policy.model_validate({"dimensions": {"priority": ["harmlessness", "helpfulness"]},
                                                   "select": {"flag_actions": {"dimension_conflict": "drop"}}}))
    want, got = _build([write_jsonl(tmp_path / "copies.jsonl", rows)], tmp_path, policy, n)
    m = want.manifest()
    assert m.check("duplicates").metrics["exact_duplicates"] == len(copies)
    assert m.check("dimensions").metrics["conflict_pairs"] == 41  # (the planted pair's conflict too)
    _assert_same(got, want)


def test_train_on_a_dimension_is_built_over_partitions_as_in_one_process(inputs, tmp_path):
    """``train_on``: the version is built on one dimension's verdicts (judgments without one
    dropped and counted), judgments.parquet keeps them as given -- as the one-process build does;
    with reviews in the input too."""
    dim = ROOT / "data" / "samples" / "dimensions" / "batch-2026-11-23-dimensions.jsonl"
    policy = resolve_policy(Policy.model_validate({"dimensions": {"train_on": "helpfulness"}}))
    want, got = _build([*inputs, dim, _reviews_file(tmp_path)], tmp_path, policy, 3)
    assert "partitions" in got.manifest().lineage
    dropped = want.manifest().ledger.judgments_dropped
    assert dropped.get("no_verdict_on_helpfulness", 0) > 6000, dropped
    assert got.read("judgments").height == want.read("judgments").height > 6000  # (as given)
    assert "rewrite-train-on" in STEPS
    _assert_same(got, want)


def test_a_given_id_equal_to_another_contents_derived_id_is_put_with_it(tmp_path):
    """A row whose given pair_id is the derived id of other texts (``pair_id_conflict``): that id's
    rows sit in two partitions -- the derived ones with their texts, the given one with its own --
    and are put into one, as any given id's contents (no given-id key names the derived rows)."""
    from pipeline.ingest import ingest_files
    from pipeline.partition import partition_index

    rows = [canonical(i, comparison_id=f"j-{i}-{k}", annotator_id=f"rev-0{k}") for i in range(400, 430) for k in range(2)]
    j = ingest_files([write_jsonl(tmp_path / "probe.jsonl", rows)]).judgments
    home = dict(zip(j["pair_id"].to_list(), partition_index(j, 4).to_list(), strict=True))
    ids = list(dict.fromkeys(j["pair_id"].to_list()))
    a = ids[0]
    b_i = next(k for k, p in enumerate(ids) if home[p] != home[a])  # another content, in another partition
    rows.append(canonical(400 + b_i, comparison_id="j-given", annotator_id="rev-09", pair_id=a))
    want, got = _build([write_jsonl(tmp_path / "in.jsonl", rows)], tmp_path, POLICY, 4)
    assert {c.name: c for c in want.manifest().checks}["pair_id_conflict"].metrics["conflicting_pair_ids"] == 1
    _assert_same(got, want)


def test_pairs_none_of_which_is_kept_build_empty_splits_as_in_one_process(tmp_path):
    """Every pair routed (ties): pair tables with rows, three DPO splits without (each one empty part)."""
    rows = [canonical(i, comparison_id=f"t-{i}-{k}", annotator_id=f"rev-0{k}", label="tie") for i in range(12) for k in range(2)]
    want, got = _build([write_jsonl(tmp_path / "in.jsonl", rows)], tmp_path, POLICY, 2)
    m = got.manifest()
    assert m.ledger.pairs == 12 and m.ledger.pairs_kept == 0 and sum(m.ledger.routed.values()) == 12
    assert all(m.tables[f"data/{sp}"].rows == 0 and len(m.tables[f"data/{sp}"].parts) == 1 for sp in SPLITS)
    _assert_same(got, want)


def _reviews_file(d: Path) -> Path:
    """Pairs with given ids and reviews of them: of the same texts (kept: ``review_not_routed``), of
    other texts (``review_text_mismatch``: their own pair id, in another partition), of no known
    pair (``review_unknown_pair``), one written before the judgments of its pair; given ids that
    name two contents each (``pair_id_conflict``: some span partitions), one reviewed with its
    second content (the first judgment's texts are the pair's: a mismatch)."""
    rows = [canonical(i, comparison_id=f"j-{i}-{k}", pair_id=f"p-{i}", annotator_id=f"rev-0{k}",
                      label="a" if (i + k) % 3 else "b") for i in range(1, 41) for k in range(3)]
    review = dict(annotator_id="rev-9", label="b")
    rows.insert(0, canonical(7, comparison_id="rv-early", pair_id="p-7", review_of="p-7", **review))
    rows += [canonical(i, comparison_id=f"rv-same-{i}", pair_id=f"p-{i}", review_of=f"p-{i}", **review) for i in range(1, 11)]
    rows += [canonical(i + 100, comparison_id=f"rv-other-{i}", pair_id=f"p-{i}", review_of=f"p-{i}", **review)
             for i in range(11, 16)]
    rows += [canonical(200, comparison_id="rv-nope", pair_id="p-nope", review_of="p-nope", **review)]
    # given ids naming two contents (pair_id_conflict), some across partitions; p-c0..p-c2 chained by shared contents
    rows += [canonical(300 + i + k, comparison_id=f"jc-{i}-{k}", pair_id=f"p-c{i}", annotator_id=f"rev-0{k}")
             for i in range(8) for k in range(2)]
    rows += [canonical(301, comparison_id="rv-c0", pair_id="p-c0", review_of="p-c0", **review)]
    return write_jsonl(d / "reviews.jsonl", rows)


def test_reviews_in_the_input_are_attached_classified_and_dropped_as_in_one_process(inputs, tmp_path):
    want, got = _build([*inputs, _reviews_file(tmp_path)], tmp_path, POLICY, 4)
    assert "partitions" in got.manifest().lineage
    by = {c.name: c for c in want.manifest().checks}["reviews"].metrics["by_status"]
    assert by["not_routed"] == 11 and by["text_mismatch"] == 6 and by["unknown_pair"] == 1, by
    assert want.manifest().ledger.reviews.judgments == 18
    conflicts = {c.name: c for c in want.manifest().checks}["pair_id_conflict"].metrics
    assert conflicts["conflicting_pair_ids"] >= 8, conflicts
    # a given id's contents in several partitions were put together (rows gathered, partitions written again by tasks)
    assert {"build-linked-rows", "rewrite-without-contents", "rewrite-with-rows", "rewrite-new-pair-ids"} <= STEPS, STEPS
    other = got.read("judgments").filter(pl.col("comparison_id").str.starts_with("rv-other"))
    assert other.height == 5 and not (other["pair_id"] == other["review_of"]).any()  # (their own ids)
    _assert_same(got, want)


def test_curate_builds_a_first_version_with_reviews_over_partitions(tmp_path):
    rows = [canonical(1, pair_id="p-1"), canonical(2),
            canonical(1, pair_id="p-1", comparison_id="rv-1", annotator_id="rev-9", review_of="p-1")]
    res = curate([write_jsonl(tmp_path / "in.jsonl", rows)], Store(tmp_path / "s"), POLICY)
    m = res.handle.manifest()
    assert "partitions" in m.lineage and m.ledger.reviews.judgments == 1


@pytest.mark.slow
def test_a_two_worker_local_cluster_writes_the_same_version_byte_for_byte(inputs, tmp_path):
    """Issue 15 goal 2 for a first version: the build's tasks on a 2-process LocalCluster give
    the version the in-process build gives -- every part's bytes (the review state stamps the
    build's time: its rows), the ledger and the checks.  With rated candidate lists among the inputs (a row's
    judgments at one place, in several partitions)."""
    from pipeline.distributed import open_runner

    files = [*inputs, write_jsonl(tmp_path / "rated.jsonl", _rated_rows())]

    def build(root: Path, client) -> object:
        pset = partition_files(files, root / "set", n_partitions=4, batch_rows=POLICY.ingest.batch_rows,
                               limits=POLICY.ingest, dimensions=POLICY.dimensions)
        store = Store(root / "store")
        store.write_version("v-0123456789abcdef", lambda stage: build_first(store, stage, "v-0123456789abcdef", pset, POLICY,
                                                                            work=root / "work", client=client))
        return store.resolve("v-0123456789abcdef")

    here = build(tmp_path / "here", None)
    with open_runner("local") as client:
        there = build(tmp_path / "there", client)
    hm, tm = here.manifest(), there.manifest()
    assert tm.ledger.model_dump_json() == hm.ledger.model_dump_json()
    assert json.dumps([c.model_dump() for c in tm.checks], sort_keys=True, default=str) == \
        json.dumps([c.model_dump() for c in hm.checks], sort_keys=True, default=str)  # (the run counters too)
    assert sorted(tm.tables) == sorted(hm.tables)
    for name, table in hm.tables.items():
        if name == "review_state":
            assert _rows(there, name).equals(_rows(here, name))
        else:
            assert [(p.path, p.sha256) for p in tm.tables[name].parts] == [(p.path, p.sha256) for p in table.parts], name


def test_gc_removes_a_failed_partitioned_builds_work_dir_unless_a_build_holds_it(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    store = Store(tmp_path / "s").ensure()
    left = store.root / ".work" / "v-00000000000000aa"  # a failed build's partitions and states, kept for a retry
    busy = store.root / ".work" / "v-00000000000000bb"  # a build running now (it holds its version's lock)
    for d in (left, busy):
        (d / "states").mkdir(parents=True)
    # a first version's partitions staged while its inputs were hashed: a dead process's go, a live one's stay
    import os

    dead, alive = (store.root / ".staging" / f"partitions.{pid}.0123abcd" for pid in (2**22 + 12345, os.getpid()))
    for d in (dead, alive):
        (d / "set").mkdir(parents=True)
    runner = CliRunner()
    with store.lock("v-00000000000000bb"):
        res = runner.invoke(app, ["gc", "--store", str(store.root), "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout)["work"] == ["v-00000000000000aa"]
        assert json.loads(res.stdout)["staging"] == [dead.name]
        assert left.is_dir()  # a dry run
        res = runner.invoke(app, ["gc", "--store", str(store.root), "--apply"])
        assert res.exit_code == 0 and "1 work dir(s)" in res.stdout
    assert not left.exists() and busy.is_dir()
    assert not dead.exists() and alive.is_dir()


def test_an_input_whose_every_row_is_quarantined_is_refused_alike_by_both_builds(tmp_path):
    """No valid judgment: both builds refuse with the same ledger and rows, and write no version
    (tests/test_curate_refusals.py has the CLI's side)."""
    from pipeline.curate import NoValidJudgments

    rows = [canonical(i, label="not-a-label") for i in range(3)]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    errors = []
    for name, options in (("one", ONE_PROCESS), ("part", None)):
        with pytest.raises(NoValidJudgments) as err:
            curate([path], Store(tmp_path / name), POLICY, **({"options": options} if options else {}))
        assert Store(tmp_path / name).list_versions() == []
        errors.append(err.value)
    assert errors[0].ledger.model_dump_json() == errors[1].ledger.model_dump_json()
    assert errors[0].ledger.quarantined == 3 and errors[0].quarantine.equals(errors[1].quarantine)


def test_the_cli_says_which_partition_failed_and_exits_1_writing_nothing(inputs, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import pipeline.partition_select as ps
    from flows.cli import app

    def lost(*args):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(ps, "_select_run", lost)
    res = CliRunner().invoke(app, ["curate", str(inputs[0]), "--store", str(tmp_path / "s"),
                                   "--partition-rows", "1000"])
    assert res.exit_code == 1, res.output
    assert "curate failed" in res.output and "RuntimeError: worker lost" in res.output and "nothing written" in res.output
    assert "Traceback" not in res.output
    assert not any((tmp_path / "s" / "versions").iterdir())


@pytest.mark.parametrize(("batch_rows", "read_rows"), [(7, 3), (64, 1), (50, 500)])
def test_the_input_order_merge_gives_the_same_rows_whatever_its_batch_sizes(inputs, tmp_path, batch_rows, read_rows):
    """The judgments table is the partitions merged back into input order: the rows (and their order)
    do not depend on how many rows the merge reads of a partition at a time or writes out per batch."""
    import pyarrow as pa

    from pipeline.distributed import refs_of
    from pipeline.partitioned_build import _input_order_batches

    pset = partition_files(inputs, tmp_path / "set", n_partitions=4, batch_rows=POLICY.ingest.batch_rows,
                           limits=POLICY.ingest, dimensions=POLICY.dimensions)
    sources = [s.path for s in pset.sources]
    cols = ["comparison_id", "source_file", "source_line", "prompt"]
    want = pa.concat_tables(_input_order_batches(refs_of(pset), sources, cols))
    assert want.num_rows == sum(p.judgments for p in pset.partitions) > 6000
    pieces = list(_input_order_batches(refs_of(pset), sources, cols, batch_rows=batch_rows, read_rows=read_rows))
    assert {t.num_rows for t in pieces[:-1]} == {batch_rows}
    assert pa.concat_tables(pieces).equals(want)
    order = pl.from_arrow(want).select(pl.col("source_file").cast(pl.String).replace_strict(sources, list(range(len(sources)))),
                                       "source_line")
    assert order.equals(order.sort("source_file", "source_line"))  # (the inputs' files in the order given, then line)


def test_seen_ranks_pairs_whose_first_judgments_share_a_place_by_pair_id():
    """``seen`` from each pair's place in the input: where two pairs' first judgments share a place
    (one input line giving several), the rank a stable sort of the pairs in pair_id order by place
    gives -- what the one-process build's order is."""
    import numpy as np

    from pipeline.partitioned_build import _Seen

    class Rows:  # (the cached rows: read back only for the tied places)
        def __init__(self, frame: pl.DataFrame) -> None:
            self.frame, self.asked = frame, []

        def where(self, column: str, values: pl.Series) -> pl.DataFrame:
            self.asked.append(sorted(values.to_list()))
            return self.frame.filter(pl.col(column).is_in(values.implode()))

    frame = pl.DataFrame({"pair_id": ["p-c", "p-a", "p-b", "p-d", "p-e"], "_o": [5, 7, 5, 2, 9]})
    rows = Rows(frame)
    seen = _Seen(rows, np.sort(frame["_o"].to_numpy()))  # type: ignore[arg-type]
    want = frame.sort("pair_id").sort("_o", maintain_order=True).with_row_index("seen").select("pair_id", pl.col("seen").cast(pl.Int64))
    got = frame.select("pair_id", seen=seen.ranks(frame))
    assert got.sort("pair_id").equals(want.sort("pair_id")) and got["seen"].to_list() == [2, 3, 1, 0, 4]
    assert rows.asked == [[5]]  # (only the shared place's rows were read back)
    assert seen.rows(frame.with_columns(_part=pl.lit("g"))).columns == ["pair_id", "seen", "_part"]


def test_the_inputs_are_hashed_while_partitioned_and_a_known_version_stops_the_partitioning(inputs, tmp_path, monkeypatch):
    """A first version's inputs are hashed on a thread of their own while they are partitioned (the
    version id is their hashes'), into a staging directory of the process.  Once the hashes are in, an
    existing version (a re-run) or an earlier run's partitions (a retry after a failed build) stop the
    partitioning: the re-run returns the version, the retry builds from the partitions it finds -- the
    same bytes as a build from scratch.  Nothing staged is left behind."""
    import threading

    import pipeline.curate as cur
    import pipeline.partitioned_build as pb

    policy = resolve_policy(Policy.model_validate({"ingest": {"partition_rows": 1000, "batch_rows": 1000}}))
    hashed = threading.Event()
    real_hash, real_build = cur.file_hash, pb.build_first

    def file_hash(path):
        out = real_hash(path)
        if Path(path).name == inputs[-1].name:  # (the last input: every hash is in)
            hashed.set()
        return out

    monkeypatch.setattr(cur, "file_hash", file_hash)
    monkeypatch.setattr(cur, "OVERLAP_HASH_FROM", 0)  # (these inputs are small: hashed first by default)
    read: list[int] = []

    def on_rows(n: int) -> None:
        if not read:  # (the first block waits for the hashes: the stop is then at the next block)
            assert hashed.wait(30)
        read.append(n)

    store = Store(tmp_path / "s")
    first = curate(inputs, store, policy, on_rows=on_rows)
    total = first.handle.manifest().ledger.rows_in
    assert first.created and sum(read) == total and total > 6000
    assert first.timings["hash_inputs"] < first.timings["ingest"]
    staging = store.root / ".staging"
    assert not any(staging.glob("partitions.*"))
    # a re-run: the hashes name the version; the partitioning stops at the next block
    hashed.clear()
    read.clear()
    again = curate(inputs, store, policy, on_rows=on_rows)
    assert not again.created and again.version_id == first.version_id
    assert 0 < sum(read) <= 2_000 < total and "checks" not in str(again.timings)
    assert not any(staging.glob("partitions.*"))

    # a build that fails after its partitions were moved in: the retry finds them and partitions nothing
    failed: list[bool] = []

    def failing(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise RuntimeError("the machine went away")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(pb, "build_first", failing)
    other = Store(tmp_path / "o")
    hashed.clear()
    read.clear()
    with pytest.raises(RuntimeError, match="went away"):
        curate(inputs, other, policy, on_rows=on_rows)
    assert sum(read) == total and (other.root / ".work" / first.version_id / "set" / "partitions.json").is_file()
    assert not any((other.root / ".staging").glob("partitions.*"))
    hashed.clear()
    read.clear()
    retry = curate(inputs, other, policy, on_rows=on_rows)
    assert retry.created and retry.version_id == first.version_id and 0 < sum(read) <= 2_000
    a, b = first.handle.manifest(), retry.handle.manifest()
    # (review_state records when each version was created: its rows' count)
    assert {k: t.sha256 for k, t in a.tables.items() if k != "review_state"} == \
        {k: t.sha256 for k, t in b.tables.items() if k != "review_state"}
    assert a.tables["review_state"].rows == b.tables["review_state"].rows
    assert {k: s.sha256 for k, s in a.splits.items()} == {k: s.sha256 for k, s in b.splits.items()}
    assert not (other.root / ".work" / first.version_id).exists()
    assert not any((other.root / ".staging").glob("partitions.*"))


def test_an_input_changed_while_it_is_hashed_and_partitioned_is_refused(inputs, tmp_path, monkeypatch):
    """The hash beside the partitioning: a file whose size or time changes after it was hashed, while it is
    read, is refused (exit 2's ``UnreadableFile``), and nothing is left: no version, no staged partitions."""
    import os
    import shutil

    import pipeline.curate as cur
    from pipeline.readers import UnreadableFile

    monkeypatch.setattr(cur, "OVERLAP_HASH_FROM", 0)
    src = shutil.copy(inputs[0], tmp_path / "gen.jsonl")
    policy = resolve_policy(Policy.model_validate({"ingest": {"partition_rows": 1000, "batch_rows": 1000}}))

    def touch(n: int) -> None:
        st = os.stat(src)
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    store = Store(tmp_path / "s")
    with pytest.raises(UnreadableFile, match="changed while it was being read"):
        curate([src], store, policy, on_rows=touch)
    assert not any((store.root / "versions").iterdir())
    assert not any((store.root / ".staging").glob("partitions.*"))


def _retry_equals(clean, inputs, store, policy):
    """A retry of a failed build: created now, with the clean build's id and tables."""
    retry = curate(inputs, store, policy)
    assert retry.created and retry.version_id == clean.version_id
    a, b = clean.handle.manifest(), retry.handle.manifest()
    assert {k: t.sha256 for k, t in a.tables.items() if k not in ROWS_ONLY} == \
        {k: t.sha256 for k, t in b.tables.items() if k not in ROWS_ONLY}
    return retry


@pytest.mark.parametrize("damaged", ["part-00001.parquet", "quarantine.parquet"])
def test_a_partition_set_changed_after_ingest_fails_the_run_and_the_retry_partitions_again(tmp_path, monkeypatch, damaged):
    """A file of the partition set changed after ingest -- a partition (a byte flipped: its tasks check its sha256)
    or the quarantine (other valid rows: read by the driver) -- fails the run, never becomes part of a version whose
    id names the inputs; the set stays for the retry, which checks it before reusing it: the changed file is not
    reused (a changed partition's tasks would fail at every retry), the inputs are partitioned again and the retry
    gives the version a clean build gives."""
    import pipeline.partitioned_build as pb

    from pipeline.distributed import PartitionChanged, PartitionTaskError

    inputs = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))
    policy = _small_partitions()
    clean = curate(inputs, Store(tmp_path / "clean"), policy)
    assert clean.handle.read("quarantine").height >= 2
    store = Store(tmp_path / "s")
    real = pb.build_first

    def damaging(store_, stage, version_id, pset, *args, **kwargs):
        path = pset.directory / damaged
        if damaged == "quarantine.parquet":
            pl.read_parquet(path).head(1).write_parquet(path)
        else:
            blob = bytearray(path.read_bytes())
            blob[len(blob) // 2] ^= 0xFF
            path.write_bytes(bytes(blob))
        return real(store_, stage, version_id, pset, *args, **kwargs)

    monkeypatch.setattr(pb, "build_first", damaging)
    with pytest.raises((PartitionTaskError, PartitionChanged), match=rf"{damaged}.*sha256"):
        curate(inputs, store, policy)
    assert not store.exists(clean.version_id)
    assert (store.root / ".work" / clean.version_id / "set" / "partitions.json").is_file()  # kept for the retry
    monkeypatch.setattr(pb, "build_first", real)
    _retry_equals(clean, inputs, store, policy)
    assert not (store.root / ".work" / clean.version_id).exists()


def test_the_states_go_once_the_pair_tables_are_written_and_a_late_failure_keeps_the_partitions(inputs, tmp_path, monkeypatch):
    """After the pair tables, nothing reads the tasks' states: they (and the rewritten partitions, the broadcast
    tables) are removed while the rest is written, and the report takes its few rows from the version's own
    tables.  A build that fails after that (here: in the report) leaves the partition set and no state; the retry
    computes the checks again from those partitions and gives the version a clean build gives."""
    import pipeline.report as report

    policy = _small_partitions()
    clean = curate(inputs, Store(tmp_path / "clean"), policy)
    store = Store(tmp_path / "s")
    work = store.root / ".work" / clean.version_id
    seen: list[bool] = []
    real = report.write_report

    def failing(inp, stage):
        seen.append((work / "set" / "partitions.json").is_file())
        list(real(inp, stage))  # (the report's reads -- example pairs, their first-seen order -- work without states)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report", failing)
    with pytest.raises(OSError, match="No space"):
        curate(inputs, store, policy)
    assert seen == [True] and not store.exists(clean.version_id)
    assert (work / "set" / "partitions.json").is_file()
    assert not any((work / name).exists() for name in ("states", "rewritten", "broadcast"))
    monkeypatch.setattr(report, "write_report", real)
    retry = _retry_equals(clean, inputs, store, policy)
    assert _report_lines(clean.handle.path)[2:] == _report_lines(retry.handle.path)[2:]
    assert not work.exists()


def test_a_dimension_counts_two_judgments_of_an_annotator_over_partitions_as_in_one_process(tmp_path):
    """Two judgments of one annotator on one pair, one display order, different labels and one verdict on each
    dimension (:func:`tests.test_dimensions._one_annotator_twice`): the partitions' dimension sums count two
    ratings, as the one-process build does and as both count the same verdicts of two annotators."""
    from tests.test_dimensions import _dimension_counts, _one_annotator_twice, _with_copies

    plain = _with_copies()[0]
    policy = resolve_policy(Policy.model_validate({"dimensions": {"priority": ["harmlessness", "helpfulness"]}}))
    counts = {}
    for again in ("rev-x", "rev-y"):
        want, got = _build([write_jsonl(tmp_path / f"{again}.jsonl", plain + _one_annotator_twice(again))],
                           tmp_path / again, policy, 2)
        _assert_same(got, want)
        counts[again] = _dimension_counts(got.manifest().check("dimensions").metrics)
    assert counts["rev-x"] == counts["rev-y"]


def _rated_rows() -> list[dict]:
    """UltraFeedback-style candidate lists: rows of 2 to 13 candidates (a row of 13 gives 78 judgments), per-aspect ratings (dimensions), a row with two identical candidates (a pair
    skipped), candidates shared between rows (one pair judged from several rows) and a row given again later by
    another annotator."""
    rows = []
    for i in range(40):
        k = 2 + (i * 5) % 12
        cands = [{"model": f"m{c % 4}", "response": f"Answer {c % 7} to question {i % 9}: " + "detail " * (c % 5),
                  "overall_score": float((i + 3 * c) % 10),
                  "annotations": {"helpfulness": {"Rating": str(1 + (c * i) % 5)}, "honesty": {"Rating": str(1 + c % 3)}}}
                 for c in range(k)]
        if i == 8:
            cands[1] = {**cands[0], "model": "m9"}  # (the same text twice: never paired)
        rows.append({"id": f"row-{i:02d}", "instruction": f"Question {i % 9}: how do rivers form?",
                     "completions": cands, "annotator_id": f"judge-{i % 4}"})
    rows.append({**rows[5], "id": "row-05-b", "annotator_id": "judge-9"})  # (the same lists from another annotator)
    rows.append({**rows[6], "id": "row-06-again"})  # (and re-delivered: the same annotator's judgments again)
    return rows


@pytest.mark.parametrize("n", [1, 3, 7])
def test_rated_candidate_lists_are_built_over_partitions_as_in_one_process(tmp_path, n):
    """A rated row gives several judgments at one place in the input (its file and line), which a
    partitioned build spreads over partitions by their contents: the partitions merge them back in
    (place, pair id, comparison id) order, the ingest's -- the version is the one-process build's,
    table for table (the pairs first seen at one place too: ranked by pair id).  An earlier canonical row with one of a rated row's comparison ids drops that judgment
    only (the later copy), not the row's others: a judgment is its place *and* its id."""
    rated = _rated_rows()
    first = canonical(7, comparison_id="row-04:0-1", annotator_id="rev-7")
    paths = [write_jsonl(tmp_path / "early.jsonl", [first, canonical(5)]), write_jsonl(tmp_path / "rated.jsonl", rated)]
    policy = resolve_policy(Policy())
    want, got = _build(paths, tmp_path, policy, n)
    m = want.manifest()
    assert [s.format for s in m.sources] == ["canonical", "rated"]
    assert m.ledger.judgments_dropped.get("duplicate_comparison_id") == 1 and m.ingest.skipped == {"identical_candidates": 1}
    judgments = want.read("judgments")
    ids = judgments["comparison_id"].to_list()
    row7 = judgments.filter(pl.col("comparison_id").str.starts_with("row-07:"))["pair_id"]
    assert row7.len() == 78 and row7.equals(row7.sort())  # (a row's judgments: in their pair ids' order)
    assert max(len(r["completions"]) for r in rated) == 13
    # row-04: 10 candidates, 45 judgments, its 0-1 the later copy of the canonical row's id (dropped): 44 + 1
    assert sum(i.startswith("row-04:") for i in ids) == 45 and ids.count("row-04:0-1") == 1
    if n > 1:
        assert "rewrite-drop-places" in STEPS
    _assert_same(got, want)


@pytest.mark.parametrize(("n", "batch_rows", "read_rows"), [(5, 7, 3), (3, 64, 1), (8, 50, 500)])
def test_the_merge_puts_a_rated_rows_judgments_in_ingest_order_whatever_its_batch_sizes(tmp_path, n, batch_rows, read_rows):
    """A rated row's judgments share one place and lie in several partitions (or several in one): the
    merge gives them in the ingest's order -- their pair ids', then comparison ids' -- also where a row's judgments are
    more than a batch (78 of them, batches of 7) or a batch ends among them."""
    import pyarrow as pa

    from pipeline.distributed import refs_of
    from pipeline.ingest import ingest_files
    from pipeline.partitioned_build import _input_order_batches

    path = write_jsonl(tmp_path / "rated.jsonl", _rated_rows())
    pset = partition_files([path], tmp_path / "set", n_partitions=n, batch_rows=POLICY.ingest.batch_rows,
                           limits=POLICY.ingest, dimensions=POLICY.dimensions)
    want = ingest_files([path], batch_rows=POLICY.ingest.batch_rows, limits=POLICY.ingest,
                        dimensions=POLICY.dimensions).judgments["comparison_id"].to_list()
    got = pa.concat_tables(_input_order_batches(refs_of(pset), [s.path for s in pset.sources], ["comparison_id"],
                                                batch_rows=batch_rows, read_rows=read_rows))
    assert got["comparison_id"].to_pylist() == want and len(want) > 1000
    assert sum(p.judgments > 0 for p in pset.partitions) == n
