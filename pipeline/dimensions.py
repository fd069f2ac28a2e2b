"""Per-dimension verdicts: parsing, the policy's dimension rule, per-dimension consensus.

A judgment may give a verdict per rubric dimension (``dimensions``: name -> ``a`` / ``b`` /
``tie`` / ``both_bad``, or -> ``{label, strength, critique}``; ``../shared/spec/raw-comparisons.md``).
Ingest validates them into ``Judgment.dimensions`` (a list of {name, label, strength,
critique} sorted by name, ``a``/``b`` as the judgment wrote them) with :func:`parse_dimensions`.

Method
------
* **Dimension rule** (:func:`rule_expr`, policy ``[dimensions]``): ``priority`` -- the first
  listed dimension with a decisive verdict (a / b) decides; none decisive -> ``both_bad`` if
  one of them says so, else ``tie``; none of them given -> no label.  ``primary`` + ``veto``
  -- the primary's verdict, unless a veto dimension names the other side decisively: then
  ``veto_action``.  The same expression derives a judgment's missing ``label`` (ingest) and
  decides a pair whose per-dimension consensus verdicts conflict (:func:`apply_rule`).
* **Consensus per dimension** (:func:`consensus`): the judgments' verdicts are exploded
  into one row per (judgment, dimension) and aggregated *once* by
  :func:`pipeline.aggregate.aggregate` with the pair key ``pair_id + \\x1f + dimension`` and
  the annotator key ``annotator_id + \\x1f + dimension``: plurality + Dawid-Skene for humans,
  order-aware DS for AI judges, one vote per annotator, exactly as for the overall label,
  each annotator's accuracy estimated per dimension.  The aggregation orients each (pair,
  dimension) by its own first verdict; results are turned to the pair's canonical orientation
  (the overall aggregation's) by swapping a/b where those differ.  A re-delivered copy of a
  judgment (``rated``: :func:`pipeline.checks.agreement.ratings`, the overall consensus's votes)
  gives no verdict here either: its rows are left out before the per-dimension rows are made, so
  a copy neither adds a judgment nor outweighs its annotator's other verdicts on the pair.
* **Training on a dimension** (:func:`for_training`, ``train_on``): ``label`` and ``strength``
  become the dimension's verdict; judgments without one do not vote (dropped as
  ``no_verdict_on_<dimension>``); ``gold_label`` (a known *overall* answer) is cleared.

Rows without dimensions cost nothing here: every entry point returns at once when the
``dimensions`` column is all null.
"""
from __future__ import annotations

import re
import weakref
from typing import Any

import polars as pl

from schemas.policy import AggregationConfig, DimensionsConfig
from schemas.records import DIMENSION_LABELS, DIMENSION_NAME_MAX, DIMENSION_NAME_RE

__all__ = ["DIM_STRUCT", "SEP", "apply_rule", "conflicts", "consensus", "dimension_frame", "dimension_label",
           "for_training", "has_dimensions", "long_frame", "names", "parse_dimensions", "rule_expr", "voting"]

SEP = "\x1f"  # joins pair/annotator ids with a dimension name (names never contain it)
DIM_STRUCT = pl.Struct({"name": pl.String, "label": pl.String, "strength": pl.Float64, "critique": pl.String})
_NAME = re.compile(DIMENSION_NAME_RE)
_OBJECT_KEYS = ("label", "strength", "critique")
EXPECTED = ("an object of dimension name ([a-z][a-z0-9_]*) -> verdict: one of 'a', 'b', 'tie', 'both_bad', "
            "or {label, strength, critique}")


def _found(value: Any) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- parsing (one row; both ingest paths)
def parse_dimensions(value: Any) -> tuple[list[dict[str, Any]] | None, tuple[str, str, str] | None]:
    """A raw ``dimensions`` value -> (verdicts sorted by name, or None when there are none;
    error ``(field, reason, message)`` or None).  A null verdict is no verdict; ``{}`` is none."""
    if value is None:
        return None, None
    if not isinstance(value, dict):
        return None, ("dimensions", "invalid_type", f"field 'dimensions': expected {EXPECTED}, found {_found(value)}")
    out: list[dict[str, Any]] = []
    for name, v in value.items():
        if not isinstance(name, str) or len(name) > DIMENSION_NAME_MAX or not _NAME.fullmatch(name):
            return None, ("dimensions", "invalid_value",
                          f"field 'dimensions': dimension name {_found(name)}: expected [a-z][a-z0-9_]* "
                          f"(at most {DIMENSION_NAME_MAX} characters)")
        where = f"dimensions.{name}"
        if v is None:
            continue
        if isinstance(v, str):
            if v not in DIMENSION_LABELS:
                return None, (where, "invalid_value", f"field {where!r}: expected one of {list(DIMENSION_LABELS)} "
                              f"or an object {{label, strength, critique}}, found {_found(v)}")
            out.append({"name": name, "label": v, "strength": None, "critique": None})
            continue
        if not isinstance(v, dict):
            return None, (where, "invalid_type", f"field {where!r}: expected one of {list(DIMENSION_LABELS)} "
                          f"or an object {{label, strength, critique}}, found {_found(v)}")
        unknown = [k for k in v if k not in _OBJECT_KEYS]
        if unknown:
            return None, (where, "invalid_value", f"field {where!r}: unknown key(s) {_found(unknown)}; "
                          "expected label, strength, critique")
        label, strength, critique = v.get("label"), v.get("strength"), v.get("critique")
        if label is None:
            return None, (f"{where}.label", "missing_field", f"field '{where}.label': required, expected one of "
                          f"{list(DIMENSION_LABELS)}, found nothing")
        if label not in DIMENSION_LABELS:
            return None, (f"{where}.label", "invalid_value", f"field '{where}.label': expected one of "
                          f"{list(DIMENSION_LABELS)}, found {_found(label)}")
        if strength is not None:
            if isinstance(strength, bool) or not isinstance(strength, int | float):
                return None, (f"{where}.strength", "invalid_type", f"field '{where}.strength': expected a number "
                              f"in [0, 1], found {_found(strength)}")
            if not 0.0 <= strength <= 1.0:  # NaN fails too
                return None, (f"{where}.strength", "invalid_value", f"field '{where}.strength': expected a number "
                              f"in [0, 1], found {_found(strength)}")
            strength = float(strength)
        if critique is not None and not isinstance(critique, str):
            return None, (f"{where}.critique", "invalid_type", f"field '{where}.critique': expected a string, "
                          f"found {_found(critique)}")
        out.append({"name": name, "label": label, "strength": strength, "critique": critique})
    if not out:
        return None, None
    out.sort(key=lambda d: d["name"])
    return out, None


# ---------------------------------------------------------------- column-wise (the fast JSON Lines path)
_EXACT = 2.0 ** 53


def from_arrow(col: Any) -> tuple[pl.Series, Any]:
    """``dimensions`` as Arrow's JSON reader inferred it (an object of free keys: a struct whose
    children are the dimension names) -> (the typed verdict lists of the rows taken here, null
    elsewhere; mask of the rows *not* taken: a verdict Arrow typed otherwise than a bare label
    or a ``{label, strength, critique}`` object of the expected types, or any value
    :func:`parse_dimensions` would refuse or read differently).  Those rows are left to
    :func:`parse_dimensions` on the decoded line, so the result is the per-row path's."""
    import numpy as np
    import pyarrow as pa

    n = len(col)
    present = col.is_valid().to_numpy(zero_copy_only=False)
    dtype = pl.List(DIM_STRUCT)
    if not pa.types.is_struct(col.type) or not present.any():
        return pl.Series("dimensions", [None] * n, dtype=dtype), present.copy()
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    other = np.zeros(n, dtype=bool)  # rows for parse_dimensions
    cols: dict[str, Any] = {}
    verdicts: list[tuple[str, str]] = []  # (dimension, frame column prefix)
    typ = arr.type
    for i, name in sorted(enumerate(typ.field(k).name for k in range(typ.num_fields)), key=lambda t: t[1]):
        child = arr.field(i)
        if len(name) > DIMENSION_NAME_MAX or not _NAME.fullmatch(name):
            other |= present  # a null value reads as absent here; the line says whether the bad name is there
            continue
        if pa.types.is_null(child.type):
            continue
        has = child.is_valid().to_numpy(zero_copy_only=False) & present
        if not has.any():
            continue
        key = f"d{len(verdicts)}"
        if pa.types.is_string(child.type) or pa.types.is_large_string(child.type):
            label, strength, critique = child, None, None
        elif pa.types.is_struct(child.type):
            sub = {child.type.field(k).name: child.field(k) for k in range(child.type.num_fields)}
            label, strength, critique = sub.get("label"), sub.get("strength"), sub.get("critique")
            typed = (set(sub) <= set(_OBJECT_KEYS) and label is not None
                     and (pa.types.is_string(label.type) or pa.types.is_null(label.type))
                     and (strength is None or pa.types.is_null(strength.type) or pa.types.is_floating(strength.type)
                          or pa.types.is_integer(strength.type))
                     and (critique is None or pa.types.is_null(critique.type) or pa.types.is_string(critique.type)))
            if not typed:  # unknown keys (even null-valued ones) or other types: decided per row
                other |= has
                continue
        else:
            other |= has
            continue
        cols[f"{key}_label"] = label.cast(pa.string()) if not pa.types.is_null(label.type) else pa.nulls(n, pa.string())
        cols[f"{key}_strength"] = (strength.cast(pa.float64()) if strength is not None and not pa.types.is_null(strength.type)
                                   else pa.nulls(n, pa.float64()))
        cols[f"{key}_critique"] = (critique if critique is not None and pa.types.is_string(critique.type)
                                   else pa.nulls(n, pa.string()))
        cols[f"{key}_has"] = pa.array(has)
        verdicts.append((name, key))
    if not verdicts:
        out = pl.Series("dimensions", [None] * n, dtype=dtype)
        return out, other
    df = pl.from_arrow(pa.table(cols))
    c = pl.col
    bad = pl.lit(False)
    for _, key in verdicts:
        lab, st, has = c(f"{key}_label"), c(f"{key}_strength"), c(f"{key}_has")
        # orjson refuses NaN / Infinity and reads -0 as 0; huge integers are exact there
        odd = (st.is_nan() | st.is_infinite() | (st.abs() >= _EXACT) | ((st == 0) & (1.0 / st < 0))).fill_null(False)
        bad = bad | (has & (~lab.is_in(list(DIMENSION_LABELS)).fill_null(False) | ~st.is_between(0.0, 1.0).fill_null(True)
                            | odd))
    other = other | df.select(bad=bad)["bad"].to_numpy()
    keep = present & ~other
    # the lists, in Arrow: row r holds its verdicts in name order (row-major over the has matrix)
    has = np.column_stack([cols[f"{key}_has"].to_numpy(zero_copy_only=False) for _, key in verdicts]) & keep[:, None]
    rows, which = np.nonzero(has)
    at = pa.array(which.astype(np.int64) * n + rows)
    counts = has.sum(axis=1)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    values = pa.StructArray.from_arrays(
        [pa.array([name for name, _ in verdicts], pa.string()).take(pa.array(which)),
         *(pa.concat_arrays([cols[f"{key}_{f}"] for _, key in verdicts]).take(at) for f in ("label", "strength", "critique"))],
        fields=list(_arrow_dim_struct()))
    lists = pa.ListArray.from_arrays(offsets, values, mask=pa.array(counts == 0))
    return pl.Series("dimensions", lists).cast(dtype), other


def _arrow_dim_struct() -> Any:
    import pyarrow as pa

    return pa.struct([("name", pa.string()), ("label", pa.string()), ("strength", pa.float64()), ("critique", pa.string())])


# ---------------------------------------------------------------- the dimension rule (vectorised)
def dimension_label(col: pl.Expr, name: str, field: str = "label") -> pl.Expr:
    """The ``field`` of dimension ``name`` in a list-of-struct column (null when absent)."""
    el = pl.element().struct
    return col.list.eval(el.field(field).filter(el.field("name") == name)).list.first()


def rule_expr(col: pl.Expr, cfg: DimensionsConfig) -> tuple[pl.Expr, pl.Expr]:
    """(label, deciding dimension) by the policy's dimension rule from a list-of-struct column
    of verdicts ({name, label, ...}); both null where the rule cannot decide (no rule, or none
    of its dimensions given).  The deciding dimension is null for a fallback tie / both_bad
    and for a veto that escalates or says both_bad."""
    decisive = ["a", "b"]
    none = pl.lit(None, dtype=pl.String)
    if cfg.priority:
        labs = [dimension_label(col, d) for d in cfg.priority]
        label, by = none, none
        for d, lab in reversed(list(zip(cfg.priority, labs, strict=True))):
            hit = lab.is_in(decisive).fill_null(False)
            label = pl.when(hit).then(lab).otherwise(label)
            by = pl.when(hit).then(pl.lit(d)).otherwise(by)
        fallback = (pl.when(pl.any_horizontal([(x == "both_bad").fill_null(False) for x in labs])).then(pl.lit("both_bad"))
                    .when(pl.any_horizontal([x.is_not_null() for x in labs])).then(pl.lit("tie")).otherwise(none))
        return pl.coalesce(label, fallback), by
    if cfg.primary:
        p = dimension_label(col, cfg.primary)
        hits = [(v, lab, (lab.is_in(decisive) & p.is_in(decisive) & (lab != p)).fill_null(False))
                for v in cfg.veto for lab in [dimension_label(col, v)]]
        vetoed = pl.any_horizontal([h for _, _, h in hits]) if hits else pl.lit(False)
        if cfg.veto_action == "veto_side":
            side, side_by = none, none
            for v, lab, h in reversed(hits):
                side = pl.when(h).then(lab).otherwise(side)
                side_by = pl.when(h).then(pl.lit(v)).otherwise(side_by)
        else:
            side, side_by = pl.lit(cfg.veto_action), none
        by = pl.when(p.is_not_null()).then(pl.lit(cfg.primary)).otherwise(none)
        return pl.when(vetoed).then(side).otherwise(p), pl.when(vetoed).then(side_by).otherwise(by)
    return none, none


def derive_labels(df: pl.DataFrame, cfg: DimensionsConfig | None) -> pl.DataFrame:
    """``label`` filled by the dimension rule where it is null and ``dimensions`` are given
    (``label_derived`` true there); other rows unchanged.  Ingest calls it before validation."""
    if cfg is None or not cfg.has_rule or "dimensions" not in df.columns:
        return df.with_columns(label_derived=pl.lit(False))
    need = pl.col("label").is_null() & pl.col("dimensions").is_not_null()
    if not df.select(need.any()).item():
        return df.with_columns(label_derived=pl.lit(False))
    label, _ = rule_expr(pl.col("dimensions"), cfg)
    derived = pl.when(need).then(label)
    return df.with_columns(label=pl.coalesce("label", derived), label_derived=derived.is_not_null())


# ---------------------------------------------------------------- per-dimension frames
def has_dimensions(judgments: pl.DataFrame) -> bool:
    return "dimensions" in judgments.columns and judgments["dimensions"].null_count() < judgments.height


def names(judgments: pl.DataFrame) -> list[str]:
    """The dimension names given in a judgments frame, sorted."""
    if not has_dimensions(judgments):
        return []
    return sorted(judgments["dimensions"].explode().struct.field("name").drop_nulls().unique().to_list())


# the column of a judgments frame that says which of its judgments vote (:func:`dimension_frame`)
RATED = "_rated"


def dimension_frame(judgments: pl.DataFrame, name: str, rated: Any = None) -> pl.DataFrame:
    """The judgments that gave a verdict on ``name``, with ``label`` / ``strength`` taken from it
    (``gold_label`` cleared: it is a known overall answer).  ``rated``: the judgments that vote
    (:func:`voting`; default all) -- the others are left out too, and the frame then carries
    :data:`RATED` (every row true): its copies were found on the judgments' own labels, and
    :func:`pipeline.checks.agreement.ratings` of it takes that column instead of looking for copies
    again on the dimension's verdicts -- where two judgments of an annotator with different labels
    but one verdict on the dimension would look like one delivered twice."""
    lab = dimension_label(pl.col("dimensions"), name)
    keep = lab.is_not_null() if rated is None or rated.all() else lab.is_not_null() & pl.lit(pl.Series(rated))
    out = judgments.filter(keep).with_columns(
        label=lab, strength=dimension_label(pl.col("dimensions"), name, "strength"))
    if rated is not None:
        out = out.with_columns(pl.lit(True).alias(RATED))
    return out.with_columns(gold_label=pl.lit(None, dtype=out["gold_label"].dtype)) if "gold_label" in out.columns else out


def for_training(judgments: pl.DataFrame, cfg: DimensionsConfig) -> tuple[pl.DataFrame, dict[str, int]]:
    """The judgments a version is built from: with ``train_on`` the named dimension's verdicts
    (:func:`dimension_frame`) and the count of judgments without one (``{"no_verdict_on_<name>": n}``);
    otherwise the judgments unchanged."""
    if not cfg.train_on:
        return judgments, {}
    if "dimensions" not in judgments.columns:
        out = judgments.clear()
    else:
        out = dimension_frame(judgments, cfg.train_on)
    off = judgments.height - out.height
    return out, ({f"no_verdict_on_{cfg.train_on}": off} if off else {})


# ---------------------------------------------------------------- consensus per dimension
_CACHE: list[tuple[weakref.ref, int, tuple[str, ...], AggregationConfig, Any, pl.DataFrame]] = []
LONG_COLUMNS = ("pair_id", "name", "label", "agreement", "strength", "p_a_weighted", "n_judgments", "n_human", "n_ai",
                "annotator_kind", "label_human", "label_ai", "swapped")


def voting(judgments: pl.DataFrame, rated: Any = None) -> pl.DataFrame:
    """The judgments ``rated`` marks (bool (N,), :func:`pipeline.checks.agreement.ratings`: all but
    re-delivered copies), in their order; None or every row marked: ``judgments``."""
    if rated is None or rated.all():
        return judgments
    return judgments.filter(pl.Series(rated))


def long_frame(judgments: pl.DataFrame, rated: Any = None) -> pl.DataFrame:
    """One row per (judgment, dimension verdict), in the judgments' order: a judgments frame whose
    pair key is ``pair_id + SEP + name`` and annotator key ``annotator_id + SEP + name`` (texts
    empty), which :func:`pipeline.aggregate.aggregate` decides as it decides pairs.  ``rated``:
    the judgments that vote (:func:`voting`; default all)."""
    c = pl.col
    judgments = voting(judgments, rated)
    keep = [x for x in ("comparison_id", "pair_id", "a_hash", "b_hash", "annotator_id", "annotator_kind", "shown_first")
            if x in judgments.columns]
    long = (judgments.select(*keep, "dimensions").filter(c("dimensions").is_not_null())
            .explode("dimensions").unnest("dimensions"))
    name = c("name")
    long = long.with_columns(
        pair_id=c("pair_id") + pl.lit(SEP) + name, annotator_id=c("annotator_id") + pl.lit(SEP) + name,
        gold_label=pl.lit(None, dtype=pl.String), locale=pl.lit(None, dtype=pl.String),
        tags=pl.lit([], dtype=pl.List(pl.String)), prompt=pl.lit(None), prompt_text=pl.lit(""),
        response_a=pl.lit(""), response_b=pl.lit(""), model_a=pl.lit(None, dtype=pl.String),
        model_b=pl.lit(None, dtype=pl.String),
    )
    if "shown_first" not in long.columns:
        long = long.with_columns(shown_first=pl.lit(None, dtype=pl.String))
    if "comparison_id" not in long.columns:
        long = long.with_columns(comparison_id=pl.lit(""))
    return long


def consensus(judgments: pl.DataFrame, cfg: AggregationConfig | None = None, *, encoded: Any = None,
              params: pl.DataFrame | None = None, rated: Any = None) -> pl.DataFrame | None:
    """Per (pair, dimension): the consensus of the judgments' verdicts on that dimension, in
    the pair's canonical orientation (columns :data:`LONG_COLUMNS`; ``label`` is the consensus
    label; ``swapped``: the dimension's own first verdict named the responses the other way
    round).  None when no judgment gives dimensions.  The last result is cached by frame
    identity (aggregation and the dimensions check share it).  ``encoded``:
    :func:`pipeline.aggregate.encode` of the same frame.  ``params``: the per-(annotator,
    dimension) parameters (``annotator_id + SEP + name``) of a finished fit over a superset of
    these judgments (a partition's pairs decided with the whole input's fit:
    :mod:`pipeline.partition_consensus`); None: fitted here.  ``rated`` (bool (N,)): the judgments
    whose verdicts vote (:func:`pipeline.checks.agreement.ratings`: a re-delivered copy is no second
    verdict; the same ``rated`` as the overall consensus); None: every judgment."""
    from pipeline import aggregate as agg

    if not has_dimensions(judgments):
        return None
    cfg = cfg or AggregationConfig()
    if _CACHE:
        ref, height, cols, ccfg, crated, out = _CACHE[0]
        if ref() is judgments and height == judgments.height and cols == tuple(judgments.columns) and ccfg == cfg \
                and params is None and _same(crated, rated):
            return out
    e = encoded or agg.encode(judgments)  # the overall orientation
    canon = pl.DataFrame({"pair_id": e.pair_ids, "_canon_a": judgments["a_hash"].rechunk().gather(e.pair_first)})
    c = pl.col
    long = long_frame(judgments, rated)
    if long.height == 0:  # (the only verdicts were copies')
        return None
    res = agg.aggregate(long, cfg, encoded=agg._encode(long),  # not agg.encode: keep its cache for the main frame
                        params=params, fitted=params is not None)
    p = res.pairs.with_columns(_a=res.a_hash)
    key = c("pair_id")
    p = p.with_columns(name=key.str.extract(r"\x1f([a-z][a-z0-9_]*)$", 1),
                       pair_id=key.str.replace(r"\x1f[a-z][a-z0-9_]*$", ""))
    p = p.join(canon, on="pair_id", how="left", maintain_order="left")
    swap = (c("_a") != c("_canon_a")).fill_null(False)

    def turned(x: str) -> pl.Expr:
        return pl.when(swap).then(c(x).replace({"a": "b", "b": "a"})).otherwise(c(x))

    out = p.select(
        "pair_id", "name", label=turned("label_consensus"), agreement=c("agreement"), strength=c("strength"),
        p_a_weighted=pl.when(swap).then(1.0 - c("p_a_weighted")).otherwise(c("p_a_weighted")),
        n_judgments=c("n_judgments"), n_human=c("n_human"), n_ai=c("n_ai"), annotator_kind=c("annotator_kind"),
        label_human=turned("label_human"), label_ai=turned("label_ai"), swapped=swap,
    ).sort("pair_id", "name")
    if params is None:
        _CACHE[:] = [(weakref.ref(judgments), judgments.height, tuple(judgments.columns), cfg, rated, out)]
    return out


def _same(a: Any, b: Any) -> bool:
    """Two ``rated`` masks mark the same judgments (None: every one)."""
    import numpy as np

    if a is b:
        return True
    a = np.ones(len(b), bool) if a is None else a
    b = np.ones(len(a), bool) if b is None else b
    return bool(np.array_equal(a, b))


PAIR_STRUCT_FIELDS = ("name", "label", "agreement", "strength", "n_judgments")


def as_written(long: pl.DataFrame) -> pl.DataFrame:
    """:func:`consensus` rows turned back to the orientation of each dimension's first verdict
    (the orientation :func:`dimension_frame` aggregates in), labels as ``label_consensus``."""
    c = pl.col
    return long.with_columns(
        label_consensus=pl.when(c("swapped")).then(c("label").replace({"a": "b", "b": "a"})).otherwise(c("label")),
        p_a_weighted=pl.when(c("swapped")).then(1.0 - c("p_a_weighted")).otherwise(c("p_a_weighted")),
    ).drop("label")


def pair_column(long: pl.DataFrame | None, pair_ids: pl.Series) -> pl.Series:
    """(P,) ``PairRecord.dimensions`` for ``pair_ids`` (in that order) from :func:`consensus`."""
    from schemas.arrow import polars_schema
    from schemas.records import PairRecord

    dtype = polars_schema(PairRecord)["dimensions"]
    if long is None or long.height == 0:
        return pl.Series("dimensions", [None] * len(pair_ids), dtype=dtype)
    lists = long.group_by("pair_id", maintain_order=True).agg(
        pl.struct(*PAIR_STRUCT_FIELDS).alias("dimensions"))  # long is sorted by (pair_id, name)
    out = pair_ids.to_frame("pair_id").join(lists, on="pair_id", how="left", maintain_order="left")
    return out["dimensions"].cast(dtype)


def dpo_expr(chosen_is_a: pl.Expr) -> pl.Expr:
    """``DPORow.dimensions`` from a pair's ``dimensions``: each verdict said as ``chosen`` /
    ``rejected`` (a DPO row has no a/b), with its agreement."""
    el = pl.element().struct

    def said(a: str, b: str) -> pl.Expr:
        lab = el.field("label").replace({"a": a, "b": b})
        return pl.col("dimensions").list.eval(pl.struct(name=el.field("name"), label=lab, agreement=el.field("agreement")))

    return pl.when(chosen_is_a).then(said("chosen", "rejected")).otherwise(said("rejected", "chosen"))


def conflicts(long: pl.DataFrame) -> pl.DataFrame:
    """Pairs whose consensus names opposite sides on two dimensions: one row per (pair, d1, d2)
    with d1 < d2, d1's label and d2's label (one ``a``, the other ``b``)."""
    dec = long.filter(pl.col("label").is_in(["a", "b"])).select("pair_id", "name", "label")
    both = dec.join(dec, on="pair_id", suffix="_2")
    return both.filter((pl.col("name") < pl.col("name_2")) & (pl.col("label") != pl.col("label_2"))) \
        .sort("pair_id", "name", "name_2")


def apply_rule(pairs: pl.DataFrame, long: pl.DataFrame | None, cfg: DimensionsConfig | None) -> pl.DataFrame:
    """Pairs whose dimension consensus conflicts take the dimension rule's label; their
    agreement, strength and ``p_a_weighted`` become the deciding dimension's (unchanged when
    the rule decides by a fallback or an escalating veto).  Other pairs are unchanged."""
    if cfg is None or not cfg.has_rule or long is None or long.height == 0:
        return pairs
    hit = conflicts(long).select("pair_id").unique()
    if hit.height == 0:
        return pairs
    c = pl.col
    lists = long.join(hit, on="pair_id", how="semi").group_by("pair_id").agg(pl.struct("name", "label").alias("_d"))
    label, by = rule_expr(c("_d"), cfg)
    decided = lists.select("pair_id", _label=label, _by=by).join(
        long.select("pair_id", _by=c("name"), _agreement=c("agreement"), _strength=c("strength"), _p=c("p_a_weighted")),
        on=["pair_id", "_by"], how="left")
    out = pairs.join(decided, on="pair_id", how="left", maintain_order="left")
    ruled = c("_label").is_not_null()
    by_dim = c("_by").is_not_null()
    return out.with_columns(
        label_consensus=pl.when(ruled).then(c("_label")).otherwise(c("label_consensus")),
        agreement=pl.when(by_dim).then(c("_agreement")).otherwise(c("agreement")),
        strength=pl.when(by_dim).then(c("_strength")).otherwise(c("strength")),
        p_a_weighted=pl.when(by_dim).then(c("_p")).otherwise(c("p_a_weighted")),
    ).drop("_label", "_by", "_agreement", "_strength", "_p")


def conflict_matrix(long: pl.DataFrame | None) -> dict[str, dict[str, int]]:
    """{d1: {d2: pairs whose consensus names opposite sides on d1 and d2}} (symmetric, every
    dimension present as a row and a column, 0 on the diagonal)."""
    if long is None or long.height == 0:
        return {}
    dims = sorted(long["name"].unique().to_list())
    m = {a: {b: 0 for b in dims} for a in dims}
    for a, b, n in conflicts(long).group_by("name", "name_2").len().iter_rows():
        m[a][b] = m[b][a] = int(n)
    return m
