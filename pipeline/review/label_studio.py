"""Review tasks for Label Studio (``--format label-studio``).

Export (https://labelstud.io/guide/tasks, https://labelstud.io/tags/pairwise):

* ``PATH``: a tasks JSON, one ``{"data": {...}}`` per routed pair.  ``data`` holds the three
  texts in display order (``prompt``, ``response_1`` shown left, ``response_2`` right) and the
  task payload (``task_id``, ``pair_id``, ``version_id``, ``shown_first``, ``route``, text hashes,
  ``prompt_messages``, ``locale``, ``rubric``, ``tags``).
* ``PATH`` with ``.xml``: the labeling config: a ``Pairwise`` tag over the two responses
  (``name="overall"``: the reviewer clicks the better one), a ``Choices`` ``overall_other`` for
  tie / both bad / escalate, one single ``Choices`` ``dim_<name>`` per rubric dimension, and a
  ``TextArea`` ``critique``.

Import reads Label Studio's JSON export (https://labelstud.io/guide/export, "Label Studio JSON
format of annotated tasks"): a list of tasks with ``data`` and ``annotations[].result[]``.  A
``pairwise`` result's ``value.selected`` is ``left`` or ``right`` (the first or the second name
in ``toName``: response 1 or response 2); ``choices`` results carry ``value.choices``; the
``textarea`` carries ``value.text``.  Annotations with ``was_cancelled`` (skipped) and task
``drafts`` are counted and skipped; the annotator is ``ls-<completed_by>``.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from pipeline.review.tasks import TaskReader, dumps_json, first_error, looks_like, payload, read_json, texts
from schemas.review import ReviewAnswer, ReviewTask

OTHER_VERDICTS = {"tie": "Tie", "both_bad": "Both bad", "escalate": "Escalate (needs an expert)"}
DIMENSION_CHOICES = {"response_1": "Response 1", "response_2": "Response 2", "tie": "Tie", "both_bad": "Both bad"}
_DISPLAY = {"left": "first", "right": "second", "response_1": "first", "response_2": "second"}


def config_path(out: Path) -> Path:
    """Where the labeling config goes: ``tasks.json`` -> ``tasks.xml`` (``tasks`` -> ``tasks.xml``)."""
    return out.with_suffix(".xml") if out.suffix.lower() != ".xml" else out.with_name(out.name + ".config.xml")


def labeling_config(dimensions: tuple[str, ...]) -> str:
    """The labeling config XML (dimension names are validated ``[a-z][a-z0-9_]*``; every attribute is quoted)."""
    def choices(name: str, options: dict[str, str]) -> list[str]:
        items = [f"    <Choice value={quoteattr(text)} alias={quoteattr(value)}/>" for value, text in options.items()]
        return [f'  <Choices name={quoteattr(name)} toName="prompt" choice="single" showInline="true">', *items, "  </Choices>"]

    lines = [
        "<View>",
        '  <Header value="Which response answers the prompt better? Click it, or pick tie / both bad / escalate."/>',
        '  <Text name="prompt" value="$prompt"/>',
        '  <Pairwise name="overall" toName="response_1,response_2" '
        'selectionStyle="background-color: #eaf6ec; border: 2px solid #2e7d32;"/>',
        '  <View style="display: flex; gap: 1em;">',
        '    <View style="flex: 1;"><Header value="Response 1" size="5"/><Text name="response_1" value="$response_1"/></View>',
        '    <View style="flex: 1;"><Header value="Response 2" size="5"/><Text name="response_2" value="$response_2"/></View>',
        "  </View>",
        *choices("overall_other", OTHER_VERDICTS),
    ]
    for dim in dimensions:
        lines += [f"  <Header value={quoteattr('Better on ' + dim.replace('_', ' '))} size=\"5\"/>",
                  *choices(f"dim_{dim}", DIMENSION_CHOICES)]
    lines += ['  <TextArea name="critique" toName="prompt" placeholder="Why? (optional)" rows="3" maxSubmissions="1" editable="true"/>',
              "</View>"]
    return "\n".join(lines) + "\n"


def export_files(tasks: list[ReviewTask], out: Path, dimensions: tuple[str, ...]) -> dict[Path, bytes]:
    rows = [{"data": {**texts(t), **payload(t)}} for t in tasks]
    return {out: dumps_json(rows), config_path(out): labeling_config(dimensions).encode("utf-8")}


def read_answers(path: Path, reader: TaskReader) -> Iterator[tuple[ReviewAnswer | str, bool]]:
    """Yield ``(answer or skip reason, starts_a_task)``: every annotation and draft is one item; a
    task with neither is one ``unanswered`` item."""
    doc = read_json(path, what="a Label Studio JSON export")
    if not isinstance(doc, list) or any(not isinstance(t, dict) or not isinstance(t.get("data"), dict) for t in doc):
        bad = next((i for i, t in enumerate(doc) if not isinstance(t, dict) or not isinstance(t.get("data"), dict)), None) \
            if isinstance(doc, list) else None
        where = f"tasks[{bad}]" if bad is not None else None
        raise reader.fail("not a Label Studio JSON export (a list of tasks, each with a 'data' object)" + looks_like(doc),
                          where=where)
    for i, item in enumerate(doc):
        where = f"tasks[{i}]"
        task = reader.task(item["data"], item["data"], where)
        annotations, drafts = item.get("annotations") or [], item.get("drafts") or []
        if not isinstance(annotations, list) or not isinstance(drafts, list):
            raise reader.fail("expected a list", where=where, field="annotations" if not isinstance(annotations, list) else "drafts")
        starts = True
        for j, ann in enumerate(annotations):
            yield _answer(task, ann, reader, f"{where}.annotations[{j}]", item.get("id")), starts
            starts = False
        for _ in drafts:
            yield "draft", starts
            starts = False
        if starts:
            yield "unanswered", True


def _answer(task: ReviewTask, ann: Any, reader: TaskReader, where: str, task_ls_id: Any) -> ReviewAnswer | str:
    if not isinstance(ann, dict) or not isinstance(ann.get("result", []), list):
        raise reader.fail("expected an annotation object with a 'result' list", where=where)
    cancelled = ann.get("was_cancelled")
    if cancelled is not None and not isinstance(cancelled, bool):  # "false" would read as cancelled
        raise reader.fail(f"expected true or false, found {type(cancelled).__name__} {cancelled!r}", where=where,
                          field="was_cancelled")
    if cancelled:
        return "cancelled"
    picked, other, dims, critique = None, None, {}, []
    answered: set[str] = set()
    for k, res in enumerate(ann.get("result") or []):
        at = f"{where}.result[{k}]"
        if not isinstance(res, dict):
            raise reader.fail("expected a result object", where=at)
        name, kind, value = res.get("from_name"), res.get("type"), res.get("value")
        ours = name in ("overall", "overall_other", "critique") or (isinstance(name, str) and name.startswith("dim_"))
        if not ours:  # results of other controls a team added to the config (a relation has no value) are not ours
            continue
        if name != "critique" and name in answered:  # one verdict per control: a second would overwrite the first in silence
            raise reader.fail("answered twice in one annotation (one result per control)", where=at, field=name)
        answered.add(name)
        if not isinstance(value, dict):
            raise reader.fail("expected a result object with a 'value' object", where=at, field="value")
        if name == "overall":
            if kind != "pairwise" or value.get("selected") not in ("left", "right"):
                raise reader.fail(f"expected a pairwise result with selected left or right, found type {kind!r} "
                                  f"selected {value.get('selected')!r}", where=at, field="value.selected")
            picked = _DISPLAY[value["selected"]]
        elif name == "overall_other":
            other = _one_choice(value, OTHER_VERDICTS, reader, at)
        elif isinstance(name, str) and name.startswith("dim_"):
            dims[name[4:]] = _DISPLAY.get(c := _one_choice(value, DIMENSION_CHOICES, reader, at), c)
        elif name == "critique":
            text = value.get("text")
            parts = [text] if isinstance(text, str) else text if isinstance(text, list) else None
            if text is not None and (parts is None or not all(isinstance(t, str) for t in parts)):
                raise reader.fail(f"expected a text or a list of texts, found {text!r}", where=at, field="value.text")
            critique += parts or []
    if picked is None and other is None:
        return "no_verdict"
    if picked is not None and other is not None:
        return "conflicting_verdict"
    who = ann.get("completed_by")
    who = who.get("id", who.get("email")) if isinstance(who, dict) else who
    if who in (None, ""):
        raise reader.fail("missing: who annotated (completed_by)", where=where, field="completed_by")
    if isinstance(who, bool) or not isinstance(who, int | str):  # a user id or an email, never a coerced list or flag
        raise reader.fail(f"expected a user id (a number or a string), found {type(who).__name__} {who!r}", where=where,
                          field="completed_by")
    try:
        return ReviewAnswer(
            task=task, annotator_id=f"ls-{who}", verdict=picked or other, dimensions=dims,
            critique="\n".join(critique).strip() or None, created_at=ann.get("created_at"), tool="label-studio",
            answer_key=f"annotation-{ann.get('id')}" if ann.get("id") is not None else f"{where}|{who}",
            extra={k: v for k, v in (("review_tool_task", task_ls_id), ("review_lead_time_s", ann.get("lead_time")))
                   if isinstance(v, (int, float, str))},
        )
    except ValueError as err:
        raise reader.fail(first_error(err), where=where) from None


def _one_choice(value: dict[str, Any], allowed: dict[str, str], reader: TaskReader, where: str) -> str:
    got = value.get("choices")
    # the alias is what Label Studio stores; the visible text is accepted too (a config edited in the UI)
    by_text = {text: alias for alias, text in allowed.items()}
    if not isinstance(got, list) or len(got) != 1 or not isinstance(got[0], str) or (got[0] not in allowed and got[0] not in by_text):
        raise reader.fail(f"expected one choice of {', '.join(allowed)}, found {got!r}", where=where, field="value.choices")
    return got[0] if got[0] in allowed else by_text[got[0]]
