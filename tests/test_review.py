"""Review round trip as files: ``prefpipe review export`` / ``review import`` for JSONL, Label Studio
and Argilla 2.x.

The tool exports are shaped as the tools document them:

* Label Studio JSON export, "Label Studio JSON format of annotated tasks":
  https://labelstud.io/guide/export (and https://labelstud.io/guide/task_format); the
  ``pairwise`` result (``value.selected`` = ``left`` / ``right``) as the Pairwise tag writes it:
  https://labelstud.io/tags/pairwise (source: web/libs/editor/src/tags/control/Pairwise.js);
  ``choices`` / ``textarea`` results: https://labelstud.io/tags/choices, https://labelstud.io/tags/textarea.
* Argilla 2.x exported records: https://docs.argilla.io/latest/how_to_guides/import_export/
  (``records.to_list(flatten=True)`` and the nested ``records.to_list()`` / ``to_disk``); here they
  are produced by the ``argilla`` SDK's own serializers (``Record.to_dict`` and the ``GenericIO``
  that ``records.to_list`` calls) from SDK ``Record`` / ``Response`` objects, so their shape is the
  tool's by construction.  The push goes through the real SDK against a fake server
  (``tests/argilla_mock.py``).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from argilla_mock import URL, FakeArgilla
from conftest import ROOT, canonical, write_jsonl
from typer.testing import CliRunner

from flows.cli import app
from pipeline.review.tasks import shown_first_for, task_id_for, text_hash
from pipeline.store import Store

runner = CliRunner()
HOSTILE_PAIR = "pair-[link=https://evil.example]x[/link]"
TOPICS = ["sourdough starters", "bicycle chains", "tax brackets", "sea turtles", "binary search", "opera librettos",
          "glacier melt", "chess openings", "moth migration", "solar panels", "cheese caves", "rail gauges",
          "violin varnish", "coral reefs", "compiler passes", "tea ceremonies", "volcanic soil", "kite design",
          "ant colonies", "paper sizes"]


def cli(*args: str | Path, code: int | None = 0):
    res = runner.invoke(app, [str(a) for a in args])
    if code is not None:
        assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    return res


def _rows() -> list[dict]:
    """20 pairs x 2 human judgments: 6 escalated (one multi-turn, one with a hostile pair id), 3 both
    bad, 3 ties, 8 kept."""
    rows = []
    for p, topic in enumerate(TOPICS):
        label = "escalate" if p < 6 else "both_bad" if p < 9 else "tie" if p < 12 else "a"
        prompt = [{"role": "user", "content": f"Tell me one surprising fact about {topic}."}]
        if p == 1:
            prompt = [{"role": "user", "content": f"I want to learn about {topic}."},
                      {"role": "assistant", "content": "Happy to help. What would you like to know?"},
                      {"role": "user", "content": f"Why do people argue about {topic}?"}]
        for k in range(2):
            rows.append(canonical(p * 2 + k, comparison_id=f"c-{p}-{k}", prompt=prompt, label=label,
                                  pair_id=HOSTILE_PAIR if p == 2 else None,
                                  response_a={"text": f"A careful answer about {topic}, with sources.", "model": "m-good"},
                                  response_b=f"Something vague about {topic}.", annotator_id=f"rev-0{k + 1}",
                                  shown_first="ab"[k], tags=["review-test"]))
    return [{k: v for k, v in r.items() if v is not None} for r in rows]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("review")
    batch = write_jsonl(d / "batch.jsonl", _rows())
    store = d / "store"
    vid = cli("curate", batch, "--store", store).stdout.strip().splitlines()[-1]
    routed = {r["pair_id"]: r for r in Store(store).resolve(vid).read("routed.parquet").iter_rows(named=True)}
    assert len(routed) == 12 and HOSTILE_PAIR in routed
    return {"dir": d, "store": store, "vid": vid, "routed": routed}


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256 (what "nothing stored changes" compares)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def export(built, fmt: str, out: Path, *extra: str) -> dict:
    res = cli("review", "export", built["vid"], "--store", built["store"], "--format", fmt, "--out", out, "--json", *extra)
    return json.loads(res.stdout)


def import_(built, fmt: str, file: Path, out: Path, *extra: str, code: int = 0, store: bool = True):
    args = ["review", "import", file, "--format", fmt, "--out", out, "--json", *extra]
    if store:
        args += ["--store", built["store"]]
    return cli(*args, code=code)


def by_pair(batch: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in batch.read_text(encoding="utf-8").splitlines():
        j = json.loads(line)
        out.setdefault(j["review_of"], []).append(j)
    return out


def text_of(r) -> str:
    return r["text"] if isinstance(r, dict) else r


def assert_faithful(judgment: dict, pair: dict) -> None:
    """A judgment carries the routed pair's exact texts, its id and the display order shown."""
    assert judgment["review_of"] == judgment["pair_id"] == pair["pair_id"]
    assert judgment["prompt"] == pair["prompt"]
    assert text_of(judgment["response_a"]) == pair["response_a"] and text_of(judgment["response_b"]) == pair["response_b"]
    assert judgment["shown_first"] == shown_first_for(judgment["review_version"], pair["pair_id"])
    assert judgment["annotator_kind"] == "human"


def validate_ok(batch: Path) -> None:
    res = cli("validate", batch, "--json")
    assert json.loads(res.stdout)["ok"] is True


# ---------------------------------------------------------------- display order
def test_display_order_is_seeded_by_version_and_pair_and_about_half_each():
    ids = [f"p-{i:04d}" for i in range(2000)]
    first = [shown_first_for("v-one", p) for p in ids]
    assert first == [shown_first_for("v-one", p) for p in ids]  # deterministic
    assert 900 < first.count("a") < 1100
    assert first != [shown_first_for("v-two", p) for p in ids]  # another version, another draw


# ---------------------------------------------------------------- export
def test_jsonl_export_rows_are_canonical_tasks_without_a_verdict(built):
    out = built["dir"] / "x" / "tasks.jsonl"
    res = export(built, "jsonl", out)
    assert res["tasks"] == 12 and res["by_reason"] == {"both_bad": 3, "escalate": 6, "tie": 3}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["pair_id"] for r in rows} == set(built["routed"])
    for r in rows:
        pair = built["routed"][r["pair_id"]]
        assert "label" not in r and r["review_of"] == r["pair_id"] and r["version_id"] == built["vid"]
        assert r["route"] == pair["route"] and r["task_id"] == task_id_for(built["vid"], r["pair_id"])
        assert r["shown_first"] == shown_first_for(built["vid"], r["pair_id"])
        assert r["prompt"] == pair["prompt"] and text_of(r["response_a"]) == pair["response_a"]
        first = r["response_a"] if r["shown_first"] == "a" else r["response_b"]
        assert r["response_1_hash"] == text_hash(text_of(first))
    assert {r["shown_first"] for r in rows} == {"a", "b"}  # both orders occur in this export


def test_reasons_filter(built):
    out = built["dir"] / "x" / "ties.jsonl"
    res = export(built, "jsonl", out, "--reasons", "tie,both_bad")
    assert res["by_reason"] == {"both_bad": 3, "tie": 3}
    assert {json.loads(x)["route"] for x in out.read_text().splitlines()} == {"tie", "both_bad"}
    res = export(built, "jsonl", out, "--reasons", "low_agreement")  # allowed, routed by no policy here
    assert res["tasks"] == 0 and out.read_text() == ""


def test_label_studio_tasks_and_config(built):
    out = built["dir"] / "x" / "ls-tasks.json"
    res = export(built, "label-studio", out, "--dimensions", "helpfulness,harmlessness")
    assert res["files"] == [str(out), str(out.with_suffix(".xml"))]
    tasks = json.loads(out.read_text())
    assert len(tasks) == 12 and all(set(t) == {"data"} for t in tasks)  # Label Studio's import format
    for t in tasks:
        d = t["data"]
        pair = built["routed"][d["pair_id"]]
        first, second = (pair["response_a"], pair["response_b"])[:: 1 if d["shown_first"] == "a" else -1]
        assert (d["response_1"], d["response_2"]) == (first, second) and d["prompt"] == pair["prompt_text"]
        assert d["version_id"] == built["vid"] and d["shown_first"] in ("a", "b")
    cfg = ET.fromstring(out.with_suffix(".xml").read_text())
    pw = cfg.find("Pairwise")
    assert pw.get("name") == "overall" and pw.get("toName") == "response_1,response_2"
    names = [c.get("name") for c in cfg.iter("Choices")]
    assert names == ["overall_other", "dim_helpfulness", "dim_harmlessness"]
    assert [c.get("alias") for c in cfg.find("Choices[@name='dim_helpfulness']")] == ["response_1", "response_2", "tie", "both_bad"]
    assert cfg.find("TextArea").get("name") == "critique"
    assert {t.get("value") for t in cfg.iter("Text")} == {"$prompt", "$response_1", "$response_2"}


# ---------------------------------------------------------------- Label Studio round trip
def _result(from_name: str, to_name: str, kind: str, value: dict) -> dict:
    return {"value": value, "id": uuid.uuid4().hex[:10], "from_name": from_name, "to_name": to_name, "type": kind,
            "origin": "manual"}


def _annotation(ann_id: int, task_id: int, user: int, result: list[dict], cancelled: bool = False) -> dict:
    """One entry of ``annotations`` as Label Studio's JSON export writes it (https://labelstud.io/guide/export)."""
    return {"id": ann_id, "completed_by": user, "result": result, "was_cancelled": cancelled, "ground_truth": False,
            "created_at": "2026-11-21T10:15:02.123456Z", "updated_at": "2026-11-21T10:15:02.123456Z",
            "draft_created_at": None, "lead_time": 42.7, "prediction": {}, "result_count": 0,
            "unique_id": str(uuid.uuid4()), "import_id": None, "last_action": None, "task": task_id, "project": 7,
            "updated_by": user, "parent_prediction": None, "parent_annotation": None, "last_created_by": None}


def label_studio_export(tasks: list[dict], answers: dict[int, list[dict]], drafts: dict[int, int] | None = None) -> list[dict]:
    """What Label Studio's "Export -> JSON" gives for imported ``tasks`` once reviewers have worked."""
    out = []
    for i, t in enumerate(tasks):
        ls_id = 100 + i
        anns = [_annotation(5000 + 10 * i + k, ls_id, a.get("user", 3), a["result"], a.get("cancelled", False))
                for k, a in enumerate(answers.get(i, []))]
        task = {"id": ls_id, "annotations": anns, "file_upload": "ls-tasks.json", "drafts": [], "predictions": [],
                "data": t["data"], "meta": {}, "created_at": "2026-11-21T09:00:00.000000Z",
                "updated_at": "2026-11-21T10:15:02.000000Z", "inner_id": i + 1, "total_annotations": len(anns),
                "cancelled_annotations": sum(a["was_cancelled"] for a in anns), "total_predictions": 0,
                "comment_count": 0, "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 7,
                "updated_by": 3, "comment_authors": []}
        for k in range((drafts or {}).get(i, 0)):  # snapshot export with "complete drafts"
            task["drafts"].append({"id": 900 + k, "user": "reviewer@example.org", "created_username": "reviewer",
                                   "created_ago": "1 hour", "result": [], "lead_time": 3.0, "was_postponed": False,
                                   "import_id": None, "created_at": "2026-11-21T10:00:00Z", "updated_at": "2026-11-21T10:00:00Z"})
        out.append(task)
    return out


def pick(side: str, dims: dict[str, str] | None = None, critique: str | None = None, user: int = 3) -> dict:
    result = [_result("overall", "overall", "pairwise", {"selected": side})]
    for d, v in (dims or {}).items():
        result.append(_result(f"dim_{d}", "prompt", "choices", {"choices": [v]}))
    if critique:
        result.append(_result("critique", "prompt", "textarea", {"text": [critique]}))
    return {"result": result, "user": user}


def other(verdict: str, user: int = 3) -> dict:
    return {"result": [_result("overall_other", "prompt", "choices", {"choices": [verdict]})], "user": user}


@pytest.fixture(scope="module")
def ls_round(built):
    d = built["dir"] / "ls"
    out = d / "tasks.json"
    export(built, "label-studio", out, "--dimensions", "helpfulness")
    tasks = json.loads(out.read_text())
    answers = {i: [pick("left" if i % 2 else "right", {"helpfulness": "response_1"}, critique=f"reason {i}")] for i in range(8)}
    answers[1].append(pick("right", user=4))  # a second reviewer on one task
    answers[8] = [other("both_bad")]
    answers[9] = [{"result": [], "cancelled": True}]  # skipped in Label Studio
    answers[10] = [{"result": [_result("critique", "prompt", "textarea", {"text": ["unsure"]})]}]  # no verdict
    exported = d / "ls-export.json"
    exported.write_text(json.dumps(label_studio_export(tasks, answers, drafts={10: 1})), encoding="utf-8")
    batch = d / "batch.jsonl"
    res = import_(built, "label-studio", exported, batch)
    return {"tasks": tasks, "answers": answers, "export": exported, "batch": batch, "result": json.loads(res.stdout)}


def test_label_studio_round_trip_maps_left_right_through_the_display_order(built, ls_round):
    judgments = by_pair(ls_round["batch"])
    tasks = ls_round["tasks"]
    orders = set()
    for i in range(8):
        data = tasks[i]["data"]
        (j, *more) = judgments[data["pair_id"]]
        assert_faithful(j, built["routed"][data["pair_id"]])
        picked_left = i % 2 == 1
        first, second = data["shown_first"], "b" if data["shown_first"] == "a" else "a"
        assert j["label"] == (first if picked_left else second), (i, data["shown_first"])
        assert j["dimensions"] == {"helpfulness": first}  # "response_1" is the first shown
        assert j["critique"] == f"reason {i}" and j["annotator_id"].startswith("ls-")
        assert j["created_at"].startswith("2026-11-21T10:15:02")
        orders.add((data["shown_first"], picked_left))
        if i == 1:
            assert [m["annotator_id"] for m in more] == ["ls-4"] and more[0]["label"] == second
    assert {o for o, _ in orders} == {"a", "b"}  # both display orders were exercised
    (j8,) = judgments[tasks[8]["data"]["pair_id"]]
    assert j8["label"] == "both_bad" and "dimensions" not in j8
    validate_ok(ls_round["batch"])


def test_label_studio_ledger_adds_up(ls_round):
    led = ls_round["result"]["ledger"]
    assert led == {"tasks_in": 12, "items_in": 14, "judgments_out": 10,
                   "skipped": {"cancelled": 1, "draft": 1, "no_verdict": 1, "unanswered": 1}}
    assert led["items_in"] == led["judgments_out"] + sum(led["skipped"].values())
    assert ls_round["result"]["checked_against"]


def test_import_without_store_checks_hashes_and_gives_the_same_verdicts(built, ls_round, tmp_path):
    batch = tmp_path / "nostore.jsonl"
    res = import_(built, "label-studio", ls_round["export"], batch, store=False)
    assert json.loads(res.stdout)["checked_against"] is None
    a, b = by_pair(batch), by_pair(ls_round["batch"])
    assert a.keys() == b.keys()
    for pid in a:
        for x, y in zip(a[pid], b[pid], strict=True):
            assert (x["label"], x["prompt"], text_of(x["response_a"]), x["comparison_id"]) == \
                   (y["label"], y["prompt"], text_of(y["response_a"]), y["comparison_id"])
    # the text report says the store was not consulted
    res = cli("review", "import", ls_round["export"], "--format", "label-studio", "--out", tmp_path / "b2.jsonl")
    assert "not checked against a store" in res.stdout and res.stdout.strip().endswith("b2.jsonl")


def test_import_then_curate_as_child(built, ls_round):
    """The imported batch curates as a child of the version, whose reviews resolve routed pairs
    (the rule itself: tests/test_review_loop.py)."""
    store_copy = built["dir"] / "store-copy"
    import shutil

    shutil.copytree(built["store"], store_copy)
    res = cli("curate", ls_round["batch"], "--store", store_copy, "--parent", built["vid"], "--json")
    summary, _ = json.JSONDecoder().raw_decode(res.stdout)
    assert summary["created"] is True
    child = Store(store_copy).resolve(summary["version_id"]).manifest()
    assert child.parent_version == built["vid"] and child.ledger.judgments_valid == 40 + 10
    r = child.ledger.reviews
    assert r.judgments == r.judgments_of_routed == 10 and r.routed_ever == 12 == r.resolved + r.open
    assert r.resolved_by_reviews > 0


# ---------------------------------------------------------------- Argilla round trip
@pytest.fixture
def fake_argilla():
    import argilla as rg

    server = FakeArgilla()
    client = server.client()
    previous = rg.Argilla._default_client
    rg.Argilla._default_client = client  # Settings.from_json builds SDK objects that ask for a client
    yield server, client
    rg.Argilla._default_client = previous


def argilla_answers(records: list[dict], answers: dict[int, list[tuple[str, dict, str]]]):
    """SDK ``Record`` objects from our ``records.json`` with ``Response``s added as the Argilla UI
    would: ``answers[i]`` = [(user_id, {question: value}, status)]."""
    import argilla as rg

    out = []
    for i, r in enumerate(records):
        rec = rg.Record.from_dict(r)
        for user, values, status in answers.get(i, []):
            for q, v in values.items():
                rec.responses.add(rg.Response(question_name=q, value=v, user_id=user, status=status))
        out.append(rec)
    return out


@pytest.fixture
def argilla_round(built, tmp_path, fake_argilla, monkeypatch):
    import argilla as rg
    from argilla.records._io import GenericIO

    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    out = tmp_path / "argilla-export"
    res = export(built, "argilla", out, "--dimensions", "harmlessness")
    assert res["pushed"] is None
    settings = rg.Settings.from_json(out / ".argilla" / "settings.json")  # the SDK reads our settings
    assert [f.name for f in settings.fields] == ["prompt", "response_1", "response_2"]
    assert [q.name for q in settings.questions] == ["overall", "dim_harmlessness", "critique"]
    assert {m.name for m in settings.metadata} >= {"pair_id", "version_id", "shown_first"}
    records = json.loads((out / "records.json").read_text())
    # shown a first, b first, a first, ...: the answered records show both orders whatever the
    # version id draws (it changes with the code version)
    rank = {id(r): i for side in "ab" for i, r in enumerate(x for x in records if x["metadata"]["shown_first"] == side)}
    records.sort(key=lambda r: (rank[id(r)], r["metadata"]["shown_first"]))
    u1, u2, u3 = (str(uuid.UUID(int=k)) for k in (1, 2, 3))
    answers = {i: [(u1, {"overall": "response_1" if i % 2 else "response_2", "dim_harmlessness": "response_2",
                         "critique": f"why {i}"}, "submitted")] for i in range(6)}
    answers[0].append((u2, {"overall": "tie"}, "submitted"))
    answers[6] = [(u1, {"overall": "response_1"}, "draft")]
    answers[7] = [(u3, {"overall": "response_2"}, "discarded")]
    answers[8] = [(u1, {"critique": "no idea"}, "submitted")]
    recs = argilla_answers(records, answers)
    flat = tmp_path / "argilla-records.json"  # dataset.records.to_list(flatten=True), dumped as JSON
    flat.write_text(json.dumps(GenericIO.to_list(recs, flatten=True), default=str), encoding="utf-8")
    nested = tmp_path / "argilla-nested.json"  # dataset.records.to_list() / to_json(): no response status
    nested.write_text(json.dumps(GenericIO.to_list(recs, flatten=False), default=str), encoding="utf-8")
    return {"out": out, "records": records, "answers": answers, "flat": flat, "nested": nested, "users": (u1, u2, u3)}


def test_argilla_round_trip(built, argilla_round, tmp_path):
    batch = tmp_path / "argilla-batch.jsonl"
    res = json.loads(import_(built, "argilla", argilla_round["flat"], batch).stdout)
    assert res["ledger"] == {"tasks_in": 12, "items_in": 13, "judgments_out": 7,
                             "skipped": {"discarded": 1, "draft": 1, "no_verdict": 1, "unanswered": 3}}
    judgments = by_pair(batch)
    u1, u2, _ = argilla_round["users"]
    for i in range(6):
        meta = argilla_round["records"][i]["metadata"]
        js = judgments[meta["pair_id"]]
        j = next(x for x in js if x["annotator_id"] == f"argilla-{u1}")
        assert_faithful(j, built["routed"][meta["pair_id"]])
        first, second = meta["shown_first"], "b" if meta["shown_first"] == "a" else "a"
        assert j["label"] == (first if i % 2 else second)
        assert j["dimensions"] == {"harmlessness": second} and j["critique"] == f"why {i}"
    assert [x["label"] for x in judgments[argilla_round["records"][0]["metadata"]["pair_id"]]
            if x["annotator_id"] == f"argilla-{u2}"] == ["tie"]
    assert {argilla_round["records"][i]["metadata"]["shown_first"] for i in range(6)} == {"a", "b"}
    validate_ok(batch)


def test_argilla_round_resolves_the_pairs_in_a_child(built, argilla_round, tmp_path):
    """Five records got one decisive submitted answer: resolved; record 0 got a decisive answer and a
    tie from another reviewer: a tie between reviews keeps it routed; drafts and discarded ones never count."""
    import shutil

    batch = tmp_path / "argilla-batch.jsonl"
    import_(built, "argilla", argilla_round["flat"], batch)
    store = tmp_path / "store"
    shutil.copytree(built["store"], store)
    summary, _ = json.JSONDecoder().raw_decode(cli("curate", batch, "--store", store, "--parent", built["vid"], "--json").stdout)
    child = Store(store).resolve(summary["version_id"])
    r = child.manifest().ledger.reviews
    assert (r.judgments, r.reviewed, r.resolved_by_reviews, r.kept_routed_by_review_tie) == (7, 6, 5, 1)
    assert r.exported == 12 and r.routed_ever == 12 == r.resolved + r.open
    still = set(child.read("routed.parquet")["pair_id"].to_list())
    recs = argilla_round["records"]
    assert recs[0]["metadata"]["pair_id"] in still
    assert not {recs[i]["metadata"]["pair_id"] for i in range(1, 6)} & still
    assert {recs[i]["metadata"]["pair_id"] for i in (6, 7, 8)} <= still


def test_argilla_nested_export_without_statuses_is_not_trusted(built, argilla_round, tmp_path):
    res = json.loads(import_(built, "argilla", argilla_round["nested"], tmp_path / "n.jsonl").stdout)
    led = res["ledger"]
    assert led["judgments_out"] == 0 and led["skipped"]["status_missing"] == 10 and led["skipped"]["unanswered"] == 3
    # the same records with each response's status (as the REST API returns them) are read
    nested = json.loads(argilla_round["nested"].read_text())
    flat = {r["id"]: r for r in json.loads(argilla_round["flat"].read_text())}
    for rec in nested:
        for q, items in rec["responses"].items():
            statuses = dict(zip(flat[rec["id"]][f"{q}.responses.users"], flat[rec["id"]][f"{q}.responses.status"], strict=True))
            for item in items:
                item["status"] = statuses[item["user_id"]]
    with_status = tmp_path / "nested-status.json"
    with_status.write_text(json.dumps(nested), encoding="utf-8")
    res = json.loads(import_(built, "argilla", with_status, tmp_path / "s.jsonl").stdout)
    assert res["ledger"]["judgments_out"] == 7


def test_argilla_push_creates_the_dataset_through_the_sdk(built, tmp_path, fake_argilla, monkeypatch):
    import argilla as rg

    server, client = fake_argilla
    monkeypatch.setenv("ARGILLA_API_URL", URL)
    monkeypatch.setenv("ARGILLA_API_KEY", "test-key")
    monkeypatch.setattr(rg, "Argilla", lambda api_url, api_key: client)
    # the SDK prints its notes ("batch size ... normalized") to stdout when it thinks it runs in a notebook (so it did
    # under pytest-xdist's workers): --json's stdout stays one JSON document (export() parses all of it)
    from argilla._helpers._log import LoggingMixin

    monkeypatch.setattr(LoggingMixin, "_is_interactive", staticmethod(lambda: True))
    out = tmp_path / "pushed"
    res = export(built, "argilla", out, "--dimensions", "helpfulness", "--dataset-name", "review-round-1")
    assert res["pushed"] and (out / "records.json").is_file()
    sent = server.records("review-round-1")
    assert len(sent) == 12 and {r["external_id"] for r in sent} == {r["id"] for r in json.loads((out / "records.json").read_text())}
    questions = [q["name"] for (_, sub), items in server.children.items() if sub == "questions" for q in items]
    assert questions == ["overall", "dim_helpfulness", "critique"]
    # the same name again: refused, nothing written, nothing added on the server
    again = tmp_path / "again"
    res = cli("review", "export", built["vid"], "--store", built["store"], "--format", "argilla", "--out", again,
              "--dataset-name", "review-round-1", code=2)
    assert "already exists" in res.output and not again.exists() and len(server.records("review-round-1")) == 12
    # --no-push writes to disk only
    cli("review", "export", built["vid"], "--store", built["store"], "--format", "argilla", "--out", tmp_path / "local",
        "--dataset-name", "review-round-1", "--no-push")
    assert (tmp_path / "local" / "records.json").is_file()


# ---------------------------------------------------------------- JSONL round trip
def test_jsonl_round_trip_with_label_or_choice(built, tmp_path):
    out = tmp_path / "tasks.jsonl"
    export(built, "jsonl", out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for i, r in enumerate(rows):
        if i < 4:
            r.update(annotator_id="rev-09", choice="second", dimensions={"honesty": "first"})
        elif i < 8:
            r.update(annotator_id="rev-10", label="a", critique="a is right")
        elif i == 8:
            r.update(annotator_id="rev-10", label="a", choice="first" if r["shown_first"] == "b" else "second")  # disagree
        elif i == 9:
            r.update(annotator_id="rev-10")  # no verdict
    done = write_jsonl(tmp_path / "done.jsonl", rows)
    batch = tmp_path / "batch.jsonl"
    res = json.loads(import_(built, "jsonl", done, batch).stdout)
    assert res["ledger"] == {"tasks_in": 12, "items_in": 12, "judgments_out": 8,
                             "skipped": {"conflicting_verdict": 1, "no_verdict": 1, "unanswered": 2}}
    judgments = by_pair(batch)
    for i, r in enumerate(rows[:8]):
        (j,) = judgments[r["pair_id"]]
        assert_faithful(j, built["routed"][r["pair_id"]])
        second = "b" if r["shown_first"] == "a" else "a"
        assert j["label"] == (second if i < 4 else "a")
        if i < 4:
            assert j["dimensions"] == {"honesty": r["shown_first"]}
    validate_ok(batch)


def test_jsonl_reimport_of_the_same_answers_in_another_row_order_gives_the_same_comparison_ids(built, tmp_path):
    """A spreadsheet or script that sorts the rows (or drops the unanswered ones) before saving gives the same
    answers: importing them again gives the same ids, so a child of the first import's child finds them
    ``already_in_parent`` (they were keyed by line number: every id changed)."""
    out = tmp_path / "tasks.jsonl"
    export(built, "jsonl", out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for i, r in enumerate(rows[:6]):
        r.update(annotator_id=f"rev-{i % 2}", label="ab"[i % 2])
    rows.append({**rows[0], "annotator_id": "rev-7", "label": "b"})  # a second reviewer of task 0
    ids = []
    for name, order in (("one", rows), ("two", [r for r in reversed(rows) if r.get("annotator_id")])):
        batch = tmp_path / f"{name}.jsonl"
        import_(built, "jsonl", write_jsonl(tmp_path / f"done-{name}.jsonl", order), batch)
        ids.append({(j["comparison_id"], j["review_of"], j["annotator_id"], j["label"])
                    for j in map(json.loads, batch.read_text().splitlines())})
    assert len(ids[0]) == 7 and ids[0] == ids[1]


# ---------------------------------------------------------------- bad input: exit 2, nothing written
@pytest.fixture
def ls_tasks(built, tmp_path):
    out = tmp_path / "t.json"
    export(built, "label-studio", out)
    return json.loads(out.read_text())


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def refuse(built, fmt: str, file: Path, *needles: str, store: bool = True) -> str:
    before = tree(built["store"])
    out = file.with_name("never.jsonl")
    res = import_(built, fmt, file, out, code=2, store=store)
    assert not out.exists() and tree(built["store"]) == before
    assert res.output.startswith("error:") and str(file) in res.output, res.output
    for n in needles:
        assert n in res.output, (n, res.output)
    return res.output


def test_a_pair_the_version_never_routed_is_refused(built, ls_tasks, tmp_path):
    kept_pair = next(p for p in Store(built["store"]).resolve(built["vid"]).read("pairs.parquet")["pair_id"]
                     if p not in built["routed"])
    data = ls_tasks[3]["data"]
    data.update(pair_id=kept_pair, task_id=task_id_for(built["vid"], kept_pair), shown_first=shown_first_for(built["vid"], kept_pair))
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {3: [pick("left")]}))
    refuse(built, "label-studio", f, "tasks[3]", "'pair_id'", "never routed")


def test_texts_that_differ_from_the_pair_are_refused(built, ls_tasks, tmp_path):
    ls_tasks[2]["data"]["response_2"] += " (edited in the tool)"
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {2: [pick("left")]}))
    refuse(built, "label-studio", f, "tasks[2]", "'response_2'", "differs", store=False)
    # an edit that also rewrites the hash passes the hash check but not the store's texts
    ls_tasks[2]["data"]["response_2_hash"] = text_hash(ls_tasks[2]["data"]["response_2"])
    f = _write(tmp_path / "ls2.json", label_studio_export(ls_tasks, {2: [pick("left")]}))
    refuse(built, "label-studio", f, "tasks[2]", "'response_2'", "differs from the pair's")


def test_a_task_of_a_version_the_store_does_not_have_is_refused_with_its_place(built, ls_tasks, tmp_path):
    d = ls_tasks[6]["data"]
    d.update(version_id="v-ffffffffffffffff", task_id=task_id_for("v-ffffffffffffffff", d["pair_id"]),
             shown_first=shown_first_for("v-ffffffffffffffff", d["pair_id"]))
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {6: [pick("left")]}))
    refuse(built, "label-studio", f, "tasks[6]", "'version_id'", "no version 'v-ffffffffffffffff'")


def test_a_swapped_display_order_is_refused(built, ls_tasks, tmp_path):
    d = ls_tasks[4]["data"]
    d["shown_first"] = "b" if d["shown_first"] == "a" else "a"
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {4: [pick("left")]}))
    refuse(built, "label-studio", f, "tasks[4]", "'shown_first'", store=False)


@pytest.mark.parametrize("field,value,named", [("task_id", "../../etc/passwd", "task_id"),
                                               ("version_id", "[bold]v-x[/bold]", "version_id"),
                                               # a pair id is data, not a path, but the task id binds it
                                               ("pair_id", "[link=https://evil.example]p[/link]", "task_id")])
def test_markup_and_paths_in_ids_are_refused_and_shown_literally(built, ls_tasks, tmp_path, field, value, named):
    ls_tasks[0]["data"][field] = value
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {0: [pick("left")]}))
    out = refuse(built, "label-studio", f, "tasks[0]", f"'{named}'")
    assert value in out  # printed literally, not interpreted


def test_a_routed_pair_with_a_hostile_id_round_trips_literally(built, ls_tasks, tmp_path):
    """Pair ids are data, never paths: a routed pair whose id holds markup exports and imports as is."""
    i = next(k for k, t in enumerate(ls_tasks) if t["data"]["pair_id"] == HOSTILE_PAIR)
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {i: [pick("left")]}))
    batch = tmp_path / "b.jsonl"
    import_(built, "label-studio", f, batch)
    (j,) = by_pair(batch)[HOSTILE_PAIR]
    assert_faithful(j, built["routed"][HOSTILE_PAIR])


def test_wrong_tool_shape_is_named(built, ls_round, tmp_path):
    refuse(built, "argilla", ls_round["export"], "looks like a Label Studio JSON export", "--format label-studio")
    refuse(built, "jsonl", ls_round["export"], "line 1", "not a prefpipe review task row")
    pretty = _write(tmp_path / "pretty.json", json.loads(ls_round["export"].read_text()))
    pretty.write_text(json.dumps(json.loads(pretty.read_text()), indent=2), encoding="utf-8")
    refuse(built, "jsonl", pretty, "line 1", "looks like a Label Studio JSON export")
    records = [{"id": "x", "status": "completed", "_server_id": None, "prompt": "p", "response_1": "a", "response_2": "b",
                "overall.responses": ["response_1"], "overall.responses.users": ["u"], "overall.responses.status": ["submitted"]}]
    refuse(built, "label-studio", _write(tmp_path / "argilla.json", records), "looks like Argilla records")
    refuse(built, "label-studio", _write(tmp_path / "min.json", [{"prompt": "p", "overall": "left"}]), "not a Label Studio JSON export")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    refuse(built, "label-studio", tmp_path / "bin.json", "not UTF-8")


def test_an_unknown_pairwise_value_is_refused_with_its_place(built, ls_tasks, tmp_path):
    ans = pick("left")
    ans["result"][0]["value"]["selected"] = "up"
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {5: [ans]}))
    refuse(built, "label-studio", f, "tasks[5].annotations[0].result[0]", "'value.selected'", "'up'")


def test_conflicting_verdicts_are_counted(built, ls_tasks, tmp_path):
    ans = pick("left")
    ans["result"] += other("tie")["result"]
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {5: [ans]}))
    res = json.loads(import_(built, "label-studio", f, tmp_path / "b.jsonl").stdout)
    assert res["ledger"]["skipped"] == {"conflicting_verdict": 1, "unanswered": 11}


@pytest.mark.parametrize("second,field", [(lambda: pick("right")["result"][0], "overall"),
                                          (lambda: other("escalate")["result"][0], "overall_other"),
                                          (lambda: _result("dim_helpfulness", "prompt", "choices", {"choices": ["response_2"]}),
                                           "dim_helpfulness")])
def test_label_studio_a_control_answered_twice_in_one_annotation_is_refused_not_overwritten(built, ls_tasks, tmp_path,
                                                                                            second, field):
    """One annotation holds one result per control; a second one (an annotation edited through the API,
    a merged export) used to overwrite the first in silence: the last ``selected`` won."""
    ans = other("tie") if field == "overall_other" else pick("left", {"helpfulness": "response_1"})
    ans["result"].append(second())
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {5: [ans]}))
    refuse(built, "label-studio", f, f"tasks[5].annotations[0].result[{len(ans['result']) - 1}]", f"'{field}'",
           "answered twice")


def test_export_usage_errors_exit_2_and_write_nothing(built, tmp_path):
    before = tree(built["store"])
    out = tmp_path / "never.json"
    base = ["review", "export", built["vid"], "--store", built["store"], "--out", out]
    for args, needle in ((["--format", "csv"], "unknown review format"),
                         (["--format", "jsonl", "--reasons", "tie,maybe"], "unknown routing reason"),
                         (["--format", "label-studio", "--dimensions", "Helpful-ness"], "not allowed"),
                         (["--format", "label-studio", "--dimensions", "critique"], "reserved"),
                         (["--format", "argilla", "--dataset-name", "../up"], "not allowed")):
        res = cli(*base, *args, code=2)
        assert needle in res.output, res.output
    res = cli("review", "export", "v-nope", "--store", built["store"], "--format", "jsonl", "--out", out, code=2)
    assert "no version" in res.output
    res = cli("review", "export", built["vid"], "--store", built["store"], "--format", "jsonl",
              "--out", built["store"] / "versions" / built["vid"] / "routed.parquet", code=2)
    assert "inside the store" in res.output
    assert not out.exists() and tree(built["store"]) == before


def test_import_usage_errors(built, ls_round, tmp_path):
    res = cli("review", "import", ls_round["export"], "--format", "label-studio", "--out", tmp_path / "b.jsonl",
              "--version", built["vid"], code=2)
    assert "--version needs --store" in res.output
    other_version = "v-0000000000000000"
    res = cli("review", "import", ls_round["export"], "--format", "label-studio", "--out", tmp_path / "b.jsonl",
              "--store", built["store"], "--version", other_version, code=2)
    assert other_version in res.output and not (tmp_path / "b.jsonl").exists()


def test_bad_import_in_a_real_process_prints_no_traceback(built, ls_tasks, tmp_path):
    ls_tasks[1]["data"]["task_id"] = "../x"
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {1: [pick("left")]}))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "review", "import", str(f), "--format", "label-studio",
                           "--out", str(tmp_path / "b.jsonl")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "tasks[1]" in proc.stderr and "'task_id'" in proc.stderr and not (tmp_path / "b.jsonl").exists()


@pytest.mark.parametrize("where,field,mutate", [
    ("result[1]", "value.choices", lambda a: a["result"][1]["value"].update(choices=[["response_1"]])),
    ("result[1]", "value.choices", lambda a: a["result"][1]["value"].update(choices=[{"alias": "response_1"}])),
    ("annotations[0]", "completed_by", lambda a: a.update(completed_by=[3, 4])),
    ("annotations[0]", "completed_by", lambda a: a.update(completed_by=True)),
    ("annotations[0]", "completed_by", lambda a: a.update(completed_by=2.5)),
    ("annotations[0]", "completed_by", lambda a: a.update(completed_by={"id": {"nested": 1}})),
    ("annotations[0]", "was_cancelled", lambda a: a.update(was_cancelled="false")),
])
def test_label_studio_values_of_the_wrong_json_type_are_refused_with_their_place(built, ls_tasks, tmp_path, where,
                                                                                  field, mutate):
    """A value of the wrong JSON type is exit 2 naming it, never a traceback nor coerced (``ls-[3, 4]``,
    ``ls-True``; a ``was_cancelled`` of ``"false"`` counted as cancelled)."""
    doc = label_studio_export(ls_tasks, {5: [pick("left", {"helpfulness": "response_1"})]})
    mutate(doc[5]["annotations"][0])
    refuse(built, "label-studio", _write(tmp_path / "ls.json", doc), "tasks[5].annotations[0]", where, f"'{field}'")


def _argilla_nested(built, tmp_path, responses: dict) -> Path:
    out = tmp_path / "argilla-export"
    export(built, "argilla", out, "--no-push")
    records = json.loads((out / "records.json").read_text())
    records[2]["responses"] = responses
    return _write(tmp_path / "nested.json", records)


@pytest.mark.parametrize("field,responses", [
    ("overall", {"overall": [{"value": ["response_1"], "user_id": "u1", "status": "submitted"}]}),
    ("status", {"overall": [{"value": "response_1", "user_id": "u1", "status": ["submitted"]}]}),
    ("dim_harmlessness", {"overall": [{"value": "response_1", "user_id": "u1", "status": "submitted"}],
                          "dim_harmlessness": [{"value": {"v": "tie"}, "user_id": "u1", "status": "submitted"}]}),
    ("overall.responses", {"overall": [{"value": "response_1", "user_id": {"id": "u1"}, "status": "submitted"}]}),
    ("overall.responses", {"overall": [{"value": "response_1", "user_id": ["u1"], "status": "submitted"}]}),
])
def test_argilla_values_of_the_wrong_json_type_are_refused_with_their_place(built, tmp_path, monkeypatch, field, responses):
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    refuse(built, "argilla", _argilla_nested(built, tmp_path, responses), "records[2]", f"'{field}'")


def test_argilla_two_responses_of_one_user_to_one_question_are_refused_not_collapsed(built, tmp_path, monkeypatch):
    """Two answers of one reviewer to the same question of a record: exit 2 naming them, never
    one of them kept in silence (the ledger must account for every answer)."""
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    twice = {"overall": [{"value": "response_1", "user_id": "u1", "status": "submitted"},
                         {"value": "response_2", "user_id": "u1", "status": "submitted"}]}
    refuse(built, "argilla", _argilla_nested(built, tmp_path, twice), "records[2]", "'overall.responses'", "twice", "u1")


def test_a_key_written_twice_is_refused_in_every_format(built, ls_tasks, tmp_path, monkeypatch):
    """``{"label": "a", "label": "b"}``: a JSON reader keeps one value in silence, so which verdict
    the reviewer gave is unknown; exit 2 naming the place and the key, as for raw batches."""
    out = tmp_path / "tasks.jsonl"
    export(built, "jsonl", out)
    row = json.loads(out.read_text().splitlines()[0])
    row.update(annotator_id="rev-09", label="a")
    line = json.dumps(row)[:-1] + ', "label": "b"}'
    (tmp_path / "rows.jsonl").write_text(json.dumps(dict(row, label=None)) + "\n" + line + "\n", encoding="utf-8")
    refuse(built, "jsonl", tmp_path / "rows.jsonl", "line 2", "'label' twice")
    text = json.dumps(label_studio_export(ls_tasks, {5: [pick("left")]}))
    text = text.replace('"selected": "left"', '"selected": "left", "selected": "right"')
    (tmp_path / "ls.json").write_text(text, encoding="utf-8")
    refuse(built, "label-studio", tmp_path / "ls.json", "'selected' twice")
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    nested = _argilla_nested(built, tmp_path, {"overall": [{"value": "response_1", "user_id": "u1", "status": "submitted"}]})
    nested.write_text(nested.read_text().replace('"user_id": "u1"', '"user_id": "u1", "user_id": "u2"'), encoding="utf-8")
    refuse(built, "argilla", nested, "'user_id' twice")


@pytest.mark.parametrize("fmt", ["jsonl", "label-studio", "argilla"])
@pytest.mark.parametrize("content", [b"", b"\n \n"])
def test_an_empty_file_is_refused_in_every_format(built, tmp_path, fmt, content):
    """A zero-byte (or blank) file is no tool's export (a failed download, a file saved before the
    export finished): exit 2 naming it, not an empty batch with exit 0."""
    f = tmp_path / "answers.json"
    f.write_bytes(content)
    refuse(built, fmt, f, "empty")


@pytest.mark.parametrize("field,value", [("review_of", "p-0000000000000000"), ("comparison_id", {"id": 1}),
                                         ("comparison_id", 7)])
def test_jsonl_an_edited_review_of_or_a_non_string_comparison_id_is_refused(built, tmp_path, field, value):
    """The row's ``review_of`` was replaced by the task's pair id in silence (the reviewer's tool said
    another pair), and a ``comparison_id`` object was coerced into the answer's key: exit 2 naming the field."""
    out = tmp_path / "tasks.jsonl"
    export(built, "jsonl", out)
    row = json.loads(out.read_text().splitlines()[0])
    row.update({"annotator_id": "rev-09", "label": "a", field: value})
    refuse(built, "jsonl", write_jsonl(tmp_path / "rows.jsonl", [row]), "line 1", f"'{field}'")


@pytest.mark.parametrize("text", [5, ["fine", 5], {"t": "x"}])
def test_label_studio_a_critique_that_is_not_text_is_refused_not_dropped(built, ls_tasks, tmp_path, text):
    ans = pick("left")
    ans["result"].append(_result("critique", "prompt", "textarea", {"text": text}))
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {5: [ans]}))
    refuse(built, "label-studio", f, "tasks[5].annotations[0].result[1]", "'value.text'")


def test_a_truncated_file_names_the_place_where_it_breaks(built, tmp_path, monkeypatch):
    """Argilla records as JSON Lines cut inside line 5 said "line 1 column 2873"; a pretty-printed
    JSON list cut near its end said "line 1 column 2" (the error of reading its first line as JSON
    Lines); review rows cut inside line 2 said "line 2: ... line 1 column 557"."""
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    out = tmp_path / "argilla-export"
    export(built, "argilla", out, "--no-push")
    records = json.loads((out / "records.json").read_text())
    lines = "".join(json.dumps(r) + "\n" for r in records[:5])
    (tmp_path / "cut.jsonl").write_text(lines[:-100], encoding="utf-8")
    msg = refuse(built, "argilla", tmp_path / "cut.jsonl", "line 5")
    assert "line 1" not in msg
    pretty = json.dumps(records[:3], indent=2)[:-300]
    (tmp_path / "cut.json").write_text(pretty, encoding="utf-8")
    msg = refuse(built, "argilla", tmp_path / "cut.json", "not JSON")
    assert "line 1 column 2 " not in msg and f"line {pretty.count(chr(10)) + 1}" in msg
    export(built, "jsonl", tmp_path / "tasks.jsonl")  # the same for review rows cut inside line 2
    (tmp_path / "cut-rows.jsonl").write_text("".join((tmp_path / "tasks.jsonl").read_text().splitlines(True)[:2])[:-50])
    msg = refuse(built, "jsonl", tmp_path / "cut-rows.jsonl", "line 2")
    assert "line 1" not in msg


def test_label_studio_results_of_controls_we_did_not_make_are_ignored(built, ls_tasks, tmp_path):
    """A team's own controls in the labeling config -- a relation (no ``value`` at all), a rating -- are not ours
    to read: the verdict is imported and they are passed over (a relation was refused as a result without a value)."""
    ans = pick("left")
    ans["result"] += [{"from_id": "a1", "to_id": "b2", "type": "relation", "direction": "right", "labels": []},
                      _result("team_rating", "prompt", "rating", {"rating": 4})]
    f = _write(tmp_path / "ls.json", label_studio_export(ls_tasks, {5: [ans]}))
    out = tmp_path / "batch.jsonl"
    res = import_(built, "label-studio", f, out)
    assert json.loads(res.stdout)["ledger"]["judgments_out"] == 1
    ours = pick("left")
    ours["result"].append({"from_name": "overall_other", "to_name": "prompt", "type": "choices"})  # ours, no value
    f = _write(tmp_path / "ls2.json", label_studio_export(ls_tasks, {5: [ours]}))
    refuse(built, "label-studio", f, "tasks[5].annotations[0].result[1]", "'value'")


def test_gc_keeps_a_version_a_review_export_is_reading(built, tmp_path, monkeypatch):
    """`prefpipe gc --delete V --apply` while `review export V` reads it: V stays (listed as in use), the
    export is written whole; once the export is done, gc removes V.  (Without the hold the gc removed V
    under the export, which then failed reading its routed pairs.)"""
    import shutil

    import pipeline.review as review
    from pipeline.parts import collect_garbage, plan_gc

    st = Store(tmp_path / "store")
    shutil.copytree(built["store"], st.root)
    vid, seen = built["vid"], {}
    read = review.routed_pairs

    def read_after_gc(handle):  # a gc run in another process, in the middle of the export
        plan = plan_gc(st, delete_versions=[vid])
        seen["planned"], seen["in_use"] = list(plan.versions), list(plan.in_use)
        seen["removed"] = collect_garbage(st, plan).versions
        return read(handle)

    monkeypatch.setattr(review, "routed_pairs", read_after_gc)
    res = review.export_review(st, vid, fmt="jsonl", out=tmp_path / "tasks.jsonl")
    assert seen == {"planned": [], "in_use": [vid], "removed": []}, seen
    assert res.tasks == 12 and len((tmp_path / "tasks.jsonl").read_text().splitlines()) == 12
    assert st.exists(vid) and st.get(vid).verify() == []
    monkeypatch.setattr(review, "routed_pairs", read)
    assert collect_garbage(st, plan_gc(st, delete_versions=[vid])).versions == [vid] and not st.exists(vid)


def test_a_review_export_of_a_version_gc_removed_before_the_hold_writes_nothing(built, tmp_path, monkeypatch):
    """The version removed between its lookup and the hold: a clear error (exit 2 in the CLI), nothing written."""
    import shutil

    import pipeline.review as review
    from pipeline.parts import collect_garbage, plan_gc
    from pipeline.store import VersionNotFound

    st = Store(tmp_path / "store")
    shutil.copytree(built["store"], st.root)
    vid = built["vid"]
    hold = Store.in_use

    def gc_then_hold(self, version_id):
        collect_garbage(self, plan_gc(self, delete_versions=[version_id]))
        return hold(self, version_id)

    monkeypatch.setattr(Store, "in_use", gc_then_hold)
    with pytest.raises(VersionNotFound, match="removed"):
        review.export_review(st, vid, fmt="jsonl", out=tmp_path / "tasks.jsonl")
    assert not (tmp_path / "tasks.jsonl").exists()


# ---------------------------------------------------------------- the pair's rubric: out with the task, back on import
REGISTRY_RUBRIC = ("annotator_id,annotator_kind,locales,rubrics,qualified_from,qualified_until\n"
                   "rev-01,human,,,,\nrev-02,human,,,,\nls-3,human,,safety-v1,,\n")


@pytest.fixture(scope="module")
def rubric_built(tmp_path_factory):
    """Two escalated pairs judged under rubric helpful-v3 (the second pair's first judgment says none)."""
    d = tmp_path_factory.mktemp("rubric")
    rows = []
    for p, topic in enumerate(["tides", "lichens"]):
        for k in range(2):
            rows.append(canonical(p * 2 + k, comparison_id=f"r-{p}-{k}", label="escalate", annotator_id=f"rev-0{k + 1}",
                                  prompt=[{"role": "user", "content": f"Tell me about {topic}."}],
                                  response_a=f"A careful answer about {topic}.", response_b=f"Vague {topic}.",
                                  rubric="helpful-v3" if p == 0 or k == 1 else ...))
    store = d / "store"
    vid = cli("curate", write_jsonl(d / "batch.jsonl", rows), "--store", store).stdout.strip().splitlines()[-1]
    routed = {r["pair_id"]: r for r in Store(store).resolve(vid).read("routed.parquet").iter_rows(named=True)}
    assert len(routed) == 2
    return {"dir": d, "store": store, "vid": vid, "routed": routed}


def test_the_pairs_rubric_goes_out_with_every_format_and_comes_back_from_the_store(rubric_built, tmp_path, fake_argilla):
    """Label Studio and Argilla reviews came back without a rubric, so a registry's rubric qualification was never
    checked on them.  Every format now carries the pair's rubric (the first its judgments give); with --store the
    pair's rubric is written whatever the tool sent back (one edited in the task data); without --store the tool's."""
    b = rubric_built
    ls = tmp_path / "ls.json"
    export(b, "label-studio", ls)
    tasks = json.loads(ls.read_text())
    assert [t["data"]["rubric"] for t in tasks] == ["helpful-v3", "helpful-v3"]
    export(b, "jsonl", tmp_path / "tasks.jsonl")
    assert [json.loads(x)["rubric"] for x in (tmp_path / "tasks.jsonl").read_text().splitlines()] == ["helpful-v3"] * 2
    export(b, "argilla", tmp_path / "argilla", "--no-push")
    records = json.loads((tmp_path / "argilla" / "records.json").read_text())
    assert [r["metadata"]["rubric"] for r in records] == ["helpful-v3", "helpful-v3"]
    settings = json.loads((tmp_path / "argilla" / ".argilla" / "settings.json").read_text())
    assert next(m for m in settings["metadata"] if m["name"] == "rubric")["visible_for_annotators"] is False
    tasks[0]["data"]["rubric"] = "safety-v1"  # edited in the tool
    f = _write(tmp_path / "ls-export.json", label_studio_export(tasks, {0: [pick("left")], 1: [pick("right")]}))
    for store, want in ((True, ["helpful-v3", "helpful-v3"]), (False, ["safety-v1", "helpful-v3"])):
        out = tmp_path / f"batch-{store}.jsonl"
        import_(b, "label-studio", f, out, store=store)
        got = {j["pair_id"]: j.get("rubric") for j in map(json.loads, out.read_text().splitlines())}
        assert [got[t["data"]["pair_id"]] for t in tasks] == want, (store, got)
    from argilla.records._io import GenericIO

    records[0]["metadata"]["rubric"] = "safety-v1"  # edited in Argilla
    u1 = str(uuid.UUID(int=1))
    recs = argilla_answers(records, {i: [(u1, {"overall": "response_1"}, "submitted")] for i in range(2)})
    flat = _write(tmp_path / "argilla-records.json", GenericIO.to_list(recs, flatten=True))
    for store, want in ((True, ["helpful-v3", "helpful-v3"]), (False, ["safety-v1", "helpful-v3"])):
        out = tmp_path / f"argilla-batch-{store}.jsonl"
        import_(b, "argilla", flat, out, store=store)
        got = {j["pair_id"]: j.get("rubric") for j in map(json.loads, out.read_text().splitlines())}
        assert [got[r["metadata"]["pair_id"]] for r in records] == want, (store, got)


def test_a_rubric_edited_in_the_tool_qualifies_no_reviewer(rubric_built, tmp_path):
    """ls-3 is qualified for rubric safety-v1 only; the pairs are helpful-v3.  Its Label Studio reviews -- one with
    the task's rubric edited to safety-v1, imported without --store -- are flagged unqualified_reviewer on the
    pair's rubric and resolve nothing."""
    import shutil

    import polars as pl

    from pipeline.curate import curate
    from schemas.policy import Policy
    from schemas.registry import load_registry

    b = rubric_built
    ls = tmp_path / "ls.json"
    export(b, "label-studio", ls)
    tasks = json.loads(ls.read_text())
    tasks[0]["data"]["rubric"] = "safety-v1"
    f = _write(tmp_path / "ls-export.json", label_studio_export(tasks, {0: [pick("left")], 1: [pick("right")]}))
    batch = tmp_path / "batch.jsonl"
    import_(b, "label-studio", f, batch, store=False)
    st = Store(tmp_path / "store")
    shutil.copytree(b["store"], st.root)
    reg = tmp_path / "annotators.csv"
    reg.write_text(REGISTRY_RUBRIC, encoding="utf-8")
    h = st.get(curate([batch], st, Policy(annotators=load_registry(reg)), parent=b["vid"]).version_id)
    flags = h.read("flags").filter(pl.col("check") == "registry")
    assert flags["reason"].to_list() == ["unqualified_reviewer"] * 2
    assert all("rubric helpful-v3 outside the qualified rubrics (safety-v1)" in d for d in flags["detail"])
    assert h.manifest().ledger.reviews.resolved_by_reviews == 0
    assert set(h.read("routed.parquet")["pair_id"].to_list()) == set(b["routed"])


# ---------------------------------------------------------------- Argilla: the time of each response
def test_argilla_reviews_take_the_time_the_server_gives_their_responses(built, tmp_path, fake_argilla, monkeypatch):
    """Argilla reviews came back without a date, so a registry's qualified_from / qualified_until was never checked
    on them.  The server stamps every response (``inserted_at`` / ``updated_at``, UTC without a zone): records listed
    by the REST API carry it and the judgment takes it; the SDK's own exports carry none (no created_at: never the
    import's clock -- the same export imports to the same bytes)."""
    import shutil

    import argilla as rg
    import polars as pl
    from argilla._helpers._log import LoggingMixin
    from argilla._models import UserResponseModel
    from argilla.records._io import GenericIO

    from pipeline.curate import curate
    from schemas.policy import Policy
    from schemas.registry import load_registry

    server, client = fake_argilla
    monkeypatch.setenv("ARGILLA_API_URL", URL)
    monkeypatch.setenv("ARGILLA_API_KEY", "test-key")
    monkeypatch.setattr(rg, "Argilla", lambda api_url, api_key: client)
    monkeypatch.setattr(LoggingMixin, "_is_interactive", staticmethod(lambda: True))
    export(built, "argilla", tmp_path / "pushed", "--dataset-name", "round-times")
    did = next(d["id"] for d in server.datasets.values() if d["name"] == "round-times")
    recs = server.records("round-times")
    u1, u2 = str(uuid.UUID(int=1)), str(uuid.UUID(int=2))
    for k, (rec, user, value, status, now) in enumerate([
            (recs[0], u1, "response_1", "submitted", "2026-11-21T09:00:00"),
            (recs[1], u1, "response_2", "submitted", "2026-11-22T18:30:00.123456"),
            (recs[2], u2, "response_1", "draft", "2026-11-22T19:00:00")]):
        server.now = now  # the server's clock at each submission
        client.api.records.create_record_response(uuid.UUID(rec["id"]), UserResponseModel(
            values={"overall": {"value": value}}, status=status, user_id=uuid.UUID(user)))
    listed = client.api.http_client.get(f"/api/v1/datasets/{did}/records", params={"include": ["responses"]}).json()
    api = _write(tmp_path / "api-records.json", listed["items"])
    batch = tmp_path / "api-batch.jsonl"
    res = json.loads(import_(built, "argilla", api, batch).stdout)
    assert res["ledger"] == {"tasks_in": 12, "items_in": 12, "judgments_out": 2, "skipped": {"draft": 1, "unanswered": 9}}
    pair_of = {r["external_id"]: r["metadata"]["pair_id"] for r in recs}
    got = {j["pair_id"]: j["created_at"] for j in map(json.loads, batch.read_text().splitlines())}
    assert got == {pair_of[recs[0]["external_id"]]: "2026-11-21T09:00:00Z",
                   pair_of[recs[1]["external_id"]]: "2026-11-22T18:30:00.123456Z"}
    # the dates count: argilla-<u1> qualified until the 21st -> its review of the 22nd is unqualified
    reg = tmp_path / "annotators.csv"
    reg.write_text("annotator_id,annotator_kind,locales,rubrics,qualified_from,qualified_until\n"
                   f"rev-01,human,,,,\nrev-02,human,,,,\nargilla-{u1},human,,,,2026-11-21\n", encoding="utf-8")
    st = Store(tmp_path / "store")
    shutil.copytree(built["store"], st.root)
    h = st.get(curate([batch], st, Policy(annotators=load_registry(reg)), parent=built["vid"]).version_id)
    flags = h.read("flags").filter(pl.col("check") == "registry")
    assert flags["detail"].to_list() == [f"annotator argilla-{u1}: judged on 2026-11-22, after qualified_until 2026-11-21"]
    # the SDK's export of the same records: no response time, so no date -- and the same bytes on every import
    exported = json.loads((tmp_path / "pushed" / "records.json").read_text())
    where = {r["id"]: i for i, r in enumerate(exported)}
    sdk = argilla_answers(exported, {where[r["external_id"]]: [(x["user_id"], {q: v["value"] for q, v in x["values"].items()},
                                                                x["status"]) for x in r["responses"]]
                                     for r in listed["items"] if r["responses"]})
    flat = _write(tmp_path / "sdk-records.json", GenericIO.to_list(sdk, flatten=True))
    outs = [tmp_path / f"sdk-batch-{k}.jsonl" for k in range(2)]
    for out in outs:
        import_(built, "argilla", flat, out)
    rows = [json.loads(x) for x in outs[0].read_text().splitlines()]
    assert len(rows) == 2 and all("created_at" not in j for j in rows)
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_argilla_a_response_time_that_is_not_a_time_or_a_malformed_api_record_is_refused_with_its_place(built, tmp_path, monkeypatch):
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    out = tmp_path / "argilla-export"
    export(built, "argilla", out, "--no-push")
    records = json.loads((out / "records.json").read_text())
    for bad in ("yesterday", 1763715600):
        rest = [{**records[0], "id": str(uuid.UUID(int=9)), "external_id": records[0]["id"],
                 "responses": [{"values": {"overall": {"value": "response_1"}}, "status": "submitted",
                                "user_id": str(uuid.UUID(int=1)), "updated_at": bad}]}]
        refuse(built, "argilla", _write(tmp_path / "bad.json", rest), "records[0]", "responses.overall", "not a time")
    base = {**records[0], "id": str(uuid.UUID(int=9)), "external_id": records[0]["id"]}
    for bad, needle in (({"responses": ["submitted"]}, "'responses[0]'"),
                        ({"responses": [{"values": {"overall": "response_1"}, "status": "submitted"}]},
                         "'responses[0].values.overall'"),
                        ({"responses": [], "metadata": ["pair"]}, "'metadata'")):
        refuse(built, "argilla", _write(tmp_path / "bad.json", [{**base, **bad}]), "records[0]", needle)
