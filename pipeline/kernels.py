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

__all__ = ["WORD_PRIME", "band_keys", "blake2b64", "code_points", "content_hashes", "lower_table", "profile_texts", "token_hashes", "minhash"]

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
def band_keys(sigs: np.ndarray, b: int, r: int, k: np.uint64, m0: np.uint64, m1: np.uint64, out: np.ndarray
              ) -> None:  # pragma: no cover - compiled
    """``out[band, i]``: the LSH key of row ``i``'s band ``band`` -- its ``r`` signature values chained
    ``acc = acc * k + v`` (mod 2^64), then MurmurHash3's ``fmix64`` (multipliers ``m0``, ``m1``)."""
    s33 = np.uint64(33)
    for i in range(sigs.shape[0]):
        row = sigs[i]
        for band in range(b):
            base = band * r
            acc = np.uint64(row[base])
            for j in range(1, r):
                acc = acc * k + np.uint64(row[base + j])
            acc ^= acc >> s33
            acc *= m0
            acc ^= acc >> s33
            acc *= m1
            acc ^= acc >> s33
            out[band, i] = acc


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


# ---------------------------------------------------------------- blake2b (RFC 7693), digest size 8
# ``content_hash`` (schemas/text.py) is hashlib's blake2b-64 of a text's UTF-8 bytes; the kernel gives the same
# digests from an Arrow array's buffers without a Python bytes object a value, and without the GIL
_B2_IV = np.array([0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
                   0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179], np.uint64)
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8).copy()


_B2_SIGMA = np.array([  # RFC 7693's message schedule; rounds 10 and 11 repeat rounds 0 and 1
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4], [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13], [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11], [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5], [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3]],
    np.int64)


@njit(nogil=True)
def _rotr(x: np.uint64, n: int) -> np.uint64:  # pragma: no cover - compiled
    return (x >> np.uint64(n)) | (x << np.uint64(64 - n))


@njit(nogil=True)
def _g(a, b, c, d, x, y):  # pragma: no cover - compiled
    """RFC 7693's mixing function G."""
    a = a + b + x
    d = _rotr(d ^ a, 32)
    c = c + d
    b = _rotr(b ^ c, 24)
    a = a + b + y
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 63)
    return a, b, c, d


@njit(nogil=True)
def _compress(h: np.ndarray, m: np.ndarray, t: np.uint64, last: bool) -> None:  # pragma: no cover - compiled
    """RFC 7693's F on the state ``h`` and the 16 words ``m``, ``t`` bytes in (< 2^64).  (The rounds written
    out ran ~25 % faster but took numba ~6 s to compile in every process, ``inline="always"`` ~30 s.)"""
    v0, v1, v2, v3, v4, v5, v6, v7 = h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]
    v8, v9, v10, v11 = _B2_IV[0], _B2_IV[1], _B2_IV[2], _B2_IV[3]
    v12, v13, v14, v15 = _B2_IV[4] ^ t, _B2_IV[5], _B2_IV[6], _B2_IV[7]
    if last:
        v14 = ~v14
    for r in range(12):
        s = _B2_SIGMA[r]
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m[s[0]], m[s[1]])
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m[s[2]], m[s[3]])
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m[s[4]], m[s[5]])
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m[s[6]], m[s[7]])
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m[s[8]], m[s[9]])
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m[s[10]], m[s[11]])
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m[s[12]], m[s[13]])
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m[s[14]], m[s[15]])
    h[0] ^= v0 ^ v8
    h[1] ^= v1 ^ v9
    h[2] ^= v2 ^ v10
    h[3] ^= v3 ^ v11
    h[4] ^= v4 ^ v12
    h[5] ^= v5 ^ v13
    h[6] ^= v6 ^ v14
    h[7] ^= v7 ^ v15


@njit(nogil=True)
def _load(data: np.ndarray, p: int, end: int, m: np.ndarray) -> None:  # pragma: no cover - compiled
    """The 16 little-endian words of the block at ``data[p:]``, zero past ``end`` (RFC 7693's padding).
    (Slice copies into a byte view of ``m`` took numba twice as long to compile.)"""
    for w in range(16):
        x = np.uint64(0)
        q = p + 8 * w
        for k in range(8):
            if q + k < end:
                x |= np.uint64(data[q + k]) << np.uint64(8 * k)
        m[w] = x


@njit(nogil=True)
def _blake2b64(data: np.ndarray, offs: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[i]``: blake2b (digest size 8, no key) of ``data[offs[i]:offs[i + 1]]``, its 8 digest bytes read
    as a little-endian number."""
    h = np.empty(8, np.uint64)
    m = np.empty(16, np.uint64)
    for i in range(offs.size - 1):
        for k in range(8):
            h[k] = _B2_IV[k]
        h[0] ^= np.uint64(0x01010008)  # parameter block: digest length 8, no key, fanout 1, depth 1
        start, p, end = np.int64(offs[i]), np.int64(offs[i]), np.int64(offs[i + 1])
        while end - p > 128:
            _load(data, p, end, m)
            _compress(h, m, np.uint64(p + 128 - start), False)
            p += 128
        _load(data, p, end, m)
        _compress(h, m, np.uint64(end - start), True)
        out[i] = h[0]


@njit(nogil=True)
def _hex64(x: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[16 i:16 i + 16]``: the lower-case hex of ``x[i]``'s 8 little-endian bytes (``hexdigest``)."""
    for i in range(x.size):
        w = x[i]
        for k in range(8):
            b = (w >> np.uint64(8 * k)) & np.uint64(0xFF)
            out[16 * i + 2 * k] = _HEX[b >> np.uint64(4)]
            out[16 * i + 2 * k + 1] = _HEX[b & np.uint64(0xF)]


def _combined(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def blake2b64(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """blake2b-64 of every value's UTF-8 bytes (a missing value: of no bytes) as uint64 numbers, the digest
    bytes read little-endian (``int.from_bytes(digest, "little")``)."""
    arr = _combined(values)
    arr = pc.fill_null(arr, "") if arr.null_count else arr
    data, offs = _utf8(arr.cast(pa.large_string()))
    out = np.empty(len(arr), np.uint64)
    _blake2b64(data, offs, out)
    return out


def content_hashes(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``schemas.text.content_hash`` of every value (its blake2b-64 ``hexdigest``) as an Arrow large
    string array; a missing value stays missing."""
    arr = _combined(values)
    digests = blake2b64(arr)
    hexes = np.empty(16 * digests.size, np.uint8)
    _hex64(digests, hexes)
    offs = np.arange(0, 16 * digests.size + 1, 16, dtype=np.int64)
    validity = pc.is_valid(arr).buffers()[1] if arr.null_count else None
    return pa.Array.from_buffers(pa.large_string(), len(arr), [validity, pa.py_buffer(offs), pa.py_buffer(hexes)],
                                 null_count=arr.null_count)
