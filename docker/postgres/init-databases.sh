#!/usr/bin/env bash
# One role and one database per service, created when the PostgreSQL data volume is new
# (mounted into /docker-entrypoint-initdb.d by docker/compose.yaml). Safe to run again: existing
# roles and databases are left alone. The team-mode test runs this same script against its
# throw-away cluster (tests/integration/test_team_mode.py).
#
#   airflow  / airflow       Airflow's metadata (and the Celery result backend)
#   mlflow   / mlflow        MLflow's tracking store and Model Registry
#   mlflow   / mlflow_auth   MLflow's users and permissions (basic auth)
#   llmops   / inference     the inference log `llmops serve` writes and `llmops monitor` reads
#   llmops   / sweeps        the Optuna studies of `llmops sweep` (workers share a study's trials)
#   labelstudio / labelstudio  Label Studio's projects, tasks, annotations and users (the review tool)
#
# On a stack whose postgres volume was created before a database was added here, run it again:
#   docker compose -f docker/compose.yaml exec postgres bash /docker-entrypoint-initdb.d/10-databases.sh
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?}" "${MLFLOW_DB_PASSWORD:?}" "${INFERENCE_DB_PASSWORD:?}"

create() {  # role database password
  psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    --set=role="$1" --set=db="$2" --set=pw="$3" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'role', :'pw')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role')\gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'db')\gexec
SQL
}

create airflow airflow "$AIRFLOW_DB_PASSWORD"
create mlflow mlflow "$MLFLOW_DB_PASSWORD"
create mlflow mlflow_auth "$MLFLOW_DB_PASSWORD"
create llmops inference "$INFERENCE_DB_PASSWORD"
create llmops sweeps "$INFERENCE_DB_PASSWORD"
# compose.yaml always sets LABEL_STUDIO_DB_PASSWORD (it is required there); without it the review
# tool's database is skipped, so a cluster made for the pipeline's databases alone needs no password for it
if [[ -n "${LABEL_STUDIO_DB_PASSWORD:-}" ]]; then
  create labelstudio labelstudio "$LABEL_STUDIO_DB_PASSWORD"
fi
