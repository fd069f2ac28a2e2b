"""Facts a certification computes once per part, and takes from a verified earlier certification.

A child version shares almost every part with its parent (a 10k batch on a 3M-judgment history
writes one new part per split table and links 256).  Everything certification computes from a
part alone is a fact about the part's bytes: its GX result, its rows per locale, its AI-labelled
rows, its kept pairs whose chosen response is ``a``, and the (inode, size, mtime) it had when
its sha256 was checked.  A certification writes those facts for every part of the version to
``certifications/VERSION/part-facts-<sha12>.parquet`` and binds that file's sha256 into its
record (signed with the record when signing is configured).  The next certification of the
version, or of a child, takes the facts of every part with the same sha256 from there, and
computes only the parts that are new, so its cost follows the batch, not the history.

Facts are taken only from a record that verifies: it names the version, its signature holds
(when a key is configured), it binds the version's current ``manifest.json``, its facts file
matches the sha256 it binds, and the facts were computed by the same code (``code_version``).
Anything else: no facts are taken, every part is computed (the cost of a first certification).

The agreement gates need every judgment of a pair, which no part holds: they run on integer
sums over pairs (``pipeline.overlap.overlap_state``) kept in the record
(``Certification.agreement_state``); a child's sums are its parent's minus the old
contributions of the pairs its new judgments touch plus their new ones (:func:`agreement_state`).

What neither covers, certification still reads across the version: the ``pair_id`` column of
every split part (a pair id must be unique across parts, which no per-part fact proves), the
judgments' ``pair_id`` column (to find the touched pairs' judgments), and the flags table.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.store import Store, StoreError, VersionHandle, atomic_write_bytes
from schemas.ids import safe_id
from schemas.manifest import PartFactsRef
from schemas.version import code_version

FORMAT = 1
FACTS_SCHEMA: dict[str, Any] = {
    "sha256": pl.String,
    "ino": pl.Int64, "size": pl.Int64, "mtime_ns": pl.Int64,  # the file when its sha256 was last checked
    "gx_evaluated": pl.Int64,   # split parts: expectations met (null: not validated)
    "locales": pl.List(pl.Struct({"locale": pl.String, "n": pl.Int64})),  # split parts: rows per locale
    "ai": pl.Int64,             # split parts: rows labelled by AI judges only
    "keep": pl.Int64,           # pairs parts: kept pairs
    "keep_a": pl.Int64,         # pairs parts: kept pairs whose consensus label is ``a``
}
NO_LOCALE = "(none)"


def facts_key() -> str:
    """Facts are reused only between certifications by the same code (and facts format)."""
    return f"{FORMAT}:{code_version()}"


def empty_facts() -> pl.DataFrame:
    return pl.DataFrame(schema=FACTS_SCHEMA)


def stat_facts(facts: pl.DataFrame) -> dict[str, tuple[int, int, int]]:
    """sha256 -> (inode, size, mtime_ns) a part had when its sha256 was checked: what
    :func:`pipeline.store.verify_files` takes as ``known`` (a part that still has them is not hashed again)."""
    return {r["sha256"]: (r["ino"], r["size"], r["mtime_ns"]) for r in facts.iter_rows(named=True)}


def _record_ok(store: Store, h: VersionHandle, rec: dict[str, Any] | None, ring: Any) -> PartFactsRef | None:
    from pipeline.signing import verify_record

    if not rec or rec.get("version_id") != h.version_id or not rec.get("part_facts"):
        return None
    if ring is not None and verify_record(rec, ring):
        return None
    try:
        ref = PartFactsRef.model_validate(rec["part_facts"])
        if rec.get("manifest_sha256") != h.manifest_sha256():
            return None
    except (ValueError, StoreError):
        return None
    if ref.path != _facts_rel(h.version_id, ref.sha256).as_posix():  # a record names no other file
        return None
    return ref if ref.key == facts_key() else None


def load_prior_facts(store: Store, handles: Iterable[VersionHandle | None]) -> tuple[pl.DataFrame, str | None, dict[str, Any] | None]:
    """Facts of the first of ``handles`` (the version itself, then its parent) whose latest
    certification verifies (see the module doc), with that version's id and record; empty facts otherwise."""
    from pipeline.signing import load_keyring

    ring = load_keyring()
    for h in handles:
        if h is None:
            continue
        try:
            rec = store.latest_certification(h.version_id)
            ref = _record_ok(store, h, rec, ring)
        except StoreError:
            continue
        if ref is None:
            continue
        path = store.root / ref.path
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            continue
        try:
            facts = pl.read_parquet(io.BytesIO(data))
            facts = facts.select(list(FACTS_SCHEMA)).cast(FACTS_SCHEMA)
        except (pl.exceptions.PolarsError, OSError):
            continue
        if facts.height == ref.rows:
            return facts, h.version_id, rec
    return empty_facts(), None, None


def _facts_rel(version_id: str, sha: str) -> Path:
    return Path("certifications") / safe_id(version_id, what="version id") / f"part-facts-{sha[:12]}.parquet"


def write_facts(store: Store, version_id: str, facts: pl.DataFrame) -> PartFactsRef:
    """Write the facts file under ``certifications/VERSION/`` atomically; its name carries its
    sha256, so two certifications never overwrite each other's file."""
    buf = io.BytesIO()
    facts.select(list(FACTS_SCHEMA)).cast(FACTS_SCHEMA).sort("sha256").write_parquet(buf, compression="zstd")
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    rel = _facts_rel(version_id, sha)
    path = store.root / rel
    if not path.exists():
        atomic_write_bytes(path, data)
    return PartFactsRef(path=rel.as_posix(), sha256=sha, rows=facts.height, key=facts_key())


def split_part_facts(frame: pl.DataFrame) -> dict[str, Any]:
    """Per-part facts of a DPO split part (everything but GX)."""
    loc = (frame.group_by(pl.col("locale").fill_null(NO_LOCALE)).len().sort("locale")
           .select(pl.struct(locale="locale", n=pl.col("len").cast(pl.Int64)).alias("s"))["s"].to_list())
    return {"locales": loc, "ai": int((frame["annotator_kind"] == "ai").sum())}


def pairs_part_facts(frame: pl.DataFrame) -> dict[str, Any]:
    """Per-part facts of a ``pairs`` part: kept pairs, and those whose consensus label is ``a``."""
    keep = frame.filter(pl.col("decision") == "keep")
    return {"keep": keep.height, "keep_a": int((keep["label_consensus"] == "a").sum())}


def table_parts(h: VersionHandle, rel: str) -> list[tuple[str, str]]:
    """(path in the version, sha256) of each part of table ``rel`` (``data/train``, ``pairs``); a
    version written before tables has one file ``rel.parquet``."""
    t = h.table(rel)
    if t is not None:
        return [(p.path, p.sha256) for p in t.parts]
    m = h.manifest()
    name = rel.removeprefix("data/")
    if rel.startswith("data/") and name in m.splits:
        return [(f"{rel}.parquet", m.splits[name].sha256)]
    info = m.files.get(f"{rel}.parquet")
    return [(f"{rel}.parquet", info.sha256)] if info is not None else []


class VersionFacts:
    """The facts of one version's parts: taken from ``prior`` (a verified earlier certification)
    where the part's sha256 is there, computed from the part (a verified read) otherwise."""

    def __init__(self, h: VersionHandle, prior: pl.DataFrame, checked: dict[str, tuple[int, int, int]]):
        self.h = h
        self.prior = {r["sha256"]: r for r in prior.iter_rows(named=True)}
        self.checked = checked
        self.facts: dict[str, dict[str, Any]] = {}

    def _get(self, sha: str, field: str, compute) -> dict[str, Any]:
        row = self.facts.get(sha)
        if row is None:
            row = self.facts[sha] = {k: None for k in FACTS_SCHEMA} | (self.prior.get(sha) or {"sha256": sha})
        if row.get(field) is None:
            row.update(compute())
        return row

    def split(self, split: str) -> list[tuple[str, dict[str, Any]]]:
        """(path, facts) of every part of a split (a part's facts from two narrow columns)."""
        cols = ["locale", "annotator_kind"]
        return [(path, self._get(sha, "locales", lambda path=path: split_part_facts(self.h.read(path, columns=cols))))
                for path, sha in table_parts(self.h, f"data/{split}")]

    def unvalidated(self, split: str) -> list[tuple[str, dict[str, Any]]]:
        """The split's parts without a GX result (path, facts): new parts, and parts whose earlier
        certification did not run GX."""
        return [(path, row) for path, row in self.split(split) if row.get("gx_evaluated") is None]

    def pairs(self) -> list[tuple[str, dict[str, Any]]]:
        cols = ["decision", "label_consensus"]
        return [(path, self._get(sha, "keep", lambda path=path: pairs_part_facts(self.h.read(path, columns=cols))))
                for path, sha in table_parts(self.h, "pairs")]

    def frame(self) -> pl.DataFrame:
        """Facts of every file of the version that was found intact (for the next certification)."""
        rows = []
        for sha, (ino, size, mtime) in self.checked.items():
            row = {k: None for k in FACTS_SCHEMA} | self.facts.get(sha, {"sha256": sha})
            rows.append(row | {"sha256": sha, "ino": ino, "size": size, "mtime_ns": mtime})
        return pl.DataFrame(rows, schema=FACTS_SCHEMA) if rows else empty_facts()


# ---------------------------------------------------------------- the agreement gates' state
def _flagged(h: VersionHandle, reasons: tuple[str, ...]) -> pl.DataFrame:
    """Comparison ids of the judgments flagged for any of ``reasons``."""
    flags = h.read("flags.parquet", columns=["subject_kind", "reason", "subject_id"])
    return flags.filter((pl.col("subject_kind") == "judgment") & pl.col("reason").is_in(list(reasons))).select(
        comparison_id="subject_id").unique()


def _registry(h: VersionHandle) -> bool:
    return h.manifest().policy.annotators is not None


def _left_out(h: VersionHandle) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """What the agreement gates leave out: judgments flagged ``pair_id_conflict``; and, with an
    annotator registry, what the qualified-overlap gates leave out too (registry flags)."""
    from pipeline.checks.registry import REASONS

    conflicts = _flagged(h, ("pair_id_conflict",))
    return conflicts, (_flagged(h, (*REASONS, "pair_id_conflict")) if _registry(h) else None)


def _contribution(j: pl.DataFrame, conflicts: pl.DataFrame, unqualified: pl.DataFrame | None,
                  kinds: dict[str, str | None]) -> dict[str, Any]:
    """The state of the judgments ``j`` (every judgment of some pairs): overlap sums without the
    conflicts; with a registry, per locale the pairs and the qualified humans' overlap sums."""
    from pipeline.overlap import overlap_state

    out: dict[str, Any] = {"sums": overlap_state(j.join(conflicts, on="comparison_id", how="anti", maintain_order="left"),
                                                 kinds)}
    if unqualified is not None:
        from pipeline.checks.registry import _of_pairs

        # a review counts under its pair's locale, not its own row's (what a tool sent back: pipeline.checks.registry)
        jl = _of_pairs(j).with_columns(pl.col("locale").fill_null(NO_LOCALE))
        pairs = dict(jl.group_by("locale").agg(pl.col("pair_id").n_unique()).iter_rows())
        q = jl.join(unqualified, on="comparison_id", how="anti", maintain_order="left").filter(
            pl.col("annotator_kind") == "human")
        by = q.partition_by("locale", as_dict=True, maintain_order=True)
        out["qualified"] = {loc: {"pairs": int(pairs[loc]), "sums": overlap_state(by.get((loc,), q.clear()))}
                            for loc in sorted(pairs)}
    return out


def _add(a: dict[str, Any], b: dict[str, Any], sign: int) -> dict[str, Any]:
    from pipeline.overlap import add_states, overlap_state

    out = {"sums": add_states(a["sums"], b["sums"], sign)}
    if "qualified" in a:
        zero = {"pairs": 0, "sums": overlap_state(pl.DataFrame())}
        out["qualified"] = {}
        for loc in sorted(set(a["qualified"]) | set(b["qualified"])):
            x, y = a["qualified"].get(loc, zero), b["qualified"].get(loc, zero)
            pairs = x["pairs"] + sign * y["pairs"]
            if pairs:
                out["qualified"][loc] = {"pairs": pairs, "sums": add_states(x["sums"], y["sums"], sign)}
    return out


def _columns(h: VersionHandle) -> list[str]:
    from pipeline.overlap import COLUMNS

    return ["comparison_id", *(["locale", "review_of"] if _registry(h) else []), *COLUMNS]


def full_agreement_state(h: VersionHandle) -> dict[str, Any]:
    """The agreement gates' state over every judgment of the version: overlap sums (conflicts left
    out), each annotator's kind, and with a registry the qualified-overlap sums per locale."""
    from pipeline.overlap import annotator_kinds

    j = h.read("judgments.parquet", columns=_columns(h))
    conflicts, unqualified = _left_out(h)
    kinds = annotator_kinds(j.join(conflicts, on="comparison_id", how="anti", maintain_order="left"))
    return {**_contribution(j, conflicts, unqualified, kinds), "kinds": kinds}


def _delta_agreement_state(h: VersionHandle, parent: VersionHandle, prior: dict[str, Any]) -> dict[str, Any] | None:
    """The child's state from its parent's: the parent's sums minus the old contributions of the
    pairs the child's new judgments touch, plus their new ones.  Exact when the child's judgments
    are the parent's, in order, followed by new ones (each pair's first judgment and each
    annotator's first kind are then the parent's), and no old judgment changed a flag the gates
    leave out (conflict, registry); None otherwise (the caller computes over every judgment).
    The judgments table only grows: a child links its parent's parts and adds one, into which it
    may merge the parent's trailing parts (level compaction); those are read and must lead the
    child's new part."""
    from pipeline.overlap import annotator_kinds

    if _registry(h) != ("qualified" in prior) or _registry(h) != _registry(parent):
        return None
    mine, theirs = table_parts(h, "judgments"), table_parts(parent, "judgments")
    k = 0
    while k < min(len(mine), len(theirs)) and mine[k][1] == theirs[k][1]:
        k += 1
    cols = _columns(h)
    rest = [h.read(path, columns=cols) for path, _ in mine[k:]]
    gone = [parent.read(path, columns=cols) for path, _ in theirs[k:]]
    (conf_child, unq_child), (conf_parent, unq_parent) = _left_out(h), _left_out(parent)
    changed = set(conf_child["comparison_id"].to_list()) ^ set(conf_parent["comparison_id"].to_list())
    if unq_child is not None and unq_parent is not None:
        changed |= set(unq_child["comparison_id"].to_list()) ^ set(unq_parent["comparison_id"].to_list())
    if not rest:  # no part of its own: the parent's judgments, unless the parent had more
        return None if gone or changed else prior
    rest_j = pl.concat(rest, how="vertical_relaxed")
    gone_j = pl.concat(gone, how="vertical_relaxed") if gone else rest_j.clear()
    if gone and (rest_j.height < gone_j.height or rest_j.schema != gone_j.schema
                 or not rest_j.head(gone_j.height).equals(gone_j)):
        return None
    new_j = rest_j.slice(gone_j.height)
    if changed - set(new_j["comparison_id"].to_list()):
        return None
    touched = new_j["pair_id"].unique().implode()
    files = [str(h.path / path) for path, _ in mine[:k]]  # the integrity gate checked them
    old = pl.concat([pl.scan_parquet(files, glob=False).select(cols).filter(pl.col("pair_id").is_in(touched)).collect()
                     if files else rest_j.clear(), gone_j.filter(pl.col("pair_id").is_in(touched))], how="vertical_relaxed")
    kinds = dict(prior["kinds"])
    for ann, kind in annotator_kinds(new_j.join(conf_child, on="comparison_id", how="anti", maintain_order="left")).items():
        kinds.setdefault(ann, kind)
    state = _add(prior, _contribution(old, conf_parent, unq_parent, kinds), -1)
    state = _add(state, _contribution(pl.concat([old, new_j], how="vertical_relaxed"), conf_child, unq_child, kinds), 1)
    return {**state, "kinds": kinds}


def agreement_state(h: VersionHandle, parent: VersionHandle | None, record: dict[str, Any] | None,
                    source: str | None) -> tuple[dict[str, Any], str]:
    """The agreement gates' state of ``h`` and how it was reached: taken from the version's own
    verified record, derived from its parent's, or computed over every judgment."""
    prior = (record or {}).get("agreement_state")
    if prior and source == h.version_id:
        return prior, f"taken from the certification of {source}"
    if prior and parent is not None and source == parent.version_id:
        state = _delta_agreement_state(h, parent, prior)
        if state is not None:
            return state, f"the certification of {source} plus this version's new judgments"
    return full_agreement_state(h), "computed over every judgment"


__all__ = ["FACTS_SCHEMA", "NO_LOCALE", "VersionFacts", "agreement_state", "empty_facts", "full_agreement_state", "facts_key", "load_prior_facts", "pairs_part_facts",
           "split_part_facts", "table_parts", "write_facts"]
