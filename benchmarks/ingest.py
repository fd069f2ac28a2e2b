"""Ingest throughput and peak RSS vs a bare JSON parse of the same file, side by side.

    .venv/bin/python benchmarks/ingest.py [--judgments 1000000] [--row-bytes 1600] [--repeats 1]

Generates (once, cached under $TMPDIR/prefpipe-bench/) a uniform canonical JSONL batch that the
bare readers can parse (one row shape, no malformed lines), then runs, each in a fresh process:
Polars `read_ndjson` (bare parse), PyArrow `json.read_json` (bare parse), `prefpipe validate`'s
path (read + adapt + validate + normalise + hash, judgments discarded batch by batch), and the
`curate` path (same, judgments kept in memory). Also runs the validate path on the messy
variant (mixed shapes + malformed rows) that the bare readers reject. Prints a table and rewrites
the "Ingest" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import PEAK_SNIPPET, machine_line, run_measured, table, write_section  # noqa: E402
from gen_judgments import GEN_VERSION, generate  # noqa: E402

STEPS = {
    "bare parse: polars.read_ndjson": "import polars as pl; df = pl.read_ndjson({path!r}); print(df.height)",
    "bare parse: pyarrow.json.read_json": "import pyarrow.json as pj; t = pj.read_json({path!r}); print(t.num_rows)",
    "prefpipe validate (read+validate, streaming)": (
        "from pipeline.ingest import ingest_files; r = ingest_files([{path!r}], keep_judgments=False); print(r.ledger.rows_valid)"),
    "prefpipe ingest (judgments kept in memory)": (
        "from pipeline.ingest import ingest_files; r = ingest_files([{path!r}]); print(r.judgments.height)"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judgments", type=int, default=1_000_000)
    ap.add_argument("--row-bytes", type=int, default=1600)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    a = ap.parse_args()
    cache = Path(tempfile.gettempdir()) / "prefpipe-bench"
    cache.mkdir(exist_ok=True)
    uniform = cache / f"uniform-v{GEN_VERSION}-{a.judgments}-{a.row_bytes}.jsonl"
    messy = cache / f"messy-v{GEN_VERSION}-{a.judgments}-{a.row_bytes}.jsonl"
    for path, uni in ((uniform, True), (messy, False)):
        if not path.exists():
            print(f"generating {path} ...", flush=True)
            tmp = path.with_suffix(".tmp")
            print(generate(tmp, a.judgments, a.row_bytes, seed=0, uniform=uni))
            tmp.replace(path)
    size_mb = uniform.stat().st_size / 1e6
    results = []
    runs = list(STEPS.items()) + [("prefpipe validate on the messy variant", STEPS["prefpipe validate (read+validate, streaming)"])]
    for name, code in runs:
        path = messy if "messy" in name else uniform
        walls, peaks = [], []
        for _ in range(a.repeats):
            wall, peak, _ = run_measured(code.format(path=str(path)) + PEAK_SNIPPET)
            walls.append(wall)
            peaks.append(peak)
        results.append((name, statistics.median(walls), max(peaks)))
        print(f"{name:50s} {statistics.median(walls):7.1f} s  {a.judgments / statistics.median(walls):9,.0f} judgments/s  peak {max(peaks):7.0f} MiB", flush=True)
    base = results[0][1]
    rows = [[n, f"{w:.1f}", f"{a.judgments / w:,.0f}", f"{p:,.0f}", f"{w / base:.2f}x"] for n, w, p in results]
    body = (
        f"`{' '.join(['.venv/bin/python', 'benchmarks/ingest.py', '--judgments', str(a.judgments), '--row-bytes', str(a.row_bytes)])}`"
        f" — {machine_line()}; {a.judgments:,} judgments, {size_mb:,.0f} MB of JSONL (~{a.row_bytes} B per row); "
        f"each step in a fresh process (wall time incl. imports; peak RSS of the whole process); median of {a.repeats}.\n\n"
        + table(["step", "seconds", "judgments/s", "peak RSS MiB", "time vs polars bare parse"], rows)
        + "\n\nTargets (foundation issue): validate within 1.5x of the bare parse, peak RSS <= 2 GB at 1M judgments."
    )
    print("\n" + body)
    if not a.no_write:
        write_section("Ingest", body)


if __name__ == "__main__":
    main()
