"""What the parts aligned with partitions could save (issue 15; docs/scale-out.md "Next", item 2).

Today select's tasks cache each partition's pair tables as Arrow IPC states, and the driver merges them part by part
(``pipeline.partition_write._merge``: read, sha256-check and decode every partition's stream, concatenate each part's
pieces) before writing the version's Parquet parts.  Parts aligned with partitions would let each task write its parts
itself: the merge's own work and the tasks' IPC writes of the pair tables go; the Parquet writes move into the tasks.

This runs one ``prefpipe curate BATCH --json`` into a fresh store in a child process with two probes and prints:
the CPU time of the merge's driver thread (every merge of the build: the state tables' and the pair tables'), the
CPU time select's tasks spend writing the pairs' IPC states, and both as a share of the build's CPU (user + system
of the child).  An upper bound of the CPU the change saves, not a timing of it; the share of idle cores it could
fill is the stage table's (``benchmarks/stages.py``: write_pairs' idle core-seconds).

    .venv/bin/python benchmarks/merge_cost.py --input $TMPDIR/prefpipe-bench/messy-v2-3000000-1000.jsonl
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, benchmark_parser, machine_line, table, write_section  # noqa: E402


def _child(batch: str, store: str) -> None:
    """In the child: the probes, then the CLI's curate; the probes' sums on stderr's last line."""
    import threading

    import flows  # noqa: F401 - the CLI's environment defaults (allocators) before Polars loads
    from pipeline import distributed as d
    from pipeline import partition_write as pw

    acc = {"merge_driver_s": 0.0, "merge_wall_s": 0.0, "ipc_pairs_s": 0.0, "ipc_pairs_bytes": 0}
    lock = threading.Lock()
    merge, write_stream = pw._merge, d._write_stream

    def timed_merge(*a, **k):
        t, w = time.thread_time(), time.perf_counter()
        try:
            return merge(*a, **k)
        finally:  # (the driver thread's CPU: the lanes' writes run on threads of their own)
            acc["merge_driver_s"] += time.thread_time() - t
            acc["merge_wall_s"] += time.perf_counter() - w

    def timed_stream(frame, sink, compression=None):
        t = time.thread_time()
        try:
            return write_stream(frame, sink, compression)
        finally:
            if {"_part", "prompt", "first_version"} <= set(frame.columns):  # select's pairs (keyed by part)
                with lock:
                    acc["ipc_pairs_s"] += time.thread_time() - t
                    acc["ipc_pairs_bytes"] += frame.estimated_size()

    pw._merge, d._write_stream = timed_merge, timed_stream
    from flows.cli import app

    try:
        app(["curate", batch, "--store", store, "--json"], standalone_mode=False)
    finally:
        print("MERGE_COST=" + json.dumps(acc), file=sys.stderr)


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--input", required=True, type=Path, help="a batch (benchmarks/gen_judgments.py)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="prefpipe-merge-cost-") as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", str(args.input), str(Path(tmp) / "store")],
                              cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"curate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    probe = json.loads(proc.stderr.rsplit("MERGE_COST=", 1)[1].splitlines()[0])
    laps = json.loads(proc.stdout)["timings_s"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    saved = probe["merge_driver_s"] + probe["ipc_pairs_s"]
    rows = [["whole build", f"{wall:.1f}", f"{cpu:.1f}", "100 %"],
            ["merges' driver thread (read, check, decode, concatenate)", f"{probe['merge_wall_s']:.1f}",
             f"{probe['merge_driver_s']:.2f}", f"{probe['merge_driver_s'] / cpu:.1%}"],
            [f"select's tasks writing the pairs' IPC states ({probe['ipc_pairs_bytes'] / 1e9:.2f} GB)", "-",
             f"{probe['ipc_pairs_s']:.2f}", f"{probe['ipc_pairs_s'] / cpu:.1%}"],
            ["both: what aligned parts would not do", "-", f"{saved:.2f}", f"{saved / cpu:.1%}"]]
    body = (f"`benchmarks/merge_cost.py --input {args.input.name}` ({machine_line()}): one curate, CPU of the "
            f"child from `getrusage`, the probes' thread CPU (`time.thread_time`); write_pairs took "
            f"{laps.get('write_pairs', float('nan')):.1f} s, the state tables "
            f"{laps.get('partitions:select/state tables', float('nan')):.1f} s.\n\n"
            + table(["", "wall s", "CPU s", "of the build's CPU"], rows))
    print(body)
    if not args.no_write:
        write_section(f"Merge cost ({args.input.name})", body)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        main()
