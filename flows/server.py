"""A local Prefect server for ``prefpipe serve`` when none is configured.

Prefect's temporary (ephemeral) server runs flows but not the scheduler service, so
scheduled runs of a served deployment would never be created.  ``prefpipe serve`` without
``PREFECT_API_URL`` therefore starts ``prefect server start`` on 127.0.0.1 (with the UI), or
reuses a server already answering on that port, and points the process at it.  With
``PREFECT_API_URL`` set nothing is started: the configured server (e.g. PostgreSQL-backed,
see docs/scale-out.md) is used as is.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:  # noqa: S310 (local URL)
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _die_with_parent() -> None:
    """In the server's child process (Linux): SIGTERM when ``prefpipe serve`` dies, even by SIGKILL
    -- the ``finally`` below stops it otherwise, and a server left behind would hold the port."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(cmd: list[str], out: Any, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The server process: its own session (a Ctrl-C in serve's terminal is serve's to handle), and
    gone with serve (:func:`_die_with_parent`)."""
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent)


@contextlib.contextmanager
def local_server(port: int = 4200, *, log_path: Path | None = None, startup_timeout: float = 180.0) -> Iterator[str]:
    """Yield the API URL of a Prefect server on 127.0.0.1:``port``; start one if none answers
    there, and stop it again on exit.  Sets ``PREFECT_API_URL`` for this process (must be
    called before ``prefect`` is imported)."""
    api = f"http://127.0.0.1:{port}/api"
    proc = None
    if not _healthy(api):
        env = dict(os.environ)
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        env.pop("PREFECT_API_URL", None)
        if log_path:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
        proc = _spawn([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                      out, env)
        deadline = time.monotonic() + startup_timeout
        while not _healthy(api):
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with code {proc.returncode} while starting"
                                   + (f"; see {log_path}" if log_path else ""))
            if time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError(f"prefect server did not answer on {api} within {startup_timeout:.0f} s")
            time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = api
    try:
        yield api
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
