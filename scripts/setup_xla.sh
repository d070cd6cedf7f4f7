#!/usr/bin/env bash
# Create or update .venv-xla, the torch_xla environment (torch_xla 2.9 pins torch 2.9.0, so it cannot
# share .venv, which has the newer CPU torch); does nothing when it is current. XLA_EXTRA picks
# torch_xla's extra: empty (default) for the CPU tests (PJRT_DEVICE=CPU), XLA_EXTRA=tpu on a TPU VM
# (adds libtpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
XLA_EXTRA=${XLA_EXTRA:-}
VENV=.venv-xla
want=$(cat pyproject.toml scripts/setup_xla.sh | sha256sum | cut -c1-16)-${XLA_EXTRA:-cpu}
if [ -x $VENV/bin/python ] && [ "$(cat $VENV/.stamp 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
$VENV/bin/python -m pip install -q --upgrade pip
# torch_xla's torch, held by a constraint so that no later requirement (the project's torch>=,
# transformers, ray) moves it. From PyPI torch 2.9.0 is the CUDA build (~4 GB with its nvidia-*
# wheels, not cached: pip's cache would hold another ~4 GB of them); the CPU-only index is not assumed reachable.
# The pins are the `tpu` extra's in pyproject.toml (the one place they are written).
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
$VENV/bin/python - pyproject.toml > "$constraints" <<'PY'
import sys, tomllib
extra = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["tpu"]
print("\n".join(r for r in extra if r.split("==")[0] in ("torch", "torch_xla")))
PY
xla_pin=$(grep '^torch_xla==' "$constraints")
[ -z "$XLA_EXTRA" ] || xla_pin="torch_xla[$XLA_EXTRA]==${xla_pin#torch_xla==}"
$VENV/bin/python -m pip install -q --no-cache-dir -c "$constraints" "$(grep '^torch==' "$constraints")" "$xla_pin"
$VENV/bin/python -m pip install -q -c "$constraints" -e '.[dev,tpu]'
echo "$want" > $VENV/.stamp
echo "setup_xla: $VENV ready ($(PJRT_DEVICE=CPU $VENV/bin/python -c 'import torch, torch_xla, ray, transformers
print("torch", torch.__version__, "torch_xla", torch_xla.__version__, "ray", ray.__version__,
      "transformers", transformers.__version__)'))"
