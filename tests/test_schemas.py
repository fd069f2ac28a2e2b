"""schemas/: Arrow derivation, text normalisation twins, policy validation, ledger invariants."""
from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.arrow import arrow_schema, polars_schema
from schemas.manifest import IngestLedger, Ledger
from schemas.policy import Policy, PolicyError, policy_from_dict
from schemas.records import DPORow, Judgment, QuarantineRow
from schemas.text import dedup_key, dedup_key_expr, normalize_text, normalize_text_expr, prompt_text, prompt_text_expr


def test_arrow_schema_derived_from_models():
    s = arrow_schema(DPORow)
    assert s.field("prompt").type == pa.list_(pa.struct([pa.field("role", pa.string(), False), pa.field("content", pa.string(), False)]))
    assert s.field("weight").type == pa.float64()
    assert s.field("source_comparison_ids").type == pa.list_(pa.string())
    assert s.field("strength").nullable and not s.field("pair_id").nullable
    assert polars_schema(Judgment)["created_at"] == pl.Datetime("us", "UTC")
    assert list(polars_schema(QuarantineRow)) == ["source_file", "line", "raw", "reason", "field", "error"]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_text_normalisation_python_and_polars_agree(text):
    s = pl.Series([text])
    assert pl.select(normalize_text_expr(pl.lit(s)))[0, 0] == normalize_text(text)
    assert pl.select(dedup_key_expr(pl.lit(s)))[0, 0] == dedup_key(text) or _fold_gap(text)


def _fold_gap(text: str) -> bool:
    """Polars lowercases, Python casefolds: they may differ only on rare special letters, and on
    letters newer than Python's Unicode database (3.11: Unicode 14; Polars' Rust is newer: e.g.
    U+16EA0 has a lowercase there and none here)."""
    import unicodedata

    return any(ch.casefold() != ch.lower() or unicodedata.category(ch) == "Cn" for ch in text)


def test_dedup_key_examples():
    assert dedup_key("  Hello\r\n   World ") == dedup_key("hello world") == "hello world"
    assert normalize_text("a\r\nb  ") == "a\nb"
    assert normalize_text("e\u0301") == "\u00e9"


def test_prompt_text_twins():
    convs = [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]]
    got = pl.DataFrame({"p": convs}).select(prompt_text_expr(pl.col("p"))).to_series().to_list()
    assert got == [prompt_text(c) for c in convs] == ["hi", "system: be nice\n\nuser: hi"]


def test_policy_rejects_unknown_keys_and_ranges():
    with pytest.raises(PolicyError, match=r"checks\.agreement\.low_agreement_threshold"):
        policy_from_dict({"checks": {"agreement": {"low_agreement_threshold": 1.5}}})
    with pytest.raises(PolicyError, match=r"bogus: unknown key"):
        policy_from_dict({"bogus": 1})
    with pytest.raises(PolicyError, match="sum to 1.0"):
        policy_from_dict({"split": {"train": 0.5}})
    # reasons are the checks' declarations: resolved (and refused) against the registry, not in schemas/
    from pipeline.checks import resolve_policy

    with pytest.raises(PolicyError, match="unknown reason"):
        resolve_policy(policy_from_dict({"select": {"flag_actions": {"vibes": "drop"}}}))
    with pytest.raises(PolicyError, match=r"pair_id_conflict: expected one of \['drop'\]"):
        resolve_policy(policy_from_dict({"select": {"flag_actions": {"pair_id_conflict": "warn"}}}))
    assert Policy().policy_hash() == Policy().policy_hash()
    assert Policy().policy_hash() != policy_from_dict({"split": {"seed": 3}}).policy_hash()


@pytest.mark.parametrize(("data", "message"), [
    ({"certify": {"min_pairs_per_split": {"trian": 30}}}, r"certify\.min_pairs_per_split: .*unknown split\(s\) \['trian'\]"),
    ({"certify": {"min_pairs_per_split": {"test": -1}}}, r"certify\.min_pairs_per_split: .*whole number >= 0"),
    ({"certify": {"label_balance": [0.65, 0.35]}}, r"certify\.label_balance: .*low <= high"),
    ({"certify": {"ai_share": [0.0, 1.5]}}, r"certify\.ai_share: .*high <= 1"),
    ({"certify": {"max_quarantine_rate": True}}, r"certify\.max_quarantine_rate: .*expected a number"),
    ({"ingest": {"batch_rows": True}}, r"ingest\.batch_rows: .*expected a number"),
    # [false, true] read as [0.0, 1.0]: the widest interval, a gate every version passes
    ({"certify": {"label_balance": [False, True]}}, r"certify\.label_balance: .*two numbers, not true/false"),
    ({"certify": {"ai_share": [0.0, True]}}, r"certify\.ai_share: .*two numbers, not true/false"),
    # 0 or "no" read as false: an opt-out of the agreement or expectations gates nobody wrote as one
    ({"certify": {"require_agreement": 0}}, r"certify\.require_agreement: .*expected true or false \(found 0\)"),
    ({"certify": {"require_expectations": "no"}}, r"certify\.require_expectations: .*expected true or false"),
])
def test_policy_refuses_gates_no_version_can_pass_and_booleans_as_numbers(data, message):
    """A misspelt split, an inverted or out-of-[0, 1] share range, or true/false where a number goes would
    otherwise load: a gate nobody evaluates, a gate nothing passes, a rate of 1.0 read from `true`."""
    with pytest.raises(PolicyError, match=message):
        policy_from_dict(data)
    assert policy_from_dict({"certify": {"label_balance": [0.5, 0.5], "min_pairs_per_split": {"test": 0}}})


def test_policy_error_shows_a_bounded_value():
    """A YAML alias bomb (each level 9 references to the one below) is small on disk and shared in memory;
    printing the bad value whole would write 9**8 strings.  The message shows a bounded excerpt."""
    import yaml

    text = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    text += "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 8))
    data = {"name": yaml.safe_load(text)["a7"]}
    with pytest.raises(PolicyError, match=r"name: Input should be a valid string") as err:
        policy_from_dict(data)
    assert len(str(err.value)) < 1000
    with pytest.raises(PolicyError) as err:
        policy_from_dict({"select": {"downweight_factor": "x" * 10**6}})
    assert len(str(err.value)) < 1000


def test_ledgers_must_add_up():
    with pytest.raises(ValueError, match="does not add up"):
        IngestLedger(rows_in=3, rows_valid=1, quarantined=1, quarantined_by_reason={"invalid_json": 1})
    with pytest.raises(ValueError, match="does not add up"):
        Ledger(rows_in=10, quarantined=0, judgments_valid=10, pairs=5, pairs_kept=3, dropped={"low_agreement": 1})
    Ledger(rows_in=10, quarantined=0, judgments_valid=10, pairs=5, pairs_kept=3, dropped={"low_agreement": 1},
           routed={"tie": 1, "both_bad": 0, "escalate": 0})


def test_yaml_policy_refuses_a_key_given_twice(tmp_path):
    """TOML refuses a repeated key; PyYAML kept the last one silently, so a threshold added further down a YAML
    policy replaced the one a reader saw first.  Both formats refuse it, naming the file, the key and the lines;
    YAML aliases and merge keys still load, and a YAML alias bomb is walked once per node."""
    from schemas.policy import load_policy

    y = tmp_path / "p.yaml"
    y.write_text("certify:\n  max_quarantine_rate: 0.05\n  min_pairs_per_locale: 3\n  max_quarantine_rate: 0.9\n")
    with pytest.raises(PolicyError, match=r"certify\.max_quarantine_rate: given twice \(lines 2 and 4\)") as err:
        load_policy(y)
    assert err.value.path == y and err.value.field == "certify.max_quarantine_rate" and str(y) in str(err.value)
    t = tmp_path / "p.toml"
    t.write_text("[certify]\nmax_quarantine_rate = 0.05\nmax_quarantine_rate = 0.9\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(t)
    y.write_text("base: &b {max_quarantine_rate: 0.2}\n")  # an unknown top-level key, but no repeat: refused as unknown
    with pytest.raises(PolicyError, match="base: unknown key"):
        load_policy(y)
    y.write_text("certify:\n  <<: {max_quarantine_rate: 0.2, min_pairs_per_locale: 1}\n  max_quarantine_rate: 0.3\n")
    assert load_policy(y).certify.max_quarantine_rate == 0.3 and load_policy(y).certify.min_pairs_per_locale == 1
    bomb = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 8)) + "name: *a7\n"
    y.write_text(bomb)
    with pytest.raises(PolicyError):
        load_policy(y)


def test_min_pairs_per_split_left_out_keeps_its_default():
    """A split left out of min_pairs_per_split keeps its default built in Python as from a file (in Python it was
    no minimum: the gate read 0 and passed an empty test split); the hash is the file's."""
    from schemas.policy import CertifyConfig

    cfg = CertifyConfig(min_pairs_per_split={"train": 5})
    assert cfg.min_pairs_per_split == {"train": 5, "validation": 2, "test": 2}
    assert (Policy(certify=cfg).policy_hash()
            == policy_from_dict({"certify": {"min_pairs_per_split": {"train": 5}}}).policy_hash())
