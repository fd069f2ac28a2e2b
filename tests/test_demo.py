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


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_demo_names_the_samples_so_validate_finds_them_from_any_directory(tmp_path, monkeypatch, capsys, where):
    """`python -m flows.demo` run outside the checkout passed `data/samples/...` (relative to the checkout) to
    `validate`, which failed with exit 2 before anything ran."""
    from flows import demo

    monkeypatch.chdir(ROOT if where == "checkout" else tmp_path)
    args = demo.sample_args()
    assert len(args) == len(demo.SAMPLES) > 0 and all(Path(a).is_file() for a in args)
    if where == "checkout":  # shown as typed in the checkout
        assert all(a.startswith("data/samples/") for a in args)
    assert demo._validate(args) == 1, capsys.readouterr().err  # 1: the samples' planted bad rows are quarantined
