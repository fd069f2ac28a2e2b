"""All checks on 1M judgments (~300k pairs): per-check seconds and peak RSS, in one process.

    .venv/bin/python benchmarks/checks.py [--judgments 1000000] [--row-bytes 1000]

Generates (once, cached under $TMPDIR/prefpipe-bench/) a realistic batch with the bulk generator,
ingests it (not timed here: see benchmarks/ingest.py), then times the preliminary aggregation
and each check exactly as `curate` runs them (`pipeline.checks.run_checks`). Writes the
"Checks" section of docs/benchmarks.md. Target: all checks together <= 60 s, peak RSS <= 3 GB.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import benchmark_parser, machine_line, table, write_section  # noqa: E402
from gen_judgments import cached_batch  # noqa: E402


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--judgments", type=int, default=1_000_000)
    ap.add_argument("--row-bytes", type=int, default=1000)
    a = ap.parse_args()
    src = cached_batch(a.judgments, a.row_bytes)
    parq = src.with_suffix(".judgments.parquet")
    import polars as pl

    from pipeline import aggregate as agg
    from pipeline.checks import run_checks
    from schemas.policy import Policy

    if not parq.exists():
        from pipeline.ingest import ingest_files

        t = time.perf_counter()
        ingest_files([src]).judgments.write_parquet(parq)
        print(f"ingested in {time.perf_counter() - t:.1f}s", flush=True)
    judgments = pl.read_parquet(parq)
    policy = Policy()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timings: list[tuple[str, float]] = []
    t = time.perf_counter()
    prelim = agg.aggregate(judgments, policy.checks.aggregation)
    timings.append(("aggregate (preliminary consensus)", time.perf_counter() - t))
    results = run_checks(judgments, policy.checks, pairs=prelim.pairs, on_check=lambda n, s: timings.append((n, s)))
    total = sum(s for _, s in timings)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [[name, f"{s:.1f}", f"{s / total:.0%}"] for name, s in timings]
    rows.append(["**all checks + aggregation**", f"**{total:.1f}**", "100%"])
    flags = {n: r.flags.height for n, r in results.items()}
    body = (
        f"`.venv/bin/python benchmarks/checks.py --judgments {a.judgments} --row-bytes {a.row_bytes}` — {machine_line()}; "
        f"{judgments.height:,} judgments, {prelim.pairs.height:,} pairs, {judgments['annotator_id'].n_unique():,} annotators, "
        f"{judgments['prompt_hash'].n_unique():,} distinct prompts.\n\n"
        + table(["step", "seconds", "share"], rows)
        + f"\n\nPeak RSS of the process {peak:,.0f} MiB ({rss0:,.0f} MiB after loading the judgments frame). "
        f"Flags raised: {flags}.\nTarget (checks issue): <= 60 s and <= 3 GB for 1M judgments."
    )
    print(body)
    if not a.no_write:
        write_section("Checks", body)


if __name__ == "__main__":
    main()
