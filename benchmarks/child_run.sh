#!/bin/bash
# One side of a farm-bench pair for the incremental child (docs/incremental.md):
#   farm-bench -n 3 --warmup 1 "benchmarks/child_run.sh WT_A STORE_A PARENT_A" --vs "benchmarks/child_run.sh WT_B STORE_B PARENT_B"
# A CLI `prefpipe curate --parent PARENT` of the 10k batch, run from checkout WORKTREE, into a fresh
# hard-linked copy of STORE holding only PARENT (each side's parent built by its own code: run
# `benchmarks/incremental.py --parent-judgments 3000000` from that checkout first; the store is
# /tmp/prefpipe-bench/incremental-3000000-<code_version>).  PYTHON: the interpreter (default: .venv of
# this checkout).  The child's record (timings_s) is left in $TMPDIR/child-run.*.json.
# AS_CODE=<code version of PARENT>: both sides on one parent, each checkout's code_version() reported
# as that one (benchmarks/_cli_as_code.py; only for changes that do not change what a version
# stores -- both sides must print the same child version id).
set -euo pipefail
WT=$1; STORE=$2; P=$3
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
BATCH=${BATCH:-/tmp/prefpipe-bench/child-batch-s1-v2-10000-1000.jsonl}
D=$(mktemp -d "${TMPDIR:-/tmp}/child-run.XXXX"); mkdir "$D/versions"
trap 'rm -rf "$D"' EXIT
cp -al "$STORE/objects" "$D/objects"; cp -al "$STORE/versions/$P" "$D/versions/"
if [ -n "${AS_CODE:-}" ]; then CLI=("$HERE/benchmarks/_cli_as_code.py"); else CLI=(-m flows.cli); fi
cd "$WT" && "$PY" "${CLI[@]}" curate "$BATCH" --store "$D" --parent "$P" --json > "$D.json"
