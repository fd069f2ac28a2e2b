"""Compiled loops for the per-character and per-shingle hot spots (numba).

Importing this module imports numba (~0.2 s); the callers import it inside the functions that
need it, so a process that never runs a kernel does not pay for it.  Each kernel is compiled the
first time a process calls it (~1 s each); ``nogil``: threads that call kernels run in parallel.
No on-disk cache: numba's is pickled and holds machine code, and nothing prefpipe reads is executed.

Texts reach the kernels as the code points of ``text[:head].lower()`` (:func:`code_points`: the
UTF-8 bytes of an Arrow string array decoded and lower-cased as ``str.lower`` does, in one
compiled pass, without a Python string per text).  The kernels'
outputs are tested against the per-text Python readings they replace
(``tests/test_check_language.py``, ``tests/test_near_duplicates.py``).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

__all__ = ["WORD_PRIME", "code_points", "lower_table", "profile_texts", "token_hashes", "minhash"]

_M32 = np.uint64(0xFFFFFFFF)
WORD_PRIME = 0x9E3779B1  # the word hashes' P: sum of c_k P^k mod 2^32 (k = offset in the word); odd
_PRIME = np.uint64(WORD_PRIME)


@lru_cache(maxsize=1)
def lower_table() -> np.ndarray:
    """``str.lower`` of every code point below the last one it changes, where the lower case is
    one code point -- every one but U+0130, whose lower case is two (the reader handles it)."""
    t = np.arange(0x1E944, dtype=np.uint32)
    for c in range(t.size):
        low = chr(c).lower()
        if len(low) == 1 and low != chr(c):
            t[c] = ord(low)
    return t


@njit(nogil=True)
def _decode(data: np.ndarray, offs: np.ndarray, limits: np.ndarray, lower: np.ndarray, cps: np.ndarray,
            cp_offs: np.ndarray, sigma: np.ndarray) -> None:  # pragma: no cover - compiled
    """The lower-cased code points of the first ``limits[i]`` characters of every text ``i`` (``cps``;
    text ``i``'s are ``cps[cp_offs[i]:cp_offs[i + 1]]``); ``sigma[i]``: a capital sigma among them."""
    o = 0
    for i in range(offs.size - 1):
        cp_offs[i] = o
        p, end, taken, limit = np.int64(offs[i]), np.int64(offs[i + 1]), 0, limits[i]
        while p < end and taken < limit:
            b = np.int64(data[p])
            if b < 0x80:
                cp = b
                p += 1
            elif b < 0xE0:
                cp = ((b & 0x1F) << 6) | (np.int64(data[p + 1]) & 0x3F)
                p += 2
            elif b < 0xF0:
                cp = ((b & 0x0F) << 12) | ((np.int64(data[p + 1]) & 0x3F) << 6) | (np.int64(data[p + 2]) & 0x3F)
                p += 3
            else:
                cp = ((b & 0x07) << 18) | ((np.int64(data[p + 1]) & 0x3F) << 12) \
                    | ((np.int64(data[p + 2]) & 0x3F) << 6) | (np.int64(data[p + 3]) & 0x3F)
                p += 4
            taken += 1
            if cp == 0x3A3:
                sigma[i] = True
            if cp == 0x130:  # two bytes, two code points
                cps[o] = 0x69
                o += 1
                cp = 0x307
            elif cp < lower.size:
                cp = np.int64(lower[cp])
            cps[o] = cp
            o += 1
    cp_offs[offs.size - 1] = o


def _utf8(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    n = len(arr)
    offs = np.frombuffer(arr.buffers()[1], np.int64, n + 1, arr.offset * 8)
    raw = arr.buffers()[2]
    return (np.frombuffer(raw, np.uint8) if raw is not None else np.zeros(1, np.uint8)), offs


def code_points(texts: pl.Series, head: int) -> tuple[np.ndarray, np.ndarray]:
    """``text[:head].lower()`` of every text (a missing one is empty) as one uint32 array of code
    points and int64 offsets (text ``i``: ``cps[offs[i]:offs[i + 1]]``) -- the texts' Arrow bytes
    decoded, cut and lower-cased in one compiled pass, no Python string per text and no Polars
    call (from several threads those queue on Polars' pool).  A text with a capital sigma among
    its first ``head`` characters is lower-cased by ``str.lower`` and decoded again: a sigma's
    lower case depends on its neighbours (Final_Sigma)."""
    arr = texts.to_arrow()
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    arr = pc.fill_null(arr, "") if arr.null_count else arr
    n = len(arr)
    limits = np.full(n, head, np.int64)
    for again in (False, True):
        data, offs = _utf8(arr)
        # (a code point taken is >= 1 byte and gives at most two: U+0130, two bytes)
        room = int(np.minimum(np.diff(offs), 2 * limits).sum())
        cps, cp_offs, sigma = np.empty(room, np.uint32), np.empty(n + 1, np.int64), np.zeros(n, np.bool_)
        _decode(data, offs, limits, lower_table(), cps, cp_offs, sigma)
        if again or not sigma.any():
            break
        at = np.flatnonzero(sigma)
        low = [arr[int(i)].as_py()[:head].lower() for i in at]  # (lower-casing is idempotent)
        arr = pc.replace_with_mask(arr, pa.array(sigma), pa.array(low, arr.type))
        limits[at] = [len(t) for t in low]
    return cps[:cp_offs[-1]], cp_offs


@njit(nogil=True, inline="always")
def _fmix32(h: np.uint32) -> np.uint32:  # pragma: no cover - compiled
    """MurmurHash3's 32-bit finaliser (``near_duplicates._fmix32``)."""
    h = np.uint32(h ^ (h >> np.uint32(16)))
    h = np.uint32((np.uint64(h) * np.uint64(0x85EBCA6B)) & _M32)
    h = np.uint32(h ^ (h >> np.uint32(13)))
    h = np.uint32((np.uint64(h) * np.uint64(0xC2B2AE35)) & _M32)
    return np.uint32(h ^ (h >> np.uint32(16)))


@njit(nogil=True)
def profile_texts(cps: np.ndarray, offs: np.ndarray, scripts: np.ndarray, keys: np.ndarray, masks: np.ndarray,
                  mult: int, shift: int, latin: int, code: int, counts: np.ndarray, wl: np.ndarray, words: np.ndarray
                  ) -> None:  # pragma: no cover - compiled
    """The language check's profile (``language.profile``): per text ``i`` (code points
    ``cps[offs[i]:offs[i + 1]]``), its code points counted by script class (``scripts``) into
    ``counts[i]``; its Latin words (runs of the class ``latin``) into ``words[i]``, and each one
    that is a function word into ``wl[i, lang]`` for every language bit of its mask (a word's
    hash looked up in the collision-free table ``keys``/``masks``: slot = (hash * mult mod 2^32)
    >> shift)."""
    for i in range(offs.size - 1):
        h, pk, inword, n_latin, n_code = np.uint64(0), np.uint64(1), False, 0, 0
        for q in range(offs[i], offs[i + 1] + 1):  # (one past the end: ends the last word)
            cp = np.int64(cps[q]) if q < offs[i + 1] else np.int64(-1)
            c = np.int64(scripts[cp]) if cp >= 0 else np.int64(0)
            if c == latin:
                n_latin += 1
                if not inword:
                    inword, h, pk = True, np.uint64(0), np.uint64(1)
                h = (h + np.uint64(cp) * pk) & _M32
                pk = (pk * _PRIME) & _M32
            else:
                if c == code:
                    n_code += 1
                elif c != 0:
                    counts[i, c] += 1
                if inword:
                    inword = False
                    words[i] += 1
                    slot = ((h * np.uint64(mult)) & _M32) >> np.uint64(shift)
                    if np.uint64(keys[slot]) == h:
                        m, k = np.int64(masks[slot]), 0
                        while m:
                            if m & 1:
                                wl[i, k] += 1
                            m >>= 1
                            k += 1
        counts[i, latin] = n_latin
        counts[i, code] = n_code


@njit(nogil=True)
def token_hashes(cps: np.ndarray, offs: np.ndarray, classes: np.ndarray, keys: np.ndarray, out: np.ndarray,
                 counts: np.ndarray) -> int:  # pragma: no cover - compiled
    """The near-duplicate check's tokens (``near_duplicates._token_hashes``) of the texts
    ``cps[offs[i]:offs[i + 1]]``, in text order into ``out`` (room for two a code point), their
    number per text into ``counts``; returns the total.  A word (a run of class 1) is
    ``fmix32(its hash ^ keys[0])``; a character of class 2 (a script written without spaces)
    ``fmix32(c * keys[1] + keys[2])``, preceded by its bigram with the character before it when
    that is of class 2 too, ``fmix32(c0 * keys[1] + c1 * keys[3] + keys[4])``: the order of the
    tokens' positions in the text."""
    k0, k1, k2, k3, k4 = np.uint64(keys[0]), np.uint64(keys[1]), np.uint64(keys[2]), np.uint64(keys[3]), np.uint64(keys[4])
    o = 0
    for i in range(offs.size - 1):
        h, pk, inword, prev2, start = np.uint64(0), np.uint64(1), False, np.int64(-1), o
        for q in range(offs[i], offs[i + 1] + 1):
            cp = np.int64(cps[q]) if q < offs[i + 1] else np.int64(-1)
            c = np.int64(classes[cp]) if cp >= 0 else np.int64(0)
            if c == 1:
                if not inword:
                    inword, h, pk = True, np.uint64(0), np.uint64(1)
                h = (h + np.uint64(cp) * pk) & _M32
                pk = (pk * _PRIME) & _M32
            elif inword:
                inword = False
                out[o] = _fmix32(np.uint32(h ^ k0))
                o += 1
            if c == 2:
                if prev2 >= 0:
                    out[o] = _fmix32(np.uint32((np.uint64(prev2) * k1 + np.uint64(cp) * k3 + k4) & _M32))
                    o += 1
                out[o] = _fmix32(np.uint32((np.uint64(cp) * k1 + k2) & _M32))
                o += 1
                prev2 = cp
            else:
                prev2 = np.int64(-1)
        counts[i] = o - start
    return o


@njit(nogil=True)
def minhash(hv: np.ndarray, ends: np.ndarray, a: np.ndarray, b: np.ndarray, out: np.ndarray
            ) -> None:  # pragma: no cover - compiled
    """``out[t, k] = min over text t's pre-mixed shingles x of (a[k] x + b[k]) mod 2^32``
    (datasketch's ``affine32`` permutations; text t's shingles end at ``ends[t]``)."""
    s = 0
    for t in range(ends.size):
        row = out[t]
        row[:] = np.uint32(0xFFFFFFFF)
        for j in range(s, ends[t]):
            x = np.uint64(hv[j])
            for k in range(a.size):
                row[k] = min(row[k], np.uint32((np.uint64(a[k]) * x + np.uint64(b[k])) & _M32))
        s = ends[t]


@njit(nogil=True)
def order_aware_msums(qc: np.ndarray, pair: np.ndarray, judge: np.ndarray, mw: np.ndarray, shown_first: np.ndarray,
                      chose_a: np.ndarray, known: np.ndarray, first: np.ndarray, known_second: np.ndarray,
                      out: np.ndarray) -> None:  # pragma: no cover - compiled
    """The order-aware EM's M-step sums per judge (``position_ds.fit``), ``out[:, judge]`` +=
    ``mw`` times: n_a (P(better first) of a judgment with a known order, else 1/2), k_a (P(better
    first) if it chose the first-shown response; half P(right) for an unknown order), n_b, k_b (the
    same for better second).  ``qc``: P(a is better) per pair.  One pass, each sum in judgment order
    -- the values and the order of ``np.bincount`` over the per-judgment products, so the same bits."""
    na, ka, nb, kb = out[0], out[1], out[2], out[3]
    for j in range(pair.size):
        x = qc[pair[j]]
        w = mw[j]
        jj = judge[j]
        if known[j]:
            pbf = x if shown_first[j] else 1.0 - x
            om = 1.0 - pbf
            na[jj] += w * pbf
            ka[jj] += w * (pbf * (1.0 if first[j] else 0.0))
            nb[jj] += w * om
            kb[jj] += w * (om * (1.0 if known_second[j] else 0.0))
        else:
            hr = 0.5 * (x if chose_a[j] else 1.0 - x)
            na[jj] += w * 0.5
            ka[jj] += w * hr
            nb[jj] += w * 0.5
            kb[jj] += w * hr


@njit(nogil=True)
def evidence_sums(table: np.ndarray, codes: np.ndarray, v: np.ndarray, wf: np.ndarray, pair: np.ndarray,
                  out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[pair[j]] += wf[j] * (v[j] * table[codes[j]])`` in judgment order (``np.bincount`` of the
    same products: the same bits)."""
    for j in range(pair.size):
        out[pair[j]] += wf[j] * (v[j] * table[codes[j]])


@njit(nogil=True)
def right_sums(q: np.ndarray, pair: np.ndarray, for_a: np.ndarray, ann: np.ndarray, out: np.ndarray
               ) -> None:  # pragma: no cover - compiled
    """The Dawid-Skene M-step (``aggregate.dawid_skene``): ``out[ann[j]] +=`` P(judgment j's vote is
    right) -- ``q`` of its pair for a vote for a, ``1 - q`` else -- in judgment order (the same bits
    as ``np.bincount`` of the gathered values)."""
    for j in range(pair.size):
        x = q[pair[j]]
        out[ann[j]] += x if for_a[j] else 1.0 - x


@njit(nogil=True)
def gathered_sums(table: np.ndarray, codes: np.ndarray, w: np.ndarray, pair: np.ndarray, out: np.ndarray
                  ) -> None:  # pragma: no cover - compiled
    """``out[pair[j]] += w[j] * table[codes[j]]`` in judgment order (the same bits as ``np.bincount``
    of the products)."""
    for j in range(pair.size):
        out[pair[j]] += w[j] * table[codes[j]]
