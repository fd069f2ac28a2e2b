"""How fast this machine is right now: a fixed workload of the kinds a build spends its time on, timed in a fresh
process (docs/benchmarks.md, "Machine probe").

    .venv/bin/python benchmarks/machine_probe.py            # prints the probe's seconds (median of 3) and its parts
    .venv/bin/python benchmarks/machine_probe.py --runs 5

The machines here are virtual and share their host: the same 10M-judgment build took 397.9 s one morning and
641.1 s that afternoon (docs/benchmarks.md, "Session 46"), the same code, user CPU 529 -> 838 s.  A timing is only
comparable with another taken at the same probe figure; ``benchmarks/stages.py`` and ``benchmarks/scale.py`` print
the probe before and after their runs.  The workload (~5.5 s on an afternoon of session 46, 2 cores): sha256 of 256 MB (the store's
checksums), NumPy weighted bincounts and an argsort over 10M rows (one core) (the consensus EM, the near-duplicate index),
and Polars over 2M rows of ~600-byte texts (both cores) -- hash, sort, group-by, a zstd-1 Parquet write into memory -- (the
partition tasks and the pair tables), and 2 GiB of fresh memory filled (a build's page faults: ~22 % of its CPU,
the kernel's, and on these virtual machines the host's).  Its data come from a seeded generator: the same work every run.  The figure
is a lower-is-faster number of seconds, not a ratio to a reference machine.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from _report import ROOT

PARTS = ("sha256", "numpy", "polars", "memory")


def workload() -> dict[str, float]:
    """The workload's parts, seconds each (in this process: call it in a fresh one, :func:`probe`)."""
    import hashlib
    import io

    import numpy as np
    import polars as pl

    rng = np.random.default_rng(46)
    secs: dict[str, float] = {}
    blob = rng.integers(0, 256, 256 << 20, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    hashlib.sha256(blob).hexdigest()
    secs["sha256"] = time.perf_counter() - t
    del blob
    idx = rng.integers(0, 3_000_000, 10_000_000)
    w = rng.random(10_000_000)
    t = time.perf_counter()
    for _ in range(2):
        np.bincount(idx, weights=w, minlength=3_000_000)
    np.argsort(idx, kind="stable")
    secs["numpy"] = time.perf_counter() - t
    del idx, w
    words = np.array([f"w{i:05d}" for i in range(20_000)])
    n = 2_000_000
    text = pl.Series("text", [" ".join(words[rng.integers(0, len(words), 100)]) for _ in range(2_000)])
    t = time.perf_counter()
    frame = pl.DataFrame({"key": rng.integers(0, 200_000, n), "text": text.sample(n, with_replacement=True, seed=46),
                          "x": rng.random(n)})
    frame = frame.with_columns(h=pl.col("text").hash(7)).sort("key", "h")
    frame.group_by("key").agg(pl.col("x").sum(), pl.col("text").first())
    frame.write_parquet(io.BytesIO(), compression="zstd", compression_level=1)
    secs["polars"] = time.perf_counter() - t
    del frame, text
    t = time.perf_counter()
    for _ in range(2):  # fresh pages: the kernel's (and the host's) share of a build, its page faults
        block = np.empty(1 << 27)
        block.fill(1.0)
        del block
    secs["memory"] = time.perf_counter() - t
    return secs


def probe(runs: int = 3) -> dict[str, float]:
    """The workload ``runs`` times, each in a fresh interpreter: ``seconds`` (the median of the runs' totals), ``min``,
    ``max`` and each part's median."""
    code = "import sys, json; sys.path.insert(0, 'benchmarks'); import machine_probe as m; print(json.dumps(m.workload()))"
    got = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"machine probe failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        got.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    totals = [sum(g.values()) for g in got]
    return {"seconds": statistics.median(totals), "min": min(totals), "max": max(totals),
            **{p: statistics.median(g[p] for g in got) for p in PARTS}}


def describe(p: dict[str, float]) -> str:
    """One line for a benchmark's output."""
    return (f"{p['seconds']:.2f} s (runs {p['min']:.2f}-{p['max']:.2f}; "
            + ", ".join(f"{k} {p[k]:.2f}" for k in PARTS) + ")")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="fresh processes to time (the median is the figure)")
    a = ap.parse_args()
    print(f"machine probe: {describe(probe(a.runs))}")


if __name__ == "__main__":
    main()
