"""One batch curated by two commits side by side, alternating: A = ``--base``, B = this checkout.

    .venv/bin/python benchmarks/ab.py --base 84e3110 --judgments 3000000 --runs 2 --title "the parts' fsyncs"
    .venv/bin/python benchmarks/ab.py --base e64d130 --parent-judgments 10000000 --batch 10000 --runs 2

``--parent-judgments N``: a child instead -- a new ``--batch``-judgment batch (``incremental.fresh_batch``) curated
with ``--parent P``, P the version of N judgments (``--judgments`` is ignored) that B's code builds once into a store
kept under $TMPDIR/prefpipe-bench (reused while it exists); each run into a store that holds only P, its parts
hard-linked, P's files read once first (in the page cache, as after it was built).

Each round runs A, then B: one fresh ``prefpipe curate BATCH --store NEW --json`` process each, run from its own
tree (A: a ``git worktree`` of ``--base`` under $TMPDIR, removed at the end), measured as ``benchmarks/scale.py``
measures a curate (wall clock; CPU = user + sys from ``os.wait4``; peak RSS = the child's VmHWM).  Prints every run
with the stage laps of its ``timings_s`` (``--laps``), then the medians and their B/A ratios; writes the section
"A/B: TITLE" of docs/benchmarks.md unless ``--no-write``.  Run nothing else meanwhile: the machine is the
instrument (its speed drifts between days, which is why the two sides alternate).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, benchmark_parser, machine_line, table, write_section  # noqa: E402
from gen_judgments import cached_batch  # noqa: E402
from scale import LAUNCHER, run_child, run_curate  # noqa: E402

DEFAULT_LAPS = ("ingest", "partitions:checks", "partitions:select", "write_pairs")
CHILD_LAPS = ("union_inputs", "checks:touched_pairs", "parent_scan", "select", "write")


def _child_runner(parent_judgments: int, batch_judgments: int, row_bytes: int, head: str):
    """(the batch, run(cwd) -> (wall, CPU, peak MiB, --json output)) of a child of a parent of ``parent_judgments``."""
    import json

    from incremental import fresh_batch, store_with, warm

    big = cached_batch(parent_judgments, row_bytes)
    store = big.parent / f"ab-parent-{parent_judgments}-{head.split('+')[0]}"
    _, _, _, out, _ = run_child(LAUNCHER, ["curate", str(big), "--store", str(store), "--json"])
    parent = json.loads(out)["version_id"]
    batch = fresh_batch(batch_judgments, row_bytes, 1)

    def run(cwd: Path) -> tuple[float, float, float, dict]:
        copy = store_with(store, parent, "ab")
        warm(copy, parent)
        try:
            wall, cpu, peak, stdout, _ = run_child(LAUNCHER, ["curate", str(batch), "--store", str(copy), "--parent", parent,
                                                              "--json"], cwd=cwd)
        finally:
            import shutil

            shutil.rmtree(copy, ignore_errors=True)
        return wall, cpu, peak, json.loads(stdout)

    return batch, run


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--base", required=True, help="the commit to compare with (A)")
    ap.add_argument("--input", type=Path, help="the batch (default: a generated one, --judgments/--row-bytes)")
    ap.add_argument("--judgments", type=int, default=1_000_000)
    ap.add_argument("--row-bytes", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=2, help="rounds (each: A, then B)")
    ap.add_argument("--laps", nargs="*", default=list(DEFAULT_LAPS), help="stages of timings_s to show")
    ap.add_argument("--title", default=None, help="the docs section's title after 'A/B: ' (default: the two commits)")
    ap.add_argument("--parent-judgments", type=int, default=None,
                    help="curate a child of a version of this many judgments instead (see above)")
    ap.add_argument("--batch", type=int, default=10_000, help="the child's batch, in judgments (--parent-judgments)")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs: expected >= 1")
    base = _git("rev-parse", "--short", a.base)
    head = _git("rev-parse", "--short", "HEAD") + ("+changes" if _git("status", "--porcelain", "--untracked-files=no") else "")
    if a.parent_judgments:
        batch, run_one = _child_runner(a.parent_judgments, a.batch, a.row_bytes, head)
        if a.laps == list(DEFAULT_LAPS):
            a.laps = list(CHILD_LAPS)
    else:
        batch = a.input or cached_batch(a.judgments, a.row_bytes)

        def run_one(cwd: Path) -> tuple[float, float, float, dict]:
            return run_curate(batch, cwd=cwd)[:4]
    tree = Path(tempfile.mkdtemp(prefix="pp-ab-")) / "base"
    _git("worktree", "add", "--detach", "--quiet", str(tree), a.base)
    runs: list[tuple[str, int, float, float, float, dict]] = []
    try:
        for i in range(1, a.runs + 1):
            for side, cwd in (("A", tree), ("B", ROOT)):
                wall, cpu, peak, data = run_one(cwd)
                laps = data.get("timings_s") or {}
                runs.append((side, i, wall, cpu, peak, laps))
                print(f"{side} {i}: {wall:7.1f} s wall {cpu:7.1f} s CPU {peak:7,.0f} MiB  "
                      + "  ".join(f"{k} {laps.get(k, float('nan')):.1f}" for k in a.laps), flush=True)
    finally:
        _git("worktree", "remove", "--force", str(tree))
    measures = ["wall s", "CPU s", "peak MiB", *a.laps]

    values = [[w, c, p, *(laps.get(k, float("nan")) for k in a.laps)] for _, _, w, c, p, laps in runs]
    med = {side: [statistics.median(col) for col in zip(*(v for r, v in zip(runs, values) if r[0] == side))]
           for side in ("A", "B")}
    rows = [[f"{r[0]} {r[1]}", *(f"{x:,.1f}" for x in v)] for r, v in zip(runs, values, strict=True)]
    rows.append(["median A", *(f"{v:,.1f}" for v in med["A"])])
    rows.append(["median B", *(f"{v:,.1f}" for v in med["B"])])
    rows.append(["B / A", *(f"{b / x:.3f}" if x else "-" for b, x in zip(med["B"], med["A"], strict=True))])
    text = table(["run", *measures], rows)
    print(text)
    if not a.no_write:
        what = f"--parent-judgments {a.parent_judgments} --batch {a.batch}" if a.parent_judgments else \
            f"--input {batch.name}" if a.input else f"--judgments {a.judgments} --row-bytes {a.row_bytes}"
        run_what = f"`prefpipe curate {batch.name} --store COPY --parent P --json` process (COPY: a store holding " \
            f"only P, the version of {a.parent_judgments:,} judgments, hard-linked, its files read once first)" \
            if a.parent_judgments else f"`prefpipe curate {batch.name} --store NEW --json` process"
        body = (f"`.venv/bin/python benchmarks/ab.py --base {a.base} {what} --runs {a.runs}` — {machine_line()}. "
                f"A = {base}, B = {head}; rounds alternate A, B; each run a fresh {run_what} from its own tree (wall "
                "from outside, CPU = user + sys of the child from wait4, peak = its VmHWM; laps from its "
                "`timings_s`).\n\n" + text)
        write_section(f"A/B: {a.title or f'{base} vs {head}'}", body)


if __name__ == "__main__":
    main()
