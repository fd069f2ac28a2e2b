"""Exact duplicates: re-delivered judgments and pairs whose two candidates are the same text.

Method
------
* ``exact_duplicate`` (subject ``judgment``): two judgments are the same delivery when they
  have the same annotator, the same prompt (``prompt_hash``), the same two responses, the
  same display order and the same verdict.  ``a``/``b`` are names, not positions, and a
  re-delivery may swap them, so every judgment is first put in a *canonical orientation*:
  the response with the smaller content hash is ``a``; when the row had them the other way
  round, ``shown_first`` and ``a``/``b`` verdicts are swapped with it.  The key is then
  (annotator_id, prompt_hash, lo_hash, hi_hash, canonical shown_first, canonical label);
  a missing ``shown_first`` is a value of its own (two deliveries that both lack it match).
  In each group of equal keys the earliest judgment is kept -- ordered by ``created_at``
  (missing last), then ``batch_id``, ``source_file``, ``source_line``, ``comparison_id``,
  so the choice depends on content only, never on frame order -- and every later one with
  a different ``comparison_id`` is flagged, naming the kept one.  The same pair judged by
  the same annotator in the *other* display order is not a duplicate: that is what
  ``order_consistency`` (``position_bias``) measures.
* ``identical_responses`` (subject ``pair``): the two candidates have the same
  :func:`schemas.text.dedup_key` text (case and whitespace runs ignored).  Keys are
  computed once per distinct (pair, a_hash, b_hash) combination, and only where the two
  texts could match at all (same hash, or the same lower-cased space-free prefix).

Statistics: counts and rates (``exact_duplicate_rate`` = flagged judgments / judgments,
``identical_response_rate`` = flagged pairs / pairs).  Status ``warn`` when anything is
flagged; the certify gate (``max_exact_duplicate_rate``) decides whether it blocks.
"""
from __future__ import annotations

import polars as pl

from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import ChecksConfig
from pipeline.checks.spec import CheckSpec, Reason

NAME = "duplicates"
_HEADS = (16, 160)  # identical_responses pre-filters: characters looked at, in turn
_ORDER = ["created_at", "batch_id", "source_file", "source_line", "comparison_id"]


def _swap_side(col: str, swapped: pl.Expr) -> pl.Expr:
    """``a`` <-> ``b`` where ``swapped``; other values (tie, both_bad, escalate, null) unchanged."""
    c = pl.col(col)
    return (
        pl.when(swapped & (c == "a")).then(pl.lit("b"))
        .when(swapped & (c == "b")).then(pl.lit("a"))
        .otherwise(c)
    )


def exact_duplicates(judgments: pl.DataFrame, *, per_pair: bool = False) -> pl.DataFrame:
    """Later copies of re-delivered judgments: ``comparison_id``, ``pair_id``, ``kept_id``, ``copies``.
    ``per_pair``: copies under the same ``pair_id`` only (a copy under another given id is then a
    judgment of that pair: the agreement check's ratings, counted per pair)."""
    out_schema = {"comparison_id": pl.String, "pair_id": pl.String, "kept_id": pl.String, "copies": pl.UInt32}
    if judgments.height < 2:
        return pl.DataFrame(schema=out_schema)
    c = pl.col
    swapped = c("a_hash") > c("b_hash")
    key = ["annotator_id", "prompt_hash", "_lo", "_hi", "_shown", "_label", *(["pair_id"] if per_pair else [])]
    order = [o for o in _ORDER if o in judgments.columns]
    shown = _swap_side("shown_first", swapped) if "shown_first" in judgments.columns else pl.lit(None, pl.String)
    k = judgments.select(
        "annotator_id", "prompt_hash", "pair_id", *order,
        _lo=pl.min_horizontal("a_hash", "b_hash"), _hi=pl.max_horizontal("a_hash", "b_hash"),
        _shown=shown, _label=_swap_side("label", swapped),
    )
    # cheap pre-filter: only keys seen more than once are sorted
    k = k.filter(pl.struct(key).hash(seed=0).is_duplicated())  # a hash collision only adds a candidate
    if k.height == 0:
        return pl.DataFrame(schema=out_schema)
    k = k.sort([*key, *order], nulls_last=True).with_columns(
        kept_id=c("comparison_id").first().over(key),
        copies=pl.len().over(key).cast(pl.UInt32),
    )
    return k.filter(c("comparison_id") != c("kept_id")).unique("comparison_id", keep="first", maintain_order=True) \
        .select("comparison_id", "pair_id", "kept_id", "copies")


def _fold(expr: pl.Expr) -> pl.Expr:
    """:func:`schemas.text.dedup_key_expr` for text that is already ``normalize_text``-ed
    (ingest did that), without the costly NFC pass."""
    low = expr.str.to_lowercase().str.replace_all("ß", "ss", literal=True).str.replace_all("ς", "σ", literal=True)
    return low.str.replace_all(r"\s+", " ").str.strip_chars()


def _could_match(frame: pl.DataFrame, head: int) -> pl.Series:
    """Necessary condition for equal folded texts, looking at ``head`` characters only.

    ``S`` = the folded head without whitespace is a prefix of the full folded text without
    whitespace (complete when the text fits in the head).  Equal texts need prefix-
    compatible ``S``: the shorter one starts the longer one, and a complete one is not
    shorter than the other."""
    c = pl.col
    skel = {s: _fold(c(f"response_{s}").str.head(head)).str.replace_all(" ", "", literal=True) for s in "ab"}
    f = frame.select(
        sa=skel["a"], sb=skel["b"],
        ca=c("response_a").str.len_chars() <= head, cb=c("response_b").str.len_chars() <= head,
    ).with_columns(la=c("sa").str.len_chars(), lb=c("sb").str.len_chars())
    m = pl.min_horizontal("la", "lb")
    ok = (c("sa").str.head(m) == c("sb").str.head(m)) & (~c("ca") | (c("lb") <= c("la"))) \
        & (~c("cb") | (c("la") <= c("lb")))
    return f.select(ok).to_series()


def identical_response_pairs(judgments: pl.DataFrame) -> pl.Series:
    """Pair ids whose two responses have the same ``dedup_key`` (sorted, unique).

    Folding every response costs ~10-30 ns per character, so exact, cheap pre-filters run
    first (:func:`_could_match` on the first ``_HEADS`` characters); only the pairs that
    pass them all are folded in full.
    """
    if judgments.height == 0:
        return pl.Series("pair_id", [], dtype=pl.String)
    c = pl.col
    first = judgments.select(pl.struct("pair_id", "a_hash", "b_hash").is_first_distinct()).to_series()
    cand = judgments.select("pair_id", "a_hash", "b_hash", "response_a", "response_b").filter(first & (c("a_hash") != c("b_hash"))) \
        .drop("a_hash", "b_hash")  # narrow first: a filter copies every column it keeps
    for head in _HEADS:
        if cand.height:
            cand = cand.filter(_could_match(cand, head))
    same_key = cand.filter(_fold(c("response_a")) == _fold(c("response_b")))["pair_id"]
    same_hash = judgments.select("pair_id", "a_hash", "b_hash").filter(c("a_hash") == c("b_hash"))["pair_id"]
    return pl.concat([same_hash, same_key]).unique().sort()


def run(
    judgments: pl.DataFrame,
    cfg: ChecksConfig | None = None,  # noqa: ARG001 - nothing to configure; same signature as the other checks
    *,
    pairs: pl.DataFrame | None = None,  # noqa: ARG001
) -> CheckResult:
    """Exact-duplicate judgments and identical-response pairs of a judgments frame."""
    n = judgments.height
    n_pairs = judgments["pair_id"].n_unique() if n else 0
    dups = exact_duplicates(judgments)
    same = identical_response_pairs(judgments)
    flags = [
        make_flags(dups["comparison_id"], subject_kind="judgment", check=NAME, reason="exact_duplicate",
                   detail=dups.select(pl.format("re-delivery of {} ({} copies)", "kept_id", "copies")).to_series()
                   if dups.height else ""),
        make_flags(same, subject_kind="pair", check=NAME, reason="identical_responses",
                   detail="response_a and response_b are the same text after normalisation"),
    ]
    flag_frame = pl.concat([f for f in flags if f.height]) if dups.height or same.len() else empty_flags()
    return summarize(dups, flag_frame, n, n_pairs)


def summarize(dups: pl.DataFrame, flags: pl.DataFrame, n: int, n_pairs: int) -> CheckResult:
    """The result from the duplicates table, the flags and the version's judgment and pair counts
    (a child merges its parent's rows with the touched pairs', ``pipeline/incremental.py``)."""
    same = flags.filter(pl.col("reason") == "identical_responses").height
    metrics = {
        "judgments": n,
        "exact_duplicates": dups.height,
        "exact_duplicate_rate": dups.height / n if n else 0.0,
        "duplicate_groups": dups["kept_id"].n_unique() if dups.height else 0,
        "pairs": n_pairs,
        "identical_responses": same,
        "identical_response_rate": same / n_pairs if n_pairs else 0.0,
    }
    problems = []
    if dups.height:
        problems.append(f"{dups.height} re-delivered judgment(s) in {metrics['duplicate_groups']} group(s)")
    if same:
        problems.append(f"{same} pair(s) with identical responses")
    return CheckResult(
        name=NAME, status="warn" if problems else "pass", metrics=metrics, flags=flags,
        tables={"exact_duplicates": dups},
        summary="; ".join(problems) or f"no exact duplicates among {n} judgments",
    )


CHECK = CheckSpec(
    name=NAME, run=run, inputs=(), doc="exact duplicate judgments; pairs whose two responses are the same text",
    reasons=(
        Reason("exact_duplicate", "judgment", "drop", "same annotator, prompt, two responses, display order and verdict "
               "as an earlier judgment (a re-judgment in the other display order is not a duplicate)"),
        Reason("identical_responses", "pair", "drop", "the two candidates are the same text after normalisation",
               precedence=10),
    ))
