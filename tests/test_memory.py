"""pipeline/memory.py: freed heap memory goes back to the system (glibc; a fresh interpreter each)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

SCRIPT = r"""
import sys
from pipeline import memory
def rss():
    for ln in open("/proc/self/status"):
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1]) >> 10
mode = sys.argv[1]
libc = memory._libc()
libc.mallopt(-1, 1 << 30)                    # M_TRIM_THRESHOLD: free() never trims the heap's top by itself
if mode == "bound":
    assert memory.bound_heap()
else:
    libc.mallopt(-3, 32 << 20)               # M_MMAP_THRESHOLD at its ceiling: blocks below 32 MiB come from the heap
before = rss()
held = [bytearray(b"x" * (5 << 20)) for _ in range(120)]  # 600 MiB of 5 MiB blocks, written
pin = bytearray(b"y" * (5 << 20))            # the heap's top stays in use: only an inner trim helps
del held
if mode == "release":
    memory.release()
print(rss() - before)
"""
# (glibc's own default gets there too -- its threshold rises to the largest block freed -- but how far it
# has risen depends on the interpreter's history; the script sets the state it starts from)


def _grown(mode: str) -> int:
    # a clean environment (no allocator settings, preloads or PYTHONMALLOC a test run may carry), the repo on the path
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    return int(out.stdout.split()[0])


def test_freed_heap_blocks_stay_resident_unless_released_or_mapped_on_their_own():
    assert _grown("keep") > 400  # the control: freed, but still resident
    assert _grown("release") < 100  # malloc_trim gave the pages back
    assert _grown("bound") < 100  # 5 MiB blocks, above the fixed 4 MiB threshold: unmapped when freed


ARROW_SCRIPT = r"""
import sys, time
import flows  # noqa: F401 - the CLI's allocator defaults
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
def rss():
    for ln in open("/proc/self/status"):
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1]) >> 10
x = np.arange(20_000_000)
a = pa.array(x)
before = rss()
b = pc.multiply(pc.add(a, 1), 2)  # two 160 MB Arrow buffers, one of them freed at once
del b
t = time.perf_counter()
while time.perf_counter() - t < 0.3:  # small Arrow allocations: mimalloc purges what is due on such calls
    pc.add(pa.array(x[:1000]), 1)
if sys.argv[1:] == ["release"]:  # what a curate does at its ingest's end
    from pipeline import memory
    memory.release(arrow=True)
print(rss() - before)
"""


def _arrow_retained(purge_delay: str | None, *args: str) -> int:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    if purge_delay is not None:
        env["MIMALLOC_PURGE_DELAY"] = purge_delay
    out = subprocess.run([sys.executable, "-c", ARROW_SCRIPT, *args], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    return int(out.stdout.split()[-1])


def test_the_cli_keeps_arrows_freed_pages_a_while_and_a_users_setting_wins():
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "mimalloc":
        pytest.skip("pyarrow's default pool is not mimalloc here")
    assert _arrow_retained(None) > 250  # flows' default (5 s): both freed buffers still resident 0.3 s later
    assert _arrow_retained("0") < 200  # the user's setting: given back at once


def test_a_stage_end_gives_arrows_kept_pages_back():
    """A curate's ingest ends with ``memory.release(arrow=True)``: the Arrow pages kept for the next task go then,
    not up to 5 s into the checks, where they raised the 1M build's peak (1.25-1.61 GB, often over the 1.5 GB bound)."""
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "mimalloc":
        pytest.skip("pyarrow's default pool is not mimalloc here")
    assert _arrow_retained(None) > 250  # the control: kept
    assert _arrow_retained(None, "release") < 200  # given back by the stage's release


READER_SCRIPT = r"""
import resource, sys
from pipeline import memory
from pipeline.readers import iter_line_blocks
assert memory.bound_heap()                  # the CLI's setting: blocks from 4 MiB up mapped fresh each time
path, lines = sys.argv[1], 0
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for block in iter_line_blocks(path, 1 << 30, block_bytes=8 << 20):
    lines += len(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, lines)
"""


def test_the_line_reader_reads_into_buffers_it_uses_again(tmp_path: Path):
    # 96 MiB of lines in 8 MiB reads: a fresh buffer per read (and another for the line carried over from the
    # read before) faults in ~2 x 24,576 pages; reused buffers fault in their few first ones only
    line = b'{"prompt": "' + b"p" * 900 + b'"}\n'
    path = tmp_path / "big.jsonl"
    path.write_bytes(line * ((96 << 20) // len(line)))
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", READER_SCRIPT, str(path)], capture_output=True, text=True, check=True,
                         env=env, cwd=ROOT)
    faults, lines = map(int, out.stdout.split())
    assert lines == (96 << 20) // len(line)
    assert faults < 15_000, faults  # (the code before: ~49,000)
