#!/usr/bin/env bash
# Regenerate requirements.lock: resolve pyproject.toml (+ test extra) in a fresh venv, then freeze it.
# prefect 3.8.8 needs fastapi<0.151; torch==2.13.0 resolves to the CPU wheel in pip's local wheel dir.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python3.11 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet -e ".[test]"
{
  echo "# Fully pinned lock of runtime + test dependencies (Python 3.11, linux x86_64, CPU torch)."
  echo "# Regenerate: scripts/lock.sh (fresh venv from pyproject.toml, then pip freeze --all)."
  "$tmp/venv/bin/pip" freeze --all | grep -v -E "^(-e |prefpipe|pip==)"
} > requirements.lock
rm -rf "$tmp"
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) pins)"
