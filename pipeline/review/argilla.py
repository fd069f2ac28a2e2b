"""Review tasks for Argilla 2.x (``--format argilla``).

Export writes a directory in the layout of the SDK's ``Dataset.to_disk`` (so that
``rg.Dataset.from_disk(PATH, name=..., workspace=...)`` loads it): ``.argilla/settings.json``
(``rg.Settings`` as ``Settings.to_json`` writes it), ``.argilla/dataset.json`` and
``records.json`` (records as ``Record.to_dict`` writes them).  Settings: text fields ``prompt``,
``response_1`` (shown first), ``response_2``; a required ``LabelQuestion`` ``overall``
(response_1 / response_2 / tie / both_bad / escalate), one optional ``LabelQuestion``
``dim_<name>`` per rubric dimension, an optional ``TextQuestion`` ``critique``; terms metadata
``pair_id``, ``version_id``, ``shown_first``, ``route``, ``locale``, ``rubric`` (hidden from annotators) and
the rest of the task payload as extra metadata.  With ``ARGILLA_API_URL`` and ``ARGILLA_API_KEY``
set, the directory is also pushed with the ``argilla`` SDK (``Dataset.from_disk``) into a new
dataset (an existing dataset of that name is refused, never appended to).

Import reads exported records (https://docs.argilla.io/latest/how_to_guides/import_export/):
``dataset.records.to_list(flatten=True)`` dumped as JSON (or ``records.to_datasets()`` saved as
JSON Lines): ``<question>.responses``, ``.responses.users`` and ``.responses.status`` per
question; or nested records (``records.to_list()``, ``to_json``, ``to_disk``'s ``records.json``)
with ``responses: {question: [{value, user_id, status}]}``; or records as the REST API lists them
(``GET /api/v1/datasets/{id}/records?include=responses``, the ``items`` saved as a JSON list):
``external_id`` (the record id the export gave), ``responses: [{values: {question: {value}},
user_id, status, inserted_at, updated_at}]``.  Only ``submitted`` responses become
judgments; ``draft`` and ``discarded`` are counted and skipped, and so are nested responses
without a status (the SDK's nested export drops it: a draft cannot be told from a submission).
One reviewer's answers to one record (grouped by ``user_id``) are one item; the annotator is
``argilla-<user_id>``.  Its ``created_at`` is the latest ``updated_at`` (else ``inserted_at``) of
those responses, where they carry one (the REST API's records; a time without a zone is UTC, as
the server writes them).  The SDK's exports carry no response time
(``Record.to_dict`` / ``to_list`` write value, user and status only; SDK 2.8): the judgment then
has no ``created_at`` -- never the import's clock, so the same export gives the same bytes -- and
a registry's ``qualified_from`` / ``qualified_until`` is not checked on it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from pipeline.readers import JSONValueError, loads_json
from pipeline.review.tasks import (PAYLOAD_KEYS, TEXT_KEYS, ReviewFileError, TaskReader, dumps_json, first_error,
                                   looks_like, payload, read_bytes, texts)
from schemas.ids import safe_id
from schemas.review import ReviewAnswer, ReviewTask

OVERALL = {"response_1": "Response 1 is better", "response_2": "Response 2 is better", "tie": "Tie",
           "both_bad": "Both bad", "escalate": "Escalate (needs an expert)"}
DIMENSION = {"response_1": "Response 1", "response_2": "Response 2", "tie": "Tie", "both_bad": "Both bad"}
TERMS_METADATA = ("pair_id", "version_id", "shown_first", "route", "locale", "rubric")
GUIDELINES = ("Each record is a prompt and two responses. Pick the response that answers the prompt better "
              "(overall), or tie / both bad / escalate when neither wins. Rate each rubric dimension the same way "
              "if asked, and say why in the critique. Response 1 and Response 2 are in a random order.")
_DISPLAY = {"response_1": "first", "response_2": "second"}


# ---------------------------------------------------------------- export
def settings(dimensions: tuple[str, ...]) -> dict[str, Any]:
    """``rg.Settings`` in the shape ``Settings.serialize()`` / ``Settings.to_json`` writes."""
    def text_field(name: str, title: str) -> dict[str, Any]:
        return {"name": name, "title": title, "required": True, "description": None, "type": "text",
                "settings": {"type": "text", "use_markdown": False}}

    def label_question(name: str, title: str, labels: dict[str, str], required: bool) -> dict[str, Any]:
        return {"name": name, "title": title, "description": None, "required": required, "type": "label_selection",
                "settings": {"type": "label_selection", "visible_options": None,
                             "options": [{"value": v, "text": t} for v, t in labels.items()]}}

    questions = [label_question("overall", "Which response is better?", OVERALL, True)]
    questions += [label_question(f"dim_{d}", f"Better on {d.replace('_', ' ')}", DIMENSION, False) for d in dimensions]
    questions.append({"name": "critique", "title": "Why? (optional)", "description": None, "required": False,
                      "type": "text", "settings": {"type": "text", "use_markdown": False}})
    return {
        "guidelines": GUIDELINES,
        "fields": [text_field("prompt", "Prompt"), text_field("response_1", "Response 1"), text_field("response_2", "Response 2")],
        "questions": questions,
        "vectors": [],
        "metadata": [{"name": m, "title": m, "visible_for_annotators": False,
                      "settings": {"type": "terms", "values": None, "visible_for_annotators": False}} for m in TERMS_METADATA],
        "allow_extra_metadata": True,
        "distribution": {"strategy": "overlap", "min_submitted": 1},
        "mapping": None,
    }


def record(task: ReviewTask) -> dict[str, Any]:
    """One record as ``Record.to_dict`` writes it (record id = task id)."""
    meta = {k: v for k, v in payload(task).items() if v is not None}
    return {"id": task.task_id, "fields": texts(task), "metadata": meta, "suggestions": {}, "responses": {},
            "vectors": {}, "status": "pending", "_server_id": None}


def export_dir(tasks: list[ReviewTask], out: Path, dimensions: tuple[str, ...], name: str) -> Path:
    """Write the directory next to ``out`` under a temporary name and return it (renamed by the caller)."""
    safe_id(name, what="Argilla dataset name")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReviewFileError(out, "exists and is not an empty directory; the Argilla export is a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        (stage / ".argilla").mkdir(parents=True)
        (stage / ".argilla" / "settings.json").write_bytes(dumps_json(settings(dimensions)))
        (stage / ".argilla" / "dataset.json").write_bytes(dumps_json({"name": name, "status": "draft", "guidelines": GUIDELINES,
                                                                      "allow_extra_metadata": True}))
        (stage / "records.json").write_bytes(dumps_json([record(t) for t in tasks]))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


class PushError(Exception):
    """The Argilla server refused the dataset or could not be reached; the message says which."""


def push(stage: Path, *, name: str, workspace: str | None, api_url: str, api_key: str, client: Any = None) -> str:
    """Create the dataset ``name`` on the server from an exported directory (``rg.Dataset.from_disk``)."""
    import argilla as rg

    try:
        client = client or rg.Argilla(api_url=api_url, api_key=api_key)
        # "workspace not provided, using the default": said in our own words; the SDK prints its own notes
        # ("batch size ... normalized") to stdout when ``__main__`` has no file (a notebook, a test worker): they go
        # to stderr, so ``--json``'s stdout stays one JSON document
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            if client.datasets(name=name, workspace=workspace) is not None:
                raise PushError(f"dataset {name!r} already exists in Argilla at {api_url}; pass another --dataset-name "
                                "(an export never adds records to an existing dataset)")
            ds = rg.Dataset.from_disk(str(stage), name=name, workspace=workspace, client=client)
    except PushError:
        raise
    except Exception as err:  # noqa: BLE001 - SDK and HTTP errors: said with the server, nothing local kept
        raise PushError(f"pushing to Argilla at {api_url} failed: {type(err).__name__}: {err}") from err
    return str(getattr(ds, "id", "") or name)


# ---------------------------------------------------------------- import
def read_records(path: Path) -> list[Any]:
    """Records from a directory (``to_disk``), a JSON list, or JSON Lines (``to_datasets().to_json``)."""
    if path.is_dir():
        path = path / "records.json"
    data = read_bytes(path, what="exported Argilla records")
    try:  # a key written twice is refused: orjson would keep one of its values in silence
        doc = loads_json(data)
        return doc if isinstance(doc, list) else [doc]
    except orjson.JSONDecodeError as err:
        doc_error = err
    except JSONValueError as err:
        raise ReviewFileError(path, str(err)) from None
    lines = [(n, line) for n, line in enumerate(data.splitlines(), start=1) if line.strip()]
    out = []
    for k, (n, line) in enumerate(lines):
        try:
            out.append(loads_json(line))
        except orjson.JSONDecodeError as err:
            # the first line unreadable: not JSON Lines, so the document's own error says where it breaks
            if k == 0:
                raise ReviewFileError(path, f"not JSON or JSON Lines ({doc_error})") from None
            raise ReviewFileError(path, f"not a JSON record ({err.msg} at column {err.colno})", where=f"line {n}") from None
        except JSONValueError as err:
            raise ReviewFileError(path, str(err), where=f"line {n}") from None
    return out


def read_answers(path: Path, reader: TaskReader) -> Iterator[tuple[ReviewAnswer | str, bool]]:
    """Yield ``(answer or skip reason, starts_a_task)``: one item per reviewer of a record; a record
    without any response is one ``unanswered`` item."""
    records = read_records(path)
    for i, rec in enumerate(records):
        where = f"records[{i}]"
        fields, meta, responses = _parts(rec, reader, where, records)
        task = reader.task(meta, fields, where)
        # (the REST API's records: ``id`` is the server's, ``external_id`` the record id the export gave)
        id_key = "external_id" if "external_id" in rec else "id"
        if rec.get(id_key) not in (None, task.task_id):
            raise reader.fail(f"record id {rec.get(id_key)!r} is not the task id {task.task_id!r}", where=where, field=id_key)
        by_user: dict[str, dict[str, tuple[Any, str | None, datetime | None]]] = {}
        for question, items in responses.items():
            for value, user, status, when in items:
                if user in (None, ""):
                    raise reader.fail("a response without user_id", where=where, field=f"{question}.responses")
                if isinstance(user, bool) or not isinstance(user, str | int):  # a uuid; never a coerced list or object
                    raise reader.fail(f"expected a user_id string, found {type(user).__name__} {user!r}", where=where,
                                      field=f"{question}.responses")
                mine = by_user.setdefault(str(user), {})
                if question in mine:  # one of the two answers would be lost without a trace in the ledger
                    raise reader.fail(f"user {str(user)!r} answered this question twice in one record", where=where,
                                      field=f"{question}.responses")
                mine[question] = (value, status, _when(when, reader, where, question))
        if not by_user:
            yield "unanswered", True
            continue
        for k, (user, answers) in enumerate(sorted(by_user.items())):
            yield _answer(task, user, answers, reader, f"{where}.responses[user {user}]"), k == 0


def _parts(rec: Any, reader: TaskReader, where: str, records: list[Any]) -> tuple[dict, dict, dict[str, list]]:
    """(fields, metadata, {question: [(value, user_id, status, time)]}) of a nested or a flat record.  ``time``: the
    response's ``updated_at``, else its ``inserted_at`` (the REST API's records; a nested response may carry them
    too); the SDK's exports carry neither (None)."""
    if not isinstance(rec, dict):
        raise reader.fail(f"expected a record object, found {type(rec).__name__}", where=where)
    if isinstance(rec.get("fields"), dict) and isinstance(rec.get("responses"), list):  # the REST API's records
        meta = rec.get("metadata") or {}
        if not isinstance(meta, dict):
            raise reader.fail("expected an object", where=where, field="metadata")
        return rec["fields"], meta, _rest_responses(rec["responses"], reader, where)
    if isinstance(rec.get("fields"), dict):  # nested: Record.to_dict
        meta, resp = rec.get("metadata") or {}, rec.get("responses") or {}
        if not isinstance(meta, dict) or not isinstance(resp, dict):
            raise reader.fail("expected objects", where=where, field="metadata" if not isinstance(meta, dict) else "responses")
        out = {}
        for q, items in resp.items():
            if not isinstance(items, list) or any(not isinstance(x, dict) for x in items):
                raise reader.fail("expected a list of {value, user_id, status} objects", where=where, field=f"responses.{q}")
            out[q] = [(x.get("value"), x.get("user_id"), x.get("status"),
                       x.get("updated_at") if x.get("updated_at") is not None else x.get("inserted_at")) for x in items]
        return rec["fields"], meta, out
    if all(k in rec for k in TEXT_KEYS):  # flat: to_list(flatten=True) / to_datasets()
        out = {}
        for key in [k for k in rec if k.endswith(".responses")]:
            q = key[: -len(".responses")]
            values, users, status = rec.get(key) or [], rec.get(f"{key}.users") or [], rec.get(f"{key}.status")
            if status is None:
                status = [None] * len(values)
            if not (isinstance(values, list) and isinstance(users, list) and isinstance(status, list)
                    and len(values) == len(users) == len(status)):
                raise reader.fail("expected lists of the same length in .responses, .responses.users, .responses.status",
                                  where=where, field=key)
            out[q] = [(*x, None) for x in zip(values, users, status, strict=True)]
        return {k: rec[k] for k in TEXT_KEYS}, {k: rec.get(k) for k in PAYLOAD_KEYS}, out
    raise reader.fail("not an exported Argilla record (no 'fields' object, no prompt/response_1/response_2)"
                      + looks_like(records), where=where)


def _rest_responses(items: list[Any], reader: TaskReader, where: str) -> dict[str, list]:
    """{question: [(value, user_id, status, time)]} of a record's ``responses`` as the REST API lists them
    (``GET /api/v1/datasets/{id}/records?include=responses``): one object per user, ``values`` per question,
    ``status``, ``user_id``, ``inserted_at``, ``updated_at``.  A response without values (a discarded record)
    is one item with no verdict, so the ledger counts it."""
    out: dict[str, list] = {}
    for k, x in enumerate(items):
        values = x.get("values") if isinstance(x, dict) else None
        if not isinstance(x, dict) or not isinstance(values or {}, dict):
            raise reader.fail("expected a {values, user_id, status} object", where=where, field=f"responses[{k}]")
        when = x.get("updated_at") if x.get("updated_at") is not None else x.get("inserted_at")
        for q, v in (values or {"overall": {"value": None}}).items():
            if not isinstance(v, dict):
                raise reader.fail("expected a {value} object", where=where, field=f"responses[{k}].values.{q}")
            out.setdefault(q, []).append((v.get("value"), x.get("user_id"), x.get("status"), when))
    return out


def _when(value: Any, reader: TaskReader, where: str, question: str) -> datetime | None:
    """A response's time (ISO 8601 text; a time without a zone is UTC, as the Argilla server writes them)."""
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(f"expected ISO 8601 text, found {type(value).__name__} {value!r}")
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as err:
        raise reader.fail(f"the response's updated_at / inserted_at is not a time ({err})", where=where,
                          field=f"responses.{question}") from None
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).astimezone(UTC)


def _answer(task: ReviewTask, user: str, answers: dict[str, tuple[Any, str | None, datetime | None]], reader: TaskReader,
            where: str) -> ReviewAnswer | str:
    for q, (value, status, _) in answers.items():  # our questions' values are strings: anything else is refused, not coerced
        if status is not None and not isinstance(status, str):
            raise reader.fail(f"expected a status string, found {type(status).__name__} {status!r}", where=where, field="status")
        if value is not None and not isinstance(value, str) and (q in ("overall", "critique") or q.startswith("dim_")):
            raise reader.fail(f"expected a string, found {type(value).__name__} {value!r}", where=where, field=q)
    statuses = {status for _, status, _ in answers.values()}
    for reason in ("discarded", "draft"):
        if reason in statuses:
            return reason
    if None in statuses:
        return "status_missing"
    if statuses != {"submitted"}:
        raise reader.fail(f"unknown response status {sorted(map(str, statuses))} (submitted, draft, discarded)", where=where,
                          field="status")
    overall = answers.get("overall", (None, None, None))[0]
    if overall is None:
        return "no_verdict"
    if overall not in OVERALL:
        raise reader.fail(f"{overall!r} is not one of {', '.join(OVERALL)}", where=where, field="overall")
    dims = {}
    for q, (value, _, _) in answers.items():
        if q.startswith("dim_") and value is not None:
            if value not in DIMENSION:
                raise reader.fail(f"{value!r} is not one of {', '.join(DIMENSION)}", where=where, field=q)
            dims[q[4:]] = _DISPLAY.get(value, value)
    critique = answers.get("critique", (None, None, None))[0]
    # the reviewer's last change to the answer; none given (the SDK's exports): no date, never the import's clock
    times = [when for _, _, when in answers.values() if when is not None]
    try:
        return ReviewAnswer(task=task, annotator_id=f"argilla-{user}", verdict=_DISPLAY.get(overall, overall),
                            dimensions=dims, critique=critique if isinstance(critique, str) else None, tool="argilla",
                            created_at=max(times) if times else None, answer_key=f"user-{user}")
    except ValueError as err:
        raise reader.fail(first_error(err), where=where) from None
