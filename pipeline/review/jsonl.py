"""Review tasks as canonical JSON Lines (``--format jsonl``): for scripts, spreadsheets, in-house tools.

Export: one row per task, a canonical raw judgment without a verdict: ``task_id``, ``pair_id``,
``review_of``, ``version_id``, ``route``, ``prompt`` (messages), ``response_a`` / ``response_b``
(stable names), the randomized ``shown_first``, the pair's ``locale`` and ``rubric``, and the
text hashes (``prompt_hash``, ``response_1_hash`` of the first-shown text, ``response_2_hash``).

Import: the same rows with a verdict filled in by the reviewer's tool: ``annotator_id`` and either
``label`` (``a`` / ``b`` / ``tie`` / ``both_bad`` / ``escalate``, stable names) or ``choice``
(``first`` / ``second`` / ``tie`` / ``both_bad`` / ``escalate``, display terms); optional
``critique``, ``dimensions`` (name -> the same values), ``created_at``, ``strength``,
``confidence``, ``rubric``, ``annotator_kind`` (default ``human``).  A row without annotator and
verdict is ``unanswered``; with an annotator but no verdict, ``no_verdict``.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from pipeline.readers import JSONValueError, loads_json
from pipeline.review.tasks import TaskReader, dumps_jsonl, first_error, looks_like, payload, read_bytes
from schemas.review import ReviewAnswer, ReviewTask
from schemas.text import prompt_text

VERDICT_FIELDS = ("label", "choice")


def export_rows(tasks: list[ReviewTask]) -> list[dict[str, Any]]:
    rows = []
    for t in tasks:
        p = payload(t)
        rows.append({"task_id": t.task_id, "pair_id": t.pair_id, "review_of": t.pair_id, "version_id": t.version_id,
                     "route": t.route, "prompt": [m.model_dump() for m in t.prompt], "response_a": t.response_json("a"),
                     "response_b": t.response_json("b"), "shown_first": t.shown_first, "locale": t.locale,
                     "rubric": t.rubric, "tags": list(t.tags), **{k: p[k] for k in ("prompt_hash", "response_1_hash", "response_2_hash")}})
    return rows


def export_files(tasks: list[ReviewTask], out: Path) -> dict[Path, bytes]:
    return {out: dumps_jsonl(export_rows(tasks))}


def read_answers(path: Path, reader: TaskReader) -> Iterator[tuple[ReviewAnswer | str, bool]]:
    """Yield ``(answer or skip reason, starts_a_task)`` per row (one row = one task, one item)."""
    data = read_bytes(path, what="a JSON Lines file of reviewed tasks")
    answered: Counter[tuple[str, str]] = Counter()  # answers per (task, reviewer) so far: what keys an answer
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"line {lineno}"
        try:
            row = loads_json(raw)  # a key written twice is refused: orjson would keep one of its values in silence
        except orjson.JSONDecodeError as err:
            raise reader.fail(f"not a JSON object ({err.msg} at column {err.colno}){_whole_document_hint(data)}",
                              where=where) from None
        except JSONValueError as err:
            raise reader.fail(str(err), where=where) from None
        if not isinstance(row, dict):
            raise reader.fail(f"not a prefpipe review task row (expected a JSON object per line, found "
                              f"{type(row).__name__}){looks_like(row)}", where=where)
        if lineno == 1 or "task_id" not in row:
            _check_shape(row, reader, where)
        yield _answer(row, reader, where, answered), True


def _whole_document_hint(data: bytes) -> str:
    """A pretty-printed JSON document given as JSON Lines: say which tool's export it looks like."""
    try:
        return looks_like(orjson.loads(data)) or " (a JSON document, not JSON Lines)"
    except orjson.JSONDecodeError:
        return ""


def _check_shape(row: dict[str, Any], reader: TaskReader, where: str) -> None:
    if "task_id" in row and "response_a" in row:
        return
    raise reader.fail(f"not a prefpipe review task row (no task_id / response_a){looks_like(row)}", where=where)


def _answer(row: dict[str, Any], reader: TaskReader, where: str, answered: Counter[tuple[str, str]]) -> ReviewAnswer | str:
    first = row.get("shown_first")
    side_texts = {"a": _text(row.get("response_a")), "b": _text(row.get("response_b"))}
    shown = {"prompt": prompt_text(row["prompt"]) if isinstance(row.get("prompt"), (str, list)) else None,
             "response_1": side_texts.get(first) if first in ("a", "b") else None,
             "response_2": side_texts.get("b" if first == "a" else "a") if first in ("a", "b") else None}
    data = {**row, "prompt_messages": row.get("prompt") if isinstance(row.get("prompt"), list) else None}
    task = reader.task(data, shown, where)
    if row.get("review_of") not in (None, task.pair_id):  # the judgment reviews the task's pair: never another one in silence
        raise reader.fail(f"{row['review_of']!r} is not the task's pair {task.pair_id!r}", where=where, field="review_of")
    if row.get("comparison_id") is not None and not isinstance(row["comparison_id"], str):
        raise reader.fail(f"expected a string, found {type(row['comparison_id']).__name__}", where=where, field="comparison_id")
    annotator = row.get("annotator_id")
    has_verdict = any(row.get(k) is not None for k in VERDICT_FIELDS)
    if annotator in (None, "") and not has_verdict:
        return "unanswered"
    if not isinstance(annotator, str) or not annotator.strip():
        raise reader.fail("missing or not a string: who reviewed the task", where=where, field="annotator_id")
    if not has_verdict:
        return "no_verdict"
    verdict = _display(task, row, where, reader)
    if verdict is None:
        return "conflicting_verdict"
    dims = row.get("dimensions") or {}
    if not isinstance(dims, dict):
        raise reader.fail("expected an object: dimension name -> verdict", where=where, field="dimensions")
    # without a comparison_id, an answer is the reviewer's k-th to the task in this file (not its line: a tool
    # that sorts the rows or leaves the unanswered ones out gives the same ids again)
    k = answered[(task.task_id, annotator)]
    answered[(task.task_id, annotator)] += 1
    try:
        return ReviewAnswer(
            task=task, annotator_id=annotator, annotator_kind=row.get("annotator_kind") or "human", verdict=verdict,
            dimensions={k: _dim_display(task, v) for k, v in dims.items()}, critique=row.get("critique"),
            created_at=row.get("created_at"), strength=row.get("strength"), confidence=row.get("confidence"),
            rubric=row.get("rubric"), tool="jsonl",
            answer_key=str(row.get("comparison_id") or f"{annotator}|answer-{k}"),
        )
    except ValueError as err:
        raise reader.fail(first_error(err), where=where) from None


def _text(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("text")
    return v if isinstance(v, str) else None


def _display(task: ReviewTask, row: dict[str, Any], where: str, reader: TaskReader) -> str | None:
    """The verdict in display terms from ``choice`` and/or ``label``; ``None`` if the two disagree."""
    label, choice = row.get("label"), row.get("choice")
    if label is not None and label not in ("a", "b", "tie", "both_bad", "escalate"):
        raise reader.fail(f"{label!r} is not a verdict (a, b, tie, both_bad, escalate)", where=where, field="label")
    if choice is not None and choice not in ("first", "second", "tie", "both_bad", "escalate"):
        raise reader.fail(f"{choice!r} is not a choice (first, second, tie, both_bad, escalate)", where=where, field="choice")
    from_label = None if label is None else _dim_display(task, label)
    if from_label is not None and choice is not None and from_label != choice:
        return None
    return choice if choice is not None else from_label


def _dim_display(task: ReviewTask, v: Any) -> Any:
    """``a`` / ``b`` -> ``first`` / ``second`` for this task's display order; other values unchanged."""
    if v in ("a", "b"):
        return "first" if v == task.shown_first else "second"
    return v
