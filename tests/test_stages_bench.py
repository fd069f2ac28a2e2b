"""benchmarks/stages.py's cut of the sampler's rows into the version's laps (the table docs/benchmarks.md shows)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from stages import stages_table  # noqa: E402


def test_laps_are_aligned_at_the_end_and_cut_the_samples():
    # 10 s of samples: 2 s start-up at 1 core, then a 4 s stage at 2 cores (RSS 300 MiB, its parts 1 + 3 s),
    # then a 4 s stage at 1.5 cores; user/system time grows 1 s / 0.5 s per second of run
    rows = [(t / 2, 1.0 if t < 4 else 2.0 if t < 12 else 1.5, 100 * 1024 if t < 4 else 300 * 1024 if t < 12 else 200 * 1024,
             t / 2, t / 4) for t in range(1, 21)]
    timings = {"ingest": 4.0, "ingest/a": 1.0, "ingest/b": 3.0, "checks": 4.0}
    out, idle = stages_table(rows, timings, end=10.0, cores=2)
    names = [r[0] for r in out]
    assert names == ["start-up (before the first lap)", "ingest", "&nbsp;&nbsp;a", "&nbsp;&nbsp;b", "checks"]
    start, ingest, a, b, checks = out
    assert start[1] == "2.0" and start[2] == "1.00" and start[4] == "100"
    assert ingest[1:6] == ["4.0", "2.00", "0.0", "300", "4.0"] and ingest[6] == "2.0"
    assert a[2] == "2.00" and b[1] == "3.0"
    assert checks[2] == "1.50" and checks[3] == "2.0" and checks[4] == "200"
    assert idle == 2.0  # 0 in ingest, (2 - 1.5) * 4 in checks


def test_a_lap_with_no_sample_is_shown_without_figures():
    out, idle = stages_table([(0.5, 1.0, 1024, 0.1, 0.0)], {"write": 0.2, "report": 0.3}, end=5.0, cores=2)
    assert out[1] == ["write", "0.2", "-", "-", "-", "-", "-"] and idle == 0.0


def test_the_machine_probe_times_its_parts_in_a_fresh_process():
    from machine_probe import PARTS, describe, probe

    p = probe(runs=1)
    assert set(p) == {"seconds", "min", "max", *PARTS}
    assert all(p[k] > 0 for k in PARTS)
    # one run: its total is the figure, the least and the most
    assert p["seconds"] == p["min"] == p["max"] == sum(p[k] for k in PARTS)
    assert describe(p).startswith(f"{p['seconds']:.2f} s (runs ")
