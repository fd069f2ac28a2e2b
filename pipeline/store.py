"""The immutable, content-addressed version store.

Layout (``../shared/spec/outputs.md``)::

    STORE/
      versions/VERSION_ID/          one immutable directory per version
        manifest.json               ledger, checks, splits/files with sha256, lineage, policy, code version
        data/{train,validation,test}.parquet
        judgments.parquet pairs.parquet quarantine.parquet flags.parquet routed.parquet annotators.parquet
        state/near_dup_*/           near-duplicate state as parts (children link them and add their own)
      certifications/VERSION_ID.json
      .staging/                     in-progress writes (never read); NAME.alive beside each: locked by its writer
      .locks/                       advisory locks, one per version id
      .index/versions.json          the listing's cache: per version its creation time, parent and
                                    new sources, keyed by its manifest's (inode, size, mtime_ns);
                                    a cache only (rebuilt from the manifests when missing or stale)
      .index/protected-matches/V.json  near duplicates of protected prompts found in V (pipeline.protect):
                                    a cache for versions/show, keyed by V's manifest sha256; train ignores it
      .index/published/V.json       not a cache: the sha256 of every manifest.json the store published as V,
                                    appended (atomically, under V's lock) before the rename that makes it visible

Guarantees:

* **Atomic**: a version is written into ``.staging/<id>.<pid>.<nonce>/``, every file is
  re-read (row count + sha256), the staged files are made durable together (:func:`sync_tree`:
  one ``syncfs(2)`` where there is one, else an fsync of every file and folder; a file written
  into the stage by another process -- a cluster's worker -- is fsynced by it) and only then is
  the directory renamed to ``versions/<id>`` (``rename(2)`` is atomic on one filesystem).  A crash (kill -9) leaves at
  most a staging directory, which readers never see and the next writer sweeps -- once its writer's
  lock on ``<stage>.alive`` is free (:class:`StageMark`: a live writer's stage stays, on any host
  that shares the store and however long its build runs).
* **Immutable / idempotent**: the id is derived from the input content, the parent, the policy
  and the code version.  If ``versions/<id>`` exists nothing is written.  Two processes
  writing the same id: one rename wins, the other finds the directory there and returns the
  same id (an ``flock`` on ``.locks/<id>`` also serialises them, so the loser skips the work).
* Files are never modified after the rename; the trainer verifies every checksum.
* **Published is what was built**: the version id is derived from the *inputs*, not from the manifest, so a
  version whose part was edited and whose manifest was rewritten to match (new sha256s and sizes) still verifies
  against itself.  The store's publication record (``.index/published/V.json``) says which manifest bytes it
  published as ``V``; a curate re-run, ``certify`` and :meth:`Store.trust` compare ``manifest.json`` with it
  (:meth:`Store.publication`).  A version published before the store kept these records has none: that is said,
  and the version is judged as before (files against its manifest; a certificate binds the manifest it evaluated).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import polars as pl

from schemas.ids import UnsafeId, is_safe_id, safe_id
from schemas.manifest import Certification, Manifest, SplitInfo, TableInfo

SPLITS = ("train", "validation", "test")
STALE_STAGING_SECONDS = 6 * 3600
USE_LOCK_PREFIX = "use-"  # .locks/use-<version>.lock: shared while a build reads the version (Store.in_use)


class StoreError(Exception):
    """A store operation that cannot proceed; the message says what and where.  ``path``: the file it is about, when
    there is one (a command's --json failure names it as ``file``)."""

    def __init__(self, *args: object, path: str | Path | None = None) -> None:
        super().__init__(*args)
        self.path = path


class VersionNotFound(StoreError):
    pass


class IntegrityError(StoreError):
    """A version's files do not match its manifest."""


class DamagedVersion(StoreError):
    """A version whose manifest cannot be read or parsed (listed as damaged, skipped by ``latest``)."""


class NotCertified(StoreError):
    """A version whose chain certificate -> manifest -> files does not hold; ``link`` names the broken link."""

    def __init__(self, link: str, reason: str):
        super().__init__(reason)
        self.link = link


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


# stages whose files this process writes without an fsync each: :meth:`Store.write_version` makes the
# whole stage durable at once before its rename (:func:`sync_tree`).  An fsync per part made a writer
# thread wait for the disk ~4 ms a 1.5 MB part (thousands of parts in a big version); one sync at the
# end waits only for what the kernel has not written back by then.
_DEFERRED: set[Path] = set()
_DEFERRED_LOCK = threading.Lock()


@contextlib.contextmanager
def deferred_sync(stage: Path) -> Iterator[None]:
    """Files written under ``stage`` by this process skip their own fsync (:func:`sync_file`) until
    the block ends; the caller then runs :func:`sync_tree` on ``stage``."""
    with _DEFERRED_LOCK:
        _DEFERRED.add(stage)
    try:
        yield
    finally:
        with _DEFERRED_LOCK:
            _DEFERRED.discard(stage)


def sync_file(fileno: int, path: Path) -> None:
    """fsync a freshly written file, unless it lies in a stage that is synced as a whole."""
    if _DEFERRED:
        with _DEFERRED_LOCK:
            stages = tuple(_DEFERRED)
        if any(path.is_relative_to(s) for s in stages):
            return
    os.fsync(fileno)


def sync_tree(root: Path) -> None:
    """Make every file and folder under ``root`` durable: ``syncfs(2)`` of its filesystem on Linux
    (one call, whatever the file count), else an fsync of each file and folder."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            syncfs = libc.syncfs
        except (OSError, AttributeError):
            syncfs = None
        if syncfs is not None:
            fd = os.open(root, os.O_RDONLY)
            try:
                if syncfs(fd) == 0:
                    return
            finally:
                os.close(fd)
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically: temp file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, read-only, killed: the old file (if any) stays, no partial one is left
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8"))


def replace_dir(stage: Path, target: Path, *, aside_in: Path | None = None) -> None:
    """Put the complete directory ``stage`` at ``target`` (both on one filesystem), replacing a directory there:
    the old one renamed aside, the new one renamed in, the old one removed.  A reader sees the old folder or the new
    one whole, never a mix -- or, between the two renames, none (POSIX renames a directory only onto an empty one;
    an exchange of two is Linux's ``renameat2(RENAME_EXCHANGE)`` alone).  ``stage`` is made durable first.  Two
    writers of one ``target``: each one's folder arrives whole, the last rename wins, and the other is removed (a
    writer whose rename found the other's folder there moves that aside too and tries again).  ``aside_in``: where
    the old folder goes (a store's ``.staging/``, named ``old-<name>.<pid>.<nonce>``: a sweep removes it once this
    process is gone, should it die before it does); default: a hidden folder beside ``target``."""
    sync_tree(stage)
    asides: list[Path] = []
    try:
        for _ in range(100):
            nonce = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
            aside = (aside_in / f"old-{target.name.replace('.', '_')}.{nonce}" if aside_in is not None
                     else target.with_name(f".{target.name}.old.{nonce}"))
            try:
                os.rename(target, aside)
                asides.append(aside)
            except FileNotFoundError:
                pass
            try:
                os.rename(stage, target)
                break
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # (another writer's folder arrived between the two)
                    if asides and not target.exists():  # the old folder back in place: a failed replace changes nothing
                        with contextlib.suppress(OSError):
                            os.rename(asides[-1], target)
                            asides.pop()
                    if err.errno == errno.EXDEV:
                        raise StoreError(f"{stage} and {target} are on different filesystems: a folder is replaced by "
                                         "an atomic rename") from err
                    raise
        else:
            raise StoreError(f"{target}: could not be replaced (other writers replaced it 100 times meanwhile)")
        _fsync_dir(target.parent)
    finally:
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)


def _io_error(err: Exception, path: Path) -> Exception:
    """A Polars I/O failure as an ``OSError`` with errno and file name when it carries one ('os error 28')."""
    m = re.search(r"os error (\d+)", str(err))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    return StoreError(f"{path}: cannot write Parquet ({err})")


def file_info(path: Path, rel: str, rows: int = 0) -> SplitInfo:
    """Manifest entry of a written file: its path relative to the version, sha256 and size."""
    return SplitInfo(path=rel, rows=rows, sha256=sha256_file(path), bytes=path.stat().st_size)


def write_parquet(frame: pl.DataFrame, path: Path) -> SplitInfo:
    """Write a Parquet file (zstd level 1), fsync it (:func:`sync_file`), re-read its row count and
    return path/rows/sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # zstd level 1: half the write time of the default level 3 for ~20 % larger files (measured
    # on 1M judgments: 4.1 s vs 8.1 s, 169 vs 136 MB)
    try:
        frame.write_parquet(path, compression="zstd", compression_level=1, statistics=True)
    except pl.exceptions.PolarsError as err:  # e.g. disk full: surface it as the OSError it is
        raise _io_error(err, path) from err
    import pyarrow.parquet as pq  # (here: ~0.1 s to import, which a command that writes nothing does not pay)

    with open(path, "rb") as fh:
        sync_file(fh.fileno(), path)
        rows = pq.ParquetFile(fh).metadata.num_rows  # (the footer only: a third of a Polars scan's time per part)
    if rows != frame.height:
        raise StoreError(f"{path}: wrote {frame.height} rows but read back {rows}")
    return SplitInfo(path=str(path), rows=rows, sha256=sha256_file(path), bytes=path.stat().st_size)


# ---------------------------------------------------------------- store
def _file_entries(m: Manifest) -> dict[str, SplitInfo]:
    """Every file a manifest names, by path relative to the version directory: the parts of its
    tables and its other files (a manifest from before tables names its splits as single files)."""
    if m.tables:
        return {**{p.path: p for t in m.tables.values() for p in t.parts}, **m.files}
    return {**{f"data/{k}.parquet": v for k, v in m.splits.items()}, **m.files}


def inside_version(rel: str) -> bool:
    """A manifest path names a file inside the version folder: relative, ``/``-separated, no empty,
    ``.`` or ``..`` component (a manifest is read back like any file: its paths are checked before
    they are joined onto the version's path)."""
    return (isinstance(rel, str) and bool(rel) and not rel.startswith("/") and "\\" not in rel and "\x00" not in rel
            and all(c not in ("", ".", "..") for c in rel.split("/")))


def table_sha256(parts: list[SplitInfo]) -> str:
    """The hash of a table: its ordered parts (path and sha256)."""
    return hashlib.sha256("".join(f"{p.path}\t{p.sha256}\n" for p in parts).encode()).hexdigest()


def verify_files(m: Manifest, root: Path, *, objects: Path | None = None,
                 known: dict[str, tuple[int, int, int]] | None = None,
                 checked: dict[str, tuple[int, int, int]] | None = None) -> list[str]:
    """Every file named in the manifest exists under ``root`` with its sha256; returns problems (empty = ok).

    ``objects``: the store's object directory; a file that *is* (same inode) the object named by
    its sha256 is not hashed again (used when a writer checks its own staged version: it linked
    parts it had hashed, or its parent's, which were verified when read).
    ``known``: sha256 -> (inode, size, mtime_ns) the file had when an earlier verification hashed
    it (a certification's part facts); a file that still has them is not hashed again.
    ``checked``: filled with sha256 -> (inode, size, mtime_ns) of every file found intact."""
    problems = []
    for key, t in m.tables.items():
        if table_sha256(t.parts) != t.sha256 or sum(p.rows for p in t.parts) != t.rows:
            problems.append(f"{key}/: the list of parts does not match the table's sha256 or row count")
    for name, info in _file_entries(m).items():
        if not inside_version(name):
            problems.append(f"{name!r}: not a path inside the version (the manifest names a file elsewhere)")
            continue
        p = root / name
        if not p.is_file():
            problems.append(f"{name}: missing")
            continue
        st = p.stat()
        stat_key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if info.bytes is not None and st.st_size != info.bytes:  # (a stat: even a shared object is sized)
            problems.append(f"{name}: {st.st_size} bytes, the manifest says {info.bytes} (file changed after the version was written)")
            continue
        if objects is not None and _is_object(p, objects, info.sha256):
            pass
        elif known is not None and known.get(info.sha256) == stat_key:
            pass
        elif sha256_file(p) != info.sha256:
            problems.append(f"{name}: sha256 differs from the manifest (file changed after the version was written)")
            continue
        if checked is not None:
            checked[info.sha256] = stat_key
    return problems


def _is_object(p: Path, objects: Path, sha: str) -> bool:
    obj = objects / sha[:2] / f"{sha}.parquet"
    try:
        return os.path.samefile(p, obj)
    except OSError:
        return False


@dataclass(frozen=True)
class ChainStatus:
    """Result of verifying certificate -> manifest -> files for one version.

    ``link`` names the first broken link: ``certificate`` (no record, damaged record, or a record
    for another version), ``verdict`` (latest record rejected), ``signature`` (signing configured
    and the record's signature missing or wrong), ``manifest`` (manifest.json is not the one the
    record certified, or is damaged), ``publication`` (manifest.json, and the certificate with it, is not
    a manifest the store published as this version: :meth:`Store.publication`), ``files`` (a file differs
    from the manifest's sha256); and, from :meth:`Store.trust` only, ``protected`` (its train/validation
    splits hold protected pairs)."""

    ok: bool
    link: str | None
    reason: str
    record: dict[str, Any] | None = None


SCAN_GROUP_BYTES = 32 << 20  # a read holds at most this much of a table's verified bytes at once (plus one part)


def _scan_groups(version: VersionHandle, names: list[str]) -> Iterator[list[tuple[str, bytes]]]:
    """The verified bytes of ``names`` in order, in groups of about :data:`SCAN_GROUP_BYTES`."""
    group: list[tuple[str, bytes]] = []
    size = 0
    for name in names:
        data = version.read_bytes(name)
        group.append((name, data))
        size += len(data)
        if size >= SCAN_GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


@dataclass(frozen=True)
class VersionHandle:
    """Read access to one version (the public reader the trainer and reports use).

    Everything read through a handle is verified: ``manifest()`` parses the bytes whose sha256
    :meth:`manifest_sha256` reports (so a certificate check and the parse see the same bytes),
    and :meth:`read` / :meth:`read_split` hash a file's bytes against the manifest before
    parsing those same bytes."""

    store: Store
    version_id: str

    @property
    def path(self) -> Path:
        return self.store.versions_dir / self.version_id

    @cached_property
    def _manifest_bytes(self) -> bytes:
        p = self.path / "manifest.json"
        try:
            return p.read_bytes()
        except OSError as err:
            raise DamagedVersion(f"{p}: cannot read the manifest ({err.strerror or err})", path=p) from err

    def manifest_sha256(self) -> str:
        return hashlib.sha256(self._manifest_bytes).hexdigest()

    @cached_property
    def _manifest(self) -> Manifest:
        p = self.path / "manifest.json"
        try:
            m = Manifest.model_validate_json(self._manifest_bytes)
        except ValueError as err:  # pydantic ValidationError (JSON syntax included) is a ValueError
            first = str(err).splitlines()
            raise DamagedVersion(f"{p}: damaged manifest ({first[1] if len(first) > 1 else first[0]})".strip(), path=p) from None
        if m.version_id != self.version_id:
            raise DamagedVersion(f"{p}: the manifest names version {m.version_id!r}, not {self.version_id!r} "
                                 "(a manifest copied from another version)", path=p)
        return m

    def manifest(self) -> Manifest:
        return self._manifest

    def file(self, rel: str) -> Path:
        return self.path / rel

    @cached_property
    def _entries(self) -> dict[str, SplitInfo]:  # the manifest is parsed once per handle: so is this
        return _file_entries(self.manifest())

    def _entry(self, rel: str) -> SplitInfo:
        info = self._entries.get(rel)
        if info is None:
            raise IntegrityError(f"{self.path / rel}: not listed in the manifest of {self.version_id}; refusing to read it",
                                 path=self.path / "manifest.json")
        if not inside_version(rel):
            raise IntegrityError(f"{rel!r}: not a path inside the version (the manifest of {self.version_id} names a file "
                                 "elsewhere); refusing to read it", path=self.path / "manifest.json")
        return info

    def read_bytes(self, rel: str) -> bytes:
        """A file's bytes, after checking them against the manifest's sha256."""
        info, p = self._entry(rel), self.path / rel
        try:
            data = p.read_bytes()
        except OSError as err:
            raise IntegrityError(f"{p}: cannot read ({err.strerror or err})", path=p) from err
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise IntegrityError(f"{p}: sha256 differs from the manifest of {self.version_id} (file changed after the version "
                                 "was written)", path=p)
        return data

    def read_parts(self, rel: str) -> Iterator[tuple[str, bytes]]:
        """(path, verified bytes) of each part of a table (or of the file), in order: for a reader
        that takes several frames from one read (:meth:`parsing` names a part that does not parse)."""
        t = self.table(rel)
        for name in [p.path for p in t.parts] if t is not None else [rel]:
            yield name, self.read_bytes(name)

    @contextlib.contextmanager
    def parsing(self, name: str) -> Iterator[None]:
        """A file that hashes right but does not parse is a damaged version."""
        try:
            yield
        except Exception as err:  # noqa: BLE001
            raise DamagedVersion(f"{self.path / name}: not readable as Parquet ({err})", path=self.path / name) from err

    def verified_path(self, rel: str) -> Path:
        """The path of a manifest-listed file after checking its sha256 (for readers that need a path)."""
        self.read_bytes(rel)
        return self.path / rel

    def table(self, name: str) -> TableInfo | None:
        """The table ``name`` (``judgments``, ``data/train``; a ``.parquet`` suffix is ignored) if the
        version stores it as a folder of parts."""
        return self.manifest().tables.get(name.removesuffix(".parquet"))

    def has(self, rel: str) -> bool:
        """The version has this table or file."""
        return self.table(rel) is not None or rel in self._entries

    def read(self, rel: str, columns: list[str] | None = None, where: pl.Expr | None = None,
             keys: Collection[str] | None = None) -> pl.DataFrame:
        """A table or Parquet file of the version, every part verified against the manifest and
        parsed from the verified bytes; a table's parts are concatenated in order.  ``where``:
        only the rows it selects (the other columns are decoded for those rows only).  ``keys``:
        only a table's parts with these keys (``part-<key>.parquet``; the rows wanted are known to
        be in them) -- none of them: the table's schema, no rows."""
        t = self.table(rel)
        names = [p.path for p in t.parts] if t is not None else [rel]
        if keys is not None and t is not None:
            wanted = {f"part-{k}.parquet" for k in keys}
            names = [n for n in names if n.rsplit("/", 1)[-1] in wanted] or names[:1]
            if not any(n.rsplit("/", 1)[-1] in wanted for n in names):
                where = pl.lit(False)
        frames = []
        for group in _scan_groups(self, names):
            frames.extend(self._read_group(group, columns, where))
        return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")

    def _read_group(self, group: list[tuple[str, bytes]], columns: list[str] | None,
                    where: pl.Expr | None) -> list[pl.DataFrame]:
        """Verified parts parsed by one scan: a read per part costs ~1 ms of set-up whatever its
        size (a 256-part table of 40 MB: 0.45 -> 0.12 s, measured).  Parts whose schemas differ,
        or one that does not parse, are read one by one (which names the part)."""
        if len(group) > 1:
            q = pl.scan_parquet([io.BytesIO(d) for _, d in group])
            q = q.filter(where) if where is not None else q
            try:
                return [(q.select(columns) if columns is not None else q).collect()]
            except Exception:  # noqa: BLE001
                pass
        frames = []
        for name, data in group:
            with self.parsing(name):
                if where is None:
                    frames.append(pl.read_parquet(io.BytesIO(data), columns=columns))
                else:
                    q = pl.scan_parquet(io.BytesIO(data)).filter(where)
                    frames.append((q.select(columns) if columns is not None else q).collect())
        return frames

    def split_path(self, split: str) -> Path:
        """The split as other tools read it: a folder of Parquet parts (``data/train/``), or the
        single file of a version written before tables (``data/train.parquet``)."""
        t = self.table(f"data/{split}")
        return self.path / (t.path if t is not None else f"data/{split}.parquet")

    def split_files(self, split: str) -> list[Path]:
        """The Parquet files of one split, in order."""
        t = self.table(f"data/{split}")
        return [self.path / p.path for p in t.parts] if t is not None else [self.path / "data" / f"{split}.parquet"]

    def read_split(self, split: str, columns: list[str] | None = None) -> pl.DataFrame:
        """DPO rows of one split, verified (see :meth:`read`)."""
        t = self.table(f"data/{split}")
        return self.read(f"data/{split}" if t is not None else f"data/{split}.parquet", columns=columns)

    def verify(self) -> list[str]:
        """Every file named in the manifest exists with its sha256; returns problems (empty = ok)."""
        return verify_files(self.manifest(), self.path)

    def certification(self) -> dict[str, Any] | None:
        """The latest certification record as stored (not verified: see :meth:`verify_chain`)."""
        return self.store.latest_certification(self.version_id)

    def verify_chain(self, *, files: bool = True, keyring: Any = "env") -> ChainStatus:
        """Certificate -> manifest -> files.  Any broken link means "not certified".

        ``files=False`` stops after the manifest link (no hashing of the data files).
        ``keyring``: the signing key to verify with (default: from the environment)."""
        from pipeline.signing import load_keyring, verify_record

        try:
            rec = self.store.latest_certification(self.version_id)
        except StoreError as err:
            return ChainStatus(False, "certificate", str(err))
        if rec is None:
            return ChainStatus(False, "certificate", f"version {self.version_id} has no certification record; "
                               f"run `prefpipe certify {self.version_id}`")
        if rec.get("version_id") != self.version_id:
            return ChainStatus(False, "certificate", f"the certification record of {self.version_id} names version "
                               f"{rec.get('version_id')!r} (a record copied from another version)", rec)
        ring = load_keyring() if keyring == "env" else keyring
        if ring is not None:
            why = verify_record(rec, ring)
            if why:
                return ChainStatus(False, "signature", f"certification of {self.version_id}: {why}", rec)
        if rec.get("verdict") != "certified":
            failing = [g.get("name") for g in rec.get("gates", []) if not g.get("passed")]
            return ChainStatus(False, "verdict", f"version {self.version_id} was rejected by its latest certification "
                               f"(failing gates: {', '.join(map(str, failing))})", rec)
        want = rec.get("manifest_sha256")
        if not want:
            return ChainStatus(False, "manifest", f"the certification of {self.version_id} does not bind a manifest "
                               "(a record from before content binding); re-run `prefpipe certify`", rec)
        try:
            have = self.manifest_sha256()
            self.manifest()
        except DamagedVersion as err:
            return ChainStatus(False, "manifest", str(err), rec)
        if have != want:
            return ChainStatus(False, "manifest", f"manifest.json of {self.version_id} is not the one that was certified "
                               f"(sha256 {have[:12]}..., certified {str(want)[:12]}...): it changed after certification", rec)
        pub = self.store.publication(self)
        if pub.ok is False:
            return ChainStatus(False, "publication", pub.reason, rec)
        if files:
            problems = self.verify()
            if problems:
                return ChainStatus(False, "files", f"files of {self.version_id} do not match the manifest: {'; '.join(problems)}", rec)
        ok = ("certified: certificate -> manifest -> files verified" if files
              else "certified: certificate -> manifest verified (files not hashed)")
        return ChainStatus(True, None, ok if pub.ok else f"{ok}; {pub.reason}", rec)


@dataclass(frozen=True)
class VersionEntry:
    """One directory under versions/: a readable version, or a damaged one with the reason.
    ``parent``: its parent version; ``new_sources``: sha256 of the input files it added (all of
    its sources for a version without a parent, or without that lineage record)."""

    version_id: str
    created_at: str
    damaged: str | None = None
    parent: str | None = None
    new_sources: tuple[str, ...] = ()


# the listing's cache (STORE/.index/versions.json): per version, what list_versions reads from its
# manifest, and the manifest's (inode, size, mtime_ns) when it was read
INDEX = Path(".index") / "versions.json"
INDEX_FORMAT = 1
# the publication record (STORE/.index/published/V.json): every manifest the store published as V, oldest first
PUBLISHED = Path(".index") / "published"
PUBLISHED_FORMAT = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Publication:
    """Whether a version's ``manifest.json`` is one the store published under its id (:meth:`Store.publication`).
    ``ok``: True it is; False it is not, or the record is damaged (``reason`` says which); None: the store has no
    record of the version (published before the store kept them) -- nothing to compare with, and ``reason`` says so."""

    ok: bool | None
    reason: str


def _entry_of(vid: str, m: Manifest) -> VersionEntry:
    new = m.lineage.get("new_sources") if m.parent_version else None
    shas = [s.get("sha256") for s in new if isinstance(s, dict)] if isinstance(new, list) else None
    if shas is None or not all(isinstance(x, str) for x in shas):
        shas = [s.sha256 for s in m.sources]
    return VersionEntry(vid, m.created_at.isoformat(), None, m.parent_version, tuple(shas))


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- layout
    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def ensure(self) -> Store:
        try:
            for d in ("versions", "certifications", ".staging", ".locks"):
                (self.root / d).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the store layout under {self.root}: {err.strerror or err}") from err
        return self

    def exists(self, version_id: str) -> bool:
        return is_safe_id(version_id) and (self.versions_dir / version_id / "manifest.json").is_file()

    def get(self, version_id: str) -> VersionHandle:
        _check_ref(version_id)
        if not self.exists(version_id):
            known = ", ".join(self.list_ids()[-5:]) or "none"
            raise VersionNotFound(f"no version {version_id!r} in store {self.root} (latest: {known})")
        return VersionHandle(self, version_id)

    def resolve(self, ref: str) -> VersionHandle:
        """A version by id, unique id prefix, or ``latest`` (the newest undamaged version)."""
        if ref == "latest":
            ids = self.list_ids()
            if not ids:
                raise VersionNotFound(f"store {self.root} has no (undamaged) versions yet")
            return VersionHandle(self, ids[-1])
        _check_ref(ref)
        if self.exists(ref):
            return VersionHandle(self, ref)
        matches = [e.version_id for e in self.list_versions() if e.version_id.startswith(ref)]
        if len(matches) == 1:
            return VersionHandle(self, matches[0])
        if len(matches) > 1:
            raise VersionNotFound(f"version prefix {ref!r} is ambiguous: {', '.join(matches)}")
        return self.get(ref)

    def list_versions(self) -> list[VersionEntry]:
        """Every version directory, oldest first; damaged ones (unreadable manifest, unsafe name)
        are listed with the reason instead of breaking the listing.

        A manifest is parsed once: what the listing needs of it is cached in ``.index/versions.json``
        with the manifest file's (inode, size, mtime_ns), and parsed again only when those change
        (a listing of N versions costs N ``stat`` calls, not N manifest parses: the scheduled inbox
        lists the store for every batch).  The cache is rewritten (atomically, best effort) when the
        listing found anything it did not have; a damaged or foreign cache is ignored and rebuilt.
        Nothing read from a version is taken from the cache: it only orders and names versions."""
        if not self.versions_dir.is_dir():
            return []
        cache = self._read_index()
        fresh: dict[str, dict[str, Any]] = {}
        items = []
        for d in os.scandir(self.versions_dir):
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                st = os.stat(os.path.join(d.path, "manifest.json"))
            except OSError:
                continue  # an orphan folder (no manifest): never a version; swept by the next writer of that id
            if not is_safe_id(d.name):
                items.append(VersionEntry(d.name, "", f"directory name {d.name!r} is not a valid version id"))
                continue
            key = [st.st_ino, st.st_size, st.st_mtime_ns]
            rec = cache.get(d.name)
            if isinstance(rec, dict) and rec.get("stat") == key:
                try:
                    items.append(VersionEntry(d.name, str(rec["created_at"]), None, rec["parent"],
                                              tuple(str(x) for x in rec["new_sources"])))
                    fresh[d.name] = rec
                    continue
                except (KeyError, TypeError):
                    pass  # a damaged record: read the manifest
            try:
                e = _entry_of(d.name, VersionHandle(self, d.name).manifest())
            except DamagedVersion as err:
                items.append(VersionEntry(d.name, "", str(err)))
                continue
            items.append(e)
            fresh[d.name] = {"stat": key, "created_at": e.created_at, "parent": e.parent, "new_sources": list(e.new_sources)}
        if fresh.keys() != cache.keys() or any(fresh[k] is not cache.get(k) for k in fresh):
            self._write_index(fresh)
        # damaged ones sort first (no date); the order of readable ones is by creation time
        return sorted(items, key=lambda e: (e.created_at, e.version_id))

    def _index_add(self, version_id: str, manifest: Manifest) -> None:
        """The listing's cache learns of a version as it is published (best effort: a listing
        parses the manifest of a version the cache lacks)."""
        try:
            st = os.stat(self.versions_dir / version_id / "manifest.json")
            with self.lock("index"):
                cache = self._read_index()
                e = _entry_of(version_id, manifest)
                cache[version_id] = {"stat": [st.st_ino, st.st_size, st.st_mtime_ns], "created_at": e.created_at,
                                     "parent": e.parent, "new_sources": list(e.new_sources)}
                self._write_index(cache)
        except (OSError, StoreError):
            pass

    def _read_index(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.root / INDEX).read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT or not isinstance(doc.get("versions"), dict):
            return {}
        return doc["versions"]

    def _write_index(self, versions: dict[str, Any]) -> None:
        """Best effort: a read-only store, or a full disk, lists by parsing the manifests instead."""
        try:
            (self.root / INDEX).parent.mkdir(exist_ok=True)
            atomic_write_bytes(self.root / INDEX, json.dumps({"format": INDEX_FORMAT, "versions": versions},
                                                              separators=(",", ":"), sort_keys=True).encode())
        except OSError:
            pass

    def source_hashes(self) -> set[str]:
        """sha256 of every input file any readable version was built from.  A version adds its own
        (``lineage.new_sources``) to its parent's; a version whose parent is gone (collected)
        contributes every source its manifest lists."""
        entries = {e.version_id: e for e in self.list_versions() if e.damaged is None}
        out: set[str] = set()
        for e in entries.values():
            if e.parent is None or e.parent in entries:
                out.update(e.new_sources)
            else:
                out.update(s.sha256 for s in VersionHandle(self, e.version_id).manifest().sources)
        return out

    def list_ids(self) -> list[str]:
        """Readable version ids, oldest first (by manifest created_at); damaged versions are skipped."""
        return [e.version_id for e in self.list_versions() if e.damaged is None]

    # -- writing
    @contextlib.contextmanager
    def _flocked(self, name: str, mode: int, what: str) -> Iterator[None]:
        """``STORE/.locks/<name>.lock`` held with ``flock(mode)`` (waiting for it) until exit; the kernel
        releases it if the process dies.  ``what``: the error's verb ("lock", "hold")."""
        self.ensure()
        try:
            # ("a": created if missing, never truncated -- taking a lock writes nothing, not even its mtime)
            fh = open(self.root / ".locks" / f"{name}.lock", "a")  # noqa: SIM115 - closed below
        except OSError as err:
            raise StoreError(f"cannot {what} {name} in {self.root / '.locks'}: {err.strerror or err}") from err
        with fh:
            fcntl.flock(fh, mode)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Exclusive advisory lock (released on exit and by the kernel if the process dies)."""
        return self._flocked(name, fcntl.LOCK_EX, "lock")

    @contextlib.contextmanager
    def try_lock(self, name: str) -> Iterator[bool]:
        """:meth:`lock` without waiting: yields True holding it, False when someone else holds it."""
        self.ensure()
        with open(self.root / ".locks" / f"{name}.lock", "a") as fh:  # (as in _flocked: never truncated)
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def in_use(self, version_id: str) -> contextlib.AbstractContextManager[None]:
        """A shared hold on a version while a build reads it (a child's parent: its parts are read and
        linked): any number of holders at once; ``prefpipe gc`` does not remove a version someone holds
        (:meth:`retiring`).  The caller checks the version still exists once it holds it."""
        _check_ref(version_id)
        return self._flocked(f"{USE_LOCK_PREFIX}{version_id}", fcntl.LOCK_SH, "hold")

    def retiring(self, version_id: str) -> contextlib.AbstractContextManager[bool]:
        """:meth:`try_lock` on a version's :meth:`in_use` hold: True (held, exclusive) when no build
        uses it -- none can start using it before this is released -- False when one does."""
        _check_ref(version_id)
        return self.try_lock(f"{USE_LOCK_PREFIX}{version_id}")

    def sweep_staging(self, max_age: float = STALE_STAGING_SECONDS) -> int:
        """Remove staging dirs whose writers are gone (:func:`dead_stages`)."""
        removed = 0
        for d in dead_stages(self.root / ".staging", max_age):
            remove_stage(d)
            removed += 1
        return removed

    def _sweep_orphan(self, version_id: str) -> None:
        """A ``versions/<id>`` folder without a manifest is not a version (a writer only renames a
        complete directory into place): move it aside into .staging so the rename can succeed."""
        target = self.versions_dir / version_id
        if target.exists() and not (target / "manifest.json").is_file():
            aside = self.root / ".staging" / f"orphan-{version_id}.0.{uuid.uuid4().hex[:8]}"
            os.rename(target, aside)
            shutil.rmtree(aside, ignore_errors=True)

    def write_version(self, version_id: str, build: Callable[[Path], Manifest]) -> tuple[str, bool]:
        """Create ``versions/<version_id>`` atomically unless it exists.

        ``build(stage_dir)`` writes every file into ``stage_dir`` and returns the manifest
        (which this method writes last).  Returns ``(version_id, created)``.
        """
        _check_ref(version_id)
        self.ensure()
        if self.exists(version_id):
            return version_id, False
        with self.lock(version_id):
            if self.exists(version_id):  # another process finished it while we waited
                return version_id, False
            self.sweep_staging()
            self._sweep_orphan(version_id)
            stage = self.root / ".staging" / f"{version_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            mark = StageMark(stage)
            stage.mkdir(parents=True)
            try:
                with deferred_sync(stage):
                    manifest = build(stage)
                if manifest.version_id != version_id:
                    raise StoreError(f"manifest names {manifest.version_id}, expected {version_id}")
                atomic_write_json(stage / "manifest.json", manifest.model_dump(mode="json"))
                problems = verify_files(manifest, stage, objects=self.root / "objects")
                if problems:
                    raise IntegrityError(f"staged version {version_id} failed its own check: {problems}")
                sync_tree(stage)  # every staged file durable before the rename makes the version visible
                # what is published, recorded before it is visible (a failed rename leaves a record of bytes never
                # seen: harmless; a visible version without its record would be taken for one from before records)
                self._record_publication(version_id, sha256_file(stage / "manifest.json"))
                target = self.versions_dir / version_id
                try:
                    os.rename(stage, target)
                except OSError as err:
                    if self.exists(version_id):  # lost a race with a writer outside our lock
                        shutil.rmtree(stage, ignore_errors=True)
                        return version_id, False
                    if err.errno == errno.EXDEV:
                        raise StoreError(f"{self.versions_dir} is on another filesystem than {self.root / '.staging'}: "
                                         "a store must live on one filesystem (versions appear by an atomic rename)") from err
                    raise
                _fsync_dir(self.versions_dir)
                self._index_add(version_id, manifest)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
            finally:
                mark.release()
        return version_id, True

    # -- certifications (records beside the version, never inside it)
    def certification_path(self, version_id: str) -> Path:
        _check_ref(version_id)
        return self.root / "certifications" / f"{version_id}.json"

    def certification_history(self, version_id: str) -> list[dict[str, Any]]:
        p = self.certification_path(version_id)
        if not p.exists():
            return []
        try:
            doc = json.loads(p.read_bytes())
            hist = doc.get("history", []) if isinstance(doc, dict) else None
        except (OSError, ValueError) as err:
            raise StoreError(f"{p}: damaged certification record ({err})") from None
        if not isinstance(hist, list) or not all(isinstance(r, dict) for r in hist):
            raise StoreError(f"{p}: damaged certification record (no list of records under 'history')")
        return hist

    def latest_certification(self, version_id: str) -> dict[str, Any] | None:
        hist = self.certification_history(version_id)
        return hist[-1] if hist else None

    def add_certification(self, cert: Certification) -> Path:
        """Append a certification record (history kept) atomically under a lock; signed when a key is configured.

        A damaged record file is kept aside (``VERSION.json.damaged-<time>``) and a new history starts."""
        from pipeline.signing import load_keyring, sign_record

        self.ensure()
        record = cert.model_dump(mode="json")
        ring = load_keyring()
        if ring is not None:
            record = sign_record(record, ring)
        path = self.certification_path(cert.version_id)
        with self.lock(f"cert-{cert.version_id}"):
            try:
                hist = self.certification_history(cert.version_id)
            except StoreError:
                os.rename(path, path.with_name(f"{path.name}.damaged-{int(time.time())}"))
                hist = []
            hist.append(record)
            doc = {"version_id": cert.version_id, "verdict": record["verdict"], "policy_hash": record["policy_hash"],
                   "manifest_sha256": record.get("manifest_sha256"), "certified_at": record["certified_at"],
                   "gates": record["gates"], "history": hist}
            atomic_write_json(path, doc)
        return path

    # -- publications (STORE/.index/published/V.json: what the store published as V; only appended to)
    def publication_path(self, version_id: str) -> Path:
        _check_ref(version_id)
        return self.root / PUBLISHED / f"{version_id}.json"

    def publications(self, version_id: str) -> list[dict[str, Any]] | None:
        """Every publication of ``version_id``, oldest first: ``{"manifest_sha256", "published_at"}``; None when the
        store has no record of it (a version published before the store kept them).  A record that cannot be read,
        or is not one, raises :class:`StoreError` (it vouches for nothing)."""
        p = self.publication_path(version_id)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StoreError(f"{p}: cannot read the publication record ({err.strerror or err})") from err
        try:
            doc = json.loads(data)
        except ValueError as err:
            raise StoreError(f"{p}: damaged publication record ({err})") from None
        hist = doc.get("history") if isinstance(doc, dict) else None
        if not (isinstance(doc, dict) and doc.get("format") == PUBLISHED_FORMAT and doc.get("version_id") == version_id
                and isinstance(hist, list) and hist
                and all(isinstance(r, dict) and isinstance(r.get("manifest_sha256"), str)
                        and _SHA256.match(r["manifest_sha256"]) for r in hist)):
            raise StoreError(f"{p}: damaged publication record (not format {PUBLISHED_FORMAT} naming version "
                             f"{version_id!r} with a list of published manifest sha256s under 'history')")
        return hist

    def _record_publication(self, version_id: str, manifest_sha256: str) -> None:
        """Append a publication of ``version_id`` (atomically: temp + rename).  Called by :meth:`write_version`,
        holding the version's lock, before the rename that makes the version visible: a version is never visible
        without its record (a failure here publishes nothing).  A damaged record is kept aside
        (``V.json.damaged-<time>``) and a new history starts; a record outlives a deleted version (``gc --delete``),
        and the id built anew appends to it."""
        p = self.publication_path(version_id)
        try:
            hist = self.publications(version_id) or []
        except StoreError:
            os.rename(p, p.with_name(f"{p.name}.damaged-{int(time.time())}"))
            hist = []
        hist.append({"manifest_sha256": manifest_sha256, "published_at": datetime.now(UTC).isoformat()})
        atomic_write_json(p, {"format": PUBLISHED_FORMAT, "version_id": version_id, "history": hist})

    def publication(self, h: VersionHandle) -> Publication:
        """Whether ``h``'s ``manifest.json`` (its bytes' sha256) is a manifest this store published as ``h``'s id.
        Not: a part was changed and the manifest rewritten to match after publication -- the files verify against
        the manifest, the id (derived from the inputs) is the same, and only this record tells.  Raises
        :class:`DamagedVersion` when the manifest cannot be read."""
        try:
            hist = self.publications(h.version_id)
        except StoreError as err:
            return Publication(False, f"{err}: it cannot vouch for manifest.json of {h.version_id}")
        if hist is None:
            return Publication(None, f"the store has no publication record of {h.version_id} (published before the "
                               f"store kept them in {PUBLISHED}/): its manifest.json could not be compared with the "
                               "one published")
        have = h.manifest_sha256()
        last = hist[-1]
        if any(r["manifest_sha256"] == have for r in hist):
            return Publication(True, f"manifest.json of {h.version_id} is the one the store published")
        return Publication(False, f"{h.path / 'manifest.json'}: not the manifest the store published as {h.version_id} "
                           f"(sha256 {have[:12]}..., published {last['manifest_sha256'][:12]}... at "
                           f"{last.get('published_at')}): it was rewritten after publication")

    def protected_pair_ids(self) -> set[str]:
        """Pair ids of every protected evaluation set of the store (``prefpipe protect``)."""
        from pipeline.protect import protected_pair_ids

        return protected_pair_ids(self)

    def trust(self, h: VersionHandle, *, files: bool = True, protections: bool = True, cached: bool = True) -> ChainStatus:
        """What the trainer's way in (:meth:`open_certified`) decides for ``h``: certificate -> manifest (one the
        store published: :meth:`publication`) -> files (:meth:`VersionHandle.verify_chain`), then no pair of a
        protected evaluation set in its train/validation splits (link ``protected``: a protection added after the certificate still
        counts).  ``versions`` and ``show`` report this, so they never say "certified" of a version
        ``train`` refuses.  A protection record that cannot be read raises :class:`StoreError`.
        ``files=False, protections=False``: the chain to the manifest only (no data file read).
        ``cached``: near-duplicate matches of protected prompts already found for this manifest are
        read from the store's cache (``pipeline.protect``); the trainer's way in matches afresh."""
        status = h.verify_chain(files=files)
        if not status.ok or not protections:
            return status
        from pipeline.protect import contamination, load_protections

        hits = contamination(h, load_protections(self), cached=cached)
        if hits.height:
            shown = ", ".join(f"{p} ({w} of {b})" for p, w, b in hits.select("pair_id", "why", "protected_by").head(5).iter_rows())
            return ChainStatus(False, "protected", f"{hits.height} pairs of {h.version_id}'s train/validation splits belong "
                               f"to a protected evaluation set: {shown}", status.record)
        return status

    def open_certified(self, ref: str) -> VersionHandle:
        """The version behind ``ref`` after verifying certificate -> manifest -> files and that it
        trains on no protected pair (:meth:`trust`); raises :class:`NotCertified` naming the broken
        link otherwise.  Read its files with :meth:`VersionHandle.read` / :meth:`VersionHandle.read_split`
        (verified again at read time)."""
        h = self.resolve(ref)
        status = self.trust(h, cached=False)
        if not status.ok:
            raise NotCertified(status.link or "certificate", status.reason)
        return h


def _check_ref(ref: str) -> None:
    """Version ids and prefixes are validated before they are joined onto a path."""
    try:
        safe_id(ref, what="version id")
    except UnsafeId as err:
        raise VersionNotFound(str(err)) from None


ALIVE = ".alive"  # .staging/<name>.alive: held (flock) by the writer of .staging/<name> while it lives


class StageMark:
    """Marks the staging directory ``stage`` as its writer's for as long as the writer lives: an
    exclusive ``flock`` on the sibling file ``<stage>.alive``, taken before the directory is made
    and let go by :meth:`release` once the directory is renamed away or removed -- or by the kernel
    when the process dies.  A sweep on any machine that shares the store (``flock`` across hosts:
    NFSv4, EFS, docs/scale-out.md) removes the directory only when it can take that lock: a
    process id says nothing on another host, and a build may run longer than any age rule."""

    def __init__(self, stage: Path) -> None:
        stage.parent.mkdir(parents=True, exist_ok=True)
        self.marker = stage.with_name(stage.name + ALIVE)
        tmp = stage.with_name(f".{stage.name}{ALIVE}.{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(tmp, self.marker)  # (appears locked: a sweep never finds it free while its writer lives)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.marker)
        os.close(self._fd)
        self._fd = None


def _writer_gone(d: Path, max_age: float) -> bool:
    """Whether nobody writes the staging directory ``d`` any more: its ``.alive`` lock is free, or
    -- a directory without one: a writer before marks, or trash being deleted (``gc-``/``orphan-``
    names, pid 0) -- the process its name gives is not alive here or it is older than ``max_age``."""
    free = _lock_free(d.with_name(d.name + ALIVE))
    if free is not None:
        return free
    try:
        pid = int(d.name.split(".")[1])
    except (IndexError, ValueError):
        pid = -1
    try:
        old = time.time() - d.stat().st_mtime > max_age
    except FileNotFoundError:  # (finished meanwhile)
        return False
    return not (pid > 0 and _pid_alive(pid)) or old


def dead_stages(staging: Path, max_age: float = STALE_STAGING_SECONDS) -> list[Path]:
    """The directories under ``staging`` whose writers are gone (:class:`StageMark`), and the marks
    and half-made marks left without a directory by writers that died."""
    if not staging.is_dir():
        return []
    dead = []
    for d in sorted(staging.iterdir()):
        if d.name.endswith(ALIVE) or (d.name.startswith(".") and ALIVE in d.name):
            stem = d.name[1:].split(ALIVE)[0] if d.name.startswith(".") else d.name[:-len(ALIVE)]
            half_made = d.name.startswith(".")  # (its writer may be between making it and locking it: a minute)
            if not (staging / stem).exists() and _lock_free(d) is True and not (half_made and _younger(d, 60.0)):
                dead.append(d)
        elif _writer_gone(d, max_age):
            dead.append(d)
    return dead


def _younger(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime < seconds
    except FileNotFoundError:
        return False


def _lock_free(path: Path) -> bool | None:
    """Whether nobody holds the ``flock`` of the file ``path`` (None: there is no such file)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def remove_stage(d: Path) -> None:
    """Remove a dead writer's staging directory (or a mark left alone), then its mark."""
    if d.is_dir() and not d.is_symlink():
        shutil.rmtree(d, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            d.unlink()
    with contextlib.suppress(FileNotFoundError):
        d.with_name(d.name + ALIVE).unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
