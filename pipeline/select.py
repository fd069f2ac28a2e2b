"""Select: apply the policy to check results.  The only stage that decides what is kept.

Two steps, both vectorised:

1. :func:`filter_judgments` — judgment-level decisions before the final aggregation:
   judgments flagged ``exact_duplicate`` or ``pair_id_conflict`` and judgments of annotators
   whose flag reasons map to ``drop`` (e.g. ``low_reliability``) are removed, counted by
   reason (``pair_id_conflict`` first, then judgment reasons, then annotator reasons, each in
   alphabetical order); annotators whose reasons map to ``downweight`` (e.g.
   ``position_bias``) are listed for step 2.
2. :func:`select_pairs` — every aggregated pair ends as exactly one of: a DPO row, a routed
   item (tie / both_bad / escalate, per ``select.route``), or a drop with one reason.
   Precedence of reasons (first wins, :func:`drop_order`): each check's pair reasons at the place
   they declare, among select's own outcomes -- today ``identical_responses``,
   ``all_judgments_dropped``, ``language_mismatch``, routing, ``no_consensus``, ``low_agreement``,
   ``near_duplicate``, ``too_easy``, ``ambiguous``, ``too_long``, ``below_min_strength``.  Flag
   reasons act only when the policy maps them to ``drop``; ``downweight`` multiplies the weight by
   ``downweight_factor``; ``warn`` keeps.  Any declared pair reason can be dropped on: none is
   ignored.

Weight (``select.weight_by``): ``confidence`` (default: the accuracy-weighted share of the
evidence for the consensus side, ``p_a_weighted`` or 1 - it -- equal to ``agreement`` when
the annotators are equally reliable, about 0.5 for a pair the panel barely decided, e.g.
one whose AI verdicts flip with the display order; ``agreement`` where there is no share),
``agreement`` (share of used judgments agreeing with the consensus),
``agreement_x_strength`` (missing strength counts as 1), or ``none`` (1.0);
then times ``1 - s * (1 - downweight_factor)`` where ``s`` is the share of the pair's
judgments that came from down-weighted annotators, and times ``downweight_factor`` for each
pair-level reason mapped to ``downweight``.  Weights are in (0, 1].
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import polars as pl

from pipeline import dimensions as dims
from pipeline.aggregate import PAIR_TEXT_COLUMNS
from schemas.arrow import conform, polars_schema
from schemas.policy import ChecksConfig, SelectConfig
from schemas.records import ROUTED_LABELS, DPORow

# select's own pair outcomes and their place among the checks' pair reasons (``Reason.precedence``:
# identical_responses 10, language_mismatch 30, low_agreement 60, near_duplicate 70, too_easy 80,
# ambiguous 90; a new check's pair reason takes the place it declares)
OWN_PRECEDENCE = {"all_judgments_dropped": 20, "<routing>": 40, "no_consensus": 50, "too_long": 100,
                  "below_min_strength": 110}


def drop_order() -> list[str]:
    """Every pair outcome in order of precedence (first wins): the checks' pair reasons and select's own."""
    from pipeline.checks import pair_reasons

    items = [(r.precedence, r.code) for r in pair_reasons()] + [(v, k) for k, v in OWN_PRECEDENCE.items()]
    return [code for _, code in sorted(items)]


# judgment columns no stage after the checks reads (they stay in judgments.parquet)
PROVENANCE_COLUMNS = ("batch_id", "source_file", "source_line", "extra", "rubric", "model_version_a", "model_version_b",
                      "created_at", "confidence", "prompt_hash")
SELECTION_DROP = (*PAIR_TEXT_COLUMNS, *PROVENANCE_COLUMNS)  # what select's judgments leave out


@dataclass
class JudgmentSelection:
    """The judgments select keeps: ``rows`` (without PAIR_TEXT_COLUMNS and PROVENANCE_COLUMNS) but
    those ``dropped`` marks (None: none).  A filter of every row copies each column, so the kept
    frame is made only when asked for (:attr:`kept`); :meth:`kept_rows` copies only the rows and
    columns a stage reads."""

    rows: pl.DataFrame
    dropped: pl.Series | None
    dropped_by_reason: dict[str, int]
    downweighted_annotators: list[str] = field(default_factory=list)
    # rows -> the same rows with the columns ``rows`` lacks (a child's union holds some columns for the rows
    # of the pairs it aggregates or selects only, :class:`pipeline.incremental.Completer`), and every column
    complete: Callable[[pl.DataFrame], pl.DataFrame] | None = None
    columns: list[str] | None = None

    @property
    def kept(self) -> pl.DataFrame:
        return self.kept_rows()

    def kept_rows(self, where: pl.Expr | None = None, columns: list[str] | None = None) -> pl.DataFrame:
        """The kept judgments ``where`` selects, with ``columns`` (None: all of them); columns
        ``rows`` lacks are completed for those rows only."""
        want = columns if columns is not None else self.columns
        lacking = [] if want is None else [c for c in want if c not in self.rows.columns]
        frame = self.rows if want is None else \
            self.rows.select(list(dict.fromkeys([*(c for c in want if c in self.rows.columns),
                                                 *(["comparison_id"] if lacking else [])])))
        if self.dropped is not None:
            frame = frame.filter(~self.dropped if where is None else ~self.dropped & where)
        elif where is not None:
            frame = frame.filter(where)
        if lacking:
            assert self.complete is not None and want is not None
            frame = self.complete(frame).select(want)
        return frame

    def kept_of(self, pairs: pl.Series, columns: list[str] | None = None) -> pl.DataFrame:
        """The kept judgments of ``pairs`` (:meth:`kept_rows`)."""
        return self.kept_rows(pl.col("pair_id").is_in(pairs.implode()), columns)

    def pairs_without_kept(self) -> pl.Series:
        """The pair ids all of whose judgments are dropped: looked for among the dropped rows' pairs
        only (a few), not by a distinct count of every kept row's pair."""
        if self.dropped is None:
            return self.rows["pair_id"].clear()
        cand = self.rows["pair_id"].filter(self.dropped).unique()
        if cand.len() == 0:
            return cand
        rows = self.rows.select("pair_id", _dropped=self.dropped).filter(pl.col("pair_id").is_in(cand.implode()))
        return rows.group_by("pair_id").agg(pl.col("_dropped").all()).filter(pl.col("_dropped"))["pair_id"]

    def kept_annotators(self, step: int = 1 << 20) -> pl.Series:
        """The annotators with a kept judgment, in no order: by groups over ``step`` rows at a time, then over their
        results (a filter of the kept rows' ids first copied 3M strings: ~0.1 GB at 3M judgments; one group over
        every row of a 10M-judgment child took 0.36 GB, a group per million rows 0.03 GB)."""
        ids = self.rows["annotator_id"]
        if self.dropped is None:
            return ids.unique()
        kept = pl.col("_kept").any()
        parts = [pl.DataFrame({"annotator_id": ids.slice(s, step), "_kept": ~self.dropped.slice(s, step)})
                 .group_by("annotator_id").agg(kept) for s in range(0, ids.len(), step)]
        g = pl.concat(parts).group_by("annotator_id").agg(kept) if len(parts) > 1 else parts[0]
        return g.filter(pl.col("_kept"))["annotator_id"]

    def dropped_ids(self) -> pl.Series:
        """The comparison ids of the dropped judgments."""
        ids = self.rows["comparison_id"]
        return ids.clear() if self.dropped is None else ids.filter(self.dropped)


def _reasons_with(cfg: SelectConfig, action: str) -> set[str]:
    from pipeline.checks import flag_actions

    return {r for r, a in flag_actions(cfg).items() if a == action}


def drop_rules(flags: pl.DataFrame, cfg: SelectConfig) -> tuple[pl.DataFrame, pl.DataFrame, list[str]]:
    """What drops a judgment, from the flags: (comparison_id -> ``_drop``: its judgment-level reason, a
    pair_id conflict before any other; annotator_id -> ``_drop_a``: its annotator's; the downweighted annotators)."""
    drop_reasons = _reasons_with(cfg, "drop")
    jf = flags.filter((pl.col("subject_kind") == "judgment") & pl.col("reason").is_in(list(drop_reasons)))
    af = flags.filter(pl.col("subject_kind") == "annotator")
    drop_ann = af.filter(pl.col("reason").is_in(list(drop_reasons)))
    down_ann = af.filter(pl.col("reason").is_in(list(_reasons_with(cfg, "downweight"))))
    # one reason per dropped judgment: judgment-level first (a pair_id conflict before any other), then annotator-level
    first = pl.col("reason").sort_by(pl.col("reason") != "pair_id_conflict", "reason").first()
    by_j = jf.group_by("subject_id").agg(first.alias("_drop")).rename({"subject_id": "comparison_id"})
    by_a = drop_ann.group_by("subject_id").agg(pl.col("reason").sort().first().alias("_drop_a")).rename({"subject_id": "annotator_id"})
    return by_j, by_a, sorted(set(down_ann["subject_id"].to_list()))


def dropped_rows(judgments: pl.DataFrame, by_j: pl.DataFrame, by_a: pl.DataFrame) -> tuple[pl.Series, pl.Series]:
    """(which rows of ``judgments`` are dropped, the reason of each dropped row, in their order) by :func:`drop_rules`."""
    # which rows are dropped: a scan of the ids against the (few) flagged ones -- joining every
    # judgment to the flags hashed every id; the reasons are then joined to the dropped rows only
    dropped = pl.col("comparison_id").is_in(by_j["comparison_id"].implode()) \
        | pl.col("annotator_id").is_in(by_a["annotator_id"].implode())
    mask = judgments.select(dropped.fill_null(False).alias("_d")).to_series()
    j = judgments.select("comparison_id", "annotator_id").filter(mask)
    j = j.join(by_j, on="comparison_id", how="left").join(by_a, on="annotator_id", how="left")
    return mask, j.select(pl.coalesce("_drop", "_drop_a")).to_series()


def reason_counts(reasons: pl.Series) -> dict[str, int]:
    """Dropped judgments by reason, in reason order."""
    return dict(reasons.value_counts().sort(reasons.name).iter_rows())


def filter_judgments(judgments: pl.DataFrame, flags: pl.DataFrame, cfg: SelectConfig,
                     complete: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> JudgmentSelection:
    """The judgments select keeps (:class:`JudgmentSelection`).  ``complete``: rows of ``judgments``
    -> the same rows with every column (a child's union lacks some)."""
    by_j, by_a, down = drop_rules(flags, cfg)
    mask, drop = dropped_rows(judgments, by_j, by_a)
    # the columns later stages need, without the pair texts (take those from the pairs) and
    # per-judgment provenance: a filter copies 16 bytes per row of every string column
    narrow = judgments.drop([c for c in SELECTION_DROP if c in judgments.columns])
    every = [c for c in complete(judgments.clear()).columns if c not in SELECTION_DROP] if complete is not None else None
    return JudgmentSelection(narrow, mask if drop.len() else None, reason_counts(drop), down,
                             complete=complete if every != narrow.columns else None,
                             columns=every if every != narrow.columns else None)


def with_unknown_kinds(pairs: pl.DataFrame, judgments: pl.DataFrame | None) -> pl.DataFrame:
    """Pairs' ``annotator_kind`` with ``unknown`` judges told apart from AI judges.

    ``pipeline.aggregate`` counts every judgment that is not ``human`` as AI, so it names a
    pair without a human judgment ``ai``; among those, a pair whose judgments are all
    ``unknown`` is ``unknown`` and one with both ``unknown`` and ``ai`` judgments is
    ``mixed``.  Other pairs keep their kind."""
    c = pl.col
    if judgments is None or "annotator_kind" not in judgments.columns or not (judgments["annotator_kind"] == "unknown").any():
        return pairs
    kinds = judgments.group_by("pair_id").agg(_unknown=(c("annotator_kind") == "unknown").any(),
                                              _ai=(c("annotator_kind") == "ai").any())
    kind = pl.when((c("annotator_kind") == "ai") & c("_unknown").fill_null(False)) \
        .then(pl.when(c("_ai")).then(pl.lit("mixed")).otherwise(pl.lit("unknown"))).otherwise(c("annotator_kind"))
    return pairs.join(kinds, on="pair_id", how="left", maintain_order="left").with_columns(annotator_kind=kind) \
        .drop("_unknown", "_ai")


def _pair_flag_sets(flags: pl.DataFrame) -> pl.DataFrame:
    pf = flags.filter(pl.col("subject_kind") == "pair")
    return pf.group_by("subject_id").agg(pl.col("reason").unique().sort().alias("_reasons")).rename({"subject_id": "pair_id"})


def estimate_tokens_expr(cfg: SelectConfig) -> pl.Expr:  # noqa: ARG001 - kept for callers
    """``chars/4`` estimate of the tokens of prompt + longer response."""
    chars = pl.col("prompt_text").str.len_chars() + pl.max_horizontal(
        pl.col("response_a").str.len_chars(), pl.col("response_b").str.len_chars())
    return (chars / 4).ceil().cast(pl.Int64)


@lru_cache(maxsize=4)
def _load_tokenizer(spec: str):
    from tokenizers import Tokenizer

    path = Path(spec)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"select.tokenizer: no tokenizer.json at {spec!r} (give a local tokenizer directory "
                                "or file, or 'chars/4')")
    return Tokenizer.from_file(str(file))


def pair_tokens(p: pl.DataFrame, cfg: SelectConfig) -> pl.Series:
    """Tokens of prompt + longer response per pair (``select.tokenizer``).

    ``chars/4``: an estimate.  A tokenizer path: exact counts with that tokenizer (no special
    tokens, no chat template), computed only for the pairs that could exceed
    ``max_tokens_per_pair``: a byte-level BPE never has more tokens than UTF-8 bytes, so a
    pair of at most that many bytes fits and is not tokenised (its count is reported as the
    byte count, an upper bound)."""
    if cfg.tokenizer == "chars/4":
        return p.select(estimate_tokens_expr(cfg)).to_series()
    c = pl.col
    longer = pl.when(c("response_a").str.len_bytes() >= c("response_b").str.len_bytes()) \
        .then(c("response_a")).otherwise(c("response_b"))
    t = p.select(nbytes=c("prompt_text").str.len_bytes() + longer.str.len_bytes(), prompt=c("prompt_text"), longer=longer)
    need = t.with_row_index("_i").filter(c("nbytes") > cfg.max_tokens_per_pair)
    counts = t["nbytes"].cast(pl.Int64).to_numpy().copy()
    if need.height:
        tok = _load_tokenizer(cfg.tokenizer)
        a = tok.encode_batch(need["prompt"].to_list(), add_special_tokens=False)
        b = tok.encode_batch(need["longer"].to_list(), add_special_tokens=False)
        counts[need["_i"].to_numpy()] = [len(x.ids) + len(y.ids) for x, y in zip(a, b, strict=True)]
    return pl.Series("_tokens", counts)


@dataclass
class PairSelection:
    pairs: pl.DataFrame  # every pair with its ``decision`` (keep / route / drop), ``reason``, ``weight``
    dpo: pl.DataFrame  # DPORow columns (+ near_dup_cluster), kept pairs only
    routed: pl.DataFrame
    dropped_by_reason: dict[str, int]
    routed_by_label: dict[str, int]


def _still_holds(checks: ChecksConfig | None) -> dict[str, pl.Expr]:
    """Pair reason -> its rule over the final pairs, for the reasons that declare one."""
    if checks is None:
        return {}
    from pipeline.checks import pair_reasons

    return {r.code: r.holds(checks) for r in pair_reasons() if r.holds is not None}


def select_pairs(
    pairs: pl.DataFrame,
    flags: pl.DataFrame,
    cfg: SelectConfig,
    *,
    all_pair_ids: pl.Series | None = None,
    clusters: pl.DataFrame | None = None,
    downweight_share: pl.DataFrame | None = None,
    judgments: pl.DataFrame | None = None,
    checks: ChecksConfig | None = None,
) -> PairSelection:
    """Decide every pair.  ``all_pair_ids``: pairs that existed before judgment-level drops
    (those missing from ``pairs`` now are dropped as ``all_judgments_dropped``); ``judgments``:
    the kept judgments (routed pairs carry theirs; ``unknown`` judges set the pair kind,
    :func:`with_unknown_kinds`); ``checks``: the policy's checks section -- a pair reason that
    declares ``holds`` (:class:`pipeline.checks.spec.Reason`) then acts only where its rule still
    holds on ``pairs``, the consensus of the kept judgments."""
    c = pl.col
    drop_r = _reasons_with(cfg, "drop")
    down_r = _reasons_with(cfg, "downweight")

    def mine(frame: pl.DataFrame, key: str) -> pl.DataFrame:  # the rows of these pairs (a child selects a few)
        return frame.filter(c(key).is_in(pairs["pair_id"].implode())) if 4 * pairs.height < frame.height else frame

    p = with_unknown_kinds(pairs, judgments).join(_pair_flag_sets(mine(flags, "subject_id")), on="pair_id", how="left") \
        .with_columns(_reasons=c("_reasons").fill_null(pl.lit([], dtype=pl.List(pl.String))))
    p = p.with_columns(_tokens=pair_tokens(p, cfg))
    if clusters is not None and clusters.height:
        p = p.join(mine(clusters, "pair_id").select("pair_id", "near_dup_cluster"), on="pair_id", how="left")
    if "near_dup_cluster" not in p.columns:
        p = p.with_columns(near_dup_cluster=pl.lit(None, dtype=pl.String))
    p = p.with_columns(near_dup_cluster=c("near_dup_cluster").fill_null(c("pair_id")))
    if downweight_share is not None and downweight_share.height:
        p = p.join(downweight_share, on="pair_id", how="left")
    if "_down_share" not in p.columns:
        p = p.with_columns(_down_share=pl.lit(0.0))
    p = p.with_columns(_down_share=c("_down_share").fill_null(0.0))

    holds = _still_holds(checks)

    def flagged(reason: str) -> pl.Expr:
        cond = c("_reasons").list.contains(reason) & pl.lit(reason in drop_r)
        # (a rule read only where it can drop: a frame may lack the columns of a rule the policy does not act on)
        return cond & holds[reason] if reason in holds and reason in drop_r else cond

    label = c("label_consensus")
    route_action = {k: v for k, v in cfg.route.items()}
    decision = pl.lit(None, dtype=pl.String)
    reason = pl.lit(None, dtype=pl.String)
    own = {"no_consensus": label.is_null(), "too_long": c("_tokens") > cfg.max_tokens_per_pair,
           "below_min_strength": c("strength").fill_null(1.0) < cfg.min_strength}
    conds: list[tuple[str, str, pl.Expr]] = []
    for r in drop_order():
        if r == "<routing>":
            for lab in ROUTED_LABELS:
                act = route_action.get(lab, "route")
                conds.append(("route" if act == "route" else "drop", lab if act == "route" else f"routed_label_{lab}",
                              label == lab))
        elif r in own:
            conds.append(("drop", r, own[r]))
        elif r != "all_judgments_dropped":  # counted from all_pair_ids below
            conds.append(("drop", r, flagged(r)))
    for dec, why, cond in reversed(conds):
        cond = cond.fill_null(False)
        decision = pl.when(cond).then(pl.lit(dec)).otherwise(decision)
        reason = pl.when(cond).then(pl.lit(why)).otherwise(reason)
    p = p.with_columns(decision=decision.fill_null("keep"), reason=reason)

    base = {"confidence": consensus_confidence_expr(p.columns), "agreement": c("agreement"),
            "agreement_x_strength": c("agreement") * c("strength").fill_null(1.0), "none": pl.lit(1.0)}[cfg.weight_by]
    factor = cfg.downweight_factor
    n_down = pl.sum_horizontal([(c("_reasons").list.contains(r) & holds.get(r, pl.lit(True))).fill_null(False).cast(pl.Int32)
                                for r in sorted(down_r)]) if down_r else pl.lit(0)
    weight = base.fill_null(1.0) * (1 - c("_down_share") * (1 - factor)) * pl.lit(factor).pow(n_down)
    p = p.with_columns(weight=weight.clip(1e-6, 1.0))

    if all_pair_ids is not None:
        gone = all_pair_ids.to_frame("pair_id").join(p.select("pair_id"), on="pair_id", how="anti")
    else:
        gone = pl.DataFrame(schema={"pair_id": pl.String})

    dpo = dpo_of(p.filter(c("decision") == "keep"))

    routed = p.filter(c("decision") == "route")
    if judgments is not None:  # (nothing routed: the column all the same, so an empty routed table has every column)
        js = judgments.join(routed.select("pair_id"), on="pair_id", how="semi").group_by("pair_id").agg(
            pl.struct("comparison_id", "annotator_id", "annotator_kind", "label", "shown_first", "critique").alias("judgments"))
        routed = routed.join(js, on="pair_id", how="left")
    routed = routed.rename({"reason": "route"}).drop("decision", "_tokens", "_down_share", strict=False)

    dropped = dict(p.filter(c("decision") == "drop").group_by("reason").len().sort("reason").iter_rows())
    if gone.height:
        dropped["all_judgments_dropped"] = gone.height
    routed_by = {lab: 0 for lab in ROUTED_LABELS}
    routed_by.update(dict(routed.group_by("route").len().iter_rows()) if routed.height else {})
    return PairSelection(p.drop("_tokens", "_down_share"), dpo, routed, dropped, routed_by)


def dpo_of(kept: pl.DataFrame) -> pl.DataFrame:
    """The DPO rows (:class:`schemas.records.DPORow`) of kept pairs' rows, in their order: a
    function of each pair's row alone (a partitioned build makes them from the pair table's parts)."""
    c = pl.col
    chosen_is_a = c("label_consensus") == "a"
    msg = lambda text: pl.concat_list(pl.struct(role=pl.lit("assistant"), content=text))  # noqa: E731
    dpo = kept.with_columns(
        chosen=msg(pl.when(chosen_is_a).then(c("response_a")).otherwise(c("response_b"))),
        rejected=msg(pl.when(chosen_is_a).then(c("response_b")).otherwise(c("response_a"))),
        chosen_model=pl.when(chosen_is_a).then(c("model_a")).otherwise(c("model_b")),
        rejected_model=pl.when(chosen_is_a).then(c("model_b")).otherwise(c("model_a")),
        # per-dimension consensus as chosen / rejected
        dimensions=dims.dpo_expr(chosen_is_a) if "dimensions" in kept.columns else pl.lit(None),
    )
    return conform(dpo, DPORow).select(list(polars_schema(DPORow)))


def consensus_confidence_expr(columns: list[str]) -> pl.Expr:
    """The consensus' confidence: ``p_a_weighted`` (the accuracy-weighted share of the evidence
    for a, :func:`pipeline.aggregate.evidence_share`) for an ``a`` consensus, 1 - it for
    ``b``; ``agreement`` where there is no share (no decisive judgment, or no column)."""
    c = pl.col
    if "p_a_weighted" not in columns:
        return c("agreement")
    lab = c("label_consensus")
    share = pl.when(lab == "a").then(c("p_a_weighted")).when(lab == "b").then(1.0 - c("p_a_weighted"))
    return share.fill_null(c("agreement"))


def downweight_shares(judgments: pl.DataFrame, annotators: list[str]) -> pl.DataFrame:
    """Per pair: share of its judgments made by down-weighted annotators (``_down_share``)."""
    if not annotators:
        return pl.DataFrame(schema={"pair_id": pl.String, "_down_share": pl.Float64})
    return judgments.group_by("pair_id").agg(_down_share=pl.col("annotator_id").is_in(annotators).mean())
