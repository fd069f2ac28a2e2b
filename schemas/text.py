"""Text normalisation and content hashing: defined once, used everywhere.

Two levels of normalisation:

* ``normalize_text`` is applied to every stored text (prompt turns, responses).
  It is conservative so that code and formatting survive: Unicode NFC, CRLF/CR -> LF,
  and leading/trailing whitespace stripped.  Internal whitespace is kept.
* ``dedup_key`` is what duplicate detection compares: ``normalize_text`` plus
  case-folding and every run of whitespace collapsed to one space.  Two texts with the
  same ``dedup_key`` are "the same text" for ``identical_responses`` and
  ``exact_duplicate``.

Each function has a Polars-expression twin (``*_expr``) for the vectorised hot path;
tests assert that both give identical results on arbitrary Unicode.

Hashes are BLAKE2b (8-byte digest, hex): stable across runs, processes, machines and
library versions (unlike Python's ``hash`` or Polars' ``Expr.hash``).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence

import polars as pl

# One definition of whitespace for both twins (Python's str.isspace set; Rust's differs on \x1c-\x1f)
WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
_WS_CLASS = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in WHITESPACE) + "]"
_WS_RUN = re.compile("[" + re.escape(WHITESPACE) + "]+")
_NEWLINES = re.compile(r"\r\n?")
HASH_HEX_LEN = 16


def normalize_text(text: str) -> str:
    """NFC, CRLF/CR -> LF, strip surrounding whitespace."""
    return unicodedata.normalize("NFC", _NEWLINES.sub("\n", text)).strip(WHITESPACE)


def dedup_key(text: str) -> str:
    """``normalize_text`` + casefold + whitespace runs collapsed to one space."""
    return _WS_RUN.sub(" ", normalize_text(text).casefold()).strip(WHITESPACE)


def _nfc_non_ascii(s: pl.Series) -> pl.Series:
    """NFC only where needed: ASCII text is already NFC, and Polars' NFC pass is slow (~50 MB/s)."""
    mask = s.str.contains(r"[^\x00-\x7F]").fill_null(False)
    if not mask.any():
        return s
    idx = mask.arg_true()
    return s.scatter(idx, s.gather(idx).str.normalize("NFC"))


def normalize_text_expr(expr: pl.Expr) -> pl.Expr:
    """Polars twin of :func:`normalize_text`."""
    nfc = expr.str.replace_all(r"\r\n?", "\n").map_batches(_nfc_non_ascii, return_dtype=pl.String, is_elementwise=True)
    return nfc.str.strip_chars(WHITESPACE)


def dedup_key_expr(expr: pl.Expr) -> pl.Expr:
    """Polars twin of :func:`dedup_key` (input need not be normalised yet).

    Case folding: Polars' ``to_lowercase`` is not full Unicode case folding (e.g. German
    sharp s, final sigma), so it is completed with the few multi-char folds that matter.
    """
    lowered = normalize_text_expr(expr).str.to_lowercase()
    folded = lowered.str.replace_all("ß", "ss", literal=True).str.replace_all("ς", "σ", literal=True)
    return folded.str.replace_all(_WS_CLASS + "+", " ").str.strip_chars(WHITESPACE)


def content_hash(text: str) -> str:
    """Stable 64-bit hex digest of a string."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=HASH_HEX_LEN // 2).hexdigest()


def hash_many(texts: Iterable[str]) -> list[str]:
    """``content_hash`` over many texts (one call per unique text is the caller's job)."""
    b2 = hashlib.blake2b
    n = HASH_HEX_LEN // 2
    return [b2(t.encode("utf-8"), digest_size=n).hexdigest() for t in texts]


def hash_series(series: pl.Series) -> pl.Series:
    """Hash each distinct value of a string Series once and map the digests back."""
    uniq = series.unique(maintain_order=False).drop_nulls()
    lut = pl.DataFrame({"_k": uniq, "_h": hash_many(uniq.to_list())})
    out = pl.DataFrame({"_k": series}).join(lut, on="_k", how="left", maintain_order="left")
    return out["_h"].alias(series.name)


def prompt_text(messages: Sequence[dict] | str) -> str:
    """Flatten a prompt (string or list of ``{role, content}``) to one string.

    A single user turn flattens to its content alone, so the same question asked as a
    string or as a one-message conversation gets the same text (and the same pair id).
    Multi-turn prompts become ``role: content`` blocks separated by blank lines.
    """
    if isinstance(messages, str):
        return messages
    if len(messages) == 1 and messages[0].get("role") == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def prompt_text_expr(messages: pl.Expr) -> pl.Expr:
    """Polars twin of :func:`prompt_text` for a ``list[struct{role, content}]`` column."""
    single_user = (messages.list.len() == 1) & (messages.list.first().struct.field("role") == "user")
    joined = messages.list.eval(
        pl.concat_str([pl.element().struct.field("role"), pl.lit(": "), pl.element().struct.field("content")])
    ).list.join("\n\n")
    return pl.when(single_user).then(messages.list.first().struct.field("content")).otherwise(joined)


def derive_pair_id(prompt_hash: str, a_hash: str, b_hash: str) -> str:
    """Content-derived pair id, identical for (a, b) and (b, a)."""
    lo, hi = sorted((a_hash, b_hash))
    return "p-" + content_hash(f"{prompt_hash}|{lo}|{hi}")


def derive_pair_id_expr(prompt_hash: pl.Expr, a_hash: pl.Expr, b_hash: pl.Expr) -> pl.Expr:
    """Vectorised :func:`derive_pair_id` (hashes each distinct key once)."""
    lo = pl.min_horizontal(a_hash, b_hash)
    hi = pl.max_horizontal(a_hash, b_hash)
    key = pl.concat_str([prompt_hash, lo, hi], separator="|")
    return pl.lit("p-") + key.map_batches(hash_series, return_dtype=pl.String)
