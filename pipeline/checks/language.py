"""Language vs locale: does the prompt or a response contradict the pair's ``locale``?

Method
------
Each distinct text (the prompt's non-system turns joined, ``response_a``, ``response_b``) of
the pairs that have a ``locale`` is profiled once, on its first ``profile_chars``
characters, in compiled passes over its code points (numba, ``pipeline.kernels``):

1. **Script counts**: letters per script (Latin, Han, kana, Hangul, Cyrillic, Arabic, Greek,
   Hebrew, Thai, Devanagari, other) and code symbols (``{}[]()<>=;_|\\/#$*`~^@&%+``).
2. **Script decision** (no language model needed): a text with at least ``min_cjk_chars``
   CJK characters that are also >= 10 % of its letters is Chinese, Japanese or Korean --
   Japanese when kana are >= 10 % of its Han + kana (Japanese text always mixes Han and
   kana; a few katakana names do not make Chinese Japanese), Korean when Hangul dominates,
   else Chinese, so Chinese with code or English terms stays Chinese.  A text whose letters
   are mostly of another non-Latin script gets that script.
3. **Word decision** for mostly-Latin texts: counts of the frequent function words of
   English, French, German, Spanish, Portuguese, Italian and Dutch among its words.  A
   language is *decided* when it has >= 3 of them, >= 8 % of the words and twice the
   count of the runner-up; *strong* with >= 5, >= 15 % and four times.
4. **langdetect** (seeded: ``DetectorFactory.seed = seed``, deterministic, on the first
   ``max_chars`` characters) only where the word decision is needed and weak: at most
   ``max_langdetect`` texts per run (the most letters first); its top language counts only
   with probability >= ``min_probability``.

Gates against weak evidence (none of these ever flags): fewer than ``min_chars`` letters;
more than ``max_code_share`` code symbols per letter outside the CJK rule (code is not a
language); Latin text with neither a decided word language nor a confident langdetect
answer; a Han-only text under ``min_chars`` characters for a Japanese locale (short
Japanese can be all kanji).

**Mismatch** (``language_mismatch``, subject ``pair``): compared on the locale's primary
subtag (``ja-JP`` -> ja, ``zh-CN``/``zh-TW``/``zh-Hant`` -> zh, langdetect's ``zh-cn`` ->
zh, ``nb``/``nn`` -> no).  A text contradicts locale L when its decided language or script
is not L's: e.g. kana/Han/Hangul text for a Latin-script locale, English words for
``ja-JP``, strong French words for ``en``.  For a Latin-script locale without a word list
(e.g. ``pl``), only a decided *other* word language, a non-Latin script or a confident
langdetect answer contradicts it.  Pairs without locale are not checked.

Metrics: ``matrix`` = locale (primary subtag) x detected language, counting pair texts
(prompt, a, b; ``und`` = no evidence), texts checked, langdetect calls, flags.  Measured on
``/work/shared/data`` (all HH-RLHF en + LLaMA-Factory en/zh rows with their locale): 0
flags; planted mismatches are caught (``docs/checks-text.md``).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import numpy as np
import polars as pl

from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import ChecksConfig, LanguageConfig
from pipeline.checks.spec import CheckSpec, Reason

NAME = "language"
_CHUNK = 8192  # texts profiled per kernel call
_THREADS = 2  # chunks profiled at once
# script classes
OTHER, LATIN, HAN, KANA, HANGUL, CYRILLIC, ARABIC, GREEK, HEBREW, THAI, DEVANAGARI, LETTER, CODE = range(13)
_NCLS = 16
SCRIPT_NAMES = {CYRILLIC: "cyrillic", ARABIC: "arabic", GREEK: "greek", HEBREW: "hebrew", THAI: "thai",
                DEVANAGARI: "devanagari"}
# the script a language is written in (default Latin); languages of the same script are
# told apart by words only where a word list exists
LANG_SCRIPT: dict[str, str] = {
    "ja": "ja", "zh": "zh", "ko": "ko", "ru": "cyrillic", "uk": "cyrillic", "bg": "cyrillic", "sr": "cyrillic",
    "mk": "cyrillic", "be": "cyrillic", "kk": "cyrillic", "mn": "cyrillic", "ar": "arabic", "fa": "arabic",
    "ur": "arabic", "ps": "arabic", "el": "greek", "he": "hebrew", "iw": "hebrew", "yi": "hebrew", "th": "thai",
    "hi": "devanagari", "mr": "devanagari", "ne": "devanagari",
}
_ALIASES = {"zh-cn": "zh", "zh-tw": "zh", "nb": "no", "nn": "no", "iw": "he", "in": "id", "fil": "tl"}
STOPWORDS: dict[str, str] = {
    "en": "the and you your that this with have has for not what how can will would there they their them it its "
          "of to be are was were is i me my we our he she his her him if but or at from which about just like all "
          "do does did don so some any when who why where been being than then also into because could should very "
          "more most only other such these those while",
    "fr": "le la les des est une et pas pour que qui dans sur avec vous nous je il elle ce cette sont mais ou du au "
          "aux ne plus être avoir fait comme tout bien très sans leur leurs mon mes ton ta tes sa ses notre votre "
          "vos ils elles été était peut aussi donc",
    "de": "der die das und ist nicht ich sie es ein eine einen einem einer zu den dem des mit auf für von sich auch "
          "wie wir sind wird oder aber noch nach bei kann wenn dass haben nur werden mehr schon sehr mir mich dir "
          "dich uns ihr ihre diese dieser dieses",
    "es": "el los las que del por para con una uno es está están son muy pero más como este esta estos estas su "
          "sus lo les se ya también hay ser tiene puede sobre sin entre cuando donde porque yo tú usted ella ellos "
          "nosotros",
    "pt": "os as do da dos das em um uma para com não por mais ao aos é são foi você isso isto está estão seu sua "
          "seus suas mas como também pelo pela nos nas muito já ele ela eles elas eu meu minha tem ter",
    "it": "il lo gli della delle dei degli di che per non con sono è del nel nella ma anche questo questa più alla "
          "alle ho hai ha cosa sia essere molto tutto tutti mio mia suo sua loro io tu lui lei noi voi",
    "nl": "de het een en van ik te dat die niet op je met voor zijn maar er ook als dit wat naar kan bij nog wordt "
          "worden heeft hebben geen deze moet meer zo dan hij zij wij jullie mijn jouw onze",
}
WORD_LANGS = tuple(STOPWORDS)
_LANG_NAMES = pl.Series("best_lang", WORD_LANGS, dtype=pl.String)  # (gathered: a NumPy array of str converts ~7x slower)


def primary_subtag(locale: pl.Expr) -> pl.Expr:
    """``ja-JP`` -> ``ja``, ``zh_TW`` -> ``zh``, ``nb-NO`` -> ``no`` (lower case)."""
    p = locale.str.to_lowercase().str.replace("_", "-", literal=True)
    full = p.replace(_ALIASES)
    return full.str.split("-").list.first().replace(_ALIASES)


@lru_cache(maxsize=1)
def _script_table() -> np.ndarray:
    ranges = [
        (HAN, 0x3400, 0x4DBF), (HAN, 0x4E00, 0x9FFF), (HAN, 0xF900, 0xFAFF), (HAN, 0x20000, 0x323AF),
        (KANA, 0x3040, 0x30FF), (KANA, 0x31F0, 0x31FF), (KANA, 0xFF66, 0xFF9F),
        (HANGUL, 0x1100, 0x11FF), (HANGUL, 0x3130, 0x318F), (HANGUL, 0xAC00, 0xD7AF),
        (CYRILLIC, 0x0400, 0x052F), (ARABIC, 0x0600, 0x06FF), (ARABIC, 0x0750, 0x077F), (GREEK, 0x0370, 0x03FF),
        (HEBREW, 0x0590, 0x05FF), (THAI, 0x0E00, 0x0E7F), (DEVANAGARI, 0x0900, 0x097F),
        (LATIN, 0x0041, 0x024F), (LATIN, 0x1E00, 0x1EFF), (LATIN, 0xFF21, 0xFF5A),
    ]
    t = np.zeros(0x110000, np.uint8)
    alpha = np.array([chr(i).isalpha() for i in range(0x323B0)], bool)
    t[:0x323B0][alpha] = LETTER
    for cls, lo, hi in ranges:
        seg = t[lo:hi + 1]
        t[lo:hi + 1] = np.where(seg == LETTER, cls, seg)
    t[[0x3005, 0x3007]] = HAN
    t[0x30FC] = KANA
    t[[ord(c) for c in "{}[]()<>=;_|\\/#$*`~^@&%+"]] = CODE
    return t


@lru_cache(maxsize=1)
def _stopword_table() -> tuple[np.ndarray, np.ndarray, int]:
    """Open-addressing-free hash table of the function words: ``keys[slot]`` is the 32-bit
    word hash stored in that slot (0 = empty) and ``masks[slot]`` a bit mask of the
    languages using the word; ``slot = (hash * _M) >> shift``.  The multiplier is chosen
    so that no two function words share a slot, so a lookup is two gathers (much faster
    than a binary search over tens of millions of words)."""
    masks: dict[int, int] = {}
    for bit, lang in enumerate(WORD_LANGS):
        for w in STOPWORDS[lang].split():
            h = _word_hash_py(w)
            masks[h] = masks.get(h, 0) | (1 << bit)
    bits = 16
    for m in range(1, 1 << 16, 2):  # the first odd multiplier without collisions
        mult = (int(_M) * m) & 0xFFFFFFFF
        slots = {((h * mult) & 0xFFFFFFFF) >> (32 - bits) for h in masks}
        if len(slots) == len(masks) and 0 not in masks:
            break
    else:  # pragma: no cover - 450 words in 65,536 slots
        raise RuntimeError("no collision-free multiplier for the function-word table")
    keys, vals = np.zeros(1 << bits, np.uint32), np.zeros(1 << bits, np.uint32)
    for h, v in masks.items():
        slot = ((h * mult) & 0xFFFFFFFF) >> (32 - bits)
        keys[slot], vals[slot] = h, v
    return keys, vals, mult


_M = np.uint32(0x85EBCA6B)


def _word_hash_py(w: str) -> int:
    from pipeline.kernels import WORD_PRIME

    return sum(ord(c) * pow(WORD_PRIME, k, 1 << 32) for k, c in enumerate(w)) & 0xFFFFFFFF


def profile(texts: list[str] | pl.Series, head: int) -> pl.DataFrame:
    """Per text (its first ``head`` characters, lower-cased): letters per script, code
    symbols, Latin words and function words per language of :data:`STOPWORDS` (``w_<lang>``,
    plus ``best``/``second`` count and ``best_lang``).  Compiled passes over each chunk's
    code points (:mod:`pipeline.kernels`), a chunk at a time: memory stays bounded by the chunk, not
    by all texts."""
    from pipeline import kernels

    scripts = _script_table()
    keys, masks, mult = _stopword_table()
    shift = 32 - int(np.log2(keys.size))
    n_lang = len(WORD_LANGS)
    series = texts if isinstance(texts, pl.Series) else pl.Series(texts, dtype=pl.String)

    def one(s: int) -> pl.DataFrame:
        cps, offs = kernels.code_points(series[s:s + _CHUNK], head)
        n = offs.size - 1
        counts, wl, words = np.zeros((n, _NCLS), np.int64), np.zeros((n, n_lang), np.int64), np.zeros(n, np.int64)
        kernels.profile_texts(cps, offs, scripts, keys, masks, mult, shift, LATIN, CODE, counts, wl, words)
        top2 = np.sort(wl, axis=1)[:, -2:] if n_lang >= 2 else np.column_stack([np.zeros(n, np.int64), wl.max(1)])
        cols: dict[str, Any] = {
            "letters": counts[:, LATIN:LETTER + 1].sum(1), "latin": counts[:, LATIN], "han": counts[:, HAN],
            "kana": counts[:, KANA], "hangul": counts[:, HANGUL], "code": counts[:, CODE],
            "words": words,
            "script_top": np.argmax(counts[:, CYRILLIC:DEVANAGARI + 1], 1) + CYRILLIC,
            "script_top_n": counts[:, CYRILLIC:DEVANAGARI + 1].max(1),
            **{f"w_{x}": wl[:, i] for i, x in enumerate(WORD_LANGS)},
            "best": top2[:, 1], "second": top2[:, 0], "best_lang": _LANG_NAMES.gather(np.argmax(wl, 1)),
        }
        return pl.DataFrame(cols)

    starts = range(0, len(series), _CHUNK)
    if len(starts) < 4:
        parts = [one(s) for s in starts]
    else:  # the kernel releases the GIL: two chunks at a time
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(_THREADS) as pool:
            parts = list(pool.map(one, starts))
    return pl.concat(parts) if parts else pl.DataFrame()


def classify(prof: pl.DataFrame, cfg: LanguageConfig) -> pl.DataFrame:
    """Script and word decisions per profiled text (see the module docstring)."""
    c = pl.col
    cjk = c("han") + c("kana") + c("hangul")
    script_name = c("script_top").replace_strict(SCRIPT_NAMES, return_dtype=pl.String)
    script = (
        pl.when((cjk >= cfg.min_cjk_chars) & (cjk >= 0.1 * c("letters")))
        .then(pl.when((c("kana") >= 3) & (c("kana") >= 0.1 * (c("han") + c("kana")))).then(pl.lit("ja"))
              .when(c("hangul") >= c("han") + c("kana")).then(pl.lit("ko"))
              .otherwise(pl.lit("zh")))
        .when(c("letters") < cfg.min_chars).then(pl.lit("und"))
        .when(c("script_top_n") >= 0.5 * c("letters")).then(script_name)
        .when((c("latin") >= 0.5 * c("letters")) & (c("code") <= cfg.max_code_share * c("letters"))).then(pl.lit("latin"))
        .otherwise(pl.lit("und"))
    )
    out = prof.with_columns(script=script)
    latin = c("script") == "latin"
    decided = latin & (c("best") >= 3) & (c("best") >= 0.08 * c("words")) & (c("best") >= 2 * c("second"))
    strong = latin & (c("best") >= 5) & (c("best") >= 0.15 * c("words")) & (c("best") >= 4 * c("second"))
    return out.with_columns(
        word_lang=pl.when(decided).then(c("best_lang")),
        word_strong=strong,
        zh_strong=(c("script") == "zh") & (c("han") >= cfg.min_chars) & (c("kana") == 0),
    )


def _langdetect(texts: list[str], cfg: LanguageConfig) -> tuple[list[str | None], list[float]]:
    """Seeded langdetect on the first ``max_chars`` characters: (top language, probability)."""
    from langdetect import DetectorFactory, detect_langs
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = cfg.seed
    langs: list[str | None] = []
    probs: list[float] = []
    for text in texts:
        try:
            top = detect_langs(text[: cfg.max_chars])[0]
        except LangDetectException:
            langs.append(None)
            probs.append(0.0)
            continue
        langs.append(_ALIASES.get(top.lang, top.lang))
        probs.append(float(top.prob))
    return langs, probs


def _prompt_text(frame: pl.DataFrame) -> pl.Expr:
    """The prompt's non-system turns joined (``prompt_text`` without a ``prompt`` column)."""
    if "prompt" not in frame.columns:
        return pl.col("prompt_text")
    el = pl.element()
    return pl.col("prompt").list.eval(el.filter(el.struct.field("role") != "system").struct.field("content")).list.join("\n")


def run(
    judgments: pl.DataFrame,
    cfg: LanguageConfig | ChecksConfig | None = None,
    *,
    pairs: pl.DataFrame | None = None,  # noqa: ARG001 - same signature as the other checks
) -> CheckResult:
    """Language of the prompt and responses of every pair with a ``locale`` vs that locale."""
    cfg = cfg.language if isinstance(cfg, ChecksConfig) else (cfg or LanguageConfig())
    c = pl.col
    # narrow first: a filter copies every column it keeps
    cols = [x for x in ("pair_id", "locale", "prompt_hash", "a_hash", "b_hash", "response_a", "response_b", "prompt",
                        "prompt_text") if x in judgments.columns]
    # one row per (pair, locale): its first judgment
    pp = judgments.select(cols).filter(c("locale").is_not_null() & pl.struct("pair_id", "locale").is_first_distinct()) \
        if "locale" in judgments.columns else judgments.clear()
    if not cfg.enabled or pp.height == 0:
        return CheckResult(name=NAME, status="pass", metrics={"enabled": cfg.enabled, "pairs_checked": 0, "matrix": {}},
                           summary="disabled" if not cfg.enabled else "no pair has a locale")
    pp = pp.select("pair_id", "locale", "prompt_hash", "a_hash", "b_hash", "response_a", "response_b",
                   prompt_txt=_prompt_text(pp))
    n_pairs = pp["pair_id"].n_unique()
    long = pl.concat([
        pp.select("pair_id", "locale", part=pl.lit("prompt"), key=pl.lit("p:") + c("prompt_hash"), text=c("prompt_txt")),
        pp.select("pair_id", "locale", part=pl.lit("response_a"), key=pl.lit("r:") + c("a_hash"), text=c("response_a")),
        pp.select("pair_id", "locale", part=pl.lit("response_b"), key=pl.lit("r:") + c("b_hash"), text=c("response_b")),
    ])
    del pp
    texts = long.select("key", "text").filter(c("key").is_first_distinct())
    prof = classify(profile(texts["text"], cfg.profile_chars), cfg).with_columns(key=texts["key"])
    # only what the decisions below read, counts as Int32: this is joined onto 3 rows per pair
    counts = ["letters", "words", "best", *(f"w_{lang}" for lang in WORD_LANGS)]
    prof = prof.select("key", "script", "word_lang", "word_strong", "zh_strong", *(c(x).cast(pl.Int32) for x in counts))
    long = long.drop("text").join(prof, on="key", how="left")

    # per distinct locale (a handful), not per text
    loc = long.select(c("locale").unique()).with_columns(lp=primary_subtag(c("locale")))
    loc = loc.with_columns(exp=c("lp").replace_strict(LANG_SCRIPT, default="latin"), has_list=c("lp").is_in(list(WORD_LANGS)))
    long = long.join(loc, on="locale", how="left", maintain_order="left")
    c_lp = pl.coalesce([pl.when(c("lp") == lang).then(c(f"w_{lang}")) for lang in WORD_LANGS]).fill_null(0)
    long = long.with_columns(c_lp=c_lp)
    consistent = c("has_list") & ((c("word_lang") == c("lp")) | ((c("c_lp") >= 3) & (c("c_lp") >= 0.5 * c("best"))))
    strong_other = c("word_strong") & (c("word_lang") != c("lp"))
    latin_text = (c("script") == "latin") & (c("words") >= cfg.min_words)
    need_ld = latin_text & (
        pl.when(c("exp") == "latin")
        .then(pl.when(c("has_list")).then(~consistent & ~strong_other)
              .otherwise(c("word_lang").is_not_null() & ~c("word_strong")))
        .otherwise(~c("word_strong"))
    ).fill_null(False)
    long = long.with_columns(_need=need_ld, _consistent=consistent.fill_null(False), _strong_other=strong_other.fill_null(False))

    # langdetect: distinct texts that some (text, locale) needs, most letters first, capped
    ask = (long.filter(c("_need")).select("key", "letters").unique("key")
           .sort(["letters", "key"], descending=[True, False]))
    sent = ask.head(cfg.max_langdetect)
    ld_lang, ld_prob = _langdetect(texts.join(sent.select("key"), on="key", how="semi")
                                   .join(sent, on="key").sort(["letters", "key"], descending=[True, False])["text"].to_list(),
                                   cfg) if sent.height else ([], [])
    ld = pl.DataFrame({"key": sent.sort(["letters", "key"], descending=[True, False])["key"],
                       "ld_lang": pl.Series(ld_lang, dtype=pl.String), "ld_prob": pl.Series(ld_prob, dtype=pl.Float64)})
    long = long.join(ld, on="key", how="left")
    # only rows that asked for langdetect use its answer: a text shared by another pair (under another
    # locale) must not change this row's result, so a pair's result depends on its own texts and locale
    ld_ok = c("_need") & c("ld_lang").is_not_null() & (c("ld_prob") >= cfg.min_probability)
    ld_other = ld_ok & (c("ld_lang") != c("lp"))

    s = c("script")
    cjk_script = s.is_in(["ja", "zh", "ko"])
    mismatch = (
        pl.when(s == "und").then(False)
        .when((s == c("exp")) & (s != "latin")).then(False)  # same non-Latin script; Latin goes on to the words
        .when(c("exp").is_in(["ja", "zh", "ko"]) & cjk_script)
        .then(pl.when((c("exp") == "ja") & (s == "zh")).then(c("zh_strong")).otherwise(True))
        .when(s == "latin")
        # Latin text under a non-Latin locale: only strong function-word evidence (langdetect reads
        # code and SQL as English; measured in docs/checks-text.md)
        .then(pl.when(c("exp") != "latin").then(c("word_strong"))
              .when(c("has_list")).then(~c("_consistent") & (c("_strong_other") | (ld_other & (c("word_lang").is_null() | (c("word_lang") != c("lp"))))))
              .otherwise(c("word_strong") | (c("word_lang").is_not_null() & ld_other)))
        .otherwise(c("exp") != s)  # another script than the locale's
    ).fill_null(False)
    detected = (
        pl.when(s == "latin")
        .then(pl.coalesce(c("word_lang"), pl.when(ld_ok).then(c("ld_lang")), pl.lit("und")))
        .otherwise(s)
    )
    by = (pl.when(s.is_in(["latin", "und"]).not_()).then(pl.lit("script"))
          .when(c("word_lang").is_not_null()).then(pl.lit("words"))
          .when(ld_ok).then(pl.lit("langdetect")).otherwise(pl.lit("none")))
    long = long.with_columns(mismatch=mismatch, detected=detected, by=by)

    bad = long.filter(c("mismatch")).sort("pair_id", "part")
    by_pair = bad.group_by("pair_id", maintain_order=True).agg(
        pl.format("{} is {} (locale {}; by {})", "part", "detected", "locale", "by").str.join("; ").alias("detail"))
    flags = make_flags(by_pair["pair_id"], subject_kind="pair", check=NAME, reason="language_mismatch",
                       detail=by_pair["detail"]) if by_pair.height else empty_flags()
    texts_table = long.select("pair_id", "locale", "part", "detected", "by").sort("pair_id", "locale", "part")
    counters = {"distinct_texts": texts.height, "langdetect_calls": sent.height,
                "langdetect_skipped": ask.height - sent.height}
    return summarize(texts_table, flags, counters)


def summarize(texts_table: pl.DataFrame, flags: pl.DataFrame, counters: dict[str, int]) -> CheckResult:
    """The check's result from its per-text table (pair_id, locale, part, detected, by) and flags.

    Everything but ``counters`` (this run's distinct texts and langdetect calls) is a function of
    the per-pair rows, so a child version merges its parent's rows with the touched pairs' and
    gets the same figures as a run over all pairs (``pipeline/incremental.py``)."""
    counts = _counts(texts_table)
    return _result(texts_table["pair_id"].n_unique(), texts_table.height, counts["matrix"], counts["by"], texts_table,
                   flags, counters)


def summarize_delta(parent: dict[str, Any], old: pl.DataFrame, new: pl.DataFrame,
                    merged: Callable[[], pl.DataFrame], flags: pl.DataFrame) -> CheckResult:
    """:func:`summarize` of a child's merged table without reading it: the parent's figures (its
    manifest's metrics) minus the touched pairs' rows as the parent had them (``old``) plus theirs
    now (``new``) -- integer counts, so the same figures as :func:`summarize` of the merged table.
    The result's table is ``new``; a parent without the figures: ``merged()`` is counted, and is the table."""
    if "pairs_checked" not in parent or ("texts_checked" not in parent and parent["pairs_checked"]):
        return summarize(merged(), flags, {})  # a parent without the figures: count the merged table
    texts_table = new
    before, after = _counts(old), _counts(new)
    matrix = {(loc, lang): n for loc, row in (parent.get("matrix") or {}).items() for lang, n in row.items()}
    by = dict(parent.get("decided_by") or {})
    for key, sign in ((before, -1), (after, 1)):
        for k, n in key["matrix"].items():
            matrix[k] = matrix.get(k, 0) + sign * n
        for k, n in key["by"].items():
            by[k] = by.get(k, 0) + sign * n
    n_pairs = int(parent["pairs_checked"]) - old["pair_id"].n_unique() + new["pair_id"].n_unique()
    # (a parent whose pairs had no locale, built in one process, says only pairs_checked 0: no text either)
    n_texts = int(parent.get("texts_checked", 0)) - old.height + new.height
    if min([n_pairs, n_texts, *matrix.values(), *by.values()], default=0) < 0:
        raise ValueError("language: the parent's figures are smaller than the rows taken out of them")
    return _result(n_pairs, n_texts, {k: v for k, v in matrix.items() if v}, {k: v for k, v in by.items() if v},
                   texts_table, flags, {})


TEXTS_SCHEMA = {"pair_id": pl.String, "locale": pl.String, "part": pl.String, "detected": pl.String, "by": pl.String}
TALLY_COLUMNS = ("pair_id", "locale", "detected", "by")  # what :func:`tally` reads
TALLY_SCHEMA = {"locale": pl.String, "detected": pl.String, "by": pl.String, "n": pl.Int64}


def tally(texts_table: pl.DataFrame) -> tuple[int, pl.DataFrame]:
    """What :func:`summarize` reads of the per-text rows, as counts that add over disjoint sets of
    pairs (a partition's): its pairs, and its texts per (locale, detected, by)."""
    counts = texts_table.group_by("locale", "detected", "by").agg(n=pl.len().cast(pl.Int64))
    return texts_table["pair_id"].n_unique(), counts.cast(TALLY_SCHEMA)  # type: ignore[arg-type]


def summarize_parts(parts: Iterable[pl.DataFrame], new: pl.DataFrame, flags: pl.DataFrame) -> CheckResult:
    """:func:`summarize` of the per-text rows of ``parts`` (disjoint sets of pairs, each with
    :data:`TALLY_COLUMNS`) and ``new`` (pairs in none of them), one part at a time: a child's merged
    table without holding it.  The result's table is ``new``."""
    n_pairs, counts = 0, []
    for rows in itertools.chain(parts, [new]):  # (a generator's parts: each released once tallied)
        k, c = tally(rows)
        n_pairs += k
        counts.append(c)
    return summarize_tally(n_pairs, pl.concat(counts), flags, {}, new)


def summarize_tally(n_pairs: int, counts: pl.DataFrame, flags: pl.DataFrame, counters: dict[str, int],
                    texts_table: pl.DataFrame | None = None) -> CheckResult:
    """:func:`summarize` from :func:`tally`'s figures added (and subtracted) over disjoint sets of
    pairs: the same figures, without the per-text rows (``texts_table``: the result's table, when
    the caller holds it; else the empty table)."""
    c = pl.col
    total = counts.group_by("locale", "detected", "by").agg(c("n").sum()).filter(c("n") != 0)
    if (total["n"] < 0).any():
        raise ValueError("language: a tally subtracted more texts than were counted")
    matrix = {(loc, lang): int(n) for loc, lang, n in total.group_by("locale", "detected").agg(c("n").sum()).iter_rows()}
    by = {b: int(n) for b, n in total.group_by("by").agg(c("n").sum()).iter_rows()}
    table = texts_table if texts_table is not None else pl.DataFrame(schema=TEXTS_SCHEMA)
    return _result(n_pairs, int(total["n"].sum()), matrix, by, table, flags, counters)


def _counts(texts_table: pl.DataFrame) -> dict[str, dict]:
    """Texts per (locale, detected language) and per deciding evidence."""
    return {"matrix": {(loc, lang): int(n) for loc, lang, n in texts_table.group_by("locale", "detected").len().iter_rows()},
            "by": {b: int(n) for b, n in texts_table.group_by("by").len().iter_rows()}}


def _result(n_pairs: int, n_texts: int, matrix_counts: dict[tuple[str, str], int], by: dict[str, int],
            texts_table: pl.DataFrame, flags: pl.DataFrame, counters: dict[str, int]) -> CheckResult:
    mismatched = flags["subject_id"].n_unique() if flags.height else 0
    matrix: dict[str, dict[str, int]] = {}
    for (loc, lang), n in sorted(matrix_counts.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        matrix.setdefault(loc, {})[lang] = int(n)
    metrics: dict[str, Any] = {
        "pairs_checked": n_pairs,
        "texts_checked": n_texts,
        "distinct_texts": counters.get("distinct_texts", 0),
        "mismatched_pairs": mismatched,
        "mismatch_rate": mismatched / n_pairs if n_pairs else 0.0,
        "matrix": matrix,
        "decided_by": dict(sorted(by.items(), key=lambda kv: str(kv[0]))),
        "langdetect_calls": counters.get("langdetect_calls", 0),
        "langdetect_skipped": counters.get("langdetect_skipped", 0),
    }
    summary = f"{mismatched} of {n_pairs} pairs contradict their locale"
    if metrics["langdetect_skipped"]:
        summary += f"; {metrics['langdetect_skipped']} weak-evidence texts left undecided (langdetect cap)"
    return CheckResult(name=NAME, status="warn" if mismatched else "pass", metrics=metrics, flags=flags,
                       tables={"texts": texts_table}, summary=summary)


CHECK = CheckSpec(
    name=NAME, run=run, config="language", inputs=(),
    doc="detected language of prompt and responses against the locale",
    reasons=(
        Reason("language_mismatch", "pair", "drop", "detected language of prompt/responses differs from `locale`",
               precedence=30),
    ))
