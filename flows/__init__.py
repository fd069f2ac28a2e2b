"""Prefect flows and the CLI (wiring only)."""
import os

# Defaults for running on Prefect's temporary local server on a small, busy machine:
# no telemetry (the network is closed) and a generous start-up timeout (the default 20 s is
# too tight when both cores are busy).  Any value set by the user wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
