"""Review tasks: routed pairs out (display order, hashes), tool answers back in (checked texts).

Shared by the three formats (``jsonl``, ``label_studio``, ``argilla``).  Every exported task
carries a *payload*: the ids, the routing reason, the display order and content hashes of the
three texts as shown (prompt, response 1, response 2).  On import, :class:`TaskReader` rebuilds
the :class:`~schemas.review.ReviewTask` from a payload and the texts the tool sends back, and
refuses it (:class:`ReviewFileError`, exit 2) when anything does not match what was exported:
a tampered id or display order, a text that differs from its hash, and, with a store, a pair the
version never routed or a text that differs from the pair's.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from pipeline.readers import JSONValueError, UnreadableFile, loads_json
from pipeline.store import Store, StoreError, VersionHandle
from schemas.ids import is_safe_id
from schemas.records import Message
from schemas.review import ROUTE_REASONS, ReviewTask, text_hash
from schemas.text import content_hash, normalize_text, prompt_text

MAX_INPUT_BYTES = 1 << 30  # a tool export larger than this is refused as a whole (1 GiB)
PAYLOAD_KEYS = ("task_id", "version_id", "pair_id", "route", "shown_first", "prompt_hash", "response_1_hash",
                "response_2_hash", "prompt_messages", "locale", "rubric", "tags")
REQUIRED_PAYLOAD = ("task_id", "version_id", "pair_id", "route", "shown_first", "prompt_hash", "response_1_hash",
                    "response_2_hash")
TEXT_KEYS = ("prompt", "response_1", "response_2")


class ReviewFileError(UnreadableFile):
    """A review file (or one task, answer or field of it) that cannot be used: the message names the
    file, where in it (``tasks[3].annotations[0]``, ``line 7``) and the field.  Nothing is written."""

    def __init__(self, path: str | Path, why: str, *, where: str | None = None, field: str | None = None):
        self.where, self.field = where, field
        parts = [p for p in (where, f"field {field!r}" if field else None, why) if p]
        super().__init__(path, ": ".join(parts))
        if where is not None and (at := re.fullmatch(r"line (\d+)", where)):  # a JSON Lines file's line: --json's `line`
            self.line = int(at.group(1))


# ---------------------------------------------------------------- export: pairs -> tasks
def task_id_for(version_id: str, pair_id: str) -> str:
    """The task id of a pair in a version's export (a safe id whatever the pair id holds)."""
    return "rt-" + content_hash(f"{version_id}|{pair_id}")


def shown_first_for(version_id: str, pair_id: str) -> str:
    """The display order of a pair's task: ``a`` or ``b`` first, drawn with a seed derived from the
    version id and the pair id (the same export always shows the same order; about half each)."""
    return random.Random(int(content_hash(f"display|{version_id}|{pair_id}"), 16)).choice("ab")


def parse_reasons(reasons: str | None) -> tuple[str, ...]:
    """``--reasons tie,escalate`` -> the routing reasons asked for (default: all)."""
    if not reasons:
        return ROUTE_REASONS
    asked = tuple(dict.fromkeys(r.strip() for r in reasons.split(",") if r.strip()))
    unknown = [r for r in asked if r not in ROUTE_REASONS]
    if unknown or not asked:
        raise ValueError(f"unknown routing reason(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"allowed: {', '.join(ROUTE_REASONS)}")
    return asked


def routed_pairs(handle: VersionHandle) -> pl.DataFrame:
    """The version's routed pairs, read through the store's verified reader, each with its ``rubric``
    (:func:`pair_rubrics`: a pair record has no rubric of its own)."""
    routed = handle.read("routed.parquet")
    if "rubric" in routed.columns:
        return routed
    return routed.join(pair_rubrics(handle, routed["pair_id"]), on="pair_id", how="left", maintain_order="left")


def pair_rubrics(handle: VersionHandle, pair_ids: pl.Series) -> pl.DataFrame:
    """``pair_id``, ``rubric`` of ``pair_ids``: the first rubric the pair's non-review judgments give in the
    version (as the registry check takes a reviewed pair's rubric: :func:`pipeline.checks.registry.pair_values`).
    Three columns of the judgments' rows of these pairs are decoded, no text."""
    empty = pl.DataFrame(schema={"pair_id": pl.String, "rubric": pl.String})
    if pair_ids.len() == 0 or not handle.has("judgments"):
        return empty
    have = handle.read("judgments", keys=()).columns  # (one part's schema, no rows)
    if "rubric" not in have:
        return empty
    where = pl.col("pair_id").is_in(pair_ids.implode())
    if "review_of" in have:
        where = where & pl.col("review_of").is_null()
    rows = handle.read("judgments", columns=["pair_id", "rubric"], where=where)
    return rows.group_by("pair_id", maintain_order=True).agg(rubric=pl.col("rubric").cast(pl.String).drop_nulls().first())


def tasks_from_routed(routed: pl.DataFrame, version_id: str, reasons: Iterable[str] = ROUTE_REASONS) -> list[ReviewTask]:
    """One task per routed pair whose routing reason is in ``reasons``, in pair id order."""
    wanted = routed.filter(pl.col("route").is_in(list(reasons))).sort("pair_id")
    return [_task_from_pair(r, version_id) for r in wanted.iter_rows(named=True)]


def _task_from_pair(r: dict[str, Any], version_id: str) -> ReviewTask:
    return ReviewTask(
        task_id=task_id_for(version_id, r["pair_id"]), version_id=version_id, pair_id=r["pair_id"], route=r["route"],
        shown_first=shown_first_for(version_id, r["pair_id"]), prompt=r["prompt"], prompt_text=r["prompt_text"],
        response_a=r["response_a"], response_b=r["response_b"], model_a=r.get("model_a"), model_b=r.get("model_b"),
        locale=r.get("locale"), rubric=r.get("rubric"), tags=r.get("tags") or [],
    )


def payload(task: ReviewTask) -> dict[str, Any]:
    """What every exported task carries besides the three texts (ids, reason, order, hashes)."""
    return {"task_id": task.task_id, "version_id": task.version_id, "pair_id": task.pair_id, "route": task.route,
            "shown_first": task.shown_first, **task.hashes(),
            "prompt_messages": json.dumps([m.model_dump() for m in task.prompt], ensure_ascii=False),
            "locale": task.locale, "rubric": task.rubric, "tags": json.dumps(task.tags, ensure_ascii=False)}


def texts(task: ReviewTask) -> dict[str, str]:
    """The three texts in display order, as the tool shows them."""
    return {"prompt": task.prompt_text, "response_1": task.first, "response_2": task.second}


# ---------------------------------------------------------------- import: payload + texts -> task
@dataclass
class RoutedIndex:
    """Routed pairs of the versions named by an import (``--store``, optionally ``--version``)."""

    store: Store
    version: str | None = None  # when given, every task must name this version
    _pairs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version is not None:
            self.version = self.store.resolve(self.version).version_id

    def pair(self, version_id: str, pair_id: str) -> dict[str, Any] | None:
        if version_id not in self._pairs:
            h = self.store.resolve(version_id)
            self._pairs[version_id] = {r["pair_id"]: r for r in routed_pairs(h).iter_rows(named=True)}
        return self._pairs[version_id].get(pair_id)


@dataclass
class TaskReader:
    """Rebuilds and checks the task behind each answer of one import file."""

    path: Path
    routed: RoutedIndex | None = None
    _seen: dict[str, ReviewTask] = field(default_factory=dict)

    def fail(self, why: str, *, where: str | None = None, field: str | None = None) -> ReviewFileError:
        return ReviewFileError(self.path, why, where=where, field=field)

    def task(self, data: dict[str, Any], text_values: dict[str, Any], where: str) -> ReviewTask:
        """The exported task described by ``data`` (payload) and ``text_values`` (the texts shown)."""
        for key in REQUIRED_PAYLOAD:
            if not isinstance(data.get(key), str) or not data[key]:
                why = "missing" if data.get(key) in (None, "") else f"expected a string, found {type(data[key]).__name__}"
                raise self.fail(f"{why} (not a task written by `prefpipe review export`)", where=where, field=key)
        for key in TEXT_KEYS:
            if not isinstance(text_values.get(key), str):
                raise self.fail("missing or not a string (the texts shown to the reviewer)", where=where, field=key)
        for key in ("task_id", "version_id"):
            if not is_safe_id(data[key]):
                raise self.fail(f"{data[key]!r} is not a safe id ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}, no '..')",
                                where=where, field=key)
        vid, pid, first = data["version_id"], data["pair_id"], data["shown_first"]
        if data["task_id"] != task_id_for(vid, pid):
            raise self.fail(f"{data['task_id']!r} is not the task id exported for pair {pid!r} of {vid!r} "
                            "(ids edited after export)", where=where, field="task_id")
        if first not in ("a", "b") or first != shown_first_for(vid, pid):
            raise self.fail(f"{first!r} is not the display order exported for this task ({shown_first_for(vid, pid)!r})",
                            where=where, field="shown_first")
        if data["route"] not in ROUTE_REASONS:
            raise self.fail(f"{data['route']!r} is not a routing reason ({', '.join(ROUTE_REASONS)})", where=where, field="route")
        for key in TEXT_KEYS:
            if text_hash(text_values[key]) != data[f"{key}_hash"]:
                raise self.fail(f"the text differs from the one exported (hash {text_hash(text_values[key])}, exported "
                                f"{data[f'{key}_hash']}): the reviewer did not see the pair's text", where=where, field=key)
        a, b = (text_values["response_1"], text_values["response_2"])[:: 1 if first == "a" else -1]
        prompt = self._prompt(data, text_values["prompt"], where)
        try:
            task = ReviewTask(task_id=data["task_id"], version_id=vid, pair_id=pid, route=data["route"], shown_first=first,
                              prompt=prompt, prompt_text=normalize_text(text_values["prompt"]), response_a=normalize_text(a),
                              response_b=normalize_text(b), locale=_opt_str(data.get("locale")),
                              rubric=_opt_str(data.get("rubric")), tags=_tags(data.get("tags")))
        except ValueError as err:
            raise self.fail(first_error(err), where=where) from None
        if self.routed is not None:
            task = self._against_store(task, where)
        known = self._seen.setdefault(task.task_id, task)
        if known != task:
            raise self.fail("the same task appears twice with different contents", where=where, field="task_id")
        return task

    def _prompt(self, data: dict[str, Any], shown: str, where: str) -> list[Message]:
        raw = data.get("prompt_messages")
        if raw in (None, ""):
            return [Message(role="user", content=normalize_text(shown))]
        try:
            msgs = [Message.model_validate(m) for m in (json.loads(raw) if isinstance(raw, str) else raw)]
        except (ValueError, TypeError) as err:
            raise self.fail(f"expected a JSON list of {{role, content}} messages ({err})", where=where, field="prompt_messages") from None
        if not msgs or text_hash(prompt_text([m.model_dump() for m in msgs])) != data["prompt_hash"]:
            raise self.fail("the messages do not match the prompt that was exported", where=where, field="prompt_messages")
        return msgs

    def _against_store(self, task: ReviewTask, where: str) -> ReviewTask:
        assert self.routed is not None
        if self.routed.version is not None and task.version_id != self.routed.version:
            raise self.fail(f"the task belongs to version {task.version_id!r}, not {self.routed.version!r} (--version)",
                            where=where, field="version_id")
        try:
            pair = self.routed.pair(task.version_id, task.pair_id)
        except StoreError as err:  # a version the store does not have, or a damaged one
            raise self.fail(str(err), where=where, field="version_id") from None
        if pair is None:
            raise self.fail(f"version {task.version_id} never routed pair {task.pair_id!r}", where=where, field="pair_id")
        for key, mine in (("prompt", task.prompt_text), ("response_a", task.response_a), ("response_b", task.response_b)):
            theirs = pair["prompt_text" if key == "prompt" else key]
            if text_hash(mine) != text_hash(theirs):
                shown = key if key == "prompt" else ("response_1" if (key == "response_a") == (task.shown_first == "a") else "response_2")
                raise self.fail(f"differs from the pair's {key} in version {task.version_id} (hash {text_hash(mine)}, "
                                f"pair {text_hash(theirs)})", where=where, field=shown)
        if pair["route"] != task.route:
            raise self.fail(f"{task.route!r}, but version {task.version_id} routed the pair as {pair['route']!r}",
                            where=where, field="route")
        # the store's copy is authoritative: exact prompt turns, models, locale, rubric and tags (a locale or rubric
        # edited in the tool qualifies no reviewer: the pair's decide)
        return _task_from_pair(pair, task.version_id)


def first_error(err: ValueError) -> str:
    """The message of a Pydantic validation error without its header and documentation link."""
    lines = str(err).splitlines()
    return " ".join(x.strip() for x in lines[1:3]) if len(lines) > 1 else str(err)


def _opt_str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _tags(v: Any) -> list[str]:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return [v]
    return [t for t in v if isinstance(t, str)] if isinstance(v, list) else []


def looks_like(obj: Any) -> str:
    """``"; it looks like ... use --format X"`` for an export given with the wrong ``--format``."""
    item = obj[0] if isinstance(obj, list) and obj else obj
    if not isinstance(item, dict):
        return ""
    if isinstance(item.get("data"), dict) and ("annotations" in item or "predictions" in item or "id" in item):
        return "; it looks like a Label Studio JSON export: use --format label-studio"
    if isinstance(item.get("fields"), dict) or any(str(k).endswith(".responses") for k in item) or "_server_id" in item:
        return "; it looks like Argilla records: use --format argilla"
    if "task_id" in item and "response_a" in item:
        return "; it looks like prefpipe JSONL review rows: use --format jsonl"
    if "data" in item or "annotations" in item:
        return "; it looks like a Label Studio export in another shape (export as JSON, not JSON_MIN or CSV)"
    return ""


# ---------------------------------------------------------------- files
def read_json(path: Path, *, what: str) -> Any:
    """A whole JSON document (a tool export); unreadable, not UTF-8, too large or not JSON: exit 2."""
    data = read_bytes(path, what=what)
    try:
        return loads_json(data)  # a key written twice is refused: orjson would keep one of its values in silence
    except orjson.JSONDecodeError as err:
        raise ReviewFileError(path, f"not a JSON document ({err})") from None
    except JSONValueError as err:
        raise ReviewFileError(path, str(err)) from None


def read_bytes(path: Path, *, what: str) -> bytes:
    if path.is_dir():
        raise ReviewFileError(path, f"is a directory, expected {what}")
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise ReviewFileError(path, f"{size:,} bytes, more than the {MAX_INPUT_BYTES:,} accepted for {what}")
        data = path.read_bytes()
    except OSError as err:
        raise ReviewFileError(path, f"cannot read ({err.strerror or err})") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ReviewFileError(path, f"not UTF-8 (invalid byte 0x{data[err.start]:02x} at offset {err.start})") from None
    if not data.strip():  # no tool exports nothing at all: a failed download or a file saved too early
        raise ReviewFileError(path, f"is empty ({len(data)} bytes), expected {what}")
    return data


def check_out_path(out: Path, store: Path | None) -> None:
    """An output path may not point into a store: nothing already stored changes."""
    if store is None:
        return
    root, target = store.resolve(), out.resolve()
    if target == root or root in target.parents:
        raise ReviewFileError(out, f"is inside the store {store}; write review files elsewhere (nothing in a store is edited)")


def dumps_json(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def dumps_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def env_flag(name: str) -> str | None:
    v = os.environ.get(name, "").strip()
    return v or None
