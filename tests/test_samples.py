"""The demo batches in data/samples/: reproducible, parseable, and planted exactly as documented.

The planted problems are read from ``data/samples/answer_key/planted.json`` (written by the
generator together with the README) and then checked against the batch files themselves.
"""
from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
SCRIPT = ROOT / "data" / "make_samples.py"
BATCHES = ("batch-2026-11-02.jsonl", "batch-2026-11-09.jsonl", "batch-2026-11-16.jsonl")
LABELS = {"a", "b", "tie", "both_bad", "escalate"}
REQUIRED = ("comparison_id", "prompt", "response_a", "response_b", "label", "annotator_id", "annotator_kind")
KANA = re.compile(r"[\u3040-\u30ff]")
BIASED = "rev-en-07"


@cache
def planted() -> dict:
    return json.loads((SAMPLES / "answer_key" / "planted.json").read_text(encoding="utf-8"))


@cache
def answer_key() -> dict[str, dict]:
    return {p["task_id"]: p for p in json.loads((SAMPLES / "answer_key" / "pairs.json").read_text(encoding="utf-8"))}


@cache
def lines() -> dict[str, list[str]]:
    return {name: (SAMPLES / name).read_text(encoding="utf-8").splitlines() for name in BATCHES}


@cache
def parsed() -> dict[str, list[dict | None]]:
    """Rows per file, ``None`` where the line is not valid JSON."""
    out: dict[str, list[dict | None]] = {}
    for name, ls in lines().items():
        rows: list[dict | None] = []
        for line in ls:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)
        out[name] = rows
    return out


def all_rows() -> list[dict]:
    return [r for rows in parsed().values() for r in rows if r is not None]


def valid_rows() -> list[dict]:
    return [r for r in all_rows() if r["label"] in LABELS]


def text(resp) -> str:
    return resp["text"] if isinstance(resp, dict) else resp


def prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)


def by_id() -> dict[str, dict]:
    return {r["comparison_id"]: r for r in all_rows()}


# ----------------------------------------------------------------------------- reproducibility
def test_regenerating_gives_byte_identical_files(tmp_path):
    # From a copy of data/source/ only: the generator needs nothing else.
    src = tmp_path / "source"
    shutil.copytree(ROOT / "data" / "source", src)
    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--source", str(src), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    committed = sorted(p.relative_to(SAMPLES) for p in SAMPLES.rglob("*") if p.is_file())
    fresh = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert fresh == committed
    for rel in committed:
        assert (out / rel).read_bytes() == (SAMPLES / rel).read_bytes(), f"{rel} differs after regeneration"


def test_glob_matches_only_the_three_canonical_batches():
    assert sorted(p.name for p in SAMPLES.glob("*.jsonl")) == list(BATCHES)


def test_source_stays_small_and_licensed():
    src = ROOT / "data" / "source"
    assert sum(p.stat().st_size for p in src.glob("*.jsonl")) < 400_000
    licenses = (src / "LICENSES.md").read_text(encoding="utf-8")
    for needle in ("HH-RLHF", "MIT", "LLaMA-Factory", "Apache-2.0", "third-party", "ja_handwritten.jsonl"):
        assert needle in licenses


# ----------------------------------------------------------------------------- parsing and contract
def test_every_line_parses_except_the_documented_malformed_one():
    mf = planted()["malformed_json"]
    bad = [(name, i + 1) for name, rows in parsed().items() for i, r in enumerate(rows) if r is None]
    assert bad == [(mf["file"], mf["line"])]
    assert mf["file"] == BATCHES[-1]
    assert lines()[mf["file"]][mf["line"] - 1].startswith(f'{{"comparison_id": "{mf["comparison_id"]}"')
    assert all(r is not None for name in BATCHES[:2] for r in parsed()[name])


def test_every_row_follows_the_contract_except_the_documented_invalid_one():
    iv = planted()["invalid_value"]
    invalid = []
    for name, rows in parsed().items():
        for i, r in enumerate(rows):
            if r is None:
                continue
            for f in REQUIRED:
                assert r.get(f) not in (None, ""), f"{name}:{i + 1} lacks {f}"
            assert r["annotator_kind"] in ("human", "ai")
            assert r["shown_first"] in ("a", "b")
            assert r["locale"] in ("en", "ja-JP", "zh-CN")
            for f in ("strength", "confidence"):
                assert f not in r or 0.0 <= r[f] <= 1.0
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["created_at"])
            for side in ("response_a", "response_b"):
                assert text(r[side]).strip()
            if isinstance(r["prompt"], list):
                assert r["prompt"][-1]["role"] == "user"
            if r["label"] not in LABELS:
                invalid.append((name, i + 1, r["comparison_id"], r["label"]))
    assert invalid == [(iv["file"], iv["line"], iv["comparison_id"], iv["value"])]
    assert iv["file"] == BATCHES[-1] and iv["field"] == "label"


def test_rows_validate_against_the_raw_judgment_schema():
    records = pytest.importorskip("schemas.records")
    from pydantic import ValidationError

    iv = planted()["invalid_value"]
    for r in all_rows():
        if r["comparison_id"] == iv["comparison_id"]:
            with pytest.raises(ValidationError):
                records.RawJudgment.model_validate(r)
        else:
            records.RawJudgment.model_validate(r)


def test_comparison_ids_are_unique_across_all_batches():
    ids = [r["comparison_id"] for r in all_rows()]
    ids.append(planted()["malformed_json"]["comparison_id"])
    assert len(ids) == len(set(ids)) == sum(len(ls) for ls in lines().values())


def test_format_variety():
    rows = valid_rows()
    assert any(isinstance(r["prompt"], str) for r in rows)
    assert any(isinstance(r["prompt"], list) and len(r["prompt"]) > 2 for r in rows)
    assert any(isinstance(r["response_a"], dict) for r in rows)
    assert any(isinstance(r["response_a"], str) for r in rows)
    labels = Counter(r["label"] for r in rows)
    assert set(labels) == LABELS
    assert (labels["a"] + labels["b"]) / len(rows) > 0.85


# ----------------------------------------------------------------------------- realistic structure
def test_sizes_annotators_and_judgments_per_pair():
    rows = valid_rows()
    assert 900 <= len(rows) <= 1200
    assert 300 <= len(answer_key()) <= 400
    assert {r["task_id"] for r in rows} == set(answer_key())
    per_annotator = Counter(r["annotator_id"] for r in rows)
    humans = {r["annotator_id"] for r in rows if r["annotator_kind"] == "human"}
    ais = {r["annotator_id"] for r in rows if r["annotator_kind"] == "ai"}
    assert 8 <= len(humans) <= 12
    assert all(per_annotator[a] >= 30 for a in humans)
    assert ais and all(a.startswith("judge-") for a in ais)
    assert {r["locale"] for r in rows} == {"en", "ja-JP", "zh-CN"}

    dups = {d["comparison_id"] for d in planted()["exact_duplicates"]}
    humans_per_pair: dict[str, list[str]] = defaultdict(list)
    ai_orders: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in all_rows():
        if r["comparison_id"] in dups:
            continue
        if r["annotator_kind"] == "human":
            humans_per_pair[r["task_id"]].append(r["annotator_id"])
        else:
            ai_orders[(r["task_id"], r["annotator_id"])].add(r["shown_first"])
    mf = planted()["malformed_json"]["task_id"]
    humans_per_pair[mf].append("<malformed>")
    for task, anns in humans_per_pair.items():
        assert len(anns) == len(set(anns)), task
        expected = (5,) if answer_key()[task]["gold"] and answer_key()[task]["locale"] == "en" else (2, 3)
        assert len(anns) in expected, (task, anns)
    assert sum(orders == {"a", "b"} for orders in ai_orders.values()) >= 20  # both display orders


def test_honest_annotators_mostly_agree_with_the_hidden_truth():
    truth = {t: p["true_label"] for t, p in answer_key().items()}
    decisive: dict[str, list[bool]] = defaultdict(list)
    for r in valid_rows():
        if r["label"] in ("a", "b") and truth[r["task_id"]] in ("a", "b"):
            decisive[r["annotator_id"]].append(r["label"] == truth[r["task_id"]])
    human = {r["annotator_id"] for r in valid_rows() if r["annotator_kind"] == "human"}
    honest = [hit for a, hits in decisive.items() if a in human and a != BIASED for hit in hits]
    assert 0.80 <= sum(honest) / len(honest) <= 0.90
    for a, hits in decisive.items():
        rate = sum(hits) / len(hits)
        if a == BIASED:
            assert rate < 0.7
        else:
            assert 0.70 <= rate <= 0.95, (a, rate)


def test_gold_items():
    gold = [p for p in answer_key().values() if p["gold"]]
    assert 0.03 <= len(gold) / len(answer_key()) <= 0.08
    gold_ids = {p["task_id"] for p in gold}
    for r in valid_rows():
        if r["task_id"] in gold_ids:
            assert r["gold_label"] == answer_key()[r["task_id"]]["true_label"]
        else:
            assert "gold_label" not in r
    assert {answer_key()[t]["locale"] for t in gold_ids} == {"en", "ja-JP", "zh-CN"}


# ----------------------------------------------------------------------------- planted problems
def test_position_bias():
    pb = planted()["position_bias"]
    assert pb["annotator_id"] == BIASED
    first: dict[str, list[bool]] = defaultdict(list)
    for r in valid_rows():
        if r["label"] in ("a", "b"):
            first[r["annotator_id"]].append(r["label"] == r["shown_first"])
    biased = first.pop(BIASED)
    assert len(biased) >= 40 and len(biased) == pb["n_decisive"]
    assert sum(biased) == pb["first_shown_chosen"]
    assert 0.85 <= sum(biased) / len(biased) <= 0.95
    for a, hits in first.items():
        assert 0.35 <= sum(hits) / len(hits) <= 0.65, (a, sum(hits) / len(hits))
    assert not any(r["annotator_id"] == BIASED for r in parsed()[BATCHES[0]])


def test_exact_duplicates():
    rows = by_id()
    dups = planted()["exact_duplicates"]
    assert 2 <= len(dups) <= 6
    for d in dups:
        dup, orig = rows[d["comparison_id"]], rows[d["duplicate_of"]]
        assert {k: v for k, v in dup.items() if k != "comparison_id"} == \
            {k: v for k, v in orig.items() if k != "comparison_id"}
        assert parsed()[d["file"]][d["line"] - 1] == dup
        assert parsed()[d["duplicate_of_file"]][d["duplicate_of_line"] - 1] == orig
        assert BATCHES.index(d["file"]) > BATCHES.index(d["duplicate_of_file"])
    # ... and no other two rows share their content
    seen = Counter(json.dumps({k: v for k, v in r.items() if k != "comparison_id"}, sort_keys=True)
                   for r in all_rows())
    assert sum(n - 1 for n in seen.values()) == len(dups)


def test_near_duplicate_prompts():
    items = planted()["near_duplicate_prompts"]
    assert items
    first_prompt = {}
    for r in all_rows():
        first_prompt.setdefault(r["task_id"], r)
    for nd in items:
        new, old = first_prompt[nd["task_id"]], first_prompt[nd["near_duplicate_of"]["task_id"]]
        assert nd["task_id"] != nd["near_duplicate_of"]["task_id"]
        p_new, p_old = prompt_text(new["prompt"]), prompt_text(old["prompt"])
        assert p_new == nd["prompt"] and p_old == nd["original_prompt"]
        assert p_new != p_old
        assert " ".join(p_new.casefold().split()) != " ".join(p_old.casefold().split())  # not an exact dup
        assert difflib.SequenceMatcher(None, p_new, p_old).ratio() > 0.9
        assert {text(new["response_a"]), text(new["response_b"])} == {text(old["response_a"]), text(old["response_b"])}
        ids = {r["comparison_id"] for r in all_rows() if r["task_id"] == nd["task_id"]}
        assert ids == set(nd["comparison_ids"])


def test_identical_responses():
    ir = planted()["identical_responses"]
    for r in valid_rows():
        same = text(r["response_a"]).strip() == text(r["response_b"]).strip()
        assert same == (r["task_id"] == ir["task_id"])
    assert {r["comparison_id"] for r in valid_rows() if r["task_id"] == ir["task_id"]} == set(ir["comparison_ids"])


def test_language_mismatch():
    lm = planted()["language_mismatch"]
    rows = [r for r in valid_rows() if r["task_id"] == lm["task_id"]]
    assert {r["comparison_id"] for r in rows} == set(lm["comparison_ids"])
    for r in rows:
        assert r["locale"] == lm["locale"] == "ja-JP"
        assert KANA.search(prompt_text(r["prompt"]))
        english = text(r[f"response_{lm['english_side']}"])
        other = text(r["response_b" if lm["english_side"] == "a" else "response_a"])
        assert english.isascii() and len(english.split()) >= 20
        assert KANA.search(other)
    # no other Japanese or Chinese item has an all-ASCII response
    for r in valid_rows():
        if r["locale"] != "en" and r["task_id"] != lm["task_id"]:
            assert not text(r["response_a"]).isascii() and not text(r["response_b"]).isascii(), r["comparison_id"]


def test_first_batch_has_no_planted_problem():
    p = planted()
    planted_tasks = {p["identical_responses"]["task_id"], p["language_mismatch"]["task_id"]}
    planted_tasks |= {nd["task_id"] for nd in p["near_duplicate_prompts"]}
    for r in parsed()[BATCHES[0]]:
        assert r is not None and r["task_id"] not in planted_tasks
        assert r["batch_id"] == "batch-2026-11-02"


def test_readme_documents_every_planted_id_and_regeneration():
    readme = (SAMPLES / "README.md").read_text(encoding="utf-8")
    p = planted()
    ids = [p["position_bias"]["annotator_id"], p["malformed_json"]["comparison_id"],
           p["invalid_value"]["comparison_id"], p["identical_responses"]["task_id"],
           p["language_mismatch"]["task_id"], *p["identical_responses"]["comparison_ids"],
           *p["language_mismatch"]["comparison_ids"]]
    for d in p["exact_duplicates"]:
        ids += [d["comparison_id"], d["duplicate_of"]]
    for nd in p["near_duplicate_prompts"]:
        ids += [nd["task_id"], nd["near_duplicate_of"]["task_id"], *nd["comparison_ids"]]
    for i in ids:
        assert f"`{i}`" in readme, i
    assert f"line {p['malformed_json']['line']}" in readme
    assert "python data/make_samples.py" in readme


# ----------------------------------------------------------------------------- adapter examples
def test_extra_files_have_the_adapter_shapes():
    trl = [json.loads(x) for x in (SAMPLES / "extra" / "trl_conversational.jsonl").read_text(encoding="utf-8").splitlines()]
    assert 8 <= len(trl) <= 12
    for r in trl:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert r["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in r["chosen"]] == [m["role"] for m in r["rejected"]] == ["assistant"]
        assert r["chosen"] != r["rejected"]
    hh = [json.loads(x) for x in (SAMPLES / "extra" / "hh_transcripts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert 8 <= len(hh) <= 12
    for r in hh:
        assert set(r) == {"chosen", "rejected"}
        for side in ("chosen", "rejected"):
            assert r[side].startswith("\n\nHuman: ")
            assert "\n\nAssistant: " in r[side]
        # same conversation, different final reply
        cut = r["chosen"].rindex("\n\nAssistant: ")
        assert r["rejected"].startswith(r["chosen"][:cut + len("\n\nAssistant: ")])
        assert r["chosen"] != r["rejected"]


def test_the_rated_sample_has_the_ultrafeedback_shape_and_curates_over_partitions(tmp_path):
    """extra/ultrafeedback_rated.jsonl: candidate lists with overall and per-aspect ratings.  Curated as it is
    (format detected): every pair of candidates a judgment (the candidate given twice never paired), its
    aspects the judgments' dimensions, built over partitions, the ledger adding up."""
    from typer.testing import CliRunner

    from flows.cli import app

    path = SAMPLES / "extra" / "ultrafeedback_rated.jsonl"
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert 8 <= len(rows) <= 12
    for r in rows:
        assert {"id", "completions", "annotator_id", "annotator_kind", "locale"} <= set(r)
        assert ("instruction" in r) != ("prompt" in r)
        assert all({"model", "response", "overall_score", "annotations"} <= set(c) for c in r["completions"])
    twice = [r for r in rows if len(r["completions"]) == 4]
    assert len(twice) == 1 and twice[0]["completions"][1]["response"] == twice[0]["completions"][3]["response"]
    want = sum(len(r["completions"]) * (len(r["completions"]) - 1) // 2 for r in rows) - 1
    res = CliRunner().invoke(app, ["curate", str(path), "--store", str(tmp_path / "store"), "--json"])
    assert res.exit_code == 0, res.output
    from pipeline.store import Store

    m = Store(tmp_path / "store").get(json.loads(res.stdout)["version_id"]).manifest()
    assert m.sources[0].format == "rated" and m.lineage.get("partitions") is not None
    assert m.ingest.rows_in == len(rows) == m.ingest.rows_valid and m.ingest.judgments == want
    assert m.ingest.skipped == {"identical_candidates": 1}
    dims = Store(tmp_path / "store").get(m.version_id).read("judgments")["dimensions"]
    assert dims.null_count() == 0  # (the aspects: every judgment's dimensions)
