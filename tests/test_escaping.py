"""User text is escaped wherever it is rendered: terminal (Rich), report.md, report.html, Prefect artifacts.

A small batch whose annotator ids, tags, labels, comparison and pair ids, locales, texts and file
name carry Rich markup, Markdown, HTML, a line break that would start a heading, and ANSI/C1/bidi
control characters goes through the real CLI (subprocesses, stdout not a terminal).  Every command
exits as usual, shows the values literally, lets no control character from the data reach the
output, and the reports and artifact Markdown keep every value inside its table cell.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, canonical, write_jsonl
from rich.text import Text

from flows.console import SafeConsole, json_text, markup, plain
from pipeline.escape import html_escape, md_escape, visible_controls
from pipeline.report import md_table

CLOSE, LINK, SCRIPT, PIPES, HEADING, ANSI = ("[/x]", "[link=https://evil.example]x[/link]", "<script>alert(1)</script>",
                                             "| a | b |", "\n# injected heading", "\x1b[31m")
HOSTILE = [CLOSE, LINK, SCRIPT, PIPES, HEADING, ANSI]
OTHER_CONTROLS = "\x9b31m\r\u202e"  # C1 CSI, carriage return, right-to-left override
BIASED = f"ann-{CLOSE}{LINK}{ANSI}{HEADING}"
# a file name cannot hold "/" (so no "[/x]"), everything else goes in
FILE_NAME = f"b[link=evil.example]x[bold]<script>{PIPES}{HEADING}{ANSI}.jsonl"


def hostile_rows(flip: bool = False) -> list[dict]:
    """6 pairs (one per hostile value) x 4 annotators; odd pairs split 2-2 (low agreement), even ones
    unanimous for "a" (for "b" with ``flip``: label flips for ``diff``); plus 2 rows quarantined for
    a hostile label and a hostile locale.  A pair's texts are the same in all its judgments (a pair_id
    naming other texts would be a pair_id_conflict and dropped)."""
    rows = []
    for p, h in enumerate(HOSTILE):
        for k in range(4):
            label = ("b" if flip else "a") if p % 2 == 0 else "ab"[k % 2]
            rows.append(canonical(
                p * 4 + k, comparison_id=f"c{p}-{k}-{HOSTILE[(p + k) % 6]}", pair_id=f"pair-{p}-{h}",
                prompt=[{"role": "user", "content": f"Question {p}: what is {h}?"}],
                response_a=f"answer a {h}", response_b=f"answer b {HOSTILE[(p + 1) % 6]}{OTHER_CONTROLS}", label=label,
                annotator_id=f"ann-{HOSTILE[k]}" if k < 3 else f"ann-{HOSTILE[(p + 4) % 6]}{OTHER_CONTROLS}",
                shown_first="ab"[(p + k) % 2], tags=[h, HOSTILE[k], OTHER_CONTROLS], rubric=h))
    for p in range(40):  # an annotator who always picks the first-shown response: flagged, named by certify
        for k, annotator in enumerate((BIASED, "rev-honest")):
            first = "ab"[p % 2]
            rows.append(canonical(1000 + p * 2 + k, comparison_id=f"pos-{p}-{k}", shown_first=first, tags=[],
                                  annotator_id=annotator, label=first if annotator == BIASED else "a"))
    rows.append(canonical(100, comparison_id=f"bad-{CLOSE}", label=f"{CLOSE}{SCRIPT}"))
    rows.append(canonical(101, comparison_id="bad-locale", locale=f"en{HEADING}{LINK}"))
    return rows


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL)


def assert_inert_terminal_output(proc: subprocess.CompletedProcess, *codes: int) -> str:
    """Usual exit code, no traceback, no control character from the data, no injected line; returns stdout+stderr."""
    out = proc.stdout + proc.stderr
    assert proc.returncode in codes, out
    assert "Traceback" not in out and "MarkupError" not in out, out
    assert "\x1b" not in out and "\x9b" not in out and "\r" not in out and "\u202e" not in out, repr(out)  # no terminal: no styles either
    assert not any(line.lstrip().startswith("# injected") for line in out.splitlines()), out
    return out


def table_rows(md: str) -> list[list[str]]:
    """Cells of every table line of a Markdown text, split on unescaped pipes (as GFM does)."""
    rows = []
    for line in md.splitlines():
        if not line.startswith("|"):
            continue
        cells, cur, backslashes = [], "", 0
        for ch in line[1:]:
            if ch == "|" and backslashes % 2 == 0:
                cells.append(cur)
                cur = ""
            else:
                cur += ch
            backslashes = backslashes + 1 if ch == "\\" else 0
        rows.append(cells)
    return rows


def assert_inert_markdown(md: str) -> None:
    assert "<script" not in md and "<" not in md.replace("\n", ""), "raw HTML in Markdown"
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", md), "control character in Markdown"
    assert not any(line.startswith("# injected") or line.startswith("#") and "injected" in line for line in md.splitlines())
    blocks = re.split(r"\n\s*\n", md)
    for block in blocks:
        rows = table_rows(block)
        if rows:
            assert len({len(r) for r in rows}) == 1, f"a value split a table row:\n{block}"


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory):
    """Two versions of the hostile batch (the second with label flips) in a store, via the real CLI."""
    d = tmp_path_factory.mktemp("hostile")
    first = write_jsonl(d / FILE_NAME, hostile_rows())
    second = write_jsonl(d / "flipped.jsonl", hostile_rows(flip=True))
    store = d / "store"
    procs = {"validate": run_cli("validate", str(first)),
             "curate": run_cli("curate", str(first), "--store", str(store)),
             "curate-flipped": run_cli("curate", str(second), "--store", str(store))}
    ids = {k: procs[k].stdout.strip().splitlines()[-1] for k in ("curate", "curate-flipped") if procs[k].returncode == 0}
    return {"dir": d, "file": first, "store": store, "procs": procs, "ids": ids}


def test_validate_shows_file_name_and_quarantine_messages_literally(hostile_store):
    out = assert_inert_terminal_output(hostile_store["procs"]["validate"], 1)
    shown_name = visible_controls(str(hostile_store["file"]))
    n = len(hostile_rows())
    assert f"{shown_name}:{n - 1}" in out and f"{shown_name}:{n}" in out  # file:line of both quarantined rows (the last two)
    assert f"found {json.dumps(CLOSE + SCRIPT)}" in out or f"found {CLOSE + SCRIPT!r}" in out, out
    assert "invalid_value" in out and "[link=https://evil.example]x[/link]" in out, out


def test_validate_json_has_no_raw_control_characters(hostile_store):
    proc = run_cli("validate", str(hostile_store["file"]), "--json")
    assert_inert_terminal_output(proc, 1)
    data = json.loads(proc.stdout)
    assert data["errors"][0]["source_file"] == str(hostile_store["file"])  # same data, only written with escapes


def test_curate_versions_show_diff_certify(hostile_store):
    procs, store, ids = hostile_store["procs"], str(hostile_store["store"]), hostile_store["ids"]
    assert_inert_terminal_output(procs["curate"], 0)
    assert_inert_terminal_output(procs["curate-flipped"], 0)
    first, flipped = ids["curate"], ids["curate-flipped"]
    assert_inert_terminal_output(run_cli("versions", "--store", store), 0)
    assert_inert_terminal_output(run_cli("show", first, "--store", store), 0)
    out = assert_inert_terminal_output(run_cli("diff", first, flipped, "--store", store), 0)
    assert f"pair-0-{CLOSE}" in out and f"pair-2-{SCRIPT}" in out and "pair-4-\\n# injected heading" in out, out
    out = assert_inert_terminal_output(run_cli("certify", flipped, "--no-expectations", "--store", store), 3)
    words = " ".join(out.split())  # long gate lines wrap at 160 columns when piped
    assert f"REJECTED {flipped}" in words and f"flagged: {visible_controls(BIASED)}" in words, out


def test_versions_shows_a_hostile_directory_name_on_one_line(tmp_path):
    """A folder under versions/ whose name is no version id (listed DAMAGED) is shown with its line
    break and control characters as escapes: it cannot add a line of its own to the table."""
    name = f"v-{ANSI}\nCERTIFIED [link=evil.example]x[\\link]\u202e"  # (a file name holds no "/")
    (tmp_path / "s" / "versions" / name).mkdir(parents=True)
    (tmp_path / "s" / "versions" / name / "manifest.json").write_text("{}")
    out = assert_inert_terminal_output(run_cli("versions", "--store", str(tmp_path / "s")), 0)
    assert "DAMAGED" in out and "\\nCERTIFIED" in out, out
    assert not any(line.strip("│ ").startswith("CERTIFIED") for line in out.splitlines()), out


@pytest.mark.parametrize("args", [["validate", f"missing{CLOSE}{ANSI}{HEADING}.jsonl"], ["show", f"v{CLOSE}{ANSI}", "--store"],
                                  ["diff", f"v{CLOSE}", f"{LINK}", "--store"]])
def test_usage_errors_name_the_value_literally(hostile_store, args):
    """In-process (CliRunner, output not a terminal): the error message names the bad value as it is."""
    from typer.testing import CliRunner

    from flows.cli import app

    if args[-1] == "--store":
        args = [*args, str(hostile_store["store"])]
    res = CliRunner().invoke(app, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    out = assert_inert_terminal_output(subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr), 2)
    assert CLOSE in out and "error:" in out, out


def test_report_md_and_html_escape_every_value(hostile_store):
    vdir = hostile_store["store"] / "versions" / hostile_store["ids"]["curate"]
    md = (vdir / "report.md").read_text(encoding="utf-8")
    assert_inert_markdown(md)
    for value in (CLOSE, LINK, SCRIPT, PIPES, HEADING, ANSI):
        assert f"ann-{md_escape(value)}" in md, value  # each annotator id, shown as itself
    assert "&lt;script&gt;" in md and "\\| a \\| b \\|" in md and "\\\\n# injected heading" in md
    html = (vdir / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html  # the report has no script of its own: any would come from the data
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", html)
    assert "ann-&lt;script&gt;alert(1)&lt;/script&gt;" in html and "\\x1b[31m" in html
    assert re.search(r"<text[^>]*>ann-&lt;script&gt;", html)  # an SVG label, escaped


def test_prefect_artifact_markdown(hostile_store, monkeypatch):
    """The markdown artifact is report.md (escaped) for versions this code wrote, else the summary."""
    import schemas.version
    from pipeline.artifacts import report_markdown, version_tables
    from pipeline.store import Store

    h = Store(hostile_store["store"]).get(hostile_store["ids"]["curate"])
    tables = version_tables(h)
    assert_inert_markdown(tables["markdown"])
    published = report_markdown(h, tables["markdown"])
    assert published == h.file("report.md").read_text(encoding="utf-8")
    monkeypatch.setattr(schemas.version, "code_version", lambda: "0.0.0+older")
    assert report_markdown(h, tables["markdown"]) == tables["markdown"]


def test_publish_version_artifacts_without_a_server(hostile_store, monkeypatch):
    """flows.publish_version_artifacts, with Prefect's artifact calls captured instead of sent."""
    import flows.flows as ff

    seen: dict[str, list] = {"markdown": [], "table": [], "link": []}
    monkeypatch.setattr(ff, "create_markdown_artifact", lambda md, **kw: seen["markdown"].append((md, kw)))
    monkeypatch.setattr(ff, "create_table_artifact", lambda rows, **kw: seen["table"].append((rows, kw)))
    monkeypatch.setattr(ff, "create_link_artifact", lambda url, **kw: seen["link"].append((url, kw)))
    ff.publish_version_artifacts.fn(str(hostile_store["store"]), hostile_store["ids"]["curate"])
    (md, kw), = seen["markdown"]
    assert_inert_markdown(md)
    assert f"ann-{md_escape(SCRIPT)}" in md
    assert_inert_markdown(kw["description"])
    annotators = next(rows for rows, kw in seen["table"] if kw["key"].startswith("annotators-"))
    assert {r["annotator_id"] for r in annotators} >= {f"ann-{v}" for v in HOSTILE[:3]}  # tables keep the data as data


# ---------------------------------------------------------------- the helpers themselves
@pytest.mark.parametrize("value", [*HOSTILE, OTHER_CONTROLS, "\\", "a\\", "[bold]", "\\[bold]", ":smile:", "x\x00y\x7f"])
def test_markup_prints_values_literally_on_a_terminal(value):
    """On a colour terminal the template's own style is rendered, the value never is."""
    buf = io.StringIO()
    con = SafeConsole(file=buf, force_terminal=True, color_system="truecolor", markup=False, emoji=False, highlight=False, width=200)
    con.print(markup("[bold]name:[/] {v} {n:,}", v=value, n=1234))
    # the template's markup works; the value is exactly itself: no hyperlink (ESC ]8;), no other escape sequence
    assert buf.getvalue() == f"\x1b[1mname:\x1b[0m {visible_controls(value)} 1,234\n"


def test_plain_console_print_never_interprets_markup():
    buf = io.StringIO()
    con = SafeConsole(file=buf, force_terminal=True, markup=False, emoji=False, highlight=False, width=200)
    con.print(f"raw {CLOSE} {LINK} {ANSI}red :smile:\rx")  # what a forgotten f-string would print
    out = buf.getvalue()
    assert out == f"raw {CLOSE} {LINK} \\x1b[31mred :smile:\\rx\n"


def test_markup_keeps_format_specs_and_styled_values():
    t = markup("{a:>6}|{b:.2f}|[green]{c}[/]|{d}|[dim]{e}[/dim]", a="[/x]", b=0.5, c=plain("FAIL", style="red"), d=Text("ok\x1b"),
               e=plain("a\\\\\\", style="bold"))
    assert t.plain == "  [/x]|0.50|FAIL|ok\\x1b|a\\\\\\"  # a value's trailing backslashes escape no closing tag
    assert [(t.plain[sp.start:sp.end], str(sp.style)) for sp in t.spans] == [
        ("FAIL", "green"), ("FAIL", "red"), ("a\\\\\\", "dim"), ("a\\\\\\", "bold")]
    with pytest.raises(ValueError, match="format spec"):
        markup("{c:>5}", c=plain("x"))


def test_plain_multiline_indents_continuation_lines():
    assert plain("error:\nCERTIFIED v-1\x1b[0m", multiline=True).plain == "error:\n  CERTIFIED v-1\\x1b[0m"


def test_json_text_escapes_c1_and_bidi_but_stays_the_same_json():
    obj = {"a": f"日本 {ANSI}{OTHER_CONTROLS}", "b": [1, 2]}
    text = json_text(obj, indent=2)
    assert json.loads(text) == obj and "日本" in text
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", text)


@pytest.mark.parametrize("value", [*HOSTILE, OTHER_CONTROLS, "a\\|b", "\\", "_x_ *y* `z` ~~w~~ ![i](u) &amp;"])
def test_md_escape_keeps_a_value_in_its_cell(value):
    md = md_table(["id", "n"], [[value, 1], ["ok", 2]])
    assert_inert_markdown(md)
    assert [len(r) for r in table_rows(md)] == [2, 2, 2, 2]
    assert "<" not in md and "&amp;amp;" in md_escape("&amp;")


def test_md_escape_leaves_plain_ids_readable():
    assert md_escape("rev_ja_02 low_agreement=3 en-US 0.5") == "rev_ja_02 low_agreement=3 en-US 0.5"
    assert md_escape("_x_") == "\\_x\\_"


def test_stacked_combining_marks_are_capped_and_real_scripts_kept():
    """A "zalgo" id (dozens of marks on one letter) would paint over the rows above and below it in
    report.html and report.md; the marks of real scripts (Vietnamese, Hebrew points) are left alone."""
    import unicodedata

    from pipeline.svg import fit, text_width

    max_marks = 4  # pipeline.escape.MAX_MARKS

    zalgo = "ann-Z" + "".join(chr(0x300 + i) for i in range(60)) + "algo"
    for out in (html_escape(zalgo), md_escape(zalgo)):
        runs = [len(r) for r in re.findall("[\u0300-\u036f]+", out)]
        assert runs == [max_marks] and out.startswith("ann-Z") and out.endswith("…algo"), out
    md = md_table(["annotator"], [[zalgo]])
    assert max(len(r) for r in re.findall("[\u0300-\u036f]+", md)) <= max_marks
    for text in (unicodedata.normalize("NFD", "Tiếng Việt"), "\u05e9\u05b8\u05c1\u0591\u05bc\u05dc\u05d5\u05dd", "e\u0301"):
        assert html_escape(text).strip("\u2068\u2069") == text and md_escape(text) == text  # (RTL: isolated)
    assert text_width(zalgo) == text_width("ann-Zalgo") and fit(zalgo, text_width("ann-Zalgo") + 1) == zalgo  # marks take no width


def test_right_to_left_values_are_isolated_in_html():
    """An Arabic/Hebrew annotator id followed by figures: isolated, the figures keep their order (unisolated,
    Chromium shows "id: 0.50, 0.60" as "0.60 ,0.50 :id" -- x and y swapped; a CI's bounds turned round)."""
    from pipeline.svg import dot_ci, scatter

    rtl = "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd"
    assert f"<title>\u2068{rtl}\u2069: 0.50, 0.60</title>" in scatter("r", "t", [(rtl, 0.5, 0.6, True)], x_label="x", y_label="y")
    assert f"<title>\u2068{rtl} (n=9)\u2069: 0.571 [0.250, 0.842]</title>" in dot_ci("p", "t", [(f"{rtl} (n=9)", 0.571, 0.25, 0.842, False)])
    assert html_escape("rev-01 中文 日本語") == "rev-01 中文 日本語"  # left-to-right text: nothing added
    assert html_escape(f"\u202e{rtl}") == f"\u2068\\u202e{rtl}\u2069"  # a bidi control from the data stays an escape


def test_html_escape():
    assert html_escape(f"{SCRIPT}'\"{HEADING}{ANSI}") == "&lt;script&gt;alert(1)&lt;/script&gt;&#x27;&quot;\\n# injected heading\\x1b[31m"


def test_no_console_print_with_inline_markup_in_flows():
    """Styling goes through markup() templates: a print of an f-string with tags would show them literally
    (the consoles interpret no markup), and a Console made elsewhere would not escape control characters."""
    for path in (ROOT / "flows").glob("*.py"):
        src = path.read_text(encoding="utf-8")
        assert not re.search(r"\.print\(\s*f?[\"'][^\"']*\[/?[a-z #]+\]", src), f"{path.name}: inline Rich markup passed to print"
        if path.name != "console.py":
            assert not re.search(r"\bConsole\(", src), f"{path.name}: make consoles in flows/console.py"
