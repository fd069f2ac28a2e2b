"""The review loop closes: reviews (``review_of``) resolve routed pairs in a child version.

``../shared/spec/outputs.md`` "Reviews resolve routed pairs" and ``ledger.reviews``; issue 19 item 3
("Bad input" included).  Two set-ups: the demo samples (export -> the scripted reviewer
``data/review_bot.py`` -> import -> child), and a small planted batch where each routed pair gets
one kind of review (decisive, tied, AI, unregistered, only ties, a majority, the other orientation).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT, canonical, write_jsonl
from typer.testing import CliRunner

from flows.cli import app
from pipeline import ingest as ingest_mod
from pipeline import reviews_resolve as rr
from pipeline.curate import curate
from pipeline.ingest import ingest_files
from pipeline.review.exports import exported_pairs, exports_dir, read_exports
from pipeline.store import Store
from schemas.manifest import ReviewLedger
from schemas.policy import Policy, ReviewsConfig, SelectConfig
from schemas.registry import load_registry

runner = CliRunner()
SAMPLES = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))
HOSTILE = "pair-[bold red]x[/bold red]"


def cli(*args, code: int | None = 0):
    res = runner.invoke(app, [str(a) for a in args])
    if code is not None:
        assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    return res


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the samples, end to end
@pytest.fixture(scope="module")
def samples_round(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop")
    store = d / "store"
    parent = cli("curate", *SAMPLES, "--store", store).stdout.strip().splitlines()[-1]
    routed = Store(store).get(parent).read("routed.parquet")
    cli("review", "export", parent, "--store", store, "--format", "jsonl", "--out", d / "tasks.jsonl")
    subprocess.run([sys.executable, str(ROOT / "data" / "review_bot.py"), str(d / "tasks.jsonl"), "--out",
                    str(d / "answers.jsonl")], check=True, capture_output=True)
    cli("review", "import", d / "answers.jsonl", "--format", "jsonl", "--store", store, "--out", d / "reviews.jsonl")
    before = tree(store / "versions" / parent)
    res = cli("curate", d / "reviews.jsonl", "--store", store, "--parent", parent, "--json")
    child = json.JSONDecoder().raw_decode(res.stdout)[0]["version_id"]
    assert tree(store / "versions" / parent) == before  # the parent is never edited
    answers = [json.loads(x) for x in (d / "answers.jsonl").read_text().splitlines()]
    return {"dir": d, "store": store, "parent": parent, "child": child, "routed": routed, "answers": answers}


def _bot_expectation(answers: list[dict]) -> tuple[dict[str, str], set[str]]:
    """pair -> the verdict the scripted reviewers agree on; pairs where they tie."""
    by: dict[str, list[str]] = {}
    for a in answers:
        by.setdefault(a["pair_id"], []).append(a["label"])
    decided = {p: ls[0] for p, ls in by.items() if len(set(ls)) == 1 and ls[0] in ("a", "b")}
    tied = {p for p, ls in by.items() if len(ls) == 2 and set(ls) == {"a", "b"}}
    return decided, tied


def test_samples_round_resolves_the_reviewed_pairs_and_keeps_ties_routed(samples_round):
    st = Store(samples_round["store"])
    child = st.get(samples_round["child"])
    decided, tied = _bot_expectation(samples_round["answers"])
    assert decided and tied and len(decided) + len(tied) <= samples_round["routed"].height
    r = child.manifest().ledger.reviews
    assert r is not None and r.mode == "resolve"
    still = set(child.read("routed.parquet")["pair_id"].to_list())
    assert tied <= still and not (set(decided) & still)
    assert r.kept_routed_by_review_tie == len(tied)
    # a decided pair leaves as a DPO row whose chosen response is the side the reviews named
    pairs = child.read("pairs").filter(pl.col("pair_id").is_in(list(decided)))
    kept = pairs.filter(pl.col("decision") == "keep")
    assert kept.height == r.resolved_by_reviews > 0
    for row in kept.iter_rows(named=True):
        assert row["label_consensus"] == decided[row["pair_id"]] or row["label_consensus"] in ("a", "b")
        assert row["annotator_kind"] == "human" and row["agreement"] == 1.0
    dpo = pl.concat([child.read(f"data/{s}") for s in ("train", "validation", "test")])
    resolved_rows = dpo.filter(pl.col("pair_id").is_in(list(decided)))
    assert resolved_rows.height == kept.height
    # the original judgments are kept next to the reviews
    j = child.read("judgments")
    one = resolved_rows.row(0, named=True)
    assert j.filter(pl.col("pair_id") == one["pair_id"])["review_of"].null_count() >= 2
    assert any(c.startswith("rv-") for c in one["source_comparison_ids"])
    assert any(not c.startswith("rv-") for c in one["source_comparison_ids"])


def test_samples_round_chosen_is_the_reviewers_side(samples_round):
    child = Store(samples_round["store"]).get(samples_round["child"])
    answers = {a["pair_id"]: a for a in samples_round["answers"] if a["annotator_id"] == "review-bot-1"}
    decided, _ = _bot_expectation(samples_round["answers"])
    dpo = pl.concat([child.read(f"data/{s}") for s in ("train", "validation", "test")])
    checked = 0
    for row in dpo.filter(pl.col("pair_id").is_in(list(decided))).iter_rows(named=True):
        a = answers[row["pair_id"]]
        side = a["response_" + a["label"]]
        assert row["chosen"][0]["content"] == (side["text"] if isinstance(side, dict) else side)
        checked += 1
    assert checked > 10


def test_samples_ledger_adds_up(samples_round):
    st = Store(samples_round["store"])
    m = st.get(samples_round["child"]).manifest()
    led, r = m.ledger, m.ledger.reviews
    assert r.routed_ever == samples_round["routed"].height == r.resolved + r.open
    assert r.open == sum(led.routed.values())
    assert r.exported == r.routed_ever == r.reviewed  # the bot answered every exported task
    assert r.judgments == r.judgments_of_routed == len(samples_round["answers"])
    assert led.pairs == led.pairs_kept + sum(led.routed.values()) + sum(led.dropped.values())
    pm = st.get(samples_round["parent"]).manifest()
    assert pm.ledger.reviews.routed_ever == pm.ledger.reviews.open == sum(pm.ledger.routed.values())
    assert pm.ledger.reviews.resolved == pm.ledger.reviews.exported == 0  # nothing exported before the parent existed
    assert led.pairs_kept == pm.ledger.pairs_kept + r.resolved_by_reviews  # nothing else moved
    with pytest.raises(ValueError, match="does not add up"):
        ReviewLedger(routed_ever=5, resolved=2, open=2)
    with pytest.raises(ValueError, match="does not add up"):
        ReviewLedger(routed_ever=5, resolved=2, open=3, reviewed=6)


def test_show_lists_open_reviews_with_their_age(samples_round):
    st = Store(samples_round["store"])
    child = st.get(samples_round["child"])
    res = cli("show", samples_round["child"], "--store", samples_round["store"], "--json")
    d = json.loads(res.stdout)
    assert d["ledger"]["reviews"]["open"] == d["open_reviews"]["total"] == len(d["open_reviews"]["listed"]) > 0
    assert "review_not_routed" in json.dumps(d["policy"])  # the new reasons are in the policy shown
    parent_created = st.get(samples_round["parent"]).manifest().created_at
    state = child.read(rr.STATE)
    assert (state["routed_at"] == parent_created).all()  # the age counts from the version that routed the pair
    age_now = (datetime.now(UTC) - parent_created).total_seconds() / 86400
    for o in d["open_reviews"]["listed"]:
        assert o["routed_in"] == samples_round["parent"] and o["route"] in ("tie", "both_bad", "escalate")
        assert 0 <= o["age_days"] <= age_now + 0.01 and o["reviews"] == 2
    text = cli("show", samples_round["child"], "--store", samples_round["store"]).stdout
    assert f"open reviews: {d['open_reviews']['total']} routed pairs waiting" in text
    assert "routed in " + samples_round["parent"] in text
    # the age grows with the clock, from the version that routed the pair
    later = rr.open_reviews_of(child, datetime.now(UTC) + timedelta(days=3))
    assert (later["age_days"] >= 3).all()


def test_report_shows_the_funnel(samples_round):
    child = Store(samples_round["store"]).get(samples_round["child"])
    r = child.manifest().ledger.reviews
    md = child.file("report.md").read_text(encoding="utf-8")
    funnel = md.split("## Reviews: routed → exported → reviewed → resolved")[1].split("\n## ")[0]
    for stage, n in (("routed (this lineage)", r.routed_ever), ("exported for review", r.exported),
                     ("reviewed (≥ 1 review)", r.reviewed), ("resolved", r.resolved), ("still open", r.open)):
        assert f"| {stage} | {n} |" in funnel
    html = child.file("report.html").read_text(encoding="utf-8")
    assert "review-funnel" in html and "Reviews: routed" in html


def test_the_next_round_exports_exactly_the_open_pairs(samples_round, tmp_path):
    out = tmp_path / "round-2.jsonl"
    cli("review", "export", samples_round["child"], "--store", samples_round["store"], "--format", "jsonl", "--out", out)
    exported = {json.loads(x)["pair_id"] for x in out.read_text().splitlines()}
    child = Store(samples_round["store"]).get(samples_round["child"])
    assert exported == set(child.read("routed.parquet")["pair_id"].to_list())
    assert len(exported) == child.manifest().ledger.reviews.open
    for rec in read_exports(Store(samples_round["store"])):  # leave the log as the other tests expect it
        if rec.version_id == samples_round["child"]:
            for p in exports_dir(Store(samples_round["store"])).glob(f"*-{samples_round['child']}-*.json"):
                p.unlink()


def test_export_log_counts_exports_of_the_lineage(samples_round):
    st = Store(samples_round["store"])
    recs = read_exports(st)
    assert [r.version_id for r in recs] == [samples_round["parent"]]
    assert exported_pairs(st, [samples_round["parent"]]) == frozenset(samples_round["routed"]["pair_id"].to_list())
    assert exported_pairs(st, ["v-other"]) == frozenset()
    (exports_dir(st) / "zz-damaged.json").write_text("{not json", encoding="utf-8")
    assert len(read_exports(st)) == 1  # a damaged record is skipped, not fatal


def test_grandchild_resolves_the_ties_and_keeps_where_each_pair_was_routed(samples_round, tmp_path):
    st = Store(samples_round["store"])
    open_ = st.get(samples_round["child"]).read("routed.parquet")
    rows = []
    for i, p in enumerate(open_.iter_rows(named=True)):
        rows.append({"comparison_id": f"third-{i}", "review_of": p["pair_id"], "prompt": p["prompt"],
                     "response_a": p["response_a"], "response_b": p["response_b"], "label": "a",
                     "annotator_id": "review-bot-3", "annotator_kind": "human"})
    batch = write_jsonl(tmp_path / "third.jsonl", rows)
    res = cli("curate", batch, "--store", samples_round["store"], "--parent", samples_round["child"], "--json")
    g = st.get(json.JSONDecoder().raw_decode(res.stdout)[0]["version_id"])
    r = g.manifest().ledger.reviews
    assert r.open == 0 or r.open < open_.height
    state = g.read(rr.STATE)
    assert set(state["routed_in"].to_list()) == {samples_round["parent"]}
    earlier = state.filter(pl.col("resolved_in") == samples_round["child"]).height
    assert earlier == st.get(samples_round["child"]).manifest().ledger.reviews.resolved
    assert state.filter(pl.col("resolved_in") == g.version_id).height == r.resolved - earlier


# ---------------------------------------------------------------- planted: one kind of review per routed pair
TOPICS = ["kites", "moths", "glaciers", "violins", "tides", "lichens", "ferries", "abacus", "quasars", "sundials"]


def _base_rows() -> list[dict]:
    """P0..P7 escalated by rev-01 and rev-02 (P7 with a hostile given pair id); K0, K1 kept (both say a)."""
    rows = []
    for p, topic in enumerate(TOPICS):
        label = "escalate" if p < 8 else "a"
        for k in range(2):
            rows.append(canonical(p * 2 + k, comparison_id=f"c-{p}-{k}", label=label, annotator_id=f"rev-0{k + 1}",
                                  prompt=[{"role": "user", "content": f"Tell me a surprising fact about {topic}."}],
                                  response_a={"text": f"A careful answer about {topic}, with a source.", "model": "m-good"},
                                  response_b=f"Something vague about {topic}.", shown_first="ab"[k],
                                  pair_id=HOSTILE if p == 7 else None))
    return rows


def _review(pair: dict, label: str, cid: str, *, who: str = "rev-10", kind: str = "human", swap: bool = False, **over) -> dict:
    a, b = (pair["response_b"], pair["response_a"]) if swap else (pair["response_a"], pair["response_b"])
    row = {"comparison_id": cid, "review_of": pair["pair_id"], "prompt": pair["prompt"], "response_a": a, "response_b": b,
           "shown_first": "a", "label": label, "annotator_id": who, "annotator_kind": kind, "locale": "en",
           "created_at": "2026-11-25T10:00:00Z"}
    row.update(over)
    return row


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    store = Store(d / "store")
    v1 = curate([write_jsonl(d / "base.jsonl", _base_rows())], store, Policy()).version_id
    pairs = {r["prompt_text"].split("about ")[1].rstrip("."): r for r in store.get(v1).read("pairs").iter_rows(named=True)}
    P = [pairs[t] for t in TOPICS]
    assert {p["pair_id"] for p in P[:8]} == set(store.get(v1).read("routed.parquet")["pair_id"].to_list())
    reviews = [
        _review(P[0], "a", "r-0"),                                     # one decisive review -> a
        _review(P[1], "a", "r-1a"), _review(P[1], "b", "r-1b", who="rev-11"),  # a tie between reviews -> routed
        _review(P[2], "a", "r-2", who="judge-x", kind="ai"),            # an AI review never resolves
        _review(P[3], "b", "r-3", who="rev-unregistered"),              # resolves without a registry only
        _review(P[4], "tie", "r-4"),                                   # no decisive review -> routed
        _review(P[5], "a", "r-5a"), _review(P[5], "a", "r-5b", who="rev-11"),
        _review(P[5], "a", "r-5c", who="rev-12", swap=True),            # 'a' of the swapped pair = the pair's b: 2 a, 1 b
        _review(P[7], "b", "r-7"),                                     # the hostile id resolves like any pair
        _review(P[8], "b", "r-8"),                                     # never routed: an ordinary judgment
        _review({**P[0], "pair_id": "../../etc/passwd"}, "a", "r-u1", who="rev-13"),  # unknown pair
        _review({**P[0], "pair_id": "[link=https://evil.example]p[/link]"}, "b", "r-u2", who="rev-13"),
        _review({**P[6], "response_b": "A different response the pair never had."}, "a", "r-mm"),  # text mismatch
    ]
    batch = write_jsonl(d / "reviews.jsonl", reviews)
    return {"dir": d, "store": store, "v1": v1, "P": P, "batch": batch}


def _child(planted, policy: Policy, name: str):
    store = Store(planted["dir"] / name)
    shutil.copytree(planted["store"].root, store.root)
    before = tree(store.root / "versions" / planted["v1"])
    res = curate([planted["batch"]], store, policy, parent=planted["v1"])
    assert tree(store.root / "versions" / planted["v1"]) == before
    h = store.get(res.version_id)
    pairs = {r["pair_id"]: r for r in h.read("pairs").iter_rows(named=True)}
    return h, pairs


def test_resolution_rule(planted):
    h, pairs = _child(planted, Policy(), "store-resolve")
    P = [p["pair_id"] for p in planted["P"]]
    dec = {p: (pairs[p]["decision"], pairs[p]["label_consensus"]) for p in P[:8]}
    assert dec[P[0]] == ("keep", "a") and pairs[P[0]]["agreement"] == 1.0
    assert dec[P[1]] == ("route", "escalate")  # reviews tie
    assert dec[P[2]] == ("route", "escalate")  # only an AI reviewed it
    assert dec[P[3]] == ("keep", "b")  # any human counts without a registry
    assert dec[P[4]] == ("route", "escalate")  # no decisive review
    assert dec[P[5]] == ("keep", "a") and abs(pairs[P[5]]["agreement"] - 2 / 3) < 1e-9  # orientation respected
    assert dec[P[6]] == ("route", "escalate")  # the mismatching review was not merged into it
    assert dec[P[7]] == ("keep", "b")
    assert pairs[P[0]]["n_judgments"] == 3  # the originals are kept next to the review
    r = h.manifest().ledger.reviews
    assert (r.routed_ever, r.resolved, r.resolved_by_reviews, r.open, r.kept_routed_by_review_tie) == (8, 4, 4, 4, 1)
    assert r.reviewed == 7 and r.judgments == 14 and r.judgments_of_routed == 10
    # weight from the reviews: P5's DPO row weighs its agreement
    dpo = pl.concat([h.read(f"data/{s}") for s in ("train", "validation", "test")])
    w = dict(zip(dpo["pair_id"].to_list(), dpo["weight"].to_list(), strict=True))
    assert abs(w[P[5]] - 2 / 3) < 1e-6 and w[P[0]] == 1.0


def test_bad_reviews_are_flagged_with_a_reason_and_never_touch_the_pair(planted):
    h, pairs = _child(planted, Policy(), "store-flags")
    flags = h.read("flags").filter(pl.col("check") == "reviews")
    by = {r["subject_id"]: (r["reason"], r["detail"]) for r in flags.iter_rows(named=True)}
    assert by["r-u1"][0] == by["r-u2"][0] == "review_unknown_pair" and "../../etc/passwd" in by["r-u1"][1]
    assert by["r-mm"][0] == "review_text_mismatch" and planted["P"][6]["pair_id"] in by["r-mm"][1]
    assert by["r-8"][0] == "review_not_routed"
    assert set(by) == {"r-u1", "r-u2", "r-mm", "r-8"}
    P8 = planted["P"][8]["pair_id"]
    assert pairs[P8]["n_judgments"] == 3 and pairs[P8]["decision"] == "keep"  # an ordinary judgment of the pair
    assert not h.read("flags").filter(pl.col("reason") == "pair_id_conflict").height
    led = h.manifest().ledger
    assert led.judgments_dropped.get("review_unknown_pair") == 2 and led.judgments_dropped.get("review_text_mismatch") == 1


def test_show_prints_hostile_open_pair_ids_literally(planted, tmp_path):
    store = Store(tmp_path / "s")
    shutil.copytree(planted["store"].root, store.root)
    text = cli("show", planted["v1"], "--store", store.root).stdout
    assert "open reviews: 8 routed pairs waiting" in text
    assert HOSTILE in text  # printed as text, never as a style


def test_unqualified_reviewers_do_not_resolve(planted, tmp_path):
    reg = tmp_path / "annotators.csv"
    reg.write_text("annotator_id,annotator_kind,locales,rubrics,qualified_from,qualified_until\n"
                   "rev-01,human,,,,\nrev-02,human,,,,\nrev-10,human,,,,\nrev-11,human,,,,\n"
                   "rev-12,human,ja,,,\njudge-x,ai,,,,\n", encoding="utf-8")
    policy = Policy(annotators=load_registry(reg))
    h, pairs = _child(planted, policy, "store-registry")
    P = [p["pair_id"] for p in planted["P"]]
    assert pairs[P[3]]["decision"] == "route"  # rev-unregistered: unknown_annotator, does not resolve
    # rev-12 (qualified for ja only) reviewed P5 in en: unqualified, so only the two a's count
    assert pairs[P[5]]["decision"] == "keep" and pairs[P[5]]["agreement"] == 1.0
    assert pairs[P[0]]["decision"] == "keep"
    assert h.manifest().ledger.reviews.resolved_by_reviews == 3


@pytest.mark.parametrize("narrow", [False, True])
def test_a_reviewer_is_qualified_for_the_locale_of_the_pair_not_the_one_the_review_names(planted, tmp_path, narrow):
    """The pairs are en; rev-ja is qualified for ja only.  A review row naming ja, or no locale at all
    (a locale column edited or emptied in a spreadsheet between export and a JSONL import without
    --store), is still a review of an en pair: unqualified, it resolves nothing.  rev-en's does.
    ``narrow``: the parent was curated under the same policy, so the child reads its parent's rows
    without their locales (completed for the rows it needs)."""
    reg = tmp_path / "annotators.csv"
    reg.write_text("annotator_id,annotator_kind,locales,rubrics,qualified_from,qualified_until\n"
                   "rev-01,human,,,,\nrev-02,human,,,,\nrev-ja,human,ja,,,\nrev-en,human,en,,,\n", encoding="utf-8")
    policy = Policy(annotators=load_registry(reg))
    P = planted["P"]
    no_locale = _review(P[1], "b", "q-1", who="rev-ja")
    del no_locale["locale"]
    batch = write_jsonl(tmp_path / "reviews.jsonl", [_review(P[0], "a", "q-0", who="rev-ja", locale="ja-JP"), no_locale,
                                                     _review(P[2], "a", "q-2", who="rev-en")])
    store = Store(tmp_path / "store")
    if narrow:
        parent = curate([planted["dir"] / "base.jsonl"], store, policy).version_id
    else:
        shutil.copytree(planted["store"].root, store.root)
        parent = planted["v1"]
    h = store.get(curate([batch], store, policy, parent=parent).version_id)
    assert ("locale" in h.manifest().lineage.get("union", {}).get("deferred", [])) is narrow
    pairs = {r["pair_id"]: r for r in h.read("pairs").iter_rows(named=True)}
    assert [(pairs[p["pair_id"]]["decision"], pairs[p["pair_id"]]["label_consensus"]) for p in P[:3]] == \
        [("route", "escalate"), ("route", "escalate"), ("keep", "a")]
    assert h.manifest().ledger.reviews.resolved_by_reviews == 1
    summary = next(c for c in h.manifest().checks if c.name == "reviews").summary
    assert "2 unqualified" in summary and "1 qualified" in summary, summary


@pytest.mark.parametrize("narrow", [False, True])
def test_vote_mode_a_review_votes_only_if_its_reviewer_is_qualified_for_the_pairs_locale(tmp_path, narrow):
    """``reviews.mode = "vote"``: reviews are ordinary votes, so the registry *check* decides whether one counts.
    The pairs are ja-JP.  rev-en (qualified for en only) reviews P0 with its row's locale edited to en: it was
    qualified by the row and voted; the pair's locale decides -- flagged unqualified_reviewer, dropped.  rev-ja's
    review of P1 whose row says en (and another rubric) counts (the pair is ja-JP, helpful-v3).  ``narrow``: the parent built under the same policy
    (the child reads its parent's rows without their locales, completed for the checks)."""
    reg = tmp_path / "annotators.csv"
    reg.write_text("annotator_id,annotator_kind,locales,rubrics,qualified_from,qualified_until\n"
                   "rev-01,human,ja,,,\nrev-02,human,ja,,,\nrev-ja,human,ja,helpful-v3,,\nrev-en,human,en,,,\n",
                   encoding="utf-8")
    policy = Policy(annotators=load_registry(reg), reviews=ReviewsConfig(mode="vote"))
    store = Store(tmp_path / "store")
    base = write_jsonl(tmp_path / "base.jsonl", [{**r, "locale": "ja-JP", "rubric": "helpful-v3"} for r in _base_rows()])
    v1 = curate([base], store, policy if narrow else Policy(reviews=ReviewsConfig(mode="vote"))).version_id
    P = {r["prompt_text"].split("about ")[1].rstrip("."): r for r in store.get(v1).read("pairs").iter_rows(named=True)}
    P = [P[t] for t in TOPICS]
    # (j-1's rubric edited too: the pair's, helpful-v3, is the one rev-ja is qualified for)
    reviews = [_review(P[0], "a", "e-0", who="rev-en", locale="en"),
               _review(P[1], "a", "j-1", who="rev-ja", locale="en", rubric="harmless-v2")]
    h = store.get(curate([write_jsonl(tmp_path / "reviews.jsonl", reviews)], store, policy, parent=v1).version_id)
    assert ("locale" in h.manifest().lineage.get("union", {}).get("deferred", [])) is narrow
    flags = h.read("flags").filter(pl.col("check") == "registry")
    assert dict(flags.select("subject_id", "reason").iter_rows()) == {"e-0": "unqualified_reviewer"}
    assert "locale ja-JP outside the qualified locales (en)" in flags["detail"][0]
    assert h.manifest().ledger.judgments_dropped.get("unqualified_reviewer") == 1
    pairs = {r["pair_id"]: r for r in h.read("pairs").iter_rows(named=True)}
    assert (pairs[P[0]["pair_id"]]["n_judgments"], pairs[P[1]["pair_id"]]["n_judgments"]) == (2, 3)
    assert h.manifest().ledger.reviews.mode == "vote" and h.manifest().ledger.reviews.resolved_by_reviews == 0


@pytest.mark.parametrize("who", ["ai", "unqualified"])
def test_a_review_that_cannot_resolve_does_not_reopen_a_pair_resolved_before(planted, tmp_path, who):
    """P4, escalated in v1, is decided by five more votes in v2 (resolved, kept).  A late review of it in v3
    by an AI judge, or by a reviewer the registry does not qualify (kept: ``unqualified_reviewer = "warn"``),
    agrees with it -- and yet took P4 out
    of the training data and routed it again as escalate: only a qualified review decides a pair the
    lineage no longer routes; the others are ordinary judgments of it."""
    store = Store(tmp_path / "store")
    shutil.copytree(planted["store"].root, store.root)
    p4 = planted["P"][4]
    votes = [canonical(100 + k, comparison_id=f"v-{k}", label="a", annotator_id=f"rev-0{k + 3}", prompt=p4["prompt"],
                       response_a={"text": p4["response_a"], "model": "m-good"}, response_b=p4["response_b"],
                       shown_first="ab"[k % 2]) for k in range(5)]
    v2 = curate([write_jsonl(tmp_path / "votes.jsonl", votes)], store, Policy(), parent=planted["v1"]).version_id

    def fate(v: str) -> tuple:
        h = store.get(v)
        pair = h.read("pairs").filter(pl.col("pair_id") == p4["pair_id"]).row(0, named=True)
        st = h.read("review_state").filter(pl.col("pair_id") == p4["pair_id"]).row(0, named=True)
        return pair["decision"], pair["label_consensus"], st["status"], st["resolved_in"]

    assert fate(v2) == ("keep", "a", "resolved", v2)
    policy = Policy()
    if who == "unqualified":
        reg = tmp_path / "annotators.csv"
        reg.write_text("annotator_id,annotator_kind,locales,rubrics,qualified_from,qualified_until\n"
                       + "".join(f"rev-0{k},human,,,,\n" for k in range(1, 8)) + "rev-20,human,ja,,,\n", encoding="utf-8")
        # (warn: the registry check keeps the judgment, so it reaches the reviews' rule; dropped, it never would)
        policy = Policy(annotators=load_registry(reg), select=SelectConfig(flag_actions={"unqualified_reviewer": "warn"}))
    late = _review(p4, "a", "late-1", who="judge-x" if who == "ai" else "rev-20", kind="ai" if who == "ai" else "human")
    v3 = curate([write_jsonl(tmp_path / "late.jsonl", [late])], store, policy, parent=v2).version_id
    assert fate(v3) == ("keep", "a", "resolved", v2)
    r = store.get(v3).manifest().ledger.reviews
    assert (r.judgments_of_routed, r.reviewed, r.resolved_by_reviews) == (1, 1, 0) and r.resolved == 1


def test_vote_mode_counts_reviews_as_ordinary_votes(planted):
    policy = Policy(reviews=ReviewsConfig(mode="vote"))
    h, pairs = _child(planted, policy, "store-vote")
    P = [p["pair_id"] for p in planted["P"]]
    assert pairs[P[0]]["label_consensus"] == "escalate" and pairs[P[0]]["decision"] == "route"  # 2 escalate vs 1 a
    r = h.manifest().ledger.reviews
    assert r.mode == "vote" and r.resolved_by_reviews == 0 and r.routed_ever == r.resolved + r.open


# ---------------------------------------------------------------- ingest: review_of is a field
def test_review_of_is_a_typed_field_on_both_ingest_paths(tmp_path, monkeypatch):
    rows = [canonical(0, review_of="p-x", pair_id="p-x"), canonical(1, review_of="p-y"), canonical(2),
            canonical(3, review_of="p-z", pair_id="p-other"), canonical(4, review_of=""), canonical(5, review_of=7)]
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(ingest_mod, "FAST_JSONL", fast)
        res = ingest_files([path])
        results.append(res)
        j = res.judgments
        assert j["review_of"].to_list() == ["p-x", "p-y", None]
        assert j["pair_id"].to_list()[:2] == ["p-x", "p-y"]  # pair_id defaults to review_of
        assert j["extra"].null_count() == 3  # not an unknown field any more
        q = {r["line"]: r for r in res.quarantine.iter_rows(named=True)}
        assert q[4]["field"] == "review_of" and q[4]["reason"] == "invalid_value"
        assert '"p-z"' in q[4]["error"] and '"p-other"' in q[4]["error"] and "line 4" in q[4]["error"]
        assert q[5]["field"] == "review_of" and q[5]["reason"] == "invalid_value"
        assert q[6]["field"] == "review_of" and q[6]["reason"] == "invalid_type"
    assert results[0].judgments.drop("source_file").equals(results[1].judgments.drop("source_file"))


def test_review_of_in_csv_and_parquet(tmp_path):
    rows = [canonical(0, review_of="p-x"), canonical(1)]
    flat = [{**r, "prompt": r["prompt"][0]["content"], "response_a": r["response_a"]["text"]} for r in rows]
    flat = [{k: v for k, v in r.items() if k != "tags"} for r in flat]
    cols = list(flat[0])
    csv = tmp_path / "b.csv"
    import csv as csvmod

    with open(csv, "w", newline="", encoding="utf-8") as fh:
        w = csvmod.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in cols} for r in flat])
    pq = tmp_path / "b.parquet"
    pl.DataFrame(flat).write_parquet(pq)
    for path in (csv, pq):
        res = ingest_files([path])
        assert res.quarantine.height == 0, res.quarantine["error"].to_list()
        assert res.judgments["review_of"].to_list() == ["p-x", None]
        assert res.judgments["pair_id"][0] == "p-x"


def test_the_scripted_reviewer_is_deterministic(samples_round, tmp_path):
    out = tmp_path / "again.jsonl"
    subprocess.run([sys.executable, str(ROOT / "data" / "review_bot.py"), str(samples_round["dir"] / "tasks.jsonl"),
                    "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == (samples_round["dir"] / "answers.jsonl").read_bytes()


def test_validate_reports_a_review_of_another_pair_with_exit_code(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [canonical(0, review_of="p-z", pair_id="p-other")])
    res = cli("validate", path, "--json", code=None)
    assert res.exit_code in (1, 2)
    assert "review_of" in res.stdout and "p-other" in res.stdout


# ---------------------------------------------------------------- the inbox takes a review batch like any batch
@pytest.mark.slow
def test_inbox_takes_a_review_batch(planted, tmp_path):
    from flows.flows import process_inbox

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    shutil.copyfile(planted["dir"] / "base.jsonl", inbox / "a-base.jsonl")
    (inbox / "a-base.jsonl.done").touch()
    first = process_inbox(inbox=str(inbox), store=str(store))
    assert len(first) == 1 and "error" not in first[0]
    shutil.copyfile(planted["batch"], inbox / "b-reviews.jsonl")
    (inbox / "b-reviews.jsonl.done").touch()
    second = process_inbox(inbox=str(inbox), store=str(store))
    assert [o["batch"] for o in second] == ["b-reviews.jsonl"] and "error" not in second[0]
    child = Store(store).get(second[0]["version"])
    m = child.manifest()
    assert m.parent_version == first[0]["version"]
    assert m.ledger.reviews.resolved_by_reviews == 4 and m.ledger.reviews.open == 4
    assert process_inbox(inbox=str(inbox), store=str(store)) == []  # never processed twice
