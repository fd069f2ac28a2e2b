"""End-to-end `prefpipe curate` on 1M judgments (~1 KB each) and the fixed cost of one call.

    .venv/bin/python benchmarks/curate.py [--judgments 1000000] [--row-bytes 1000] [--repeats 3]

1. Throughput: `prefpipe curate BIG.jsonl --store TMP --json` in a fresh process; wall time,
   judgments/s, peak RSS (GNU time style, from the child's rusage) and the per-stage breakdown
   that curate records in the manifest (`lineage.timings_s`).
2. Fixed cost: `prefpipe curate` on a 12-judgment batch into a fresh store, median of N runs
   (the CLI runs the pipeline in-process; it does not start Prefect).
Writes the "Curate" section of docs/benchmarks.md. Targets: >= 25k judgments/s, <= 3 GB, fixed cost <= 5 s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_line, table, write_section  # noqa: E402
from gen_judgments import GEN_VERSION, cached_batch, generate  # noqa: E402

CLI = [sys.executable, "-m", "flows.cli"]


def run_cli(args: list[str]) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB of the child, stdout)."""
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(CLI + args, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
    return wall, peak, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judgments", type=int, default=1_000_000)
    ap.add_argument("--row-bytes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    big = cached_batch(a.judgments, a.row_bytes)
    cache = big.parent
    tiny = cache / f"tiny-v{GEN_VERSION}-12.jsonl"
    generate(tiny, 12, 600, seed=1, uniform=True)

    # fixed cost first (small, before the big run fills the page cache)
    fixed = []
    for _ in range(a.repeats):
        store = Path(tempfile.mkdtemp(prefix="pp-fixed-"))
        wall, _, _ = run_cli(["curate", str(tiny), "--store", str(store), "--json"])
        fixed.append(wall)
        shutil.rmtree(store, ignore_errors=True)
    store = Path(tempfile.mkdtemp(prefix="pp-big-"))
    wall, peak, out = run_cli(["curate", str(big), "--store", str(store), "--json"])
    data = json.loads(out[: out.rstrip().rfind("\n")] if out.count("\n") > 1 else out)
    timings = data["timings_s"]
    shutil.rmtree(store, ignore_errors=True)
    n = a.judgments
    rows = [[k, f"{v:.1f}", f"{v / wall:.0%}"] for k, v in timings.items()]
    other = wall - sum(timings.values())
    rows.append(["process start-up, imports, CLI output", f"{other:.1f}", f"{other / wall:.0%}"])
    body = (
        f"`.venv/bin/python benchmarks/curate.py --judgments {n} --row-bytes {a.row_bytes}` — {machine_line()}; "
        f"{big.stat().st_size / 1e6:,.0f} MB JSONL, {data['ledger']['pairs']:,} pairs.\n\n"
        + table(["", "value"], [["wall time", f"{wall:.1f} s"], ["throughput", f"{n / wall:,.0f} judgments/s"],
                               ["peak RSS", f"{peak:,.0f} MiB"],
                               ["fixed cost, 12-judgment batch (median of %d)" % a.repeats, f"{statistics.median(fixed):.2f} s"]])
        + "\n\nPer-stage breakdown (from the manifest's `lineage.timings_s`):\n\n" + table(["stage", "seconds", "share"], rows)
        + "\n\nTargets (curate issue): >= 25k judgments/s, <= 3 GB peak RSS, fixed cost <= 5 s. The CLI runs the pipeline "
        "in-process and never pays Prefect's server start-up; flows (`./dev demo`, `prefpipe serve`) use Prefect."
    )
    print(body)
    if not a.no_write:
        write_section("Curate", body)


if __name__ == "__main__":
    main()
