"""A child's pair-scoped checks run over the touched pairs only and merge with its parent's:
the same flags and figures as a run over the whole union (pipeline/incremental.py)."""
from __future__ import annotations

import os
import random
from collections.abc import Callable

import polars as pl
import pytest
from conftest import canonical, write_jsonl
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from pipeline.checks import CHECKS, run_checks
from pipeline.curate import curate
from pipeline.incremental import JUDGMENT_ROWS, PAIR_SCOPED, declared_sums, judgment_rows, sums_params_table, sums_table
from pipeline.report import LABEL_COUNTS, label_counts
from pipeline.store import Store
from schemas.policy import Policy, policy_from_dict

EN = ["How do I keep bread fresh for a week without a freezer at home", "What is the best way to learn to play the piano as an adult",
      "Can you explain why the sky looks blue during the day but red at sunset", "Which plants grow well on a shady balcony in the city"]
JA = ["パンを一週間新鮮に保つにはどうすればいいですか", "大人になってからピアノを習う一番良い方法は何ですか"]
ANSWERS = ["Keep it in a cloth bag in a cool dry place and slice only what you need each day.",
           "Practice a little every day, start with simple pieces, and find a patient teacher.",
           "Sunlight scatters off air molecules; blue light scatters more, and at sunset the path is longer.",
           "Ferns, hostas and begonias do well with little direct light and regular watering."]
ND_RUN_ONLY = ("prompts_hashed", "index_prompts_before", "index")  # this run's work; the index backend
# refit_growth: every child counts reliability under the rule (its parent's parameters), whatever its batch's size
POLICY = policy_from_dict({"certify": {"require_expectations": False}, "checks": {"refit_growth": 1000.0}})
COMPARED = {"duplicates": ["judgments", "exact_duplicates", "exact_duplicate_rate", "duplicate_groups", "pairs",
                           "identical_responses", "identical_response_rate"],
            "pair_id_conflict": ["conflicting_pair_ids", "flagged_judgments", "prompt_differs", "responses_differ"],
            "language": ["pairs_checked", "texts_checked", "mismatched_pairs", "mismatch_rate", "matrix", "decided_by"]}
# the figures a check computes from its mergeable sums alone (its per-pair flags read the child's consensus)
SUMS_COMPARED = {"agreement": ["human", "ai", "all", "unknown", "ratings_treated_as_missing", "slices"],
                 "position_bias": None,  # None: every figure, and the flags (it reads no consensus)
                 "reliability": None,  # against a count with the child's parameters (the rule)
                 "length_bias": ["annotators", "tested", "insufficient_data", "length_biased",
                                 "judgments_with_length_difference", "chosen_longer_rate_judgments"]}


def _batch(rng: random.Random, step: int, old: list[dict]) -> list[dict]:
    rows = []
    for i in range(rng.randint(4, 14)):
        ja = rng.random() < 0.2
        prompt = rng.choice(JA if ja else EN) + f" ({step}-{i})"
        a, b = rng.sample(ANSWERS, 2)
        if rng.random() < 0.1:
            b = a  # identical responses
        locale = "ja-JP" if ja else "en"
        if rng.random() < 0.1:
            locale = "en" if ja else "ja-JP"  # language mismatch
        for k in range(rng.randint(1, 3)):
            rows.append(canonical(0, comparison_id=f"c{step}-{i}-{k}", prompt=prompt, response_a=a, response_b=b,
                                  annotator_id=f"ann-{rng.randint(0, 4)}", label=rng.choice("ab"), shown_first=rng.choice("ab"),
                                  locale=locale, tags=None))
    if old:
        for r in rng.sample(old, min(len(old), rng.randint(0, 3))):
            rows.append({**r, "comparison_id": f"redelivered-{step}-{r['comparison_id']}"})  # exact duplicates
        for r in rng.sample(old, min(len(old), rng.randint(0, 2))):
            rows.append({**r, "comparison_id": f"rejudged-{step}-{r['comparison_id']}", "annotator_id": "ann-late",
                         "shown_first": "b" if r["shown_first"] == "a" else "a"})  # an old pair judged again
        if rng.random() < 0.5:
            r = rng.choice(old)
            rows.append({**r, "comparison_id": f"conflict-{step}", "pair_id": f"given-{step}",
                         "response_b": "A different answer under the same given pair id."})
            rows.append({**r, "comparison_id": f"conflict-{step}-x", "pair_id": f"given-{step}"})
    return rows


def curate_chain(store: Store, seed: int, n_batches: int):
    """Curate ``n_batches`` random batches (``_batch``), each a child of the one before, into ``store``
    (batch files beside it); yields (batch path, version id, parent id or None) after each."""
    rng = random.Random(seed)
    parent, old = None, []
    for step in range(n_batches):
        rows = _batch(rng, step, old)
        old += rows
        path = write_jsonl(store.root.parent / f"b{step}.jsonl", rows)
        vid = curate([path], store, POLICY, parent=parent).version_id
        yield path, vid, parent
        parent = vid


def random_chains(max_examples: int, max_batches: int = 3) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A property test over random chains: ``(seed, n_batches)`` for :func:`curate_chain`, with the
    chain that once broke a child as an explicit example.  Each chain curates several versions
    (5-30 s of CPU a test), so ``./dev test`` draws half of ``max_examples`` (new seeds every run)
    and CI (``CI=true``) all of them."""
    drawn = max_examples if os.environ.get("CI", "").lower() in ("1", "true") else max(1, max_examples // 2)

    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        test = example(35, 3)(test)  # an old pair judged again whose old judgment duplicates another pair's
        test = given(st.integers(0, 10_000), st.integers(2, max_batches))(test)
        return settings(max_examples=drawn, deadline=None, phases=[Phase.explicit, Phase.generate],
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])(test)

    return wrap


@random_chains(5)
def test_child_checks_equal_a_run_over_the_union(tmp_path_factory, seed, n_batches):
    store = Store(tmp_path_factory.mktemp("inc") / "s")
    for _path, vid, parent in curate_chain(store, seed, n_batches):
        h = store.get(vid)
        if parent is not None:
            # the child took the merged path, and read texts only for its touched pairs ...
            assert all("incremental" in h.manifest().check(n).metrics for n in PAIR_SCOPED)
            assert h.manifest().lineage["union"]["texts"] == "touched pairs"
            # ... and equals the checks run over its whole judgments table
            judgments = h.read("judgments")
            full = run_checks(judgments, Policy().checks, pairs=_pairs(judgments))
            stored = h.read("flags")
            for name in PAIR_SCOPED:
                want = full[name].flags.sort("subject_kind", "subject_id", "reason", "detail")
                got = stored.filter(pl.col("check") == name).sort("subject_kind", "subject_id", "reason", "detail")
                assert got.equals(want), name
                m = h.manifest().check(name).metrics
                assert {k: m.get(k) for k in COMPARED[name]} == {k: full[name].metrics.get(k) for k in COMPARED[name]}, name
            # the checks with mergeable sums counted only the batch's pairs, and their state and the
            # figures computed from it equal a count over every judgment
            assert h.manifest().lineage["check_sums"]["mode"] == "incremental"
            assert h.manifest().lineage["check_sums"]["checks"] == sorted(declared_sums())  # none counted again
            for name, spec in declared_sums().items():
                want = full[name]
                if spec.params:  # counted with the parameters the child fixed (its parent's: the rule)
                    params = h.read(sums_params_table(name))
                    mine = params.join(store.get(parent).read(sums_params_table(name)), on="annotator_id", how="semi")
                    assert mine.equals(store.get(parent).read(sums_params_table(name))), name
                    counted = spec.count(judgments, params)
                    want = next(c for c in CHECKS if c.name == name).run(judgments, Policy().checks, sums=counted,
                                                                         sums_params=params)
                else:
                    counted = spec.count(judgments, POLICY.checks) if name == "length_bias" else spec.count(judgments)
                assert h.read(sums_table(name)).equals(counted), name
                m = h.manifest().check(name).metrics
                for k in SUMS_COMPARED[name] or want.metrics:
                    assert m[k] == want.metrics[k], (name, k)
                if name != "agreement":  # its per-pair flags read the consensus
                    order = ["subject_kind", "subject_id", "reason", "detail"]
                    assert stored.filter(pl.col("check") == name).sort(order).equals(want.flags.sort(order)), name
            # near duplicates extend the parent's state tables: the same flags, figures and clusters
            nd = full["near_duplicates"]
            order = ["subject_kind", "subject_id", "reason", "detail"]
            assert stored.filter(pl.col("check") == "near_duplicates").sort(order).equals(nd.flags.sort(order))
            m = h.manifest().check("near_duplicates").metrics
            assert {k: v for k, v in m.items() if k not in ND_RUN_ONLY} == \
                {k: v for k, v in nd.metrics.items() if k not in ND_RUN_ONLY}
            assert m["prompts_hashed"] < m["index_prompts"]  # the parent's prompts were not hashed again
            clusters = h.read("pairs", columns=["pair_id", "near_dup_cluster"]).sort("pair_id")
            assert clusters.equals(nd.tables["clusters"].join(clusters.select("pair_id"), on="pair_id", how="semi"))
            # the report's label counts: the parent's plus the batch's, equal to a count of every judgment
            assert h.read(LABEL_COUNTS).equals(label_counts(judgments))


def _pairs(judgments: pl.DataFrame) -> pl.DataFrame:
    from pipeline.aggregate import aggregate

    return aggregate(judgments).pairs


def test_only_pair_scoped_checks_take_the_merged_path():
    assert set(PAIR_SCOPED) <= {c.name for c in CHECKS}
    assert "near_duplicates" not in PAIR_SCOPED and "agreement" not in PAIR_SCOPED


def test_a_parent_state_of_another_format_is_counted_again(tmp_path, monkeypatch):
    """A child merges only into a parent's check state of the format its code counts: a parent
    whose recorded format differs (what a count means changed) makes the child count every judgment."""
    import pipeline.incremental as inc

    store = Store(tmp_path / "s")
    rng = random.Random(7)
    first = _batch(rng, 0, [])
    parent = curate([write_jsonl(tmp_path / "b0.jsonl", first)], store, POLICY).version_id
    assert store.get(parent).manifest().lineage["check_sums"]["formats"] == inc.sums_formats()
    second = write_jsonl(tmp_path / "b1.jsonl", _batch(rng, 1, first))
    newer = {**inc.sums_formats(), "agreement": "next"}
    monkeypatch.setattr(inc, "sums_formats", lambda: newer)
    h = store.get(curate([second], store, POLICY, parent=parent).version_id)
    judgments = h.read("judgments")
    assert h.manifest().lineage["check_sums"] == {"mode": "counted", "formats": newer,
                                                  "fitted_on": {"reliability": judgments.height}}
    for name, spec in declared_sums().items():
        assert h.read(sums_table(name)).equals(spec.count(judgments)), name
    monkeypatch.undo()  # the same batch on the same parent, formats equal: merged
    other = Store(tmp_path / "t")
    p2 = curate([tmp_path / "b0.jsonl"], other, POLICY).version_id
    assert other.get(curate([second], other, POLICY, parent=p2).version_id).manifest().lineage["check_sums"]["mode"] == "incremental"


def test_a_parent_preliminary_state_of_another_format_is_aggregated_again(tmp_path, monkeypatch):
    """A child keeps its parent's preliminary pairs and parameters only in the format its code decides
    pairs in (``preliminary_format`` in the lineage; 2: re-delivered copies do not vote): a parent of
    another format gets a child that aggregates every pair again."""
    import pipeline.incremental as inc

    rng = random.Random(11)
    first = _batch(rng, 0, [])
    write_jsonl(tmp_path / "b0.jsonl", first)
    second = write_jsonl(tmp_path / "b1.jsonl", _batch(rng, 1, first))
    out = {}
    for fmt in ("older", inc.PRELIM_FORMAT):
        store = Store(tmp_path / f"s-{fmt}")
        monkeypatch.setattr(inc, "PRELIM_FORMAT", fmt)  # what the parent records
        parent = curate([tmp_path / "b0.jsonl"], store, POLICY).version_id
        assert store.get(parent).manifest().lineage["preliminary_format"] == fmt
        monkeypatch.undo()
        h = store.get(curate([second], store, POLICY, parent=parent).version_id)
        out[fmt] = h.manifest().lineage["preliminary"]["mode"]
        assert h.manifest().lineage["preliminary_format"] == inc.PRELIM_FORMAT
    assert out == {"older": "recomputed", inc.PRELIM_FORMAT: "incremental"}


def test_a_child_drops_ids_repeated_in_its_batch_and_ids_its_parent_has(tmp_path):
    """A child's batch that repeats one of its own comparison ids and one of its parent's: the first is
    dropped as ``duplicate_comparison_id`` (the first copy kept), the second as ``already_in_parent``; the
    child's judgments are the parent's followed by the batch's other rows, in their order."""
    rng = random.Random(11)
    first = _batch(rng, 0, [])
    store = Store(tmp_path / "s")
    parent = store.get(curate([write_jsonl(tmp_path / "b0.jsonl", first)], store, POLICY).version_id)
    rows = _batch(rng, 1, first)
    again = {**rows[1], "label": "b" if rows[1]["label"] == "a" else "a"}  # same id, another verdict
    rows = [*rows[:3], again, {**first[0]}, *rows[3:]]
    child = store.get(curate([write_jsonl(tmp_path / "b1.jsonl", rows)], store, POLICY, parent=parent.version_id).version_id)
    dropped = child.manifest().ledger.judgments_dropped
    assert dropped.get("duplicate_comparison_id", 0) == parent.manifest().ledger.judgments_dropped.get("duplicate_comparison_id", 0) + 1
    assert dropped.get("already_in_parent", 0) == 1
    ids = child.read("judgments")["comparison_id"].to_list()
    assert ids[:parent.read("judgments").height] == parent.read("judgments")["comparison_id"].to_list()
    new = [r["comparison_id"] for i, r in enumerate(rows) if i not in (3, 4)]
    assert ids[parent.read("judgments").height:] == new
    kept = child.read("judgments").filter(pl.col("comparison_id") == rows[1]["comparison_id"])
    assert kept.height == 1 and kept["label"].item() == rows[1]["label"]  # the first copy


def test_reliability_parameters_are_refitted_once_the_judgments_outgrow_them(tmp_path):
    """The rule's bound (docs/incremental.md): a child keeps its parent's reliability parameters only while
    its judgments are at most 1 + checks.refit_growth times those they were fitted on; a child past that
    fits them again over every judgment (and its figures are then a full run's)."""
    from pipeline.checks import reliability

    policy = policy_from_dict({"certify": {"require_expectations": False}, "checks": {"refit_growth": 0.4}})
    store = Store(tmp_path / "s")
    rng = random.Random(7)
    parent, old, seen = None, [], set()
    for step in range(7):
        rows = _batch(rng, step, old)
        old += rows
        vid = curate([write_jsonl(tmp_path / f"b{step}.jsonl", rows)], store, policy, parent=parent).version_id
        h = store.get(vid)
        lineage = h.manifest().lineage["check_sums"]
        n = h.read("judgments").height
        if parent is None:
            assert lineage["fitted_on"] == {"reliability": n}
        else:
            before = store.get(parent).manifest().lineage["check_sums"]["fitted_on"]["reliability"]
            refit = n > 1.4 * before
            seen.add(refit)
            assert lineage["counted_again"] == (["reliability"] if refit else [])
            assert lineage["fitted_on"] == {"reliability": n if refit else before}
            if refit:  # fitted over every judgment: the figures of a run over them
                want = reliability.run(h.read("judgments"), policy.checks)  # its own Dawid-Skene fit too
                assert h.read("state/reliability_params").equals(want.tables["sums_params"])
                assert h.manifest().check("reliability").metrics == want.metrics
        parent = vid
    assert seen == {True, False}  # both paths were taken along the chain


def _same_as_reading_every_text(root, batches: list[list[dict]], monkeypatch, policy=POLICY) -> list[dict]:  # noqa: ANN001
    """Curate ``batches`` as a chain twice: a child reading its parent's judgments without their
    texts, and one reading every text; asserts they write the same tables, checks and ledger.
    Returns the narrow children's ``lineage.union``."""
    import pipeline.curate as cur

    narrow, wide = Store(root / "n"), Store(root / "w")
    parents: dict[str, str | None] = {"n": None, "w": None}
    unions = []
    for step, rows in enumerate(batches):
        path = write_jsonl(root / f"b{step}.jsonl", rows)
        a = curate([path], narrow, policy, parent=parents["n"]).version_id
        with monkeypatch.context() as m:
            m.setattr(cur.inc, "narrow_applies", lambda parent: False)
            b = curate([path], wide, policy, parent=parents["w"]).version_id
        assert a == b
        ma, mb = narrow.get(a).manifest(), wide.get(b).manifest()
        if step:
            assert ma.lineage["union"]["texts"] == "touched pairs" and mb.lineage["union"]["texts"] == "all"
            unions.append(ma.lineage["union"])
        # review_state carries the version's creation time (routed_at): compared without it
        assert {k: t.sha256 for k, t in ma.tables.items() if k != "review_state"} == \
            {k: t.sha256 for k, t in mb.tables.items() if k != "review_state"}
        assert ma.checks == mb.checks and ma.ledger == mb.ledger
        times = pl.selectors.datetime()
        assert narrow.get(a).read("review_state").drop(times).equals(wide.get(b).read("review_state").drop(times))
        parents = {"n": a, "w": b}
    return unions


@random_chains(4)
def test_a_child_that_reads_no_history_texts_writes_the_same_version(tmp_path_factory, monkeypatch, seed, n_batches):
    """A child reads its parent's judgments without their texts and takes them only for the rows
    of the pairs its batch touches (and, when asked, for other pairs by a filtered read): every
    table it writes is the one a child that read every text writes (the same parts, the same bytes)."""
    rng = random.Random(seed)
    old: list[dict] = []
    batches = []
    for step in range(n_batches):
        batches.append(_batch(rng, step, old))
        old += batches[-1]
    _same_as_reading_every_text(tmp_path_factory.mktemp("narrow"), batches, monkeypatch)


def test_an_old_pair_judged_again_takes_its_texts_from_the_one_read(tmp_path, monkeypatch):
    """The batch judges an old pair again: its two old rows' texts come from the one read of the
    parent's judgments (the rows near the batch), not from a second read; the next batch brings only
    new pairs and prompts, and no old row is near it."""
    base = dict(response_a="Answer one.", response_b="Answer two.", label="a", shown_first="a", locale="en", tags=None)
    parent = [canonical(0, comparison_id="c1", prompt="Prompt X?", annotator_id="ann-0", **base),
              canonical(0, comparison_id="c2", prompt="Prompt X?", annotator_id="ann-1", **base),
              canonical(0, comparison_id="c3", prompt="Prompt Z?", annotator_id="ann-2", **base)]
    again = [canonical(0, comparison_id="c4", prompt="Prompt X?", annotator_id="ann-3", **base)]
    fresh = [canonical(0, comparison_id="c5", prompt="Prompt W?", annotator_id="ann-3", **base)]
    first, second = _same_as_reading_every_text(tmp_path, [parent, again, fresh], monkeypatch)
    assert first["parent_rows_with_texts"] == 2 and not first["read_again"]
    assert second["parent_rows_with_texts"] == 0 and not second["read_again"]


def test_a_touched_pair_reached_through_a_conflicting_given_id_is_read_again(tmp_path, monkeypatch):
    """The child's batch judges given pair G again (prompt X). In the parent, G also names a
    judgment of prompt Y, whose prompt and responses are those of another pair D: D is touched
    too, but neither its id nor its prompt is in the batch, so the one read of the parent's
    judgments did not keep its texts -- they are read again, and the child is still exact."""
    base = dict(response_a="Answer one.", response_b="Answer two.", label="a", shown_first="a", locale="en", tags=None)
    parent = [canonical(0, comparison_id="c1", pair_id="G", prompt="Prompt X?", annotator_id="ann-0", **base),
              canonical(0, comparison_id="c2", pair_id="G", prompt="Prompt Y?", annotator_id="ann-1", **base),
              canonical(0, comparison_id="c3", prompt="Prompt Y?", annotator_id="ann-2", **base)]
    child = [canonical(0, comparison_id="c4", pair_id="G", prompt="Prompt X?", annotator_id="ann-3", **base)]
    [union] = _same_as_reading_every_text(tmp_path, [parent, child], monkeypatch)
    assert union["read_again"] and union["touched_pairs"] == 2


def test_aligned_chunks_every_column_as_the_first_and_keeps_the_values():
    """A frame whose columns are chunked differently is copied whole by the next expression
    evaluated on it (measured: +0.9 GB on the 3M union): ``aligned`` re-chunks the odd columns."""
    from pipeline.incremental import aligned

    a = pl.concat([pl.DataFrame({"x": [1, 2], "y": ["a", "b"], "z": [None, None]}),
                   pl.DataFrame({"x": [3], "y": ["c"], "z": [None]})], rechunk=False)
    odd = a.with_columns(y=pl.Series(["p", "q", "r"]))
    assert odd["y"].chunk_lengths() == [3]
    fixed = aligned(odd)
    assert [fixed[c].chunk_lengths() for c in fixed.columns] == [[2, 1]] * 3 and fixed.equals(odd)
    ok = a.drop("z")  # (a Null-typed column is one chunk whatever its frame)
    assert aligned(ok) is ok


def test_a_child_reads_the_judgments_texts_only_when_its_batch_is_near_old_rows(tmp_path, monkeypatch):
    """A child reads every row of its parent's judgments from the judgment rows table (no texts:
    a fraction of the bytes to hash); the judgments' own part is read only when some old row
    shares a pair or a prompt with the batch -- and both children equal a child reading every text."""
    from pipeline.store import VersionHandle

    base = dict(response_a="Answer one.", response_b="Answer two.", label="a", shown_first="a", locale="en", tags=None)
    parent = [canonical(0, comparison_id=f"c{i}", prompt=f"Prompt {i}?", annotator_id=f"ann-{i}", **base) for i in range(4)]
    fresh = [canonical(0, comparison_id="c8", prompt="Prompt W?", annotator_id="ann-3", **base)]
    again = [canonical(0, comparison_id="c9", prompt="Prompt 1?", annotator_id="ann-3", **base)]
    read: list[str] = []  # what the children of the narrow chain (store "n") read
    real = VersionHandle.read_bytes
    monkeypatch.setattr(VersionHandle, "read_bytes", lambda self, rel: (read.append(str(self.path / rel)), real(self, rel))[1])
    # (a child's passes over its parent's parts are tasks: each checks its part's sha256 before it reads it)
    from pipeline import distributed

    checked = distributed._sha256_of
    monkeypatch.setattr(distributed, "_sha256_of", lambda path: (read.append(str(path)), checked(path))[1])
    for root, batch, texts in ((tmp_path / "fresh", fresh, False), (tmp_path / "again", again, True)):
        read.clear()
        root.mkdir()
        _same_as_reading_every_text(root, [parent, batch], monkeypatch)
        mine = [r.split("/versions/", 1)[1].split("/", 1)[1] for r in read if r.startswith(f"{root}/n/versions/")]
        assert any(r.startswith(f"{JUDGMENT_ROWS}/") for r in mine)
        assert any(r.startswith("judgments/") for r in mine) == texts, mine


def test_a_parent_without_judgment_rows_gets_a_child_that_writes_every_row(tmp_path, monkeypatch):
    """A parent written before the judgment rows table (older code): its child reads the
    judgments and writes the table with every row; the grandchild reads it."""
    from pipeline.store import VersionHandle

    rng = random.Random(21)
    store = Store(tmp_path / "s")
    old: list[dict] = []
    ids = []
    for step in range(3):
        rows = _batch(rng, step, old)
        old += rows
        parent = ids[-1] if ids else None
        with monkeypatch.context() as m:
            if step == 1:  # the first version as older code wrote it
                real = VersionHandle.table
                m.setattr(VersionHandle, "table", lambda self, name: None if name == JUDGMENT_ROWS else real(self, name))
            ids.append(curate([write_jsonl(tmp_path / f"b{step}.jsonl", rows)], store, POLICY, parent=parent).version_id)
    for vid in ids:
        h = store.get(vid)
        assert h.read(JUDGMENT_ROWS).equals(judgment_rows(h.read("judgments")))
    assert len(store.get(ids[1]).manifest().tables[JUDGMENT_ROWS].parts) == 1  # every row in the child's own part


def test_a_child_holds_some_columns_for_the_rows_it_aggregates_only(tmp_path, monkeypatch):
    """A child's union lacks the columns only aggregation and select read (display order,
    strength, models, tags, response hashes) for its parent's rows; the stages that read them
    complete the rows they take. Here an escalated pair gets one review in the first child and
    another in the second: the second resolves it from both reviews' strengths, the first
    review's taken from the rows of the batch's pair read whole -- and writes what a child that
    read every column writes."""
    base = dict(response_a="Answer one.", response_b="Answer two.", locale="en", tags=None)
    parent = [canonical(0, comparison_id="c1", pair_id="X", prompt="Prompt X?", annotator_id="ann-0", label="escalate", **base),
              canonical(0, comparison_id="c2", pair_id="X", prompt="Prompt X?", annotator_id="ann-1", label="escalate", **base),
              canonical(0, comparison_id="c3", prompt="Prompt Y?", annotator_id="ann-0", label="a", shown_first="b", **base),
              canonical(0, comparison_id="c4", prompt="Prompt Y?", annotator_id="ann-1", label="a", strength=0.1, **base)]
    review = dict(review_of="X", pair_id="X", prompt="Prompt X?", label="a", **base)
    first = [canonical(0, comparison_id="r1", annotator_id="rev-10", strength=0.9, **review)]
    second = [canonical(0, comparison_id="r2", annotator_id="rev-11", strength=0.2, **review),
              canonical(0, comparison_id="c5", prompt="Prompt W?", annotator_id="ann-2", **base)]
    unions = _same_as_reading_every_text(tmp_path, [parent, first, second], monkeypatch)
    assert all(u["deferred"] == ["model_a", "model_b", "shown_first", "strength", "confidence", "tags", "a_hash", "b_hash",
                                 "label", "annotator_kind", "locale", "created_at"] for u in unions)
    # the parent's review is a row of the batch's pair: read whole with the union, not read again to complete it
    assert unions[1]["rows_completed"] == 0
    store = Store(tmp_path / "n")
    last = max((store.get(v) for v in store.list_ids()), key=lambda h: h.manifest().created_at)
    pairs = last.read("pairs")
    assert pairs.filter(pl.col("pair_id") == "X")["strength"].item() == pytest.approx(0.55)


def test_a_child_with_a_registry_classifies_its_reviews_from_completed_rows(tmp_path, monkeypatch):
    """With an annotator registry a review's status reads its judge's kind and locale -- columns a child's union
    lacks for its parent's rows: a child takes them for the review rows only, and writes what a child that read
    every column writes (a qualified review resolves the pair, an unqualified one and an AI judge's do not)."""
    from schemas.registry import load_registry

    reg = tmp_path / "annotators.csv"
    reg.write_text("annotator_id,annotator_kind,locales,rubrics,qualified_from,qualified_until\n"
                   "rev-10,human,en,,,\nrev-11,human,ja,,,\njudge-1,ai,,,,\n"
                   + "".join(f"ann-{i},human,en;ja-JP,,,\n" for i in range(3)))
    policy = policy_from_dict({"certify": {"require_expectations": False}, "checks": {"refit_growth": 1000.0},
                               "annotators": load_registry(reg).model_dump(mode="json")})
    base = dict(response_a="Answer one.", response_b="Answer two.", locale="en", tags=None)
    parent = [canonical(0, comparison_id="c1", pair_id="X", prompt="Prompt X?", annotator_id="ann-0", label="escalate", **base),
              canonical(0, comparison_id="c2", pair_id="X", prompt="Prompt X?", annotator_id="ann-1", label="escalate", **base),
              canonical(0, comparison_id="c3", prompt="Prompt Y?", annotator_id="ann-0", label="a", **base),
              canonical(0, comparison_id="c4", prompt="Prompt Y?", annotator_id="ann-1", label="b", **base)]
    review = dict(review_of="X", pair_id="X", prompt="Prompt X?", label="a", **base)
    first = [canonical(0, comparison_id="r1", annotator_id="rev-11", **review),  # not qualified for en
             canonical(0, comparison_id="r2", annotator_id="judge-1", annotator_kind="ai", **review)]
    second = [canonical(0, comparison_id="r3", annotator_id="rev-10", **review),  # qualified: resolves X
              canonical(0, comparison_id="c5", prompt="Prompt W?", annotator_id="ann-2", **base)]
    _same_as_reading_every_text(tmp_path, [parent, first, second], monkeypatch, policy)
    store = Store(tmp_path / "n")
    chain = sorted((store.get(v) for v in store.list_ids()), key=lambda h: h.manifest().created_at)
    statuses = [h.manifest().check("reviews").metrics["by_status"] for h in chain]
    assert statuses[1]["unqualified"] == 1 and statuses[1]["not_human"] == 1
    assert statuses[2]["qualified"] == 1 and statuses[2]["unqualified"] == 1
    assert chain[2].read("pairs").filter(pl.col("pair_id") == "X")["label_consensus"].item() == "a"


def test_a_childs_review_whose_texts_differ_from_its_pair_is_compared_on_completed_rows(tmp_path, monkeypatch):
    """A review names a parent's pair but carries other responses: its response hashes, and its pair's first
    judgment's, are columns a child's union lacks for its parent's rows -- taken for those rows, the review gets its
    own pair id and is flagged, as in a child that read every column; a repeated comparison id of the batch is left out
    before (the first copy kept)."""
    base = dict(response_a="Answer one.", response_b="Answer two.", locale="en", tags=None)
    parent = [canonical(0, comparison_id="c1", pair_id="X", prompt="Prompt X?", annotator_id="ann-0", label="escalate", **base),
              canonical(0, comparison_id="c2", pair_id="X", prompt="Prompt X?", annotator_id="ann-1", label="escalate", **base),
              canonical(0, comparison_id="c3", prompt="Prompt Y?", annotator_id="ann-0", label="a", **base)]
    other = {**base, "response_b": "Another answer entirely."}
    child = [canonical(0, comparison_id="r1", annotator_id="rev-10", review_of="X", pair_id="X", prompt="Prompt X?",
                       label="a", **other),
             canonical(0, comparison_id="r2", annotator_id="rev-11", review_of="X", pair_id="X", prompt="Prompt X?",
                       label="b", **base),
             canonical(0, comparison_id="r1", annotator_id="rev-12", review_of="X", pair_id="X", prompt="Prompt X?",
                       label="b", **base)]  # (r1 again: dropped as a repeated id)
    _same_as_reading_every_text(tmp_path, [parent, child], monkeypatch)
    store = Store(tmp_path / "n")
    last = max((store.get(v) for v in store.list_ids()), key=lambda h: h.manifest().created_at)
    assert last.manifest().check("reviews").metrics["by_status"]["text_mismatch"] == 1
    assert last.manifest().ledger.judgments_dropped.get("duplicate_comparison_id") == 1
    mine = last.read("judgments").filter(pl.col("comparison_id") == "r1")
    assert mine.height == 1 and mine["pair_id"].item() != "X" and mine["annotator_id"].item() == "rev-10"


def test_a_child_whose_history_has_dimension_verdicts_completes_every_row_for_the_checks(tmp_path, monkeypatch):
    """The dimensions check reads every judgment with a dimension, display order included: a child
    whose union has dimension verdicts completes every row before the checks run, and writes what a
    child that read every column writes (the per-dimension position figures among them)."""
    def rows(start: int, n: int) -> list[dict]:
        return [canonical(i, annotator_id=f"ann-{i % 3}", shown_first="ab"[i % 2], label="ab"[(i // 2) % 2],
                          dimensions={"helpfulness": "ab"[i % 2], "safety": "a"}, prompt=f"Prompt {i // 3}?")
                for i in range(start, start + n)]

    unions = _same_as_reading_every_text(tmp_path, [rows(0, 24), rows(24, 6)], monkeypatch)
    assert unions[0]["rows_completed"] >= 24  # every parent row, for the checks


def test_a_child_that_refits_a_check_completes_every_row_for_it(tmp_path, monkeypatch):
    """A child with many more judgments than its parent's reliability parameters were fitted on
    counts that check again over every judgment (the refit bound): every row is completed first
    (the display order feeds the order-aware fit), and the child writes what one that read every
    column writes."""
    def rows(start: int, n: int) -> list[dict]:
        return [canonical(i, annotator_id=f"ann-{i % 4}", shown_first="ab"[(i // 3) % 2], label="ab"[(i * 7 // 3) % 2],
                          prompt=f"Prompt {i // 4}?", tags=None) for i in range(start, start + n)]

    refits = policy_from_dict({"certify": {"require_expectations": False}})  # the default bound (0.1)
    unions = _same_as_reading_every_text(tmp_path, [rows(0, 16), rows(16, 48)], monkeypatch, refits)
    store = Store(tmp_path / "n")
    child = max((store.get(v) for v in store.list_ids()), key=lambda h: h.manifest().created_at)
    assert "reliability" in child.manifest().lineage["check_sums"]["counted_again"]
    assert unions[0]["rows_completed"] >= 16


def test_the_completer_reads_a_parent_row_once_and_a_batch_row_never(tmp_path):
    """Rows without the deferred columns get the parent's values (read by comparison id, kept for
    the next call) or the batch's (never read), in the rows' order; an id the parent lacks is a
    damaged version, not a row of nulls."""
    from pipeline.incremental import DEFERRED, Completer
    from pipeline.store import DamagedVersion

    store = Store(tmp_path / "s")
    rows = [canonical(i, shown_first="ab"[i % 2], strength=i / 10, tags=[f"t{i}"]) for i in range(6)]
    parent = store.get(curate([write_jsonl(tmp_path / "a.jsonl", rows)], store, POLICY).version_id)
    full = parent.read("judgments").drop("prompt", "prompt_text", "response_a", "response_b")
    batch = full.slice(0, 2).with_columns(comparison_id=pl.Series(["n-1", "n-2"]), strength=pl.Series([0.11, 0.22]))
    done = Completer(parent, batch, full.columns)
    narrow = pl.concat([full, batch]).drop(DEFERRED)
    wanted = narrow[[4, 1, 6]]  # two parent rows, one batch row
    got = done(wanted)
    assert got.columns == full.columns
    assert got.equals(pl.concat([full[[4, 1]], batch[[0]]]))
    assert (done.reads, done.rows_read) == (1, 2)
    assert done(narrow[[1, 7]]).equals(pl.concat([full[[1]], batch[[1]]])) and done.reads == 1  # known or the batch's: no read
    assert done(narrow[[0]])["strength"].to_list() == [0.0] and done.reads == 2
    with pytest.raises(DamagedVersion, match="comparison ids"):
        done(narrow[[0]].with_columns(comparison_id=pl.lit("nowhere")))


def test_a_new_check_that_reads_every_judgment_gets_every_column_in_a_child(tmp_path, monkeypatch):
    """A check added without declaring the judgment columns it reads may read any of them: a child
    completes every row of its union before it runs, so its figures are those over every judgment."""
    import pipeline.checks as checks
    from pipeline.checks.spec import CheckSpec
    from schemas.check import CheckResult

    def run(judgments, cfg):  # noqa: ANN001, ARG001
        return CheckResult(name="first_shown", status="pass", metrics={"a_first": int((judgments["shown_first"] == "a").sum())})

    monkeypatch.setattr(checks, "CHECKS", (*checks.CHECKS, CheckSpec(name="first_shown", run=run, inputs=())))
    monkeypatch.setattr(checks, "REASONS", checks._reasons())
    rows = [canonical(i, shown_first="ab"[i % 3 == 0], prompt=f"Prompt {i // 2}?") for i in range(12)]
    store = Store(tmp_path / "s")
    v1 = curate([write_jsonl(tmp_path / "a.jsonl", rows[:8])], store, POLICY).version_id
    v2 = curate([write_jsonl(tmp_path / "b.jsonl", rows[8:])], store, POLICY, parent=v1).version_id
    m = store.get(v2).manifest()
    assert m.lineage["union"]["deferred"] and m.lineage["union"]["rows_completed"] >= 8
    assert next(c for c in m.checks if c.name == "first_shown").metrics["a_first"] == sum(r["shown_first"] == "a" for r in rows)


def test_a_child_reads_its_parents_near_duplicate_state_once_while_it_reads_the_union(tmp_path, monkeypatch):
    """The parent's near-duplicate state is read on a thread of its own from the start of the
    build (it depends on the parent only), and the check takes that read: one read per child."""
    import threading

    import pipeline.incremental as inc

    calls = []
    real = inc.nds.load_state

    def counted(parent, cfg=None):  # noqa: ANN001, ANN202
        calls.append(threading.current_thread().name)
        return real(parent, cfg)

    monkeypatch.setattr(inc.nds, "load_state", counted)
    rows = [canonical(i, prompt=f"Prompt {i // 2}?") for i in range(10)]
    store = Store(tmp_path / "s")
    v1 = curate([write_jsonl(tmp_path / "a.jsonl", rows[:6])], store, POLICY).version_id
    assert calls == []  # a first version builds its state from its judgments
    curate([write_jsonl(tmp_path / "b.jsonl", rows[6:])], store, POLICY, parent=v1)
    assert len(calls) == 1 and calls[0].startswith("prefpipe-state")


def test_a_childs_near_duplicate_state_is_released_after_its_check(tmp_path, monkeypatch):
    """The parent's near-duplicate state, read on its own thread from before the ingest, is handed
    down to the check and freed after it: no caller's frame keeps it through select (at 3M
    judgments it is ~0.3 GB; kept, the child's peak went over 2 GB)."""
    import gc
    import weakref

    import pipeline.curate as cur
    import pipeline.incremental as inc

    refs: list[weakref.ref] = []
    real_load, real_select = inc.nds.load_state, cur.sel.select_pairs

    def load(parent, cfg=None):  # noqa: ANN001, ANN202
        state = real_load(parent, cfg)
        refs.append(weakref.ref(state))
        return state

    alive_at_select: list[bool] = []

    def select(*a, **k):  # noqa: ANN002, ANN003, ANN202
        gc.collect()
        alive_at_select.append(any(r() is not None for r in refs))
        return real_select(*a, **k)

    monkeypatch.setattr(inc.nds, "load_state", load)
    monkeypatch.setattr(cur.sel, "select_pairs", select)
    rows = [canonical(i, prompt=f"Prompt {i // 2}?") for i in range(10)]
    store = Store(tmp_path / "s")
    v1 = curate([write_jsonl(tmp_path / "a.jsonl", rows[:6])], store, POLICY).version_id
    alive_at_select.clear()
    curate([write_jsonl(tmp_path / "b.jsonl", rows[6:])], store, POLICY, parent=v1)
    assert len(refs) == 1 and alive_at_select == [False]


def test_a_parent_of_other_code_has_its_language_rows_counted_part_by_part(tmp_path, monkeypatch):
    """A parent made by other code: its language figures are not taken (what they mean may differ), its state rows
    are -- counted one part at a time (the whole table is not held: ``merged_state`` is not called for it) -- and
    the child's flags, figures and state table equal those of a child whose parent's code is its own."""
    import pipeline.incremental as inc

    rng = random.Random(5)
    batches, old = [], []
    for step in range(3):
        batches.append(_batch(rng, step, old))
        old += batches[-1]
    paths = [write_jsonl(tmp_path / f"b{step}.jsonl", rows) for step, rows in enumerate(batches)]
    same, other = Store(tmp_path / "same"), Store(tmp_path / "other")
    whole = inc.merged_state

    def merged_state(parent, name, touched, rows):  # noqa: ANN001, ANN202
        assert name != "language", "the language rows were merged whole"
        return whole(parent, name, touched, rows)

    parents: dict[str, str | None] = {"same": None, "other": None}
    for step, path in enumerate(paths):
        parents["same"] = curate([path], same, POLICY, parent=parents["same"]).version_id
        with monkeypatch.context() as m:
            if step:
                m.setattr(inc, "code_version", lambda: "0.0.0+other")
                m.setattr(inc, "merged_state", merged_state)
            parents["other"] = curate([path], other, POLICY, parent=parents["other"]).version_id
        assert parents["same"] == parents["other"]  # (the version id's code is the module's own)
        a, b = same.get(parents["same"]), other.get(parents["other"])
        assert a.manifest().check("language") == b.manifest().check("language")
        order = ["subject_kind", "subject_id", "reason", "detail"]
        assert a.read("flags").sort(order).equals(b.read("flags").sort(order))
        assert a.read("state/language").sort("pair_id", "part").equals(b.read("state/language").sort("pair_id", "part"))
        if step:
            assert a.manifest().check("language").metrics["pairs_checked"] == a.read("state/language")["pair_id"].n_unique()
