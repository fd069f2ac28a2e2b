"""A dependency-free SVG plot of a run's metrics (matplotlib is not a dependency).

``write_metrics_svg(records, path)`` draws one small panel per metric (train as a line,
validation as dots) and writes a standalone SVG that any browser shows.
"""
from __future__ import annotations

import math
from html import escape
from pathlib import Path

PANELS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "tokens/s")
W, H, PAD_L, PAD_R, PAD_T, PAD_B, COLS = 300, 170, 46, 10, 24, 22, 3


def _fmt(v: float) -> str:
    if v == 0 or 1e-2 <= abs(v) < 1e4:
        return f"{v:.3g}"
    return f"{v:.1e}"


def _panel(name: str, train: list[tuple[float, float]], evals: list[tuple[float, float]], x0: float, y0: float,
           xmax: float) -> list[str]:
    pts = train + evals
    out = [f'<g transform="translate({x0},{y0})">',
           f'<text x="{W / 2}" y="14" text-anchor="middle" font-size="12">{escape(name)}</text>',
           f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" fill="none" stroke="#999"/>']
    if not pts:
        return out + ['<text x="150" y="90" text-anchor="middle" font-size="11" fill="#999">no data</text>', "</g>"]
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    sx = (W - PAD_L - PAD_R) / max(xmax, 1)
    sy = (H - PAD_T - PAD_B) / (hi - lo)

    def xy(s: float, v: float) -> str:
        return f"{PAD_L + s * sx:.1f},{H - PAD_B - (v - lo) * sy:.1f}"

    if train:
        out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.2" points="{" ".join(xy(s, v) for s, v in train)}"/>')
    for s, v in evals:
        x, y = xy(s, v).split(",")
        out.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="#d62728"/>')
    out += [f'<text x="{PAD_L - 3}" y="{PAD_T + 9}" text-anchor="end" font-size="9">{_fmt(hi)}</text>',
            f'<text x="{PAD_L - 3}" y="{H - PAD_B}" text-anchor="end" font-size="9">{_fmt(lo)}</text>',
            f'<text x="{W - PAD_R}" y="{H - 6}" text-anchor="end" font-size="9">step {int(xmax)}</text>', "</g>"]
    return out


def write_metrics_svg(records: list[dict], path: Path, title: str = "") -> Path:
    """Records are metrics.jsonl lines: ``kind`` "train" or "eval", ``step`` and metric keys
    (eval metrics carry an ``eval/`` prefix)."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    xmax = max([r["step"] for r in records] or [1])
    rows = math.ceil(len(PANELS) / COLS)
    body = [f'<text x="8" y="18" font-size="13" font-weight="bold">{escape(title)}</text>',
            '<text x="8" y="34" font-size="10" fill="#555">line: train (per optimizer step); dots: validation</text>']
    for i, name in enumerate(PANELS):
        t = [(r["step"], float(r[name])) for r in train if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        e = [(r["step"], float(r[f"eval/{name}"])) for r in evals
             if isinstance(r.get(f"eval/{name}"), (int, float)) and math.isfinite(r[f"eval/{name}"])]
        body += _panel(name, t, e, (i % COLS) * W, 40 + (i // COLS) * H, xmax)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{COLS * W}" height="{40 + rows * H}" '
           f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>' + "".join(body) + "</svg>\n")
    tmp = path.with_suffix(".svg.tmp")
    try:
        tmp.write_text(svg, encoding="utf-8")
        tmp.replace(path)
    finally:  # (a full disk: no half-written temp file left in the run directory)
        tmp.unlink(missing_ok=True)
    return path
