"""The human report of a version: ``report.html`` (self-contained, inline SVG, no JS/network)
and ``report.md`` (the same numbers, for terminals and Prefect artifacts).

Read top to bottom in two minutes: verdicts and the ledger first, then the plots, then the
worst offenders with example pairs.  Rendered at curate time from the staged files plus the
in-memory check results (for tables that are not persisted, e.g. the length-ratio histogram).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import svg
from pipeline.escape import md_escape, visible_controls
from schemas.check import CheckResult
from schemas.manifest import Manifest

STATUS_COLOR = {"pass": "#16a34a", "warn": "#d97706", "fail": "#dc2626"}
LABEL_ORDER = ("a", "b", "tie", "both_bad", "escalate")
MAX_EXAMPLES = 8
MIN_SLICE_PAIRS = 10


@dataclass
class ReportInputs:
    manifest: Manifest
    judgments: pl.DataFrame
    pairs: pl.DataFrame  # every pair: pair_id, decision, reason, near_dup_cluster (first-seen order unless pair_order)
    pair_rows: Callable[[pl.Series], pl.DataFrame]  # pair ids -> their rows with texts, counts and flag_reasons
    flags: pl.DataFrame
    annotators: pl.DataFrame
    routed: pl.DataFrame
    quarantine: pl.DataFrame
    results: dict[str, CheckResult] = field(default_factory=dict)
    pair_prompts: pl.DataFrame | None = None  # pair_id -> prompt_hash, one row a pair (else from ``judgments``)
    # the pairs' ids in first-seen order when ``pairs`` is in another (or: a few ids -> pair_id, ``_seen``, a rank)
    pair_order: pl.Series | Callable[[pl.Series], pl.DataFrame] | None = None
    label_counts: pl.DataFrame | None = None  # :func:`label_counts` of ``judgments`` (a child's: summed, not counted)
    graph_clusters: pl.DataFrame | None = None  # near_dup_cluster: the only clusters that can hold several prompts
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # what both renderings compute once


def _check(inp: ReportInputs, name: str) -> dict[str, Any]:
    return inp.manifest.check(name).model_dump()


def _short(text: str | None, n: int = 140) -> str:
    if text is None:
        return ""
    t = " ".join(str(text).split())
    return t if len(t) <= n else t[: n - 1] + "…"


def _id(value: str, n: int = 14) -> str:
    """An id cut to ``n`` characters for a table cell, marked when cut (two long pair ids that share their
    first 14 characters must not read as one complete id)."""
    return value if len(value) <= n else value[: n - 1] + "…"


def _votes(r: dict[str, Any]) -> str:
    """A pair's votes by label: a, b and tie always, both_bad and escalate when some judgment gave them (so
    that the votes shown add up to the pair's judgments)."""
    counts = [(lab, r.get(f"count_{lab}") or 0) for lab in LABEL_ORDER]
    return " · ".join(f"{lab}\u00a0{n}" for lab, n in counts if n or lab in ("a", "b", "tie"))


def _quantiles(q: dict[str, float] | None) -> str:
    return ", ".join(f"p{float(k) * 100:g}={v:.2f}" for k, v in (q or {}).items()) or "–"


def _num(v: Any, digits: int = 3) -> str:
    """A figure for a table or a sentence.  Rounding never turns a non-zero value into 0 (a position
    p-value of 2e-19 is "<0.001", not "0.000") nor a value just under 1 into a perfect 1 (">0.999");
    NaN is shown as missing."""
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        step = 10.0 ** -digits
        if 0 < abs(v) < step / 2:
            return f"<{step:.{digits}f}" if v > 0 else f">-{step:.{digits}f}"
        if 1 - step / 2 <= v < 1:
            return f">{1 - step:.{digits}f}"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _value(v: Any) -> float:
    """A figure to draw: a missing one (None: undefined, e.g. kappa over one label) is NaN -- no bar, not a bar at 0."""
    return math.nan if v is None else float(v)


# ---------------------------------------------------------------- sections as data (shared by html + md)
def ingest_rows(m: Manifest) -> list[tuple[str, int]]:
    """The ledger's stages between rows in and valid judgments: quarantined rows by reason, and when an
    adapter turned a valid row into several judgments (``rated``: one per pair of candidates) the valid
    rows, the judgments made of them and the candidate pairs not formed (``ingest.skipped``), so that
    rows in -> judgments reads without a jump."""
    ing = m.ingest
    rows = [(f"quarantined: {k}", v) for k, v in sorted(ing.quarantined_by_reason.items())]
    if ing.judgments != ing.rows_valid or ing.skipped:
        rows += [("rows valid", ing.rows_valid), ("judgments made from valid rows", ing.judgments)]
        rows += [(f"candidate pairs not formed: {k}", v) for k, v in sorted(ing.skipped.items())]
    return rows


def ledger_rows(m: Manifest) -> list[tuple[str, int]]:
    """Every stage of the ledger with its count, rows in to DPO rows."""
    led = m.ledger
    rows = [("rows in", led.rows_in), ("quarantined", led.quarantined), *ingest_rows(m), ("judgments valid", led.judgments_valid)]
    rows += [(f"judgments dropped: {k}", v) for k, v in sorted(led.judgments_dropped.items())]
    rows += [("pairs", led.pairs)]
    rows += [(f"routed: {k}", v) for k, v in led.routed.items()]
    rows += [(f"dropped: {k}", v) for k, v in sorted(led.dropped.items())]
    rows += [("DPO rows (kept pairs)", led.pairs_kept)] + [(f"  {k}", v) for k, v in led.splits.items()]
    return rows


def ledger_sums(m: Manifest) -> list[str]:
    """The ledger's identities with their figures ("pairs 324 = kept 251 + routed 45 + dropped 28"):
    the reader sees that nothing was lost; one that does not hold is shown with "≠"."""
    led, ing = m.ledger, m.ingest

    def eq(name: str, total: int, parts: list[tuple[str, int]]) -> str:
        rhs = " + ".join(f"{k} {v:,}" for k, v in parts)
        return f"{name} {total:,} {'=' if total == sum(v for _, v in parts) else '≠'} {rhs}"

    dropped_j = sum(led.judgments_dropped.values())
    out = [eq("rows in", led.rows_in, [("valid", ing.rows_valid), ("quarantined", led.quarantined)])]
    if ing.judgments != ing.rows_valid or ing.skipped:
        skipped = ", ".join(f"{v:,} {k}" for k, v in sorted(ing.skipped.items()))
        out.append(f"valid rows {ing.rows_valid:,} → judgments {ing.judgments:,} (an adapter makes one judgment per pair "
                   f"of candidates{f'; candidate pairs not formed: {skipped}' if skipped else ''})")
    out.append(eq("judgments valid", led.judgments_valid, [("used", led.judgments_valid - dropped_j), ("dropped", dropped_j)]))
    out.append(eq("pairs", led.pairs, [("kept", led.pairs_kept), ("routed", sum(led.routed.values())),
                                       ("dropped", sum(led.dropped.values()))]))
    if led.splits:
        out.append(eq("kept", led.pairs_kept, list(led.splits.items())))
    return out


def review_funnel(m: Manifest) -> list[tuple[str, int, str]]:
    """The review funnel of ``ledger.reviews``: routed -> exported -> reviewed -> resolved (+ still open)."""
    r = m.ledger.reviews
    if r is None:
        return []
    return [("routed (this lineage)", r.routed_ever, ""), ("exported for review", r.exported, ""),
            ("reviewed (≥ 1 review)", r.reviewed, f"{r.judgments_of_routed:,} review judgments"),
            ("resolved", r.resolved, f"{r.resolved_by_reviews:,} by the reviews' majority"),
            ("still open", r.open, f"{r.kept_routed_by_review_tie:,} kept routed by a tie between reviews")]


LEDGER_COLORS = {"valid": "#16a34a", "used": "#16a34a", "kept: train": "#16a34a", "kept: validation": "#4ade80",
                 "kept: test": "#86efac", "quarantined": "#dc2626", "routed: tie": "#f59e0b", "routed: both_bad": "#d97706",
                 "routed: escalate": "#fbbf24"}
DROP_COLORS = ["#dc2626", "#f87171", "#991b1b", "#fb7185", "#b91c1c", "#fca5a5"]


def flow_chart(m: Manifest) -> str:
    """Where rows went: green = on to training, amber = routed to people, red = dropped (same colour = same fate)."""
    led = m.ledger
    drops = sorted({*led.judgments_dropped, *led.dropped})
    colors = {**LEDGER_COLORS, **{f"dropped: {k}": DROP_COLORS[i % len(DROP_COLORS)] for i, k in enumerate(drops)}}
    return svg.stacked_hbars("ledger-flow", "Ledger: where every row went", colors=colors, rows=[
        ("rows in", [("valid", led.rows_in - led.quarantined), ("quarantined", led.quarantined)]),
        ("judgments", [("used", led.judgments_valid - sum(led.judgments_dropped.values()))]
         + [(f"dropped: {k}", v) for k, v in led.judgments_dropped.items()]),
        ("pairs", [(f"kept: {k}", v) for k, v in led.splits.items()]
         + [(f"routed: {k}", v) for k, v in led.routed.items()] + [(f"dropped: {k}", v) for k, v in led.dropped.items()]),
    ])


LABEL_COUNTS = "label_counts"  # the version's table of :func:`label_counts`
_SLICE = ["locale", "annotator_kind", "label"]


def label_counts(judgments: pl.DataFrame, base: pl.DataFrame | None = None) -> pl.DataFrame:
    """Judgments by (locale, annotator_kind, label), column ``n``, sorted: what the label
    distribution shows.  ``base``: counts to add to (a child's batch is counted, its parent's
    judgments are the parent's table)."""
    counts = judgments.group_by(_SLICE).agg(n=pl.len().cast(pl.Int64))
    if base is not None:
        counts = pl.concat([base.select(*_SLICE, "n"), counts], how="vertical_relaxed").group_by(_SLICE).agg(pl.col("n").sum())
    return counts.sort(_SLICE, nulls_last=False)


def label_distribution(inp: ReportInputs) -> tuple[list[str], dict[str, list[float]], list[int]]:
    """(slices, share of each label per slice, judgments per slice)."""
    counts = inp.label_counts if inp.label_counts is not None else label_counts(inp.judgments)
    if counts.height == 0:
        return [], {}, []
    # counted by the three columns, then named: a slice string built for each of 3M rows cost more than the count
    counts = counts.select(
        "label", len="n", slice=pl.concat_str([pl.col("locale").fill_null("?"), pl.col("annotator_kind")], separator=" · "))
    counts = counts.group_by("slice", "label").agg(pl.col("len").sum())
    slices = sorted(counts["slice"].unique().to_list())
    series = {lab: [float(counts.filter((pl.col("slice") == s) & (pl.col("label") == lab))["len"].sum()) for s in slices]
              for lab in LABEL_ORDER}
    totals = [sum(series[lab][i] for lab in LABEL_ORDER) for i in range(len(slices))]
    shares = {lab: [v / (t or 1) for v, t in zip(vals, totals, strict=True)] for lab, vals in series.items()}
    return slices, shares, [int(t) for t in totals]


PRE_CHECK_DROPS = ("duplicate_comparison_id", "already_in_parent")  # judgments dropped before the version's table


def label_base(m: Manifest, total: int) -> str:
    """What the label shares are shares of: the version's judgments, those dropped by select included."""
    pre = {k: m.ledger.judgments_dropped[k] for k in PRE_CHECK_DROPS if m.ledger.judgments_dropped.get(k)}
    out = (f"Base: each slice's judgments, {total:,} in all: every judgment of the version, including those dropped "
           f"after the checks (the ledger's {m.ledger.judgments_valid:,} valid judgments")
    return out + (f" also count {', '.join(f'{v:,} {k}' for k, v in pre.items())}, dropped before)." if pre else ").")


def position_items(ann: pl.DataFrame) -> list[tuple[str, float, float, float, bool]]:
    if ann.height == 0 or "first_shown_rate" not in ann.columns:
        return []
    rows = ann.filter(pl.col("first_shown_rate").is_not_null()).sort("first_shown_rate", descending=True)
    items = []
    for r in rows.iter_rows(named=True):
        n = r.get("position_n") or r.get("n_decisive") or 0
        lo, hi = svg.wilson(r["first_shown_rate"] * n, n)
        hot = "position_bias" in (r.get("flags") or [])
        items.append((f"{r['annotator_id']} (n={n})", r["first_shown_rate"], lo, hi, hot))
    return items


def agreement_rows(inp: ReportInputs) -> list[tuple[str, str, Any, Any, Any]]:
    met = _check(inp, "agreement").get("metrics", {})
    rows = []
    for kind in ("human", "ai", "all"):
        k = met.get(kind) or {}
        if k.get("n_pairs"):
            rows.append(("all", kind, k.get("n_pairs"), k.get("krippendorff_alpha"), k.get("fleiss_kappa")))
    kind_order = {"human": 0, "ai": 1, "all": 2}
    for s, kinds in sorted((met.get("slices") or {}).items()):
        for kind, k in sorted(kinds.items(), key=lambda kv: (kind_order.get(kv[0], 3), kv[0])):
            rows.append((s, kind, k.get("n_pairs"), k.get("krippendorff_alpha"), k.get("fleiss_kappa")))
    return rows


def agreement_cis(inp: ReportInputs, kind: str) -> tuple[Any, Any]:
    """95 % CIs (krippendorff_alpha_ci, fleiss_kappa_ci) of the overall figures of one annotator kind."""
    k = _check(inp, "agreement").get("metrics", {}).get(kind) or {}
    return k.get("krippendorff_alpha_ci"), k.get("fleiss_kappa_ci")


def length_ratio_ticks(hist: pl.DataFrame) -> tuple[list[str], list[tuple[float, str]], float | None]:
    """Bin labels (the outer bins hold everything beyond them), axis ticks at whole powers of two, position of ratio 1."""
    edges = [float(e) for e in hist["log2_ratio_lo"]] + [float(hist["log2_ratio_hi"][-1])]
    n = len(edges) - 1
    labels = [f"{2 ** lo:.2g}–{2 ** hi:.2g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    labels[0], labels[-1] = f"< {2 ** edges[1]:.2g}", f"≥ {2 ** edges[-2]:.2g}"

    def name(e: float) -> str:
        return f"{2 ** e:g}×" if e >= 0 else f"1/{2 ** -e:g}"

    ticks = [(0.5, labels[0])] + [(float(i), name(e)) for i, e in enumerate(edges) if float(e).is_integer() and 1 < i < n - 1]
    ticks.append((n - 0.5, labels[-1]))  # the open-ended outer bins are labelled under their bars
    one = next((float(i) for i, e in enumerate(edges) if e == 0), None)
    return labels, ticks, one


def language_matrix(inp: ReportInputs) -> tuple[list[str], list[str], list[list[float]]]:
    met = _check(inp, "language").get("metrics", {})
    mat = met.get("matrix") or met.get("locale_x_detected") or {}
    if isinstance(mat, list):  # list of {locale, detected, count}
        tmp: dict[str, dict[str, float]] = {}
        for r in mat:
            tmp.setdefault(str(r.get("locale")), {})[str(r.get("detected"))] = float(r.get("count", r.get("n", 0)))
        mat = tmp
    rows = sorted(mat)
    cols = sorted({c for r in mat.values() for c in r})
    return rows, cols, [[float(mat[r].get(c, 0)) for c in cols] for r in rows]


def dimension_rows(inp: ReportInputs) -> list[list[Any]]:
    """Per dimension: pairs, consensus a / b / tie / other, alpha (all) with its CI, kappa (all),
    human alpha, first-shown rate, chosen-longer rate (the ``dimensions`` check's metrics)."""
    met = _check(inp, "dimensions").get("metrics", {})
    rows = []
    for name, d in sorted((met.get("per_dimension") or {}).items()):
        ag, cons = d.get("agreement", {}), d.get("consensus", {})
        al = ag.get("all", {})
        ci = al.get("krippendorff_alpha_ci")
        other = sum(v for k, v in cons.items() if k not in ("a", "b", "tie"))
        rows.append([name, d.get("pairs"), cons.get("a", 0), cons.get("b", 0), cons.get("tie", 0), other,
                     al.get("krippendorff_alpha"), f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else "–", al.get("fleiss_kappa"),
                     ag.get("human", {}).get("krippendorff_alpha"), d.get("position_bias", {}).get("first_shown_win_rate"),
                     d.get("length_bias", {}).get("chosen_longer_rate_judgments")])
    return rows


DIMENSION_HEADERS = ["dimension", "pairs", "a", "b", "tie", "other", "Krippendorff α", "α 95% CI", "Fleiss κ",
                     "α human", "first-shown rate", "longer chosen"]


def conflict_matrix(inp: ReportInputs) -> tuple[list[str], list[list[float]]]:
    """(dimension names, counts): pairs whose consensus names opposite sides on the two dimensions."""
    mat = _check(inp, "dimensions").get("metrics", {}).get("conflict_matrix") or {}
    names = sorted(mat)
    return names, [[float(mat[r].get(c, 0)) for c in names] for r in names]


def near_dup_clusters(inp: ReportInputs) -> pl.DataFrame:
    """Clusters with more than one distinct prompt (by the pairs' ``prompt_hash``), largest
    first, and for the first :data:`MAX_EXAMPLES` of them their prompts (first-seen order; the
    others' lists are empty): texts are looked up for the pairs of those clusters only."""
    if "near_dup_clusters" in inp.cache:
        return inp.cache["near_dup_clusters"]
    p = inp.pairs
    if "near_dup_cluster" not in p.columns or p.height == 0:
        return pl.DataFrame()
    c = pl.col
    # candidates: the clusters of the near-duplicate graph when known (any other holds one prompt: a
    # filter by a set of ~1 % of the clusters), else the clusters of several pairs
    many = c("near_dup_cluster").is_in(inp.graph_clusters["near_dup_cluster"].implode()) if inp.graph_clusters is not None \
        else c("near_dup_cluster").is_duplicated()
    p = p.filter(many).select("pair_id", "near_dup_cluster")
    ph = inp.pair_prompts.join(p.select("pair_id"), on="pair_id", how="semi") if inp.pair_prompts is not None else \
        inp.judgments.select("pair_id", "prompt_hash").join(p.select("pair_id"), on="pair_id", how="semi") \
        .unique("pair_id", keep="first")
    cl = (p.join(ph, on="pair_id", how="left").group_by("near_dup_cluster")
          .agg(pairs=pl.len(), n_prompts=c("prompt_hash").n_unique()).filter(c("n_prompts") > 1)
          .sort(["n_prompts", "pairs", "near_dup_cluster"], descending=[True, True, False]))
    if cl.height == 0:
        inp.cache["near_dup_clusters"] = pl.DataFrame()
        return inp.cache["near_dup_clusters"]
    # one pair per distinct prompt of a shown cluster (the first): the same prompts in the same order,
    # and only the parts that hold those few pairs are read (a big cluster's pairs span many parts)
    shown = p.join(cl.head(MAX_EXAMPLES).select("near_dup_cluster"), on="near_dup_cluster", how="semi")
    if inp.pair_order is not None:  # those few pairs in first-seen order
        seen = inp.pair_order(shown["pair_id"]) if callable(inp.pair_order) else \
            inp.pair_order.to_frame("pair_id").with_row_index("_seen").filter(pl.col("pair_id").is_in(shown["pair_id"].implode()))
        shown = shown.join(seen, on="pair_id", how="left").sort("_seen", nulls_last=True, maintain_order=True).drop("_seen")
    shown = shown.join(ph, on="pair_id", how="left", maintain_order="left") \
        .unique(["near_dup_cluster", "prompt_hash"], keep="first", maintain_order=True)
    shown = shown.join(inp.pair_rows(shown["pair_id"]).select("pair_id", "prompt_text"), on="pair_id", how="left",
                       maintain_order="left")
    prompts = shown.group_by("near_dup_cluster").agg(prompts=c("prompt_text").unique(maintain_order=True))
    out = cl.join(prompts, on="near_dup_cluster", how="left", maintain_order="left").with_columns(
        prompts=c("prompts").fill_null(pl.lit([], dtype=pl.List(pl.String)))).select("near_dup_cluster", "pairs", "prompts", "n_prompts")
    inp.cache["near_dup_clusters"] = out
    return out


OFFENDER_REASONS = ("low_agreement", "language_mismatch", "identical_responses", "near_duplicate")  # examples shown


def _first_flagged(inp: ReportInputs, reason: str) -> pl.DataFrame:
    """The first :data:`MAX_EXAMPLES` flag rows for ``reason`` (one a pair, in flag order) whose
    pair the version has: candidates are checked against every pair by a set of the few (not a
    join of every pair), more of them while too few are found."""
    c = pl.col
    flagged = inp.flags.filter((c("subject_kind") == "pair") & (c("reason") == reason)).unique("subject_id", maintain_order=True)
    k = 4 * MAX_EXAMPLES
    while True:
        cand = flagged.head(k)
        have = inp.pairs.filter(c("pair_id").is_in(cand["subject_id"].implode()))["pair_id"]
        found = cand.filter(c("subject_id").is_in(have.implode()))
        if found.height >= MAX_EXAMPLES or k >= flagged.height:
            return found.head(MAX_EXAMPLES)
        k *= 4


def offender_pairs(inp: ReportInputs, reason: str) -> pl.DataFrame:
    """The first :data:`MAX_EXAMPLES` pairs flagged for ``reason`` that the version has, with their
    rows (both renderings ask: computed once, with those of every reason of
    :data:`OFFENDER_REASONS` -- one lookup of texts for all: a lookup reads the parts that hold
    its pairs)."""
    key = f"offenders:{reason}"
    if key in inp.cache:
        return inp.cache[key]
    firsts = {r: _first_flagged(inp, r) for r in dict.fromkeys((reason, *OFFENDER_REASONS))}
    wanted = pl.concat([f["subject_id"] for f in firsts.values()]).unique(maintain_order=True)
    rows = None
    if wanted.len():  # look up the examples only (a join of every flagged pair would copy their texts)
        fate = inp.pairs.filter(pl.col("pair_id").is_in(wanted.implode())).select("pair_id", "decision", "reason")
        rows = inp.pair_rows(wanted).drop("decision", "reason", strict=False).join(fate, on="pair_id", how="left")
    for r, ids in firsts.items():
        inp.cache[f"offenders:{r}"] = ids.join(rows, left_on="subject_id", right_on="pair_id", how="inner",
                                               maintain_order="left") if ids.height and rows is not None else pl.DataFrame()
    return inp.cache[key]


# ---------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","DejaVu Sans","Noto Sans","Noto Sans CJK SC","Noto Sans CJK JP","PingFang SC","Hiragino Sans","Microsoft YaHei",sans-serif;margin:0;color:#0f172a;background:#f8fafc}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
.meta{color:#475569;font-size:13px} .card{background:white;border:1px solid #e2e8f0;border-radius:8px;padding:14px;margin:10px 0;overflow-x:auto}
table{border-collapse:collapse;font-size:13px;width:100%} th,td{border-bottom:1px solid #e2e8f0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f5f9} td.n,th.n{text-align:right;font-variant-numeric:tabular-nums} td.id{white-space:nowrap;font-family:ui-monospace,monospace;font-size:12px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:white;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:8px}
.verdict{border-left:4px solid;padding:6px 10px;background:white;border-radius:4px;font-size:13px}
.small{font-size:12px;color:#475569} .card>.small{margin-top:6px} svg.chart{max-width:100%;height:auto;display:block}
"""


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None, ids: set[int] | None = None) -> str:
    """Headers are shown with spaces for underscores so long column names can wrap; ``ids`` columns never wrap."""
    numeric, ids = numeric or set(), ids or set()

    def cls(i: int) -> str:
        return " class=n" if i in numeric else " class=id" if i in ids else ""

    th = "".join(f"<th{' class=n' if i in numeric else ''}>{svg.esc(h.replace('_', ' '))}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{svg.esc(_num(v) if not isinstance(v, str) else v)}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(inp: ReportInputs) -> str:
    m = inp.manifest
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>prefpipe report {svg.esc(m.version_id)}</title>"
             f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style></head><body><main>"]
    parts.append(f"<h1>prefpipe report · {svg.esc(m.version_id)}</h1><div class=meta>created {m.created_at:%Y-%m-%d %H:%M} UTC · "
                 f"parent {svg.esc(m.parent_version or '–')} · code {svg.esc(m.code_version)} · policy {svg.esc(m.policy_hash)} · "
                 f"{len(m.sources)} source file(s)</div>")
    # verdicts
    parts.append("<h2>Check verdicts</h2><div class=grid>")
    for c in (c.model_dump() for c in m.checks):
        col = STATUS_COLOR.get(c["status"], "#64748b")
        flags = ", ".join(f"{k}: {v}" for k, v in (c.get("flag_counts") or {}).items()) or "no flags"
        parts.append(f"<div class=verdict style='border-color:{col}'><b>{svg.esc(c['name'])}</b> "
                     f"<span class=badge style='background:{col}'>{svg.esc(c['status'])}</span><div class=small>{svg.esc(flags)}</div>"
                     f"<div class=small>{svg.esc(_short(c.get('summary'), 160))}</div></div>")
    parts.append("</div>")
    # ledger
    parts.append("<h2>Ledger: from rows in to DPO rows</h2><div class=card>" + flow_chart(m))
    parts.append(_table(["stage", "count"], [[a, b] for a, b in ledger_rows(m)], {1})
                 + "".join(f"<div class=small>{svg.esc(line)}</div>" for line in ledger_sums(m)) + "</div>")
    funnel = review_funnel(m)
    if funnel:
        r = m.ledger.reviews
        parts.append("<h2>Reviews: routed → exported → reviewed → resolved</h2><div class=card>"
                     + svg.hbars("review-funnel", "Routed pairs and their reviews",  # ("45 pairs · 59 review judgments", not "45 59 ...")
                                 [(stage, n, f"pairs · {note}" if note else "pairs") for stage, n, note in funnel], x_label="pairs")
                     + f"<div class=small>mode {svg.esc(r.mode)}; {r.judgments:,} judgments with review_of in this version "
                     f"({r.judgments - r.judgments_of_routed:,} of pairs never routed or unknown: see the reviews check). "
                     "Open pairs are listed by <code>prefpipe show</code> with their age.</div></div>")
    # plots
    slices, series, n_slice = label_distribution(inp)
    parts.append("<h2>Label distribution per slice</h2><div class=card>"
                 + svg.vbars("label-distribution", "Share of judgment labels per slice (locale · annotator kind)",
                             [f"{visible_controls(s)}\n{n:,} judgments" for s, n in zip(slices, n_slice, strict=True)], series,
                             y_label="share of judgments", y_range=(0, 1))
                 + f"<div class=small>{svg.esc(label_base(m, sum(n_slice)))}</div></div>")
    pos = position_items(inp.annotators)
    pm = _check(inp, "position_bias").get("metrics", {})
    parts.append("<h2>Position bias: first-shown win rate per annotator (95% CI)</h2><div class=card>"
                 + svg.dot_ci("position-bias", "First-shown win rate per annotator", pos, x_label="share of decisive judgments won by the first-shown response")
                 + f"<div class=small>batch first-shown win rate {svg.esc(_num(pm.get('first_shown_win_rate')))}; display order randomised: "
                 f"{svg.esc(pm.get('randomised'))} (share of a shown first {svg.esc(_num(pm.get('shown_first_a_share')))}); "
                 f"shown_first missing for {svg.esc(_num(pm.get('missing_shown_first_share')))} of judgments. Red = flagged after Benjamini–Hochberg.</div></div>")
    hist = inp.results.get("length_bias").tables.get("length_ratio_hist") if inp.results.get("length_bias") else None
    lm = _check(inp, "length_bias").get("metrics", {})
    if hist is not None and hist.height:
        labels, ticks, one = length_ratio_ticks(hist)
        chart = svg.vbars("length-ratio", "Chosen/rejected length ratio of consensus pairs", labels,
                          {"pairs": [float(v) for v in hist["pairs"]]}, y_label="consensus pairs", integer=True, x_ticks=ticks, x_ref=one,
                          x_label="length of chosen / length of rejected (log scale; red line = equal length)")
    else:
        chart = svg.vbars("length-ratio", "Chosen/rejected length ratio", [], {})
    parts.append("<h2>Length: chosen / rejected length ratio</h2><div class=card>" + chart
                 + f"<div class=small>chosen is longer in {svg.esc(_num(lm.get('chosen_longer_rate_pairs')))} of consensus pairs with a length difference;"
                 f" ratio quantiles {svg.esc(_quantiles(lm.get('chosen_rejected_ratio_quantiles')))}</div></div>")
    # the overall figures always (the agreement verdict is theirs), the slices with enough pairs to say something
    ag = [r for r in agreement_rows(inp) if r[0] == "all" or (r[2] or 0) >= MIN_SLICE_PAIRS]
    main_ag = [r for r in ag if r[0] == "all" or r[0].startswith("locale=")]
    cis = [agreement_cis(inp, k) if s == "all" else (None, None) for s, k, *_ in main_ag]
    parts.append("<h2>Agreement per slice</h2><div class=card>"
                 + svg.vbars("agreement", "Krippendorff's alpha and Fleiss' kappa, overall and per locale",
                             [f"{'overall' if s == 'all' else visible_controls(s.removeprefix('locale='))}\n{visible_controls(k)}\n{n} pairs"
                              for s, k, n, *_ in main_ag],
                             {"Krippendorff α": [_value(a) for _, _, _, a, _ in main_ag], "Fleiss κ": [_value(k) for *_, k in main_ag]},
                             stacked=False, y_label="agreement (1 = perfect, 0 = chance)", y_range=(0, 1), values=True, height=300,
                             errors={"Krippendorff α": [c[0] for c in cis], "Fleiss κ": [c[1] for c in cis]})
                 + "<div class=small>Whiskers: 95% bootstrap CIs of the overall figures (per-slice figures are point estimates).</div>"
                 + f"<div class=small>Overall, and every slice with at least {MIN_SLICE_PAIRS} pairs (locale, tag, annotator kind):</div>"
                 + _table(["slice", "kind", "pairs", "Krippendorff α", "Fleiss κ"], [list(r) for r in ag], {2, 3, 4}) + "</div>")
    ann = inp.annotators
    pts = []
    if ann.height and {"agreement_with_consensus", "gold_accuracy"} <= set(ann.columns):
        for r in ann.filter(pl.col("agreement_with_consensus").is_not_null() & pl.col("gold_accuracy").is_not_null()).iter_rows(named=True):
            pts.append((r["annotator_id"], r["agreement_with_consensus"], r["gold_accuracy"], bool(r.get("flags"))))
    parts.append("<h2>Annotator reliability: agreement with consensus vs gold accuracy</h2><div class=card>"
                 + svg.scatter("reliability", "Annotator agreement with leave-one-out consensus vs gold accuracy", pts,
                               x_label="agreement with consensus", y_label="gold accuracy")
                 + "<div class=small>One dot per annotator with gold items (hover for the id); red = flagged by a check. "
                 "Reliable annotators sit top right.</div></div>")
    cl = near_dup_clusters(inp)
    top_cl = list(cl.head(MAX_EXAMPLES).iter_rows(named=True)) if cl.height else []
    cl_rows = [[_id(r["near_dup_cluster"]), r["n_prompts"], r["pairs"], " ⟷ ".join(_short(t, 70) for t in r["prompts"][:3])] for r in top_cl]
    nm = _check(inp, "near_duplicates").get("metrics", {})
    parts.append("<h2>Near-duplicate prompt clusters</h2><div class=card>"
                 + svg.hbars("near-duplicates", "Largest near-duplicate clusters: pairs per cluster",
                             [(_short(min(r["prompts"], key=len), 80), float(r["pairs"]), f"pairs · {r['n_prompts']} prompts") for r in top_cl],
                             x_label="pairs in the cluster (labelled by its shortest prompt)")
                 + f"<div class=small>{svg.esc(_num(nm.get('near_duplicate_pairs')))} of {svg.esc(_num(nm.get('pairs')))} pairs have a near-duplicate prompt; "
                 f"{_num(cl.height)} cluster(s) with more than one distinct prompt "
                 f"(clusters are kept within one split; split_leakage check: {svg.esc(_check(inp, 'split_leakage')['status'])}).</div>"
                 + (_table(["cluster", "prompts", "pairs", "examples"], cl_rows, {1, 2}, ids={0}) if cl_rows else "<p class=small>no near-duplicate clusters</p>")
                 + "</div>")
    rows_l, cols_l, vals = language_matrix(inp)
    parts.append("<h2>Language: locale vs detected</h2><div class=card>"
                 + svg.heatmap("language", "Texts by declared locale (rows) and detected language (columns)", rows_l, cols_l, vals,
                               row_title="declared locale", col_title="detected language")
                 + "<div class=small>und = language not determined (short text, mostly code, or no confident decision).</div></div>")
    dim_rows = dimension_rows(inp)
    if dim_rows:
        names, counts = conflict_matrix(inp)
        dm = _check(inp, "dimensions").get("metrics", {})
        parts.append("<h2>Per-dimension verdicts</h2><div class=card>"
                     + _table(DIMENSION_HEADERS, dim_rows, set(range(1, len(DIMENSION_HEADERS))) - {7})
                     + "<div class=small>Consensus per (pair, dimension) as for the overall label; agreement, position and "
                     "length bias run on each dimension's verdicts as on the overall labels (α, κ over a / b / tie).</div>"
                     + svg.heatmap("dimension-conflicts", "Pairs whose consensus names opposite sides on two dimensions",
                                   names, names, counts, row_title="dimension", col_title="dimension")
                     + f"<div class=small>{svg.esc(_num(dm.get('conflict_pairs')))} of {svg.esc(_num(dm.get('pairs_with_dimensions')))} "
                     "pairs with dimensions are in conflict (reason dimension_conflict); the policy's dimension rule decides their "
                     f"label. Labels derived from dimensions: {svg.esc(_num(dm.get('labels_derived')))}.</div></div>")
    # offenders
    parts.append("<h2>Worst offenders</h2>")
    flagged = ann.filter(pl.col("flags").list.len() > 0) if ann.height else ann
    if flagged.height:
        cols = [c for c in ("annotator_id", "annotator_kind", "n_judgments", "agreement_with_consensus", "gold_accuracy",
                            "first_shown_rate", "position_p_value", "longer_chosen_rate", "order_consistency") if c in flagged.columns]
        rows = [[*(r[c] for c in cols), ", ".join(r["flags"])] for r in flagged.select(*cols, "flags").iter_rows(named=True)]
        parts.append("<div class=card><b>Flagged annotators</b>" + _table(cols + ["flags"], rows, set(range(2, len(cols))), ids={0}) + "</div>")
    for reason in OFFENDER_REASONS:
        ex = offender_pairs(inp, reason)
        if ex.height:
            rows = [[_id(r["subject_id"]), _short(r["prompt_text"], 90), _short(r["response_a"], 80), _short(r["response_b"], 80),
                     _votes(r), r["decision"], _short(r["detail"], 60)]
                    for r in ex.iter_rows(named=True)]
            n = inp.flags.filter(pl.col("reason") == reason)["subject_id"].n_unique()
            parts.append(f"<div class=card><b>{reason}</b> ({n} pair{'s' if n != 1 else ''}; examples)"
                         + _table(["pair", "prompt", "response a", "response b", "votes", "decision", "detail"], rows, ids={0}) + "</div>")
    if inp.quarantine.height:
        rows = [[Path(r["source_file"]).name, r["line"], r["reason"], _short(r["error"], 160)] for r in inp.quarantine.head(MAX_EXAMPLES).iter_rows(named=True)]
        parts.append("<div class=card><b>Quarantine</b> (first rows)" + _table(["file", "line", "reason", "error"], rows, {1}, ids={0}) + "</div>")
    parts.append("<p class=small>Generated by prefpipe. Splits, flags, annotators, routed items and quarantine are in the version directory as Parquet.</p>")
    parts.append("</main></body></html>")
    return "".join(parts)


# ---------------------------------------------------------------- Markdown
def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GFM table; every header and cell goes through ``md_escape`` (a ``|`` or line break in a value stays in its cell)."""
    out = ["| " + " | ".join(md_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(md_escape(_num(v) if not isinstance(v, str) else v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(inp: ReportInputs) -> str:
    m = inp.manifest
    md = [f"# prefpipe report: {md_escape(m.version_id)}", "",
          f"created {m.created_at:%Y-%m-%d %H:%M} UTC · parent {md_escape(m.parent_version or '-')} · code {md_escape(m.code_version)}"
          f" · policy {md_escape(m.policy_hash)}", "",
          "## Check verdicts", "",
          md_table(["check", "status", "flags", "summary"], [[c["name"], c["status"], ", ".join(f"{k}={v}" for k, v in (c.get("flag_counts") or {}).items()),
                                                               _short(c.get("summary"), 120)] for c in (c.model_dump() for c in m.checks)]),
          "", "## Ledger", "", md_table(["stage", "count"], [[a, b] for a, b in ledger_rows(m)]), "",
          *[f"- {md_escape(line)}" for line in ledger_sums(m)], ""]
    funnel = review_funnel(m)
    if funnel:
        md += ["## Reviews: routed → exported → reviewed → resolved", "",
               md_table(["stage", "pairs", "note"], [list(f) for f in funnel]), "",
               f"mode {md_escape(m.ledger.reviews.mode)}; {m.ledger.reviews.judgments:,} judgments with review_of.", ""]
    ag = agreement_rows(inp)
    if ag:
        md += ["## Agreement", "", md_table(["slice", "kind", "pairs", "Krippendorff α", "Fleiss κ"], [list(r) for r in ag]), ""]
    pos = position_items(inp.annotators)
    if pos:
        md += ["## Position bias (first-shown win rate, 95% CI)", "",
               md_table(["annotator", "rate", "CI low", "CI high", "flagged"], [[a, v, lo, hi, "yes" if hot else ""] for a, v, lo, hi, hot in pos]), ""]
    ann = inp.annotators
    if ann.height:
        cols = [c for c in ("annotator_id", "annotator_kind", "n_judgments", "agreement_with_consensus", "gold_accuracy",
                            "first_shown_rate", "order_consistency", "longer_chosen_rate", "status") if c in ann.columns]
        md += ["## Annotators", "", md_table(cols + ["flags"], [[*(r[c] for c in cols), ",".join(r["flags"])] for r in ann.iter_rows(named=True)]), ""]
    dim_rows = dimension_rows(inp)
    if dim_rows:
        names, counts = conflict_matrix(inp)
        dm = _check(inp, "dimensions").get("metrics", {})
        md += ["## Per-dimension verdicts", "", md_table(DIMENSION_HEADERS, dim_rows), "",
               f"Conflict matrix: pairs whose consensus names opposite sides on two dimensions "
               f"({md_escape(_num(dm.get('conflict_pairs')))} of {md_escape(_num(dm.get('pairs_with_dimensions')))} pairs "
               "with dimensions are in conflict).", "",
               md_table(["dimension"] + names, [[r, *[int(v) for v in vr]] for r, vr in zip(names, counts, strict=True)]), ""]
    rows_l, cols_l, vals = language_matrix(inp)
    if rows_l:
        md += ["## Language (locale × detected)", "", md_table(["locale"] + cols_l, [[r, *[int(v) for v in vr]] for r, vr in zip(rows_l, vals, strict=True)]), ""]
    cl = near_dup_clusters(inp)
    if cl.height:
        md += ["## Near-duplicate clusters", "", md_table(["cluster", "prompts", "pairs", "examples"],
               [[_id(r["near_dup_cluster"]), r["n_prompts"], r["pairs"], " ⟷ ".join(_short(t, 60) for t in r["prompts"][:3])]
                for r in cl.head(MAX_EXAMPLES).iter_rows(named=True)]), ""]
    for reason in ("low_agreement", "language_mismatch", "identical_responses"):
        ex = offender_pairs(inp, reason)
        if ex.height:
            md += [f"## Examples: {md_escape(reason)}", "", md_table(["pair", "prompt", "a", "b", "decision"],
                   [[_id(r["subject_id"]), _short(r["prompt_text"], 70), _short(r["response_a"], 50), _short(r["response_b"], 50), r["decision"]]
                    for r in ex.iter_rows(named=True)]), ""]
    return "\n".join(md)


def write_report(inp: ReportInputs, directory: Path) -> list[Path]:
    html_path, md_path = directory / "report.html", directory / "report.md"
    html_path.write_text(render_html(inp), encoding="utf-8")
    md_path.write_text(render_markdown(inp), encoding="utf-8")
    return [html_path, md_path]
