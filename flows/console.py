"""Console helpers for the CLI: stdout for results, stderr for progress and errors.

User text (ids, labels, tags, file names, check details) never reaches the terminal as Rich
markup or as raw control characters:

* the two consoles interpret no markup and no ``:emoji:`` codes in the strings they print,
  and show control characters other than newline and tab as escapes (``\\x1b``), so a plain
  f-string with user text in it prints literally;
* styling is written only in literal templates: ``markup("[red]error:[/] {msg}", msg=err)``
  returns a ``Text`` in which every value is literal text (never parsed as markup; control
  characters and line breaks shown as escapes);
* ``plain(value)`` is one value as ``Text`` (table cells, pieces with a style).
"""
from __future__ import annotations

import json
import re
import string
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, LiteralString

from rich.console import Console
from rich.text import Text

from pipeline.escape import CONTROL_CHARS, visible_controls


class SafeConsole(Console):
    """A Console that shows the control characters of any string it renders (print, table cells,
    titles) as escapes; newline and tab keep their meaning (they are layout in our templates)."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(visible_controls(text, keep="\n\t"), **kwargs)


def _console(**kwargs: Any) -> Console:
    return SafeConsole(markup=False, emoji=False, highlight=False, **kwargs)


@cache
def out_console() -> Console:
    # wide when piped (logs, CI) so paths and messages are not cut
    return _console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)


@cache
def err_console() -> Console:
    return _console(stderr=True, soft_wrap=True)


_FIELD = re.compile("\ue000(\\d+)\ue001")  # private-use marks: never in our literal templates


class _FieldCollector(string.Formatter):
    """``str.format`` that sets each formatted value aside as ``Text`` and leaves a numbered mark
    in its place, so the template can be parsed as markup without the values being parsed too."""

    def __init__(self) -> None:
        self.values: list[Text] = []

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, Text):  # a styled piece, e.g. plain("FAIL", style="red")
            if format_spec:
                raise ValueError(f"a Text value takes no format spec (got {format_spec!r})")
            piece = value.copy()
            piece.plain = visible_controls(piece.plain, keep="\n\t")
        else:  # formatted first, so that {name:30s} pads the visible text
            piece = Text(visible_controls(format(value, format_spec)))
        self.values.append(piece)
        return f"\ue000{len(self.values) - 1}\ue001"


def markup(template: LiteralString, /, **values: Any) -> Text:
    """Rich text from a literal markup ``template`` and values that are shown as they are.

    ``markup("[bold red]REJECTED[/] {vid}: {gates}", vid=..., gates=...)``: only the template's
    own tags style the output (a value takes the style around its field); ``[/x]``,
    ``[link=...]``, backslashes, ANSI sequences or a line break in a value are shown as text.
    Values are never parsed as markup: the template is parsed with marks in their place.
    """
    fields = _FieldCollector()
    styled = Text.from_markup(fields.vformat(template, (), values), emoji=False)
    out, pos = Text(style=styled.style), 0
    for m in _FIELD.finditer(styled.plain):
        out.append_text(styled[pos:m.start()])
        piece = fields.values[int(m[1])]
        around = Text(piece.plain)
        for span in styled[m.start():m.end()].spans:  # the template's styles at the field, under the value's own
            around.stylize(span.style)
        around.stylize(piece.style)
        around.spans.extend(piece.spans)
        out.append_text(around)
        pos = m.end()
    out.append_text(styled[pos:])
    return out


def plain(value: object, *, style: str = "", multiline: bool = False) -> Text:
    """One value as literal ``Text``: control characters and line breaks as escapes.

    ``multiline``: for a message our code composed over several lines around user values (a
    policy error listing keys): line breaks are kept, and every line after the first is
    indented, so no part of it can pass for a line of its own (a forged "CERTIFIED")."""
    text = str(value)
    if multiline:
        return Text("\n  ".join(visible_controls(line) for line in text.split("\n")), style=style)
    return Text(visible_controls(text), style=style)


def json_text(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` for a terminal: non-ASCII text stays readable (as with ``ensure_ascii=False``),
    but DEL, C1 controls, line separators and bidi overrides become ``\\uXXXX`` escapes.  Same
    data, valid JSON: json already escapes C0 in strings, so a raw newline is layout (``indent``)."""
    dumped = json.dumps(obj, ensure_ascii=False, **kwargs)
    return CONTROL_CHARS.sub(lambda m: m[0] if m[0] == "\n" else f"\\u{ord(m[0]):04x}", dumped)


class StageProgress:
    """What :func:`stage_progress` yields: ``rows(n)`` while reading input, ``partitions(step,
    done, total)`` while a partitioned step runs, ``stage(name, seconds)`` after each stage of a
    pipeline run."""

    def __init__(self, prog: Any = None, task: Any = None):
        self.prog, self.task, self.n_rows, self.done = prog, task, 0, 0

    def rows(self, n: int) -> None:
        self.n_rows += n
        if self.prog is not None:
            self.prog.update(self.task, description=f"reading input: {self.n_rows:,} rows", refresh=True)

    def partitions(self, step: str, done: int, total: int) -> None:
        """A partitioned step's progress: ``done`` of ``total`` partitions."""
        if self.prog is not None:
            self.prog.update(self.task, description=f"{step.replace('-', ' ')}: {done}/{total} partitions", refresh=True)

    def stage(self, name: str, seconds: float) -> None:
        self.done += 1
        if self.prog is not None:
            label = name.split(":", 1)[-1].replace("_", " ")
            self.prog.update(self.task, completed=self.done, description=f"{label} done ({seconds:.1f} s)", refresh=True)


@contextmanager
def stage_progress(description: str, *, enabled: bool = True) -> Iterator[StageProgress]:
    """A live line on stderr (a terminal only; nothing with ``--json``, in pipes or CI): rows read
    while ingesting, then each stage as it finishes, with the stage count and the time so far."""
    if not enabled or not sys.stderr.isatty():
        yield StageProgress()
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn(description, style="bold", markup=False),
                  TextColumn("{task.description}", markup=False), TextColumn("[{task.completed} stages]", markup=False),
                  TimeElapsedColumn(), console=err_console(), transient=True) as prog:
        yield StageProgress(prog, prog.add_task("starting", total=None))


@contextmanager
def progress_for(description: str, total: int | None, *, unit: str = "rows", enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr when it is a terminal; a no-op otherwise (CI, pipes, --json)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                  TimeElapsedColumn(), console=err_console(), transient=True) as prog:
        task = prog.add_task(description, total=None)
        yield lambda n: prog.advance(task, n)
