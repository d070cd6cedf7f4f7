#!/usr/bin/env bash
# The torch_xla tests (tests/xla) in .venv-xla, on 4 virtual XLA devices of the CPU: creates/updates
# .venv-xla first (scripts/setup_xla.sh: ~4 minutes the first time, instant after). Extra arguments
# go to pytest, e.g. `bash scripts/test_xla.sh -m "not slow"` for the in-process tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_xla.sh
# Before torch_xla starts (tests/xla/conftest.py sets the same defaults): CPU devices for SPMD.
export PJRT_DEVICE=CPU CPU_NUM_DEVICES=4
exec .venv-xla/bin/python -m pytest -q -p no:cacheprovider tests/xla "$@"
