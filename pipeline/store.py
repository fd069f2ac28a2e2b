"""The immutable, content-addressed version store.

Layout (``../shared/spec/outputs.md``)::

    STORE/
      versions/VERSION_ID/          one immutable directory per version
        manifest.json               ledger, checks, splits/files with sha256, lineage, policy, code version
        data/{train,validation,test}.parquet
        judgments.parquet pairs.parquet quarantine.parquet flags.parquet routed.parquet annotators.parquet
        prompt_index.*              persisted MinHash signatures (children reuse them)
      certifications/VERSION_ID.json
      .staging/                     in-progress writes (never read)
      .locks/                       advisory locks, one per version id

Guarantees:

* **Atomic**: a version is written into ``.staging/<id>.<pid>.<nonce>/``, every file is
  fsynced and re-read (row count + sha256) and only then is the directory renamed to
  ``versions/<id>`` (``rename(2)`` is atomic on one filesystem).  A crash (kill -9) leaves at
  most a staging directory, which readers never see and the next writer sweeps.
* **Immutable / idempotent**: the id is derived from the input content, the parent, the policy
  and the code version.  If ``versions/<id>`` exists nothing is written.  Two processes
  writing the same id: one rename wins, the other finds the directory there and returns the
  same id (an ``flock`` on ``.locks/<id>`` also serialises them, so the loser skips the work).
* Files are never modified after the rename; the trainer verifies every checksum.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from schemas.manifest import Certification, Manifest, SplitInfo

SPLITS = ("train", "validation", "test")
STALE_STAGING_SECONDS = 6 * 3600


class StoreError(Exception):
    """A store operation that cannot proceed; the message says what and where."""


class VersionNotFound(StoreError):
    pass


class IntegrityError(StoreError):
    """A version's files do not match its manifest."""


# ---------------------------------------------------------------- hashing / atomic files
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically: temp file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8"))


def write_parquet(frame: pl.DataFrame, path: Path) -> SplitInfo:
    """Write a Parquet file (zstd level 1), fsync it, re-read its row count and return path/rows/sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # zstd level 1: half the write time of the default level 3 for ~20 % larger files (measured
    # on 1M judgments: 4.1 s vs 8.1 s, 169 vs 136 MB)
    frame.write_parquet(path, compression="zstd", compression_level=1, statistics=True)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    rows = pl.scan_parquet(path).select(pl.len()).collect().item()
    if rows != frame.height:
        raise StoreError(f"{path}: wrote {frame.height} rows but read back {rows}")
    return SplitInfo(path=str(path), rows=rows, sha256=sha256_file(path))


# ---------------------------------------------------------------- store
@dataclass(frozen=True)
class VersionHandle:
    """Read access to one version (the public reader the trainer and reports use)."""

    store: Store
    version_id: str

    @property
    def path(self) -> Path:
        return self.store.versions_dir / self.version_id

    def manifest(self) -> Manifest:
        return Manifest.model_validate_json((self.path / "manifest.json").read_text(encoding="utf-8"))

    def file(self, rel: str) -> Path:
        return self.path / rel

    def read(self, rel: str) -> pl.DataFrame:
        return pl.read_parquet(self.path / rel)

    def split_path(self, split: str) -> Path:
        return self.path / "data" / f"{split}.parquet"

    def verify(self) -> list[str]:
        """Every file named in the manifest exists with its sha256; returns problems (empty = ok)."""
        m = self.manifest()
        problems = []
        for name, info in {**{f"data/{k}.parquet": v for k, v in m.splits.items()}, **m.files}.items():
            p = self.path / name
            if not p.exists():
                problems.append(f"{name}: missing")
            elif sha256_file(p) != info.sha256:
                problems.append(f"{name}: sha256 differs from the manifest (file changed after the version was written)")
        return problems

    def certification(self) -> dict[str, Any] | None:
        return self.store.latest_certification(self.version_id)


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- layout
    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def ensure(self) -> Store:
        for d in ("versions", "certifications", ".staging", ".locks"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        return self

    def exists(self, version_id: str) -> bool:
        return (self.versions_dir / version_id / "manifest.json").is_file()

    def get(self, version_id: str) -> VersionHandle:
        if not self.exists(version_id):
            known = ", ".join(self.list_ids()[-5:]) or "none"
            raise VersionNotFound(f"no version {version_id!r} in store {self.root} (latest: {known})")
        return VersionHandle(self, version_id)

    def resolve(self, ref: str) -> VersionHandle:
        """A version by id, unique id prefix, or ``latest``."""
        if ref == "latest":
            ids = self.list_ids()
            if not ids:
                raise VersionNotFound(f"store {self.root} has no versions yet")
            return VersionHandle(self, ids[-1])
        if self.exists(ref):
            return VersionHandle(self, ref)
        matches = [v for v in self.list_ids() if v.startswith(ref)]
        if len(matches) == 1:
            return VersionHandle(self, matches[0])
        if len(matches) > 1:
            raise VersionNotFound(f"version prefix {ref!r} is ambiguous: {', '.join(matches)}")
        return self.get(ref)

    def list_ids(self) -> list[str]:
        """Version ids, oldest first (by manifest created_at)."""
        if not self.versions_dir.is_dir():
            return []
        items = []
        for d in self.versions_dir.iterdir():
            mf = d / "manifest.json"
            if mf.is_file():
                created = json.loads(mf.read_text(encoding="utf-8")).get("created_at", "")
                items.append((created, d.name))
        return [v for _, v in sorted(items)]

    # -- writing
    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Exclusive advisory lock (released on exit and by the kernel if the process dies)."""
        self.ensure()
        with open(self.root / ".locks" / f"{name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def sweep_staging(self, max_age: float = STALE_STAGING_SECONDS) -> int:
        """Remove staging dirs left by crashed writers (dead pid, or older than ``max_age``)."""
        staging = self.root / ".staging"
        if not staging.is_dir():
            return 0
        removed = 0
        for d in staging.iterdir():
            try:
                pid = int(d.name.split(".")[1])
            except (IndexError, ValueError):
                pid = -1
            alive = pid > 0 and _pid_alive(pid)
            if not alive or time.time() - d.stat().st_mtime > max_age:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed

    def write_version(self, version_id: str, build: Callable[[Path], Manifest]) -> tuple[str, bool]:
        """Create ``versions/<version_id>`` atomically unless it exists.

        ``build(stage_dir)`` writes every file into ``stage_dir`` and returns the manifest
        (which this method writes last).  Returns ``(version_id, created)``.
        """
        self.ensure()
        if self.exists(version_id):
            return version_id, False
        with self.lock(version_id):
            if self.exists(version_id):  # another process finished it while we waited
                return version_id, False
            self.sweep_staging()
            stage = self.root / ".staging" / f"{version_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            stage.mkdir(parents=True)
            try:
                manifest = build(stage)
                if manifest.version_id != version_id:
                    raise StoreError(f"manifest names {manifest.version_id}, expected {version_id}")
                atomic_write_json(stage / "manifest.json", manifest.model_dump(mode="json"))
                problems = VersionHandle(_StagingStore(stage), "").verify()
                if problems:
                    raise IntegrityError(f"staged version {version_id} failed its own check: {problems}")
                _fsync_dir(stage)
                target = self.versions_dir / version_id
                try:
                    os.rename(stage, target)
                except OSError:
                    if self.exists(version_id):  # lost a race with a writer outside our lock
                        shutil.rmtree(stage, ignore_errors=True)
                        return version_id, False
                    raise
                _fsync_dir(self.versions_dir)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
        return version_id, True

    # -- certifications (records beside the version, never inside it)
    def certification_path(self, version_id: str) -> Path:
        return self.root / "certifications" / f"{version_id}.json"

    def certification_history(self, version_id: str) -> list[dict[str, Any]]:
        p = self.certification_path(version_id)
        if not p.exists():
            return []
        return json.loads(p.read_text(encoding="utf-8")).get("history", [])

    def latest_certification(self, version_id: str) -> dict[str, Any] | None:
        hist = self.certification_history(version_id)
        return hist[-1] if hist else None

    def add_certification(self, cert: Certification) -> Path:
        """Append a certification record (history kept) atomically under a lock."""
        self.ensure()
        with self.lock(f"cert-{cert.version_id}"):
            hist = self.certification_history(cert.version_id)
            hist.append(cert.model_dump(mode="json"))
            latest = hist[-1]
            doc = {"version_id": cert.version_id, "verdict": latest["verdict"], "policy_hash": latest["policy_hash"],
                   "certified_at": latest["certified_at"], "gates": latest["gates"], "history": hist}
            path = self.certification_path(cert.version_id)
            atomic_write_json(path, doc)
        return path


class _StagingStore(Store):
    """Lets VersionHandle.verify() run on a staging directory before the rename."""

    def __init__(self, stage: Path):
        super().__init__(stage)
        self._stage = stage

    @property
    def versions_dir(self) -> Path:  # VersionHandle.path = root/versions/<id>; map it to the stage
        return self._stage


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
