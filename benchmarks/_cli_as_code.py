"""The prefpipe CLI of the checkout in the working directory, with ``code_version()`` reported as
``$AS_CODE`` -- for a side-by-side benchmark of two checkouts on one parent (``child_run.sh``).

A child trusts its parent's state only when the parent was built by the same code version; two
checkouts whose changes do not change what a version stores (the same child version id on both
sides: check it) can then run on one parent instead of each building its own.  A benchmark tool
only: never use it to curate data you keep."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.getcwd())
import schemas.version as version  # noqa: E402

_AS = os.environ["AS_CODE"]
version.code_version = lambda parts=("schemas", "pipeline"): _AS  # type: ignore[assignment]

from flows.cli import app  # noqa: E402

app(prog_name="prefpipe")
