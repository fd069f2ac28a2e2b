"""Certifying a child costs its new parts, not the history (issue 14, `prefpipe serve`'s tick).

    .venv/bin/python benchmarks/certify.py [--parent-judgments 3000000] [--repeats 2] [--no-write]

Takes the store `benchmarks/incremental.py --parent-judgments N` left under
$TMPDIR/prefpipe-bench/ (a parent and its 10k child; run that first), copies it with hard
links, without certifications, and runs in fresh processes (the CLI, default policy, GX on):

1. `prefpipe certify PARENT`: the first certification, nothing to take from.
2. `prefpipe certify CHILD`, its parent certified (step 1): unchanged parts take their facts from
   the parent's record; against `prefpipe certify CHILD --from-scratch` (everything hashed and
   validated), in turn, each in its own copy of the store as step 1 left it.

Per run: wall, CPU (user + sys, wait4) and peak RSS (the process's VmHWM).  The gates of the two
child certifications must be equal (name, value, threshold, passed); the script stops otherwise.
Writes the "Certification" section of docs/benchmarks.md (``--no-write``: print only).
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import benchmark_parser, machine_line, table, write_section  # noqa: E402
from incremental import run_cli  # noqa: E402


def find_store(cache: Path, n: int) -> tuple[Path, str, str]:
    """The newest incremental benchmark store for ``n`` parent judgments: (store, parent, child)."""
    for store in sorted(cache.glob(f"incremental-{n}-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        if (store / "versions").is_dir():
            ms = [json.loads((d / "manifest.json").read_text()) for d in (store / "versions").iterdir()
                  if (d / "manifest.json").is_file()]
            kids = [m for m in ms if m.get("parent_version")]
            if kids:
                return store, kids[0]["parent_version"], kids[0]["version_id"]
    raise SystemExit(f"no store of `benchmarks/incremental.py --parent-judgments {n}` under {cache}: run it first")


def copy_store(src: Path, dst: Path, *, certifications: bool) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for d in ("objects", "versions"):
        subprocess.run(["cp", "-al", str(src / d), str(dst / d)], check=True)
    if certifications and (src / "certifications").is_dir():
        subprocess.run(["cp", "-a", str(src / "certifications"), str(dst / "certifications")], check=True)
    return dst


def certify(store: Path, vid: str, *extra: str) -> dict:
    r = run_cli(["certify", vid, "--store", str(store), "--json", *extra])
    text = r["out"]
    r["json"] = json.loads(text[text.index("{"): text.rindex("}") + 1])
    return r


def gates(cert: dict) -> dict:
    return {g["name"]: (g["value"], g["threshold"], g["passed"]) for g in cert["gates"]}


def detail(cert: dict, name: str) -> str:
    return next(g["detail"] for g in cert["gates"] if g["name"] == name)


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--parent-judgments", type=int, default=3_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    cache = Path(tempfile.gettempdir()) / "prefpipe-bench"
    src, parent, child = find_store(cache, a.parent_judgments)
    work = cache / "certify-bench"
    base = copy_store(src, work / "base", certifications=False)
    first = certify(base, parent)
    print(f"parent {parent}: first certification {first['wall']:.1f} s wall, {first['peak']:,.0f} MiB", flush=True)
    runs: dict[str, list[dict]] = {"per part": [], "from scratch": []}
    for i in range(a.repeats):
        for name, extra in (("per part", ()), ("from scratch", ("--from-scratch",))):
            st = copy_store(base, work / "run", certifications=True)
            r = certify(st, child, *extra)
            runs[name].append(r)
            print(f"child {name} #{i + 1}: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, {r['peak']:,.0f} MiB", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    a_gates, b_gates = gates(runs["per part"][-1]["json"]), gates(runs["from scratch"][-1]["json"])
    if a_gates != b_gates:
        raise SystemExit(f"the gates differ: {[k for k in a_gates if a_gates[k] != b_gates.get(k)]}")

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    rows = [[key, f"{first[k]:,.1f}", f"{med('per part', k):,.1f}", f"{med('from scratch', k):,.1f}",
             f"{med('per part', k) / med('from scratch', k):.2f}x"]
            for key, k in (("wall s", "wall"), ("CPU s", "cpu"), ("peak MiB", "peak"))]
    last = runs["per part"][-1]["json"]
    body = (f"`.venv/bin/python benchmarks/certify.py --parent-judgments {a.parent_judgments} --repeats {a.repeats}` — "
            f"{machine_line()}, shared with other work. The store of `benchmarks/incremental.py` ({parent} and its "
            f"10k child {child}), copied with hard links; `prefpipe certify` with the default policy (GX on), each run "
            f"a fresh process in a fresh copy; medians of {a.repeats} runs, the two child columns in turn. The two "
            "child certifications reach the same gates (name, value, threshold, passed).\n\n"
            + table(["", "parent: first certification", "child, per part", "child `--from-scratch`", "per part / scratch"], rows)
            + f"\n\nThe child's integrity gate: {detail(last, 'integrity')}. Its expectations gate: "
            + detail(last, "expectations").split("; Data Docs")[0] + ".")
    print(body)
    if not a.no_write:
        write_section("Certification: a child's certification costs its new parts", body)


if __name__ == "__main__":
    main()
