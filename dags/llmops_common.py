"""Shared by the llmops DAG files: where the project is, how a task runs a command, notifications.

Only Airflow and the standard library: the DAG processor imports this on every parse. It is
listed in .airflowignore, so the processor does not look for DAGs in it.

Where things are, at run time (Airflow Variables; set them in the UI, with `airflow variables
set`, or as environment variables AIRFLOW_VAR_<NAME>):
  llmops_repo    the project checkout the tasks run in (default: the folder above dags/)
  llmops_bin     the folder holding `llmops` and `dvc` (default: the interpreter's folder)
  llmops_notify  where failures go: `log` (default), `smtp:<conn_id>:<to>` or
                 `slack:<conn_id>:<#channel>` (needs apache-airflow-providers-slack)
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

log = logging.getLogger("llmops.dags")

OWNER = "llmops"
DEFAULT_REPO = str(Path(__file__).resolve().parents[1])
DEFAULT_BIN = str(Path(sys.executable).parent)
# Rendered by Airflow when the task runs (never a database call at parse time).
REPO = "{{ var.value.get('llmops_repo', '" + DEFAULT_REPO + "') }}"
BIN = "{{ var.value.get('llmops_bin', '" + DEFAULT_BIN + "') }}"

# Retries where a retry helps: DVC's repo lock held by someone's `dvc repro`, an MLflow
# server restarting, a node lost in the middle of training (train resumes from its last
# checkpoint). A failed data check or a bad param is not transient: those tasks set retries=0.
DEFAULT_ARGS = {
    "owner": OWNER,
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}


def schedule(name: str, default: str) -> str | None:
    """A DAG's schedule, from the Airflow Variable `name` given as environment variable
    AIRFLOW_VAR_<NAME> (read at parse time without a database call; one place to change it).
    `none` turns the schedule off (runs only when triggered)."""
    value = os.environ.get(f"AIRFLOW_VAR_{name.upper()}", default).strip()
    return None if value.lower() in {"", "none", "null"} else value


def shell(command: str) -> str:
    """A bash command run in the project with the project's tools on PATH."""
    return f'set -euo pipefail; export PATH="{BIN}:$PATH"; cd "{REPO}"; {command}'


def runtime_paths() -> tuple[str, str]:
    """(repo, bin) inside a running task."""
    from airflow.sdk import Variable

    return (Variable.get("llmops_repo", default=DEFAULT_REPO), Variable.get("llmops_bin", default=DEFAULT_BIN))


def run(command: list[str], cwd: str) -> str:
    """Run a command (no shell: arguments from the trigger form stay arguments), its output in
    the task log line by line; a non-zero exit fails the task with the command's last lines."""
    import subprocess

    log.info("running: %s (in %s)", " ".join(command), cwd)
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        log.info("%s", line.rstrip())
        lines.append(line.rstrip())
    if process.wait() != 0:
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"{' '.join(command[:3])} exited {process.returncode}:\n{tail}")
    return "\n".join(lines)


def notify_failure(context: dict) -> None:
    """on_failure_callback: tell someone a task failed for good (after its retries).

    The channel comes from the Airflow Variable `llmops_notify`; the default only logs (in the
    task's log and the scheduler's), which needs no set-up. SMTP and Slack use the providers'
    notifiers with an Airflow connection (docs/orchestration.md shows how to add one).
    """
    ti = context.get("ti") or context.get("task_instance")
    dag_id = getattr(ti, "dag_id", "?")
    task_id = getattr(ti, "task_id", "?")
    run_id = getattr(ti, "run_id", "?")
    exception = context.get("exception")
    url = getattr(ti, "log_url", "")
    message = f"llmops: task {task_id} of {dag_id} run {run_id} failed: {str(exception)[:500]} (log: {url})"
    try:
        from airflow.sdk import Variable

        target = Variable.get("llmops_notify", default="log")
    except Exception:  # noqa: BLE001 - a notification must not fail for want of a variable
        target = "log"
    kind, _, rest = target.partition(":")
    try:
        if kind == "smtp":
            from airflow.providers.smtp.notifications.smtp import SmtpNotifier

            conn_id, _, to = rest.partition(":")
            SmtpNotifier(to=to, smtp_conn_id=conn_id or None, subject=f"[llmops] {dag_id}.{task_id} failed",
                         html_content=message).notify(context)
        elif kind == "slack":
            from airflow.providers.slack.notifications.slack import SlackNotifier

            conn_id, _, channel = rest.partition(":")
            SlackNotifier(slack_conn_id=conn_id, channel=channel, text=message).notify(context)
        elif kind != "log":
            log.error("llmops_notify=%r is not log, smtp:<conn_id>:<to> or slack:<conn_id>:<channel>", target)
    except Exception as error:  # noqa: BLE001 - fall back to the log rather than lose the alert
        log.error("llmops: notification through %s failed (%s); the alert follows", kind, error)
    log.error("%s", message)
