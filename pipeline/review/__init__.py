"""The review round trip as files: routed pairs out to a review tool, the reviewers' answers back in.

``export_review`` turns a version's routed pairs (``routed.parquet``, read through the store's
verified reader) into review tasks for one tool; ``import_review`` turns that tool's export back
into canonical raw judgments with ``review_of`` set, a ledger that adds up, and nothing written
unless the whole file is usable.  One module per tool format: :mod:`.jsonl`,
:mod:`.label_studio`, :mod:`.argilla`; what they share (display order, text hashes, checks
against the store) is in :mod:`.tasks`; the export log (which pairs went out) in :mod:`.exports`.
How reviews *resolve* routed pairs in a child version is :mod:`pipeline.reviews_resolve`: the
imported batch is curated like any batch (``prefpipe curate BATCH --parent V``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.review import argilla, jsonl, label_studio
from pipeline.review.argilla import PushError
from pipeline.review.exports import record_export
from pipeline.review.tasks import (ReviewFileError, RoutedIndex, TaskReader, check_out_path, dumps_jsonl, env_flag,
                                   first_error, routed_pairs, tasks_from_routed)
from pipeline.store import Store, VersionHandle, VersionNotFound, _fsync_dir
from schemas.review import REVIEW_FORMATS, ROUTE_REASONS, ImportLedger, ReviewAnswer, ReviewJudgment, dimension_name

_READERS = {"jsonl": jsonl.read_answers, "label-studio": label_studio.read_answers, "argilla": argilla.read_answers}


def check_format(fmt: str) -> str:
    if fmt not in REVIEW_FORMATS:
        raise ValueError(f"unknown review format {fmt!r}; expected one of {', '.join(REVIEW_FORMATS)}")
    return fmt


def parse_dimensions(dimensions: str | None) -> tuple[str, ...]:
    """``--dimensions helpfulness,harmlessness`` -> validated names (``[a-z][a-z0-9_]*``)."""
    names = tuple(dict.fromkeys(d.strip() for d in (dimensions or "").split(",") if d.strip()))
    return tuple(dimension_name(d) for d in names)


# ---------------------------------------------------------------- export
@dataclass(frozen=True)
class ExportResult:
    version_id: str
    fmt: str
    tasks: int
    by_reason: dict[str, int]
    files: list[Path]
    pushed: str | None = None  # the Argilla dataset created on the server, if pushed


def export_review(store: Store, ref: str, *, fmt: str, out: Path, reasons: tuple[str, ...] = ROUTE_REASONS,
                  dimensions: tuple[str, ...] = (), dataset_name: str | None = None, workspace: str | None = None,
                  push: bool = True) -> ExportResult:
    """Write the routed pairs of version ``ref`` as review tasks for ``fmt`` at ``out``.

    The version is held (:meth:`Store.in_use`) for the whole export: ``prefpipe gc --delete V --apply``
    running meanwhile keeps it (reported ``in_use``) instead of removing the files being read."""
    check_format(fmt)
    check_out_path(out, store.root)
    handle = store.resolve(ref)
    with store.in_use(handle.version_id):
        if not store.exists(handle.version_id):  # (removed between its lookup and the hold)
            raise VersionNotFound(f"version {handle.version_id} was removed (`prefpipe gc`) before the export could "
                                  "read it; nothing written")
        return _export_held(store, handle, fmt=fmt, out=out, reasons=reasons, dimensions=dimensions,
                            dataset_name=dataset_name, workspace=workspace, push=push)


def _export_held(store: Store, handle: VersionHandle, *, fmt: str, out: Path, reasons: tuple[str, ...],
                 dimensions: tuple[str, ...], dataset_name: str | None, workspace: str | None, push: bool) -> ExportResult:
    """:func:`export_review` once the version is held."""
    tasks = tasks_from_routed(routed_pairs(handle), handle.version_id, reasons)
    by_reason = dict(sorted(Counter(t.route for t in tasks).items()))
    if fmt == "jsonl":
        files = jsonl.export_files(tasks, out)
    elif fmt == "label-studio":
        files = label_studio.export_files(tasks, out, dimensions)
    else:
        name = dataset_name or f"prefpipe-review-{handle.version_id}"
        url, key = env_flag("ARGILLA_API_URL"), env_flag("ARGILLA_API_KEY")
        stage = argilla.export_dir(tasks, out, dimensions, name)
        pushed = None
        try:
            if push and url and key:
                pushed = argilla.push(stage, name=name, workspace=workspace or env_flag("ARGILLA_WORKSPACE"),
                                      api_url=url, api_key=key)
            with contextlib.suppress(FileNotFoundError, OSError):
                out.rmdir()  # an empty directory given as --out
            os.rename(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        _fsync_dir(out.parent)
        record_export(store, version_id=handle.version_id, fmt=fmt, pair_ids=[t.pair_id for t in tasks], out=out)
        return ExportResult(handle.version_id, fmt, len(tasks), by_reason, [out], pushed)
    write_files(files)
    # the export log (STORE/reviews/exports/, beside the versions): the funnel's "exported"
    record_export(store, version_id=handle.version_id, fmt=fmt, pair_ids=[t.pair_id for t in tasks], out=out)
    return ExportResult(handle.version_id, fmt, len(tasks), by_reason, list(files))


def write_files(files: dict[Path, bytes]) -> None:
    """Write every file to a temporary name first, then rename them all (none appears half-written)."""
    temps: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            temps[path] = tmp
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
    for parent in {p.parent for p in files}:
        _fsync_dir(parent)


# ---------------------------------------------------------------- import
@dataclass
class ImportResult:
    ledger: ImportLedger
    judgments: list[ReviewJudgment] = field(default_factory=list)
    out: Path | None = None
    checked_against: str | None = None  # "STORE (version V)" when the store check ran


def import_review(path: Path, *, fmt: str, out: Path, store: Store | None = None, version: str | None = None) -> ImportResult:
    """Read a tool's export, check every task, map answers to judgments and write them to ``out``
    atomically.  Any unusable task or answer raises :class:`ReviewFileError` before anything is written."""
    check_format(fmt)
    check_out_path(out, store.root if store else None)
    if path.resolve() == out.resolve():
        raise ReviewFileError(out, "is the file being imported; write the judgments to another file")
    routed = RoutedIndex(store, version) if store is not None else None
    reader = TaskReader(path, routed)
    ledger, judgments = _collect(_READERS[fmt](path, reader), reader)
    write_files({out: dumps_jsonl(j.model_dump(mode="json", exclude_none=True) for j in judgments)})
    where = f"{store.root} (version {routed.version or 'named by each task'})" if routed else None
    return ImportResult(ledger, judgments, out, where)


def _collect(items: Iterator[tuple[ReviewAnswer | str, bool]], reader: TaskReader) -> tuple[ImportLedger, list[ReviewJudgment]]:
    tasks = n = 0
    skipped: Counter[str] = Counter()
    judgments: dict[str, ReviewJudgment] = {}
    for item, starts_task in items:
        tasks += starts_task
        n += 1
        if isinstance(item, str):
            skipped[item] += 1
            continue
        try:
            j = item.judgment()
        except ValueError as err:  # e.g. a conversation that does not end with a user turn
            raise reader.fail(first_error(err), where=f"task {item.task.task_id}") from None
        if judgments.setdefault(j.comparison_id, j) is not j:
            raise reader.fail(f"the same answer ({item.answer_key}) appears twice", where=f"task {item.task.task_id}")
    ledger = ImportLedger(tasks_in=tasks, items_in=n, judgments_out=len(judgments), skipped=dict(sorted(skipped.items())))
    return ledger, list(judgments.values())


__all__ = ["ExportResult", "ImportResult", "PushError", "ReviewFileError", "check_format", "export_review",
           "import_review", "parse_dimensions"]
