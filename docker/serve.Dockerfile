# syntax=docker/dockerfile:1.7
# The serving image: `llmops serve`, the registry's champion behind the OpenAI-compatible API
# (docs/serving.md). Build from the repository root (docker/README.md):
#
#   docker build -f docker/serve.Dockerfile -t llmops/serve:dev .
#
# CPU torch by default. On GPUs, serve from the trainer image (`llmops serve` runs there too) or
# put a GPU engine such as vLLM in front (docs/scaling.md).

# --- build: a virtualenv with torch and the project (compilers and pip caches stay here) ----------
FROM python:3.11.13-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/llmops/venv/bin:$PATH
RUN python -m venv /opt/llmops/venv \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /opt/llmops/src
COPY pyproject.toml README.md ./
COPY pipelines ./pipelines
RUN pip install "/opt/llmops/src[postgres]"

# --- runtime ------------------------------------------------------------------------------------
FROM python:3.11.13-slim-bookworm
RUN useradd --create-home --uid 10001 --user-group llmops
COPY --from=build /opt/llmops/venv /opt/llmops/venv
WORKDIR /opt/llmops/src
# params.yaml: the serve, registry, tracking and inference_log sections; everything that differs
# between deployments comes from the environment (pipelines/settings.py, docker/compose.yaml).
COPY params.yaml ./
RUN mkdir -p data/inference && chown llmops:llmops data/inference
# (TOKENIZERS_PARALLELISM holds no secret: DL3064 ignored.)
# hadolint ignore=DL3064
ENV PATH=/opt/llmops/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
USER 10001
EXPOSE 8000
# /ready: 200 once a model version is loaded (the start period covers the first load).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
CMD ["llmops", "serve", "--set", "serve.host=0.0.0.0"]
