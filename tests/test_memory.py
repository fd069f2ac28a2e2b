"""pipeline/memory.py: freed heap memory goes back to the system (glibc; a fresh interpreter each)."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

SCRIPT = r"""
import sys
from pipeline import memory
def rss():
    for ln in open("/proc/self/status"):
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1]) >> 10
mode = sys.argv[1]
if mode == "bound":
    assert memory.bound_heap()
big = bytearray(30 << 20); del big          # glibc's dynamic threshold: blocks below 30 MiB now come from its heap
before = rss()
held = [bytearray(b"x" * (5 << 20)) for _ in range(120)]  # 600 MiB of 5 MiB blocks, written
pin = bytearray(b"y" * (5 << 20))            # the heap's top stays in use: only an inner trim helps
del held
if mode == "release":
    memory.release()
print(rss() - before)
"""


def _grown(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_freed_heap_blocks_stay_resident_unless_released_or_mapped_on_their_own():
    assert _grown("keep") > 400  # the control: freed, but still resident
    assert _grown("release") < 100  # malloc_trim gave the pages back
    assert _grown("bound") < 100  # 5 MiB blocks, above the fixed 4 MiB threshold: unmapped when freed
