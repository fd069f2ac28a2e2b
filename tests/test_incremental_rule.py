"""The consensus rule of a child against a full recompute (`curate --full`) of the same inputs.

A child recomputes a pair when its judgments change, when one of its judgments' flags changes
or when an annotator of the pair changes status; every other pair keeps its parent's row
(docs/incremental.md); recomputed pairs are aggregated with the parent's annotator parameters
fixed (annotators new to the parent fitted with those fixed).  On random chains: flags and the
annotator table's statistics equal the --full child exactly; its parameter columns are the
parameters the child keeps, its parent's for every annotator the parent has them for; pairs kept
from the parent equal the parent's rows exactly; recomputed pairs equal the --full child's row in
every column the parameters do not enter, and in those equal an aggregation of their kept judgments
with the child's parameters; and a pair differs from --full only where one of its annotators'
parameters differs from the --full child's.
"""
from __future__ import annotations

import random

import polars as pl
import pytest
from hypothesis import example
from conftest import write_jsonl
from test_incremental import POLICY, _batch, curate_chain, random_chains

from pipeline.aggregate import aggregate, annotator_table
from pipeline.checks import all_flags, run_checks
from pipeline.curate import curate
from pipeline.checks import reliability
from pipeline.checks.agreement import ratings
from pipeline.incremental import PARAMS_TABLE, PRELIM_PARAMS, PRELIM_TABLE, pairs_to_recompute, sums_params_table
from pipeline.store import SPLITS, Store

ORDER = ["check", "subject_kind", "subject_id", "reason", "detail"]
# columns of a pair the annotator parameters enter (and select's, which follow from them)
PARAMETER_COLUMNS = ["label_human", "label_ai", "label_consensus", "p_a_weighted", "agreement", "strength", "dimensions"]
SELECT_COLUMNS = ["decision", "reason", "weight"]
# the checks that read the preliminary consensus (its labels, agreement, strength), or (reliability) the
# parameters the rule fixes
CONSENSUS_CHECKS = ["agreement", "routing", "consensus", "length_bias", "reliability"]
# the annotator table's columns reliability computes with those parameters (status: its insufficient_data)
RULE_ANNOTATOR_COLUMNS = ["agreement_with_consensus", "loo_n", "loo_chance", "reliability_p_value", "status"]
PARAM_ANNOTATOR_COLUMNS = {"ds_accuracy": "ds_accuracy", "accuracy_better_first": "oa_alpha",
                           "accuracy_better_second": "oa_beta", "order_engagement": "oa_engaged"}


def _pairs(h) -> pl.DataFrame:
    return h.read("pairs").drop("first_version").sort("pair_id")


def _kept_values(parent: pl.DataFrame, child: pl.DataFrame,
                 cols: tuple[str, ...] = ("ds_accuracy", "oa_alpha", "oa_beta", "oa_engaged", "oa_factor")) -> bool:
    """Every annotator of the parent's parameters is in the child's, with each value the parent had."""
    both = parent.join(child, on="annotator_id", suffix="_child")
    return both.height == parent.height and all(
        both.filter(pl.col(c).is_not_null() & pl.col(c).ne_missing(pl.col(f"{c}_child"))).height == 0 for c in cols)


def _moved(params: pl.DataFrame, full: pl.DataFrame) -> pl.Series:
    """Annotators whose parameters differ from those of the --full child."""
    return params.join(full, on="annotator_id", how="full", coalesce=True, suffix="_full").filter(
        pl.any_horizontal([pl.col(c).ne_missing(pl.col(f"{c}_full"))
                           for c in ("ds_accuracy", "oa_alpha", "oa_beta", "oa_factor")]))["annotator_id"]


def _reach(union: pl.DataFrame, annotators: pl.Series) -> pl.DataFrame:
    """The pairs these annotators judged."""
    return union.filter(pl.col("annotator_id").is_in(annotators.implode())).select("pair_id").unique()


def _differ(mine: pl.DataFrame, full: pl.DataFrame, cols: list[str]) -> pl.DataFrame:
    """The pairs whose ``cols`` differ between two tables of rows."""
    both = mine.join(full, on="pair_id", suffix="_full")
    return both.filter(pl.any_horizontal([pl.col(c).ne_missing(pl.col(f"{c}_full")) for c in cols])).select("pair_id")


@random_chains(4)
@example(4773, 3)  # a parent none of whose pairs is kept: no split assignments to carry
def test_child_equals_full_recompute_except_by_the_rule(tmp_path_factory, seed, n_batches):
    store = Store(tmp_path_factory.mktemp("rule") / "s")
    for path, vid, parent in curate_chain(store, seed, n_batches):
        if parent is None:
            continue
        full_id = curate([path], store, POLICY, parent=parent, full=True).version_id
        assert full_id != vid
        h, f, p = store.get(vid), store.get(full_id), store.get(parent)
        assert f.manifest().parent_version == parent and f.manifest().lineage["consensus"]["mode"] == "full"
        rule = h.manifest().lineage["consensus"]
        assert rule["mode"] == "incremental"
        pj = p.read("judgments")  # the parent's rows first (a folder reads its parts in name order)
        union = pl.concat([pj, h.read("judgments").join(pj.select("comparison_id"), on="comparison_id", how="anti")])
        # the preliminary consensus under the rule: pairs without a new judgment keep the parent's row, the
        # others are an aggregation of their judgments with the child's preliminary parameters (the parent's
        # where it had them); a row differs from --full only where one of its annotators' parameters does
        prelim, prelim_full = h.read(PRELIM_TABLE).sort("seen"), f.read(PRELIM_TABLE).sort("seen")
        assert prelim.drop("seen").sort("pair_id").drop("dimensions").columns == \
            prelim_full.drop("seen").sort("pair_id").drop("dimensions").columns
        assert prelim["pair_id"].equals(prelim_full["pair_id"])  # the same pairs in first-seen order
        touched = union.slice(pj.height)["pair_id"].unique().to_frame("pair_id")
        pp, pp_parent = h.read(PRELIM_PARAMS), p.read(PRELIM_PARAMS)
        assert _kept_values(pp_parent, pp)
        prelim_rule = h.manifest().lineage["preliminary"]
        assert prelim_rule["mode"] == "incremental" and prelim_rule["pairs_recomputed"] == touched.height
        assert prelim.join(touched, on="pair_id", how="anti").equals(
            p.read(PRELIM_TABLE).sort("seen").join(touched, on="pair_id", how="anti"))
        mine_rows = union.join(touched, on="pair_id", how="semi")  # (re-delivered copies do not vote: per pair)
        ref = aggregate(mine_rows, POLICY.checks.aggregation, params=pp, rated=ratings(mine_rows))
        mine_pre = prelim.join(touched, on="pair_id", how="semi").sort("pair_id")
        mine_pre = mine_pre.drop("a_hash", "seen", "first_version")
        # the lengths: the first judgment's responses, in the pair's canonical orientation
        ref_pairs = ref.pairs.sort("pair_id").with_columns(len_a=pl.col("response_a").str.len_chars().cast(pl.Int64),
                                                             len_b=pl.col("response_b").str.len_chars().cast(pl.Int64))
        assert ref_pairs.select(mine_pre.columns).equals(mine_pre)
        cols = [c for c in PARAMETER_COLUMNS if c != "dimensions"]
        assert _differ(prelim, prelim_full, cols).join(_reach(union, _moved(pp, f.read(PRELIM_PARAMS))), on="pair_id",
                                                       how="anti").height == 0
        # the checks are exact given that consensus: a run of every check over the union with the child's
        # preliminary pairs gives the child's flags and annotator statistics ...
        rp = h.read(sums_params_table("reliability"))  # the parent's, and fitted for annotators new to it
        assert _kept_values(p.read(sums_params_table("reliability")), rp, ("ds_accuracy", "independence"))
        results = run_checks(union, POLICY.checks, pairs=prelim.drop("a_hash", "seen"), extra_kwargs={
            "registry": {"registry": POLICY.annotators},
            "reliability": {"sums": reliability.count_sums(union, rp), "sums_params": rp}})
        flags, flags_full = h.read("flags").sort(ORDER), f.read("flags").sort(ORDER)
        assert flags.equals(all_flags(results).sort(ORDER))
        ann = h.read("annotators")
        assert ann.drop(*PARAM_ANNOTATOR_COLUMNS).equals(annotator_table(results, ann.select(
            "annotator_id", *PARAM_ANNOTATOR_COLUMNS)).drop(*PARAM_ANNOTATOR_COLUMNS))
        # ... and those that do not read the consensus are exact against --full
        free = ~pl.col("check").is_in(CONSENSUS_CHECKS)
        assert flags.filter(free).equals(flags_full.filter(free))
        flag_diff = pl.concat([flags.join(flags_full, on=ORDER, how="anti"), flags_full.join(flags, on=ORDER, how="anti")])
        if flag_diff.height == 0:  # the same flags: the same annotator statistics (but those under the rule)
            assert ann.drop(*PARAM_ANNOTATOR_COLUMNS, *RULE_ANNOTATOR_COLUMNS).equals(
                f.read("annotators").drop(*PARAM_ANNOTATOR_COLUMNS, *RULE_ANNOTATOR_COLUMNS))
        # the pairs a flag difference reaches (its judgment, or every judgment of its annotator)
        by_flags = union.filter(
            pl.col("comparison_id").is_in(flag_diff.filter(pl.col("subject_kind") == "judgment")["subject_id"].implode())
            | pl.col("annotator_id").is_in(flag_diff.filter(pl.col("subject_kind") == "annotator")["subject_id"].implode())
            | pl.col("pair_id").is_in(flag_diff.filter(pl.col("subject_kind") == "pair")["subject_id"].implode())
        ).select("pair_id").unique()
        params, parent_params = h.read(PARAMS_TABLE), p.read(PARAMS_TABLE)
        assert ann.select("annotator_id", *PARAM_ANNOTATOR_COLUMNS).equals(
            ann.select("annotator_id").join(params, on="annotator_id", how="left")
            .select("annotator_id", **{k: v for k, v in PARAM_ANNOTATOR_COLUMNS.items()}))
        assert _kept_values(parent_params, params)
        mine, want, before = _pairs(h), _pairs(f), _pairs(p)
        if flag_diff.height == 0:  # the same flags: the same pairs have kept judgments
            assert mine["pair_id"].equals(want["pair_id"])
        recompute = pairs_to_recompute(union, pj.height, p.read("flags"), h.read("flags"))
        untouched = before.join(recompute.to_frame("pair_id"), on="pair_id", how="anti").select("pair_id")
        assert rule["pairs_from_parent"] == untouched.join(mine, on="pair_id", how="semi").height
        assert rule["pairs_recomputed"] + rule["pairs_from_parent"] == mine.height
        # pairs kept from the parent are the parent's rows (what select adds may follow new flags or clusters) ...
        record = [c for c in mine.columns if c not in ("decision", "reason", "weight", "near_dup_cluster", "flag_reasons")]
        assert mine.join(untouched, on="pair_id", how="semi").select(record).equals(
            before.join(mine.select("pair_id"), on="pair_id", how="semi").join(untouched, on="pair_id", how="semi")
            .select(record))
        # ... every other pair is the full recompute's row where the parameters do not enter (unless a
        # flag that differs from --full's reaches it: then its kept judgments may differ) ...
        fresh, fresh_full = (x.join(untouched, on="pair_id", how="anti").join(by_flags, on="pair_id", how="anti")
                             for x in (mine, want))
        assert fresh.drop(*PARAMETER_COLUMNS, *SELECT_COLUMNS).equals(fresh_full.drop(*PARAMETER_COLUMNS, *SELECT_COLUMNS))
        fresh = mine.join(untouched, on="pair_id", how="anti")
        # ... and where they enter, an aggregation of its kept judgments with the child's parameters
        ids = fresh.select("pair_id", cid="source_comparison_ids").explode("cid")
        kept_j = union.join(ids.select(comparison_id="cid"), on="comparison_id", how="semi")
        ref = aggregate(kept_j, POLICY.checks.aggregation, params=params).pairs.sort("pair_id")
        assert ref.select("pair_id", *cols).equals(fresh.select("pair_id", *cols))
        # the distance to --full, bounded: given the parameters a pair's consensus depends on its own
        # judgments only, so a pair differs from --full only where one of its annotators' parameters does
        # (or a flag that differs from --full's reaches it)
        reach = pl.concat([_reach(union, _moved(params, f.read(PARAMS_TABLE))), by_flags]).unique()
        assert _differ(mine, want, cols).join(reach, on="pair_id", how="anti").height == 0
        # sticky splits hold on both paths: a pair assigned in the parent never leaves test, never enters train
        prior = p.read("split_assignments").select("pair_id", old_split="split")
        for v in (h, f):
            now = pl.concat([v.read(f"data/{s}", columns=["pair_id"]).with_columns(split=pl.lit(s)) for s in SPLITS])
            moved = now.join(prior, on="pair_id").filter(pl.col("split") != pl.col("old_split"))
            assert moved.filter((pl.col("old_split") == "test") | (pl.col("split") == "train")).height == 0
        # the assignment table carries the ancestors' rows as they were (a pair not moved keeps its assigned_in)
        # (a parent none of whose pairs was kept has no rows to carry: found by a random chain, seed 4773)
        mine_sa = h.read("split_assignments")
        assert p.read("split_assignments").join(mine_sa, on=list(mine_sa.columns), how="anti").join(
            mine_sa.filter(pl.col("assigned_in") == vid), on="pair_id", how="anti").height == 0
        assert h.verify() == [] and f.verify() == []


def test_a_child_keeps_the_rows_of_untouched_pairs_and_shares_their_parts(tmp_path, monkeypatch):
    """A batch of new pairs only: every old pair keeps its parent's row, so the parent's
    generation parts of the pair tables are linked, not rewritten (generations big enough for
    parts of their own: a small one would join its parent's tail part)."""
    from pipeline import parts

    monkeypatch.setattr(parts, "PART_PAIRS", 4)
    rng = random.Random(7)
    first = _batch(rng, 0, [])
    second = [r for r in _batch(rng, 1, []) if not r["comparison_id"].startswith(("redelivered", "rejudged", "conflict"))]
    store = Store(tmp_path / "s")
    v1 = curate([write_jsonl(tmp_path / "a.jsonl", first)], store, POLICY).version_id
    v2 = curate([write_jsonl(tmp_path / "b.jsonl", second)], store, POLICY, parent=v1).version_id
    h1, h2 = store.get(v1), store.get(v2)
    rule = h2.manifest().lineage["consensus"]
    assert rule["pairs_from_parent"] == h1.table("pairs").rows
    old_parts = {p.sha256 for p in h1.table("pairs").parts}
    assert old_parts <= {p.sha256 for p in h2.table("pairs").parts}
    assert h2.manifest().lineage["pair_table_parts"]["linked"] >= len(old_parts)


def test_fingerprint_sees_every_change():
    from pipeline.parts import fingerprint

    f = pl.DataFrame({"pair_id": ["p1", "p2"], "w": [0.5, 1.0],
                      "chosen": [[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]]})
    fp = fingerprint(f)
    assert fingerprint(f.clone()) == fp
    assert fingerprint(f.reverse()) != fp  # order: the bytes of a part depend on it
    assert fingerprint(f.with_columns(w=pl.Series([0.5, 1.0 + 1e-12]))) != fp
    assert fingerprint(f.with_columns(chosen=pl.Series([[{"role": "assistant", "content": "x"}],
                                                        [{"role": "assistant", "content": "z"}]]))) != fp
    assert fingerprint(f.with_columns(pl.col("w").cast(pl.Float32))) != fp  # the schema too
    assert fingerprint(f.head(1)) != fp


def test_a_big_generation_is_bucketed_and_a_changed_pair_rewrites_its_bucket_only(tmp_path, monkeypatch):
    import pipeline.parts as parts

    monkeypatch.setattr(parts, "PART_PAIRS", 3)
    rng = random.Random(11)
    first = _batch(rng, 0, []) + _batch(rng, 1, [])
    store = Store(tmp_path / "s")
    v1 = curate([write_jsonl(tmp_path / "a.jsonl", first)], store, POLICY).version_id
    h1 = store.get(v1)
    names = [p.path.rsplit("/", 1)[1] for p in h1.table("pairs").parts]
    k = int(names[0].split("of")[1][:4])
    assert k >= 4 and all(f".b" in n and n.endswith(f"of{k:04d}.parquet") for n in names), names
    # one old pair judged again by another annotator: its bucket changes, the other buckets are linked
    r = first[0]
    again = [{**r, "comparison_id": "again-1", "annotator_id": "ann-new", "label": "b" if r["label"] == "a" else "a"}]
    v2 = curate([write_jsonl(tmp_path / "b.jsonl", again)], store, POLICY, parent=v1).version_id
    h2 = store.get(v2)
    rule = h2.manifest().lineage["consensus"]
    changed_pairs = rule["pairs_recomputed"]
    old = {p.path: p.sha256 for p in h1.table("pairs").parts}
    new = {p.path: p.sha256 for p in h2.table("pairs").parts}
    assert set(new) == set(old)  # the same buckets (no pair is new)
    rewritten = [p for p in old if old[p] != new[p]]
    assert 1 <= len(rewritten) <= changed_pairs + 1, (rewritten, rule)  # + a pair whose flags changed with it
    assert len(rewritten) < len(old)
    assert h2.read("pairs").height == h1.read("pairs").height and h2.verify() == []


def test_cli_full_flag_builds_a_recomputed_child(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    rng = random.Random(3)
    a = write_jsonl(tmp_path / "a.jsonl", _batch(rng, 0, []))
    b = write_jsonl(tmp_path / "b.jsonl", _batch(rng, 1, []))
    store = tmp_path / "s"
    run = CliRunner()

    def curate_cli(*args) -> str:
        res = run.invoke(app, ["curate", *map(str, args), "--store", str(store)])
        assert res.exit_code == 0, res.output
        return res.stdout.strip().splitlines()[-1]

    v1 = curate_cli(a)
    inc_id, full_id = curate_cli(b, "--parent", v1), curate_cli(b, "--parent", v1, "--full")
    assert inc_id != full_id and curate_cli(b, "--parent", v1, "--full") == full_id  # idempotent
    m = Store(store).get(full_id).manifest()
    assert m.parent_version == v1 and m.lineage["consensus"]["mode"] == "full"
    assert Store(store).get(inc_id).manifest().lineage["consensus"]["mode"] == "incremental"


def test_grouped_write_fingerprints_are_those_of_the_parts_written(tmp_path):
    """The fingerprints a grouped write computes from the whole frame (one row hash each, no
    copy of the rows) are those of the parts as they are read back."""
    from pipeline.parts import PartReuse, TableWriter, fingerprint

    rng = random.Random(5)
    n = 500
    frame = pl.DataFrame({"pair_id": [f"p{rng.randrange(200)}" for _ in range(n)], "x": [rng.random() for _ in range(n)],
                          "msg": [[{"role": "user", "content": str(rng.random())}] for _ in range(n)],
                          "_part": [f"g{rng.randrange(7)}" for _ in range(n)]})
    store = Store(tmp_path / "s")
    stage = tmp_path / "stage"
    reuse = PartReuse()
    w = TableWriter(store, stage, "t")
    w.write_grouped(frame, "_part", reuse, order_by=("pair_id", "x"))
    assert len(w.parts) == 7 and sum(p.rows for p in w.parts) == n
    for part in w.parts:
        back = pl.read_parquet(stage / part.path)
        assert back["pair_id"].is_sorted() and fingerprint(back) == reuse.seen[part.path]


@pytest.mark.parametrize("column", ["first_version", "strength"])
def test_a_parent_without_a_preliminary_column_is_recomputed_once(tmp_path, monkeypatch, column):
    """A parent whose preliminary state lacks a column this code keeps (written before it was
    kept) gives a recomputed preliminary consensus, not an error; the next child is incremental."""
    from pipeline.store import VersionHandle

    rng = random.Random(13)
    store = Store(tmp_path / "s")
    v1 = curate([write_jsonl(tmp_path / "a.jsonl", _batch(rng, 0, []))], store, POLICY).version_id
    real = VersionHandle.read

    def older(self, name, *a, **k):
        frame = real(self, name, *a, **k)
        return frame.drop(column, strict=False) if name == PRELIM_TABLE and self.version_id == v1 else frame

    with monkeypatch.context() as m:
        m.setattr(VersionHandle, "read", older)
        v2 = curate([write_jsonl(tmp_path / "b.jsonl", _batch(rng, 1, []))], store, POLICY, parent=v1).version_id
    h2 = store.get(v2)
    assert h2.manifest().lineage["preliminary"]["mode"] == "recomputed" and h2.verify() == []
    assert h2.manifest().lineage["union"]["texts"] == "all"  # read again with every text
    assert "first_version" in h2.read(PRELIM_TABLE).columns
    v3 = curate([write_jsonl(tmp_path / "c.jsonl", _batch(rng, 2, []))], store, POLICY, parent=v2).version_id
    assert store.get(v3).manifest().lineage["preliminary"]["mode"] == "incremental"
    assert store.get(v3).manifest().lineage["union"]["texts"] == "touched pairs"
