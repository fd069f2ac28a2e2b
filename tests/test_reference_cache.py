"""The reference log-probs cache is checked against the sha256 its sidecar recorded (trainer/reference.py)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import polars as pl
import pytest

from trainer import reference
from trainer.tokenize import TokenizedPair

PAIRS = {"train": [TokenizedPair("p1", (1, 2), (3,), (4, 5)), TokenizedPair("p2", (1,), (6, 7), (8,))]}
LOGPS = {"p1": (-1.5, -2.5), "p2": (-0.25, -3.0)}


class _Store:
    def __init__(self, root: Path) -> None:
        self.root = root

    def lock(self, _name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


@pytest.fixture
def computed(monkeypatch):
    calls = []

    def compute(_model, pairs, **_kw):
        calls.append(len(pairs))
        return dict(LOGPS)

    monkeypatch.setattr(reference, "compute_reference_logps", compute)
    return calls


def _load(root: Path):
    return reference.load_or_compute(_Store(root), "v-toy", {"format": 1, "version_id": "v-toy"}, PAIRS, lambda: None,
                                     pad_id=0)


def test_a_cache_file_is_read_only_as_written(tmp_path, computed):
    first = _load(tmp_path)
    assert not first.hit and first.logps == LOGPS
    again = _load(tmp_path)
    assert again.hit and again.logps == LOGPS and computed == [2]
    rec = json.loads(first.path.with_suffix(".json").read_text())
    assert rec["version_id"] == "v-toy" and len(rec[reference.SHA256_FIELD]) == 64


@pytest.mark.parametrize("change", ["edited", "no record", "damaged"])
def test_a_cache_file_changed_since_it_was_written_is_computed_again_not_trained_against(tmp_path, computed, change):
    """An edited cache (valid Parquet, other log-probs), one whose sidecar has no sha256 (written before the
    record) or a damaged one: computed again under the same key; the values trained against are the model's."""
    path = _load(tmp_path).path
    if change == "edited":
        pl.read_parquet(path).with_columns(ref_chosen_logps=pl.lit(0.0, pl.Float64)).write_parquet(path)
    elif change == "no record":
        side = path.with_suffix(".json")
        side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != reference.SHA256_FIELD}))
    else:
        path.write_bytes(path.read_bytes()[:-9] + b"\0" * 9)
    got = _load(tmp_path)
    assert not got.hit and got.logps == LOGPS and computed == [2, 2]
    assert _load(tmp_path).hit  # (written again, with its record)
