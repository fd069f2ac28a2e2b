"""Format adapters: TRL (standard, conversational, implicit prompt), HH-RLHF transcripts, rated lists."""
from __future__ import annotations

import polars as pl
import pytest
from conftest import canonical, write_jsonl

from pipeline.adapters import AdapterContext, AdapterError, adapt, detect_format, split_hh_transcript
from pipeline.ingest import ingest_files

CTX = AdapterContext(stem="f", batch_id="b")


def test_detect_each_format():
    assert detect_format([canonical(0)]) == "canonical"
    assert detect_format([{"prompt": "p", "chosen": "c", "rejected": "r"}]) == "trl"
    assert detect_format([{"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"}]) == "hh"
    assert detect_format([{"instruction": "p", "completions": [{"response": "x", "overall_score": 1}]}]) == "rated"
    assert detect_format([{"foo": 1}]) is None


def test_trl_standard_and_conversational(tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "What is 2+2?"}],
         "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}],
         "locale": "en", "source": "unit"},
    ]
    r = ingest_files([write_jsonl(tmp_path / "trl.jsonl", rows)], annotator_id="vendor-x")
    j = r.judgments
    assert r.ledger.rows_valid == 2
    chosen = [ra if lab == "a" else rb for ra, rb, lab in j.select("response_a", "response_b", "label").iter_rows()]
    assert chosen == ["4", "4"] and set(j["response_a"]) | set(j["response_b"]) == {"4", "5"}
    assert j["pair_id"][0] == j["pair_id"][1]  # same content, two shapes -> same pair
    assert j["annotator_id"].to_list() == ["vendor-x"] * 2 and j["annotator_kind"][0] == "unknown"  # the source does not say who judged
    assert j["comparison_id"].to_list() == ["trl:1", "trl:2"]
    assert '"source":"unit"' in j["extra"][1]


def test_trl_implicit_prompt():
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Joke?"}]
    obj = {"chosen": conv + [{"role": "assistant", "content": "Knock knock."}], "rejected": conv + [{"role": "assistant", "content": "No."}]}
    (out,), _ = adapt("trl", obj, CTX, 1)
    assert out["prompt"] == conv and _chosen(out) == "Knock knock." and {out["response_a"], out["response_b"]} == {"Knock knock.", "No."}


def test_trl_mismatched_prefix_is_unpairable(tmp_path):
    rows = [{"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
             "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]},
            {"prompt": "p", "chosen": "c", "rejected": "r"}]
    r = ingest_files([write_jsonl(tmp_path / "t.jsonl", rows)], fmt="trl")
    assert r.ledger.quarantined == 1 and r.quarantine["reason"][0] == "unpairable" and r.quarantine["line"][0] == 1


def test_hh_transcript_split_real_text():
    chosen = ("\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: Are you looking for practical joke ideas?"
              "\n\nHuman: yep\n\nAssistant: Try making a fake ink blot.")
    rejected = chosen.rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant: Draw on their face."
    (out,), _ = adapt("hh", {"chosen": chosen, "rejected": rejected}, CTX, 4)
    assert out["prompt"] == [
        {"role": "user", "content": "what are some pranks with a pen i can do?"},
        {"role": "assistant", "content": "Are you looking for practical joke ideas?"},
        {"role": "user", "content": "yep"},
    ]
    assert _chosen(out) == "Try making a fake ink blot." and "Draw on their face." in (out["response_a"], out["response_b"])
    assert out["comparison_id"] == "f:4"


def _chosen(out: dict) -> str:
    return out["response_a"] if out["label"] == "a" else out["response_b"]


def test_chosen_rejected_orientation_is_balanced_and_stable():
    outs = [adapt("trl", {"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}, CTX, i)[0][0] for i in range(200)]
    share_a = sum(o["label"] == "a" for o in outs) / len(outs)
    assert 0.35 < share_a < 0.65
    assert all(_chosen(o).startswith("good") for o in outs)
    again = [adapt("trl", {"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}, CTX, i)[0][0]["label"] for i in range(200)]
    assert again == [o["label"] for o in outs]


def test_hh_bad_transcripts(tmp_path):
    with pytest.raises(AdapterError) as e:
        split_hh_transcript("no markers here", "chosen")
    assert e.value.reason == "invalid_value" and e.value.field == "chosen"
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}]
    r = ingest_files([write_jsonl(tmp_path / "hh.jsonl", rows)])
    assert r.sources[0].format == "hh"
    assert r.ledger.rows_valid == 1 and r.quarantine["reason"].to_list() == ["unpairable"]


def test_rated_lists_pairs_ties_and_identical(tmp_path):
    row = {"instruction": "Name a fruit.", "completions": [
        {"model": "m1", "response": "Apple", "overall_score": 8},
        {"model": "m2", "response": "Banana", "overall_score": 6},
        {"model": "m3", "response": "Cherry", "overall_score": 8},
        {"model": "m4", "response": " apple ", "overall_score": 3},  # not identical to "Apple": case differs
        {"model": "m5", "response": "Apple", "overall_score": 2},  # identical text to m1: never paired with it
    ]}
    r = ingest_files([write_jsonl(tmp_path / "uf.jsonl", [row])])
    j = r.judgments
    assert r.sources[0].format == "rated"
    assert r.ledger.rows_valid == 1 and r.ledger.judgments == 9 and r.ledger.skipped == {"identical_candidates": 1}
    assert (j["response_a"] != j["response_b"]).all()
    by = {(a, b): lab for a, b, lab in j.select("response_a", "response_b", "label").iter_rows()}
    assert by[("Apple", "Banana")] == "a" and by[("Apple", "Cherry")] == "tie" and by[("Banana", "Cherry")] == "b"
    assert set(j["annotator_kind"]) == {"unknown"}  # scores without a judge named: unknown, not ai
    assert j["comparison_id"].n_unique() == 9


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"instruction": "p", "completions": [{"response": "x", "overall_score": 1}]}, "unpairable"),
        ({"instruction": "p", "completions": [{"response": "x", "overall_score": 1}, {"response": "y"}]}, "invalid_value"),
        ({"instruction": "p", "completions": [{"response": "x", "overall_score": 1}, "y"]}, "invalid_type"),
    ],
)
def test_rated_bad_rows(tmp_path, row, reason):
    good = {"instruction": "p", "completions": [{"response": "x", "overall_score": 1}, {"response": "y", "overall_score": 2}]}
    r = ingest_files([write_jsonl(tmp_path / "r.jsonl", [good, row])], fmt="rated")
    assert r.ledger.rows_in == 2 and r.ledger.quarantined == 1
    assert r.quarantine["reason"][0] == reason and r.quarantine["line"][0] == 2


def test_forced_format_mismatch_quarantines_rows(tmp_path):
    r = ingest_files([write_jsonl(tmp_path / "c.jsonl", [canonical(0)])], fmt="trl")
    assert r.ledger.quarantined == 1 and r.quarantine["reason"][0] == "missing_field"
    assert "chosen" in r.quarantine["error"][0]


def test_adapted_row_with_invalid_canonical_value_is_quarantined_once(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "annotator_kind": "alien"}]
    r = ingest_files([write_jsonl(tmp_path / "t.jsonl", rows)])
    assert r.ledger.rows_in == 1 and r.ledger.quarantined == 1
    q = r.quarantine.row(0, named=True)
    assert q["field"] == "annotator_kind" and q["reason"] == "invalid_value"
    assert pl.DataFrame(r.judgments).height == 0


def _rated_batch(path, topic: str, n: int = 12):
    return write_jsonl(path, [{"instruction": f"Say something about {topic} {i}.", "completions": [
        {"model": "m1", "response": f"A fine answer on {topic} {i}.", "overall_score": 8},
        {"model": "m2", "response": f"A weaker answer on {topic} {i}.", "overall_score": 5},
        {"model": "m3", "response": f"The worst answer on {topic} {i}.", "overall_score": 2}]} for i in range(n)])


def test_a_rated_batch_is_curated_by_default_and_a_child_of_it_too(tmp_path):
    """A first version of rated candidate lists (format detected) is built over partitions -- a row's several
    judgments share its line, which the partitioned build orders by (it stopped with "partition 0: its rows are not
    in input order", a traceback; then a first version of them was built in one process) -- and a child of it too.
    A child of a one-process parent, whose pairs have no locale: that parent said only ``pairs_checked`` of the
    language check, and the child's delta stopped with a KeyError on ``texts_checked``."""
    from pipeline.curate import CurateOptions, curate
    from pipeline.store import Store
    from schemas.policy import Policy

    store = Store(tmp_path / "store")
    first = curate([_rated_batch(tmp_path / "a.jsonl", "rivers")], store, Policy())
    m = store.get(first.version_id).manifest()
    assert m.ledger.judgments_valid == 12 * 3 and m.sources[0].format == "rated"
    assert m.lineage.get("partitions") is not None  # (built over partitions)
    child = curate([_rated_batch(tmp_path / "b.jsonl", "mountains")], store, Policy(), parent=first.version_id)
    c = store.get(child.version_id).manifest()
    assert c.parent_version == first.version_id and c.ledger.judgments_valid == 2 * 12 * 3
    one = curate([_rated_batch(tmp_path / "a.jsonl", "rivers")], store, Policy(), options=CurateOptions(partitioned=False))
    assert one.version_id != first.version_id and store.get(one.version_id).manifest().lineage.get("partitions") is None
    child = curate([_rated_batch(tmp_path / "b.jsonl", "mountains")], store, Policy(), parent=one.version_id)
    assert store.get(child.version_id).manifest().check("language").metrics["texts_checked"] == 0
