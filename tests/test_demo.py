"""The README's demo, as a newcomer runs it (without the training stage): it must finish with exit 0,
certify the sample version and complete one review round.  Before this test, a demo whose review round
failed still printed the rest and exited 0 (flows/demo.py ignored the CLI's exit code)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_the_review_round_and_exits_0(tmp_path):
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "flows.demo", "--no-train", "--store", str(store)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "verdict: CERTIFIED" in out
    m = re.search(r"routed (\d+) -> exported (\d+) -> reviewed (\d+) -> resolved (\d+)", out)
    assert m, out[-3000:]
    routed, exported, reviewed, resolved = map(int, m.groups())
    assert routed == exported == reviewed > 0 and 0 < resolved <= reviewed
    # review files go beside the store, never inside it (the store refuses such writes)
    assert list((tmp_path / "review").glob("*-judgments.jsonl"))
    assert not (store / "reviews" / "demo-round").exists()
