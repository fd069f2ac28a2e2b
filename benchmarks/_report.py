"""Shared helpers for benchmark scripts: the command line, run a measured subprocess, write a docs section."""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the checkout's own modules (a benchmark run from another worktree measures that worktree's code,
# and names its caches by that code's version, not by the editable install's)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "benchmarks.md"



def benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line: its module docstring as ``--help``, and ``--no-write`` (print
    the results only; every benchmark otherwise rewrites its section of docs/benchmarks.md)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true",
                    help="print the results only; do not rewrite their section of docs/benchmarks.md")
    return ap


def run_measured(code: str, *, env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``python -c code`` in a fresh process: (wall seconds, peak RSS in MiB, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, **(env or {})}, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"benchmark step failed ({proc.returncode}):\n{err[-3000:]}")
    peak = _child_peak_mib(out)
    return wall, peak, out


def _child_peak_mib(out: str) -> float:
    """The child prints 'PEAK_RSS_KB=<n>' as its last line (see PEAK_SNIPPET)."""
    for line in reversed(out.splitlines()):
        if line.startswith("PEAK_RSS_KB="):
            return int(line.split("=", 1)[1]) / 1024
    return float("nan")


PEAK_SNIPPET = "\nimport resource as _r; print('PEAK_RSS_KB=%d' % _r.getrusage(_r.RUSAGE_SELF).ru_maxrss)\n"


def machine_line() -> str:
    return (f"{datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}")


def write_section(title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of docs/benchmarks.md atomically."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n\nReproducible scripts in `benchmarks/`; each rewrites its own section.\n"
    head = f"## {title}\n"
    start = text.find(head)
    block = head + "\n" + body.strip() + "\n\n"
    if start == -1:
        text = text.rstrip() + "\n\n" + block
    else:
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + block + (text[nxt + 1:] if nxt != -1 else "")
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text.rstrip() + "\n", encoding="utf-8")
    tmp.replace(DOC)


def table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)
