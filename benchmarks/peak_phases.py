"""Where a partitioned build's memory peak is: VmRSS sampled every 50 ms through one in-process
``curate()`` of a batch, with the start and end of each piece marked (issue 15; docs/scale-out.md,
"Session 23").

    .venv/bin/python benchmarks/peak_phases.py BATCH.jsonl [--store DIR]

Prints one line per mark: seconds since start, the mark, VmRSS then, and the highest VmRSS sampled
since the previous mark (MiB).  Marks: each stage's end, each per-pair state table's write
(``_grouped_table``, ``_merged_table``), the checks' maps and reduces, select's map steps and fits, the
judgments' input-order merge.  The sampler
reads ``/proc/self/status`` (Linux).  Timings here are not benchmark figures (the sampler and the
wrappers cost a little): use ``benchmarks/scale.py`` for those.
"""
from __future__ import annotations

import argparse
import bisect
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# the CLI's jemalloc setting (flows/__init__.py), unless the caller set one: Polars reads it when it loads
os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:true,dirty_decay_ms:500,muzzy_decay_ms:0")


def _rss_mib() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) >> 10
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("batch", type=Path)
    ap.add_argument("--store", type=Path, default=None, help="a new store directory (default: a temporary one)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    marks: list[tuple[float, str, int]] = []
    samples: list[tuple[float, int]] = []

    def mark(name: str) -> None:
        marks.append((time.perf_counter() - t0, name, _rss_mib()))

    def sample() -> None:
        while True:
            samples.append((time.perf_counter() - t0, _rss_mib()))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()

    import pipeline.curate as cu
    import pipeline.partition_consensus as pc
    import pipeline.partition_select as ps
    import pipeline.partitioned_build as pb

    def wrap(mod, name: str, label=lambda a: "") -> None:
        f = getattr(mod, name)

        def marked(*a, **k):
            mark(f"{name}{label(a)} >")
            try:
                return f(*a, **k)
            finally:
                mark(f"{name}{label(a)} <")

        setattr(mod, name, marked)

    import pipeline.partition_checks as pk
    import pipeline.partitioned as pd

    wrap(cu, "_grouped_table", lambda a: f" {a[3]}")
    wrap(pb, "_merged_table", lambda a: f" {a[3]}")
    wrap(pd, "map_partitions", lambda a: f" {a[0].name}")
    for mod, name in ((ps, "map_partitions"), (pc, "fit"), (pc, "fit_dimensions"), (ps.sp, "assign_clusters"),
                      (pb, "_streamed_tables"), (pk, "near_duplicates_state"), (pk, "pair_scoped"), (pk, "check_sums"),
                      (pc, "assemble"), (pd, "annotator_params")):
        wrap(mod, name)

    from pipeline.checks import resolve_policy
    from pipeline.curate import curate
    from pipeline.store import Store
    from schemas.policy import Policy

    with tempfile.TemporaryDirectory(prefix="prefpipe-peaks-") as tmp:
        store = Store(args.store or Path(tmp) / "store")
        curate([args.batch], store, resolve_policy(Policy()), on_stage=lambda name, _s: mark(f"STAGE {name}"))
    times = [s[0] for s in samples]
    prev = 0.0
    print(f"{'s':>8} {'mark':40s} {'VmRSS':>7} {'max since prev':>15}")
    for t, name, rss in marks:
        i, j = bisect.bisect_left(times, prev), bisect.bisect_right(times, t)
        print(f"{t:8.1f} {name:40s} {rss:7,d} {max((s[1] for s in samples[i:j]), default=rss):15,d}")
        prev = t
    print(f"highest sampled VmRSS: {max((s[1] for s in samples), default=0):,d} MiB")


if __name__ == "__main__":
    main()
