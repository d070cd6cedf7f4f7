#!/usr/bin/env bash
# `make test`: ruff, the main suite in .venv, then the torch_xla suite in .venv-xla. Building .venv-xla
# (scripts/setup_xla.sh: ~4 minutes on a fresh machine, mostly download and unpacking) overlaps the main
# suite instead of following it. Extra arguments go to the main suite's pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
log=$(mktemp)
bash scripts/setup_xla.sh > "$log" 2>&1 &
xla_setup=$!
status=0
# Two workers, each taking a whole test module at a time (module fixtures are built once): one worker's process and
# Ray starts overlap the other's compute (tests/conftest.py: LONGEST_FIRST). One torch thread per process (Ray's
# workers inherit OMP_NUM_THREADS): two workers of 2 threads each on 2 cores made compute-bound tests up to 4x slower.
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 "$@" || status=$?
if ! wait "$xla_setup"; then
  cat "$log"; echo "test: scripts/setup_xla.sh failed ($(df -h --output=avail . | tail -1 | tr -d ' ') free)"; exit 1
fi
rm -f "$log"
[ "$status" = 0 ] || exit "$status"
bash scripts/test_xla.sh
