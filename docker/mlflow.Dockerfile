# syntax=docker/dockerfile:1.7
# The MLflow tracking server of the team stack: PostgreSQL for runs and the Model Registry,
# S3 (MinIO) for artifacts (proxied: clients need no S3 credentials), basic auth on, nothing
# readable without a grant (entrypoint.sh); init_users.py makes the services' users (mlflow-init).
# The same MLflow release as the project's clients (pyproject.toml).
#
#   docker build -f docker/mlflow.Dockerfile -t llmops/mlflow:dev .

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/mlflow/bin:$PATH
RUN python -m venv /opt/mlflow \
 && pip install "mlflow[auth]==3.17.2" "psycopg2-binary==2.9.13" "boto3==1.44.8"

FROM python:3.11.13-slim-bookworm
RUN useradd --create-home --uid 10001 --user-group mlflow
COPY --from=build /opt/mlflow /opt/mlflow
COPY --chmod=0755 docker/mlflow/entrypoint.sh /usr/local/bin/mlflow-entrypoint
# the stack's one-off user set-up (the mlflow-init service of docker/compose.yaml)
COPY --chmod=0644 docker/mlflow/init_users.py /opt/mlflow/init_users.py
ENV PATH=/opt/mlflow/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow-entrypoint"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
