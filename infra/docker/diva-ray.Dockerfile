# syntax=docker/dockerfile:1
# The DiVA stages on Ray, CPU or CUDA: the image of the KubeRay head and workers for GPU clusters.
# Build from the repository root (the context is the repo; diva-ray.Dockerfile.dockerignore keeps it
# to what the image needs):
#
#   docker build -f infra/docker/diva-ray.Dockerfile -t diva-ray:0.1.0-cuda .
#   docker build -f infra/docker/diva-ray.Dockerfile -t diva-ray:0.1.0-cpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# Base: python:3.11-slim rather than rayproject/ray. The project pins its own Ray and torch (one
# version on every node and in the client that submits jobs), and rayproject/ray's images bring
# another Python environment with their own Ray, and a CUDA toolkit that torch's wheels already
# carry (the driver comes from the node). What KubeRay needs from an image is here: `ray` on PATH,
# bash, and wget for its health probes.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# The versions the project is tested with: Ray for the whole cluster, torch as scripts/setup.sh.
ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0
# PyPI's torch is the CUDA build; the CPU build comes from https://download.pytorch.org/whl/cpu.
ARG TORCH_INDEX_URL=https://pypi.org/simple

RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 ray

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv $VIRTUAL_ENV && pip install --upgrade pip

# torch first and alone, from its index; the project's `torch>=` is then already met.
RUN pip install --index-url $TORCH_INDEX_URL torch==$TORCH_VERSION

COPY pyproject.toml README.md /opt/diva/
COPY pipeline /opt/diva/pipeline
COPY jobs /opt/diva/jobs
# Installed, not only copied: `python -m jobs.<stage>` works from any directory, and a job submitted
# with --working-dir runs its own copy of the code first.
RUN pip install torch==$TORCH_VERSION "ray[default]==$RAY_VERSION" /opt/diva

USER ray
WORKDIR /home/ray
