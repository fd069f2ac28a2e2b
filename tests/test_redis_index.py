"""The MinHash prompt index on a real Redis (datasketch's Redis storage), as used for scale-out.

The test starts its own ``redis-server`` on a free 127.0.0.1 port and stops it.  Without the
binary it skips with the reason, except under CI (``CI=true``), where ``.ci/run`` installs it
and a missing server is a failure.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from pipeline.checks.near_duplicates import PromptIndex
from schemas.policy import NearDuplicateConfig

REDIS = shutil.which("redis-server")

PROMPTS = [
    "How do I reset my password if I no longer have access to my recovery email address?",
    "What is the best way to store fresh basil so it does not wilt within a day?",
    "Explain the difference between a mutex and a semaphore with a short example in C.",
    "Can you recommend a three day itinerary for Kyoto in autumn, avoiding the biggest crowds?",
]
EDITED = "how do I reset my password if I no longer have access to my recovery e-mail address"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_port():
    if REDIS is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed; .ci/run should have installed the Debian package redis-server")
        pytest.skip("redis-server not installed (Debian package redis-server); .ci/run installs it in CI")
    pytest.importorskip("redis")
    port = _free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_backed_index_shared_between_workers(redis_port, tmp_path):
    cfg = NearDuplicateConfig()
    storage = {"type": "redis", "redis": {"host": "127.0.0.1", "port": redis_port}}
    first = PromptIndex(cfg, storage_config=storage, basename=b"test-shared")
    first.add([f"k{i}" for i in range(len(PROMPTS))], PROMPTS)
    assert first._lsh is not None and len(first) == 4

    # a second worker (new object, same Redis basename) sees the first worker's LSH bands
    import redis

    r = redis.Redis(host="127.0.0.1", port=redis_port)
    assert any(k.startswith(b"test-shared") for k in r.keys("*"))
    path = first.save(tmp_path / "index.npz")
    second = PromptIndex.load(path, cfg, storage_config=storage, basename=b"test-shared")
    hits = second.query([EDITED])
    assert hits["key"].to_list() == ["k0"] and hits["jaccard"][0] >= cfg.threshold
    assert second.query(["A completely unrelated question about the migration patterns of arctic terns"]).height == 0

    # adding through the Redis-backed index finds the near duplicate among earlier prompts
    second.add(["k-edit"], [EDITED])
    edges = second.edge_frame()
    assert {tuple(sorted(e)) for e in edges.select("left", "right").iter_rows()} == {("k-edit", "k0")}


def test_redis_and_memory_backends_agree(redis_port):
    cfg = NearDuplicateConfig()
    texts = PROMPTS + [EDITED, PROMPTS[2].upper(), PROMPTS[3].replace("three", "four")]
    keys = [f"t{i}" for i in range(len(texts))]
    mem = PromptIndex(cfg)
    mem.add(keys, texts)
    red = PromptIndex(cfg, storage_config={"type": "redis", "redis": {"host": "127.0.0.1", "port": redis_port}},
                      basename=b"test-agree")
    red.add(keys, texts)
    as_set = lambda idx: {tuple(sorted(e)) for e in idx.edge_frame().select("left", "right").iter_rows()}  # noqa: E731
    assert as_set(mem) == as_set(red) and len(as_set(mem)) == 3
