"""`prefpipe curate` time and peak memory against input size (issue 15's baseline and goal).

    .venv/bin/python benchmarks/scale.py [--sizes 100000 300000 1000000 [3000000 ...]] [--row-bytes 1000]

For each size: the generated batch (``benchmarks/gen_judgments.py`` ``cached_batch``, files under
$TMPDIR/prefpipe-bench/), then one fresh ``prefpipe curate BATCH --one-process --store NEW --json`` process (the reference build)
and one of the default, partitioned build.
Measured from outside: wall clock; CPU (user + sys) from the child's rusage (``os.wait4``);
peak RSS from the child's own ``/proc/self/status`` VmHWM, printed by a tiny launcher at exit --
not ``ru_maxrss``, which Linux carries over from the forking parent across ``exec`` (so a child
of a big parent would report the parent's peak); the 1-minute load average before and after
(the machine is shared: other jobs' load shows up in wall time, less in CPU time).

Prints a table, writes the "Scale" section of docs/benchmarks.md and a plot of wall time and
peak RSS against judgments (``docs/scale.png``; Pillow, which the lock already carries -- there is
no matplotlib).  Then the partitioned building blocks of issue 15 on the same batches (``--no-partitioned``
skips them): partitioning (ingest into hash partitions), a pair-scoped step per partition in process
and on a 2-process Dask ``LocalCluster``.  ``--from-issue N:WALL:PEAK_GB`` adds a row quoted from issue 15 (marked so)
for a size not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, benchmark_parser, machine_line, table, write_section  # noqa: E402
from gen_judgments import cached_batch  # noqa: E402

PLOT = ROOT / "docs" / "scale.png"

# runs the CLI in this process and prints its own peak resident set (VmHWM) to stderr at exit
LAUNCHER = (
    "import atexit, runpy, sys\n"
    "def _hwm():\n"
    "    for ln in open('/proc/self/status'):\n"
    "        if ln.startswith('VmHWM:'): return int(ln.split()[1])\n"
    "atexit.register(lambda: print('PEAK_RSS_KB', _hwm(), file=sys.stderr, flush=True))\n"
    "sys.argv = ['prefpipe', *sys.argv[1:]]\n"
    "runpy.run_module('flows.cli', run_name='__main__')\n"
)


@dataclass
class Row:
    judgments: int
    input_mb: float
    wall: float
    cpu: float
    peak_mib: float
    load_before: float
    load_after: float
    pairs: int | None = None
    timings: dict[str, float] | None = None
    source: str = "measured"


def run_child(code: str, args: list[str], cwd: Path = ROOT) -> tuple[float, float, float, str, tuple[float, float]]:
    """(wall s, CPU s, peak RSS MiB from the child's VmHWM, stdout, load before/after) of ``python -c code ARGS``
    (run in ``cwd``: the code of the tree it imports from)."""
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err, text=True, cwd=cwd,
                                env=os.environ.copy())
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{args} failed:\n{stderr[-3000:]}")
    peaks = [int(ln.split()[1]) for ln in stderr.splitlines() if ln.startswith("PEAK_RSS_KB")]
    if not peaks:
        raise RuntimeError(f"{args}: the launcher printed no VmHWM:\n{stderr[-2000:]}")
    return wall, ru.ru_utime + ru.ru_stime, peaks[-1] / 1024, stdout, (load0, os.getloadavg()[0])


def run_curate(batch: Path, extra: tuple[str, ...] = (), cwd: Path = ROOT) -> tuple[float, float, float, dict, tuple[float, float]]:
    """(wall s, CPU s, peak RSS MiB, the --json output, load before/after) of one curate (by the code in ``cwd``)."""
    store = Path(tempfile.mkdtemp(prefix="pp-scale-"))
    try:
        wall, cpu, peak, stdout, loads = run_child(LAUNCHER, ["curate", str(batch), "--store", str(store), "--json", *extra],
                                                   cwd=cwd)
        return wall, cpu, peak, json.loads(stdout), loads  # (--json: one JSON document)
    finally:
        shutil.rmtree(store, ignore_errors=True)


_HWM = ("import atexit, json, sys, time\n"
        "def _hwm():\n"
        "    for ln in open('/proc/self/status'):\n"
        "        if ln.startswith('VmHWM:'): return int(ln.split()[1])\n"
        "atexit.register(lambda: print('PEAK_RSS_KB', _hwm(), file=sys.stderr, flush=True))\n")
# partition a batch (ingest -> partitions) in a fresh process
PARTITION = _HWM + (
    "from pipeline.partition import partition_files\n"
    "t0 = time.perf_counter()\n"
    "ps = partition_files([sys.argv[1]], sys.argv[2], partition_rows=int(sys.argv[3]))\n"
    "print(json.dumps({'n': ps.n_partitions, 'judgments': ps.ledger.judgments, 'seconds': time.perf_counter() - t0,\n"
    "                  'bytes': sum(p.bytes for p in ps.partitions)}))\n")
# the partition_stats step over a partition set: each partition timed in process, then the reduce
STATS_LOCAL = _HWM + (
    "from pipeline import partition_stats\n"
    "from pipeline.distributed import encode_state, refs_of\n"
    "from pipeline.partition import PartitionSet\n"
    "ps = PartitionSet.load(sys.argv[1])\n"
    "states, secs, size = [], [], 0\n"
    "for ref in refs_of(ps):\n"
    "    t0 = time.perf_counter(); st = partition_stats.run(list(ref.paths)); secs.append(time.perf_counter() - t0)\n"
    "    size += sum(len(b) for b in encode_state(st).values()); states.append(st)\n"
    "t0 = time.perf_counter(); partition_stats.reduce(states); red = time.perf_counter() - t0\n"
    "print(json.dumps({'task_s': secs, 'reduce_s': red, 'state_bytes': size}))\n")
# today's pair-scoped stages on each partition alone (what a partitioned curate will run per
# partition): preliminary aggregation, duplicates, pair-id conflicts, language; seconds per stage
STAGES = _HWM + (
    "from pipeline import aggregate as agg\n"
    "from pipeline.checks import duplicates, language, pair_id_conflict\n"
    "from pipeline.distributed import refs_of\n"
    "from pipeline.partition import PartitionSet, read_partition\n"
    "from schemas.policy import Policy\n"
    "pol = Policy()\n"
    "ps = PartitionSet.load(sys.argv[1])\n"
    "out = []\n"
    "for ref in refs_of(ps):\n"
    "    row = {}\n"
    "    t = time.perf_counter(); j = read_partition(list(ref.paths)); row['read'] = time.perf_counter() - t\n"
    "    t = time.perf_counter(); agg.aggregate(j, pol.checks.aggregation, dimensions=pol.dimensions); row['aggregate'] = time.perf_counter() - t\n"
    "    for name, mod in (('duplicates', duplicates), ('pair_id_conflict', pair_id_conflict), ('language', language)):\n"
    "        t = time.perf_counter(); mod.run(j, pol.checks); row[name] = time.perf_counter() - t\n"
    "    out.append(row); del j\n"
    "print(json.dumps(out))\n")
# the same step on a 2-process LocalCluster: wall incl. cluster start, the workers' VmHWM
STATS_DASK = _HWM + (
    "import shutil, tempfile\n"
    "from pipeline import partition_stats\n"
    "from pipeline.distributed import open_runner, refs_of, run_step\n"
    "from pipeline.partition import PartitionSet\n"
    "ps = PartitionSet.load(sys.argv[1])\n"
    "t0 = time.perf_counter()\n"
    "with open_runner('local') as client:\n"
    "    t1 = time.perf_counter()\n"
    "    cache = tempfile.mkdtemp(prefix='pp-scale-cache-')\n"
    "    run_step(partition_stats.STEP, refs_of(ps), cache, client=client)\n"
    "    t2 = time.perf_counter()\n"
    "    hwm = client.run(_hwm)\n"
    "shutil.rmtree(cache, ignore_errors=True)\n"
    "print(json.dumps({'start_s': t1 - t0, 'map_reduce_s': t2 - t1, 'worker_peak_kb': max(hwm.values())}))\n")


@dataclass
class PartRow:
    judgments: int
    n: int
    partition_rows: int
    part_wall: float
    part_cpu: float
    part_peak: float
    part_bytes: int
    task_s: list[float]
    reduce_s: float
    state_bytes: int
    stats_peak: float
    dask_start: float
    dask_map: float
    dask_driver_peak: float
    dask_worker_peak: float
    load: tuple[float, float]
    stages: list[dict[str, float]] | None = None
    stages_peak: float = float("nan")


def run_partitioned(batch: Path, n: int, partition_rows: int) -> PartRow:
    out = Path(tempfile.mkdtemp(prefix="pp-scale-parts-")) / "set"
    try:
        pw, pc, pp, so, l0 = run_child(PARTITION, [str(batch), str(out), str(partition_rows)])
        part = json.loads(so)
        _, _, sp, so, _ = run_child(STATS_LOCAL, [str(out)])
        local = json.loads(so)
        _, _, dp, so, l1 = run_child(STATS_DASK, [str(out)])
        dask = json.loads(so)
        _, _, stp, so, _ = run_child(STAGES, [str(out)])
        stages = json.loads(so)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return PartRow(n, part["n"], partition_rows, pw, pc, pp, part["bytes"], local["task_s"], local["reduce_s"],
                   local["state_bytes"], sp, dask["start_s"], dask["map_reduce_s"], dp, dask["worker_peak_kb"] / 1024,
                   (l0[0], l1[1]), stages, stp)


def plot(rows: list[Row], path: Path, partitioned: list[Row] | None = None) -> None:
    """Two panels (wall s, peak RSS GB) against judgments: the one-process build (quoted rows drawn
    hollow) and, in green, the partitioned build (``partitioned``)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, pad_l, pad_r, pad_t, pad_b = 520, 396, 70, 20, 40, 71
    img = Image.new("RGB", (2 * W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    partitioned = partitioned or []
    xs = [r.judgments / 1e6 for r in rows]
    pxs = [r.judgments / 1e6 for r in partitioned]
    panels = [("curate wall time (s)", [r.wall for r in rows], [r.wall for r in partitioned], "#2563eb"),
              ("peak RSS (GB, VmHWM)", [r.peak_mib * 2**20 / 1e9 for r in rows], [r.peak_mib * 2**20 / 1e9 for r in partitioned],
               "#dc2626")]
    x_max = max(xs + pxs) * 1.05
    for k, (title, ys, pys, colour) in enumerate(panels):
        ox = k * W
        pw, ph = W - pad_l - pad_r, H - pad_t - pad_b
        y_max = max(ys + pys) * 1.15
        sx = lambda v: ox + pad_l + pw * v / x_max  # noqa: E731
        sy = lambda v: pad_t + ph - ph * v / y_max  # noqa: E731
        d.text((ox + pad_l, 10), title, fill="#0f172a", font=font)
        for i in range(6):  # grid and ticks
            yv, xv = y_max * i / 5, x_max * i / 5
            d.line([(ox + pad_l, sy(yv)), (ox + pad_l + pw, sy(yv))], fill="#e2e8f0")
            d.text((ox + pad_l - 8, sy(yv)), f"{yv:.3g}", fill="#475569", font=small, anchor="rm")
            d.text((sx(xv), pad_t + ph + 8), f"{xv:.2g}", fill="#475569", font=small, anchor="mt")
        d.rectangle([ox + pad_l, pad_t, ox + pad_l + pw, pad_t + ph], outline="#94a3b8")
        d.text((ox + pad_l + pw / 2, H - 34), "judgments (millions)", fill="#334155", font=small, anchor="mm")
        pts = [(sx(x), sy(y)) for x, y in zip(xs, ys, strict=True)]
        d.line(pts, fill=colour, width=2)
        for (px, py), r, y in zip(pts, rows, ys, strict=True):
            box = [px - 5, py - 5, px + 5, py + 5]
            d.ellipse(box, outline=colour, width=2, fill="white" if r.source != "measured" else colour)
            d.text((px + 8, py - 8), f"{y:.3g}" + ("*" if r.source != "measured" else ""), fill=colour, font=small, anchor="ls")
        if partitioned:
            green = "#16a34a"
            ppts = [(sx(x), sy(y)) for x, y in zip(pxs, pys, strict=True)]
            if len(ppts) > 1:
                d.line(ppts, fill=green, width=2)
            for (px, py), y in zip(ppts, pys, strict=True):
                d.rectangle([px - 4, py - 4, px + 4, py + 4], fill=green)
                d.text((px - 8, py - 8), f"{y:.3g}", fill=green, font=small, anchor="rs")
    d.text((W * 2 - 10, H - 8), "hollow, *: quoted from issue 15" + ("; green squares: the partitioned build (the default "
           "curate), the others the one-process reference" if partitioned else ""), fill="#64748b", font=small, anchor="rb")
    tmp = path.with_suffix(".png.tmp")
    img.save(tmp, format="PNG", optimize=True)
    tmp.replace(path)


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--row-bytes", type=int, default=1000)
    ap.add_argument("--from-issue", action="append", default=[], metavar="N:WALL:PEAK_GB",
                    help="a row quoted from issue 15 (not measured here), e.g. 3000000:84:6.8")
    ap.add_argument("--partition-rows", type=int, default=250_000, help="target judgments per partition (partitioned part)")
    ap.add_argument("--no-partitioned", action="store_true", help="skip the partitioned building blocks")
    ap.add_argument("--no-partitioned-build", action="store_true", help="skip the partitioned `curate` (the default build) next to each one-process one")
    ap.add_argument("--one-process-max", type=int, default=3_000_000,
                    help="sizes above it get the partitioned build only (the one-process build holds ~2.3 GB per million "
                         "judgments: 10M does not fit a 24 GB machine)")
    a = ap.parse_args()
    from machine_probe import describe, probe

    before = probe()
    print(f"machine probe before: {describe(before)}", flush=True)
    rows: list[Row] = []
    builds: list[tuple[Row | None, Row]] = []  # (--one-process or None, partitioned) of the same batch, one after the other
    for n in sorted(a.sizes):
        batch = cached_batch(n, a.row_bytes)
        one: Row | None = None
        if n <= a.one_process_max:
            wall, cpu, peak, data, (l0, l1) = run_curate(batch, ("--one-process",))
            one = Row(n, batch.stat().st_size / 1e6, wall, cpu, peak, l0, l1, data["ledger"].get("pairs"), data.get("timings_s"))
            rows.append(one)
            print(f"{n:>10,} judgments: {wall:6.1f} s wall, {cpu:6.1f} s CPU, peak {peak:,.0f} MiB, load {l0:.2f}-{l1:.2f}", flush=True)
        if not a.no_partitioned_build:
            wall, cpu, peak, data, (l0, l1) = run_curate(batch, ("--partition-rows", str(a.partition_rows)))
            builds.append((one, Row(n, batch.stat().st_size / 1e6, wall, cpu, peak, l0, l1, data["ledger"].get("pairs"),
                                    data.get("timings_s"))))
            print(f"{n:>10,} judgments, partitioned: {wall:6.1f} s wall, {cpu:6.1f} s CPU, peak {peak:,.0f} MiB", flush=True)
    after = probe()
    print(f"machine probe after: {describe(after)}", flush=True)
    for spec in a.from_issue:
        n, wall, peak_gb = spec.split(":")
        rows.append(Row(int(n), float("nan"), float(wall), float("nan"), float(peak_gb) * 1e9 / 2**20, float("nan"), float("nan"),
                        source="from the issue"))
    rows.sort(key=lambda r: r.judgments)

    def cell(v: float, fmt: str) -> str:
        return "-" if v != v else format(v, fmt)

    measured = [r for r in rows if r.source == "measured"]
    slope = ""
    if len(measured) >= 2:
        lo, hi = measured[0], measured[-1]
        per_m = (hi.peak_mib - lo.peak_mib) / ((hi.judgments - lo.judgments) / 1e6)
        per_m_s = (hi.wall - lo.wall) / ((hi.judgments - lo.judgments) / 1e6)
        slope = (f"Between {lo.judgments:,} and {hi.judgments:,} judgments the peak grows by {per_m:,.0f} MiB "
                 f"({per_m * 2**20 / 1e9:.2f} GB) and the wall time by {per_m_s:.1f} s per million judgments (the one-process "
                 "reference build holds the whole frame; the partitioned build is bounded by the partition size).")
    body = (
        f"`.venv/bin/python benchmarks/scale.py --sizes {' '.join(str(s) for s in a.sizes)} --row-bytes {a.row_bytes}"
        f"{' --no-partitioned' if a.no_partitioned else ''}"
        f"{f' --one-process-max {a.one_process_max}' if a.one_process_max != 3_000_000 else ''}` — "
        f"{machine_line()}; each size one fresh `prefpipe curate BATCH --one-process --store NEW --json` process (the one-process reference build) on a "
        "`benchmarks/gen_judgments.py` batch (~1 KB a judgment). Wall clock from outside; CPU = user + sys of the "
        "child (wait4); peak RSS = the child's own VmHWM (`/proc/self/status`, printed at exit by a launcher; "
        "`ru_maxrss` would carry the parent's peak over across exec); load = 1-minute load average before/after "
        "(shared 2-core machine: other jobs' load inflates wall time, less CPU time). "
        f"Machine probe (`benchmarks/machine_probe.py`, lower is faster): {before['seconds']:.2f} s before the runs, "
        f"{after['seconds']:.2f} s after.\n\n"
        + table(["judgments", "input MB", "pairs", "wall s", "CPU s", "judgments/s", "peak RSS MiB", "peak GB", "load", "source"], [
            [f"{r.judgments:,}", cell(r.input_mb, ",.0f"), f"{r.pairs:,}" if r.pairs else "-", f"{r.wall:.1f}", cell(r.cpu, ".1f"),
             f"{r.judgments / r.wall:,.0f}", f"{r.peak_mib:,.0f}", f"{r.peak_mib * 2**20 / 1e9:.2f}",
             f"{r.load_before:.2f}-{r.load_after:.2f}" if r.load_before == r.load_before else "-", r.source] for r in rows])
        + "\n\n" + slope
        + "\n\nGoal (issue 15): 10M judgments ≤ 4 GB peak and ≥ 25k judgments/s end to end; 1M ≤ 1.5 GB; memory flat in "
        "input size beyond the partition size. Rows marked \"from the issue\" are quoted, not measured in this run. "
        "The partitioned build's figures (the default `curate`) are in the next table and the plot's green squares.\n\n"
        f"![curate wall time and peak RSS against judgments]({PLOT.name})"
    )
    if measured and measured[-1].timings:
        top = sorted(measured[-1].timings.items(), key=lambda kv: -kv[1])[:8]
        body += (f"\n\nLargest stages at {measured[-1].judgments:,} judgments (`timings_s`): "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in top) + ".")
    if builds:
        body += (
            "\n\n### The partitioned build (`curate`, issue 15) and the one-process reference (`curate --one-process`)\n\n"
            f"The same batches, each also curated with `--partition-rows {a.partition_rows}` (the default build) right after the "
            "one-process reference build (fresh process each; every task in the curating process -- no cluster -- one partition "
            "after another, two at a time from 32 partitions on). Ratios: partitioned / one process.\n\n"
            + table(["judgments", "partitions", "one process s", "partitioned s", "time ratio", "one process peak MiB",
                     "partitioned peak MiB", "partitioned peak GB", "peak ratio", "partitioned CPU s", "partitioned judgments/s"],
                    [[f"{q.judgments:,}", str(_partitions(q.judgments, a)), f"{o.wall:.1f}" if o else "not run",
                      f"{q.wall:.1f}", f"{q.wall / o.wall:.2f}" if o else "-", f"{o.peak_mib:,.0f}" if o else "not run",
                      f"{q.peak_mib:,.0f}", f"{q.peak_mib * 2**20 / 1e9:.2f}", f"{q.peak_mib / o.peak_mib:.2f}" if o else "-",
                      f"{q.cpu:.1f}", f"{q.judgments / q.wall:,.0f}"] for o, q in builds])
            + (f"\n\nSizes above {a.one_process_max:,} judgments: the partitioned build only (the one-process reference holds "
               "the whole frame, ~2.3 GB per million judgments)." if any(o is None for o, _ in builds) else "")
            + "\n\nLargest stages of the partitioned build at " + f"{builds[-1][1].judgments:,} judgments: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in sorted((builds[-1][1].timings or {}).items(), key=lambda kv: -kv[1])[:8]) + ".")
    if not a.no_partitioned:
        body += "\n\n" + partitioned_section(a)
    print(body)
    if not a.no_write:
        plot(rows, PLOT, [q for _, q in builds])
        write_section("Scale", body)


def _partitions(n: int, a: argparse.Namespace) -> int:
    from pipeline.partition import estimate_rows, partition_count

    return partition_count(estimate_rows([cached_batch(n, a.row_bytes)]), a.partition_rows)


def partitioned_section(a: argparse.Namespace) -> str:
    prs = []
    for n in sorted(a.sizes):
        pr = run_partitioned(cached_batch(n, a.row_bytes), n, a.partition_rows)
        prs.append(pr)
        print(f"partitioned {n:,}: {pr.n} partitions, partition {pr.part_wall:.1f} s / {pr.part_peak:,.0f} MiB, "
              f"tasks {sum(pr.task_s):.1f} s, dask {pr.dask_map:.1f} s (+{pr.dask_start:.1f} s start)", flush=True)
    rows = []
    for pr in prs:
        per = sum(pr.task_s) / pr.n
        rows.append([f"{pr.judgments:,}", f"{pr.n} x {pr.judgments // pr.n:,}", f"{pr.part_wall:.1f}", f"{pr.part_cpu:.1f}",
                     f"{pr.part_peak:,.0f}", f"{pr.part_bytes / 1e6:,.0f}",
                     f"{per:.2f} ({min(pr.task_s):.2f} - {max(pr.task_s):.2f})", f"{per / (pr.judgments / pr.n) * 1e6:.2f}",
                     f"{pr.state_bytes / 1e6:.2f}", f"{pr.reduce_s:.3f}", f"{pr.stats_peak:,.0f}",
                     f"{pr.dask_map:.1f} (+{pr.dask_start:.1f})", f"{pr.dask_driver_peak:,.0f} / {pr.dask_worker_peak:,.0f}",
                     f"{pr.load[0]:.2f}-{pr.load[1]:.2f}"])
    return (
        "### Partitioned building blocks (issue 15, not yet wired into curate)\n\n"
        f"Same batches. **partition**: `pipeline.partition.partition_files` (ingest straight into hash partitions by "
        f"content key, `partition_rows={a.partition_rows:,}`, default `flush_rows`), a fresh process (wall, CPU, VmHWM). "
        "**step**: `pipeline.partition_stats` (exact-duplicate groups, identical responses, per-annotator first-shown / longer-chosen / "
        "order-consistency sums, given-id keys, agreement count profiles) on each partition in one fresh process, each task timed alone (mean, min - max), the states' "
        "Arrow IPC size, the reduce, that process's VmHWM. **dask**: the same step through `pipeline.distributed` on a "
        "2-process `LocalCluster` (map + reduce wall; cluster start-up in brackets; VmHWM of the driver / the largest "
        "worker).\n\n"
        + table(["judgments", "partitions", "partition wall s", "partition CPU s", "partition peak MiB", "partition files MB",
                 "step per partition s", "step µs per judgment", "states MB", "reduce s", "step peak MiB",
                 "dask map+reduce s", "dask driver / worker peak MiB", "load"], rows)
        + "\n\nThe step is a fraction of what a partitioned curate will run per partition; its cost here is the read "
        "of a partition's narrow columns, the duplicate grouping, the annotator sums and the agreement profiles (one encode). Today's pair-scoped stages run on each partition "
        "alone (fresh process; read = the whole partition, all columns; aggregate = the preliminary consensus with the "
        "default policy, whose annotator model then sees only the partition; the language check spends its langdetect "
        "budget per call), seconds per partition, mean over partitions:\n\n"
        + stages_table(prs))


def stages_table(prs: list[PartRow]) -> str:
    names = list(prs[-1].stages[0]) if prs and prs[-1].stages else []
    rows = []
    for pr in prs:
        mean = {k: sum(r[k] for r in pr.stages) / len(pr.stages) for k in names}
        total = sum(mean.values())
        rows.append([f"{pr.judgments:,}", f"{pr.n} x {pr.judgments // pr.n:,}"] + [f"{mean[k]:.2f}" for k in names]
                    + [f"{total:.2f}", f"{total / (pr.judgments / pr.n) * 1e6:.1f}", f"{pr.stages_peak:,.0f}"])
    return table(["judgments", "partitions"] + names + ["sum s", "µs per judgment", "peak MiB"], rows)


if __name__ == "__main__":
    main()
