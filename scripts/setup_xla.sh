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
# wheels); the CPU-only index is not assumed reachable.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'torch==2.9.0\ntorch_xla==2.9.0\n' > "$constraints"
xla="torch_xla==2.9.0"
[ -z "$XLA_EXTRA" ] || xla="torch_xla[$XLA_EXTRA]==2.9.0"
$VENV/bin/python -m pip install -q -c "$constraints" torch==2.9.0 "$xla"
$VENV/bin/python -m pip install -q -c "$constraints" -e '.[dev,tpu]'
echo "$want" > $VENV/.stamp
echo "setup_xla: $VENV ready ($(PJRT_DEVICE=CPU $VENV/bin/python -c 'import torch, torch_xla, ray, transformers
print("torch", torch.__version__, "torch_xla", torch_xla.__version__, "ray", ray.__version__,
      "transformers", transformers.__version__)'))"
