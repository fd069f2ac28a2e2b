"""Protected evaluation sets: a test split that no later version may train on.

``prefpipe protect VERSION`` writes ``STORE/protected/<VERSION>-<split>.json`` (beside the
version, never inside it): the split's pair ids, the near-duplicate cluster of each, the
prompt hashes of those pairs, and -- in ``<VERSION>-<split>.signatures.npy``, bound to the
record by its sha256 -- the MinHash signature of each protected pair's prompt, computed as the
``near_duplicates`` check computes them, with the near-duplicate parameters of the protected
version's policy (kept in the record, threshold included).  From then on, for every version
of the store:

* the certify gate ``protected_contamination`` counts the pairs of its train and validation
  splits that are protected -- the same pair id, a member of the same near-duplicate cluster
  (in that version's own clustering, ``split_assignments``), the same prompt (its
  ``prompt_hash``, which also catches a copy in an unrelated lineage), or a near duplicate of a
  protected prompt (``near_duplicate``: the LSH banding of the check finds the candidates, their
  estimated Jaccard must reach the recorded threshold; this catches a re-worded copy in an
  unrelated lineage, whose clusters never hold the protected pairs) -- and must be 0;
* ``Store.open_certified`` (the trainer's only way in) refuses a contaminated version even if an
  older certificate predates the protection (link ``protected``);
* the trainer's evaluation reports the protected pairs of its test split as their own slice.

Sticky splits already keep a protected pair (and its cluster) in test in every descendant; the
protection also covers versions built outside that lineage.  A protection record (or its
signature file) that cannot be read or does not match its sha256 is an error, never "no
protection".  A record written before the signatures existed (or with another hashing format)
still gets the exact matches; :func:`unmatched` names it so the gate can say that near-duplicate
matching needs ``prefpipe protect VERSION`` again (signatures are not recomputed from the
protected version on the fly: that version may be gone, and every check would pay for it).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, Field, ValidationError

from pipeline.checks import near_duplicates as nd
from pipeline.escape import visible_controls
from pipeline.store import SPLITS, Store, StoreError, VersionHandle, atomic_write_bytes, atomic_write_json
from schemas.ids import safe_id
from schemas.policy import NearDuplicateConfig

PROTECTED_DIR = "protected"
TRAINING_SPLITS = ("train", "validation")
NEAR_SCHEMA = {"pair_id": pl.String, "split": pl.String, "protected_by": pl.String, "matched": pl.String,
               "jaccard": pl.Float32, "text": pl.String}  # a near-duplicate hit (:func:`_near_duplicates`)
SIGNATURE_CHUNK = 200_000  # distinct prompts of the checked version hashed and matched at a time (bounds memory)


class ProtectedSignatures(BaseModel):
    """The MinHash signatures of the protected pairs' prompts: a ``(len(pair_ids), num_perm)`` uint32
    ``.npy`` beside the record (row i: ``pair_ids[i]``), read without pickle and only if its bytes
    match ``sha256``."""

    sha256: str
    format: str = Field(description="the near_duplicates check's hashing format (pipeline.checks.near_duplicates.FORMAT)")
    config: NearDuplicateConfig = Field(description="the protected version's near-duplicate policy: hashing parameters "
                                        "and the threshold a near duplicate must reach")


class Protection(BaseModel):
    version_id: str
    split: str
    manifest_sha256: str
    created_at: datetime
    pair_ids: list[str]
    clusters: list[str] = Field(description="near_dup_cluster of the protected pairs in the protected version")
    prompt_hashes: list[str]
    signatures: ProtectedSignatures | None = Field(None, description="None: a record from before near-duplicate matching")

    @property
    def label(self) -> str:
        return f"{self.version_id}/{self.split}"


def _record_path(root: Path, version_id: str, split: str, suffix: str) -> Path:
    """``STORE/protected/<VERSION>-<split><suffix>``; the id and split are checked before they touch a path."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    return root / PROTECTED_DIR / f"{safe_id(version_id, what='version id')}-{split}{suffix}"


def _split_prompts(h: VersionHandle, split: str) -> pl.DataFrame:
    """pair_id and ``text``, the text the near_duplicates check shingles (its ``shingle_text``), of a split."""
    rows = h.read_split(split, columns=["pair_id", "prompt"])
    return rows.select("pair_id", text=nd.shingle_text(rows))


def _prompt_hashes(h: VersionHandle, pair_ids: pl.Series) -> pl.DataFrame:
    j = h.read("judgments.parquet", columns=["pair_id", "prompt_hash"]).unique("pair_id")
    return j.join(pair_ids.to_frame("pair_id"), on="pair_id", how="semi")


def protect_version(store: Store, ref: str, split: str = "test") -> tuple[Path, Protection]:
    """Record ``split`` of the version as protected (idempotent: the same record is rewritten); an
    empty split is refused (``StoreError``)."""
    if split not in SPLITS or split == "train":  # (a protected train split: no version could train at all)
        raise StoreError(f"protect: split {split!r} is not one of {[s for s in SPLITS if s != 'train']} (a held-out split)")
    h = store.resolve(ref)
    rows = h.read_split(split, columns=["pair_id", "near_dup_cluster"])
    if rows.height == 0:  # (a record of nothing would read as a protected evaluation set)
        raise StoreError(f"protect: the {split} split of {h.version_id} has no pairs: nothing to protect, nothing written "
                         "(a version too small for a held-out pair; protect a larger version's split)")
    rows = rows.with_columns(cluster=pl.col("near_dup_cluster").fill_null(pl.col("pair_id")))
    prompts = _split_prompts(h, split).sort("pair_id")
    cfg = h.manifest().policy.checks.near_duplicate
    buf = io.BytesIO()
    np.save(buf, nd.signatures(prompts["text"], cfg), allow_pickle=False)
    # the signatures first: a record never names a file that is not there yet
    atomic_write_bytes(_record_path(store.root, h.version_id, split, ".signatures.npy"), buf.getvalue())
    rec = Protection(version_id=h.version_id, split=split, manifest_sha256=h.manifest_sha256(),
                     created_at=datetime.now(UTC), pair_ids=prompts["pair_id"].to_list(),
                     clusters=sorted(set(rows["cluster"].to_list())),
                     prompt_hashes=sorted(set(_prompt_hashes(h, rows["pair_id"])["prompt_hash"].to_list())),
                     signatures=ProtectedSignatures(sha256=hashlib.sha256(buf.getvalue()).hexdigest(), format=nd.FORMAT,
                                                    config=cfg))
    path = _record_path(store.root, h.version_id, split, ".json")
    atomic_write_json(path, rec.model_dump(mode="json"))
    return path, rec


def load_protections(store: Store) -> list[Protection]:
    d = store.root / PROTECTED_DIR
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        try:
            out.append(Protection.model_validate_json(p.read_bytes()))
        except (OSError, ValidationError, ValueError) as err:
            raise StoreError(f"{p}: damaged protection record ({str(err).splitlines()[0]}); a protection that cannot be "
                             "read is never treated as absent: restore it with `prefpipe protect VERSION`") from None
    return out


def load_signatures(store: Store, rec: Protection) -> np.ndarray:
    """The protected prompts' signatures of ``rec`` (which has ``signatures``), ``(len(rec.pair_ids), num_perm)``
    uint32, read only if the file's bytes match the record's sha256 and parsed without pickle."""
    try:
        path = _record_path(store.root, rec.version_id, rec.split, ".signatures.npy")
    except ValueError as err:  # (an unsafe id in the record: UnsafeId)
        raise StoreError(f"protection record of {rec.label!r}: {err}") from None
    try:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != rec.signatures.sha256:
            raise ValueError(f"sha256 {hashlib.sha256(data).hexdigest()[:12]}... is not the record's "
                             f"{rec.signatures.sha256[:12]}...")
        sigs = np.load(io.BytesIO(data), allow_pickle=False)
        want = (len(rec.pair_ids), rec.signatures.config.num_perm)
        if not isinstance(sigs, np.ndarray) or sigs.dtype != np.uint32 or sigs.shape != want:
            raise ValueError(f"{getattr(sigs, 'dtype', type(sigs).__name__)} {getattr(sigs, 'shape', '')} where a "
                             f"uint32 array {want} was expected")
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: damaged protection signatures ({str(err).splitlines()[0]}); a protection that cannot "
                         f"be read is never treated as absent: restore it with `prefpipe protect {rec.version_id} "
                         f"--split {rec.split}`") from None
    return sigs


def _matchable(rec: Protection) -> bool:
    return rec.signatures is not None and rec.signatures.format == nd.FORMAT


def unmatched(records: list[Protection]) -> list[Protection]:
    """The records whose prompts cannot be matched as near duplicates (written before the signatures,
    or with another hashing format): only their exact matches count until they are protected again."""
    return [r for r in records if not _matchable(r)]


def _near_duplicates(store: Store, prompts: pl.DataFrame, records: list[Protection]) -> pl.DataFrame:
    """Pairs of ``prompts`` (pair_id, split, text) whose text is a near duplicate of a protected prompt:
    pair_id, split, protected_by, matched (the protected pair), jaccard, text -- one row per pair and
    record, its best match.  Distinct texts are hashed once per hashing configuration, in chunks."""
    out = []
    by_cfg: dict[str, list[Protection]] = {}
    for rec in records:
        by_cfg.setdefault(rec.signatures.config.model_dump_json(), []).append(rec)
    texts = prompts["text"].unique(maintain_order=True)
    for group in by_cfg.values():
        cfg = group[0].signatures.config
        indexes = []
        for rec in group:  # the check's own index: its LSH banding finds the candidates, the threshold decides
            index = nd.PromptIndex(cfg)
            index.add(rec.pair_ids, sigs=load_signatures(store, rec))
            indexes.append((rec, index))
        for start in range(0, len(texts), SIGNATURE_CHUNK):
            chunk = texts.slice(start, SIGNATURE_CHUNK)
            sigs = nd.signatures(chunk, cfg)
            for rec, index in indexes:
                hit = index.query(sigs=sigs)
                if hit.height:
                    out.append(pl.DataFrame({"text": chunk.gather(hit["query"]), "matched": hit["key"],
                                             "jaccard": hit["jaccard"]}).with_columns(protected_by=pl.lit(rec.label),
                                                                                      _held=pl.lit(rec.split)))
    if not out:
        return pl.DataFrame(schema=NEAR_SCHEMA)
    found = pl.concat(out).join(prompts, on="text").filter(pl.col("split") != pl.col("_held"))
    return (found.sort(["pair_id", "protected_by", "jaccard", "matched"], descending=[False, False, True, False])
            .unique(["pair_id", "protected_by"], keep="first", maintain_order=True)
            .select("pair_id", "split", "protected_by", "matched", "jaccard", "text"))


def contamination(h: VersionHandle, records: list[Protection], *, cached: bool = False) -> pl.DataFrame:
    """Pairs of ``h``'s train/validation splits that a protection covers: pair_id, split, protected_by
    (the protected version and split), why (``pair``, ``cluster``, ``prompt`` or ``near_duplicate``, the
    first that holds), and for a near duplicate: matched (the protected pair), jaccard (estimated) and
    text (this pair's prompt as shingled).  ``cached``: see :func:`_near_hits`."""
    empty = pl.DataFrame(schema={**NEAR_SCHEMA, "why": pl.String})
    if not records:
        return empty
    present = [s for s in TRAINING_SPLITS if s in h.manifest().splits]
    rows = pl.concat([h.read_split(s, columns=["pair_id"]).with_columns(split=pl.lit(s)) for s in present])
    if rows.height == 0:
        return empty
    if h.has("split_assignments.parquet"):
        clusters = h.read("split_assignments.parquet", columns=["pair_id", "cluster"])
    else:
        clusters = pl.concat([h.read_split(s, columns=["pair_id", "near_dup_cluster"]) for s in SPLITS]).select(
            "pair_id", cluster=pl.col("near_dup_cluster").fill_null(pl.col("pair_id")))
    rows = rows.join(clusters, on="pair_id", how="left").join(_prompt_hashes(h, rows["pair_id"]), on="pair_id", how="left")
    found = [empty]
    for rec in records:
        ids = pl.Series(rec.pair_ids, dtype=pl.String)
        # the protected pairs' clusters as *this* version clusters them (a new near-duplicate joins them here)
        here = clusters.join(ids.to_frame("pair_id"), on="pair_id", how="semi")["cluster"]
        prompts = pl.Series(rec.prompt_hashes, dtype=pl.String)
        why = (pl.when(pl.col("pair_id").is_in(ids.implode())).then(pl.lit("pair"))
               .when(pl.col("cluster").is_in(here.implode())).then(pl.lit("cluster"))
               .when(pl.col("prompt_hash").is_in(prompts.implode())).then(pl.lit("prompt")))
        # (a protected validation split's pairs stay where they are held out: its own split is not contamination)
        hit = rows.with_columns(why=why).filter(pl.col("why").is_not_null() & (pl.col("split") != rec.split))
        found.append(hit.select("pair_id", "split", protected_by=pl.lit(rec.label), why="why"))
    matchable = [r for r in records if _matchable(r)]
    if matchable:  # after the exact matches: a pair they already cover keeps its first reason
        found.append(_near_hits(h, present, matchable, cached=cached).with_columns(why=pl.lit("near_duplicate")))
    return pl.concat(found, how="diagonal_relaxed").unique("pair_id", keep="first", maintain_order=True).sort("pair_id")


MATCHES_DIR = Path(".index") / "protected-matches"  # STORE/.index/protected-matches/<VERSION>.json: a cache only


def _match_key(rec: Protection) -> str:
    return f"{rec.label}|{rec.signatures.sha256}"


def _read_matches(h: VersionHandle) -> dict[str, list]:
    """The cached near-duplicate hits of ``h`` per protection (:func:`_match_key`), when they were
    found on these very files (the manifest's sha256); anything unreadable or foreign is no cache."""
    try:
        doc = json.loads((h.store.root / MATCHES_DIR / f"{safe_id(h.version_id)}.json").read_bytes())
        if doc.get("manifest_sha256") == h.manifest_sha256() and isinstance(doc.get("hits"), dict):
            return doc["hits"]
    except (OSError, ValueError, AttributeError):
        pass
    return {}


def _near_hits(h: VersionHandle, present: list[str], records: list[Protection], *, cached: bool) -> pl.DataFrame:
    """:func:`_near_duplicates` of ``h``'s ``present`` splits against ``records``.  ``cached``: the hits
    of a protection already matched against this version's manifest are read from the store's cache
    (``versions`` and ``show`` trust every version they list: matching costs ~20 s a 1M-pair version,
    once), and only new protections are matched; the cache is rewritten best effort.  Certify and the
    trainer's way in match afresh (``cached=False``)."""
    cache = _read_matches(h) if cached else {}
    todo = [r for r in records if _match_key(r) not in cache]
    if todo:
        texts = pl.concat([_split_prompts(h, s).with_columns(split=pl.lit(s)) for s in present])
        new = _near_duplicates(h.store, texts, todo)
        for rec in todo:
            cache[_match_key(rec)] = new.filter(pl.col("protected_by") == rec.label).rows()
        if cached:
            keep = {_match_key(r): cache[_match_key(r)] for r in records}  # (a removed protection's hits go)
            with contextlib.suppress(OSError):
                atomic_write_json(h.store.root / MATCHES_DIR / f"{safe_id(h.version_id)}.json",
                                  {"manifest_sha256": h.manifest_sha256(), "hits": keep})
    rows = [tuple(r) for rec in records for r in cache[_match_key(rec)]]
    return pl.DataFrame(rows, schema=NEAR_SCHEMA, orient="row")


def near_duplicate_examples(store: Store, hits: pl.DataFrame, n: int = 3) -> list[str]:
    """Up to ``n`` near-duplicate hits of :func:`contamination` as one line each: both pair ids, the
    estimated Jaccard and both prompts (cut to 120 characters, control characters shown as escapes;
    the protected prompt is read from the protected version while the store holds it)."""
    rows = hits.filter(pl.col("why") == "near_duplicate").head(n)
    texts: dict[str, dict[str, str] | str] = {}
    for label in rows["protected_by"].unique():
        version_id, split = label.rsplit("/", 1)
        try:
            theirs = _split_prompts(store.get(version_id), split).filter(pl.col("pair_id").is_in(rows["matched"].implode()))
            texts[label] = dict(theirs.iter_rows())
        except StoreError as err:  # (gone, or damaged: the match stands, the example shows no text)
            texts[label] = f"(the protected prompt cannot be read: {str(err).splitlines()[0]})"
    shown = []
    for r in rows.iter_rows(named=True):
        theirs = texts[r["protected_by"]]
        protected = theirs if isinstance(theirs, str) else _quote(theirs[r["matched"]])
        shown.append(f"{r['pair_id']} ({r['split']}) ~ {r['matched']} of {r['protected_by']}, estimated Jaccard "
                     f"{r['jaccard']:.2f}: {_quote(r['text'])} vs {protected}")
    return shown


def _quote(text: str, limit: int = 120) -> str:
    cut = text if len(text) <= limit else text[:limit] + "..."
    return '"' + visible_controls(cut) + '"'


def protected_pair_ids(store: Store) -> set[str]:
    return {p for rec in load_protections(store) for p in rec.pair_ids}


__all__ = ["Protection", "ProtectedSignatures", "contamination", "load_protections", "load_signatures",
           "near_duplicate_examples", "protect_version", "protected_pair_ids", "unmatched"]
