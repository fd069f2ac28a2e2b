"""Run directory I/O for the trainer: metrics JSONL, checkpoints, lineage records.

Layout::

    STORE/runs/<run_id>/
      config.json              the TrainConfig, as given
      run.json                 lineage: version, certification, split sha256s, model / reference /
                               tokenizer identities, beta, objective, code version, ledger, status
      metrics.jsonl            one line per optimizer step ("kind": "train") and per evaluation ("eval")
      metrics.svg              plot of metrics.jsonl
      checkpoints/step-000100.pt
    STORE/lineage/<version_id>.jsonl   one line per run event (started / finished), appended
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import uuid
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
__version__ = "0.1.0"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@cache
def code_version() -> dict[str, Any]:
    """Package version + sha256 of the trainer and schema sources + git commit (if a checkout)."""
    h = hashlib.sha256()
    for sub in ("trainer", "schemas"):
        for p in sorted((ROOT / sub).rglob("*.py")):
            h.update(p.relative_to(ROOT).as_posix().encode())
            h.update(p.read_bytes())
    out: dict[str, Any] = {"version": f"{__version__}+{h.hexdigest()[:10]}"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=5)
            out["git_commit"] = commit.stdout.strip()
            out["git_trainer_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


# ---------------------------------------------------------------- metrics
class MetricsLog:
    """Append-only metrics.jsonl (one flushed line per record) plus an in-memory copy for the plot."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if keep_until_step is not None and path.exists():  # resume: forget what came after the checkpoint
            lines = path.read_text(encoding="utf-8").splitlines()
            self.records = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= keep_until_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


# ---------------------------------------------------------------- checkpoints
def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(checkpoint_dir(run_dir).glob("step-*.pt"))
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Model/optimizer/RNG/data position at ``step``; atomic; keeps the newest ``keep``."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step-{step:06d}.pt"
    tmp = d / f".{path.name}.{os.getpid()}.tmp"
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    torch.save({**state, "step": step, "rng": rng}, tmp)
    os.replace(tmp, path)
    for old in sorted(d.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state


# ---------------------------------------------------------------- lineage
def append_lineage(store, version_id: str, record: dict[str, Any]) -> Path:
    """Append one JSON line to STORE/lineage/<version>.jsonl under the store's lock (never edits the version)."""
    path = Path(store.root) / "lineage" / f"{version_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    with store.lock(f"lineage-{version_id}"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of one line with O_APPEND: never interleaved
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MlflowSink:
    """Optional MLflow logging: active only when asked for and importable; never required."""

    def __init__(self, enabled: bool, run_name: str, params: dict[str, Any]):
        self.mlflow = None
        self.status = "off"
        if not enabled:
            return
        try:
            import mlflow
        except ImportError:
            self.status = "requested but mlflow is not installed; skipped"
            return
        self.mlflow = mlflow
        mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        self.status = "logging"

    def log(self, record: dict[str, Any]) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in record.items()
                                     if isinstance(v, (int, float)) and k != "step"}, step=int(record["step"]))

    def finish(self, artifacts: list[Path]) -> None:
        if self.mlflow is not None:
            for a in artifacts:
                self.mlflow.log_artifact(str(a))
            self.mlflow.end_run()


def cap_heap_fragmentation(mmap_threshold_kib: int | None) -> bool:
    """glibc malloc: serve allocations above the threshold with mmap, returned to the OS on free.

    A training step allocates and frees tensors of ever-changing sizes (length-grouped
    forwards); glibc's default raises its mmap threshold after the first large frees and then
    keeps those sizes on a heap it rarely gives back, so RSS creeps up by ~100 MiB in a few
    steps (measured in docs/trainer.md).  A fixed threshold stops that; throughput is unchanged
    within noise.  Returns False where glibc's mallopt is not available (nothing changed).
    """
    if mmap_threshold_kib is None:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        nbytes = int(mmap_threshold_kib) * 1024
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes)) and bool(libc.mallopt(M_TRIM_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False
