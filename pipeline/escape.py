"""User text made inert wherever it is rendered: terminal, Markdown, HTML.

Annotator ids, tags, labels, comparison and pair ids, file names, locales, check details and
texts come from the data, so they may hold anything: Markdown (``| a | b |``, ``[x](url)``),
HTML (``<script>``), Rich markup (``[link=...]``), a line break that starts a new heading or
table row, or terminal control sequences (``ESC [31m``, ``\\r``, an OSC 8 hyperlink).  A
renderer never pastes a user value in raw; it goes through one of:

* :func:`visible_controls`: control characters shown as escapes (``\\x1b``, ``\\n``,
  ``\\u202e``), so they cannot move the cursor, colour or link the terminal, reorder text or
  break a line.  The base of the two below and of the terminal helpers in ``flows/console.py``.
* :func:`md_escape`: a value inside a Markdown line or table cell (``report.md``, Prefect
  markdown artifacts and artifact descriptions).
* :func:`html_escape`: a value inside HTML or SVG text or a quoted attribute (``report.html``);
  a value with right-to-left letters is also isolated (FSI ... PDI), so that the figures the report
  writes after it keep their order: unisolated, an Arabic annotator id in a tooltip
  ``"id: 0.571 [0.250, 0.842]"`` shows as ``[0.842 ,0.250] 0.571 :id``, its interval turned round.

Both also cap a run of combining marks on one character at :data:`MAX_MARKS` (the rest shown as
one ``…``): a "zalgo" value of dozens of stacked accents would otherwise paint over the table
rows and chart labels above and below it.
"""
from __future__ import annotations

import html
import re
import unicodedata

# C0, DEL and C1 controls; the line/paragraph separators; the bidi embeddings, overrides and
# isolates that make a terminal or browser show text in another order than it is stored.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(ch: str) -> str:
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def visible_controls(text: str, *, keep: str = "") -> str:
    """``text`` with every control character written as a Python-style escape (``keep``: ones left as they are)."""
    return CONTROL_CHARS.sub(lambda m: m[0] if m[0] in keep else _visible(m[0]), text)


# Enough for the scripts that stack marks (Vietnamese: 2, Hebrew points and cantillation, Thai: 3-4).
MAX_MARKS = 4
_MARKS = re.compile("[\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0e31-\u0e3a\u0e47-\u0e4e"
                    "\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]{%d,}" % (MAX_MARKS + 1))


def capped_marks(text: str) -> str:
    """``text`` with every run of more than :data:`MAX_MARKS` combining marks on one character cut to
    :data:`MAX_MARKS` and a ``…`` (a run found by the common mark blocks, then checked by category)."""
    def cap(m: re.Match[str]) -> str:
        run = m[0]
        return run[:MAX_MARKS] + "…" if all(unicodedata.category(c) in ("Mn", "Me") for c in run) else run

    return _MARKS.sub(cap, text)


# Markdown: ``&<>`` become entities (no raw HTML, no autolink, no entity decoding); the other
# characters that open inline syntax, or split a table cell, get a backslash.  ``_`` between two
# letters or digits cannot start emphasis and is left alone, so ids like ``rev_ja_02`` stay
# readable in the raw file.  Values never start a line (they are in table cells or after
# literal text), and line breaks are already escapes, so block syntax (``#``, ``>``, ``-``)
# cannot start.
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MD_SPECIAL = re.compile(r"[&<>\\`*\[\]|~]|(?<![^\W_])_|_(?![^\W_])")


def md_escape(value: object) -> str:
    """``value`` as literal text inside a Markdown line or GFM table cell (renders as itself)."""
    return _MD_SPECIAL.sub(lambda m: _MD_ENTITIES.get(m[0], "\\" + m[0]), capped_marks(visible_controls(str(value))))


# strong right-to-left letters: Hebrew, Arabic, Syriac, Thaana, NKo, Samaritan, Mandaic, their presentation
# forms, and the right-to-left scripts of the supplementary planes
_RTL = re.compile("[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc\U00010800-\U00010fff\U0001e800-\U0001efff]")
FSI, PDI = "\u2068", "\u2069"  # first-strong isolate ... pop directional isolate (added by us, after escaping)


def html_escape(value: object) -> str:
    """``value`` as literal text inside HTML/SVG text or a quoted attribute; isolated when it holds right-to-left text."""
    text = html.escape(capped_marks(visible_controls(str(value))), quote=True)
    return f"{FSI}{text}{PDI}" if _RTL.search(text) else text


__all__ = ["CONTROL_CHARS", "FSI", "MAX_MARKS", "PDI", "capped_marks", "html_escape", "md_escape", "visible_controls"]
