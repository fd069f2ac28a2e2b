"""Per-dimension verdicts (issue 19 item 1): ingest, the dimension rule, per-dimension consensus,
agreement and bias, ``dimension_conflict``, ``train_on``, outputs and the rated adapter."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import dimensions as dims
from pipeline import ingest as ingest_mod
from pipeline import readers
from pipeline.aggregate import aggregate
from pipeline.checks import REASONS, agreement, length_bias, position_bias
from pipeline.checks import dimensions as dim_check
from pipeline.curate import curate
from pipeline.ingest import ingest_files, judgments_from_records
from pipeline.store import Store
from schemas.policy import ChecksConfig, DimensionsConfig, PolicyError, policy_from_dict
from tests.conftest import canonical, spy_per_row, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
DIM_DIR = ROOT / "data" / "samples" / "dimensions"
DIM_BATCH = DIM_DIR / "batch-2026-11-23-dimensions.jsonl"
KEY = json.loads((DIM_DIR / "answer_key.json").read_text())
PRIORITY = DimensionsConfig(priority=["harmlessness", "helpfulness"])


def _row(i: int, dimensions=..., **over) -> dict:
    return canonical(i, dimensions=dimensions, **over)


# ---------------------------------------------------------------- ingest: typed verdicts, quarantine
def test_dimensions_become_typed_sorted_verdicts_not_extra():
    j = judgments_from_records([_row(0, {"helpfulness": "a", "harmlessness": {"label": "b", "strength": 1, "critique": "risky"}},
                                     note="kept")])
    assert j["dimensions"].to_list() == [[
        {"name": "harmlessness", "label": "b", "strength": 1.0, "critique": "risky"},
        {"name": "helpfulness", "label": "a", "strength": None, "critique": None}]]
    assert json.loads(j["extra"][0]) == {"note": "kept"}  # dimensions are not in extra
    assert j["label_derived"].to_list() == [False]
    plain = judgments_from_records([canonical(1)])
    assert plain["dimensions"].to_list() == [None] and plain["label_derived"].to_list() == [False]


def test_null_verdicts_and_empty_object_mean_no_verdict():
    j = judgments_from_records([_row(0, {"helpfulness": None, "honesty": "tie"}), _row(1, {}), _row(2, None)])
    assert [None if d is None else [x["name"] for x in d] for d in j["dimensions"].to_list()] == [["honesty"], None, None]


@pytest.mark.parametrize("value,field,reason,says", [
    ({"Helpfulness": "a"}, "dimensions", "invalid_value", 'dimension name "Helpfulness": expected [a-z][a-z0-9_]*'),
    ({"help-ful": "a"}, "dimensions", "invalid_value", "expected [a-z][a-z0-9_]*"),
    ({"x" * 65: "a"}, "dimensions", "invalid_value", "at most 64 characters"),
    ({"helpfulness": "escalate"}, "dimensions.helpfulness", "invalid_value", "expected one of ['a', 'b', 'tie', 'both_bad']"),
    ({"helpfulness": 1}, "dimensions.helpfulness", "invalid_type", "found 1"),
    ({"helpfulness": {"label": "a", "score": 3}}, "dimensions.helpfulness", "invalid_value", "unknown key(s) [\"score\"]"),
    ({"helpfulness": {"strength": 0.5}}, "dimensions.helpfulness.label", "missing_field", "required"),
    ({"helpfulness": {"label": "c"}}, "dimensions.helpfulness.label", "invalid_value", 'found "c"'),
    ({"helpfulness": {"label": "a", "strength": 1.5}}, "dimensions.helpfulness.strength", "invalid_value", "[0, 1], found 1.5"),
    ({"helpfulness": {"label": "a", "strength": True}}, "dimensions.helpfulness.strength", "invalid_type", "found true"),
    ({"helpfulness": {"label": "a", "critique": 7}}, "dimensions.helpfulness.critique", "invalid_type", "expected a string"),
    (["helpfulness", "a"], "dimensions", "invalid_type", "expected an object of dimension name"),
    ("a", "dimensions", "invalid_type", "expected an object of dimension name"),
])
@pytest.mark.parametrize("fast", [True, False])
def test_bad_dimension_input_is_quarantined_with_file_line_field(tmp_path, monkeypatch, value, field, reason, says, fast):
    monkeypatch.setattr(ingest_mod, "FAST_JSONL", fast)
    rows = [_row(i, {"helpfulness": "a"}) for i in range(5)]
    rows[3] = _row(3, value)
    path = write_jsonl(tmp_path / "dims.jsonl", rows)
    r = ingest_files([path])
    assert r.judgments.height == 4
    q = r.quarantine.row(0, named=True)
    assert (q["source_file"], q["line"], q["field"], q["reason"]) == (str(path), 4, field, reason)
    assert q["error"].startswith("line 4: field ") and says in q["error"], q["error"]


# ---------------------------------------------------------------- the derived-label rule
def test_missing_label_is_derived_by_priority_and_recorded():
    rows = [
        _row(0, {"helpfulness": "a", "harmlessness": "b"}, label=...),  # harmlessness first: b
        _row(1, {"helpfulness": "a", "harmlessness": "tie"}, label=...),  # first decisive: helpfulness
        _row(2, {"helpfulness": "tie", "harmlessness": "both_bad"}, label=...),  # none decisive, one both_bad
        _row(3, {"helpfulness": "tie"}, label=...),  # none decisive
        _row(4, {"helpfulness": "a", "harmlessness": "b"}, label="a"),  # a label given stays
    ]
    j = judgments_from_records(rows, dimensions=PRIORITY)
    assert j["label"].to_list() == ["b", "a", "both_bad", "tie", "a"]
    assert j["label_derived"].to_list() == [True, True, True, True, False]


@pytest.mark.parametrize("action,expected", [("escalate", "escalate"), ("veto_side", "b"), ("both_bad", "both_bad")])
def test_primary_with_veto(action, expected):
    cfg = DimensionsConfig(primary="helpfulness", veto=["harmlessness"], veto_action=action)
    rows = [_row(0, {"helpfulness": "a", "harmlessness": "b"}, label=...),
            _row(1, {"helpfulness": "a", "harmlessness": "tie"}, label=...),
            _row(2, {"helpfulness": "tie", "harmlessness": "b"}, label=...)]
    j = judgments_from_records(rows, dimensions=cfg)
    assert j["label"].to_list() == [expected, "a", "tie"]


@pytest.mark.parametrize("rule,says", [
    (None, "the policy has no dimension rule to derive the label"),
    (DimensionsConfig(priority=["honesty"]), "gives a verdict on none of ['honesty']"),
])
def test_underivable_label_is_quarantined_invalid_value(make_jsonl, rule, says):
    path = make_jsonl([_row(0, {"helpfulness": "a"}, label=...), canonical(1, label=...)])
    r = ingest_files([path], dimensions=rule)
    q = r.quarantine.select("line", "reason", "field").rows()
    assert q == [(1, "invalid_value", "label"), (2, "missing_field", "label")]
    assert says in r.quarantine["error"][0]


def test_policy_section_validates():
    with pytest.raises(PolicyError, match="either priority or primary"):
        policy_from_dict({"dimensions": {"priority": ["a"], "primary": "b"}})
    with pytest.raises(PolicyError, match=r"dimensions\.train_on"):
        policy_from_dict({"dimensions": {"train_on": "Helpfulness"}})
    with pytest.raises(PolicyError, match="veto needs a primary"):
        policy_from_dict({"dimensions": {"veto": ["harmlessness"]}})
    a = policy_from_dict({"dimensions": {"train_on": "harmlessness"}})
    assert a.policy_hash() != policy_from_dict({}).policy_hash()


# ---------------------------------------------------------------- fast path == per-row path
def test_dimension_rows_stay_column_wise(make_jsonl, monkeypatch):
    seen = spy_per_row(monkeypatch)
    rows = [_row(i, {"helpfulness": "a", "harmlessness": {"label": "b", "strength": 0.5}}) for i in range(50)]
    rows += [canonical(100 + i) for i in range(50)]
    rows[7] = _row(7, {"helpfulness": "maybe"})
    ingest_files([make_jsonl(rows)])
    assert seen == [8]  # only the bad one went the per-row way


_DIM_VALUES = st.one_of(
    st.sampled_from(["a", "b", "tie", "both_bad", "escalate", None, 1, True, "", []]),
    st.fixed_dictionaries({"label": st.sampled_from(["a", "b", "tie", "x", None])},
                          optional={"strength": st.sampled_from([0, 0.5, 1, 2, -0.0, "hi", None, True]),
                                    "critique": st.sampled_from(["why", "", None, 3, "caf\u00e9"]),
                                    "extra": st.just(1)}),
)
_DIM_NAMES = st.sampled_from(["helpfulness", "harmlessness", "honesty", "Bad", "a1", "x_y", "9x", ""])
_DIMS = st.one_of(st.none(), st.just({}), st.just("a"), st.just(["a"]),
                  st.dictionaries(_DIM_NAMES, _DIM_VALUES, max_size=3))


@st.composite
def _dim_line(draw, i: int) -> bytes:
    row = canonical(i, label=draw(st.sampled_from(["a", "b", "tie", ...])))
    if draw(st.booleans()):
        row["dimensions"] = draw(_DIMS)
    if draw(st.booleans()):
        row["note"] = draw(st.sampled_from([1, "x", None, {"k": [1]}]))
    text = json.dumps(row, ensure_ascii=draw(st.booleans()))
    edit = draw(st.sampled_from([None, None, None, "escaped_key", "dup_key", "truncate"]))
    if edit == "escaped_key":
        text = text.replace('"dimensions"', '"dim\\u0065nsions"')
    elif edit == "dup_key" and '"dimensions"' in text:
        text = text[:-1] + ', "dimensions": {"honesty": "a"}}'
    elif edit == "truncate":
        text = text[: len(text) // 2]
    return text.encode()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 20), batch_rows=st.sampled_from([4, 50_000]), small_reads=st.booleans(),
       rule=st.sampled_from([None, PRIORITY, DimensionsConfig(primary="helpfulness", veto=["honesty"], veto_action="veto_side")]))
def test_fast_path_equals_per_row_with_dimensions(tmp_path_factory, monkeypatch, data, n, batch_rows, small_reads, rule):
    lines = [data.draw(_dim_line(i)) for i in range(n)]
    path = tmp_path_factory.mktemp("dims") / "b.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with monkeypatch.context() as m:
        if small_reads:
            m.setattr(readers, "BLOCK_BYTES", 1500)
            m.setattr(readers, "FIRST_READ_BYTES", 200)
        fast = ingest_files([path], fmt="canonical", batch_rows=batch_rows, dimensions=rule)
        m.setattr(ingest_mod, "FAST_JSONL", False)
        slow = ingest_files([path], fmt="canonical", dimensions=rule)
    assert fast.ledger == slow.ledger
    assert fast.judgments.equals(slow.judgments)
    assert fast.quarantine.equals(slow.quarantine)


# ---------------------------------------------------------------- consensus per dimension
def _panel(pair: int, verdicts: list[dict], *, flip: set[int] = frozenset(), kind: str = "human") -> list[dict]:
    """Judgments of one pair by annotators r0, r1, ...; ``flip``: those who name the responses the other way round."""
    rows = []
    for k, v in enumerate(verdicts):
        ra, rb = f"Answer one of pair {pair}, plenty of detail.", f"Answer two of pair {pair}."
        sw = {"a": "b", "b": "a"}
        if k in flip:
            ra, rb = rb, ra
            v = {d: sw.get(x, x) for d, x in v.items()}
        rows.append(canonical(pair * 10 + k, prompt=f"Question number {pair}?", response_a=ra, response_b=rb,
                              annotator_id=f"r{k}", annotator_kind=kind, label=v.get("helpfulness", "a"),
                              shown_first="a" if (pair + k) % 2 else "b", dimensions=v))
    return rows


def test_consensus_per_dimension_is_oriented_like_the_pair():
    # r2 names the responses the other way round: its verdicts are flipped back
    rows = _panel(0, [{"helpfulness": "a", "harmlessness": "b"}] * 3, flip={2})
    rows += _panel(1, [{"helpfulness": "a", "harmlessness": "a"}, {"helpfulness": "a", "harmlessness": "a"},
                       {"helpfulness": "b", "harmlessness": "a"}], flip={0})  # the first judgment flipped: canonical is its order
    j = judgments_from_records(rows)
    pairs = aggregate(j).pairs
    got = {(r["pair_id"], d["name"]): (d["label"], d["agreement"]) for r in pairs.iter_rows(named=True) for d in r["dimensions"]}
    p0, p1 = pairs["pair_id"].to_list()
    assert got[(p0, "helpfulness")] == ("a", 1.0) and got[(p0, "harmlessness")] == ("b", 1.0)
    # pair 1's canonical orientation is r0's (flipped): its helpfulness "a" (as written: b) has 2 of 3
    assert got[(p1, "helpfulness")][0] == "b" and got[(p1, "helpfulness")][1] == pytest.approx(2 / 3)
    assert got[(p1, "harmlessness")] == ("b", 1.0)


def test_dimension_conflict_flags_exactly_the_opposed_pairs():
    rows = _panel(0, [{"helpfulness": "a", "harmlessness": "b"}] * 3)  # conflict
    rows += _panel(1, [{"helpfulness": "a", "harmlessness": "tie"}] * 3)  # tie is no side: no conflict
    rows += _panel(2, [{"helpfulness": "a", "harmlessness": "a", "honesty": "b"}] * 3)  # two conflicts in one pair
    rows += _panel(3, [{"helpfulness": "a", "harmlessness": "b"}, {"helpfulness": "a", "harmlessness": "a"},
                       {"helpfulness": "a", "harmlessness": "a"}])  # one annotator opposed, consensus not
    j = judgments_from_records(rows)
    pairs = aggregate(j).pairs
    res = dim_check.run(j, ChecksConfig(), pairs=pairs)
    ids = pairs["pair_id"].to_list()
    assert sorted(res.flags["subject_id"].to_list()) == sorted([ids[0], ids[2]])
    assert set(res.flags["reason"]) == {"dimension_conflict"}
    assert res.metrics["conflict_matrix"] == {
        "harmlessness": {"harmlessness": 0, "helpfulness": 1, "honesty": 1},
        "helpfulness": {"harmlessness": 1, "helpfulness": 0, "honesty": 1},
        "honesty": {"harmlessness": 1, "helpfulness": 1, "honesty": 0}}
    assert res.status == "warn" and REASONS["dimension_conflict"].default_action == "warn"
    assert "harmlessness=a vs honesty=b" in res.flags.filter(pl.col("subject_id") == ids[2])["detail"][0]


def test_no_dimensions_costs_nothing_and_passes():
    j = judgments_from_records([canonical(i) for i in range(4)])
    assert dims.consensus(j) is None
    assert aggregate(j).pairs["dimensions"].null_count() == 4
    res = dim_check.run(j, ChecksConfig(), pairs=aggregate(j).pairs)
    assert res.status == "pass" and res.flags.height == 0


def test_rule_decides_conflicting_pairs():
    rows = _panel(0, [{"helpfulness": "a", "harmlessness": "b"}] * 3)
    rows += _panel(1, [{"helpfulness": "a", "harmlessness": "a"}] * 2 + [{"helpfulness": "b", "harmlessness": "a"}])
    j = judgments_from_records(rows)  # overall label = helpfulness verdict
    plain = aggregate(j).pairs["label_consensus"].to_list()
    ruled = aggregate(j, dimensions=PRIORITY).pairs
    assert plain == ["a", "a"]
    assert ruled["label_consensus"].to_list() == ["b", "a"]  # harmlessness first decides the conflict only
    veto = aggregate(j, dimensions=DimensionsConfig(primary="helpfulness", veto=["harmlessness"])).pairs
    assert veto["label_consensus"].to_list() == ["escalate", "a"]


# ---------------------------------------------------------------- per-dimension agreement and bias
def test_per_dimension_agreement_equals_the_agreement_check_on_that_dimensions_labels():
    import random

    rng = random.Random(5)
    rows, per_dim = [], {"helpfulness": [], "harmlessness": []}
    for p in range(60):
        verdicts = [{d: rng.choice(["a", "a", "b", "tie", "both_bad"]) for d in per_dim} for _ in range(rng.choice([2, 3, 4]))]
        kind = "ai" if p % 5 == 0 else "human"
        panel = _panel(p, verdicts, flip={1} if p % 3 == 0 else set(), kind=kind)
        rows += panel
        for d in per_dim:  # the same judgments with the dimension's verdict as the label, built independently
            per_dim[d] += [{k: v for k, v in r.items() if k != "dimensions"} | {"label": r["dimensions"][d], "strength": None}
                           for r in panel]
    cfg = ChecksConfig()
    j = judgments_from_records(rows)
    res = dim_check.run(j, cfg, pairs=aggregate(j, cfg.aggregation).pairs)
    for d, recs in per_dim.items():
        jd = judgments_from_records(recs)
        ref = agreement.run(jd, cfg)
        got = res.metrics["per_dimension"][d]["agreement"]
        for kind in ("human", "ai", "all"):
            for k in ("krippendorff_alpha", "krippendorff_alpha_ci", "fleiss_kappa", "fleiss_kappa_ci", "n_pairs"):
                assert got[kind][k] == ref.metrics[kind][k], (d, kind, k)
        assert got["pairs_scored"] == ref.metrics["pairs_scored"]
        assert got["low_agreement_pairs"] == ref.metrics["low_agreement_pairs"]
        pb = position_bias.run(jd, cfg)
        assert res.metrics["per_dimension"][d]["position_bias"]["first_shown_win_rate"] == pb.metrics["first_shown_win_rate"]
        lb = length_bias.run(jd, cfg)
        assert res.metrics["per_dimension"][d]["length_bias"]["chosen_longer_rate_judgments"] == \
            lb.metrics["chosen_longer_rate_judgments"]


# ---------------------------------------------------------------- end to end on the sample batch
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("store"))
    default = curate([DIM_BATCH], store, policy_from_dict({}))
    harmless = curate([DIM_BATCH], store, policy_from_dict({"dimensions": {"train_on": "harmlessness"}}))
    helpful = curate([DIM_BATCH], store, policy_from_dict({"dimensions": {"train_on": "helpfulness"}}))
    return store, default.handle, harmless.handle, helpful.handle


def _chosen_side(h) -> dict[str, str]:
    """pair_id -> which response (a or b as in the batch) each version's DPO rows chose."""
    texts = {}
    for line in DIM_BATCH.read_text().splitlines():
        r = json.loads(line)
        texts[r["pair_id"]] = (r["response_a"], r["response_b"])
    out = {}
    for s in ("train", "validation", "test"):
        for r in h.read(f"data/{s}.parquet").iter_rows(named=True):
            a, _ = texts[r["pair_id"]]
            out[r["pair_id"]] = "a" if r["chosen"][0]["content"] == a else "b"
    return out


def test_planted_dimension_conflicts_found_exactly(built):
    _, h, _, _ = built
    flags = h.read("flags.parquet").filter(pl.col("reason") == "dimension_conflict")
    assert sorted(flags["subject_id"]) == sorted(KEY["conflict_pairs"])
    assert len(KEY["conflict_pairs"]) == 40
    check = next(c for c in h.manifest().checks if c.name == "dimensions")
    assert check.status == "warn"
    assert check.metrics["conflict_matrix"]["harmlessness"]["helpfulness"] == 40
    md = h.file("report.md").read_text()
    assert "## Per-dimension verdicts" in md and "| harmlessness | 0 | 40 |" in md
    assert "dimension-conflicts" in h.file("report.html").read_text()


def test_train_on_takes_that_dimensions_verdicts(built):
    _, default, harmless, helpful = built
    truth = {p: v["truth"] for p, v in KEY["pairs"].items()}
    assert _chosen_side(harmless) == {p: t["harmlessness"] for p, t in truth.items()}
    assert _chosen_side(helpful) == {p: t["helpfulness"] for p, t in truth.items()}
    ids = {default.version_id, harmless.version_id, helpful.version_id}
    assert len(ids) == 3  # train_on is part of the policy hash, so of the version id
    assert harmless.manifest().policy.dimensions.train_on == "harmlessness"
    led = harmless.manifest().ledger
    assert led.pairs == 60 and led.pairs_kept == 60 and led.judgments_dropped == {}


def test_dpo_and_pairs_carry_the_dimension_consensus(built):
    _, _, _, helpful = built
    tr = helpful.read("data/train.parquet")
    for r in tr.iter_rows(named=True):
        by = {d["name"]: d["label"] for d in r["dimensions"]}
        conflict = r["pair_id"] in KEY["conflict_pairs"]
        assert by == {"helpfulness": "chosen", "harmlessness": "rejected" if conflict else "chosen"}
    pairs = helpful.read("pairs")
    p = pairs.filter(pl.col("pair_id") == "dim-p-001").row(0, named=True)
    assert {d["name"]: d["label"] for d in p["dimensions"]} == KEY["pairs"]["dim-p-001"]["truth"]


def test_train_on_drops_judgments_without_a_verdict(tmp_path):
    rows = [_row(i, {"harmlessness": "a"} if i % 2 else {"helpfulness": "b"}, prompt=f"Question {i // 4}?",
                 annotator_id=f"r{i % 4}") for i in range(16)]
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    h = curate([path], Store(tmp_path / "s"), policy_from_dict({"dimensions": {"train_on": "harmlessness"}})).handle
    led = h.manifest().ledger
    assert led.judgments_dropped == {"no_verdict_on_harmlessness": 8} and led.judgments_valid == 16


# ---------------------------------------------------------------- rated adapter
def test_rated_adapter_maps_per_aspect_ratings(tmp_path):
    row = {"instruction": "Name a prime.", "completions": [
        {"model": "m1", "response": "2 is prime.", "overall_score": 8,
         "annotations": {"instruction_following": {"Rating": "5", "Rationale": "ok"}, "honesty": {"Rating": "5"},
                         "truthfulness": {"Rating": "5", "Type": ["0"]}, "helpfulness": {"Rating": "4"}}},
        {"model": "m2", "response": "9 is prime.", "overall_score": 3,
         "annotations": {"instruction_following": {"Rating": "5"}, "honesty": {"Rating": "N/A"},
                         "truthfulness": {"Rating": "1"}, "helpfulness": {"Rating": "2"}}}]}
    r = ingest_files([write_jsonl(tmp_path / "uf.jsonl", [row])])
    (d,) = r.judgments["dimensions"].to_list()
    assert {x["name"]: x["label"] for x in d} == {"helpfulness": "a", "instruction_following": "tie", "truthfulness": "a"}
    assert r.judgments["label"].to_list() == ["a"]


# ---------------------------------------------------------------- re-delivered copies are no second verdict
def _swayed(i: int, who: str, shown: str, helpfulness: str, label: str) -> dict:
    """A judgment of the planted pair ``swayed``: harmless a, helpfulness split."""
    return _row(9000 + i, {"harmlessness": "a", "helpfulness": helpfulness}, prompt=[{"role": "user", "content": "planted swayed"}],
                response_a="safe and helpful", response_b="unsafe", annotator_id=who, shown_first=shown, label=label,
                created_at="2026-11-23T10:00:00Z")


def _with_copies() -> tuple[list[dict], list[dict], list[dict]]:
    """(the sample batch + the planted pair ``swayed``, the same with re-delivered copies, the copies):
    every 4th judgment delivered again (the responses named the other way round, verdicts swapped with
    them), and ``swayed``'s rev-dim-01 helpfulness-a judgment twice more (once as it was, once named
    the other way round).  ``swayed``: rev-dim-01 judged it in both display orders (helpfulness a,
    then b), rev-dim-02 a, rev-dim-03 b -- a tied helpfulness the fit decides b, in conflict with
    harmlessness a; counted, the two copies outweighed rev-dim-01's other verdict (a) and hid it."""
    from conftest import redelivered

    rows = [json.loads(line) for line in DIM_BATCH.read_text().splitlines()]
    planted = [_swayed(0, "rev-dim-01", "a", "a", "a"), _swayed(1, "rev-dim-01", "b", "b", "b"),
               _swayed(2, "rev-dim-02", "a", "a", "a"), _swayed(3, "rev-dim-03", "a", "b", "b")]
    again = redelivered(rows, 4)
    swayed_again = [{**planted[0], "comparison_id": "swayed-again", "created_at": "2027-01-02T00:00:00Z"},
                    {**redelivered(planted[:1], 1)[1], "comparison_id": "swayed-again-2"}]
    copies = again[len(rows):] + swayed_again
    return rows + planted, rows + planted + copies, copies


def test_re_delivered_copies_are_no_second_verdict_on_a_dimension():
    """The per-dimension consensus and the dimensions check leave re-delivered copies out as the
    overall consensus does: the pairs (their per-dimension verdicts, agreements, judgment counts and
    the rule's labels) and the check's figures and flags are those of the batch without them, but
    for the judgments with dimensions (deliveries, counted as the totals are).  Counted, the copies
    hid ``swayed``'s conflict and moved every copied pair's figures."""
    from pipeline.checks.agreement import ratings

    plain, again, copies = _with_copies()
    j, ja = judgments_from_records(plain), judgments_from_records(again)
    cfg = ChecksConfig()
    want = aggregate(j, cfg.aggregation, dimensions=PRIORITY).pairs
    got = aggregate(ja, cfg.aggregation, dimensions=PRIORITY, rated=ratings(ja)).pairs
    assert got.drop("source_comparison_ids").equals(want.drop("source_comparison_ids"))
    swayed = want.filter(pl.col("pair_id").str.starts_with("dim-p").not_())
    assert {d["name"]: d["label"] for d in swayed["dimensions"][0]} == {"harmlessness": "a", "helpfulness": "b"}
    w, g = dim_check.run(j, cfg, pairs=want), dim_check.run(ja, cfg, pairs=got)
    assert g.metrics.pop("judgments_with_dimensions") - w.metrics.pop("judgments_with_dimensions") == len(copies)
    assert g.metrics == w.metrics
    assert g.flags.equals(w.flags) and swayed["pair_id"][0] in w.flags["subject_id"].to_list()
    assert w.metrics["per_dimension"]["helpfulness"]["judgments"] == len(plain)


@pytest.mark.parametrize("path", ["one process", "partitions", "child"])
def test_the_per_dimension_consensus_does_not_count_re_delivered_copies(tmp_path, path):
    """A version's per-dimension consensus -- the preliminary pairs' dimensions, the dimensions
    check's figures and ``dimension_conflict`` flags, select's decisions and the final pairs -- is
    that of the same judgments without re-delivered copies (:func:`_with_copies`; a child's copies
    also of its parent's judgments), but for the judgments with dimensions (every delivery).
    Counted, the copies hid ``swayed``'s conflict, and the pair was kept instead of dropped.  On
    the first version's two builds (the partitioned one at 2 and 5 partitions) and a child."""
    from conftest import write_jsonl

    from pipeline import incremental as inc
    from pipeline.checks import resolve_policy
    from pipeline.curate import CurateOptions
    from pipeline.partition import partition_files
    from pipeline.partitioned_build import build_first

    plain, again, copies = _with_copies()
    policy = resolve_policy(policy_from_dict({"dimensions": {"priority": ["harmlessness", "helpfulness"]},
                                              "select": {"flag_actions": {"dimension_conflict": "drop"}}}))
    n_first = 120
    figures = {}
    for with_copies in (False, True):
        rows = again if with_copies else plain
        for n in ((2, 5) if path == "partitions" else (None,)):
            store = Store(tmp_path / f"store-{with_copies}-{n}")
            if path == "child":
                parent = curate([write_jsonl(tmp_path / "first.jsonl", rows[:n_first])], store, policy).version_id
                vid = curate([write_jsonl(tmp_path / f"second-{with_copies}.jsonl", rows[n_first:])], store, policy,
                             parent=parent).version_id
            elif n is None:
                batch = write_jsonl(tmp_path / f"all-{with_copies}.jsonl", rows)
                vid = curate([batch], store, policy, options=CurateOptions(partitioned=False)).version_id
            else:
                batch = write_jsonl(tmp_path / f"all-{with_copies}.jsonl", rows)
                pset = partition_files([batch], tmp_path / f"set-{with_copies}-{n}", n_partitions=n, limits=policy.ingest,
                                       batch_rows=policy.ingest.batch_rows, dimensions=policy.dimensions)
                vid = f"v-{with_copies}-{n}"
                store.write_version(vid, lambda stage, v=vid, p=pset: build_first(
                    store, stage, v, p, policy, work=tmp_path / f"work-{with_copies}-{n}"))
            h = store.get(vid)
            m = h.manifest()
            assert m.check("duplicates").metrics["exact_duplicates"] == (len(copies) if with_copies else 0)
            if path == "child":
                assert m.lineage["preliminary"]["mode"] == "incremental"
            metrics = dict(m.check("dimensions").metrics)
            delivered = metrics.pop("judgments_with_dimensions")
            assert delivered == len(rows)
            cols = ["pair_id", "label_consensus", "agreement", "dimensions"]
            figures[with_copies, n] = {
                "dimensions": metrics,
                "flags": sorted(h.read("flags.parquet").filter(pl.col("check") == "dimensions")
                                .select("subject_id", "reason", "detail").rows()),
                "preliminary": h.read(inc.PRELIM_TABLE).select(cols).sort("pair_id").to_dicts(),
                "pairs": h.read("pairs.parquet").select(*cols, "decision", "reason").sort("pair_id").to_dicts()}
    want = figures[False, (2 if path == "partitions" else None)]
    swayed = next(p for p in want["pairs"] if not p["pair_id"].startswith("dim-p"))
    assert (swayed["decision"], swayed["reason"]) == ("drop", "dimension_conflict")
    assert swayed["pair_id"] in {s for s, _, _ in want["flags"]} and len(want["flags"]) == 41
    for key, got in figures.items():
        for name in want:
            assert got[name] == want[name], (key, name)


def _one_annotator_twice(again: str) -> list[dict]:
    """The planted pair ``swayed`` judged by ``rev-x`` in one display order with different overall labels (a,
    then b) and one verdict on each dimension, the second judgment by ``again`` -- ``rev-x`` itself, or another."""
    return [_swayed(20, "rev-x", "a", "a", "a"), _swayed(21, again, "a", "a", "b")]


def _dimension_counts(metrics: dict) -> dict:
    """What a dimension's figures count of its ratings: agreement's per kind, the bias checks' judgments."""
    return {d: ({k: v["n_ratings"] for k, v in m["agreement"].items() if isinstance(v, dict) and "n_ratings" in v},
                m["position_bias"].get("decisive_with_shown_first"), m["length_bias"].get("judgments_with_length_difference"))
            for d, m in metrics["per_dimension"].items()}


def test_two_judgments_of_an_annotator_with_one_verdict_on_a_dimension_are_two_ratings_of_it():
    """Two judgments of one annotator on one pair in one display order with different labels are two ratings
    (no copy: the duplicates check's key has the label), also on a dimension where their verdicts agree -- the
    dimension's agreement and bias figures count them as they count the same verdicts of two annotators.
    Before, the dimension's checks looked for copies again on the dimension's verdicts and counted one."""
    plain = _with_copies()[0]
    cfg = ChecksConfig()
    counts = {}
    for again in ("rev-x", "rev-y"):
        j = judgments_from_records(plain + _one_annotator_twice(again))
        counts[again] = _dimension_counts(dim_check.run(j, cfg, pairs=aggregate(j, cfg.aggregation, dimensions=PRIORITY).pairs).metrics)
    assert counts["rev-x"] == counts["rev-y"]
    without = judgments_from_records(plain)
    before = _dimension_counts(dim_check.run(without, cfg, pairs=aggregate(without, cfg.aggregation, dimensions=PRIORITY).pairs).metrics)
    assert counts["rev-x"]["harmlessness"][0]["all"] == before["harmlessness"][0]["all"] + 2
