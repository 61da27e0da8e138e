#!/usr/bin/env bash
# One-off set-up of the team stack (the airflow-init service), before the Airflow components start;
# safe to run again:
#   1. the workspace the DAG tasks run in: a git clone of LLMOPS_GIT_URL at LLMOPS_GIT_REF in the
#      shared `workspace` volume (DVC experiments need git; a retried task finds the same checkout);
#   2. its DVC remote, from LLMOPS_DVC_REMOTE (`llmops settings --configure-dvc`), and the data
#      and models already pushed there;
#   3. Airflow's database schema and the admin account (AIRFLOW_ADMIN_USER / AIRFLOW_ADMIN_PASSWORD).
set -euo pipefail
workspace=${AIRFLOW_VAR_LLMOPS_REPO:-/opt/llmops/workspace}

if [ ! -d "$workspace/.git" ]; then
  : "${LLMOPS_GIT_URL:?set LLMOPS_GIT_URL in docker/.env: the repository the stack trains from}"
  echo "airflow-init: cloning ${LLMOPS_GIT_URL%%\?*} (${LLMOPS_GIT_REF:-main}) into $workspace"
  git clone --quiet --branch "${LLMOPS_GIT_REF:-main}" "$LLMOPS_GIT_URL" "$workspace"
fi
cd "$workspace"
# `dvc exp save` (the DAG's experiment_save task) records each run as a git commit.
git config user.name >/dev/null || git config user.name "llmops airflow"
git config user.email >/dev/null || git config user.email "airflow@llmops.invalid"
llmops settings --configure-dvc
dvc pull --quiet || echo "airflow-init: nothing pulled from the DVC remote yet (a new remote is empty)"

airflow db migrate
if ! airflow users list --output plain 2>/dev/null | awk '{print $2}' | grep -qx "${AIRFLOW_ADMIN_USER:?}"; then
  airflow users create --role Admin --username "$AIRFLOW_ADMIN_USER" --password "${AIRFLOW_ADMIN_PASSWORD:?}" \
    --firstname LLMOps --lastname Admin --email "${AIRFLOW_ADMIN_EMAIL:-admin@llmops.invalid}"
fi
echo "airflow-init: done"
