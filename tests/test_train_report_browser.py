"""The training run's report.html rendered by headless Chromium (the harness of test_report_browser.py):
no console errors, no request but the page itself, the curves and per-slice charts drawn, their
text inside the charts and not overlapping, user text escaped in the rendered DOM.

Skips without ``chromium`` on PATH, except under CI (``CI=true``), where ``.ci/run`` installs it.
"""
from __future__ import annotations

import os
import re

import pytest
from test_report_browser import CHART_JS, CHROMIUM, Chromium, chart_text_problems, stderr_console_lines
from trainer_toys import make_store, planted_rows

from trainer.train import make_config, train

pytestmark = pytest.mark.service
SLICE_CHARTS = {"slice-reward_accuracy": 10, "slice-dpo_loss": 20, "slice-logp_accuracy": 20}  # fewest bars


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    test = planted_rows(24, seed=2, prefix="t")
    for i, r in enumerate(test):
        r["locale"] = ["en", "zh", "ja"][i % 3]
        r["agreement"] = [0.5, 0.7, 1.0][i % 3]
        r["annotator_kind"] = "ai" if i % 2 else "human"
    test[0]["locale"] = "<img src=x onerror=alert(1)>" + "-very-long-locale-name" * 3  # hostile and long
    st = make_store(tmp_path_factory.mktemp("runstore") / "s",
                    {"train": planted_rows(24), "validation": planted_rows(8, seed=1, prefix="v"), "test": test})
    res = train(make_config(st.root, "v-toy", model="tiny-llama:layers=1,hidden=32,heads=2", max_length=64, threads=1,
                            lr=1e-3, warmup_steps=2, eval_every=3, max_steps=6, bootstrap_resamples=200))
    return res.run_dir


@pytest.fixture(scope="module")
def page(tmp_path_factory, run_dir):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run should have installed the Debian package chromium")
        pytest.skip("chromium not installed (Debian package chromium); .ci/run installs it in CI")
    browser = Chromium(CHROMIUM, tmp_path_factory.mktemp("chromium") / "profile")
    url = (run_dir / "report.html").resolve().as_uri()
    p = browser.open(url)
    out = {"layout": p.evaluate(CHART_JS), "dom": p.dom(), "errors": p.errors(), "requests": p.requests(), "url": url,
           "console": stderr_console_lines(browser.log, url)}
    browser.close()
    return out


def test_run_report_loads_clean_and_draws_every_chart(page):
    assert page["errors"] == [] and page["console"] == [], (page["errors"], page["console"])
    assert page["requests"] == [page["url"]], page["requests"]
    assert not re.search(r"<img\b", page["dom"], re.I), "user text became markup"
    charts = {c["name"]: c for c in page["layout"]["charts"]}
    assert "curves" in charts
    x0, y0, x1, y1 = charts["curves"]["box"]
    assert x1 - x0 > 300 and y1 - y0 > 100
    for name, fewest in SLICE_CHARTS.items():
        c = charts[name]
        assert c["marks"] >= fewest, f"{name}: {c['marks']} bars drawn, expected at least {fewest}"


def test_slice_chart_text_is_inside_and_apart(page):
    problems = []
    for c in page["layout"]["charts"]:
        if not c["name"].startswith("slice-"):
            continue
        problems += chart_text_problems(c)
    assert not problems, "\n".join(problems[:20])
