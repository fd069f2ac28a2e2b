"""Language / locale: ``language_mismatch`` when a pair's text contradicts its ``locale``.

Texts checked per pair with a locale: the last user turn of the prompt and both responses.
Each distinct text is classified once, in three tiers, cheapest first:

1. **Script** (vectorised Polars regex counts on the text with code blocks, inline code and
   URLs removed, first ``max_chars`` characters): kana (+Han) -> ``ja``; Hangul -> ``ko``;
   Han without kana -> ``zh``; Cyrillic -> ``ru`` family; mostly Latin -> tier 2.  Fewer than
   ``min_chars`` script letters -> ``und`` (no evidence, never a flag): short answers, code,
   numbers.  Japanese always mixes Han and kana, so Han+kana is Japanese, not a mismatch.
2. **English function words** (vectorised): a Latin text whose words are >= 20 % English
   function words ("the", "and", "is", ...) is English.  Real English prose is 35-50 %.
3. **langdetect** (seeded: ``DetectorFactory.seed = cfg.seed``, deterministic) only for the
   remaining Latin texts with >= 8 words; a result counts only at probability >=
   ``min_probability``, else ``und``.  At most ``max_langdetect`` texts per run are sent
   (~3 ms each); any beyond are reported as ``undetermined`` in the metrics (never flagged).

A text contradicts the locale when its language is known (not ``und``) and differs from the
locale's primary subtag (``ja-JP`` -> ``ja``, ``zh-CN``/``zh-TW`` -> ``zh``; langdetect's
``zh-cn``/``zh-tw`` -> ``zh``).  Latin-script languages are told apart only by tiers 2-3, so
an ``en`` locale is never flagged on script alone for another Latin-script language.
"""
from __future__ import annotations

from typing import Any

import polars as pl

from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import ChecksConfig, LanguageConfig

NAME = "language"
EN_FUNCTION_WORDS = [
    "the", "a", "an", "and", "or", "but", "of", "to", "in", "on", "at", "by", "for", "with", "from", "as", "is", "are",
    "was", "were", "be", "been", "it", "its", "this", "that", "these", "those", "you", "your", "i", "my", "me", "we",
    "our", "they", "their", "he", "she", "his", "her", "not", "no", "do", "does", "did", "have", "has", "had", "can",
    "could", "will", "would", "should", "if", "so", "what", "how", "why", "when", "which", "who", "there", "here",
    "about", "some", "any", "all", "more", "also", "just", "than", "then", "into", "out", "up", "one", "like",
]
_KANA = r"[\x{3040}-\x{30ff}\x{31f0}-\x{31ff}\x{ff66}-\x{ff9f}]"
_HAN = r"[\x{4e00}-\x{9fff}\x{3400}-\x{4dbf}\x{f900}-\x{faff}]"
_HANGUL = r"[\x{ac00}-\x{d7af}\x{1100}-\x{11ff}\x{3130}-\x{318f}]"
_LATIN = r"[A-Za-z\x{00c0}-\x{024f}]"
_CYRILLIC = r"[\x{0400}-\x{04ff}]"
_ARABIC = r"[\x{0600}-\x{06ff}]"
_CODE = r"(?s)```.*?```|`[^`\n]*`|https?://\S+|\S+@\S+\.\w+"


def expected_language(locale: str | None) -> str | None:
    if not locale:
        return None
    return locale.replace("_", "-").split("-")[0].lower()


def _script_language(texts: pl.DataFrame, cfg: LanguageConfig) -> pl.DataFrame:
    """Add ``script_lang`` (ja/ko/zh/ru/ar/latin/und) and ``en_share`` to a frame with ``text``."""
    c = pl.col
    t = c("text").str.slice(0, cfg.max_chars).str.replace_all(_CODE, " ")
    df = texts.with_columns(_t=t).with_columns(
        kana=c("_t").str.count_matches(_KANA), han=c("_t").str.count_matches(_HAN),
        hangul=c("_t").str.count_matches(_HANGUL), latin=c("_t").str.count_matches(_LATIN),
        cyr=c("_t").str.count_matches(_CYRILLIC), arabic=c("_t").str.count_matches(_ARABIC),
        words=c("_t").str.to_lowercase().str.extract_all(r"[a-z']+"),
    )
    letters = c("kana") + c("han") + c("hangul") + c("latin") + c("cyr") + c("arabic")
    df = df.with_columns(letters=letters, n_words=c("words").list.len(),
                         en_share=c("words").list.eval(pl.element().is_in(EN_FUNCTION_WORDS)).list.mean().fill_null(0.0))
    cjk = c("kana") + c("han")
    script = (
        pl.when(c("letters") < cfg.min_chars).then(pl.lit("und"))
        .when((c("kana") > 0) & (cjk >= 0.3 * c("letters")) & (c("kana") >= 0.05 * cjk)).then(pl.lit("ja"))
        .when(c("hangul") >= 0.3 * c("letters")).then(pl.lit("ko"))
        .when((c("han") >= 0.3 * c("letters")) & (c("kana") == 0)).then(pl.lit("zh"))
        .when(c("cyr") >= 0.5 * c("letters")).then(pl.lit("ru"))
        .when(c("arabic") >= 0.5 * c("letters")).then(pl.lit("ar"))
        .when(c("latin") >= 0.9 * c("letters")).then(pl.lit("latin"))
        .otherwise(pl.lit("und"))
    )
    return df.with_columns(script_lang=script).drop("_t", "words")


def _langdetect(texts: list[str], cfg: LanguageConfig) -> list[str]:
    from langdetect import DetectorFactory, detect_langs
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = cfg.seed
    out = []
    for text in texts:
        try:
            best = detect_langs(text[: cfg.max_chars])[0]
        except LangDetectException:
            out.append("und")
            continue
        lang = best.lang.split("-")[0]
        out.append(lang if best.prob >= cfg.min_probability else "und")
    return out


def classify_texts(texts: pl.Series, cfg: LanguageConfig, max_langdetect: int = 20_000) -> pl.DataFrame:
    """Distinct texts -> ``text``, ``lang`` (ISO 639-1 or ``und``), ``tier``."""
    df = _script_language(pl.DataFrame({"text": texts.unique().drop_nulls()}), cfg)
    c = pl.col
    df = df.with_columns(
        lang=pl.when(c("script_lang") != "latin").then(c("script_lang"))
        .when((c("en_share") >= 0.2) & (c("n_words") >= 5)).then(pl.lit("en"))
        .otherwise(pl.lit(None, dtype=pl.String)),
        tier=pl.when(c("script_lang") != "latin").then(pl.lit("script"))
        .when((c("en_share") >= 0.2) & (c("n_words") >= 5)).then(pl.lit("function_words"))
        .otherwise(pl.lit("langdetect")),
    )
    todo = df.filter(c("lang").is_null() & (c("n_words") >= 8))
    undetermined = 0
    if todo.height:
        sent = todo.head(max_langdetect)
        undetermined = todo.height - sent.height
        detected = pl.DataFrame({"text": sent["text"], "_ld": _langdetect(sent["text"].to_list(), cfg)})
        df = df.join(detected, on="text", how="left").with_columns(lang=pl.coalesce("lang", "_ld")).drop("_ld")
    df = df.with_columns(lang=c("lang").fill_null("und"))
    df = df.with_columns(tier=pl.when(c("lang") == "und").then(pl.lit("none")).otherwise(c("tier")))
    return df.select("text", "lang", "tier", "letters").with_columns(pl.lit(undetermined).alias("_undetermined"))


def run(
    judgments: pl.DataFrame,
    cfg: LanguageConfig | ChecksConfig | None = None,
    *,
    pairs: pl.DataFrame | None = None,  # noqa: ARG001 - same signature as the other checks
    max_langdetect: int = 20_000,
) -> CheckResult:
    cfg = cfg.language if isinstance(cfg, ChecksConfig) else (cfg or LanguageConfig())
    if not cfg.enabled or judgments.height == 0:
        return CheckResult(name=NAME, status="pass", metrics={"enabled": cfg.enabled, "pairs_checked": 0}, summary="not run")
    c = pl.col
    per_pair = judgments.filter(c("locale").is_not_null()).group_by("pair_id").agg(
        c("locale").first(), c("prompt").first(), c("response_a").first(), c("response_b").first())
    if per_pair.height == 0:
        return CheckResult(name=NAME, status="pass", metrics={"pairs_checked": 0}, summary="no pair has a locale")
    last_user = c("prompt").list.eval(pl.element().filter(pl.element().struct.field("role") == "user")).list.last()
    per_pair = per_pair.with_columns(prompt_last=last_user.struct.field("content"),
                                     expected=c("locale").map_elements(expected_language, return_dtype=pl.String))
    long = pl.concat([per_pair.select("pair_id", "locale", "expected", text=c(col), part=pl.lit(name))
                      for col, name in (("prompt_last", "prompt"), ("response_a", "response_a"), ("response_b", "response_b"))])
    langs = classify_texts(long["text"], cfg, max_langdetect)
    undetermined = int(langs["_undetermined"][0]) if langs.height else 0
    long = long.join(langs.drop("_undetermined"), on="text", how="left")
    mism = long.filter((c("lang") != "und") & (c("lang") != c("expected")))
    by_pair = mism.group_by("pair_id").agg(
        pl.format("{} is {} (locale {}; by {})", "part", "lang", "locale", "tier").str.join("; ").alias("detail")).sort("pair_id")
    flags = make_flags(by_pair["pair_id"], subject_kind="pair", check=NAME, reason="language_mismatch",
                       detail=by_pair["detail"]) if by_pair.height else empty_flags()
    matrix: dict[str, dict[str, int]] = {}
    for loc, lang, n in long.group_by("locale", "lang").len().sort("locale", "lang").iter_rows():
        matrix.setdefault(loc, {})[lang] = int(n)
    tiers = dict(long.group_by("tier").len().sort("tier").iter_rows())
    metrics: dict[str, Any] = {
        "pairs_checked": per_pair.height,
        "texts_checked": long.height,
        "distinct_texts": langs.height,
        "mismatched_pairs": by_pair.height,
        "mismatch_rate": by_pair.height / per_pair.height,
        "matrix": matrix,
        "decided_by": tiers,
        "undetermined_over_langdetect_cap": undetermined,
    }
    summary = f"{by_pair.height} of {per_pair.height} pairs contradict their locale"
    status = "warn" if by_pair.height or undetermined else "pass"
    return CheckResult(name=NAME, status=status, metrics=metrics, flags=flags, summary=summary)
