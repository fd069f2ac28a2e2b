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
* :func:`html_escape`: a value inside HTML or SVG text or a quoted attribute (``report.html``).
"""
from __future__ import annotations

import html
import re

# C0, DEL and C1 controls; the line/paragraph separators; the bidi embeddings, overrides and
# isolates that make a terminal or browser show text in another order than it is stored.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(ch: str) -> str:
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def visible_controls(text: str, *, keep: str = "") -> str:
    """``text`` with every control character written as a Python-style escape (``keep``: ones left as they are)."""
    return CONTROL_CHARS.sub(lambda m: m[0] if m[0] in keep else _visible(m[0]), text)


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
    return _MD_SPECIAL.sub(lambda m: _MD_ENTITIES.get(m[0], "\\" + m[0]), visible_controls(str(value)))


def html_escape(value: object) -> str:
    """``value`` as literal text inside HTML/SVG text or a quoted attribute."""
    return html.escape(visible_controls(str(value)), quote=True)


__all__ = ["CONTROL_CHARS", "html_escape", "md_escape", "visible_controls"]
