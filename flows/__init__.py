"""Prefect flows and the CLI (wiring only)."""
import os

# Defaults for running on Prefect's temporary local server on a small, busy machine:
# no telemetry (the network is closed) and a generous start-up timeout (the default 20 s is
# too tight when both cores are busy).  Any value set by the user wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Polars allocates through jemalloc, which by default keeps freed pages mapped for 10 s: a curate
# that frees a history-sized frame before its peak still holds it in RSS then (the 3M child of
# benchmarks/incremental.py: 2.4 GB peak by default, 2.1 GB returning pages at once but 1-1.5 s
# slower, 2.25 GB and no slower with this: pages returned after 0.5 s by a background thread).
# Longer decays fault less and run faster for more peak (1M judgments: ~7 % faster, 0.2-0.3 GB more; the 10k child of
# a 10M version: 3.9 instead of 3.65 GB): measured and not taken, docs/scale-out.md "Session 30".
# Read when Polars first allocates, so set before it is imported; a value set by the user wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:true,dirty_decay_ms:500,muzzy_decay_ms:0")
# Arrow (pyarrow) allocates through mimalloc, which gives freed pages back to the system 10 ms after they are
# freed; the next read or write maps and faults them in again.  On a VM whose balloon reports free pages to the
# host (virtio-balloon free page reporting, as on this project's machines) each such page costs a host fault too.
# Kept 5 s: a 10M-judgment curate 510.9 -> 491.3 s (system CPU 242.7 -> 210.7 s), peak 3.73 -> 3.75 GB; 3M
# 157.9-158.3 -> 152.2 s, peak +0.07 GB (docs/scale-out.md "Session 41").  Read lazily by mimalloc, set before
# pyarrow allocates; a value set by the user wins (a Dask worker started elsewhere needs it in its own environment).
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "5000")
