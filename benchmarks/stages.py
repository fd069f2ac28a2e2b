"""Where one ``prefpipe curate`` spends its time, CPU and memory, stage by stage (issue 15; docs/scale-out.md,
"Session 29" and "Session 30").

    .venv/bin/python benchmarks/stages.py --judgments 1000000            # a generated batch (cached)
    .venv/bin/python benchmarks/stages.py --input BATCH.jsonl --env _RJEM_MALLOC_CONF=dirty_decay_ms:2000

Runs the CLI (``python -m flows.cli curate BATCH --store TMP --json``) in a fresh process with a 0.5 s sampler
beside it: the machine's busy cores (``/proc/stat``), the process's RSS and its own user and system CPU
(``/proc/PID/stat``, ``status``).  The version's laps (``lineage.timings_s`` of its manifest) cut the samples into
stages; the laps are aligned at the process's end (what follows the last lap -- the JSON printed, the exit -- is
well under a second).  Prints, per stage and per sub-stage: seconds, busy cores, idle core-seconds, the highest
RSS sampled, user and system CPU seconds; then the whole run from ``getrusage`` (wall, peak RSS, user, system,
minor page faults).  ``--samples FILE`` also writes every sample and each lap's start (``# seconds lap`` lines), to
see a lap second by second (docs/scale-out.md, "Session 35").  Linux only (``/proc``).  Rewrites the "Stages" section of docs/benchmarks.md unless
``--no-write``.  Run nothing else meanwhile: the busy cores are the machine's.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, benchmark_parser, machine_line, table, write_section  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PERIOD = 0.5


def _machine() -> tuple[int, int]:
    """(all jiffies, idle + iowait jiffies) of every core."""
    with open("/proc/stat", encoding="ascii") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def _process(pid: int) -> tuple[float, float, int]:
    """(user s, system s, RSS KiB) of ``pid``; zeros once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            rss = next((int(x.split()[1]) for x in fh if x.startswith("VmRSS:")), 0)
        return int(f[11]) / TICK, int(f[12]) / TICK, rss
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0, 0


class Sampler(threading.Thread):
    """Samples (seconds, busy cores, RSS KiB, user s, system s) every :data:`PERIOD` until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.rows, self.stop = pid, [], threading.Event()
        self.cores = os.cpu_count() or 1

    def run(self) -> None:
        t0 = time.perf_counter()
        last = _machine()
        while not self.stop.wait(PERIOD):
            now = _machine()
            total, idle = now[0] - last[0], now[1] - last[1]
            last = now
            user, system, rss = _process(self.pid)
            if rss:
                self.rows.append((time.perf_counter() - t0, self.cores * (total - idle) / max(total, 1), rss, user, system))


def _window(rows: list[tuple], a: float, b: float, cores: int) -> list[str]:
    inside = [r for r in rows if a <= r[0] < b]
    if not inside:
        return ["-"] * 5
    busy = sum(r[1] for r in inside) / len(inside)
    before = [r for r in rows if r[0] < a]
    u0, s0 = (before[-1][3], before[-1][4]) if before else (0.0, 0.0)
    return [f"{busy:.2f}", f"{(cores - busy) * (b - a):.1f}", f"{max(r[2] for r in inside) / 1024:.0f}",
            f"{inside[-1][3] - u0:.1f}", f"{inside[-1][4] - s0:.1f}"]


def stages_table(rows: list[tuple], timings: dict[str, float], end: float, cores: int) -> tuple[list[list[str]], float]:
    """One row per lap (top-level laps, then their ``stage/part`` laps indented); the idle core-seconds in all."""
    top = [(k, v) for k, v in timings.items() if "/" not in k]
    cur = end - sum(v for _, v in top)
    out: list[list[str]] = [["start-up (before the first lap)", f"{cur:.1f}", *_window(rows, 0.0, cur, cores)]]
    idle = 0.0
    for name, secs in top:
        cells = _window(rows, cur, cur + secs, cores)
        idle += float(cells[1]) if cells[1] != "-" else 0.0
        out.append([name, f"{secs:.1f}", *cells])
        sub = cur
        for k, v in timings.items():
            if k.startswith(name + "/"):
                out.append([f"&nbsp;&nbsp;{k[len(name) + 1:]}", f"{v:.1f}", *_window(rows, sub, sub + v, cores)])
                sub += v
        cur += secs
    return out, idle


def measure(batch: Path, env: dict[str, str], samples: Path | None = None) -> tuple[list[list[str]], dict[str, float], float]:
    with tempfile.TemporaryDirectory(prefix="prefpipe-stages-") as store:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "curate", str(batch), "--store", store, "--json"],
                                cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        out, err = proc.communicate()
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise SystemExit(f"curate failed ({proc.returncode}):\n{err[-3000:]}")
        result = json.loads(out)
        manifest = json.loads((Path(store) / "versions" / result["version_id"] / "manifest.json").read_text())
    # (the CLI's timings: the version's, then the publish and the work directory's removal, which follow its manifest)
    timings = {**manifest["lineage"]["timings_s"], **result.get("timings_s", {})}
    if samples is not None:  # the sampler's rows and where each lap starts, to see a lap's seconds one by one
        starts, at = [], wall - sum(v for k, v in timings.items() if "/" not in k)
        for k, v in timings.items():
            if "/" not in k:
                starts.append(f"# {at:8.1f} {k}")
                at += v
        samples.write_text("\n".join([*starts, "# seconds busy_cores rss_kib user_s system_s",
                                       *(f"{r[0]:.1f} {r[1]:.2f} {r[2]} {r[3]:.1f} {r[4]:.1f}" for r in sampler.rows)]) + "\n")
    rows, idle = stages_table(sampler.rows, timings, wall, sampler.cores)
    totals = {"wall_s": wall, "peak_kib": after.ru_maxrss, "user_s": after.ru_utime - before.ru_utime,
              "system_s": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt}
    return rows, totals, idle


def main() -> None:
    ap = benchmark_parser(__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--judgments", type=int, help="a generated batch of this many judgments (benchmarks/gen_judgments.py)")
    src.add_argument("--input", type=Path, help="an existing JSONL batch")
    ap.add_argument("--row-bytes", type=int, default=1000, help="with --judgments: ~bytes a judgment (as scale.py)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set in the curate's environment")
    ap.add_argument("--samples", type=Path, help="also write the sampler's rows (and each lap's start) to this file")
    a = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in a.env)
    if a.input is not None:
        batch = a.input
    else:
        from gen_judgments import cached_batch

        batch = cached_batch(a.judgments, a.row_bytes)
    from machine_probe import describe, probe

    before = probe()
    print(f"machine probe before: {describe(before)}", flush=True)
    rows, t, idle = measure(batch, env, a.samples)
    after = probe()
    headers = ["stage", "s", "busy cores", "idle core-s", "peak RSS MiB", "user s", "system s"]
    cpu = t["user_s"] + t["system_s"]
    body = "\n\n".join([
        f"`benchmarks/stages.py` ({machine_line()}): one `prefpipe curate {batch.name} --json` into a fresh store"
        + (f", environment {', '.join(f'`{k}={v}`' for k, v in env.items())}" if env else "")
        + ", a 0.5 s sampler beside it (docs/scale-out.md, \"Session 30\").",
        table(headers, rows),
        f"Whole run: **{t['wall_s']:.1f} s, peak {t['peak_kib']:,} kB = {t['peak_kib'] * 1024 / 1e9:.2f} GB**, "
        f"{t['user_s']:.1f} s user + {t['system_s']:.1f} s system CPU ({cpu / t['wall_s']:.2f} cores; the kernel's share "
        f"{t['system_s'] / max(cpu, 1e-9):.0%}), {t['minor_faults']:,} minor page faults; {idle:.1f} idle core-seconds in "
        f"the laps. Machine probe (`benchmarks/machine_probe.py`, lower is faster): {before['seconds']:.2f} s before, "
        f"{after['seconds']:.2f} s after.",
    ])
    print(body)
    if not a.no_write:
        write_section("Stages", body)


if __name__ == "__main__":
    main()
