"""Protected evaluation sets: a test split that no later version may train on.

``prefpipe protect VERSION`` writes ``STORE/protected/<VERSION>-<split>.json`` (beside the
version, never inside it): the split's pair ids, the near-duplicate cluster of each, and the
prompt hashes of those pairs.  From then on, for every version of the store:

* the certify gate ``protected_contamination`` counts the pairs of its train and validation
  splits that are protected -- the same pair id, a member of the same near-duplicate cluster
  (in that version's own clustering, ``split_assignments``), or the same prompt (its
  ``prompt_hash``, which also catches a copy in an unrelated lineage) -- and must be 0;
* ``Store.open_certified`` (the trainer's only way in) refuses a contaminated version even if an
  older certificate predates the protection (link ``protected``);
* the trainer's evaluation reports the protected pairs of its test split as their own slice.

Sticky splits already keep a protected pair (and its cluster) in test in every descendant; the
protection also covers versions built outside that lineage.  A protection record that cannot be
read is an error, never "no protection".
"""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from pydantic import BaseModel, Field, ValidationError

from pipeline.store import SPLITS, Store, StoreError, VersionHandle, atomic_write_json
from schemas.ids import safe_id

PROTECTED_DIR = "protected"
TRAINING_SPLITS = ("train", "validation")


class Protection(BaseModel):
    version_id: str
    split: str
    manifest_sha256: str
    created_at: datetime
    pair_ids: list[str]
    clusters: list[str] = Field(description="near_dup_cluster of the protected pairs in the protected version")
    prompt_hashes: list[str]


def _prompt_hashes(h: VersionHandle, pair_ids: pl.Series) -> pl.DataFrame:
    j = h.read("judgments.parquet", columns=["pair_id", "prompt_hash"]).unique("pair_id")
    return j.join(pair_ids.to_frame("pair_id"), on="pair_id", how="semi")


def protect_version(store: Store, ref: str, split: str = "test") -> tuple[Path, Protection]:
    """Record ``split`` of the version as protected (idempotent: the same record is rewritten)."""
    if split not in SPLITS or split == "train":  # (a protected train split: no version could train at all)
        raise StoreError(f"protect: split {split!r} is not one of {[s for s in SPLITS if s != 'train']} (a held-out split)")
    h = store.resolve(ref)
    rows = h.read_split(split, columns=["pair_id", "near_dup_cluster"])
    rows = rows.with_columns(cluster=pl.col("near_dup_cluster").fill_null(pl.col("pair_id")))
    rec = Protection(version_id=h.version_id, split=split, manifest_sha256=h.manifest_sha256(),
                     created_at=datetime.now(UTC), pair_ids=sorted(rows["pair_id"].to_list()),
                     clusters=sorted(set(rows["cluster"].to_list())),
                     prompt_hashes=sorted(set(_prompt_hashes(h, rows["pair_id"])["prompt_hash"].to_list())))
    path = store.root / PROTECTED_DIR / f"{safe_id(h.version_id)}-{split}.json"
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


def contamination(h: VersionHandle, records: list[Protection]) -> pl.DataFrame:
    """Pairs of ``h``'s train/validation splits that a protection covers: pair_id, split, protected_by
    (the protected version), why (``pair``, ``cluster`` or ``prompt``)."""
    empty = pl.DataFrame(schema={"pair_id": pl.String, "split": pl.String, "protected_by": pl.String, "why": pl.String})
    if not records:
        return empty
    rows = pl.concat([h.read_split(s, columns=["pair_id"]).with_columns(split=pl.lit(s))
                      for s in TRAINING_SPLITS if s in h.manifest().splits])
    if rows.height == 0:
        return empty
    if h.has("split_assignments.parquet"):
        clusters = h.read("split_assignments.parquet", columns=["pair_id", "cluster"])
    else:
        clusters = pl.concat([h.read_split(s, columns=["pair_id", "near_dup_cluster"]) for s in SPLITS]).select(
            "pair_id", cluster=pl.col("near_dup_cluster").fill_null(pl.col("pair_id")))
    rows = rows.join(clusters, on="pair_id", how="left").join(_prompt_hashes(h, rows["pair_id"]), on="pair_id", how="left")
    found = []
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
        found.append(hit.select("pair_id", "split", protected_by=pl.lit(f"{rec.version_id}/{rec.split}"), why="why"))
    out = pl.concat(found).unique("pair_id", keep="first", maintain_order=True) if found else empty
    return out.sort("pair_id")


def protected_pair_ids(store: Store) -> set[str]:
    return {p for rec in load_protections(store) for p in rec.pair_ids}


__all__ = ["Protection", "contamination", "load_protections", "protect_version", "protected_pair_ids"]
