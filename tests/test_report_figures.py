"""The report's figures as a demanding reader checks them: the ledger shown whole and adding up
(rows in -> judgments -> pairs -> DPO rows, with an adapter that makes several judgments of a row),
no rounding that shows a part as 0 % or all, a p-value of 2e-19 not shown as 0, the overall agreement
shown however few pairs there are, and charts that stay valid SVG with missing or non-finite values.
"""
from __future__ import annotations

import json
import math
import re

import pytest
from conftest import canonical, write_jsonl

from pipeline import svg
from pipeline.artifacts import version_tables
from pipeline.curate import CurateOptions, curate
from pipeline.escape import html_escape, md_escape
from pipeline.report import _num
from pipeline.store import Store
from schemas.policy import Policy

BIASED = "rev-first"


def _rated_rows() -> list[dict]:
    """Rated candidate lists (UltraFeedback style): 4 candidates a prompt, two with the same text (that pair is
    not formed: skipped ``identical_candidates``) -> 5 judgments of each row."""
    return [{"prompt": f"Explain topic {i} in one sentence.", "annotator_id": f"rater-{i % 2}", "completions": [
        {"text": f"Answer one about {i}", "score": 5}, {"text": f"Answer two about {i}", "score": 3},
        {"text": f"Answer three about {i}", "score": 1}, {"text": f"Answer one about {i}", "score": 2}]} for i in range(6)]


def _biased_rows() -> list[dict]:
    """40 pairs, each judged by an annotator who always picks the first-shown response and by two honest ones."""
    rows = []
    for p in range(40):
        first = "ab"[p % 2]
        for k, annotator in enumerate((BIASED, "rev-honest-1", "rev-honest-2")):
            rows.append(canonical(p * 3 + k, comparison_id=f"pos-{p}-{k}", pair_id=f"pos-{p}", shown_first=first,
                                  annotator_id=annotator, label=first if annotator == BIASED else "a"))
    return rows


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    """One version of a canonical batch with a position-biased annotator and a rated batch (one process: the
    rated adapter's several judgments a row)."""
    d = tmp_path_factory.mktemp("figures")
    canon = write_jsonl(d / "biased.jsonl", _biased_rows())
    rated = write_jsonl(d / "rated.jsonl", _rated_rows())
    store = Store(d / "store")
    res = curate([canon], store, Policy(), options=CurateOptions(partitioned=False))
    child = curate([rated], store, Policy(), parent=res.version_id, options=CurateOptions(fmt="rated"))
    return store.get(child.version_id)


def test_ledger_shows_where_every_row_went_and_adds_up(version):
    m = version.manifest()
    assert m.ingest.judgments == m.ingest.rows_valid - 6 + 6 * 5 and m.ingest.skipped == {"identical_candidates": 6}
    md = version.file("report.md").read_text(encoding="utf-8")
    ledger = md.split("## Ledger")[1].split("\n## ")[0]
    assert f"| rows valid | {m.ingest.rows_valid} |" in ledger
    assert f"| judgments made from valid rows | {m.ingest.judgments} |" in ledger
    assert "| candidate pairs not formed: identical_candidates | 6 |" in ledger
    from pipeline.report import ledger_sums

    sums = ledger_sums(m)
    assert all("≠" not in s for s in sums) and len(sums) == 5, sums
    for s in sums:  # every identity holds with the figures shown
        assert f"- {md_escape(s)}" in ledger, s
        lhs, rhs = re.match(r"[a-z ]+ ([\d,]+) = (.*)", s).groups() if "=" in s else (None, None)
        if lhs:
            assert int(lhs.replace(",", "")) == sum(int(x.replace(",", "")) for x in re.findall(r" ([\d,]+)(?: \+|$)", rhs))
    html = version.file("report.html").read_text(encoding="utf-8")
    assert f"pairs {m.ledger.pairs:,} = kept {m.ledger.pairs_kept:,}" in html
    r = m.ledger.reviews  # the funnel's bars say what their numbers count
    funnel = html.split('data-chart="review-funnel"')[1].split("</svg>")[0]
    assert f">{r.reviewed} pairs · {r.judgments_of_routed} review judgments</text>" in funnel
    assert f">{r.routed_ever} pairs</text>" in funnel
    stages = {r["stage"]: r["count"] for r in version_tables(version)["ledger"]}  # the Prefect table artifact
    assert stages["candidate pairs not formed: identical_candidates"] == 6
    assert stages["judgments made from valid rows"] == m.ingest.judgments


def test_a_tiny_p_value_is_not_shown_as_zero(version):
    ann = version.read("annotators.parquet")
    p = ann.filter(ann["annotator_id"] == BIASED)["position_p_value"][0]
    assert 0 < p < 1e-6
    html = version.file("report.html").read_text(encoding="utf-8")
    flagged = html.split("<b>Flagged annotators</b>")[1].split("</table>")[0]
    assert BIASED in flagged and "&lt;0.001" in flagged and "0.000<" not in flagged
    row = next(r for r in version_tables(version)["annotators"] if r["annotator_id"] == BIASED)
    assert row["position_p_value"] == pytest.approx(p, rel=1e-2) and row["position_p_value"] > 0


LONG_PAIR = "pair-from-the-vendor-0000000000-"


def test_overall_agreement_is_shown_below_the_slice_minimum(tmp_path):
    """7 pairs (fewer than the 10 a slice needs): the agreement verdict's overall alpha is still drawn and tabled.
    The pairs' ids are long and alike: the examples show them cut with a mark, never as complete ids."""
    rows = [canonical(p * 3 + k, comparison_id=f"c-{p}-{k}", pair_id=f"{LONG_PAIR}{p}", annotator_id=f"r-{k}",
                      prompt=[{"role": "user", "content": f"How do I bake bread number {p}?"}],
                      response_a=f"Mix flour, water, yeast and salt ({p}).", response_b=f"Buy it at the store ({p}).",
                      label="both_bad" if (p, k) == (1, 0) else "a" if p % 2 == 0 or k else "b") for p in range(7) for k in range(3)]
    store = Store(tmp_path / "s")
    h = store.get(curate([write_jsonl(tmp_path / "few.jsonl", rows)], store, Policy(),
                         options=CurateOptions(partitioned=False)).version_id)
    alpha = h.manifest().check("agreement").metrics["all"]["krippendorff_alpha"]
    assert alpha is not None and h.manifest().check("agreement").metrics["all"]["n_pairs"] == 7
    html = h.file("report.html").read_text(encoding="utf-8")
    section = html.split("<h2>Agreement per slice</h2>")[1].split("<h2>")[0]
    assert "no data" not in section
    assert re.search(r"<title>overall[^<]*Krippendorff α: ", section)
    assert f"<td class=n>{alpha:.3f}</td>" in section or f"<td class=n>{_num(alpha)}</td>" in section
    examples = html.split("<b>near_duplicate</b>")[1].split("</table>")[0]  # ("bake bread number N": one cluster)
    cut = LONG_PAIR[:13] + "…"
    assert f"<td class=id>{cut}</td>" in examples and f"<td class=id>{LONG_PAIR[:14]}</td>" not in examples
    assert "<td>a\u00a02 · b\u00a00 · tie\u00a00 · both_bad\u00a01</td>" in examples  # pair 1's 3 votes, not 2 of them
    cluster = h.read("pairs", columns=["near_dup_cluster"])["near_dup_cluster"][0]
    md = h.file("report.md").read_text(encoding="utf-8").split("## Near-duplicate clusters")[1]
    assert len(cluster) > 14 and f"| {cluster[:13]}… | 7 | 7 |" in md


def test_rounding_never_turns_a_part_into_none_or_all():
    assert _num(2.26e-19) == "<0.001" and _num(0.0004) == "<0.001" and _num(-0.0004) == ">-0.001"
    assert _num(0.9996) == ">0.999" and _num(1.0) == "1.000" and _num(0.0) == "0.000" and _num(0.4567) == "0.457"
    assert _num(math.nan) == "–"
    assert svg._share(4, 1000) == "<1%" and svg._share(996, 1000) == ">99%" and svg._share(1000, 1000) == "100%"
    assert svg._share(4, 10_000, 1) == "<0.1%" and svg._share(9_996, 10_000, 1) == ">99.9%"
    assert svg._fmt(0.004) == "0.004" and svg._fmt(0.0) == "0"
    chart = svg.stacked_hbars("x", "t", [("rows in", [("valid", 9_996), ("quarantined", 4)])])
    assert "(100%)" not in chart and "(0%)" not in chart and "(0.0%)" not in chart and "(100.0%)" not in chart
    shares = svg.vbars("x", "t", ["en"], {"a": [0.996], "tie": [0.004]}, y_range=(0, 1))
    assert "tie: 0.004<" in shares


NAN, INF = math.nan, math.inf
CHARTS = {
    "vbars": lambda: svg.vbars("x", "t", ["a", "b", "c"], {"s": [NAN, 1.0, INF], "k": [None, 0.5, 0.2]}, stacked=False,
                               values=True, errors={"s": [(NAN, NAN), (0.5, 1.2), None]}),
    "vbars stacked": lambda: svg.vbars("x", "t", ["a", "b"], {"s": [INF, 1.0], "k": [NAN, 2.0]}),
    "hbars": lambda: svg.hbars("x", "t", [("a", NAN, "pairs"), ("b", 2.0, ""), ("c", INF, "")]),
    "dot_ci": lambda: svg.dot_ci("x", "t", [("a", NAN, NAN, NAN, False), ("b", 0.5, NAN, 0.8, True)]),
    "scatter": lambda: svg.scatter("x", "t", [("a", NAN, 0.5, False), ("b", INF, 0.2, True), ("c", 0.4, 0.6, False)],
                                   x_label="x", y_label="y"),
    "heatmap": lambda: svg.heatmap("x", "t", ["r"], ["c", "d", "e"], [[NAN, 1.0, INF]]),
    "stacked_hbars": lambda: svg.stacked_hbars("x", "t", [("r", [("a", INF), ("b", 1.0), ("c", NAN)])]),
}


@pytest.mark.parametrize("name", list(CHARTS))
def test_charts_with_missing_or_non_finite_values_stay_drawable(name):
    """No NaN/inf in a coordinate (Chromium drops the mark or the chart) and no exception: such a value draws no mark."""
    out = CHARTS[name]()
    attrs = re.findall(r'\s[\w-]+="([^"]*)"', out)
    assert not [a for a in attrs if re.search(r"\b(nan|inf)\b", a, re.I)], out
    assert not re.search(r">[^<]*\b(nan|inf)\b[^<]*<", out, re.I), out
    assert out.startswith("<svg") and out.endswith("</svg>")


def test_a_whisker_below_zero_stays_inside_the_plot():
    """Agreement CIs reach below 0 on few pairs: the axis extends to them instead of the whisker running
    out of the plot over the category labels."""
    out = svg.vbars("x", "t", ["overall\nhuman\n7 pairs"], {"α": [0.12], "κ": [0.09]}, stacked=False, y_range=(0, 1),
                    errors={"α": [(-0.1, 0.23)], "κ": [(-0.12, 0.2)]})
    grid = r'<line x1="[\d.]+" x2="[\d.]+" y1="([-\d.]+)" y2="[-\d.]+" stroke="#(94a3b8|e2e8f0)"/>'
    ticks = {float(y): color for y, color in re.findall(grid, out)}
    zero = next(y for y, color in ticks.items() if color == "94a3b8")
    whiskers = [float(y) for pair in re.findall(r'y1="([-\d.]+)" y2="([-\d.]+)" stroke="#0f172a"', out) for y in pair]
    labels = [float(y) for y in re.findall(r'<text x="[\d.]+" y="([\d.]+)" text-anchor="middle" fill="#334155" font-size="10">', out)]
    assert whiskers and max(ticks) > zero  # a tick below the zero line
    assert max(whiskers) <= max(ticks) < min(labels), (whiskers, ticks, labels)


def test_label_shares_say_their_base(version):
    """The label distribution's shares are of the version's judgments (dropped ones included): the note says how
    many, and it is the judgments table's size."""
    html = version.file("report.html").read_text(encoding="utf-8")
    note = html.split('data-chart="label-distribution"')[1].split("</svg>")[1].split("</div>")[0]
    n = version.read("judgments", columns=["pair_id"]).height
    assert html_escape(f"Base: each slice's judgments, {n:,} in all") in note
    assert html_escape(f"the ledger's {version.manifest().ledger.judgments_valid:,} valid judgments") in note
