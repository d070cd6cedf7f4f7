# syntax=docker/dockerfile:1
# The DiVA stages on Ray with torch_xla for TPUs: the image of the KubeRay head and TPU workers on
# GKE (the head runs it too, so that the whole cluster has one environment). Build from the
# repository root (diva-ray-tpu.Dockerfile.dockerignore keeps the context to what the image needs):
#
#   docker build -f infra/docker/diva-ray-tpu.Dockerfile -t diva-ray-tpu:0.1.0 .
#
# Base: python:3.11-slim rather than rayproject/ray, for the reasons in diva-ray.Dockerfile; here
# also because torch_xla 2.9 pins torch 2.9.0, which no Ray image carries. torch is the CPU build:
# torch_xla drives the TPU through libtpu (its `tpu` extra), and PyPI's torch would add ~4 GB of
# CUDA wheels.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# The project's `tpu` extra pins torch_xla and its torch; Ray is the version of the whole cluster.
ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.9.0
ARG TORCH_XLA_VERSION=2.9.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 ray

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv $VIRTUAL_ENV && pip install --upgrade pip

RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==$TORCH_VERSION

COPY pyproject.toml README.md /opt/diva/
COPY pipeline /opt/diva/pipeline
COPY jobs /opt/diva/jobs
# torch pinned again so that nothing moves it; torch_xla[tpu] brings libtpu.
RUN pip install torch==$TORCH_VERSION "torch_xla[tpu]==$TORCH_XLA_VERSION" "ray[default]==$RAY_VERSION" \
        "/opt/diva[tpu]"

USER ray
WORKDIR /home/ray
