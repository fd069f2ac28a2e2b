"""Inputs named by URL: any filesystem fsspec knows (``s3://``, ``gs://``, ``az://``, ``http(s)://``,
``memory://``, ...; the protocol's package -- s3fs, gcsfs, adlfs, aiohttp -- installed beside prefpipe).

A URL input is copied into the store before anything reads it
(``<store>/.staging/inputs.<pid>.<id>/<sha256>/<its file name>``: ``prefpipe gc`` removes it only once
that process is gone), hashed on the way: one streamed read of
the remote bytes (:data:`CHUNK` at a time, never the whole file in memory), after which the
build sees a local file with a known :class:`~pipeline.ingest.FileHash` -- the same version id
as the same bytes given as a local path -- whose rows record the URL as their source (``source``).
Readers then use the local copy (Parquet footers, gzip streams, memory maps need a seekable
local file; and the store must be on a filesystem with an atomic rename anyway:
docs/scale-out.md, "Filesystems").  The copies are removed when the curate call ends.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path

from pipeline.ingest import FileHash
from pipeline.readers import UnreadableFile
from pipeline.store import StageMark
from schemas.ids import is_safe_id

__all__ = ["CHUNK", "Staged", "is_url", "stage"]

CHUNK = 8 << 20  # bytes copied (and hashed) at a time
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(name: str | Path) -> bool:
    """``name`` names a file by URL (``scheme://...``), not by a local path (a ``Path`` never does)."""
    return isinstance(name, str) and bool(_URL.match(name))


class Staged:
    """The local copies of URL inputs one curate call made (:meth:`remove` when it ends)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.made: list[Path] = []
        self.urls: dict[str, str] = {}  # local copy -> the URL it was copied from
        self._mark: StageMark | None = None

    def stage(self, url: str) -> tuple[Path, FileHash]:
        if self._mark is None:  # (its directory is this process's while it lives: pipeline.store.StageMark)
            self._mark = StageMark(self.directory)
        path, hashed, made = stage(url, self.directory)
        if made:
            self.made.append(path)
        self.urls[str(path)] = url
        return path, hashed

    def inputs(self, names: list[str | Path]) -> tuple[list[Path], dict[str, FileHash]]:
        """Local paths for ``names`` (URLs staged here; a local path must be a file) and the hashes of the
        staged ones, by local path (:func:`pipeline.ingest.ingest_files`' ``hashed``)."""
        paths: list[Path] = []
        hashed: dict[str, FileHash] = {}
        seen: dict[tuple[int, int], str | Path] = {}  # (device, inode) of each local file -> the name it was given as
        for name in names:
            if is_url(name):
                path, h = self.stage(str(name))
                hashed[str(path)] = h
            else:
                path = Path(name)
                if path.is_dir():
                    raise UnreadableFile(path, "is a directory; expected a file (.jsonl, .ndjson, .json, their .gz, .parquet, .pq or .csv)")
                if not path.is_file():
                    raise UnreadableFile(path, "not a regular file" if path.exists() else "no such file")
            # one file read twice would count its rows twice and give two rows one (file, line)
            st = path.stat()
            first = seen.get((st.st_dev, st.st_ino))
            if first is not None:
                raise UnreadableFile(name, f"given twice (first as {str(first)!r}): each input file is read once; "
                                           "name it once")
            seen[(st.st_dev, st.st_ino)] = name
            paths.append(path)
        return paths, hashed

    def named(self, err: UnreadableFile) -> UnreadableFile:
        """``err`` about a staged copy, about its URL instead (else ``err``)."""
        url = self.urls.get(err.path)
        return err if url is None else UnreadableFile(url, err._why, err.line)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.made = []
        if self._mark is not None:
            self._mark.release()
            self._mark = None


def stage(url: str, directory: Path) -> tuple[Path, FileHash, bool]:
    """Copy the file ``url`` names to ``directory/<sha256>/<name>`` (streamed, hashed on the way,
    published by a rename): (the local path, its hash with ``source=url``, whether this call made
    it -- False when the same bytes were there already).  :class:`UnreadableFile` naming the URL if
    it cannot be read, its protocol is unknown or its package missing, or its name cannot name a
    local file."""
    import fsspec

    try:
        fs, remote = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:  # an unknown protocol, or its package is not installed
        raise UnreadableFile(url, f"cannot open this URL: {err}") from err
    name = posixpath.basename(remote.rstrip("/"))
    if not is_safe_id(name):
        raise UnreadableFile(url, f"its file name {name!r} cannot name a local file (use 1-128 characters of "
                                  "A-Z a-z 0-9 . _ -, not starting with '.' or '-')")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    try:
        with fs.open(remote, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        sha = digest.hexdigest()
        final = directory / sha / name
        final.parent.mkdir(exist_ok=True)
        made = not final.is_file() or final.stat().st_size != tmp.stat().st_size
        if made:  # (named by content: a copy already there is these bytes, and may be being read: left as it is)
            os.replace(tmp, final)
    except FileNotFoundError as err:
        raise UnreadableFile(url, "no such file") from err
    except OSError as err:
        raise UnreadableFile(url, f"cannot read: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    st = final.stat()
    return final, FileHash(sha, st.st_size, st.st_mtime_ns, source=url), made
