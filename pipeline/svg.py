"""Tiny inline-SVG chart primitives for the self-contained HTML report (no JS, no network).

Each function returns an ``<svg>`` string with a ``<title>`` (accessible name) and a
``data-chart`` attribute; every data mark (bar, dot, cell) carries its own ``<title>`` with
the exact value, so hovering answers "how many".  The browser test counts rendered charts by
``data-chart`` and checks that their text neither overlaps nor leaves the drawing.

There is no layout engine here, so text widths are estimated (``text_width``) generously
for the DejaVu/Segoe-like sans fonts of the font stack; labels that would not fit are
shortened with an ellipsis, thinned out, or moved into a legend line under the bar.
"""
from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence

from pipeline.escape import html_escape, visible_controls

PALETTE = ["#3b82f6", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#64748b", "#ec4899", "#14b8a6", "#a3a3a3"]
RED, GREY, GREEN = "#dc2626", "#94a3b8", "#16a34a"
INK, MUTED = "#0f172a", "#475569"
# CJK fallbacks: prompts and slice names may be Chinese/Japanese; without such a font they show as boxes.
FONT_STACK = ("system-ui,-apple-system,'Segoe UI','DejaVu Sans','Noto Sans','Noto Sans CJK SC','Noto Sans CJK JP',"
              "'PingFang SC','Hiragino Sans','Microsoft YaHei',sans-serif")
FONT = f'font-family="{FONT_STACK}"'
WIDTH = 1000  # the report's card is ~1020 CSS px wide; charts scale down (max-width:100%) on narrow screens


esc = html_escape  # every label, title and attribute value below goes through it (user text included)


def text_width(s: str, size: float = 11) -> float:
    """Estimated rendered width in px: wide East Asian characters 1 em, combining marks none, others 0.64 em (a
    generous sans average)."""
    return size * sum(1.0 if unicodedata.east_asian_width(c) in "WF" else 0.0 if unicodedata.combining(c) else 0.64
                      for c in visible_controls(str(s)))


def fit(s: str, width: float, size: float = 11) -> str:
    """``s`` shortened with an ellipsis so that it fits in ``width`` px (may return ""); control characters
    are measured and cut as the escapes ``esc`` will show."""
    s = visible_controls(str(s))
    if text_width(s, size) <= width:
        return s
    while s and text_width(s + "…", size) > width:
        s = s[:-1]
    return s + "…" if s else ""


def nice_ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> list[float]:
    """Round tick values (steps 1, 2, 2.5, 5 x 10^k) covering [lo, hi] with about ``n`` ticks."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, round(step))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]


def _open(name: str, title: str, w: float, h: float) -> str:
    w, h = math.ceil(w), math.ceil(h)
    return (f'<svg class="chart" data-chart="{esc(name)}" role="img" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
            f'xmlns="http://www.w3.org/2000/svg" {FONT} font-size="11"><title>{esc(title)}</title>')


def _empty(name: str, title: str, msg: str = "no data") -> str:
    return _open(name, title, 420, 60) + f'<text x="10" y="35" fill="#64748b">{esc(msg)}</text></svg>'


def finite(v: float | None) -> bool:
    """A value that can be drawn (None, NaN and infinities are "no value": no mark, "n/a" in its title)."""
    return v is not None and math.isfinite(v)


def _fmt(v: float | None) -> str:
    """A tick, bar or cell value; a non-zero value never rounds to "0" (a share of 0.004 is "0.004")."""
    if not finite(v):
        return "n/a"
    if v == 0:
        return "0"
    if abs(v) < 0.01:
        return f"{v:.2g}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}"
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _legend(names: Sequence[str], colors: Sequence[str], x0: float, y: float, max_x: float, size: float = 11) -> tuple[list[str], float]:
    """Swatch + name items flowing left to right, wrapping at ``max_x``; returns (svg parts, y of the last line)."""
    out, x = [], x0
    for n, col in zip(names, colors, strict=True):
        w = 14 + text_width(n, size)
        if x > x0 and x + w > max_x:
            x, y = x0, y + size + 5
        out.append(f'<rect x="{x:.0f}" y="{y - 9:.0f}" width="10" height="10" fill="{col}"/>'
                   f'<text x="{x + 14:.0f}" y="{y:.0f}" fill="#334155" font-size="{size:g}">{esc(n)}</text>')
        x += w + 14
    return out, y


def _share(v: float, total: float, digits: int = 0) -> str:
    """``v`` as a percentage of ``total``; rounding never shows a part as 0 % or 100 % of the whole ("<1%", ">99%")."""
    step = 10.0 ** -(digits + 2)
    if 0 < v < step * total:
        return f"<{step:.{digits}%}"
    if v < total and v > (1 - step) * total:
        return f">{1 - step:.{digits}%}"
    return f"{v / total:.{digits}%}"


def stacked_hbars(name: str, title: str, rows: Sequence[tuple[str, Sequence[tuple[str, float]]]], width: int = WIDTH,
                  colors: dict[str, str] | None = None) -> str:
    """Rows of stacked horizontal segments (label, [(segment label, value)]), each row scaled to its own total.

    A segment is labelled inside the bar only when its text fits; every row also gets a legend
    line underneath with each segment's count and share, so thin segments stay readable.
    ``colors`` fixes a segment's colour (e.g. kept green, routed amber, dropped red); others cycle the palette.
    """
    rows = [(lab, [(s, v) for s, v in segs if finite(v) and v > 0]) for lab, segs in rows]
    rows = [r for r in rows if r[1]]
    if not rows:
        return _empty(name, title)
    heads = [f"{lab} ({_fmt(sum(v for _, v in segs))})" for lab, segs in rows]
    left = min(max(text_width(h) for h in heads) + 16, width * 0.3)
    span, bar_h = width - left - 10, 24
    colors = dict(colors or {})
    body, y = [], 8.0
    for head, (_lab, segs) in zip(heads, rows, strict=True):
        total = sum(v for _, v in segs)
        body.append(f'<text x="{left - 8:.0f}" y="{y + bar_h / 2 + 4:.0f}" text-anchor="end" fill="{INK}">{esc(fit(head, left - 12))}</text>')
        x = left
        for seg, v in segs:
            col = colors.setdefault(seg, PALETTE[len(colors) % len(PALETTE)])
            w = span * v / total
            body.append(f'<rect x="{x:.1f}" y="{y:.0f}" width="{max(w, 1):.1f}" height="{bar_h}" fill="{col}" stroke="white" stroke-width="0.5">'
                        f'<title>{esc(seg)}: {_fmt(v)} ({_share(v, total, 1)})</title></rect>')
            inside = next((t for t in (f"{seg} {_fmt(v)}", _fmt(v)) if text_width(t) + 8 <= w), None)
            if inside:
                body.append(f'<text x="{x + 4:.1f}" y="{y + bar_h / 2 + 4:.0f}" fill="white">{esc(inside)}</text>')
            x += w
        names = [f"{seg} {_fmt(v)} ({_share(v, total)})" for seg, v in segs]
        leg, y_last = _legend(names, [colors[s] for s, _ in segs], left, y + bar_h + 15, width - 10, size=10)
        body += leg
        y = y_last + 16
    return _open(name, title, width, y) + "".join(body) + "</svg>"


def _x_labels(labels: Sequence[str], left: float, slot: float, y: float) -> tuple[list[str], int]:
    """Category labels under the slots (``\\n`` = second line), thinned and shortened to fit; returns (parts, lines)."""
    lines = [str(lab).split("\n") for lab in labels]
    widest = max(text_width(t, 10) for ls in lines for t in ls)
    every = 1 if widest <= slot - 6 else max(1, math.ceil(min(widest, 90) / max(slot - 6, 1)))
    out = []
    for i, ls in enumerate(lines):
        if i % every:
            continue
        cx = left + i * slot + slot / 2
        for k, t in enumerate(ls):
            out.append(f'<text x="{cx:.1f}" y="{y + 12 * k:.0f}" text-anchor="middle" fill="#334155" font-size="10">'
                       f'{esc(fit(t, every * slot - 6, 10))}</text>')
    return out, max(len(ls) for ls in lines)


def vbars(name: str, title: str, labels: Sequence[str], series: dict[str, Sequence[float]], *, stacked: bool = True,
          y_label: str = "", x_label: str = "", width: int = WIDTH, height: int = 260, y_range: tuple[float, float] | None = None,
          integer: bool = False, values: bool = False, errors: dict[str, Sequence[tuple[float, float] | None]] | None = None,
          x_ticks: Sequence[tuple[float, str]] | None = None, x_ref: float | None = None, ref: float | None = None,
          value_fmt: str = "{:.2f}", label_every: int = 0) -> str:
    """Vertical (stacked or grouped) bars; ``series`` maps legend name -> one value per label.

    ``y_range`` fixes the axis (e.g. -0.2..1 for agreement; negative bars hang from the zero line),
    ``errors`` adds (lo, hi) whiskers per bar (grouped bars), ``values`` prints values (``value_fmt``) on the bars,
    ``x_ticks`` [(position in slots, text)] replaces the per-bar labels (histogram edges), ``x_ref``
    draws a vertical dashed line at a slot position and ``ref`` a horizontal one at a value.
    ``label_every`` is accepted for compatibility; labels are thinned automatically.
    """
    if not labels or not series:
        return _empty(name, title)
    n = len(labels)
    # a value that is None, NaN or infinite draws no bar (its title says n/a); a CI with such a bound no whisker
    drawn = {k: [v if finite(v) else 0.0 for v in vals] for k, vals in series.items()}
    errors = {k: [ci if ci and all(finite(b) for b in ci) else None for ci in e] for k, e in (errors or {}).items()}
    totals = [sum(s[i] for s in drawn.values()) if stacked else max(s[i] for s in drawn.values()) for i in range(n)]
    lows = [0.0 if stacked else min(s[i] for s in drawn.values()) for i in range(n)]
    tops = [*totals, *(ci[1] for e in errors.values() for ci in e if ci)]
    lows += [ci[0] for e in errors.values() for ci in e if ci]  # (a whisker below the bars stays on the axis)
    lo = min(0.0, *lows) if y_range is None else min(y_range[0], *lows)
    hi = max(*tops, ref or 0) if y_range is None else max(y_range[1], *tops)
    hi = hi if hi > lo else lo + 1  # all zero: a unit axis rather than a degenerate one
    ticks = nice_ticks(lo, hi, 5, integer=integer)
    lo, hi = ticks[0], ticks[-1]
    left = max(36, max(text_width(_fmt(t)) for t in ticks) + 12)
    top = 30
    label_lines = 0 if x_ticks is not None else max(len(str(lab).split("\n")) for lab in labels)
    legend_h = 18 if len(series) > 1 else 0
    bottom = 18 + 12 * max(label_lines, 1) + (16 if x_label else 0) + legend_h
    plot_w, plot_h = width - left - 10, height - bottom - top
    slot = plot_w / n

    def Y(v: float) -> float:
        return top + plot_h * (hi - v) / (hi - lo)

    out = [_open(name, title, width, height)]
    for t in ticks:
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="{"#94a3b8" if t == 0 else "#e2e8f0"}"/>'
                   f'<text x="{left - 5}" y="{Y(t) + 4:.1f}" text-anchor="end" fill="{MUTED}">{_fmt(t)}</text>')
    bw = slot * 0.7 / (1 if stacked else len(series))
    for i, lab in enumerate(labels):
        x0 = left + i * slot + slot * 0.15
        base = 0.0
        for j, (sname, vals) in enumerate(series.items()):
            given, v = vals[i], drawn[sname][i]
            if not finite(given):
                continue
            a, b = (base, base + v) if stacked else (0.0, v)
            x = x0 if stacked else x0 + j * bw
            y1, y2 = sorted((Y(a), Y(b)))
            tip = str(lab).replace("\n", " ")
            out.append(f'<rect x="{x:.1f}" y="{y1:.1f}" width="{bw:.1f}" height="{max(y2 - y1, 0.5):.1f}" fill="{PALETTE[j % len(PALETTE)]}">'
                       f'<title>{esc(tip)} / {esc(sname)}: {_fmt(v)}</title></rect>')
            ci = errors.get(sname, [None] * n)[i]
            if ci:
                cx = x + bw / 2
                out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{Y(ci[0]):.1f}" y2="{Y(ci[1]):.1f}" stroke="{INK}" stroke-width="1.2"/>'
                           f'<line x1="{cx - 3:.1f}" x2="{cx + 3:.1f}" y1="{Y(ci[1]):.1f}" y2="{Y(ci[1]):.1f}" stroke="{INK}"/>'
                           f'<line x1="{cx - 3:.1f}" x2="{cx + 3:.1f}" y1="{Y(ci[0]):.1f}" y2="{Y(ci[0]):.1f}" stroke="{INK}"/>')
            if values and not stacked and text_width(value_fmt.format(v), 9) <= bw - 2:
                ty = (Y(ci[1]) if ci else Y(v)) - 3 if v >= 0 else (Y(ci[0]) if ci else Y(v)) + 11
                out.append(f'<text x="{x + bw / 2:.1f}" y="{ty:.1f}" text-anchor="middle" fill="#334155" font-size="9">{value_fmt.format(v)}</text>')
            if stacked:
                base += v
    axis_y = top + plot_h + 14
    if x_ticks is None:
        parts, _ = _x_labels(labels, left, slot, axis_y)
        out += parts
    else:
        for pos, text in x_ticks:
            x = left + pos * slot
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="{MUTED}"/>'
                       f'<text x="{x:.1f}" y="{axis_y:.0f}" text-anchor="middle" fill="#334155" font-size="10">{esc(text)}</text>')
    if x_ref is not None:
        x = left + x_ref * slot
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{top + plot_h}" stroke="{RED}" stroke-dasharray="4 3"/>')
    if ref is not None:
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{Y(ref):.1f}" y2="{Y(ref):.1f}" stroke="{RED}" stroke-dasharray="4 3"/>')
    y = axis_y + 12 * max(label_lines, 1) + 2
    if x_label:
        out.append(f'<text x="{left + plot_w / 2:.0f}" y="{y + 2:.0f}" text-anchor="middle" fill="#334155">{esc(x_label)}</text>')
        y += 16
    if len(series) > 1:
        leg, _ = _legend(list(series), [PALETTE[j % len(PALETTE)] for j in range(len(series))], left, y + 4, width - 10)
        out += leg
    if y_label:
        out.append(f'<text x="6" y="12" fill="{MUTED}">{esc(y_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def hbars(name: str, title: str, items: Sequence[tuple[str, float, str]], *, x_label: str = "", width: int = WIDTH,
          integer: bool = True) -> str:
    """One horizontal bar per item (label, value, note printed after the bar), longest label shortened to fit."""
    if not items:
        return _empty(name, title)
    left = min(max(text_width(lab) for lab, _, _ in items) + 16, width * 0.45)
    note_w = max(text_width(f"{_fmt(v)} {note}".strip()) for _, v, note in items) + 12
    row_h, top = 22, 8
    ticks = nice_ticks(0, max((v for _, v, _ in items if finite(v)), default=0.0), 5, integer=integer)
    plot_w = width - left - 10 - note_w
    plot_bottom = top + row_h * len(items)
    height = plot_bottom + 22 + (16 if x_label else 0)

    def X(v: float) -> float:
        return left + plot_w * v / ticks[-1]

    out = [_open(name, title, width, height)]
    for t in ticks:
        out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top}" y2="{plot_bottom}" stroke="#e2e8f0"/>'
                   f'<text x="{X(t):.1f}" y="{plot_bottom + 14}" text-anchor="middle" fill="{MUTED}">{_fmt(t)}</text>')
    for i, (lab, v, note) in enumerate(items):
        y = top + i * row_h
        if not finite(v):  # no bar: the label and "n/a"
            out.append(f'<text x="{left - 8:.0f}" y="{y + row_h / 2 + 4:.0f}" text-anchor="end" fill="{INK}">{esc(fit(lab, left - 12))}</text>'
                       f'<text x="{left + 6:.1f}" y="{y + row_h / 2 + 4:.0f}" fill="{MUTED}">{esc(f"n/a {note}".strip())}</text>')
            continue
        out.append(f'<text x="{left - 8:.0f}" y="{y + row_h / 2 + 4:.0f}" text-anchor="end" fill="{INK}">{esc(fit(lab, left - 12))}</text>'
                   f'<rect x="{left:.1f}" y="{y + 3}" width="{max(X(v) - left, 1):.1f}" height="{row_h - 6}" fill="{PALETTE[0]}">'
                   f'<title>{esc(lab)}: {_fmt(v)} {esc(note)}</title></rect>'
                   f'<text x="{X(v) + 6:.1f}" y="{y + row_h / 2 + 4:.0f}" fill="#334155">{esc(f"{_fmt(v)} {note}".strip())}</text>')
    if x_label:
        out.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 4}" text-anchor="middle" fill="#334155">{esc(x_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def dot_ci(name: str, title: str, items: Sequence[tuple[str, float, float, float, bool]], *, ref: float = 0.5,
           x_label: str = "", width: int = WIDTH) -> str:
    """One row per item: (label, value, ci_lo, ci_hi, highlighted) on a 0..1 axis with a reference line."""
    items = [it for it in items if finite(it[1])]  # (a rate that is not a number has no place on the axis)
    items = [(lab, v, lo if finite(lo) else v, hi if finite(hi) else v, hot) for lab, v, lo, hi, hot in items]
    if not items:
        return _empty(name, title)
    left = min(max(text_width(lab) for lab, *_ in items) + 16, width * 0.4)
    row_h, top = 20, 26
    height = top + row_h * len(items) + 34
    plot_w = width - left - 20
    out = [_open(name, title, width, height)]

    def X(v: float) -> float:
        return left + plot_w * min(max(v, 0.0), 1.0)

    for t in range(11):
        x = X(t / 10)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 6}" y2="{height - 30}" stroke="#f1f5f9"/>'
                   f'<text x="{x:.1f}" y="{height - 16}" text-anchor="middle" fill="{MUTED}">{t / 10:g}</text>')
    out.append(f'<line x1="{X(ref):.1f}" x2="{X(ref):.1f}" y1="{top - 10}" y2="{height - 30}" stroke="{GREY}" stroke-dasharray="4 3"/>')
    for i, (lab, v, lo, hi, hot) in enumerate(items):
        y = top + i * row_h + row_h / 2
        col = RED if hot else PALETTE[0]
        out.append(f'<text x="{left - 8:.0f}" y="{y + 4:.1f}" text-anchor="end" fill="{col if hot else INK}">{esc(fit(lab, left - 12))}</text>'
                   f'<line x1="{X(lo):.1f}" x2="{X(hi):.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{col}" stroke-width="2"/>'
                   f'<circle cx="{X(v):.1f}" cy="{y:.1f}" r="4" fill="{col}"><title>{esc(lab)}: {v:.3f} [{lo:.3f}, {hi:.3f}]</title></circle>')
    if x_label:
        out.append(f'<text x="{left}" y="{top - 12}" fill="{MUTED}">{esc(x_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def scatter(name: str, title: str, points: Sequence[tuple[str, float, float, bool]], *, x_label: str, y_label: str,
            width: int = 560, height: int = 360) -> str:
    """Points (label, x, y, highlighted) on [0,1] x [0,1]; highlighted points are labelled."""
    points = [p for p in points if finite(p[1]) and finite(p[2])]
    if not points:
        return _empty(name, title, "no annotator has both measures")
    left, bottom, top, right = 50, 40, 20, 20
    pw, ph = width - left - right, height - top - bottom
    out = [_open(name, title, width, height)]
    for t in range(6):
        v = t / 5
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph - ph * v:.1f}" y2="{top + ph - ph * v:.1f}" stroke="#f1f5f9"/>'
                   f'<text x="{left - 6}" y="{top + ph - ph * v + 4:.1f}" text-anchor="end" fill="{MUTED}">{v:g}</text>'
                   f'<text x="{left + pw * v:.1f}" y="{top + ph + 14}" text-anchor="middle" fill="{MUTED}">{v:g}</text>')
    for lab, x, y, hot in sorted(points, key=lambda p: p[3]):  # highlighted last, on top
        cx, cy = left + pw * min(max(x, 0), 1), top + ph - ph * min(max(y, 0), 1)
        col = RED if hot else PALETTE[0]
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{col}" fill-opacity="0.8"><title>{esc(lab)}: {x:.2f}, {y:.2f}</title></circle>')
        if hot:
            w = text_width(lab)
            tx, anchor = (cx + 8, "start") if cx + 8 + w < width - 4 else (cx - 8, "end")
            out.append(f'<text x="{tx:.1f}" y="{cy + 4:.1f}" text-anchor="{anchor}" fill="{RED}">{esc(lab)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" fill="#334155">{esc(x_label)}</text>'
               f'<text x="12" y="{top + ph / 2}" fill="#334155" transform="rotate(-90 12 {top + ph / 2})" text-anchor="middle">{esc(y_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def heatmap(name: str, title: str, rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float]],
            *, width: int = WIDTH, row_title: str = "", col_title: str = "") -> str:
    """A count matrix with shaded cells and numbers (e.g. locale x detected language)."""
    if not rows or not cols:
        return _empty(name, title)
    left = max(max(text_width(r) for r in rows) + 16, text_width(row_title) + 16, 60)
    top, cell_h = 24 + (18 if col_title else 0), 26
    cell_w = min(90, (width - left - 10) / len(cols))
    height = top + cell_h * len(rows) + 10
    values = [[v if finite(v) else 0.0 for v in r] for r in values]  # (counts: a cell that is not a number is empty)
    vmax = max((v for r in values for v in r), default=1) or 1
    out = [_open(name, title, left + cell_w * len(cols) + 10, height)]
    if col_title:
        out.append(f'<text x="{left + cell_w * len(cols) / 2:.1f}" y="14" text-anchor="middle" fill="{MUTED}">{esc(col_title)} →</text>')
    if row_title:
        out.append(f'<text x="{left - 8:.0f}" y="{top - 8}" text-anchor="end" fill="{MUTED}">{esc(row_title)} ↓</text>')
    for j, c in enumerate(cols):
        out.append(f'<text x="{left + j * cell_w + cell_w / 2:.1f}" y="{top - 8}" text-anchor="middle" fill="#334155">'
                   f'{esc(fit(c, cell_w - 4))}</text>')
    for i, r in enumerate(rows):
        y = top + i * cell_h
        out.append(f'<text x="{left - 8:.0f}" y="{y + cell_h / 2 + 4}" text-anchor="end" fill="#334155">{esc(r)}</text>')
        for j, _c in enumerate(cols):
            v = values[i][j]
            a = 0.08 + 0.85 * math.sqrt(v / vmax) if v else 0.0
            out.append(f'<rect x="{left + j * cell_w:.1f}" y="{y}" width="{cell_w - 2:.1f}" height="{cell_h - 2}" '
                       f'fill="{PALETTE[0]}" fill-opacity="{a:.2f}" stroke="#e2e8f0"><title>{esc(r)} / {esc(cols[j])}: {_fmt(v)}</title></rect>'
                       f'<text x="{left + j * cell_w + cell_w / 2:.1f}" y="{y + cell_h / 2 + 4}" text-anchor="middle" '
                       f'fill="{"white" if a > 0.5 else INK}">{_fmt(v) if v else ""}</text>')
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
