"""Content hashes and pair ids of whole columns: :func:`schemas.text.content_hash` and
:func:`schemas.text.derive_pair_id` (their per-value reference forms), each distinct value hashed
once, in compiled code (:func:`pipeline.kernels.content_hashes`: the values' Arrow bytes, no Python
object a value, the GIL released -- ingest's threads hash in parallel).  ``tests/test_kernels.py``
holds them to ``hashlib``'s digests."""
from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["content_hashes", "pair_id_expr", "text_hashes"]


def text_hashes(s: pl.Series, *, dedup: bool = False) -> tuple[pl.Series, pl.Series]:
    """(texts, content hashes) of a string Series.  With ``dedup`` the texts come back with every
    repeated value stored once (the judgments of a pair repeat its texts; a block usually
    holds all of them): the distinct values are copied into a compact buffer and the rows
    are views into it, so the block's original text buffers can be freed (about a third of
    the memory for three judgments per pair).  Values are unchanged; a missing value's hash is missing."""
    from pipeline.kernels import content_hashes as hex_digests

    # (Arrow's dictionary encoding: the distinct values in first-seen order, compact, and each row's index into
    # them, in one pass -- a unique and a join on the texts took a quarter more time)
    enc = pc.dictionary_encode(s.to_arrow())
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    values = enc.dictionary.cast(pa.large_string())
    idx = pl.from_arrow(enc.indices)
    digests = pl.Series(s.name, hex_digests(values), dtype=pl.String)
    texts = pl.Series(s.name, values).gather(idx) if dedup else s  # (views into the compact values)
    return texts, digests.gather(idx)


def content_hashes(s: pl.Series) -> pl.Series:
    """``content_hash`` of every value of a string Series (each distinct value hashed once)."""
    return text_hashes(s)[1]


def pair_id_expr(prompt_hash: pl.Expr, a_hash: pl.Expr, b_hash: pl.Expr) -> pl.Expr:
    """:func:`schemas.text.derive_pair_id_expr`, hashed by :func:`content_hashes`: ``p-`` and the
    content hash of ``prompt_hash|min(a_hash, b_hash)|max(a_hash, b_hash)``."""
    key = pl.concat_str([prompt_hash, pl.min_horizontal(a_hash, b_hash), pl.max_horizontal(a_hash, b_hash)], separator="|")
    return pl.lit("p-") + key.map_batches(content_hashes, return_dtype=pl.String)
