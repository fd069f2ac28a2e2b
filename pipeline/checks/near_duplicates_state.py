"""The near-duplicate check's state as shared parts, and the incremental run over a new batch.

A child version hashes only the prompts its parent's state does not know, finds their
candidates through the persisted band keys (old prompts are never banded again), verifies
them, and updates flags, clusters and metrics for what changed.  The result equals a full
:func:`pipeline.checks.near_duplicates.run` over all judgments so far (same flagged pairs and
details, same cluster partition and names, same metrics; ``tests/test_near_duplicates_incremental.py``).

State tables (written with :class:`pipeline.parts.TableWriter`, parts listed in the order of
their rows; a child inherits, i.e. hard links, every part of its parent's except the few it
rewrites or merges)
-------------------------------------------------------------------------------------------
``state/near_dup_prompts`` -- one row per prompt: ``prompt_hash``, its LSH band keys
    ``band_000`` .. (uint64, one column per band) and a 4-bit sketch of its signature
    ``sketch_00`` .. (uint64, 16 signature values' low 4 bits per column).  Rows append only,
    in the order the prompts were first seen (a version's new prompts sorted by prompt_hash).
    Parts ``part-<version>-<chunk>``, at most :data:`CHUNK` rows each: the version's new
    prompts, into which its parent's trailing parts are merged (below).
``state/near_dup_signatures`` -- the same rows (same part keys, same order): ``prompt_hash``
    and the MinHash signature ``h_0000`` .. (uint32).  Read only part by part, for the few
    old prompts whose sketch passes (below).
``state/near_dup_edges`` -- verified near-duplicate edges ``left`` < ``right`` (prompt_hash),
    ``jaccard`` (float32), ``support`` (the number of LSH buckets in which the pair is a
    candidate).  Parts by the version that found the edge (or merged it, below); a child
    rewrites a part in its place only when one of its edges lost a bucket (see "exactness"),
    and adds one part for its new edges.
``state/near_dup_pair_prompts`` -- every distinct (``pair_id``, ``prompt_hash``) so far, in the
    order first seen; a version's part holds the combinations new in it.  Rows append only.
``state/near_dup_links`` -- the rows of pairs with more than one prompt (they join their
    prompts' clusters); a version's part holds the rows of the pairs that got their second
    (third, ...) prompt in it, all of the pair's rows not there yet.  Rows append only.
``state/near_dup_summary`` -- one row, rewritten by every version: the parameters (a child
    whose configuration differs rebuilds), ``n_prompts``, ``n_pairs``, ``n_flagged_pairs`` and
    the cluster-size histogram (``cluster_pairs`` -> ``cluster_count``), from which the
    version's metrics follow without scanning anything.

Parts stay few: a version's new part absorbs its parent's trailing parts of the table while it
holds at least half the rows of the part before it and the merged part stays within
:data:`CHUNK` rows (:func:`pipeline.parts.parts_to_merge`, the level compaction of
``judgments``): a chain of N small versions keeps O(log N) parts per table (plus O(rows /
CHUNK): the cap), each row is rewritten O(log N) times and a version rewrites at most CHUNK
rows a table.  Prompts and signatures are merged alike (same keys, same rows); an edge part is
merged by relabelling its edges.  Rows keep their order, so a state read back equals the
uncompacted one row for row.  Parts not written yet (a converted or rebuilt parent state, an
in-memory chain) are written as they are, not merged.

Every part is read through :meth:`VersionHandle.read` (its sha256 checked against the
manifest before parsing); nothing is memory-mapped.  A child reads the prompts table, the
pair-prompts table and the edges in full (the band keys are what its candidates are found
with: ~200 bytes a prompt), and of the signatures only the parts holding an old prompt that
passed the sketch test: parts stay small (:data:`CHUNK` prompts, ~2 MB) so that such a read
costs little and is still verified part by part.

Exactness
---------
Candidates follow the full run's rule (:func:`~pipeline.checks.near_duplicates.group_pairs`
over buckets in prompt_hash order: all pairs up to 16 members, else star + chain).  Every
candidate pair a new prompt brings is a pair with a new member, so a child only *adds*
candidates with new prompts; it may *remove* old pairs of a bucket that grows past 16
members or whose chain or first member changes.  An old edge keeps its ``support`` (the
buckets in which it is a candidate) and disappears when that reaches 0, exactly as a full
run would not find it.  A new pair is verified by its estimated Jaccard; against an old
prompt the 4-bit sketch gives an upper bound (equal values have equal low bits), and only
pairs whose bound reaches the threshold read the old signature.  Clusters are the connected
components of the small graph of edges and of pairs with several prompts, recomputed for
parent and child; every other prompt is its own cluster, named by its prompt_hash.

How curate calls it
-------------------
(i) first version::

    state = NearDupState.empty(cfg)                     # or load_state(None, cfg)
    res = run_incremental(judgments, state, generation=version_id)
    results["near_duplicates"] = res.check_result()    # flags/clusters: every pair
    tables.update(res.write_state(store, stage))        # the six state tables

(ii) child version (``batch``: the new judgments only, any already-known pairs included)::

    state = load_state(parent, cfg)                     # verified reads; converts an old prompt_index.npz
    res = run_incremental(batch, state, generation=version_id)
    flags = merge_flags(parent_flags, res)              # parent's flags, minus res.recomputed, plus res.flags
    clusters = merge_clusters(parent_clusters, res)     # pair_id -> near_dup_cluster for every pair
    entry = res.check_result()                          # metrics of the whole version
    tables.update(res.write_state(store, stage))        # parent's parts linked, new parts written
"""
from __future__ import annotations

import functools
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.checks import near_duplicates as nd
from pipeline.parts import parts_to_merge
from pipeline.store import Store, VersionHandle
from schemas.check import CheckResult
from schemas.manifest import SplitInfo, TableInfo
from schemas.policy import ChecksConfig, NearDuplicateConfig

STATE_FORMAT = "prefpipe-near-dup-state/1"  # bump when a table's meaning changes
PROMPTS, SIGNATURES, EDGES, PAIR_PROMPTS, LINKS, SUMMARY = (
    f"state/near_dup_{t}" for t in ("prompts", "signatures", "edges", "pair_prompts", "links", "summary"))
TABLES = (PROMPTS, SIGNATURES, EDGES, PAIR_PROMPTS, LINKS, SUMMARY)
APPEND_ONLY = (PROMPTS, SIGNATURES, PAIR_PROMPTS, LINKS)
CHUNK = 16384  # prompts per part of the prompts / signatures tables (a signature part: 8 MB of values, ~3 MB on disk)
_PREFILTER_BITS = 20  # slots of the bit table that screens old band keys before the exact match
_NIBBLE_MASK = np.uint64(0x1111111111111111)
_U64 = np.uint64
EDGE_SCHEMA = {"left": pl.String, "right": pl.String, "jaccard": pl.Float32, "support": pl.UInt16}
PAIR_PROMPT_SCHEMA = {"pair_id": pl.String, "prompt_hash": pl.String}


class StateError(ValueError):
    """A state table contradicts itself (e.g. an edge losing more buckets than it had)."""


def state_params(cfg: NearDuplicateConfig) -> dict[str, Any]:
    """What a parent's state must match to be extended (anything else: rebuilt once)."""
    b, r = nd.band_params(cfg)
    return {**nd.PromptIndex(cfg).params(), "state": STATE_FORMAT, "threshold": cfg.threshold,
            "candidate_threshold": cfg.candidate_threshold, "bands": b, "rows": r, "small": nd._SMALL}


def _band_cols(b: int) -> list[str]:
    return [f"band_{t:03d}" for t in range(b)]


def _sketch_cols(num_perm: int) -> list[str]:
    return [f"sketch_{w:02d}" for w in range(-(-num_perm // 16))]


def _sig_cols(num_perm: int) -> list[str]:
    return [f"h_{k:04d}" for k in range(num_perm)]


# ---------------------------------------------------------------- sketch: a 4-bit upper bound
def sketch(sigs: np.ndarray) -> np.ndarray:
    """(n, ceil(P / 16)) uint64: the low 4 bits of every signature value, 16 to a word."""
    n, p = sigs.shape
    w = -(-p // 16)
    out = np.empty((n, w), _U64)
    shifts = np.arange(16, dtype=_U64) * _U64(4)
    for start in range(0, n, _SKETCH_ROWS):  # (a few MB of nibbles at a time: over every row at once, 2 GB at 1M prompts)
        rows = sigs[start:start + _SKETCH_ROWS]
        nib = np.zeros((rows.shape[0], w * 16), _U64)
        nib[:, :p] = rows & np.uint32(0xF)
        out[start:start + rows.shape[0]] = np.bitwise_or.reduce(nib.reshape(-1, w, 16) << shifts, axis=2)
    return out


_SKETCH_ROWS = 8_192


def sketch_jaccard(a: np.ndarray, b: np.ndarray, num_perm: int) -> np.ndarray:
    """Upper bound of :func:`~pipeline.checks.near_duplicates.estimated_jaccard` row by row:
    the share of equal low nibbles (equal values have equal nibbles), rounded the same way."""
    x = a ^ b
    x |= x >> _U64(1)
    x |= x >> _U64(2)
    x &= _NIBBLE_MASK
    equal = a.shape[1] * 16 - np.bitwise_count(x).sum(axis=1, dtype=np.int64) - (a.shape[1] * 16 - num_perm)
    out = np.empty(equal.size, np.float32)
    out[:] = equal / num_perm
    return out


def _sketch_bound(sketches: np.ndarray, a: np.ndarray, b: np.ndarray, num_perm: int) -> np.ndarray:
    """:func:`sketch_jaccard` of rows ``a`` and ``b`` of ``sketches``, in chunks (a gather of every pair's sketches
    at once: 2 x 64 B a pair)."""
    out = np.empty(a.size, np.float32)

    def chunk(s: int) -> None:
        out[s:s + 262_144] = sketch_jaccard(sketches[a[s:s + 262_144]], sketches[b[s:s + 262_144]], num_perm)

    with ThreadPoolExecutor(2, thread_name_prefix="prefpipe-sketch") as pool:  # (numpy releases the GIL)
        list(pool.map(chunk, range(0, a.size, 262_144)))
    return out


# ---------------------------------------------------------------- the state in memory
@dataclass
class _SigChunk:
    """Signatures of state rows ``start:stop``: in memory, or one verified part read on demand."""

    start: int
    stop: int
    array: np.ndarray | None = None
    handle: VersionHandle | None = None
    path: str = ""

    def load(self, num_perm: int) -> np.ndarray:
        if self.array is None:
            df = self.handle.read(self.path, columns=_sig_cols(num_perm))
            self.array = np.ascontiguousarray(df.to_numpy(), np.uint32).reshape(-1, num_perm)
            if self.array.shape[0] != self.stop - self.start:
                raise StateError(f"{self.path}: {self.array.shape[0]} signatures, the prompts part has {self.stop - self.start}")
        return self.array


@dataclass
class NearDupState:
    """Everything a child needs of its parent's near-duplicate state (see the module docstring).

    ``inherited`` lists the parent's parts a child links as they are; ``pending`` holds parts
    not yet written anywhere (a converted old index, or an in-memory chain of versions)."""

    cfg: NearDuplicateConfig
    hashes: pl.Series  # prompt_hash of each row
    bands: np.ndarray  # (bands, rows) uint64
    sketches: np.ndarray  # (rows, words) uint64
    sig_chunks: list[_SigChunk]
    pair_prompts: pl.DataFrame  # pair_id, prompt_hash
    edges: pl.DataFrame  # left, right, jaccard, support, _part
    n_pairs: int = 0
    n_flagged_pairs: int = 0
    cluster_sizes: dict[int, int] = field(default_factory=dict)  # pairs in a cluster -> number of such clusters
    parent: VersionHandle | None = None
    inherited: dict[str, list[SplitInfo]] = field(default_factory=dict)
    pending: dict[str, list[tuple[str, pl.DataFrame]]] = field(default_factory=dict)
    origin: str = "empty"
    links: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=PAIR_PROMPT_SCHEMA))  # rows of pairs with several prompts

    @classmethod
    def empty(cls, cfg: NearDuplicateConfig | ChecksConfig | None = None) -> NearDupState:
        cfg = _cfg(cfg)
        b, _ = nd.band_params(cfg)
        return cls(cfg=cfg, hashes=pl.Series("prompt_hash", [], pl.String), bands=np.zeros((b, 0), _U64),
                   sketches=np.zeros((0, len(_sketch_cols(cfg.num_perm))), _U64), sig_chunks=[],
                   pair_prompts=pl.DataFrame(schema=PAIR_PROMPT_SCHEMA),
                   edges=pl.DataFrame(schema={**EDGE_SCHEMA, "_part": pl.String}))

    def __len__(self) -> int:
        return self.hashes.len()

    def holds_nothing(self) -> bool:
        """No prompt, pair row, edge or cluster (a first version's state)."""
        return len(self) == 0 and self.pair_prompts.height == 0 and self.links.height == 0 and self.edges.height == 0 \
            and self.n_pairs == 0 and not self.cluster_sizes

    def old_signatures(self, rows: np.ndarray) -> np.ndarray:
        """Signatures of state rows (reading, verified, only the parts that hold them)."""
        out = np.empty((rows.size, self.cfg.num_perm), np.uint32)
        if rows.size == 0:
            return out
        starts = np.array([c.start for c in self.sig_chunks])
        which = np.searchsorted(starts, rows, side="right") - 1
        for ci in np.unique(which):
            sel = which == ci
            chunk = self.sig_chunks[ci]
            out[sel] = chunk.load(self.cfg.num_perm)[rows[sel] - chunk.start]
        return out


def _cfg(cfg: NearDuplicateConfig | ChecksConfig | None) -> NearDuplicateConfig:
    return cfg.near_duplicate if isinstance(cfg, ChecksConfig) else (cfg or NearDuplicateConfig())


def _part_key(part: SplitInfo) -> str:
    return Path(part.path).name.removeprefix("part-").removesuffix(".parquet")


# ---------------------------------------------------------------- reading a parent's state
def load_state(parent: VersionHandle | None, cfg: NearDuplicateConfig | ChecksConfig | None = None) -> NearDupState:
    """The parent's state, every part verified when read.  A parent without state tables (an
    older version with ``prompt_index.npz``) is converted once from that index and its
    judgments' pair ids; one built with other parameters is rebuilt from its judgments.
    ``origin`` says which happened."""
    cfg = _cfg(cfg)
    if parent is None:
        return NearDupState.empty(cfg)
    if all(parent.table(t) is not None for t in TABLES):
        summary = parent.read(SUMMARY)
        saved = json.loads(summary["params"][0])
        want = state_params(cfg)
        if saved == want:
            return _read_state(parent, cfg, summary)
        diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
        return _rebuild(parent, cfg, f"state of {parent.version_id} has other parameters (saved, wanted): {diff}")
    return _convert(parent, cfg)


def _read_state(parent: VersionHandle, cfg: NearDuplicateConfig, summary: pl.DataFrame) -> NearDupState:
    b, _ = nd.band_params(cfg)
    pt, st = parent.table(PROMPTS), parent.table(SIGNATURES)
    if [_part_key(p) for p in pt.parts] != [_part_key(p) for p in st.parts] or \
            [p.rows for p in pt.parts] != [p.rows for p in st.parts]:
        raise StateError(f"{parent.version_id}: the prompts and signatures tables have different parts")
    n = pt.rows
    cols = ["prompt_hash", *_band_cols(b), *_sketch_cols(cfg.num_perm)]
    jobs = [(p.path, cols) for p in pt.parts] + [(p.path, None) for t in (PAIR_PROMPTS, LINKS, EDGES)
                                                  for p in parent.table(t).parts]
    with ThreadPoolExecutor(2) as pool:  # reading, hashing and Parquet decoding release the GIL
        frames = list(pool.map(lambda job: parent.read(job[0], columns=job[1]), jobs))
    # the arrays filled part by part, column by column: a frame's to_numpy and a transpose would
    # each hold another copy (~0.2 GB each at 3M judgments)
    bc, sc = _band_cols(b), _sketch_cols(cfg.num_perm)
    bands, sketches = np.empty((b, n), _U64), np.empty((n, len(sc)), _U64)
    hashes, row = [], 0
    for k in range(len(pt.parts)):
        f = frames[k]
        frames[k] = f.clear()  # released as it is copied
        m = f.height
        for i, col in enumerate(bc):
            bands[i, row:row + m] = f[col].to_numpy()
        for j, col in enumerate(sc):
            sketches[row:row + m, j] = f[col].to_numpy()
        hashes.append(f["prompt_hash"])
        row += m
    if row != n:
        raise StateError(f"{parent.version_id}: the prompts table holds {row} rows, its parts say {n}")
    prompt_hashes = pl.concat(hashes) if hashes else _empty_table(PROMPTS, b, cfg.num_perm)["prompt_hash"]
    starts = np.cumsum([0, *(p.rows for p in pt.parts)])
    chunks = [_SigChunk(int(a), int(z), handle=parent, path=sp.path) for a, z, sp in zip(starts, starts[1:], st.parts)]
    rest = iter(frames[len(pt.parts):])
    pp, links, edges = ([next(rest).cast(PAIR_PROMPT_SCHEMA if t != EDGES else EDGE_SCHEMA)
                         .with_columns(*([pl.lit(_part_key(p)).alias("_part")] if t == EDGES else []))
                         for p in parent.table(t).parts] for t in (PAIR_PROMPTS, LINKS, EDGES))
    row = summary.row(0, named=True)
    if row["n_prompts"] != n:
        raise StateError(f"{parent.version_id}: the summary counts {row['n_prompts']} prompts, the prompts table {n}")
    return NearDupState(
        cfg=cfg, hashes=prompt_hashes, bands=bands, sketches=sketches, sig_chunks=chunks,
        pair_prompts=pl.concat(pp), edges=pl.concat(edges), n_pairs=row["n_pairs"], n_flagged_pairs=row["n_flagged_pairs"],
        cluster_sizes=dict(zip(row["cluster_pairs"], row["cluster_count"])), parent=parent,
        links=pl.concat(links),
        inherited={t: list(parent.table(t).parts) for t in (*APPEND_ONLY, EDGES)}, origin=f"state of {parent.version_id}")


def _convert(parent: VersionHandle, cfg: NearDuplicateConfig) -> NearDupState:
    """A parent of the single-file layout: its ``prompt_index.npz`` signatures (verified bytes)
    are banded once; everything else is derived from them and the parent's pair ids."""
    rel = next((r for r in parent.manifest().files if r.startswith("prompt_index") and r.endswith(".npz")), None)
    if rel is None:
        return _rebuild(parent, cfg, f"{parent.version_id} has neither state tables nor a prompt index")
    with np.load(io.BytesIO(parent.read_bytes(rel)), allow_pickle=False) as z:
        saved = json.loads(str(z["params"]))
        want = nd.PromptIndex(cfg).params()
        if any(saved.get(k) != v for k, v in want.items()):
            return _rebuild(parent, cfg, f"{rel} of {parent.version_id} was built with other hashing parameters")
        keys = pl.Series("prompt_hash", [str(k) for k in z["keys"]], pl.String)
        sigs = np.ascontiguousarray(z["signatures"], np.uint32)
    pp = parent.read("judgments.parquet", columns=["pair_id", "prompt_hash"]).unique()
    if not pp["prompt_hash"].is_in(keys.implode()).all():
        return _rebuild(parent, cfg, f"{rel} of {parent.version_id} lacks prompts of its judgments")
    order = keys.arg_sort().to_numpy()
    res = _advance(NearDupState.empty(cfg), pp, keys.gather(order), sigs[order], generation=parent.version_id)
    return replace(res.child_state(), origin=f"converted from {rel} of {parent.version_id}")


def _rebuild(parent: VersionHandle, cfg: NearDuplicateConfig, reason: str) -> NearDupState:
    """Hash every prompt of the parent's judgments again (once; the child then carries the state)."""
    cols = ["pair_id", "prompt_hash", "prompt", "prompt_text"]
    judgments = parent.read("judgments.parquet", columns=cols)
    res = run_incremental(judgments, NearDupState.empty(cfg), generation=parent.version_id)
    return replace(res.child_state(), origin=f"rebuilt: {reason}")


# ---------------------------------------------------------------- candidates of the new prompts
def _probe(old: np.ndarray, new: np.ndarray) -> list[np.ndarray]:
    """Per band: the old rows whose band key equals some new prompt's key in that band.
    A bit table over the keys' low bits screens the old keys; the few that pass are matched
    exactly (the keys are fmix64 outputs, so their low bits are uniform)."""
    b = old.shape[0]
    if old.shape[1] == 0 or new.shape[1] == 0:
        return [np.zeros(0, np.int64) for _ in range(b)]
    mask = np.uint32((1 << _PREFILTER_BITS) - 1)
    table = np.zeros(1 << _PREFILTER_BITS, bool)
    out = []
    for t in range(b):
        nk = _unique(new[t])[0]
        slots = nk.view(np.uint32)[::2] & mask  # low 32 bits (little-endian) of each key
        table[slots] = True
        cand = np.flatnonzero(table[old[t].view(np.uint32)[::2] & mask])
        table[slots] = False
        v = old[t, cand]
        pos = np.minimum(np.searchsorted(nk, v), nk.size - 1)
        out.append(cand[nk[pos] == v])
    return out


def _unique(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and their counts (``np.unique`` of numpy 2.4 hashes int64 arrays
    and is ~15x slower than a sort here; Polars' sort, on every core, ~3x faster than numpy's at 12M values)."""
    s = pl.Series(a).sort().to_numpy() if a.size > 65_536 else np.sort(a)
    first = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if s.size else np.zeros(0, np.int64)
    return s[first], np.diff(np.r_[first, s.size])


def _pair_codes(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    keep = lo != hi
    return pl.Series(lo[keep] * n + hi[keep], dtype=pl.Int64).unique().to_numpy()


def _bucket_changes(state: NearDupState, bands_new: np.ndarray, node_of_old: Any, node_of_new: np.ndarray,
                    is_new: np.ndarray, hits: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (codes ``lo * n + hi`` over nodes in prompt_hash order) gained and lost
    in every bucket a new prompt joins, one entry per bucket (a pair's count = its buckets)."""
    n = is_new.size
    empty = np.zeros(0, np.int64)

    def band(t: int) -> tuple[np.ndarray, np.ndarray]:
        keys = np.concatenate([state.bands[t, hits[t]], bands_new[t]])
        nodes = np.concatenate([node_of_old(hits[t]), node_of_new])
        rep = pl.Series(keys).is_duplicated().to_numpy()
        if not rep.any():
            return empty, empty
        keys, nodes = keys[rep], nodes[rep]
        o = np.lexsort((nodes, keys))
        keys, nodes = keys[o], nodes[o]
        now = _pair_codes(*nd.group_pairs(keys, nodes), n)
        lost = empty
        old = ~is_new[nodes]
        if old.sum() > 1:
            before = _pair_codes(*nd.group_pairs(keys[old], nodes[old]), n)
            lost = before[~np.isin(before, now, assume_unique=True)]
        return now[is_new[now // n] | is_new[now % n]], lost  # (before, no candidate had a new member)

    # the bands are independent: two at a time (the sorts release the GIL), put together in band order
    with ThreadPoolExecutor(2, thread_name_prefix="prefpipe-bands") as pool:
        per_band = list(pool.map(band, range(bands_new.shape[0])))
    return (np.concatenate([g for g, _ in per_band]) if per_band else empty,
            np.concatenate([lo for _, lo in per_band]) if per_band else empty)


# ---------------------------------------------------------------- the incremental run
@dataclass
class IncrementalResult:
    """What a child's near-duplicate step produced (see the module docstring for its use)."""

    flags: pl.DataFrame  # near_duplicate flags of the recomputed pairs that are flagged
    recomputed: pl.Series  # pair ids whose flags were recomputed: the batch's pairs and pairs whose prompts' edges changed
    clusters: pl.DataFrame  # pair_id -> near_dup_cluster of every pair whose cluster is new or changed
    metrics: dict[str, Any]  # of the whole version, the keys of run()
    write: dict[str, list[tuple[str, Any]]]  # state parts to write: table -> [(part key, frame or () -> frame)]
    inherit: dict[str, list[SplitInfo]]  # state parts to link from the parent, per table
    parent: VersionHandle | None
    stats: dict[str, Any]  # this run's work (not metrics: they describe the version)
    _child: dict[str, Any]
    order: dict[str, list[str]] = field(default_factory=dict)  # part keys in manifest order, where not linked-then-written

    @property
    def status(self) -> str:
        return "warn" if self.metrics["near_duplicate_pairs"] else "pass"

    def check_result(self) -> CheckResult:
        """The check's entry for the version: metrics of the whole version; flags and the
        ``clusters`` table only for the recomputed / changed pairs (merge them with the parent's)."""
        m = self.metrics
        summary = (f"{m['near_duplicate_pairs']} of {m['pairs']} pairs have a near-duplicate prompt "
                   f"({m['near_duplicate_prompts']} prompts); {m['clusters']} clusters")
        return CheckResult(name=nd.NAME, status=self.status, metrics=m, flags=self.flags,
                           tables={"clusters": self.clusters}, summary=summary)

    def write_state(self, store: Store, stage: Path) -> dict[str, TableInfo]:
        """Write the state tables into a staged version: the parent's unchanged parts as hard
        links, the new and rewritten parts as objects.  Returns the manifest's table entries."""
        from pipeline.parts import TableWriter

        out = {}
        for name in TABLES:  # parts in the order their rows have in the state (trailing: the newest)
            w = TableWriter(store, stage, name, arrival_order=True)
            for part in self.inherit.get(name, []):
                w.inherit(self.parent, part)
            w.write_many(self.write.get(name, []))  # (a 10M first version: ~12 s of parts on one thread before)
            if name in self.order:  # a rewritten edge part keeps its place
                rank = {key: i for i, key in enumerate(self.order[name])}
                w.parts.sort(key=lambda p: rank[_part_key(p)])
            out[name] = w.info()
        return out

    def all_clusters(self) -> pl.DataFrame:
        """pair_id -> near_dup_cluster of *every* pair of the version, in no order (what a full run's ``clusters``
        table holds): the state's pair rows after this run joined with the components of its graph."""
        c = self._child
        if c["state"].holds_nothing():  # (a first version: every pair's cluster is in ``clusters`` already)
            return self.clusters
        rows = pl.concat([c["state"].pair_prompts, c["pair_prompts"]])
        out = rows.join(c["components"], on="prompt_hash", how="left") \
            .select("pair_id", near_dup_cluster=pl.col("cluster").fill_null(pl.col("prompt_hash")))
        # a pair has one row unless it has several prompts (they are the links, and in one cluster): only those
        # rows are made unique (a unique of every pair's row cost ~0.1 s at 3M judgments); in no order
        several = pl.col("pair_id").is_in(c["links"]["pair_id"].implode())
        return pl.concat([out.filter(~several), out.filter(several).unique("pair_id", keep="any")])

    def graph_clusters(self) -> pl.Series:
        """The names of the clusters of the graph (near-duplicate edges, pairs with several
        prompts): every other cluster holds one prompt -- what the report's clusters of several
        prompts are looked for among."""
        return self._child["components"]["cluster"].unique().rename("near_dup_cluster")

    def release(self) -> None:
        """Drop what only :meth:`all_clusters` and :meth:`child_state` read (the parent's bands and
        sketches: ~0.3 GB at 3M judgments); :meth:`write_state` still works.  For a build that has
        taken the clusters and keeps the result only to write the state at the end."""
        self._child = {}

    def child_state(self) -> NearDupState:
        """The state after this run, in memory (what ``load_state`` of the child would read;
        built on demand: curate writes the parts and a child reads them back)."""
        c = self._child
        old: NearDupState = c["state"]
        n_old, m = len(old), c["fresh"].len()
        return NearDupState(
            cfg=old.cfg, hashes=pl.concat([old.hashes, c["fresh"]]), bands=np.concatenate([old.bands, c["bands"]], axis=1),
            sketches=np.concatenate([old.sketches, c["sketches"]]),
            sig_chunks=[*old.sig_chunks, *([_SigChunk(n_old, n_old + m, array=_rows(c["sigs"], 0, m))] if m else [])],
            pair_prompts=pl.concat([old.pair_prompts, c["pair_prompts"]]), edges=c["edges"],
            n_pairs=self.metrics["pairs"], n_flagged_pairs=self.metrics["near_duplicate_pairs"],
            cluster_sizes=c["cluster_sizes"], parent=self.parent, inherited=self.inherit, pending=self.write,
            origin="in memory", links=c["links"])


def run_incremental(batch: pl.DataFrame, state: NearDupState, *, generation: str) -> IncrementalResult:
    """The near-duplicate check of a child version whose parent's state is ``state``.

    ``batch``: the new judgments (pair_id, prompt_hash, prompt and/or prompt_text); pairs and
    prompts the state knows already may be among them.  Only prompts new to the state are
    hashed.  ``generation`` (the child's version id) names the parts it writes."""
    cfg = state.cfg
    first = batch.select(pl.col("prompt_hash").is_first_distinct()).to_series()
    prompts = batch.select("prompt_hash", *(["prompt"] if "prompt" in batch.columns else []),
                           *(["prompt_text"] if "prompt_text" in batch.columns else [])).filter(first)
    t0 = time.perf_counter()
    fresh = prompts.join(state.hashes.to_frame("prompt_hash"), on="prompt_hash", how="anti").sort("prompt_hash")
    t1 = time.perf_counter()
    sigs = nd.signatures(nd.shingle_text(fresh), cfg) if fresh.height else np.zeros((0, cfg.num_perm), np.uint32)
    pp = batch.select(pl.col("pair_id").cast(pl.String), pl.col("prompt_hash").cast(pl.String)).unique()
    t2 = time.perf_counter()
    res = _advance(state, pp, fresh["prompt_hash"], sigs, generation=generation)
    res.stats["seconds"] = {"known_prompts": round(t1 - t0, 4), "hash_new_prompts": round(t2 - t1, 4), **res.stats["seconds"]}
    return res


class SignatureSource(Protocol):
    """The new prompts' signatures where they are (a build's: in its partitions' caches), read in
    pieces: rows in any order for the candidates to verify, then consecutive chunks, in order, for
    the signatures' state parts."""

    shape: tuple[int, int]

    def gather(self, rows: np.ndarray) -> np.ndarray: ...

    def chunk(self, start: int, stop: int) -> np.ndarray: ...


Signatures = np.ndarray | SignatureSource


def _gathered(sigs: Signatures, *row_sets: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(a signature matrix, ``row_sets`` as rows of it): ``sigs`` itself, or the rows of a source
    that the sets name, each read once."""
    if isinstance(sigs, np.ndarray):
        return sigs, list(row_sets)
    named = np.zeros(sigs.shape[0], bool)  # (a mask and its running count: a sort of every candidate's rows took
    for rows in row_sets:                    # ~4 s at 3.7M candidate pairs)
        named[rows] = True
    at = np.cumsum(named) - 1
    return sigs.gather(np.flatnonzero(named)), [at[rows] for rows in row_sets]


def _rows(sigs: Signatures, start: int, stop: int) -> np.ndarray:
    return sigs[start:stop] if isinstance(sigs, np.ndarray) else sigs.chunk(start, stop)


def _advance(state: NearDupState, batch_pp: pl.DataFrame, fresh: pl.Series, sigs: Signatures, *,
             generation: str, bands: np.ndarray | None = None, sketches: np.ndarray | None = None) -> IncrementalResult:
    """:func:`run_incremental` once the new prompts (``fresh``, not in the state) are hashed.
    ``sigs``: their signatures, or where they are (:class:`SignatureSource`) with their ``bands``
    and ``sketches`` computed (a build's first version: only the candidates' signatures are read)."""
    cfg, num_perm = state.cfg, state.cfg.num_perm
    b, r = nd.band_params(cfg)
    m = fresh.len()
    clock = _Clock()
    if bands is None or sketches is None:
        assert isinstance(sigs, np.ndarray), "a signature source comes with its bands and sketches"
        bands = nd._band_keys(sigs, b, r) if m else np.zeros((b, 0), _U64)
        sketches = sketch(sigs)
    bands_new, sk_new = bands, sketches

    # 1. the buckets the new prompts join: old members found through the persisted band keys
    hits = _probe(state.bands, bands_new)
    old_rows = _unique(np.concatenate(hits))[0] if hits else np.zeros(0, np.int64)
    node_hash = pl.concat([state.hashes.gather(old_rows), fresh.rename("prompt_hash")])
    order = node_hash.arg_sort().to_numpy()  # nodes numbered in prompt_hash order, as rows of a full run
    n = order.size
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    hash_of = node_hash.gather(order)
    is_new = np.zeros(n, bool)
    is_new[rank[old_rows.size:]] = True
    row_of = np.full(n, -1, np.int64)  # node -> old row or new row
    row_of[rank[:old_rows.size]] = old_rows
    row_of[rank[old_rows.size:]] = np.arange(m)
    gained, lost = _bucket_changes(state, bands_new, lambda rows: rank[np.searchsorted(old_rows, rows)],
                                   rank[old_rows.size:], is_new, hits)

    clock.lap("buckets")
    # 2. verify the gained candidates: estimated Jaccard; against an old prompt, the sketch first
    codes, support = _unique(gained)
    lo, hi = codes // max(n, 1), codes % max(n, 1)
    jac = np.zeros(codes.size, np.float32)
    both = is_new[lo] & is_new[hi]
    new_side, old_side = np.where(is_new[lo], lo, hi)[~both], np.where(is_new[lo], hi, lo)[~both]
    bound = sketch_jaccard(sk_new[row_of[new_side]], state.sketches[row_of[old_side]], num_perm)
    maybe = np.flatnonzero(bound >= cfg.threshold)
    # two new prompts: the sketches first too (an upper bound: a pair below the threshold there is below it) -- of
    # 3.7M candidate pairs at 3M judgments, the signatures of only those that pass are read
    lo_new, hi_new = row_of[lo[both]], row_of[hi[both]]
    passed = np.flatnonzero(_sketch_bound(sk_new, lo_new, hi_new, num_perm) >= cfg.threshold)
    # the new prompts' signatures these read (of a source: only theirs, each read once)
    held, (left, right, mine) = _gathered(sigs, lo_new[passed], hi_new[passed], row_of[new_side[maybe]])
    jac_both = np.zeros(lo_new.size, np.float32)
    jac_both[passed] = nd.estimated_jaccard(held, held, left, right)
    jac[both] = jac_both
    mixed = np.zeros(new_side.size, np.float32)
    old_sigs = state.old_signatures(row_of[old_side[maybe]])
    mixed[maybe] = nd.estimated_jaccard(held, old_sigs, mine, np.arange(maybe.size))
    del held
    jac[~both] = mixed
    keep = jac >= cfg.threshold
    added = pl.DataFrame({"left": hash_of.gather(lo[keep]), "right": hash_of.gather(hi[keep]), "jaccard": jac[keep],
                          "support": support[keep]}).cast(EDGE_SCHEMA).with_columns(_part=pl.lit(generation))

    clock.lap("verify")
    # 3. old edges that lost buckets (a bucket grew past 16 members, or its chain / first member changed)
    lcodes, lcount = _unique(lost)
    loss = pl.DataFrame({"left": hash_of.gather(lcodes // max(n, 1)), "right": hash_of.gather(lcodes % max(n, 1)),
                         "_lost": lcount.astype(np.int64)})
    old_edges = state.edges
    hit_edges = old_edges.join(loss, on=["left", "right"], how="inner")
    if (hit_edges["support"].cast(pl.Int64) < hit_edges["_lost"]).any():
        raise StateError("an edge lost more LSH buckets than it was a candidate in: the state is inconsistent")
    changed = hit_edges.with_columns(support=(pl.col("support").cast(pl.Int64) - pl.col("_lost")).cast(pl.UInt16)).drop("_lost")
    removed = changed.filter(pl.col("support") == 0)
    edges = pl.concat([old_edges.join(changed, on=["left", "right"], how="anti"),
                       changed.filter(pl.col("support") > 0), added]).sort("left", "right")

    clock.lap("edges")
    # 4-6. the pair rows, flags and clusters (a first version's without the joins against a parent's rows)
    pr = (_first_rows if state.holds_nothing() else _child_rows)(state, batch_pp, fresh, old_edges, edges, added,
                                                                    removed, clock)
    pp_old, links_old = state.pair_prompts, state.links
    pp_new, links_add, links_new, comp_new = pr.pp_new, pr.links_add, pr.links_new, pr.comp_new
    flags, recomputed, clusters, sizes = pr.flags, pr.recomputed, pr.clusters, pr.sizes
    n_new_pairs, n_flagged = pr.n_new_pairs, state.n_flagged_pairs + pr.n_flagged_delta

    clock.lap("cluster_sizes")
    n_prompts = len(state) + m
    n_pairs = state.n_pairs + n_new_pairs
    nd_prompts = pl.concat([edges["left"], edges["right"]]).n_unique()
    metrics: dict[str, Any] = {
        "prompts": n_prompts,
        "prompts_hashed": m,
        "index_prompts_before": len(state),
        "index_prompts": n_prompts,
        "near_duplicate_prompts": nd_prompts,
        "near_duplicate_pairs": n_flagged,
        "near_duplicate_rate": n_flagged / n_pairs if n_pairs else 0.0,
        "pairs": n_pairs,
        "clusters": sum(sizes.values()),
        "largest_cluster_pairs": max(sizes, default=0),
        "multi_pair_clusters": sum(v for k, v in sizes.items() if k > 1),
        "index": {**nd.PromptIndex(cfg).params(), "threshold": cfg.threshold, "candidate_threshold": cfg.candidate_threshold,
                  "bands": b, "rows": r, "backend": "numpy"},
    }

    # 7. the child's parts: the parent's linked, this version's written -- the parent's trailing parts
    # merged into it (a level compaction, prompts and signatures alike) -- and rewritten edge parts
    sig_parts_read = sum(c.handle is not None and c.array is not None for c in state.sig_chunks)
    inherit = {t: list(state.inherited.get(t, [])) for t in APPEND_ONLY}
    write = {t: list(state.pending.get(t, [])) for t in APPEND_ONLY}
    merged = {t: _merged_tail(state, t, n, height) for t, n, height in (
        (PROMPTS, m, len(state)), (PAIR_PROMPTS, pp_new.height, pp_old.height), (LINKS, links_add.height, links_old.height))}
    merged[SIGNATURES] = merged[PROMPTS]
    tail = {t: sum(p.rows for p in inherit[t][len(inherit[t]) - k:]) for t, k in merged.items()}  # rows merged
    for t, k in merged.items():
        del inherit[t][len(inherit[t]) - k:]
    start = len(state) - tail[PROMPTS]  # the merged parts' rows come first, in their order
    hashes = pl.concat([state.hashes.slice(start), fresh.rename("prompt_hash")])
    if start == len(state):  # nothing of the parent's merged in (a first version): the new rows as they are, not copied
        bands_part, sk_part, sig_part = bands_new, sk_new, sigs
    else:
        bands_part = np.concatenate([state.bands[:, start:], bands_new], axis=1)
        sk_part = np.concatenate([state.sketches[start:], sk_new])
        sig_part = np.concatenate([state.old_signatures(np.arange(start, len(state))), _rows(sigs, 0, m)])
    for i in range(0, hashes.len(), CHUNK):  # (each part's frame made when it is written: made here, the frames
        key = f"{generation}-{i // CHUNK:03d}"  # were a second copy of every signature and band key: ~1 GB per
        h = hashes.slice(i, CHUNK)               # 2M prompts)
        write[PROMPTS].append((key, functools.partial(_prompts_part, h, bands_part, sk_part, num_perm, i)))
        write[SIGNATURES].append((key, functools.partial(_signatures_part, h, sig_part, num_perm, i)))
    for t, old, rows in ((PAIR_PROMPTS, pp_old, pp_new), (LINKS, links_old, links_add)):
        rows = pl.concat([old.slice(old.height - tail[t]), rows])
        if rows.height:
            write[t].append((generation, rows))
    edges, order, inherit[EDGES], write[EDGES], merged[EDGES] = _edge_parts(state, edges, changed, added.height, generation)
    write[SUMMARY] = [("all", pl.DataFrame({
        "params": [json.dumps(state_params(cfg), sort_keys=True)], "n_prompts": [n_prompts], "n_pairs": [n_pairs],
        "n_flagged_pairs": [n_flagged], "cluster_pairs": [list(sizes)], "cluster_count": [list(sizes.values())]},
        schema={"params": pl.String, "n_prompts": pl.Int64, "n_pairs": pl.Int64, "n_flagged_pairs": pl.Int64,
                "cluster_pairs": pl.List(pl.Int64), "cluster_count": pl.List(pl.Int64)}))]
    for t, schema in ((PROMPTS, None), (SIGNATURES, None), (EDGES, EDGE_SCHEMA), (PAIR_PROMPTS, PAIR_PROMPT_SCHEMA),
                      (LINKS, PAIR_PROMPT_SCHEMA)):
        if not inherit[t] and not write[t]:  # a table always has a part, so that readers see its columns
            write[t].append((generation, _empty_table(t, b, num_perm) if schema is None else pl.DataFrame(schema=schema)))

    clock.lap("parts")
    child = {"state": state, "fresh": fresh.rename("prompt_hash"), "bands": bands_new, "sketches": sk_new, "sigs": sigs,
             "pair_prompts": pp_new, "links": links_new, "edges": edges, "cluster_sizes": sizes, "components": comp_new}
    stats = {"prompts_hashed": m, "old_bucket_members": int(old_rows.size), "candidates_gained": int(codes.size),
             "candidates_lost": int(lcodes.size), "sketch_passed": int(maybe.size),
             "signature_parts_read": sig_parts_read, "parts_merged": merged,
             "edges_added": added.height, "edges_removed": removed.height, "recomputed_pairs": recomputed.len(),
             "changed_clusters_pairs": clusters.height, "origin": state.origin, "seconds": clock.laps}
    return IncrementalResult(flags=flags, recomputed=recomputed, clusters=clusters, metrics=metrics, write=write,
                             inherit=inherit, parent=state.parent, stats=stats, _child=child, order={EDGES: order})


@dataclass
class _PairRows:
    """Steps 4-6 of :func:`_advance`: the pair rows written, the links, the components after the run, the
    recomputed pairs' flags, the clusters of the pairs whose cluster is new or changed, the cluster-size histogram."""

    pp_new: pl.DataFrame
    n_new_pairs: int
    links_add: pl.DataFrame
    links_new: pl.DataFrame
    comp_new: pl.DataFrame
    recomputed: pl.Series
    flags: pl.DataFrame
    n_flagged_delta: int
    clusters: pl.DataFrame
    sizes: dict[int, int]


def _child_rows(state: NearDupState, batch_pp: pl.DataFrame, fresh: pl.Series, old_edges: pl.DataFrame,
                edges: pl.DataFrame, added: pl.DataFrame, removed: pl.DataFrame, clock: _Clock) -> _PairRows:
    """Steps 4-6 of :func:`_advance` over a parent's state: only the parent's rows around a change are read."""
    # 4. the pair rows a child needs: two passes over the parent's rows, by pair id then by prompt
    pp_old = state.pair_prompts
    batch_pairs = batch_pp.select("pair_id").unique()
    pp_bo = pp_old.join(batch_pairs, on="pair_id", how="semi")  # the parent's rows of the batch's pairs
    pp_new = batch_pp.join(pp_bo, on=["pair_id", "prompt_hash"], how="anti").sort("pair_id", "prompt_hash")
    n_new_pairs = batch_pairs.join(pp_bo, on="pair_id", how="anti").height
    grown = pl.concat([pp_bo.join(pp_new, on="pair_id", how="semi"), pp_new])  # every row of a pair that gained one
    links_old = state.links
    links_add = (grown.filter(pl.col("pair_id").is_duplicated())  # a pair with a second prompt joins the links
                 .join(links_old, on=["pair_id", "prompt_hash"], how="anti").sort("pair_id", "prompt_hash"))
    links_new = pl.concat([links_old, links_add])
    # clusters: components of the small graph (edges + pairs with several prompts), before and after
    comp_old, comp_new = _components(old_edges, links_old), _components(edges, links_new)
    both_names = comp_old.join(comp_new, on="prompt_hash", how="full", coalesce=True, suffix="_new").with_columns(
        pl.col("cluster").fill_null(pl.col("prompt_hash")), pl.col("cluster_new").fill_null(pl.col("prompt_hash")))
    renamed = both_names.filter(pl.col("cluster") != pl.col("cluster_new"))["prompt_hash"]
    touched = pl.concat([added["left"], added["right"], removed["left"], removed["right"]]).unique().rename("prompt_hash")
    # the clusters around every change (an edge, or a pair row, which links its pair's old prompts too)
    moved = pl.concat([touched, grown["prompt_hash"]]).unique()
    around_old = _members(comp_old, moved.filter(~moved.is_in(fresh.implode())))
    around_new = _members(comp_new, moved)
    need = pl.concat([touched, renamed, around_old["prompt_hash"], around_new["prompt_hash"]]).unique().to_frame("prompt_hash")
    rows_old = pl.concat([pp_bo, pp_old.join(need, on="prompt_hash", how="semi"), links_old]).unique()
    rows_new = pl.concat([rows_old, pp_new])

    clock.lap("pair_rows")
    # 5. flags of the batch's pairs and of the pairs whose prompts' edges changed
    # (no old row -- a batch of new pairs only: every row is the batch's and every pair is recomputed; the filters below
    # would copy every pair's row, ~0.1 GB a million pairs, each)
    first = rows_old.height == 0
    recomputed = batch_pairs["pair_id"].sort() if first else \
        pl.concat([batch_pairs["pair_id"], rows_old.filter(pl.col("prompt_hash").is_in(touched.implode()))["pair_id"]]).unique().sort()
    pp_touched_old = rows_old if first else rows_old.filter(pl.col("pair_id").is_in(recomputed.implode()))
    pp_touched = rows_new if first else rows_new.filter(pl.col("pair_id").is_in(recomputed.implode()))
    _, flags = nd.pair_flags(pp_touched, nd.best_neighbours(edges, pp_touched["prompt_hash"].unique()))
    before = pp_touched_old.join(nd.best_neighbours(old_edges, pp_touched_old["prompt_hash"].unique()),
                                 left_on="prompt_hash", right_on="left", how="semi")["pair_id"].n_unique()

    # 6. clusters of the batch's pairs and of the pairs of renamed prompts; cluster sizes (pairs per
    # cluster) updated by the clusters around every change, before and after
    cluster_pairs = pl.concat([batch_pairs["pair_id"], rows_old.filter(pl.col("prompt_hash").is_in(renamed.implode()))["pair_id"]])
    clusters = ((rows_new if first else rows_new.filter(pl.col("pair_id").is_in(cluster_pairs.implode())))
                .join(comp_new, on="prompt_hash", how="left")
                .select("pair_id", near_dup_cluster=pl.col("cluster").fill_null(pl.col("prompt_hash")))
                .group_by("pair_id").agg(pl.col("near_dup_cluster").first()).sort("pair_id"))
    sizes = dict(state.cluster_sizes)
    for sign, around, rows in ((-1, around_old, rows_old), (1, around_new, rows_new)):
        for size in rows.join(around, on="prompt_hash").group_by("cluster").agg(pl.col("pair_id").n_unique())["pair_id"]:
            sizes[size] = sizes.get(size, 0) + sign
    if any(v < 0 for v in sizes.values()):
        raise StateError("the cluster-size histogram went negative: the state is inconsistent")
    sizes = {k: v for k, v in sorted(sizes.items()) if v}
    return _PairRows(pp_new, n_new_pairs, links_add, links_new, comp_new, recomputed, flags, flags.height - before,
                     clusters, sizes)


def _first_rows(state: NearDupState, batch_pp: pl.DataFrame, fresh: pl.Series, old_edges: pl.DataFrame,
                edges: pl.DataFrame, added: pl.DataFrame, removed: pl.DataFrame, clock: _Clock) -> _PairRows:
    """:func:`_child_rows` of a state that holds nothing (a first version): every pair is new and recomputed, every
    row is the batch's.  The same results without a parent's joins and copies (at 3M judgments they were ~10 frames
    of every pair's row at once, ~0.3 GB): the batch's rows as they are when sorted, each pair's cluster from its
    first row (a pair's rows are one cluster: its prompts are linked), the histogram from the clusters."""
    c = pl.col
    pp_new = batch_pp if _sorted_pairs(batch_pp) else batch_pp.sort("pair_id", "prompt_hash")
    links_add = pp_new.filter(c("pair_id").is_duplicated())  # (sorted, as pp_new)
    links_new = pl.concat([state.links, links_add])
    comp_new = _components(edges, links_new)
    clock.lap("pair_rows")
    _, flags = nd.pair_flags(pp_new, nd.best_neighbours(edges, pp_new["prompt_hash"].unique()))
    clusters = (pp_new.unique("pair_id", keep="first", maintain_order=True)
                .join(comp_new, on="prompt_hash", how="left", maintain_order="left")
                .select("pair_id", near_dup_cluster=c("cluster").fill_null(c("prompt_hash"))))
    counts = clusters.group_by("near_dup_cluster").len()["len"].value_counts()
    sizes = {int(k): int(v) for k, v in sorted(counts.iter_rows())}
    return _PairRows(pp_new, clusters.height, links_add, links_new, comp_new, clusters["pair_id"], flags, flags.height,
                     clusters, sizes)


def _sorted_pairs(pp: pl.DataFrame) -> bool:
    """``pp`` sorted by (pair_id, prompt_hash) (equal rows in any order)."""
    if pp.height < 2 or pp["pair_id"].null_count() or pp["prompt_hash"].null_count():
        return pp.height < 2
    a, b = pl.col("pair_id"), pl.col("prompt_hash")
    ok = (a.shift(-1) > a) | ((a.shift(-1) == a) & (b.shift(-1) >= b))
    return bool(pp.select(ok.slice(0, pp.height - 1).all()).item())


def _prompts_part(h: pl.Series, bands: np.ndarray, sketches: np.ndarray, num_perm: int, i: int) -> pl.DataFrame:
    b = bands.shape[0]
    return pl.DataFrame({"prompt_hash": h, **dict(zip(_band_cols(b), bands[:, i:i + CHUNK])),
                         **dict(zip(_sketch_cols(num_perm), sketches[i:i + CHUNK].T))})


def _signatures_part(h: pl.Series, sigs: Signatures, num_perm: int, i: int) -> pl.DataFrame:
    """(a source's chunks are read in order: :meth:`IncrementalResult.write_state` writes the parts so)"""
    return pl.DataFrame({"prompt_hash": h, **dict(zip(_sig_cols(num_perm), _rows(sigs, i, i + h.len()).T))})


def part_frame(part: pl.DataFrame | Callable[[], pl.DataFrame]) -> pl.DataFrame:
    """A state part to write: a frame, or the function that makes it (the prompts' and signatures' parts)."""
    return part if isinstance(part, pl.DataFrame) else part()


def _merged_tail(state: NearDupState, table: str, fresh: int, height: int) -> int:
    """How many of the parent's trailing parts of an append-only table this version's part of
    ``fresh`` rows absorbs (:func:`~pipeline.parts.parts_to_merge`; a merged part holds at most
    :data:`CHUNK` rows, so a version rewrites at most that many a table).  None behind a part
    still pending (a converted or rebuilt state, an in-memory chain: written as they are).
    ``height``: the state's rows of the table, which are its inherited parts' rows in order."""
    parts = state.inherited.get(table, [])
    if state.pending.get(table):
        return 0
    if sum(p.rows for p in parts) != height:
        raise StateError(f"{table}: the parts hold {sum(p.rows for p in parts)} rows, the state {height}")
    return parts_to_merge([p.rows for p in parts], fresh, cap=CHUNK)


def _edge_parts(state: NearDupState, edges: pl.DataFrame, changed: pl.DataFrame, n_added: int, generation: str
                ) -> tuple[pl.DataFrame, list[str], list[SplitInfo], list[tuple[str, pl.DataFrame]], int]:
    """The edges' parts of the child: a part of the parent is linked unless one of its edges
    changed (then rewritten in its place); this version's new edges (``_part == generation``)
    absorb the trailing parts like an append-only table (:func:`_merged_tail`: their edges
    relabelled).  Returns the edges relabelled, the part keys in order, the parts to link, the
    parts to write and how many parts were merged."""
    edge_parts = {_part_key(p): p for p in state.inherited.get(EDGES, [])}
    keys = [*edge_parts, *(k for k, _ in state.pending.get(EDGES, []) if k not in edge_parts)]
    now = dict(edges.group_by("_part").len().iter_rows())  # a changed part: its rows after the change
    k = 0 if state.pending.get(EDGES) else parts_to_merge([now.get(key, 0) for key in keys], n_added, cap=CHUNK)
    absorbed = keys[len(keys) - k:]
    if absorbed:
        edges = edges.with_columns(_part=pl.when(pl.col("_part").is_in(absorbed)).then(pl.lit(generation))
                                   .otherwise(pl.col("_part")))
    groups = {key: g.drop("_part") for (key,), g in edges.group_by("_part", maintain_order=True)}
    order = keys[:len(keys) - k]
    order += [key for key in groups if key not in order and key != generation] + [generation]
    rewrite = set(changed["_part"].to_list()) | {generation}
    inherit = [edge_parts[key] for key in order if key in edge_parts and key not in rewrite]
    write = [(key, groups[key]) for key in order if key in groups and (key in rewrite or key not in edge_parts)]
    return edges, order, inherit, write, k


class _Clock:
    """Seconds per phase of a run (in ``stats``: where the time of a child goes)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 4)
        self._t = now


def _empty_table(table: str, b: int, num_perm: int) -> pl.DataFrame:
    cols = _band_cols(b) + _sketch_cols(num_perm) if table == PROMPTS else _sig_cols(num_perm)
    dtype = pl.UInt64 if table == PROMPTS else pl.UInt32
    return pl.DataFrame(schema={"prompt_hash": pl.String, **{c: dtype for c in cols}})


def _components(edges: pl.DataFrame, links: pl.DataFrame) -> pl.DataFrame:
    """prompt_hash -> cluster (the smallest prompt_hash of its component) for every prompt of the
    graph of near-duplicate edges and of pairs with several prompts; other prompts are alone."""
    first = links.group_by("pair_id").agg(first=pl.col("prompt_hash").min())
    tie = links.join(first, on="pair_id").select(left="prompt_hash", right="first").filter(pl.col("left") != pl.col("right"))
    e = pl.concat([edges.select("left", "right"), tie])
    nodes = pl.concat([e["left"], e["right"]]).unique().sort()
    if nodes.len() == 0:
        return pl.DataFrame(schema={"prompt_hash": pl.String, "cluster": pl.String})
    index = pl.DataFrame({"h": nodes, "i": np.arange(nodes.len())})
    ij = e.join(index, left_on="left", right_on="h").join(index, left_on="right", right_on="h", suffix="_r")
    n = nodes.len()
    graph = coo_matrix((np.ones(ij.height, np.int8), (ij["i"].to_numpy(), ij["i_r"].to_numpy())), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    return (pl.DataFrame({"prompt_hash": nodes, "comp": comp})  # nodes are sorted: a component's first is its smallest
            .with_columns(cluster=pl.col("prompt_hash").first().over("comp")).select("prompt_hash", "cluster"))


def _members(comp: pl.DataFrame, prompts: pl.Series) -> pl.DataFrame:
    """(prompt_hash, cluster) of every member of the clusters that hold one of ``prompts``
    (graph clusters from ``comp``; a prompt outside the graph is its own cluster)."""
    names = prompts.to_frame("prompt_hash").join(comp, on="prompt_hash", how="left").select(
        pl.col("cluster").fill_null(pl.col("prompt_hash"))).to_series().unique()
    return pl.concat([comp.filter(pl.col("cluster").is_in(names.implode())),
                      prompts.to_frame("prompt_hash").join(comp, on="prompt_hash", how="anti")
                      .with_columns(cluster=pl.col("prompt_hash"))])


# ---------------------------------------------------------------- merging with the parent's outputs
def merge_flags(parent_flags: pl.DataFrame, res: IncrementalResult) -> pl.DataFrame:
    """The version's flags: the parent's, without this check's flags of the recomputed pairs, plus the new ones."""
    stale = (pl.col("check") == nd.NAME) & (pl.col("subject_kind") == "pair") & pl.col("subject_id").is_in(res.recomputed.implode())
    return pl.concat([parent_flags.filter(~stale), res.flags], how="vertical_relaxed")


def merge_clusters(parent_clusters: pl.DataFrame, res: IncrementalResult) -> pl.DataFrame:
    """pair_id -> near_dup_cluster for every pair of the version (the parent's, updated)."""
    return pl.concat([parent_clusters.join(res.clusters, on="pair_id", how="anti"), res.clusters]).sort("pair_id")


__all__ = ["EDGES", "PAIR_PROMPTS", "PROMPTS", "SIGNATURES", "SUMMARY", "TABLES", "IncrementalResult", "NearDupState",
           "StateError", "load_state", "merge_clusters", "merge_flags", "run_incremental", "sketch", "sketch_jaccard",
           "state_params"]
