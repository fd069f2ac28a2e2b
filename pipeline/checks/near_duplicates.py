"""Near-duplicate prompts: MinHash signatures + LSH banding over word shingles.

Method
------
* **Text**: the prompt's messages (already NFC-normalised by ingest) without system turns
  and role labels -- a system prompt shared by many items would otherwise make them all
  look alike -- cut to its first ``max_chars`` characters, lower-cased (``str.lower``),
  then split into tokens: runs of letters, digits and combining marks are words; in scripts
  written without spaces (Han, kana, Thai, Lao, Khmer, Myanmar) every character and every
  two adjacent characters are tokens (a word of 1-2 characters added to a short Chinese
  prompt then moves Jaccard about as much as one English word does).  Everything else --
  whitespace, punctuation, symbols -- only separates tokens, so case, punctuation and
  whitespace edits change nothing.  A prompt with no token at all (only punctuation or
  emoji) gets one shingle: the hash of its whole text.
* **Shingles**: the set of token n-grams (``shingle_size``, default 1 = the set of
  words); a prompt with fewer tokens than n is one shingle.  Measured on the real
  prompts of ``/work/shared/data`` (``docs/checks-text.md``): adding or dropping one word
  keeps a word set at Jaccard >= 0.8 even for 5-7-word prompts, where char 4-grams or
  word 2/3-grams fall to 0.4-0.6, while unrelated real prompts rarely exceed 0.7.
* **Hashing** (compiled loops over each chunk's code points, :mod:`pipeline.kernels`; stable
  across processes and versions, 32-bit as datasketch's ``affine32`` scheme expects): a word
  is the polynomial hash of its code points mod 2^32, a character or bigram a multiply-add of
  its code points, each mixed with ``fmix32``; n-grams add ``fmix32`` terms of their token
  hashes.
* **MinHash**: datasketch's ``affine32`` scheme reproduced exactly -- ``h' = fmix32(h)``,
  then ``min over shingles of (a_k h' + b_k) mod 2^32`` for the ``num_perm``
  permutations ``(a_k, b_k)`` that ``datasketch.MinHash(num_perm, seed)`` draws -- so a
  signature equals ``MinHash(hashfunc=identity).update_batch(shingle_hashes)`` bit for
  bit (tested), at a small fraction of the cost: shingles are hashed once, and one compiled
  loop keeps each prompt's ``num_perm`` minima while it reads the prompt's shingles.
* **LSH**: the banding of ``datasketch.MinHashLSH`` at ``candidate_threshold`` (its
  optimal (b, r) for that threshold and ``num_perm``): two prompts are candidates when
  all r values of some band agree.  Candidates are kept when their estimated Jaccard
  (share of equal signature values) is >= ``threshold``.  The candidate threshold is
  lower than the decision threshold so that the banding loses almost nothing above it
  (P(candidate | J = threshold) ~ 0.99 with the defaults); the estimate then decides.
  In memory the banding is vectorised (sort by band key); with a ``storage_config``
  (e.g. Redis) a real ``datasketch.MinHashLSH`` with that storage holds the bands and is
  queried instead.  A band bucket with more than ``_SMALL`` members (many variants of one
  template) pairs each member with the bucket's first member and its successor only, so
  the work stays linear; the bucket still ends up connected.
* **Index** (:class:`PromptIndex`): signatures keyed by ``prompt_hash`` and the verified
  edges between them, in memory (or with its bands in a datasketch storage such as Redis),
  saved as one ``.npz``.  :func:`run` uses it for a full recompute; versions no longer keep
  it (below).
* **State of a version** (:mod:`pipeline.checks.near_duplicates_state`): what a child needs,
  as tables of content-addressed parts that a child *extends* (it links its parent's parts
  and writes parts for its own batch, into which small trailing parts are merged): per prompt its band keys and a 4-bit sketch
  (``state/near_dup_prompts``), its signature (``state/near_dup_signatures``, read part by
  part when needed), the verified edges with the number of buckets that make them a
  candidate (``state/near_dup_edges``), pair -> prompt rows (``state/near_dup_pair_prompts``,
  ``state/near_dup_links``) and the version's sums (``state/near_dup_summary``).  A child
  hashes only the prompts the state does not know and finds their candidates among all
  earlier prompts through the persisted band keys; its flags, clusters and metrics equal
  :func:`run` over all judgments so far (tested on random chains).
* **Output**: ``near_duplicate`` (subject ``pair``) for each pair whose prompt has a near
  duplicate under another ``prompt_hash`` (in this frame or an earlier version), and the
  table ``clusters`` (pair_id -> ``near_dup_cluster``): connected components over
  near-duplicate edges (and prompts that share a pair id), named by their smallest
  ``prompt_hash``.  Every pair gets a cluster; pairs with the same prompt share one.

How curate calls it
-------------------
Full recompute (``curate --full``, or checking a frame outside the store): ``run(judgments,
cfg)`` as today.  Versions keep the state tables, not ``prompt_index.npz``
(``nds`` = :mod:`pipeline.checks.near_duplicates_state`):

(i) first version -- ``judgments``: every judgment of the version::

    res = nds.run_incremental(judgments, nds.NearDupState.empty(cfg), generation=version_id)
    results["near_duplicates"] = res.check_result()  # status, metrics; flags and clusters of every pair
    tables.update(res.write_state(store, stage))      # the tables nds.TABLES, by those names

(ii) child version -- ``batch``: the judgments that are new in this version (pair_id,
prompt_hash, prompt, prompt_text; pairs and prompts the parent knows may be among them)::

    state = nds.load_state(parent, cfg)            # verified reads; an old prompt_index.npz converts once
    res = nds.run_incremental(batch, state, generation=version_id)
    entry = res.check_result()                     # metrics of the whole version, status, summary
    flags = nds.merge_flags(parent_flags, res)     # drops the parent's near_duplicate flags of res.recomputed, adds res.flags
    clusters = nds.merge_clusters(parent_clusters, res)  # pair_id -> near_dup_cluster of every pair (res.clusters: changed ones)
    tables.update(res.write_state(store, stage))   # parent's unchanged parts hard-linked, new parts written

``res.recomputed`` lists the pairs whose flags were recomputed (the batch's pairs, and old
pairs whose prompts gained or lost a near-duplicate edge); ``res.clusters`` holds every pair
whose cluster is new or changed (the batch's pairs and the members of merged or split
clusters).  ``res.stats`` reports the run's work (prompts hashed, candidates, signature parts
read, seconds per phase).  ``NearDupState.empty(cfg)`` also serves a parent without any index.

Redis (``storage_config``): :class:`PromptIndex` with a datasketch storage works as before for
:func:`run` and queries; the state tables do not use it (their band keys are the on-disk LSH
table), so curate's versions no longer fill a Redis LSH.
"""
from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from schemas.check import CheckResult, empty_flags, make_flags
from schemas.policy import ChecksConfig, NearDuplicateConfig
from schemas.text import content_hash
from pipeline.checks.spec import CheckSpec, Reason

NAME = "near_duplicates"
FORMAT = "prefpipe-prompt-index/1"  # bump when tokenisation or hashing changes
_CP_LETTERS = 0x323B0  # no letters or digits above CJK ext. H (tags, private use)
_NO_SPACE_SCRIPTS = ((0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x3040, 0x30FF), (0x31F0, 0x31FF),
                     (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F), (0x20000, 0x323AF))
_TEXT_CHUNK = 4096  # prompts tokenised and hashed per kernel call
_SMALL = 16  # band buckets larger than this are paired as a star + chain, not all pairs
_U64 = np.uint64
_M64 = (_U64(0xFF51AFD7ED558CCD), _U64(0xC4CEB9FE1A85EC53))
_M32 = (np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35))
_K = [_U64(x) for x in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x2545F4914F6CDD1D,
                       0x5851F42D4C957F2D, 0x14057B7EF767814F)]


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _U64(33))
    h = h * _M64[0]
    h = h ^ (h >> _U64(33))
    h = h * _M64[1]
    return h ^ (h >> _U64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, as datasketch's ``affine32`` pre-mix."""
    h = h ^ (h >> np.uint32(16))
    h = h * _M32[0]
    h = h ^ (h >> np.uint32(13))
    h = h * _M32[1]
    return h ^ (h >> np.uint32(16))


@lru_cache(maxsize=1)
def _classes() -> np.ndarray:
    """Class per code point: 0 separator, 1 word character (letter, digit, combining mark),
    2 character of a script written without spaces (tokenised as characters and bigrams)."""
    cls = np.zeros(0x110000, dtype=np.uint8)
    for i in range(_CP_LETTERS):
        ch = chr(i)
        if ch.isalnum() or unicodedata.category(ch)[0] == "M":  # marks (e.g. Devanagari vowel signs) join words
            cls[i] = 1
    for lo, hi in _NO_SPACE_SCRIPTS:
        cls[lo:hi + 1] = np.where(cls[lo:hi + 1] == 1, 2, 0)
    cls[0x3005] = 2  # iteration mark
    return cls


# ---------------------------------------------------------------- shingles
_U32 = np.uint32
_K32 = [_U32(x) for x in (0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0x9E3779B9, 0x7FEB352D)]


def _token_hashes(texts: list[str] | pl.Series, max_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit token hashes (in text order) and the token count of each text, from the code points
    of ``text[:max_chars].lower()`` (:func:`pipeline.kernels.token_hashes`: a word's hash is its
    polynomial hash ``sum_k c_k P^k mod 2^32``, k = offset in the word; characters and bigrams a
    multiply-add of their code points; each mixed with ``fmix32``)."""
    from pipeline import kernels

    series = texts if isinstance(texts, pl.Series) else pl.Series(texts, dtype=pl.String)
    cps, offs = kernels.code_points(series, max_chars)
    out, counts = np.empty(2 * cps.size + 1, _U32), np.empty(len(series), np.int64)
    n = kernels.token_hashes(cps, offs, _classes(), np.array(_K32[:5], _U32), out, counts)
    return out[:n], counts


def shingle_hashes(texts: list[str] | pl.Series, max_chars: int = 2000, shingle_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """32-bit shingle hashes of each text, concatenated, and per-text counts (each >= 1)."""
    tok, counts = _token_hashes(texts, max_chars)
    if shingle_size > 1 and tok.size:
        text_of = np.repeat(np.arange(len(texts)), counts)
        acc = np.zeros(tok.size, _U32)
        ok = np.ones(tok.size, bool)
        for k in range(shingle_size):
            j = np.arange(tok.size) + k
            ok = j < tok.size
            ok[ok] = text_of[j[ok]] == text_of[ok]
            acc[ok] += _fmix32(tok[j[ok]] * _K32[k % 6] + _U32(k + 1))
        first_of_text = np.ones(tok.size, bool)
        first_of_text[1:] = text_of[1:] != text_of[:-1]
        keep = ok | (first_of_text & (counts[text_of] < shingle_size))
        tok, text_of = _fmix32(acc[keep]), text_of[keep]
        counts = np.bincount(text_of, minlength=len(texts)).astype(np.int64)
    sh = tok
    empty = np.flatnonzero(counts == 0)
    if empty.size:  # no token at all: one shingle from the whole text (rare, done in Python)
        fill = np.array([int(content_hash((texts[int(i)] or "")[:max_chars])[:8], 16) for i in empty], np.uint32)
        sh = np.insert(sh, np.cumsum(counts)[empty], fill)
        counts[empty] = 1
    return sh, counts


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``affine32`` permutation parameters datasketch draws for (num_perm, seed): odd ``a``
    and any ``b`` from ``numpy.random.RandomState(seed)``, as ``MinHash._init_permutations``
    does (tested equal; drawn here so that a run does not import datasketch, ~1 s)."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def minhash_signatures(shingles: np.ndarray, counts: np.ndarray, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """(n_texts, num_perm) uint32 MinHash signatures of grouped 32-bit shingle hashes."""
    a, b = permutations(num_perm, seed)
    out = np.empty((counts.size, num_perm), np.uint32)
    if counts.size == 0:
        return out
    from pipeline import kernels

    kernels.minhash(_fmix32(shingles.astype(np.uint32)), np.cumsum(counts), a, b, out)
    return out


def signatures(texts: list[str] | pl.Series, cfg: NearDuplicateConfig | None = None, workers: int | None = None
               ) -> np.ndarray:
    """MinHash signatures of prompt texts, ``(len(texts), cfg.num_perm)`` uint32.

    Chunks of ``_TEXT_CHUNK`` texts run on ``workers`` threads (the kernels release the GIL;
    default: up to 2, the machine's cores)."""
    cfg = cfg or NearDuplicateConfig()
    chunks = [texts[i:i + _TEXT_CHUNK] for i in range(0, len(texts), _TEXT_CHUNK)]

    def one(chunk: list[str] | pl.Series) -> np.ndarray:
        sh, counts = shingle_hashes(chunk, cfg.max_chars, cfg.shingle_size)
        return minhash_signatures(sh, counts, cfg.num_perm, cfg.seed)

    workers = workers or min(2, os.cpu_count() or 1)
    if workers > 1 and len(chunks) > 1:
        _classes()
        permutations(cfg.num_perm, cfg.seed)
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one, chunks))
    else:
        parts = [one(c) for c in chunks]
    return np.concatenate(parts) if parts else np.zeros((0, cfg.num_perm), np.uint32)


# ---------------------------------------------------------------- LSH banding
def band_params(cfg: NearDuplicateConfig) -> tuple[int, int]:
    """datasketch's optimal (bands, rows) for ``candidate_threshold`` and ``num_perm``."""
    return optimal_bands(cfg.candidate_threshold, cfg.num_perm)


@lru_cache(maxsize=16)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """The (bands, rows) with b * r <= num_perm minimising the weighted false-positive and
    false-negative areas of the LSH S-curve ``1 - (1 - s^r)^b`` around ``threshold``: the
    same search as ``datasketch.lsh._optimal_param`` (same answer, tested), without
    importing datasketch or scipy.integrate (~0.4 s each).  The integrands are polynomials
    of degree b * r <= num_perm, so Gauss-Legendre with num_perm / 2 + 1 nodes is exact."""
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def nodes(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        return (hi - lo) / 2 * x + (hi + lo) / 2, (hi - lo) / 2 * w

    (s_fp, w_fp), (s_fn, w_fn) = nodes(0.0, threshold), nodes(threshold, 1.0)
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = float(w_fp @ (1 - (1 - s_fp ** r) ** b))
            fn = float(w_fn @ ((1 - s_fn ** r) ** b))
            err = fp * fp_weight + fn * fn_weight
            if err < best:
                best, opt = err, (b, r)
    return opt


def _band_keys(sigs: np.ndarray, b: int, r: int) -> np.ndarray:
    """(b, n) uint64: one hash per band of r signature values (a multiply-add chain, then
    ``fmix64``; a rare collision only adds a candidate that verification drops), in one compiled
    pass (:func:`pipeline.kernels.band_keys`; ``tests/test_kernels.py`` holds it to the NumPy form)."""
    from pipeline import kernels

    out = np.empty((b, sigs.shape[0]), _U64)
    kernels.band_keys(np.ascontiguousarray(sigs), b, r, _K[1], _M64[0], _M64[1], out)
    return out


def group_pairs(group: np.ndarray, node: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs ``(i, j)`` of LSH buckets under the rule of the full run.

    ``node`` lists the members of every bucket, bucket after bucket, each bucket's members in
    prompt order (rows sorted by ``prompt_hash``); ``group`` (same length) is equal for the
    members of one bucket and differs between neighbouring buckets.  A bucket of up to
    ``_SMALL`` members gives all its pairs; a bigger one (many copies or templated variants of
    one text) gives each member paired with the bucket's first member (a star, including the
    first member with itself) and with its successor (a chain), so the work stays linear while
    the bucket still ends up connected (the verified edges decide).  Pairs are neither ordered
    nor deduplicated (the star and the chain share the first two members' pair)."""
    if group.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    new_group = np.r_[True, group[1:] != group[:-1]]
    gid = np.cumsum(new_group) - 1
    size = np.bincount(gid)[gid]
    leader = node[new_group][gid]
    small = size <= _SMALL
    chain = ~small[:-1] & (gid[1:] == gid[:-1])
    i_parts, j_parts = [node[~small], node[:-1][chain]], [leader[~small], node[1:][chain]]
    for d in range(1, min(_SMALL, int(size[small].max(initial=1)))):
        same = small[d:] & (gid[d:] == gid[:-d])
        i_parts.append(node[:-d][same])
        j_parts.append(node[d:][same])
    return np.concatenate(i_parts), np.concatenate(j_parts)


def _bucket_pairs(keys: np.ndarray, new_from: int) -> np.ndarray:
    """Unique (i, j), i < j, of rows sharing a band key (``keys``: (b, n)), with j >= ``new_from``;
    the rows are in prompt order, the candidates of each bucket follow :func:`group_pairs`."""
    b, n = keys.shape
    codes = []
    # rows whose key repeats in their band: hash-based, O(n), all bands at once (in parallel)
    repeated = pl.DataFrame({str(i): keys[i] for i in range(b)}).select(pl.all().is_duplicated()).to_numpy().T
    for band in range(b):
        col = keys[band]
        idx = np.flatnonzero(repeated[band])
        if idx.size == 0:
            continue
        order = np.argsort(col[idx], kind="stable")
        i, j = group_pairs(col[idx][order], idx[order])
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        keep = (lo != hi) & (hi >= new_from)
        codes.append(lo[keep] * n + hi[keep])
    if not codes:
        return np.zeros((0, 2), np.int64)
    c = pl.Series(np.concatenate(codes)).unique().sort().to_numpy()  # Polars' hash unique: ~10x np.unique here
    return np.stack([c // n, c % n], 1)


def estimated_jaccard(sigs_a: np.ndarray, sigs_b: np.ndarray, rows_a: np.ndarray | None = None,
                      rows_b: np.ndarray | None = None) -> np.ndarray:
    """Share of equal MinHash values of ``sigs_a[rows_a]`` and ``sigs_b[rows_b]`` row by row
    (all rows when not given), gathered in chunks to bound memory."""
    ra = np.arange(sigs_a.shape[0]) if rows_a is None else rows_a
    rb = np.arange(sigs_b.shape[0]) if rows_b is None else rows_b
    out = np.empty(ra.size, np.float32)
    for s in range(0, ra.size, 32768):
        eq = sigs_a[ra[s:s + 32768]] == sigs_b[rb[s:s + 32768]]
        out[s:s + 32768] = np.count_nonzero(eq, axis=1) / sigs_a.shape[1]
    return out


# ---------------------------------------------------------------- the persistent index
class PromptIndex:
    """MinHash signatures keyed by ``prompt_hash`` plus the verified near-duplicate edges.

    ``add`` hashes only keys the index does not hold and finds their near duplicates among
    all keys; ``query`` does the same without adding.  ``save``/``load`` use one ``.npz``
    (keys, signatures, edges, parameters; no pickle), written atomically.  With
    ``storage_config`` (datasketch's, e.g. ``{"type": "redis", "redis": {...}}``) the LSH
    bands live in a ``datasketch.MinHashLSH`` with that storage (``basename`` names it),
    which is filled by ``add`` and asked by ``add``/``query``; signatures and edges stay
    in the ``.npz``.
    """

    def __init__(self, cfg: NearDuplicateConfig | None = None, *, storage_config: dict | None = None,
                 basename: bytes = b"prefpipe-prompts") -> None:
        self.cfg = cfg or NearDuplicateConfig()
        self.b, self.r = band_params(self.cfg)
        self.keys: list[str] = []
        self._pos: dict[str, int] = {}
        self._sigs = [np.zeros((0, self.cfg.num_perm), np.uint32)]
        self.edges = np.zeros((0, 2), np.int64)
        self.edge_jaccard = np.zeros(0, np.float32)
        self._lsh = None
        if storage_config is not None:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=self.cfg.candidate_threshold, num_perm=self.cfg.num_perm,
                                   storage_config={**storage_config, "basename": basename})

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._pos

    @property
    def signatures(self) -> np.ndarray:
        if len(self._sigs) > 1:
            self._sigs = [np.concatenate(self._sigs)]
        return self._sigs[0]

    def params(self) -> dict[str, Any]:
        """What a saved index must match to be reused (``threshold`` may differ)."""
        c = self.cfg
        return {"format": FORMAT, "num_perm": c.num_perm, "seed": c.seed, "shingle_size": c.shingle_size,
                "max_chars": c.max_chars, "scheme": "affine32"}

    def add(self, keys: list[str], texts: list[str] | None = None, sigs: np.ndarray | None = None) -> np.ndarray:
        """Add prompts not yet held (``texts`` are hashed only for those, or ``sigs`` are
        taken as given); returns the mask of keys that were new."""
        new_mask = np.fromiter((k not in self._pos for k in keys), bool, len(keys))
        first = np.zeros(len(keys), bool)
        seen: set[str] = set()
        for i in np.flatnonzero(new_mask):
            if keys[i] not in seen:
                seen.add(keys[i])
                first[i] = True
        idx = np.flatnonzero(first)
        if idx.size == 0:
            return new_mask
        new_sigs = sigs[idx] if sigs is not None else signatures([texts[i] for i in idx], self.cfg)
        n_old = len(self.keys)
        for i in idx:
            self._pos[keys[i]] = len(self.keys)
            self.keys.append(keys[i])
        self._sigs.append(np.ascontiguousarray(new_sigs, np.uint32))
        all_sigs = self.signatures
        if self._lsh is None:
            cand = _bucket_pairs(_band_keys(all_sigs, self.b, self.r), n_old)
        else:
            cand = self._lsh_pairs(np.arange(n_old, len(self.keys)), insert=True)
        self._add_edges(cand)
        return new_mask

    def _add_edges(self, cand: np.ndarray) -> None:
        if cand.size == 0:
            return
        sigs = self.signatures
        jac = estimated_jaccard(sigs, sigs, cand[:, 0], cand[:, 1])
        keep = jac >= self.cfg.threshold
        self.edges = np.concatenate([self.edges, cand[keep]])
        self.edge_jaccard = np.concatenate([self.edge_jaccard, jac[keep]])

    def _lsh_pairs(self, rows: np.ndarray, *, insert: bool) -> np.ndarray:
        """Candidate pairs through the datasketch LSH (any storage backend)."""
        from datasketch import LeanMinHash

        sigs = self.signatures
        lean = [LeanMinHash(seed=self.cfg.seed, hashvalues=sigs[i], scheme="affine32") for i in rows]
        if insert:
            with self._lsh.insertion_session() as session:
                for i, m in zip(rows, lean):
                    session.insert(self.keys[i], m, check_duplication=False)
        pairs = [(min(i, self._pos[k]), max(i, self._pos[k])) for i, m in zip(rows, lean)
                 for k in self._lsh.query(m) if k in self._pos and self._pos[k] != i]
        return np.unique(np.array(pairs, np.int64).reshape(-1, 2), axis=0)

    def query(self, texts: list[str] | None = None, sigs: np.ndarray | None = None) -> pl.DataFrame:
        """Near duplicates in the index of prompts not added: (query row, key, jaccard)."""
        q = sigs if sigs is not None else signatures(texts or [], self.cfg)
        if self._lsh is None:
            allk = _band_keys(np.concatenate([self.signatures, q]), self.b, self.r)  # (b, n + m)
            cand = _bucket_pairs(allk, len(self.keys))
            cand = cand[cand[:, 0] < len(self.keys)]
            qi, ki = cand[:, 1] - len(self.keys), cand[:, 0]
        else:
            from datasketch import LeanMinHash

            hits = [(i, self._pos[k]) for i in range(len(q))
                    for k in self._lsh.query(LeanMinHash(seed=self.cfg.seed, hashvalues=q[i], scheme="affine32"))
                    if k in self._pos]
            arr = np.array(hits, np.int64).reshape(-1, 2)
            qi, ki = arr[:, 0], arr[:, 1]
        jac = estimated_jaccard(q, self.signatures, qi, ki)
        keep = jac >= self.cfg.threshold
        return pl.DataFrame({"query": qi[keep], "key": [self.keys[i] for i in ki[keep]], "jaccard": jac[keep]})

    def edge_frame(self) -> pl.DataFrame:
        """Verified near-duplicate edges by key: ``left``, ``right``, ``jaccard``."""
        keys = pl.Series(self.keys, dtype=pl.String)
        return pl.DataFrame({"left": keys.gather(self.edges[:, 0]), "right": keys.gather(self.edges[:, 1]),
                             "jaccard": self.edge_jaccard})

    def save(self, path: str | Path) -> Path:
        """Write the index as ``.npz`` (temp file + rename: readers never see half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, keys=np.array(self.keys, dtype=str), signatures=self.signatures, edges=self.edges,
                         edge_jaccard=self.edge_jaccard,
                         params=np.array(json.dumps({**self.params(), "threshold": self.cfg.threshold})))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, cfg: NearDuplicateConfig | None = None, *, storage_config: dict | None = None,
             basename: bytes = b"prefpipe-prompts") -> PromptIndex:
        """Read a saved index.  Raises ``ValueError`` if it was built with other hashing
        parameters (its signatures cannot be compared); a different ``threshold`` only
        re-verifies the saved candidates' edges with the vectorised banding."""
        index = cls(cfg, storage_config=storage_config, basename=basename)
        with np.load(Path(path), allow_pickle=False) as z:
            saved = json.loads(str(z["params"]))
            want = index.params()
            diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
            if diff:
                raise ValueError(f"prompt index {path} was built with other parameters (saved, wanted): {diff}")
            index.keys = [str(k) for k in z["keys"]]
            index._sigs = [np.ascontiguousarray(z["signatures"], np.uint32)]
            edges, jac = z["edges"].astype(np.int64).reshape(-1, 2), z["edge_jaccard"].astype(np.float32)
        index._pos = {k: i for i, k in enumerate(index.keys)}
        if index._lsh is not None:  # a fresh storage gets the saved prompts; a persistent one (Redis) keeps them
            missing = np.array([i for i, k in enumerate(index.keys) if k not in index._lsh], np.int64)
            if missing.size:
                index._lsh_pairs(missing, insert=True)
        if saved.get("threshold") == index.cfg.threshold:
            index.edges, index.edge_jaccard = edges, jac
        else:
            index._add_edges(_bucket_pairs(_band_keys(index.signatures, index.b, index.r), 0))
        return index


# ---------------------------------------------------------------- the check
def shingle_text(prompts: pl.DataFrame) -> pl.Series:
    """The text that is shingled: the prompt's turns without system messages (a shared
    system prompt would make every prompt that carries it look alike) and without role
    labels; ``prompt_text`` when there is no ``prompt`` column."""
    if "prompt" not in prompts.columns:
        return prompts["prompt_text"]
    el = pl.element()
    turns = pl.col("prompt").list.eval(el.filter(el.struct.field("role") != "system").struct.field("content"))
    return prompts.select(turns.list.join("\n")).to_series()


def best_neighbours(edges: pl.DataFrame, prompts: pl.Series | None = None) -> pl.DataFrame:
    """Per prompt with a near duplicate (among ``prompts``, all when None): ``neighbour`` (the
    highest Jaccard, then the smallest prompt_hash), its ``jaccard`` and ``n``, the number of
    near-duplicate prompts.  ``edges``: verified edges ``left``, ``right``, ``jaccard``."""
    both = pl.concat([edges.select("left", "right", "jaccard"), edges.select(left="right", right="left", jaccard="jaccard")])
    if prompts is not None:
        both = both.filter(pl.col("left").is_in(prompts.implode()))
    return (both.sort(["left", "jaccard", "right"], descending=[False, True, False])
            .group_by("left", maintain_order=True)
            .agg(neighbour=pl.col("right").first(), jaccard=pl.col("jaccard").first(), n=pl.len()))


def pair_flags(pair_prompts: pl.DataFrame, best: pl.DataFrame, *, here: pl.Series | None = None
               ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The ``near_duplicate`` flags of pairs (``pair_prompts``: pair_id, prompt_hash) given their
    prompts' :func:`best_neighbours`: a pair is flagged when one of its prompts has a near
    duplicate; the detail names its best prompt (highest Jaccard, then smallest prompt_hash).
    ``here``: the prompts of the checked frame; a neighbour outside it is "from an earlier
    version" (None: no such note).  Returns (flagged pairs with their best prompt, flags)."""
    flagged = (pair_prompts.join(best, left_on="prompt_hash", right_on="left", how="inner")
               .sort(["pair_id", "jaccard", "prompt_hash"], descending=[False, True, False])
               .unique("pair_id", keep="first", maintain_order=True))
    if flagged.height == 0:
        return flagged, empty_flags()
    earlier = pl.lit("") if here is None else pl.when(pl.col("neighbour").is_in(here.implode())).then(
        pl.lit("")).otherwise(pl.lit(" from an earlier version"))
    detail = flagged.select(pl.format(
        "prompt {} is a near duplicate of prompt {} (estimated Jaccard {}; {} near-duplicate prompt(s)){}",
        "prompt_hash", "neighbour", pl.col("jaccard").round(2), "n", earlier)).to_series()
    return flagged, make_flags(flagged["pair_id"], subject_kind="pair", check=NAME, reason="near_duplicate",
                               detail=detail)


def _clusters(index: PromptIndex, pair_prompts: pl.DataFrame) -> pl.DataFrame:
    """pair_id -> near_dup_cluster: components over near-duplicate edges and shared pair ids,
    each named by its smallest prompt_hash."""
    pos = pair_prompts["prompt_hash"].replace_strict(index._pos, return_dtype=pl.Int64).to_numpy()
    pair_code = pair_prompts["pair_id"].rank("dense").cast(pl.Int64).to_numpy() - 1
    # prompts of one pair id are linked through the pair's first prompt
    first = np.full(pair_code.max() + 1 if pair_code.size else 0, -1, np.int64)
    first[pair_code[::-1]] = pos[::-1]
    links = np.stack([pos, first[pair_code]], 1)
    edges = np.concatenate([index.edges, links])
    n = len(index)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    names = pl.DataFrame({"comp": comp, "key": index.keys}).group_by("comp").agg(pl.col("key").min())
    name_of = dict(zip(names["comp"].to_list(), names["key"].to_list()))
    pc = pl.DataFrame({"pair_id": pair_prompts["pair_id"], "comp": comp[pos]})
    return (pc.group_by("pair_id").agg(pl.col("comp").first())
            .with_columns(near_dup_cluster=pl.col("comp").replace_strict(name_of, return_dtype=pl.String))
            .select("pair_id", "near_dup_cluster").sort("pair_id"))


def run(
    judgments: pl.DataFrame,
    cfg: NearDuplicateConfig | ChecksConfig | None = None,
    *,
    pairs: pl.DataFrame | None = None,  # noqa: ARG001 - same signature as the other checks
    index: PromptIndex | None = None,
    index_path: str | Path | None = None,
) -> CheckResult:
    """Near-duplicate prompts of a judgments frame (columns pair_id, prompt_hash, prompt_text).

    ``index``: the prompts of earlier versions (updated in place with this frame's prompts);
    else ``index_path``: a saved index to start from (read only; a missing file or one built
    with other parameters starts a fresh index).  The index after the run is returned in
    the tables ``prompt_index`` / ``prompt_index_edges`` for :func:`save_index`.
    """
    cfg = cfg.near_duplicate if isinstance(cfg, ChecksConfig) else (cfg or NearDuplicateConfig())
    reset = None
    if index is None:
        index = PromptIndex(cfg)
        if index_path is not None:
            p = Path(index_path)
            p = p if p.exists() else p.with_suffix(".npz")
            if p.exists():
                try:
                    index = PromptIndex.load(p, cfg)
                except ValueError as err:
                    reset = str(err)
    held_before = len(index)
    first = judgments.select(pl.col("prompt_hash").is_first_distinct()).to_series()
    prompts = judgments.select(
        "prompt_hash", *(["prompt"] if "prompt" in judgments.columns else []), "prompt_text").filter(first).sort("prompt_hash")
    new = index.add(prompts["prompt_hash"].to_list(), shingle_text(prompts).to_list())
    pair_prompts = judgments.select("pair_id", "prompt_hash").unique().sort("pair_id", "prompt_hash")
    return result_of(index, prompts["prompt_hash"], pair_prompts, new, cfg, held_before=held_before, reset=reset)


def result_of(index: PromptIndex, prompt_hashes: pl.Series, pair_prompts: pl.DataFrame, new: np.ndarray,
              cfg: NearDuplicateConfig, *, held_before: int = 0, reset: str | None = None) -> CheckResult:
    """The check's result once ``index`` holds the prompts ``prompt_hashes`` (sorted; ``new``: the
    mask of those it hashed) and ``pair_prompts`` (pair_id, prompt_hash: distinct, sorted) are
    known -- whether the signatures were computed here or on the partitions' workers
    (:func:`pipeline.partition_checks.near_duplicates`)."""
    prompts = prompt_hashes.to_frame("prompt_hash")
    best = best_neighbours(index.edge_frame(), prompts["prompt_hash"])
    flagged, flags = pair_flags(pair_prompts, best, here=prompts["prompt_hash"])
    clusters = _clusters(index, pair_prompts) if pair_prompts.height else pl.DataFrame(
        schema={"pair_id": pl.String, "near_dup_cluster": pl.String})

    n_pairs = pair_prompts["pair_id"].n_unique()
    sizes = clusters.group_by("near_dup_cluster").len()
    metrics: dict[str, Any] = {
        "prompts": prompts.height,
        "prompts_hashed": int(new.sum()),
        "index_prompts_before": held_before,
        "index_prompts": len(index),
        "near_duplicate_prompts": best.height,
        "near_duplicate_pairs": flagged.height,
        "near_duplicate_rate": flagged.height / n_pairs if n_pairs else 0.0,
        "pairs": n_pairs,
        "clusters": sizes.height,
        "largest_cluster_pairs": int(sizes["len"].max()) if sizes.height else 0,
        "multi_pair_clusters": int((sizes["len"] > 1).sum()) if sizes.height else 0,
        "index": {**index.params(), "threshold": cfg.threshold, "candidate_threshold": cfg.candidate_threshold,
                  "bands": index.b, "rows": index.r, "backend": "datasketch" if index._lsh is not None else "numpy"},
    }
    if reset:
        metrics["index_reset"] = reset
    summary = (f"{flagged.height} of {n_pairs} pairs have a near-duplicate prompt ({best.height} prompts); "
               f"{sizes.height} clusters")
    tables = {
        "clusters": clusters,
        "prompt_index": pl.DataFrame({"key": index.keys, "signature": index.signatures}),
        "prompt_index_edges": pl.DataFrame({"i": index.edges[:, 0], "j": index.edges[:, 1],
                                            "jaccard": index.edge_jaccard}),
    }
    return CheckResult(name=NAME, status="warn" if flagged.height else "pass", metrics=metrics, flags=flags,
                       tables=tables, summary=summary)


def index_from_result(result: CheckResult, cfg: NearDuplicateConfig | None = None) -> PromptIndex:
    """Rebuild the :class:`PromptIndex` a :func:`run` ended with from its tables."""
    p = result.metrics["index"]
    cfg = cfg or NearDuplicateConfig(num_perm=p["num_perm"], seed=p["seed"], shingle_size=p["shingle_size"],
                                     max_chars=p["max_chars"], threshold=p["threshold"],
                                     candidate_threshold=p["candidate_threshold"])
    index = PromptIndex(cfg)
    t, e = result.tables["prompt_index"], result.tables["prompt_index_edges"]
    index.keys = t["key"].to_list()
    index._pos = {k: i for i, k in enumerate(index.keys)}
    index._sigs = [t["signature"].to_numpy().astype(np.uint32, copy=False).reshape(-1, cfg.num_perm)]
    index.edges = np.stack([e["i"].to_numpy(), e["j"].to_numpy()], 1).astype(np.int64).reshape(-1, 2)
    index.edge_jaccard = e["jaccard"].to_numpy().astype(np.float32)
    return index


def save_index(result: CheckResult, base: str | Path) -> list[str]:
    """Save the index of a :func:`run` result as ``<base>.npz``; returns the file names
    relative to ``base``'s directory (what the version manifest lists)."""
    base = Path(base)
    path = index_from_result(result).save(base.with_suffix(".npz"))
    return [path.name]


CHECK = CheckSpec(
    name=NAME, run=run, config="near_duplicate", inputs=("index_path", "index"),
    doc="near-duplicate prompts (MinHash LSH), also against the parent version's persisted index",
    reasons=(
        Reason("near_duplicate", "pair", "warn", "prompt (or whole pair) is a near-duplicate of another pair",
               precedence=70),
    ))
