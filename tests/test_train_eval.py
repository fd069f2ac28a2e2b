"""Test-split evaluation per slice (before vs after, bootstrap CIs), eval.json / eval.parquet, the run report."""
from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from trainer_toys import make_store, planted_rows

from trainer.evaluate import BootstrapConfig, bucket, evaluate_slices, summary_lines
from trainer.objectives import DPOLossConfig
from trainer.train import make_config, train

TINY = "tiny-llama:layers=1,hidden=32,heads=2"
FAST = dict(model=TINY, max_length=64, threads=1, lr=1e-3, warmup_steps=2, eval_every=0)


def _test_rows(n=21):
    rows = planted_rows(n, seed=2, prefix="t")
    for i, r in enumerate(rows):
        r["locale"] = ["en", "zh", "ja"][i % 3]
        r["agreement"] = [0.5, 0.7, 1.0][i % 3]
        r["strength"] = None if i % 7 == 0 else 0.9
        r["annotator_kind"] = "ai" if i % 2 else "human"
    rows[0]["locale"] = "<b>x|y</b>\n# z"  # user text: must be escaped in every report
    return rows


def test_metrics_and_cis_against_a_hand_computation():
    rows = [{"pair_id": f"p{i}", "locale": "en" if i < 3 else "fr", "annotator_kind": "human", "agreement": 0.9,
             "strength": None} for i in range(5)]
    ref = {f"p{i}": (-10.0, -10.0) for i in range(5)}
    after = {"p0": (-9.0, -11.0), "p1": (-9.5, -10.0), "p2": (-11.0, -9.0), "p3": (-8.0, -12.0), "p4": (-10.0, -10.0)}
    lengths = {f"p{i}": (4, 5) for i in range(5)}
    beta = 0.1
    summary, tidy, per_pair = evaluate_slices(rows, {"reference": ref, "before": ref, "after": after}, lengths,
                                              DPOLossConfig(beta=beta), tags={"p0": ["math", "<tag>"], "p1": []},
                                              boot=BootstrapConfig(resamples=400, seed=1))
    o = summary["overall"]
    margins = [beta * ((c + 10) - (r + 10)) for c, r in after.values()]
    assert o["after"]["reward_margin"]["mean"] == pytest.approx(np.mean(margins))
    assert o["after"]["reward_accuracy"]["mean"] == pytest.approx(3 / 5)  # a tie (p4) counts as wrong
    assert o["after"]["dpo_loss"]["mean"] == pytest.approx(np.mean([math.log1p(math.exp(-m)) for m in margins]))
    assert o["before"]["dpo_loss"]["mean"] == pytest.approx(math.log(2)) and o["before"]["reward_accuracy"]["mean"] == 0
    assert o["after"]["logp_accuracy"]["mean"] == pytest.approx(3 / 5)
    for phase in ("before", "after", "delta"):
        for m, s in o[phase].items():
            assert s["ci_low"] <= s["mean"] + 1e-12 and s["mean"] <= s["ci_high"] + 1e-12, (phase, m)
    assert o["delta"]["reward_margin"]["mean"] == pytest.approx(o["after"]["reward_margin"]["mean"])
    keys = {(s["kind"], s["value"]): s["pairs"] for s in summary["slices"]}
    assert keys[("all", "all")] == 5 and keys[("locale", "en")] == 3 and keys[("locale", "fr")] == 2
    assert keys[("tag", "math")] == 1 and keys[("tag", "<tag>")] == 1 and keys[("tag", "(none)")] == 4
    assert keys[("agreement", ">= 0.8")] == 5 and keys[("strength", "n/a")] == 5
    assert len(tidy) == len(summary["slices"]) * 3 * 4 and len(per_pair) == 5
    assert [bucket(x) for x in (None, 0.1, 0.6, 0.79, 0.8, 1.0)] == ["n/a", "< 0.6", "0.6-0.8", "0.6-0.8", ">= 0.8", ">= 0.8"]
    # the same seed gives the same intervals
    again, _, _ = evaluate_slices(rows, {"reference": ref, "before": ref, "after": after}, lengths, DPOLossConfig(beta=beta),
                                  boot=BootstrapConfig(resamples=400, seed=1))
    assert again["overall"] == summary["overall"]


def test_ipo_uses_the_completion_lengths():
    rows = [{"pair_id": "p", "locale": "en"}]
    lp = {"reference": {"p": (-10.0, -10.0)}, "before": {"p": (-10.0, -10.0)}, "after": {"p": (-8.0, -12.0)}}
    s1, _, _ = evaluate_slices(rows, lp, {"p": (2, 2)}, DPOLossConfig(beta=0.1, loss_type="ipo"),
                               boot=BootstrapConfig(resamples=10))
    s2, _, _ = evaluate_slices(rows, lp, {"p": (4, 4)}, DPOLossConfig(beta=0.1, loss_type="ipo"),
                               boot=BootstrapConfig(resamples=10))
    h1, h2 = (2 / 2 + 2 / 2), (2 / 4 + 2 / 4)  # length-normalised log-ratio difference
    assert s1["overall"]["after"]["dpo_loss"]["mean"] == pytest.approx((h1 - 5) ** 2)
    assert s2["overall"]["after"]["dpo_loss"]["mean"] == pytest.approx((h2 - 5) ** 2)


def test_run_writes_eval_files_report_and_lineage(tmp_path):
    st = make_store(tmp_path / "s", {"train": planted_rows(24), "validation": planted_rows(8, seed=1, prefix="v"),
                                     "test": _test_rows()})
    res = train(make_config(st.root, "v-toy", run_id="ev", max_steps=6, test_eval_every=3, bootstrap_resamples=200,
                            **FAST))
    d = res.run_dir
    ev = json.loads((d / "eval.json").read_text())
    assert ev["pairs"] == 21 and ev["split"] == "test" and ev["version_id"] == "v-toy"
    kinds = {s["kind"] for s in ev["slices"]}
    assert {"all", "locale", "annotator_kind", "agreement", "strength"} <= kinds
    o = ev["overall"]
    assert o["before"]["dpo_loss"]["mean"] == pytest.approx(math.log(2), abs=1e-6)  # reference = initial policy
    assert o["after"]["dpo_loss"]["mean"] < math.log(2)  # the planted preference is learned a little in 6 steps
    tidy = pl.read_parquet(d / "eval.parquet")
    assert set(tidy.columns) >= {"kind", "value", "pairs", "phase", "metric", "mean", "ci_low", "ci_high"}
    assert set(tidy["phase"]) == {"before", "after", "delta"}
    assert pl.read_parquet(d / "eval_pairs.parquet").height == 21
    # the test curve every 3 steps, and the run's final record + lineage carry the evaluation
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    test_recs = [r for r in recs if r["kind"] == "test"]
    assert [r["step"] for r in test_recs] == [3, 6] and all("test/loss" in r and "test/pairs" in r for r in test_recs)
    run = json.loads((d / "run.json").read_text())
    assert run["final"]["test"]["pairs"] == 21 and "after/reward_accuracy" in run["final"]["test"]
    assert run["tokenize_ledger"]["test"]["kept"] == 21
    lineage = [json.loads(x) for x in (st.root / "lineage" / "v-toy.jsonl").read_text().splitlines()]
    assert lineage[-1]["event"] == "finished" and lineage[-1]["final"]["test"]["pairs"] == 21
    # the report: charts, escaped user text
    html = (d / "report.html").read_text()
    assert html.count("<svg") >= 4 and 'data-chart="slice-reward_accuracy"' in html and 'data-chart="curves"' in html
    assert "<b>x|y</b>" not in html and "&lt;b&gt;x|y&lt;/b&gt;" in html
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    md = (d / "report.md").read_text()
    assert "\\<b\\>x\\|y\\</b\\>" in md and "\n# z" not in md
    lines = summary_lines(res.evaluation)
    assert lines[0].startswith("test split: 21 pairs") and any("locale=" in x for x in lines)


def test_empty_test_split_is_reported_not_an_error(tmp_path):
    st = make_store(tmp_path / "s", {"train": planted_rows(12), "validation": planted_rows(4, seed=1, prefix="v"),
                                     "test": []})
    res = train(make_config(st.root, "v-toy", run_id="no-test", max_steps=1, **FAST))
    ev = json.loads((res.run_dir / "eval.json").read_text())
    assert ev["pairs"] == 0 and ev["overall"] is None and "empty" in ev["note"]
    assert summary_lines(ev)[0].startswith("test split: no pairs")
    assert "No test-split evaluation" in (res.run_dir / "report.html").read_text()


def test_validation_split_without_pairs_has_no_loss_not_a_zero_one(tmp_path):
    """Every validation prompt longer than --max-length (all dropped by tokenisation): the evaluation
    recorded eval/loss 0.0 -- a perfect loss over no pairs -- in metrics.jsonl, run.json and the CLI
    line, and the terminal progress printer raised KeyError on its eval line."""
    from flows.train_cmd import _Progress

    long_prompt = [{"role": "user", "content": "river stone cloud " * 40}]
    val = [{**r, "prompt": long_prompt} for r in planted_rows(4, seed=1, prefix="v")]
    st = make_store(tmp_path / "s", {"train": planted_rows(12), "validation": val, "test": []})
    res = train(make_config(st.root, "v-toy", run_id="no-val", max_steps=2, **{**FAST, "eval_every": 1}))
    assert res.ledger["validation"]["dropped_prompt_too_long"] == 4
    evals = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert evals and all(e["eval/pairs"] == 0 and "eval/loss" not in e for e in evals)
    assert res.final["eval/pairs"] == 0 and "eval/loss" not in res.final
    with _Progress(2, enabled=True) as progress:
        progress.on_event("eval", evals[-1])  # says there were no pairs; no KeyError


def test_cli_prints_the_evaluation_summary(tmp_path):
    import typer
    from typer.testing import CliRunner

    from flows.train_cmd import train as train_cmd

    st = make_store(tmp_path / "s", {"train": planted_rows(12), "validation": planted_rows(4, seed=1, prefix="v"),
                                     "test": _test_rows(9)})
    app = typer.Typer()
    app.command()(train_cmd)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["train", "v-toy", "--store", str(st.root), "--model", TINY, "--steps", "2",
                                   "--max-length", "64", "--threads", "1", "--run-id", "cli-eval"])
    assert res.exit_code == 0, res.output
    assert "test split: 9 pairs" in res.output and "DPO loss" in res.output and "report.html" in res.output
    assert "<b>x|y</b>" in res.output or "x|y" in res.output  # printed literally, not as markup


def test_evaluation_end_to_end_on_the_samples(tmp_path):
    """The three sample batches curated and certified by the pipeline, then a short run: the test
    split is evaluated per locale, tag (from pairs.parquet), annotator kind and buckets."""
    from conftest import ROOT

    from pipeline.certify import certify_version
    from pipeline.curate import curate
    from pipeline.store import Store
    from schemas.policy import policy_from_dict

    policy = policy_from_dict({"certify": {"require_expectations": False}})  # Great Expectations: not this test's subject
    store = Store(tmp_path / "store")
    samples = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))
    vid = curate(samples, store, policy).version_id
    cert = certify_version(store, vid, policy, run_gx=False)
    if cert.verdict != "certified":
        pytest.skip(f"the samples' version is not certified under the default policy here: "
                    f"{[g.name for g in cert.gates if not g.passed]}")
    res = train(make_config(store.root, vid, run_id="samples", max_steps=2, bootstrap_resamples=100,
                            **{**FAST, "max_length": 256}))
    ev = res.evaluation
    test_rows = pl.read_parquet(store.get(vid).split_path("test"))
    assert ev["pairs"] == res.ledger["test"]["kept"] <= test_rows.height and ev["pairs"] > 0
    kinds = {s["kind"] for s in ev["slices"]}
    assert {"all", "locale", "tag", "annotator_kind", "agreement", "strength"} <= kinds
    assert {s["value"] for s in ev["slices"] if s["kind"] == "locale"} <= set(test_rows["locale"].fill_null("n/a"))
    assert (res.run_dir / "report.html").exists() and (res.run_dir / "eval.parquet").exists()


def test_eval_tables_are_written_atomically(tmp_path, monkeypatch):
    """A crash (disk full, a kill) while the evaluation tables are rewritten -- a run that failed after writing them
    (in its report, say) resumed -- leaves the earlier eval.parquet / eval_pairs.parquet whole, not half a file under
    the final name.  (A finished run resumed writes nothing: tests/test_train_trust.py.)"""
    st = make_store(tmp_path / "s", {"train": planted_rows(8), "validation": planted_rows(4, seed=1, prefix="v"),
                                     "test": _test_rows(6)})
    cfg = dict(run_id="at", max_steps=1, bootstrap_resamples=20, **FAST)
    d = train(make_config(st.root, "v-toy", **cfg)).run_dir
    before = {n: (d / n).read_bytes() for n in ("eval.parquet", "eval_pairs.parquet")}
    run = json.loads((d / "run.json").read_text())
    (d / "run.json").write_text(json.dumps({**run, "status": "failed"}))

    def torn_write(self, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", torn_write)
    with pytest.raises(OSError, match="No space left"):
        train(make_config(st.root, "v-toy", resume=True, **cfg))
    assert {n: (d / n).read_bytes() for n in before} == before
    assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
