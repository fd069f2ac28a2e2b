"""The README's main job: run prefpipe end to end on data/samples/ with embedded defaults.

Stages grow with the project; each prints what it did and where its output is.
Usage: ``./dev demo [--store DIR]`` (default store: ./store).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "data" / "samples").glob("*.jsonl"))


def _run(args: list[str]) -> int:
    from flows.cli import app

    print(f"\n$ prefpipe {' '.join(args)}", flush=True)
    try:
        app(args, standalone_mode=False)
    except SystemExit as e:  # typer.Exit surfaces as SystemExit/Exit
        return int(e.code or 0)
    except Exception as e:  # click.exceptions.Exit
        code = getattr(e, "exit_code", None)
        if code is None:
            raise
        return int(code)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", default=str(ROOT / "store"), help="version store directory")
    args = parser.parse_args(argv)
    if not SAMPLES:
        print("no sample batches under data/samples/", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    files = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in SAMPLES]
    rc = _run(["validate", *files])
    # validate exits 1 when rows were quarantined: the samples contain planted malformed rows on purpose
    if rc not in (0, 1):
        return rc
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f}s (store: {args.store})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
