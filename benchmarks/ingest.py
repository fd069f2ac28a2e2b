"""Ingest throughput and peak RSS vs a bare JSON parse of the same file, side by side.

    .venv/bin/python benchmarks/ingest.py [--judgments 1000000] [--row-bytes 1600] [--repeats 1]

Generates (once, cached under $TMPDIR/prefpipe-bench/) a uniform canonical JSONL batch that the
bare readers can parse (one row shape, no malformed lines), then runs, each in a fresh process:
Polars `read_ndjson` (bare parse), PyArrow `json.read_json` (bare parse), `prefpipe validate`'s
path (read + adapt + validate + normalise, judgments discarded batch by batch), and the
`curate` path (same + hashes and ids, judgments kept in memory). Also runs the validate path on the
messy variant (mixed shapes + malformed rows) that the bare readers reject. Prints a table and
rewrites the "Ingest" section of docs/benchmarks.md.

The machine may be shared: each step records the 1-minute load average before it starts and the
CPU time (user + sys) of its process and the processes it waited for. Ratios are against the Polars
bare parse of the same run. Peak RSS is the largest resident set of the step's main process and,
separately, of the largest worker process it started (ingest's parse workers), so their sum bounds
the step's memory.
"""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, benchmark_parser, machine_line, table, write_section  # noqa: E402
from gen_judgments import GEN_VERSION, generate  # noqa: E402

STEPS = {
    "bare parse: polars.read_ndjson": "import polars as pl; df = pl.read_ndjson({path!r}); print(df.height)",
    "bare parse: pyarrow.json.read_json": "import pyarrow.json as pj; t = pj.read_json({path!r}); print(t.num_rows)",
    "prefpipe validate (read+validate, streaming)": (
        "from pipeline.ingest import ingest_files; r = ingest_files([{path!r}], keep_judgments=False); print(r.ledger.rows_valid)"),
    "prefpipe ingest (judgments kept in memory)": (
        "from pipeline.ingest import ingest_files; r = ingest_files([{path!r}]); print(r.judgments.height)"),
}
MESSY = "prefpipe validate on the messy variant"

HISTORY = (
    "How: canonical JSONL is read in blocks of whole lines and parsed by Arrow's JSON reader with an explicit "
    "schema (split by shape where prompts/responses are strings in some rows and structured in others); lines it "
    "cannot take and rows that fail validation go the per-row path (orjson + Pydantic messages); the next block is "
    "parsed in a thread while this one is validated. Before it (per-row orjson + Python column extraction for every "
    "row, commit 0235f47, same machine, load 3.3-4.4): validate 130.6 s wall / 87.9 s CPU (7,659 judgments/s, "
    "5.31x wall and 3.49x CPU of the Polars bare parse), peak 1,080 MiB; ingest kept in memory 93.5 s (10,693/s), "
    "2,848 MiB; messy validate 137.4 s."
)

# the child reports its own peak and that of the largest process it waited for (parse workers)
PEAKS = ("\nimport resource as _r; print('PEAK_RSS_KB=%d CHILD_PEAK_RSS_KB=%d' % "
         "(_r.getrusage(_r.RUSAGE_SELF).ru_maxrss, _r.getrusage(_r.RUSAGE_CHILDREN).ru_maxrss))\n")


def run_step(code: str) -> dict[str, float]:
    """Run ``python -c code`` in a fresh process: wall s, CPU s, load before, peaks (MiB)."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + PEAKS], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"benchmark step failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = child_peak = float("nan")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("PEAK_RSS_KB="):
            a, b = line.split()
            peak, child_peak = int(a.split("=")[1]) / 1024, int(b.split("=")[1]) / 1024
            break
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "load": load, "peak": peak, "child_peak": child_peak}


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--judgments", type=int, default=1_000_000)
    ap.add_argument("--row-bytes", type=int, default=1600)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    cache = Path(tempfile.gettempdir()) / "prefpipe-bench"
    cache.mkdir(exist_ok=True)
    uniform = cache / f"uniform-v{GEN_VERSION}-{a.judgments}-{a.row_bytes}.jsonl"
    messy = cache / f"messy-v{GEN_VERSION}-{a.judgments}-{a.row_bytes}.jsonl"
    for path, uni in ((uniform, True), (messy, False)):
        if not path.exists():
            print(f"generating {path} ...", flush=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            print(generate(tmp, a.judgments, a.row_bytes, seed=0, uniform=uni))
            tmp.replace(path)
    size_mb = uniform.stat().st_size / 1e6
    results = []
    runs = list(STEPS.items()) + [(MESSY, STEPS["prefpipe validate (read+validate, streaming)"])]
    for name, code in runs:
        path = messy if name == MESSY else uniform
        ms = [run_step(code.format(path=str(path))) for _ in range(a.repeats)]
        r = {k: statistics.median(m[k] for m in ms) for k in ("wall", "cpu")}
        r.update(load=max(m["load"] for m in ms), peak=max(m["peak"] for m in ms), child_peak=max(m["child_peak"] for m in ms))
        results.append((name, r))
        print(f"{name:46s} {r['wall']:6.1f} s wall {r['cpu']:6.1f} s CPU  {a.judgments / r['wall']:9,.0f} judgments/s  "
              f"peak {r['peak']:6.0f} + {r['child_peak']:5.0f} MiB  load {r['load']:.2f}", flush=True)
    base = results[0][1]
    rows = [[n, f"{r['wall']:.1f}", f"{r['cpu']:.1f}", f"{a.judgments / r['wall']:,.0f}",
             f"{r['peak']:,.0f}" + (f" + {r['child_peak']:,.0f}" if r["child_peak"] > 1 else ""),
             f"{r['wall'] / base['wall']:.2f}x", f"{r['cpu'] / base['cpu']:.2f}x", f"{r['load']:.2f}"]
            for n, r in results]
    body = (
        f"`{' '.join(['.venv/bin/python', 'benchmarks/ingest.py', '--judgments', str(a.judgments), '--row-bytes', str(a.row_bytes)])}`"
        f" — {machine_line()}; {a.judgments:,} judgments, {size_mb:,.0f} MB of JSONL (~{a.row_bytes} B per row); "
        f"each step in a fresh process (wall time incl. imports; CPU = user + sys of the step's processes; "
        f"peak RSS of the main process + of its largest worker process, if any); median of {a.repeats}; "
        f"load = 1-minute load average when the step started (the machine is shared: compare the ratios within one run).\n\n"
        + table(["step", "wall s", "CPU s", "judgments/s", "peak RSS MiB", "wall vs polars bare parse",
                 "CPU vs polars bare parse", "load"], rows)
        + "\n\nTargets (foundation issue): validate within 1.5x of the bare parse, peak RSS <= 2 GB at 1M judgments."
        + "\n\n" + HISTORY
    )
    print("\n" + body)
    if not a.no_write:
        write_section("Ingest", body)


if __name__ == "__main__":
    main()
