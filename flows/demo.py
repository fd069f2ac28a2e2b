"""The README's main job: prefpipe end to end on data/samples/ with embedded defaults.

1. ``prefpipe validate`` on the sample batches (ledger + quarantined rows with line numbers);
2. the ``curate-batch`` Prefect flow (ingest -> checks -> select -> split -> immutable version),
   run on Prefect's temporary local server unless ``PREFECT_API_URL`` points at a real one;
3. the ``certify-version`` flow (policy gates + Great Expectations);
   then one review round: the routed pairs exported, answered by a scripted reviewer
   (``data/review_bot.py``), imported and curated as a child version that resolves them;
4. a short DPO training run on the version when it is certified (tiny random-init model,
   the repo's tokenizer; skip with ``--no-train``);
and prints where the report, the certification record and the run directory are.

Usage: ``./dev demo [--store DIR] [--no-train]`` (default store: ./store).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "data" / "samples").glob("*.jsonl"))


def sample_args() -> list[str]:
    """The sample batches as typed on the command line: relative to the working directory when they lie under it
    (``./dev demo`` runs from the checkout), else absolute -- ``python -m flows.demo`` works from anywhere."""
    here = Path.cwd().resolve()
    return [str(p.relative_to(here)) if p.is_relative_to(here) else str(p) for p in SAMPLES]


def _prefpipe() -> str:
    """The ``prefpipe`` command beside this interpreter, as a newcomer would type it from where they are."""
    exe = Path(sys.executable).parent / "prefpipe"
    here = Path.cwd().resolve()
    return str(exe.relative_to(here)) if exe.is_relative_to(here) else str(exe)


def _validate(files: list[str]) -> int:
    return _cli(["validate", *files])


def _cli(args: list[str]) -> int:
    """Run one ``prefpipe`` command in this process, as typed (exit code returned)."""
    from flows.cli import app

    print(f"$ prefpipe {' '.join(args)}", flush=True)
    try:
        rc = app(args, standalone_mode=False)  # click returns the exit code instead of raising here
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click's Exit carries exit_code
        code = getattr(e, "exit_code", None)
        if code is None:
            raise
        return int(code)
    return int(rc) if isinstance(rc, int) else 0


def review_round(store: str, version: str) -> str | None:
    """One review round trip: the version's routed pairs out as JSONL tasks, a scripted reviewer
    (``data/review_bot.py``) answers, the answers come back as judgments with ``review_of``, and a
    child version curated with them resolves the pairs the reviews decide (docs/reviews.md)."""
    import subprocess

    from flows.flows import curate_batch_with_runner
    from pipeline.store import Store

    print("\n== review round: routed pairs -> reviewers -> a child version ==", flush=True)
    work = Path(store).resolve().parent / "review"  # beside the store: review files are never written inside one
    tasks, answers, batch = work / f"{version}-tasks.jsonl", work / f"{version}-answers.jsonl", work / f"{version}-judgments.jsonl"
    if _cli(["review", "export", version, "--store", store, "--format", "jsonl", "--out", str(tasks)]) != 0:
        return None
    print(f"$ python data/review_bot.py {tasks} --out {answers}   # the scripted reviewer", flush=True)
    if subprocess.run([sys.executable, str(ROOT / "data" / "review_bot.py"), str(tasks), "--out", str(answers)]).returncode != 0:
        return None
    if _cli(["review", "import", str(answers), "--format", "jsonl", "--store", store, "--out", str(batch)]) != 0:
        return None
    print(f"$ prefpipe curate {batch} --store {store} --parent {version}   # here: the curate-batch flow", flush=True)
    child = curate_batch_with_runner()(files=[str(batch)], store=store, parent=version)
    r = Store(store).get(child).manifest().ledger.reviews
    if r is not None:
        print(f"child {child}: routed {r.routed_ever} -> exported {r.exported} -> reviewed {r.reviewed} -> "
              f"resolved {r.resolved} ({r.resolved_by_reviews} by the reviews' majority); still open {r.open} "
              f"({r.kept_routed_by_review_tie} kept routed by a tie between reviews)")
    print(f"open reviews with their age: {_prefpipe()} show {child} --store {store}")
    return child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(ROOT / "store"), help="version store directory (default ./store)")
    parser.add_argument("--no-train", action="store_true", help="stop after certification")
    args = parser.parse_args(argv)
    if not SAMPLES:
        print("no sample batches under data/samples/", file=sys.stderr)
        return 2
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    t0 = time.perf_counter()
    stages: list[tuple[str, float]] = []

    def lap(name: str) -> None:
        stages.append((name, time.perf_counter() - t0 - sum(t for _, t in stages)))

    files = sample_args()
    rc = _validate(files)
    if rc not in (0, 1):  # 1 = rows quarantined: the samples contain planted malformed rows on purpose
        return rc
    lap("validate")

    where = os.environ.get("PREFECT_API_URL") or "Prefect's temporary local server"
    print(f"\n== curate-batch flow on {where} ==", flush=True)
    from flows.flows import certify_version, curate_batch_with_runner
    from pipeline.escape import visible_controls  # check details quote data: no control characters to the terminal
    from pipeline.store import Store

    version = curate_batch_with_runner()(files=[str(p) for p in SAMPLES], store=args.store)
    h = Store(args.store).get(version)
    m = h.manifest()
    led = m.ledger
    print(f"version {version}: {led.rows_in} rows in -> {led.quarantined} quarantined, {led.pairs} pairs -> "
          f"{led.pairs_kept} DPO rows {dict(led.splits)}, routed {dict(led.routed)}, dropped {dict(led.dropped)}")
    print(visible_controls("checks: " + ", ".join(f"{c.name}={c.status}" for c in m.checks)))
    lap("curate flow (incl. Prefect server start)")

    print("\n== certify-version flow ==", flush=True)
    cert = certify_version(store=args.store, version=version)
    for g in cert["gates"]:
        if not g["passed"]:
            print(visible_controls(f"  FAIL {g['name']}: value {g['value']} threshold {g['threshold']} {g['detail']}"))
    print(f"verdict: {cert['verdict'].upper()} ({sum(g['passed'] for g in cert['gates'])}/{len(cert['gates'])} gates passed)")
    lap("certify flow (gates + Great Expectations)")

    if review_round(args.store, version) is None:
        print("demo: the review round failed (see above)", file=sys.stderr)
        return 1
    lap("review round (export, scripted reviewer, import, child version)")

    run_dir = None
    if cert["verdict"] == "certified" and not args.no_train:
        try:
            from flows.flows import train_on_version
        except ImportError:
            train_on_version = None
        if train_on_version is not None:
            print("\n== train-on-version flow (tiny model, a few steps) ==", flush=True)
            # a smoke-sized run: tiny random-init Llama, short sequences (docs/trainer.md has real settings)
            run_dir = train_on_version(store=args.store, version=version, model="tiny-llama:layers=2,hidden=64,heads=4",
                                       max_steps=10, extra={"max_length": 256, "batch_size": 2, "eval_every": 10,
                                                            "eval_max_pairs": 16})
            lap("train flow (reference log-probs + 10 steps)")

    print("\n== where to look ==")
    print(f"report:        {h.file('report.html')}")
    print(f"               {h.file('report.md')}")
    print(f"certification: {Store(args.store).certification_path(version)}")
    if run_dir:
        print(f"training run:  {run_dir}")
        from pipeline.escape import visible_controls
        from trainer.evaluate import run_summary_lines

        print("\n== evaluation (test split, before -> after training) ==")
        print("\n".join(visible_controls(line) for line in run_summary_lines(run_dir)))
    print(f"versions:      {_prefpipe()} versions --store {args.store}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s (" + ", ".join(f"{n} {t:.0f}s" for n, t in stages) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
