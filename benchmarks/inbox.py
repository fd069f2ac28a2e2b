"""A long inbox chain keeps a flat per-batch time (issue 14: `prefpipe serve`).

    .venv/bin/python benchmarks/inbox.py [--ticks 60] [--batch 1000] [--no-write]

What a scheduled `prefpipe serve` does per tick, in one process: the Prefect flow
``process-inbox`` (Prefect's local ephemeral server, as `serve` starts it), called once per
tick after one new finished batch (``--batch`` generated ~1 KB judgments, ``gen_judgments.py``)
was dropped into the inbox: it lists the store, finds the batch unprocessed, curates it as a
child of the latest version and certifies the child.  Per tick: wall seconds.  Ticks 2-11 and
the last ten are compared (medians; tick 1 also starts the server): the history grows
``--ticks`` times over the run.

Side by side on the final store (same process, alternating, 5 rounds): the listing as the flow
does it (``Store.list_ids``: the manifests parsed once, then one ``stat`` per version from
``.index/versions.json``) against parsing every manifest (the listing before the index), and
the cost of parsing one manifest of a 1M-judgment version (when the incremental benchmark's
store is there), which is what every version of a long chain costs a listing without the index.

Writes the "Inbox chain" section of docs/benchmarks.md (``--no-write``: print only).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import benchmark_parser, machine_line, table, write_section  # noqa: E402
from incremental import fresh_batch  # noqa: E402


def parse_all(store) -> list[str]:  # noqa: ANN001 - the listing without the index: every manifest parsed
    from pipeline.store import VersionHandle

    out = []
    for d in store.versions_dir.iterdir():
        if (d / "manifest.json").is_file():
            out.append((VersionHandle(store, d.name).manifest().created_at.isoformat(), d.name))
    return [v for _, v in sorted(out)]


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--ticks", type=int, default=60)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--row-bytes", type=int, default=1000)
    a = ap.parse_args()
    batches = [fresh_batch(a.batch, a.row_bytes, 100 + i) for i in range(a.ticks)]
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="pp-prefect-"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.flows import process_inbox
    from pipeline.store import Store, VersionHandle

    work = Path(tempfile.mkdtemp(prefix="pp-inbox-"))
    inbox, store = work / "inbox", work / "store"
    inbox.mkdir()
    walls: list[float] = []
    for i, b in enumerate(batches):
        dst = inbox / f"batch-{i:04d}.jsonl"
        os.link(b, dst)
        (inbox / (dst.name + ".done")).touch()
        t0 = time.perf_counter()
        out = process_inbox(inbox=str(inbox), store=str(store))
        walls.append(time.perf_counter() - t0)
        if len(out) != 1 or out[0].get("verdict") is None:
            raise SystemExit(f"tick {i + 1}: expected one curated and certified batch, got {out}")
        print(f"tick {i + 1}/{a.ticks}: {walls[-1]:.2f} s ({out[0]['version']}, {out[0]['verdict']})", flush=True)

    st = Store(store)
    k = min(10, (a.ticks - 1) // 2)
    # the first tick also starts Prefect's temporary server: ticks 2..k+1 are the "first" ones
    first, last = statistics.median(walls[1:k + 1]), statistics.median(walls[-k:])
    # the curate work of each tick (the sum of its stages, from the version's lineage): the tick's wall
    # time also holds certification and Prefect's own waits, which come in whole seconds
    ids = st.list_ids()
    work = [sum(VersionHandle(st, v).manifest().lineage["timings_s"].values()) for v in ids]
    wfirst, wlast = statistics.median(work[1:k + 1]), statistics.median(work[-k:])
    parts = [sum(len(t.parts) for t in VersionHandle(st, v).manifest().tables.values()) for v in ids]
    n_versions = len(st.list_ids())
    indexed, parsed = [], []
    for _ in range(5):  # alternating, same process
        t0 = time.perf_counter()
        ids = st.list_ids()
        indexed.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ids_all = parse_all(st)
        parsed.append(time.perf_counter() - t0)
        assert ids == ids_all, "the indexed listing differs from parsing every manifest"
    big = None
    bench = Path(tempfile.gettempdir()) / "prefpipe-bench"
    for d in sorted(bench.glob("incremental-1000000-*/versions/v-*")):
        mf = d / "manifest.json"
        if mf.is_file():
            h = Store(d.parent.parent)
            t0 = time.perf_counter()
            for _ in range(5):
                VersionHandle(h, d.name).manifest()
            big = ((time.perf_counter() - t0) / 5, mf.stat().st_size)
            break
    last_manifest = st.versions_dir / st.list_ids()[-1] / "manifest.json"
    rows = [[f"{i + 1}", f"{w:.2f}", f"{work[i]:.2f}", str(parts[i])] for i, w in enumerate(walls)
            if i <= k or i >= a.ticks - k]
    body = (
        f"`.venv/bin/python benchmarks/inbox.py --ticks {a.ticks} --batch {a.batch}` — {machine_line()}, shared with "
        f"other work. Per tick, in one process: the Prefect flow `process-inbox` (ephemeral local server) after one new "
        f"{a.batch:,}-judgment batch was dropped into the inbox: list the store, curate the batch as a child of the "
        f"latest version, certify it. The history grows from {a.batch:,} to {a.batch * a.ticks:,} judgments, "
        f"{n_versions} versions.\n\n"
        + table(["", "seconds"], [
            ["tick 1 (also starts Prefect's temporary server)", f"{walls[0]:.2f}"],
            [f"median of ticks 2-{k + 1}", f"{first:.2f}"],
            [f"median of the last {k} ticks", f"{last:.2f}"],
            ["last / first", f"**{last / first:.2f}x**"],
            [f"curate stages of ticks 2-{k + 1} / of the last {k} (medians)", f"{wfirst:.2f} / {wlast:.2f} "
             f"(**{wlast / wfirst:.2f}x**)"],
            ["parts in the version's tables: tick 2 / last", f"{parts[1]} / {parts[-1]}"],
        ])
        + f"\n\nThe listing on the final store ({n_versions} versions; medians of 5 alternating rounds): with the "
        f"index {statistics.median(indexed) * 1e3:.1f} ms, parsing every manifest (the listing before it) "
        f"{statistics.median(parsed) * 1e3:.1f} ms ({statistics.median(parsed) / statistics.median(indexed):.1f}x); "
        f"the last manifest of this chain is {last_manifest.stat().st_size / 1024:.0f} KiB"
        + (f"; one manifest of a 1M-judgment version ({big[1] / 1024:.0f} KiB) parses in {big[0] * 1e3:.1f} ms, "
           f"so a tick that lists a store of 1,000 such versions three times (as the flow did before the index) "
           f"spent ~{3 * 1000 * big[0]:.0f} s on the listing alone" if big else "")
        + ".\n\nWhy the tick's wall time moves in whole seconds: a tick runs three Prefect flow runs (`process-inbox` "
        "and its subflows `curate-batch` and `certify-version`); each keeps a heartbeat thread that sleeps in one-second "
        "steps, and the end of each flow run joins that thread (prefect 3.8.8, `flow_engine._send_heartbeats`, "
        "`thread.join(timeout=2)`), so each flow run ends on the heartbeat thread's next whole second after its work "
        "(a cProfile of one 6.1 s tick: 1.7 s in that join). The curate stages column is this code's work.\n\n"
        "Ticks:\n\n" + table(["tick", "wall s", "curate stages s", "parts"], rows)
    )
    print(body)
    if not a.no_write:
        write_section("Inbox chain: per-batch time of `prefpipe serve`", body)


if __name__ == "__main__":
    main()
