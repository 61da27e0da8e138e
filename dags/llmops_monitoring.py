"""The monitoring DAG: a drift report of production traffic per window; retraining on drift. See doc_md."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, task
from llmops_common import DEFAULT_ARGS, notify_failure, schedule, shell

log = logging.getLogger("llmops.dags")

DOC = """
### Drift monitoring of production traffic

For each window (the data interval of the run: `[start, end)`), **monitor** runs
`llmops monitor --end <end>`: an Evidently report of the inference log against the training
data (text descriptors, prompt embeddings, latency and errors), logged to MLflow, and a
decision. **decide** reads the decision: when the retrain policy (params.yaml
`monitor.retrain`: k of the last n windows drifted, cooldown, enough new data) asks for it,
**trigger_training** starts `llmops_training` with a conf that says why (the reason and the
report); otherwise the run ends as a success and the reason is in decide's log.

The trigger carries a run id made from the window, so re-running a window does not train
twice. Why a trigger and not an Airflow Asset: the training run needs the reason and the
report as its params (asset-triggered runs take no params) and a deterministic run id, and
the training DAG keeps its own nightly cron (docs/orchestration.md).

Schedule: Variable `llmops_monitoring_schedule` (environment variable
`AIRFLOW_VAR_LLMOPS_MONITORING_SCHEDULE`, default `@daily`, matching
`monitor.window_hours: 24`).
"""

with DAG(
    dag_id="llmops_monitoring",
    description="Evidently drift report of production traffic; triggers retraining on drift",
    doc_md=DOC,
    schedule=schedule("llmops_monitoring_schedule", "@daily"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "on_failure_callback": notify_failure},
    tags=["llmops", "monitoring"],
) as dag:
    # The decision is `llmops monitor`'s only stdout line; `tail` prints it after the last log line
    # (stderr), so it is the last line of the output: the task's return value, decide's argument.
    @task.bash
    def monitor(data_interval_end=None, dag_run=None) -> str:  # noqa: ANN001 - Airflow's context values
        # The window is the run's data interval: a re-run of the same run reports the same window.
        end = (data_interval_end or dag_run.run_after).isoformat()
        return shell(f'llmops monitor --end "{end}" --json | tail -n 1')

    @task.branch(retries=0)
    def decide(output: str, ti=None) -> str:  # noqa: ANN001 - Airflow's task instance
        decision = json.loads(output)
        retrain = decision["retrain"]
        why = "; ".join(retrain.get("reasons") or []) or "no reason given"
        drift = decision.get("drift", {})
        log.info("window %s .. %s: %s, %s requests, drift %s %s", decision["window"]["start"],
                 decision["window"]["end"], decision["status"], decision["rows"], drift.get("detected"),
                 drift.get("drifted_signals") or "")
        log.info("report: %s (MLflow run %s)", decision.get("report_dir"), decision.get("mlflow_run_id"))
        if not retrain["requested"]:
            log.info("no retraining: %s", why)
            return "no_retrain"
        log.info("retraining requested: %s", why)
        ti.xcom_push(key="reason", value=f"drift in window ending {decision['window']['end']}: {why}")
        ti.xcom_push(key="report", value=str(decision.get("report_dir") or ""))
        return "trigger_training"

    trigger = TriggerDagRunOperator(
        task_id="trigger_training",
        trigger_dag_id="llmops_training",
        trigger_run_id="drift__{{ (data_interval_end or dag_run.run_after).strftime('%Y%m%dT%H%M%S') }}",
        conf={"reason": "{{ ti.xcom_pull(task_ids='decide', key='reason') }}",
              "drift_report": "{{ ti.xcom_pull(task_ids='decide', key='report') }}"},
        skip_when_already_exists=True,  # a re-run of this window does not train twice
        retries=0,
    )
    decide(monitor()) >> [trigger, EmptyOperator(task_id="no_retrain")]
