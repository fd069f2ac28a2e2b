"""Tiny inline-SVG chart primitives for the self-contained HTML report (no JS, no network).

Each function returns an ``<svg>`` string with a ``<title>`` (accessible name) and
``data-chart`` attribute (the browser test counts rendered charts by it).
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence

PALETTE = ["#3b82f6", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#64748b", "#ec4899", "#14b8a6", "#a3a3a3"]
RED, GREY, GREEN = "#dc2626", "#94a3b8", "#16a34a"
FONT = 'font-family="system-ui,-apple-system,Segoe UI,sans-serif"'


def esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def _open(name: str, title: str, w: int, h: int) -> str:
    return (f'<svg class="chart" data-chart="{esc(name)}" role="img" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
            f'xmlns="http://www.w3.org/2000/svg" {FONT} font-size="11"><title>{esc(title)}</title>')


def _empty(name: str, title: str, msg: str = "no data") -> str:
    return _open(name, title, 420, 60) + f'<text x="10" y="35" fill="#64748b">{esc(msg)}</text></svg>'


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}"
    return f"{v:.2f}".rstrip("0").rstrip(".")


def stacked_hbars(name: str, title: str, rows: Sequence[tuple[str, Sequence[tuple[str, float]]]], width: int = 760) -> str:
    """Rows of stacked horizontal segments (label, [(segment label, value)]), each row scaled to its own total."""
    rows = [(lab, [(s, v) for s, v in segs if v > 0]) for lab, segs in rows]
    rows = [r for r in rows if r[1]]
    if not rows:
        return _empty(name, title)
    left, bar_h, gap = 150, 26, 30
    h = 20 + len(rows) * (bar_h + gap)
    out = [_open(name, title, width, h)]
    colors: dict[str, str] = {}
    for i, (lab, segs) in enumerate(rows):
        y = 12 + i * (bar_h + gap)
        total = sum(v for _, v in segs)
        out.append(f'<text x="{left - 8}" y="{y + bar_h / 2 + 4}" text-anchor="end" fill="#0f172a">{esc(lab)} ({_fmt(total)})</text>')
        x = float(left)
        span = width - left - 10
        for seg, v in segs:
            col = colors.setdefault(seg, PALETTE[len(colors) % len(PALETTE)])
            w = span * v / total
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{max(w, 0.5):.1f}" height="{bar_h}" fill="{col}"><title>{esc(seg)}: {_fmt(v)}</title></rect>')
            if w > 60:
                out.append(f'<text x="{x + 4:.1f}" y="{y + bar_h / 2 + 4}" fill="white">{esc(seg)} {_fmt(v)}</text>')
            elif w > 4:
                out.append(f'<text x="{x + 1:.1f}" y="{y + bar_h + 11}" fill="#334155" font-size="9">{esc(seg)} {_fmt(v)}</text>')
            x += w
    out.append("</svg>")
    return "".join(out)


def vbars(name: str, title: str, labels: Sequence[str], series: dict[str, Sequence[float]], *, stacked: bool = True,
          y_label: str = "", width: int = 760, height: int = 240, ref: float | None = None, label_every: int = 0) -> str:
    """Vertical (stacked or grouped) bars; ``series`` maps legend name -> one value per label."""
    if not labels or not series:
        return _empty(name, title)
    left, bottom, top = 48, 56, 24
    plot_w, plot_h = width - left - 10, height - bottom - top
    totals = [sum(s[i] for s in series.values()) if stacked else max(s[i] for s in series.values()) for i in range(len(labels))]
    vmax = max(max(totals), ref or 0, 1e-9)
    out = [_open(name, title, width, height)]
    for t in range(5):
        v = vmax * t / 4
        y = top + plot_h - plot_h * t / 4
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e2e8f0"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" fill="#475569">{_fmt(v)}</text>')
    slot = plot_w / len(labels)
    bw = slot * 0.7 / (1 if stacked else len(series))
    for i, lab in enumerate(labels):
        x0 = left + i * slot + slot * 0.15
        base = 0.0
        for j, (sname, vals) in enumerate(series.items()):
            v = vals[i]
            hgt = plot_h * v / vmax
            x = x0 if stacked else x0 + j * bw
            y = top + plot_h - (plot_h * base / vmax) - hgt if stacked else top + plot_h - hgt
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{max(hgt, 0):.1f}" fill="{PALETTE[j % len(PALETTE)]}">'
                       f'<title>{esc(lab)} / {esc(sname)}: {_fmt(v)}</title></rect>')
            if stacked:
                base += v
        every = label_every or max(1, int(len(labels) * 70 / plot_w) + (1 if len(labels) * 70 > plot_w else 0))
        if i % every == 0:
            out.append(f'<text x="{left + i * slot + slot / 2:.1f}" y="{top + plot_h + 14}" text-anchor="middle" fill="#334155" '
                       f'font-size="10">{esc(lab[:18])}</text>')
    if ref is not None:
        y = top + plot_h - plot_h * ref / vmax
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="{RED}" stroke-dasharray="4 3"/>')
    _legend(out, list(series), left, height - 18)
    if y_label:
        out.append(f'<text x="12" y="{top - 8}" fill="#475569">{esc(y_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _legend(out: list[str], names: Sequence[str], x: float, y: float, colors: Sequence[str] | None = None) -> None:
    for j, n in enumerate(names):
        col = (colors or PALETTE)[j % len(colors or PALETTE)]
        out.append(f'<rect x="{x:.0f}" y="{y - 9:.0f}" width="10" height="10" fill="{col}"/>'
                   f'<text x="{x + 14:.0f}" y="{y:.0f}" fill="#334155">{esc(n)}</text>')
        x += 24 + 7 * len(str(n))


def dot_ci(name: str, title: str, items: Sequence[tuple[str, float, float, float, bool]], *, ref: float = 0.5,
           x_label: str = "", width: int = 760) -> str:
    """One row per item: (label, value, ci_lo, ci_hi, highlighted) on a 0..1 axis with a reference line."""
    if not items:
        return _empty(name, title)
    left, row_h, top = 170, 20, 26
    height = top + row_h * len(items) + 34
    plot_w = width - left - 20
    out = [_open(name, title, width, height)]

    def X(v: float) -> float:
        return left + plot_w * min(max(v, 0.0), 1.0)

    for t in range(11):
        x = X(t / 10)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 6}" y2="{height - 30}" stroke="#f1f5f9"/>'
                   f'<text x="{x:.1f}" y="{height - 16}" text-anchor="middle" fill="#475569">{t / 10:g}</text>')
    out.append(f'<line x1="{X(ref):.1f}" x2="{X(ref):.1f}" y1="{top - 10}" y2="{height - 30}" stroke="{GREY}" stroke-dasharray="4 3"/>')
    for i, (lab, v, lo, hi, hot) in enumerate(items):
        y = top + i * row_h + row_h / 2
        col = RED if hot else PALETTE[0]
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end" fill="{col if hot else "#0f172a"}">{esc(lab)}</text>'
                   f'<line x1="{X(lo):.1f}" x2="{X(hi):.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{col}" stroke-width="2"/>'
                   f'<circle cx="{X(v):.1f}" cy="{y:.1f}" r="4" fill="{col}"><title>{esc(lab)}: {v:.3f} [{lo:.3f}, {hi:.3f}]</title></circle>')
    if x_label:
        out.append(f'<text x="{left}" y="{top - 12}" fill="#475569">{esc(x_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def scatter(name: str, title: str, points: Sequence[tuple[str, float, float, bool]], *, x_label: str, y_label: str,
            width: int = 520, height: int = 340) -> str:
    """Points (label, x, y, highlighted) on [0,1] x [0,1]."""
    if not points:
        return _empty(name, title, "no annotator has both measures")
    left, bottom, top, right = 50, 40, 20, 20
    pw, ph = width - left - right, height - top - bottom
    out = [_open(name, title, width, height)]
    for t in range(6):
        v = t / 5
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph - ph * v:.1f}" y2="{top + ph - ph * v:.1f}" stroke="#f1f5f9"/>'
                   f'<text x="{left - 6}" y="{top + ph - ph * v + 4:.1f}" text-anchor="end" fill="#475569">{v:g}</text>'
                   f'<text x="{left + pw * v:.1f}" y="{top + ph + 14}" text-anchor="middle" fill="#475569">{v:g}</text>')
    for lab, x, y, hot in points:
        cx, cy = left + pw * min(max(x, 0), 1), top + ph - ph * min(max(y, 0), 1)
        col = RED if hot else PALETTE[0]
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{col}" fill-opacity="0.8"><title>{esc(lab)}: {x:.2f}, {y:.2f}</title></circle>')
        if hot:
            out.append(f'<text x="{cx + 7:.1f}" y="{cy + 4:.1f}" fill="{RED}">{esc(lab)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" fill="#334155">{esc(x_label)}</text>'
               f'<text x="12" y="{top + ph / 2}" fill="#334155" transform="rotate(-90 12 {top + ph / 2})" text-anchor="middle">{esc(y_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def heatmap(name: str, title: str, rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float]],
            *, width: int = 760) -> str:
    """A count matrix with shaded cells and numbers (e.g. locale x detected language)."""
    if not rows or not cols:
        return _empty(name, title)
    left, top, cell_h = 110, 40, 26
    cell_w = min(90, (width - left - 10) / len(cols))
    height = top + cell_h * len(rows) + 10
    vmax = max((v for r in values for v in r), default=1) or 1
    out = [_open(name, title, int(left + cell_w * len(cols) + 10), height)]
    for j, c in enumerate(cols):
        out.append(f'<text x="{left + j * cell_w + cell_w / 2:.1f}" y="{top - 8}" text-anchor="middle" fill="#334155">{esc(c)}</text>')
    for i, r in enumerate(rows):
        y = top + i * cell_h
        out.append(f'<text x="{left - 8}" y="{y + cell_h / 2 + 4}" text-anchor="end" fill="#334155">{esc(r)}</text>')
        for j, _c in enumerate(cols):
            v = values[i][j]
            a = 0.08 + 0.85 * math.sqrt(v / vmax) if v else 0.0
            out.append(f'<rect x="{left + j * cell_w:.1f}" y="{y}" width="{cell_w - 2:.1f}" height="{cell_h - 2}" '
                       f'fill="{PALETTE[0]}" fill-opacity="{a:.2f}" stroke="#e2e8f0"><title>{esc(r)} / {esc(cols[j])}: {_fmt(v)}</title></rect>'
                       f'<text x="{left + j * cell_w + cell_w / 2:.1f}" y="{y + cell_h / 2 + 4}" text-anchor="middle" '
                       f'fill="{"white" if a > 0.5 else "#0f172a"}">{_fmt(v) if v else ""}</text>')
    out.append("</svg>")
    return "".join(out)


def wilson(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion k/n."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)
