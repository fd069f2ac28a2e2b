"""Run directory I/O for the trainer: metrics JSONL, checkpoints, lineage records.

Layout::

    STORE/runs/<run_id>/
      config.json              the TrainConfig, as given
      run.json                 lineage: version, certification, split sha256s, model / reference /
                               tokenizer identities, beta, objective, code version, ledger, status
      metrics.jsonl            one line per optimizer step ("kind": "train") and per evaluation ("eval")
      metrics.svg              plot of metrics.jsonl
      checkpoints/step-000100/   model + optimizer as safetensors, state.json, checkpoint.json (sha256s)
    STORE/lineage/<version_id>.jsonl   one line per run event (started / resumed / finished / failed), appended
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import torch

from pipeline.store import sha256_file
from schemas.version import ROOT
from schemas.version import code_version as schema_code_version


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@cache
def code_version() -> dict[str, Any]:
    """The one code version (:func:`schemas.version.code_version`) of the trainer and schema sources
    + git commit (if a checkout)."""
    out: dict[str, Any] = {"version": schema_code_version(("trainer", "schemas"))}
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
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:  # (a full disk: no half-written temp file left beside it)
        tmp.unlink(missing_ok=True)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file``, whose I/O errors (a full disk) come as ``SafetensorError("... No space left
    on device (os error 28)")``, not OSError: raised here as the OSError they are, naming ``path`` (exit 2 with the
    file and the reason from the CLI, not a traceback)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except SafetensorError as err:
        raise safetensors_os_error(err, path) from err


def os_error_of(err: Exception, path: Path) -> OSError | None:
    """The OSError a library's I/O error stands for -- safetensors and polars (Rust) say a full disk as their own
    error type with ``(os error 28)`` in the message -- naming ``path``; None when the message names no OS error."""
    code = re.search(r"os error (\d+)", str(err))
    return None if code is None else OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))


def safetensors_os_error(err: Exception, path: Path) -> OSError:
    """A safetensors write error as an OSError (:func:`os_error_of`; EIO with its message when it names none)."""
    return os_error_of(err, path) or OSError(errno.EIO, f"{os.strerror(errno.EIO)} ({err})", str(path))


def atomic_write_parquet(frame, path: Path) -> None:
    """A Polars frame to ``path`` through a temp file in the same directory and a rename: a reader (or a
    crash) never sees half a file."""
    from polars.exceptions import PolarsError

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            frame.write_parquet(tmp)
        except PolarsError as err:  # a full disk comes as ComputeError("... (os error 28)"): the OSError it is
            raise (os_error_of(err, path) or err) from err
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


# ---------------------------------------------------------------- metrics
class MetricsLog:
    """Append-only metrics.jsonl (one flushed line per record) plus an in-memory copy for the plot."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if keep_until_step is not None and path.exists():  # resume: forget what came after the checkpoint
            self.records = [r for r in _read_metrics_lines(path) if r["step"] <= keep_until_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _read_metrics_lines(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl.  The last line may be torn -- the process that a resume follows
    was killed while writing it, or the disk filled up, or a power loss left NUL bytes after the last
    flushed line -- and is dropped (it came after the checkpoint); a bad line before it is an error."""
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip("\x00 \t"):
        lines.pop()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a metrics record with an integer step")
        except ValueError as err:
            if n == len(lines):
                break
            raise CheckpointError(f"{path}: line {n} is not a metrics record ({err}); the run's log was edited "
                                  "or damaged, so it cannot be resumed") from None
        out.append(rec)
    return out


# ---------------------------------------------------------------- checkpoints
# A checkpoint is a directory of plain data, never a pickle (unpickling a file from the run
# directory would run whatever code it names):
#
#   checkpoints/step-000200/
#     model.safetensors       the model's state dict
#     optimizer.safetensors   AdamW moments: exp_avg/<group>/<index>, exp_avg_sq/<group>/<index>
#     state.json              step, data position, tokens seen, fingerprint, optimizer scalars, RNG states
#     checkpoint.json         format + sha256 and size of the three files above, written last
#
# Reading checks every file against checkpoint.json before parsing it; anything else in the
# checkpoints directory (an old ``step-N.pt`` pickle, a planted file) is refused, not loaded.
CHECKPOINT_FORMAT = "prefpipe-checkpoint/1"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
_MAX_JSON_BYTES = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read; the message names the file and the reason."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``step-*`` entry, or None; raises CheckpointError if it is not a checkpoint directory."""
    entries = sorted(p for p in checkpoint_dir(run_dir).glob("step-*") if not p.name.startswith("."))
    if not entries:
        return None
    newest = entries[-1]
    if not (newest.is_dir() and (newest / "checkpoint.json").is_file()):
        raise CheckpointError(
            f"{newest} is not a prefpipe checkpoint directory (step-NNNNNN/ with checkpoint.json); a pickle "
            "checkpoint (.pt, from before the safetensors format) or a foreign file is never loaded, because "
            "unpickling can run code: start a new run instead of resuming this one")
    return newest


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores no aliases: a tensor sharing storage with an earlier one (tied
    embeddings) is written as its own copy; load_state_dict copies both into the one parameter."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    return out


def save_checkpoint(run_dir: Path, step: int, *, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    meta: dict[str, Any], keep: int) -> Path:
    """Model, optimizer, RNG and ``meta`` (data position, fingerprint, ...) at ``step``.

    Written into a temp directory and renamed into place (atomic); keeps the newest ``keep``.
    """
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{step:06d}"
    tmp = d / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        _write_checkpoint(tmp, step, model_state=model_state, optimizer_state=optimizer_state, meta=meta)
    except BaseException:  # (a full disk: the half-written files would hold the space the run needs to record it)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a re-run of the same step (resume after a crash right after saving)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in d.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def _write_checkpoint(tmp: Path, step: int, *, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                      meta: dict[str, Any]) -> None:
    """The checkpoint's files into the directory ``tmp``, checkpoint.json (their sha256s) last."""
    moments = {f"{name}/{g}/{i}": t for name in ("exp_avg", "exp_avg_sq")
               for g, group in enumerate(optimizer_state[name]) for i, t in enumerate(group)}
    write_safetensors(_unshared(model_state), tmp / "model.safetensors")
    write_safetensors(_unshared(moments), tmp / "optimizer.safetensors")
    py_version, py_state, py_gauss = random.getstate()
    state = {
        **meta, "step": step,
        "optimizer": {k: v for k, v in optimizer_state.items() if k not in ("exp_avg", "exp_avg_sq")},
        "optimizer_groups": [len(g) for g in optimizer_state["exp_avg"]],
        "rng": {"torch": torch.get_rng_state().tolist(), "python": [py_version, list(py_state), py_gauss]},
    }
    (tmp / "state.json").write_text(json.dumps(state, default=str), encoding="utf-8")
    files = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in CHECKPOINT_FILES}
    for name in CHECKPOINT_FILES:
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    atomic_write_text(tmp / "checkpoint.json", json.dumps({"format": CHECKPOINT_FORMAT, "step": step, "files": files},
                                                          indent=2) + "\n")


def _read_json_checked(path: Path) -> Any:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, more than a checkpoint's JSON can be")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid UTF-8 JSON ({err})") from err


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Verify every file of the checkpoint directory against checkpoint.json, then read it.

    Returns {"model": state dict, "optimizer": AdamW state dict, "step", ...meta}; restores the
    torch and python RNG states.  Raises CheckpointError naming the file on any mismatch.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = path / "checkpoint.json"
    if not path.is_dir() or not index_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory with checkpoint.json; refusing to read it")
    index = _read_json_checked(index_path)
    if not isinstance(index, dict) or index.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{index_path}: format {index.get('format') if isinstance(index, dict) else None!r}, "
                              f"expected {CHECKPOINT_FORMAT!r}")
    files = index.get("files")
    if not isinstance(files, dict) or not all(isinstance(files.get(name), dict) for name in CHECKPOINT_FILES):
        raise CheckpointError(f"{index_path}: no sha256 record for each of {', '.join(CHECKPOINT_FILES)}")
    for name in CHECKPOINT_FILES:
        want = files[name]
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        got = sha256_file(f)
        if got != want.get("sha256"):
            raise CheckpointError(f"{f}: sha256 {got[:16]}... differs from the {str(want.get('sha256'))[:16]}... "
                                  "written when the checkpoint was saved; the file was changed or damaged")
    try:
        model_state = load_file(str(path / "model.safetensors"))
        moments = load_file(str(path / "optimizer.safetensors"))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err
    state = _read_json_checked(path / "state.json")
    try:
        groups = state.pop("optimizer_groups")
        optimizer = {**state.pop("optimizer"),
                     **{name: [[moments[f"{name}/{g}/{i}"] for i in range(n)] for g, n in enumerate(groups)]
                        for name in ("exp_avg", "exp_avg_sq")}}
        rng = state.pop("rng")
        torch_rng = torch.tensor(rng["torch"], dtype=torch.uint8)
        py_version, py_state, py_gauss = rng["python"]
        py_rng = (int(py_version), tuple(int(x) for x in py_state), py_gauss)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path / 'state.json'}: missing or malformed entry ({err!r})") from err
    torch.set_rng_state(torch_rng)
    random.setstate(py_rng)
    return {**state, "model": model_state, "optimizer": optimizer}


# ---------------------------------------------------------------- lineage
def append_lineage(store, version_id: str, record: dict[str, Any]) -> Path:
    """Append one JSON line to STORE/lineage/<version>.jsonl under the store's lock (never edits the version)."""
    path = Path(store.root) / "lineage" / f"{version_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    with store.lock(f"lineage-{version_id}"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, line)  # one write of one line with O_APPEND: never interleaved
                if written != len(line):  # a full disk takes part of the line and says so only by the count
                    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {written} of {len(line)} bytes "
                                                "of a lineage line)", str(path))
                os.fsync(fd)
            except OSError:
                # a torn line would glue the next event to it (both unreadable): cut back to the whole lines
                # (the lock is held: no other appender wrote since the size was read)
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    return path


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
