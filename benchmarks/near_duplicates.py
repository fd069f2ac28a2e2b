"""Near-duplicate check of a 10k-judgment child: today's full run vs the incremental state.

    .venv/bin/python benchmarks/near_duplicates.py [--history 1000000 3000000] [--batch 10000] [--rounds 3]

For each history size H the history (``benchmarks/gen_judgments.py``, seed 0) and the batch
(seed 1) are generated and ingested once, cached under ``$TMPDIR/prefpipe-bench/``; the
parent version is prepared once in a bench store there: one version holding both the old
``prompt_index.npz`` and the new state tables (``state/near_dup_*``).  Then, each in a fresh
process (wall of the step, peak RSS of the process):

* **full** -- what curate does today: ``run(history + batch, index_path=<parent's npz>)``,
  which loads every signature, hashes the new prompts, bands every prompt again, then
  ``save_index`` rewrites the whole ``.npz``;
* **incremental** -- ``load_state(parent)`` (every part read is sha256-verified) +
  ``run_incremental(batch)`` + ``write_state`` into a staged child version (the parent's parts
  hard-linked, the new ones written as objects).

The child's new disk is the bytes of the parts it wrote (not linked); for *full*, the new
``.npz``.  Writes the "Near duplicates (incremental)" section of docs/benchmarks.md.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import PEAK_SNIPPET, benchmark_parser, machine_line, run_measured, table, write_section  # noqa: E402
from gen_judgments import cached_batch  # noqa: E402

COLS = ["pair_id", "prompt_hash", "prompt", "prompt_text"]
CACHE = Path(tempfile.gettempdir()) / "prefpipe-bench"


def judgments_parquet(n: int, row_bytes: int, *, prefix: str, seed: int) -> Path:
    """The generated batch, ingested once (only the columns the check reads)."""
    src = cached_batch(n, row_bytes, prefix=prefix, seed=seed)
    parq = src.with_suffix(".judgments.parquet")
    if not parq.exists():
        from pipeline.ingest import ingest_files

        t = time.perf_counter()
        tmp = parq.with_suffix(".tmp")
        ingest_files([src]).judgments.write_parquet(tmp)
        tmp.replace(parq)
        print(f"ingested {src.name} in {time.perf_counter() - t:.0f}s", flush=True)
    return parq


def prepare_parent(history: Path, store_root: Path, vid: str) -> None:
    """A parent version with both layouts: state tables and the old prompt_index.npz."""
    import polars as pl

    from pipeline.checks import near_duplicates as nd
    from pipeline.checks import near_duplicates_state as nds
    from pipeline.store import Store, file_info
    from schemas.manifest import IngestLedger, Ledger, Manifest
    from schemas.policy import Policy

    store = Store(store_root)
    if store.exists(vid):
        return
    t = time.perf_counter()
    res = nds.run_incremental(pl.read_parquet(history, columns=COLS), nds.NearDupState.empty(), generation=vid)
    state = res.child_state()
    print(f"parent state of {vid} built in {time.perf_counter() - t:.0f}s", flush=True)

    def build(stage: Path) -> Manifest:
        tables = res.write_state(store, stage)
        index = nd.PromptIndex(state.cfg)  # the same content in today's layout
        index.keys = state.hashes.to_list()
        index._pos = {k: i for i, k in enumerate(index.keys)}
        index._sigs = [state.old_signatures(__import__("numpy").arange(len(state)))]
        pos = pl.DataFrame({"h": state.hashes, "i": range(len(state))})
        e = state.edges.join(pos, left_on="left", right_on="h").join(pos, left_on="right", right_on="h", suffix="_r")
        index.edges = e.select("i", "i_r").to_numpy().astype("int64").reshape(-1, 2)
        index.edge_jaccard = e["jaccard"].to_numpy()
        index.save(stage / "prompt_index.npz")
        return Manifest(version_id=vid, created_at=datetime.now(UTC), code_version="bench", policy_hash="bench",
                        policy=Policy(), ledger=Ledger(rows_in=0, quarantined=0, judgments_valid=0, pairs=0, pairs_kept=0),
                        ingest=IngestLedger(), sources=[], splits={}, tables=tables, checks=[],
                        files={"prompt_index.npz": file_info(stage / "prompt_index.npz", "prompt_index.npz")})

    store.write_version(vid, build)


FULL = """
import json, time, tempfile, polars as pl
from pathlib import Path
from pipeline.checks import near_duplicates as nd
from pipeline.store import Store
union = pl.concat([pl.read_parquet({history!r}, columns={cols!r}), pl.read_parquet({batch!r}, columns={cols!r})])
parent = Store({store!r}).get({vid!r})
t0 = time.perf_counter()
res = nd.run(union, index_path=parent.verified_path("prompt_index.npz"))
out = Path(tempfile.mkdtemp(dir={store!r}))
names = nd.save_index(res, out / "prompt_index")
t1 = time.perf_counter()
print(json.dumps({{"seconds": t1 - t0, "new_bytes": (out / names[0]).stat().st_size, "flags": res.flags.height,
                  "hashed": res.metrics["prompts_hashed"]}}))
(out / names[0]).unlink(); out.rmdir()
"""

INCREMENTAL = """
import json, shutil, time, uuid, polars as pl
from pathlib import Path
from pipeline.checks import near_duplicates_state as nds
from pipeline.store import Store
batch = pl.read_parquet({batch!r}, columns={cols!r})
store = Store({store!r}); parent = store.get({vid!r})
t0 = time.perf_counter()
state = nds.load_state(parent)
t1 = time.perf_counter()
res = nds.run_incremental(batch, state, generation="v-child")
t2 = time.perf_counter()
stage = store.root / ".staging" / f"bench.0.{{uuid.uuid4().hex[:8]}}"
tables = res.write_state(store, stage)
t3 = time.perf_counter()
inherited = {{p.path for ps in res.inherit.values() for p in ps}}
new = [p for t in tables.values() for p in t.parts if p.path not in inherited]
print(json.dumps({{"seconds": t3 - t0, "load": t1 - t0, "run": t2 - t1, "write": t3 - t2,
                  "new_bytes": sum(p.bytes for p in new), "new_parts": len(new), "flags": res.flags.height,
                  "hashed": res.metrics["prompts_hashed"], "stats": res.stats}}))
shutil.rmtree(stage)
"""


def measure(code: str) -> tuple[dict, float]:
    wall, peak, out = run_measured(code + PEAK_SNIPPET)
    return json.loads(next(line for line in out.splitlines() if line.startswith("{"))), peak


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--history", type=int, nargs="+", default=[1_000_000, 3_000_000])
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--row-bytes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each step (the median is reported)")
    a = ap.parse_args()
    batch = judgments_parquet(a.batch, a.row_bytes, prefix="batch-s1", seed=1)
    rows = []
    load_before = os.getloadavg()
    for h in a.history:
        history = judgments_parquet(h, a.row_bytes, prefix="messy", seed=0)
        store, vid = CACHE / "nd-store", f"v-hist-{h}"
        prepare_parent(history, store, vid)
        args = {"history": str(history), "batch": str(batch), "store": str(store), "vid": vid, "cols": COLS}
        for name, code in (("full (today: run + save_index)", FULL), ("incremental (load_state + run_incremental + write_state)", INCREMENTAL)):
            runs = [measure(code.format(**args)) for _ in range(a.rounds)]
            res, peak = runs[0]
            secs = statistics.median(r["seconds"] for r, _ in runs)
            detail = (f"load {statistics.median(r['load'] for r, _ in runs):.2f} + run {statistics.median(r['run'] for r, _ in runs):.2f}"
                      f" + write {statistics.median(r['write'] for r, _ in runs):.2f}; {res['new_parts']} parts, "
                      f"{res['stats']['signature_parts_read']} signature parts read") if "load" in res else ""
            rows.append([f"{h:,}", name, f"{secs:.2f}", detail, f"{max(p for _, p in runs):,.0f}",
                         f"{res['new_bytes'] / 1e6:.2f}", f"{res['hashed']:,}", f"{res['flags']:,}"])
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    body = (
        f"`.venv/bin/python benchmarks/near_duplicates.py --history {' '.join(map(str, a.history))} --batch {a.batch} "
        f"--rounds {a.rounds}` — {machine_line()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        "(other sessions share the 2 cores).\n\n"
        f"A {a.batch:,}-judgment batch (`gen_judgments.py` seed 1) on top of H judgments of history (seed 0), "
        "each step in a fresh process, the median of the rounds; peak RSS is the process's, including the frames "
        "it read (for *full*: the whole union of judgments, as curate holds it).\n\n"
        + table(["history judgments", "near-duplicate step", "seconds", "of which", "peak RSS MiB",
                 "new state MB", "prompts hashed", "flags emitted"], rows)
        + "\n\n*full*: flags of every pair of the union; *incremental*: flags of the recomputed pairs only (the batch's "
        "and those whose prompts' edges changed), merged with the parent's by `merge_flags`. Both give the same "
        "version (tests/test_near_duplicates_incremental.py). New state: *full* rewrites the whole `prompt_index.npz`; "
        "*incremental* writes the batch's prompts, signatures and pair rows, its new edges and the one-row summary, "
        "and links every other part of the parent's."
    )
    print(body)
    if not a.no_write:
        write_section("Near duplicates (incremental)", body)


if __name__ == "__main__":
    main()
