"""The compiled loops (``pipeline/kernels.py``) against the NumPy and Python forms they replace,
bit for bit (the language profile and the near-duplicate tokens have their own tests against
per-text readings: tests/test_check_language.py, tests/test_check_near_duplicates.py)."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline import kernels


def test_code_points_are_the_cut_lower_cased_texts():
    texts = ["", None, "ABC déF", "İstanbul", "İİ", "日本語", "𠀀😀x", "Σ ΣΑΣ", "x" * 50, "\x00nul", "İΣ", "ΣİΣİ ΑΣ", "ab" * 30 + "Σ"]
    for head in (1, 3, 40):
        cps, offs = kernels.code_points(pl.Series(texts, dtype=pl.String), head)
        got = [cps[offs[i]:offs[i + 1]].tolist() for i in range(len(texts))]
        assert got == [[ord(c) for c in (t or "")[:head].lower()] for t in texts], head


@pytest.mark.parametrize("seed", [0, 1])
def test_the_em_sums_equal_np_bincount_of_the_same_values(seed):
    """Each EM sum, in judgment order, equals ``np.bincount`` over the per-judgment values as the
    NumPy code formed them (products first, then the sum): the same bits, not just close."""
    rng = np.random.default_rng(seed)
    n, n_pairs, n_judges = 20_000, 3_000, 17
    pair, judge = rng.integers(0, n_pairs, n), rng.integers(0, n_judges, n)
    q, w, v = rng.random(n_pairs), rng.random(n) * 3, np.where(rng.random(n) < 0.5, 1.0, -1.0)
    shown_a = rng.choice([-1, 0, 1], n)
    chose_a = rng.random(n) < 0.6
    known, shown_first = shown_a >= 0, shown_a == 1
    first = known & (chose_a == shown_first)
    known_second = known & ~first

    sums = np.zeros((4, n_judges))
    kernels.order_aware_msums(q, pair, judge, w, shown_first, chose_a, known, first, known_second, sums)
    pbf = np.where(shown_first, q[pair], 1.0 - q[pair])
    half_right = 0.5 * np.where(chose_a, q[pair], 1.0 - q[pair])
    want = [np.where(known, pbf, 0.5), np.where(known, pbf * first, half_right),
            np.where(known, 1.0 - pbf, 0.5), np.where(known, (1.0 - pbf) * known_second, half_right)]
    for got, values in zip(sums, want, strict=True):
        assert np.array_equal(got, np.bincount(judge, weights=w * values, minlength=n_judges))

    table, codes = rng.normal(size=3 * n_judges), judge * 3 + rng.integers(0, 3, n)
    ev = np.zeros(n_pairs)
    kernels.evidence_sums(table, codes, v, w, pair, ev)
    assert np.array_equal(ev, np.bincount(pair, weights=w * (v * table[codes]), minlength=n_pairs))
    ev = np.zeros(n_pairs)
    kernels.gathered_sums(table, codes, w, pair, ev)
    assert np.array_equal(ev, np.bincount(pair, weights=w * table[codes], minlength=n_pairs))
    right = np.zeros(n_judges)
    kernels.right_sums(q, pair, v > 0, judge, right)
    assert np.array_equal(right, np.bincount(judge, weights=np.where(v > 0, q[pair], 1.0 - q[pair]), minlength=n_judges))


def test_blake2b64_is_hashlibs_digest_across_block_boundaries():
    """The compiled blake2b (RFC 7693, digest size 8) gives hashlib's digests: empty values, values ending on,
    before and after 128-byte block boundaries, multi-byte UTF-8, missing values, sliced and chunked arrays."""
    import hashlib
    import random

    import pyarrow as pa

    rng = random.Random(7)
    alphabet = ["a", "Z", " ", "é", "日", "😀", "\x00"]
    values = [None, ""] + ["x" * n for n in (1, 63, 64, 127, 128, 129, 255, 256, 257, 1000)]
    values += [None if rng.random() < 0.05 else "".join(rng.choice(alphabet) for _ in range(rng.randrange(400)))
               for _ in range(2000)]
    ref = [None if v is None else hashlib.blake2b(v.encode(), digest_size=8).digest() for v in values]
    for arr in (pa.array(values, pa.string()), pa.array(values, pa.large_string()), pa.array(values).slice(5, 900),
                pa.chunked_array([values[:37], values[37:]])):
        want = [None if v is None else hashlib.blake2b(v.encode(), digest_size=8).hexdigest() for v in arr.to_pylist()]
        assert kernels.content_hashes(arr).to_pylist() == want
    nums = kernels.blake2b64(pa.array(values))
    assert nums.tolist() == [int.from_bytes(d if d is not None else hashlib.blake2b(b"", digest_size=8).digest(), "little")
                             for d in ref]


def test_band_keys_equal_the_numpy_chain_and_fmix64():
    """The LSH band keys (``near_duplicates._band_keys``) equal the NumPy form they replaced: per band the r values
    chained ``acc * K + v`` mod 2^64, then fmix64."""
    from pipeline.checks import near_duplicates as nd

    rng = np.random.default_rng(5)
    sigs = rng.integers(0, 2**32, (1000, 128), dtype=np.uint64).astype(np.uint32)
    for b, r in ((16, 8), (20, 5), (1, 1)):
        v = sigs[:, :b * r].reshape(-1, b, r)
        acc = v[:, :, 0].astype(np.uint64)
        for j in range(1, r):
            acc = acc * nd._K[1] + v[:, :, j]
        assert np.array_equal(nd._band_keys(sigs, b, r), nd._fmix64(acc).T)
    assert nd._band_keys(sigs[:0], 16, 8).shape == (16, 0)
