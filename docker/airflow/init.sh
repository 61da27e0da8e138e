#!/usr/bin/env bash
# One-off set-up of the team stack (the airflow-init service), before the Airflow components start;
# safe to run again:
#   1. the workspace the DAG tasks run in: a git clone of LLMOPS_GIT_URL at LLMOPS_GIT_REF in the
#      shared `workspace` volume (DVC experiments need git; a retried task finds the same checkout);
#   2. its DVC remote, from LLMOPS_DVC_REMOTE (`llmops settings --configure-dvc`), and the data
#      and models already pushed there;
#   3. Airflow's database schema and the admin account (AIRFLOW_ADMIN_USER / AIRFLOW_ADMIN_PASSWORD).
#
# A private repository's token (LLMOPS_GIT_TOKEN, or written into the URL as
# https://user:<token>@host/...) never reaches the log, the clone's .git/config or a command
# line: the URL is stripped of it, and git asks a credential helper that reads it from this
# process's environment (git's own mechanism: gitcredentials(7)). The workspace keeps the plain
# URL, so the DAG tasks, which share the volume, never see the token.
set -euo pipefail
workspace=${AIRFLOW_VAR_LLMOPS_REPO:-/opt/llmops/workspace}

# https://user:secret@host/path?query -> https://host/path (and the user and secret apart)
git_url=${LLMOPS_GIT_URL:-}
git_user=${LLMOPS_GIT_USER:-}
export LLMOPS_GIT_SECRET=${LLMOPS_GIT_TOKEN:-}
if [[ $git_url =~ ^([a-z][a-z0-9+.-]*://)([^/@]*)@(.*)$ ]]; then
  credentials=${BASH_REMATCH[2]}
  git_url=${BASH_REMATCH[1]}${BASH_REMATCH[3]}
  if [[ $credentials == *:* ]]; then
    git_user=${git_user:-${credentials%%:*}}
    LLMOPS_GIT_SECRET=${LLMOPS_GIT_SECRET:-${credentials#*:}}
  else
    git_user=${git_user:-$credentials}
  fi
fi
unset LLMOPS_GIT_URL LLMOPS_GIT_TOKEN credentials  # nothing below (dvc, airflow) inherits them
shown_url=${git_url%%\?*}
export LLMOPS_GIT_USERNAME=${git_user:-x-access-token}
# The helper prints the values when git asks; single quotes: the variables are expanded by the
# helper's shell at that moment, so the secret is in no argument list (`ps`) and no file.
# shellcheck disable=SC2016
helper='!f() { test "$1" = get || return 0; echo "username=$LLMOPS_GIT_USERNAME"; echo "password=$LLMOPS_GIT_SECRET"; }; f'
git_auth() {
  if [ -n "$LLMOPS_GIT_SECRET" ]; then
    GIT_TERMINAL_PROMPT=0 git -c credential.helper= -c "credential.helper=$helper" "$@"
  else
    GIT_TERMINAL_PROMPT=0 git "$@"
  fi
}

if [ ! -d "$workspace/.git" ]; then
  : "${git_url:?set LLMOPS_GIT_URL in docker/.env: the repository the stack trains from}"
  echo "airflow-init: cloning $shown_url (${LLMOPS_GIT_REF:-main}) into $workspace"
  if ! error=$(git_auth clone --quiet --branch "${LLMOPS_GIT_REF:-main}" "$git_url" "$workspace" 2>&1); then
    # git's own message, with anything that still looks like user:secret@ masked
    sed -e 's#[^/@[:space:]]*:[^/@[:space:]]*@#***@#g' <<<"$error" >&2
    echo "airflow-init: cloning $shown_url failed (a private repository needs LLMOPS_GIT_TOKEN)" >&2
    exit 1
  fi
fi
cd "$workspace"
# A clone made before this script stripped tokens: drop the one its remote URL still carries.
origin=$(git remote get-url origin 2>/dev/null || true)
if [[ $origin =~ ^([a-z][a-z0-9+.-]*://)[^/@]*@(.*)$ ]]; then
  git remote set-url origin "${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
  echo "airflow-init: removed the credentials from the workspace's remote URL"
fi
unset LLMOPS_GIT_SECRET
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
