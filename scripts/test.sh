#!/usr/bin/env bash
# `make test`: ruff, then the main suite in .venv and, beside it, the torch_xla suite in .venv-xla (built first by
# scripts/setup_xla.sh: ~4 minutes on a fresh machine, mostly download and unpacking). They run side by side
# because on 2 cores the main suite alone leaves about a third of the CPU idle (its jobs wait on Ray start-ups
# and subprocesses); each suite has a Ray of its own. Extra arguments go to the main suite's pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
log=$(mktemp)
bash scripts/test_xla.sh > "$log" 2>&1 &
xla=$!
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@" || status=$?
xla_status=0
wait "$xla" || xla_status=$?
echo "--- the torch_xla suite (scripts/test_xla.sh) ---"
cat "$log"
rm -f "$log"
[ "$status" = 0 ] || exit "$status"
exit "$xla_status"
