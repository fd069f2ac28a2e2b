"""The run report: ``report.html`` (self-contained: inline SVG, no script, no external request) and
``report.md``, from ``run.json``, ``metrics.jsonl`` and ``eval.json`` of a run directory.

Sections: the run (version, model, objective, data ledger), the test-split evaluation (overall
before / after / delta with CIs), loss and reward curves (the ``metrics.svg`` panels, train line
and validation dots), and per-slice bars with CI whiskers (reward accuracy after training, DPO
loss before and after).  Every value that comes from data (slice names such as locales and
tags, ids) is escaped: ``html.escape`` in HTML, backslash-escaped Markdown specials and no raw
newlines in Markdown.
"""
from __future__ import annotations

import json
import math
import re
from html import escape
from pathlib import Path
from typing import Any

from trainer.plot import write_metrics_svg
from trainer.tokenize import ledger_summary

BAR_W, ROW_H, LABEL_W, PAD, LABEL_CHARS = 360, 18, 210, 8, 30
COLORS = {"before": "#9aa5b1", "after": "#1f77b4"}


def md_escape(text: Any) -> str:
    """Text safe inside a Markdown table cell: no newlines, specials and HTML escaped."""
    s = re.sub(r"[\r\n\t]+", " ", str(text))
    s = re.sub(r"([\\`*_\[\]#!|<>~&])", r"\\\1", s)
    return s


def _fmt(s: dict[str, float], pct: bool = False) -> str:
    if s is None or s.get("mean") is None or math.isnan(s["mean"]):
        return "n/a"
    k, d = (100, 1) if pct else (1, 3)
    return f"{s['mean'] * k:.{d}f} [{s['ci_low'] * k:.{d}f}, {s['ci_high'] * k:.{d}f}]"


def slice_bars_svg(slices: list[dict[str, Any]], metric: str, phases: tuple[str, ...], *, pct: bool, title: str) -> str:
    """Horizontal bars, one group per slice, one bar per phase, with the CI as a whisker."""
    rows = [(s, ph) for s in slices for ph in phases]
    vals = [v for s, ph in rows for v in (s[ph][metric]["ci_low"], s[ph][metric]["ci_high"], s[ph][metric]["mean"])
            if v is not None and math.isfinite(v)]
    lo, hi = min(vals + [0.0]), max(vals + [1e-9])
    if pct:
        lo, hi = 0.0, max(1.0, hi)
    height = PAD * 3 + 14 + len(rows) * ROW_H + len(slices) * 4
    sx = BAR_W / (hi - lo)

    def x(v: float) -> float:
        return LABEL_W + (v - lo) * sx

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" data-chart="slice-{escape(metric)}" viewBox="0 0 '
           f'{LABEL_W + BAR_W + 70} {height}" width="{LABEL_W + BAR_W + 70}" height="{height}" font-family="sans-serif">',
           f'<text x="4" y="14" font-size="12" font-weight="bold">{escape(title)}</text>',
           f'<line x1="{x(0):.1f}" y1="20" x2="{x(0):.1f}" y2="{height - PAD}" stroke="#444"/>']
    y = 24.0
    for s in slices:
        label = f"{s['kind']}={s['value']} ({s['pairs']})"
        shown = label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "\u2026"  # the full name is in <title>
        for j, ph in enumerate(phases):
            st = s[ph][metric]
            m = st["mean"] if st["mean"] is not None and math.isfinite(st["mean"]) else 0.0
            x0, x1 = sorted((x(0), x(m)))
            tip = escape(f"{label} {ph}: {_fmt(st, pct)}")
            if j == 0:
                out.append(f'<text x="{LABEL_W - 6}" y="{y + ROW_H * len(phases) / 2 + 4:.1f}" text-anchor="end" '
                           f'font-size="11">{escape(shown)}<title>{escape(label)}</title></text>')
            out.append(f'<rect x="{x0:.1f}" y="{y + 2:.1f}" width="{max(x1 - x0, 0.5):.1f}" height="{ROW_H - 5}" '
                       f'fill="{COLORS.get(ph, "#1f77b4")}"><title>{tip}</title></rect>')
            if math.isfinite(st["ci_low"]) and math.isfinite(st["ci_high"]):
                cy = y + ROW_H / 2
                out.append(f'<line x1="{x(st["ci_low"]):.1f}" y1="{cy:.1f}" x2="{x(st["ci_high"]):.1f}" y2="{cy:.1f}" '
                           'stroke="#222" stroke-width="1.2"/>')
            y += ROW_H
        y += 4
    out.append(f'<text x="{LABEL_W}" y="{height - 2}" font-size="9" fill="#555">{lo * (100 if pct else 1):.3g}</text>')
    out.append(f'<text x="{LABEL_W + BAR_W}" y="{height - 2}" font-size="9" fill="#555" text-anchor="end">'
               f'{hi * (100 if pct else 1):.3g}</text>')
    legend = " ".join(f'<tspan fill="{COLORS[p]}">&#9632; {p}</tspan>' for p in phases)
    out.append(f'<text x="{LABEL_W + BAR_W + 4}" y="14" font-size="10" text-anchor="end">{legend}</text></svg>')
    return "\n".join(out)


def write_run_report(run_dir: Path) -> tuple[Path, Path]:
    """report.html and report.md in ``run_dir`` (atomic writes); returns both paths."""
    from trainer.runs import atomic_write_text

    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    ev = json.loads((run_dir / "eval.json").read_text(encoding="utf-8")) if (run_dir / "eval.json").exists() else None
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x]
    curves = write_metrics_svg(records, run_dir / "metrics.svg", title=f"{run['run_id']} on {run['version_id']}")
    curves_svg = curves.read_text(encoding="utf-8").replace("<svg ", '<svg data-chart="curves" ', 1)
    final = run.get("final") or {}
    head = [("run", run["run_id"]), ("version", run["version_id"]),
            ("model", run["model"].get("spec") or run["model"].get("path")), ("objective", f"{run['objective']} beta {run['beta']}"),
            ("steps", final.get("step")), ("tokens/s", f"{final.get('tokens_per_s', float('nan')):.0f}"),
            ("peak RSS MiB", final.get("peak_rss_mib")),
            ("validation loss / reward accuracy",
             f"{final.get('eval/loss', float('nan')):.4f} / {final.get('eval/rewards/accuracies', float('nan')):.3f}")]
    ledger = [ledger_summary(led, split) for split, led in (run.get("tokenize_ledger") or {}).items()]

    overall_rows: list[tuple[str, str, str, str]] = []
    slices: list[dict[str, Any]] = []
    if ev and ev.get("overall"):
        o = ev["overall"]
        for m in ev["metrics"]:
            pct = m.endswith("accuracy")
            overall_rows.append((m + (" %" if pct else ""), _fmt(o["before"][m], pct), _fmt(o["after"][m], pct),
                                 _fmt(o["delta"][m], pct)))
        slices = [s for s in ev["slices"] if s["kind"] != "all"]

    # ---- HTML
    h = ['<!doctype html><html><head><meta charset="utf-8">',
         '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">',
         f"<title>{escape(run['run_id'])}: training report</title>",
         "<style>body{font-family:sans-serif;margin:24px;max-width:1000px}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
         "svg{display:block;margin:8px 0}</style></head><body>",
         f"<h1>Training run {escape(run['run_id'])}</h1>",
         "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in head) + "</table>",
         "<h2>Data</h2><ul>" + "".join(f"<li>{escape(x)}</li>" for x in ledger) + "</ul>",
         "<h2>Evaluation on the test split</h2>"]
    if overall_rows:
        b = ev["bootstrap"]
        h.append(f"<p>{ev['pairs']} pairs; means with {int(b['ci'] * 100)}% percentile bootstrap intervals "
                 f"({b['resamples']} resamples; delta = after - before, paired). Before = the initial weights; with the "
                 "reference equal to them, its rewards are 0 by construction.</p>")
        h.append("<table><tr><th>metric</th><th>before</th><th>after</th><th>delta</th></tr>"
                 + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in overall_rows)
                 + "</table>")
    else:
        h.append(f"<p>No test-split evaluation: {escape(str((ev or {}).get('note', 'not run')))}.</p>")
    h += ["<h2>Loss and reward curves</h2>", curves_svg]
    if slices:
        h += ["<h2>Per slice</h2>",
              slice_bars_svg(slices, "reward_accuracy", ("after",), pct=True, title="reward accuracy after training (%)"),
              slice_bars_svg(slices, "dpo_loss", ("before", "after"), pct=False, title="DPO loss, before and after"),
              slice_bars_svg(slices, "logp_accuracy", ("before", "after"), pct=True,
                             title="likelihood prefers the chosen reply (%), before and after"),
              "<table><tr><th>slice</th><th>pairs</th><th>reward acc. after %</th><th>margin after</th>"
              "<th>DPO loss before</th><th>DPO loss after</th></tr>"
              + "".join(f"<tr><td>{escape(s['kind'])}={escape(str(s['value']))}</td><td>{s['pairs']}</td>"
                        f"<td>{escape(_fmt(s['after']['reward_accuracy'], True))}</td>"
                        f"<td>{escape(_fmt(s['after']['reward_margin']))}</td>"
                        f"<td>{escape(_fmt(s['before']['dpo_loss']))}</td><td>{escape(_fmt(s['after']['dpo_loss']))}</td></tr>"
                        for s in slices) + "</table>"]
    h.append("</body></html>")
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    atomic_write_text(html_path, "\n".join(h) + "\n")

    # ---- Markdown
    md = [f"# Training run {md_escape(run['run_id'])}", "", "| | |", "|---|---|"]
    md += [f"| {md_escape(k)} | {md_escape(v)} |" for k, v in head]
    md += ["", "## Data", ""] + [f"- {md_escape(x)}" for x in ledger] + ["", "## Evaluation on the test split", ""]
    if overall_rows:
        b = ev["bootstrap"]
        md += [f"{ev['pairs']} pairs; means with {int(b['ci'] * 100)}% bootstrap intervals ({b['resamples']} resamples).",
               "", "| metric | before | after | delta |", "|---|---|---|---|"]
        md += ["| " + " | ".join(md_escape(c) for c in r) + " |" for r in overall_rows]
    else:
        md.append(f"No test-split evaluation: {md_escape((ev or {}).get('note', 'not run'))}.")
    md += ["", "## Curves", "", "![loss and reward curves](metrics.svg)", ""]
    if slices:
        md += ["## Per slice", "", "| slice | pairs | reward acc. after % | margin after | DPO loss before | DPO loss after |",
               "|---|---|---|---|---|---|"]
        md += [f"| {md_escape(s['kind'])}={md_escape(s['value'])} | {s['pairs']} | "
               f"{md_escape(_fmt(s['after']['reward_accuracy'], True))} | {md_escape(_fmt(s['after']['reward_margin']))} | "
               f"{md_escape(_fmt(s['before']['dpo_loss']))} | {md_escape(_fmt(s['after']['dpo_loss']))} |" for s in slices]
    atomic_write_text(md_path, "\n".join(md) + "\n")
    return html_path, md_path
