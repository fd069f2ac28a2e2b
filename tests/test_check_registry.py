"""Checks are declared once: reasons, default actions, select's precedence and the docs come from the registry."""
from __future__ import annotations

import polars as pl
import pytest
from conftest import ROOT

import pipeline.checks as checks
from pipeline.checks import CHECKS, REASONS, default_flag_actions, pair_reasons, reasons_table, resolve_policy
from pipeline.checks.spec import CheckSpec, Reason
from pipeline.select import drop_order, select_pairs
from schemas.check import CheckResult, make_flags
from schemas.policy import Policy, SelectConfig, policy_from_dict


def _pairs(n: int) -> pl.DataFrame:
    return pl.DataFrame({
        "pair_id": [f"p{i}" for i in range(n)], "prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(n)],
        "prompt_text": [f"q{i}" for i in range(n)], "response_a": [f"good {i}" for i in range(n)],
        "response_b": [f"bad {i}" for i in range(n)], "model_a": ["ma"] * n, "model_b": ["mb"] * n, "locale": ["en"] * n,
        "label_consensus": ["a"] * n, "agreement": [1.0] * n, "strength": [0.8] * n, "n_judgments": [3] * n,
        "annotator_kind": ["human"] * n, "source_comparison_ids": [[f"c{i}"] for i in range(n)]})


def test_every_emitted_reason_is_declared_once_and_has_a_known_subject():
    declared = [r.code for c in CHECKS for r in c.reasons]
    assert len(declared) == len(set(declared)) == len(REASONS)
    for c in CHECKS:
        assert set(c.codes) <= set(REASONS), c.name
    assert {r.subject for r in REASONS.values()} <= {"judgment", "pair", "annotator", "slice"}
    assert checks.CHECK_MODULES == {c.name: c.codes for c in CHECKS}
    assert default_flag_actions() == {code: r.default_action for code, r in REASONS.items()}


def test_the_docs_table_is_the_registry():
    doc = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    block = doc.split("<!-- reasons:begin -->\n")[1].split("\n<!-- reasons:end -->")[0]
    assert block == reasons_table(), "regenerate the block with `prefpipe policy reasons`"
    default = (ROOT / "policies" / "default.toml").read_text(encoding="utf-8")
    for code, action in default_flag_actions().items():
        assert f'{code} = "{action}"' in default


@pytest.mark.parametrize("reason", [r.code for r in pair_reasons()])
def test_select_drops_on_every_declared_pair_reason(reason):
    """No declared pair reason is silently ignored when the policy asks to drop on it."""
    pairs = _pairs(3)
    flags = make_flags(["p1"], subject_kind="pair", check="x", reason=reason)
    allowed = REASONS[reason].actions
    if "drop" not in allowed:
        pytest.skip(f"{reason} cannot be dropped on")
    res = select_pairs(pairs, flags, SelectConfig(flag_actions={reason: "drop"}))
    fate = dict(res.pairs.select("pair_id", "reason").iter_rows())
    assert fate == {"p0": None, "p1": reason, "p2": None}
    if "warn" in allowed:
        res = select_pairs(pairs, flags, SelectConfig(flag_actions={reason: "warn"}))
        assert res.pairs["decision"].to_list() == ["keep"] * 3


def test_a_new_check_is_one_declaration(monkeypatch):
    """A check added by a module + a registry line: its reason is accepted by the policy, has its
    default action, takes its place in select's precedence and is run with the inputs it declares."""
    seen = {}

    def run(judgments, cfg, *, pairs):
        seen["pairs"] = pairs.height
        return CheckResult(name="toxicity", status="warn",
                           flags=make_flags(["p2"], subject_kind="pair", check="toxicity", reason="toxic"))

    toy = CheckSpec(name="toxicity", run=run, reasons=(Reason("toxic", "pair", "drop", "a toxic response", precedence=65),))
    monkeypatch.setattr(checks, "CHECKS", (*CHECKS, toy))
    monkeypatch.setattr(checks, "REASONS", checks._reasons())
    assert resolve_policy(Policy()).select.flag_actions["toxic"] == "drop"
    assert drop_order().index("toxic") == drop_order().index("low_agreement") + 1
    pairs = _pairs(3)
    registered = next(c for c in checks.CHECKS if c.name == "toxicity")
    res = registered.run(None, None, pairs=pairs)
    sel = select_pairs(pairs, res.flags, SelectConfig())  # dropped by its declared default, no policy entry
    assert dict(sel.pairs.select("pair_id", "reason").iter_rows())["p2"] == "toxic"
    assert seen == {"pairs": 3}


def test_policy_refuses_unknown_reasons_and_disallowed_actions():
    from schemas.policy import PolicyError

    with pytest.raises(PolicyError, match="unknown reason"):
        resolve_policy(policy_from_dict({"select": {"flag_actions": {"vibes": "drop"}}}))
    with pytest.raises(PolicyError, match="label_imbalance: expected one of"):
        resolve_policy(policy_from_dict({"select": {"flag_actions": {"label_imbalance": "drop"}}}))
    p = resolve_policy(policy_from_dict({"select": {"flag_actions": {"near_duplicate": "drop"}}}))
    assert p.select.flag_actions["near_duplicate"] == "drop" and p.select.flag_actions["exact_duplicate"] == "drop"
    assert resolve_policy(p) is p  # idempotent
