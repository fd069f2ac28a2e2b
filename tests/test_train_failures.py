"""A run's life when things go wrong: the version it trains on is held against `prefpipe gc`, any exception
after the run started leaves run.json saying failed (and a resume finishes it), and the failure paths a user
meets -- a full disk, a damaged checkpoint, a run directory of another run, two resumes at once -- end with a
clear message and nothing half-written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_toys import make_store, planted_rows

from trainer.train import make_config, train

TINY = "tiny-llama:layers=1,hidden=32,heads=2"
FAST = dict(model=TINY, max_length=64, threads=1, lr=1e-3, warmup_steps=2, eval_every=0)


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store", {"train": planted_rows(12), "validation": planted_rows(4, seed=1, prefix="v"),
                                           "test": planted_rows(4, seed=2, prefix="t")})


def _gc_delete(root: Path, version: str) -> dict:
    """`prefpipe gc --delete VERSION --apply --json`, as another process would run it now."""
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, ["gc", "--store", str(root), "--delete", version, "--apply", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _events(root: Path, version: str = "v-toy") -> list[dict]:
    return [json.loads(x) for x in (root / "lineage" / f"{version}.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the version is held for the whole run
def test_gc_keeps_the_version_a_run_trains_on_and_the_run_finishes(store):
    """`prefpipe gc --delete V --apply` while a run reads V -- right after V's verification, and between two
    optimizer steps -- keeps V (listed as in use) and the run finishes; once the run is over, gc removes V."""
    seen = []

    def gc_now(kind, payload):  # the run waits here while gc runs: a deterministic "concurrent" gc
        if kind == "tokenized" or (kind == "step" and payload["step"] == 1):
            seen.append((kind, _gc_delete(store.root, "v-toy")))

    res = train(make_config(store.root, "v-toy", run_id="held", max_steps=2, **FAST), on_event=gc_now)
    assert [(kind, out["versions"], out["in_use"]) for kind, out in seen] == [
        ("tokenized", [], ["v-toy"]), ("step", [], ["v-toy"])]
    assert store.exists("v-toy") and store.get("v-toy").verify() == []
    assert json.loads((res.run_dir / "run.json").read_text())["status"] == "finished"
    assert [e["event"] for e in _events(store.root)] == ["started", "finished"]
    out = _gc_delete(store.root, "v-toy")  # the run is over: nothing holds V any more
    assert out["versions"] == ["v-toy"] and out["in_use"] == [] and not store.exists("v-toy")


def test_a_version_gc_removed_before_the_hold_is_not_found_and_nothing_is_written(store, monkeypatch):
    """gc removing V between the lookup of 'v-toy' and the run's hold on it: the run stops (exit 2) saying so,
    before anything is written."""
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline.store import Store

    real = Store.in_use

    def gc_first(self, version_id):
        _gc_delete(self.root, version_id)
        return real(self, version_id)

    monkeypatch.setattr(Store, "in_use", gc_first)
    res = CliRunner().invoke(app, ["train", "v-toy", "--store", str(store.root), "--model", TINY, "--steps", "1",
                                   "--max-length", "64", "--threads", "1", "--run-id", "late"])
    assert res.exit_code == 2, res.output
    assert "version v-toy was removed (`prefpipe gc`) before the run could use it" in " ".join(res.output.split())
    assert not (store.root / "runs").exists() and not (store.root / "lineage").exists()
