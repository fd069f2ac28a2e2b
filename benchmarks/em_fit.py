"""The consensus EM (`pipeline.position_ds.fit`) alone, on synthetic panels, against the same
function at an earlier commit (`--base`, default 936f483: before its per-judgment temporaries
went), side by side in fresh processes: wall, user and system seconds, peak RSS, and whether
the two give the same arrays bit for bit.

Why it matters: the partitioned build fits the EM on the driver twice (preliminary and final);
above glibc's mmap threshold (4 MiB, `pipeline/memory.py`) every temporary array is a fresh
mapping the kernel zeroes, so at 10M judgments the fit's system time was almost its user time.

    .venv/bin/python benchmarks/em_fit.py                    # 1M, 3M, 10M judgments
    .venv/bin/python benchmarks/em_fit.py --sizes 1000000 --no-write
"""
from __future__ import annotations

import json
import subprocess
import sys

from _report import ROOT, benchmark_parser, machine_line, run_measured, table, write_section

CHILD = r"""
import hashlib, importlib.util, json, resource, subprocess, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from pipeline import memory
memory.bound_heap()  # (as every partitioned build's process)
if {base!r}:
    src = subprocess.run(["git", "show", {base!r} + ":pipeline/position_ds.py"], cwd={root!r}, check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("pds_base", loader=None)
    pds = importlib.util.module_from_spec(spec); sys.modules["pds_base"] = pds
    exec(compile(src, "position_ds@base", "exec"), pds.__dict__)
else:
    from pipeline import position_ds as pds
n = {n}; rng = np.random.default_rng(0); n_pairs, n_judges = n // 3, 1000
pair = np.sort(rng.integers(0, n_pairs, n)); judge = rng.integers(0, n_judges, n)
_, unit = np.unique(pair * n_judges + judge, return_inverse=True)
gold = None
args = dict(pair=pair, judge=judge, unit=unit, n_units=int(unit.max()) + 1, chose_a=rng.random(n) < 0.6,
            shown_a=rng.integers(-1, 2, n), weight=np.full(n, 1 / 3), n_pairs=n_pairs, n_judges=n_judges, gold=gold)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
res = pds.fit(**args)
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
digest = hashlib.sha256(b"".join(np.ascontiguousarray(getattr(res, f)).tobytes()
                                 for f in ("alpha", "beta", "engaged", "p_a", "evidence", "judgment_evidence",
                                           "independence"))).hexdigest()
print(json.dumps({{"wall": wall, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                  "iterations": res.iterations, "sha256": digest}}))
"""


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    ap.add_argument("--base", default="936f483", help="the commit whose position_ds.fit is the reference")
    a = ap.parse_args()
    subprocess.run(["git", "cat-file", "-e", f"{a.base}:pipeline/position_ds.py"], cwd=ROOT, check=True)
    from _report import PEAK_SNIPPET

    rows, same = [], True
    for n in a.sizes:
        got = {}
        for label, base in (("base", a.base), ("now", "")):
            _, peak, out = run_measured(CHILD.format(root=str(ROOT), base=base, n=n) + PEAK_SNIPPET)
            got[label] = {**json.loads(out.splitlines()[-2]), "peak": peak}
            print(f"{n:>12,} {label:5s} {got[label]['wall']:6.1f} s wall, {got[label]['user']:6.1f} user, "
                  f"{got[label]['sys']:6.1f} sys, {peak:,.0f} MiB", flush=True)
        b, w = got["base"], got["now"]
        same &= b["sha256"] == w["sha256"]
        rows.append([f"{n:,}", str(b["iterations"]), f"{b['wall']:.1f}", f"{b['sys']:.1f}", f"{b['peak']:,.0f}",
                     f"{w['wall']:.1f}", f"{w['sys']:.1f}", f"{w['peak']:,.0f}", f"{w['wall'] / b['wall']:.2f}",
                     "yes" if b["sha256"] == w["sha256"] else "**no**"])
    body = "\n".join([
        f"`benchmarks/em_fit.py` ({machine_line()}): `pipeline.position_ds.fit` alone on a synthetic panel (1,000 judges, "
        f"three judgments a pair, no gold pair, display order known for two thirds), the code at `{a.base}` against "
        "this checkout's, each in a fresh process with the build's mmap threshold. Seconds of the fit only; peak RSS of "
        "the process (the inputs included).",
        "",
        table(["judgments", "EM iterations", "base s", "base sys s", "base peak MiB", "now s", "now sys s",
               "now peak MiB", "time ratio", "same arrays"], rows),
    ])
    print(body)
    if not same:
        sys.exit("the fits differ: not a like-for-like comparison")
    if not a.no_write:
        write_section("Consensus EM (synthetic)", body)


if __name__ == "__main__":
    main()
