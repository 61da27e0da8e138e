#!/usr/bin/env bash
# HEALTHCHECK of the airflow and trainer images. One image runs every Airflow component, so this
# checks the one this container runs, read from PID 1's command line (the official checks of
# Airflow's docker-compose: the api-server's version endpoint, the scheduler's health server,
# the job heartbeat of the dag-processor and the triggerer, a Celery ping of the worker).
set -euo pipefail
cmdline=$(tr '\0' ' ' <"${HEALTHCHECK_CMDLINE:-/proc/1/cmdline}")
case "$cmdline" in
  *" api-server"*) exec curl --fail --silent --show-error --max-time 10 -o /dev/null http://localhost:8080/api/v2/version ;;
  *" scheduler"*) exec curl --fail --silent --show-error --max-time 10 -o /dev/null http://localhost:8974/health ;;
  *" dag-processor"*) exec airflow jobs check --job-type DagProcessorJob --hostname "$HOSTNAME" ;;
  *" triggerer"*) exec airflow jobs check --job-type TriggererJob --hostname "$HOSTNAME" ;;
  *"celery worker"*)
    exec celery --app airflow.providers.celery.executors.celery_executor.app inspect ping -d "celery@$HOSTNAME" ;;
  *) exit 0 ;;  # a one-off command (airflow-init, `llmops ...`): nothing long-running to check
esac
