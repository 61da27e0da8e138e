"""The sweep DAG: a hyperparameter search whose trials are DVC experiments (`llmops sweep`). See doc_md."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Param, task
from llmops_common import DEFAULT_ARGS, notify_failure, run, runtime_paths, schedule

log = logging.getLogger("llmops.dags")

DOC = """
### Hyperparameter sweep

**sweep** runs `llmops sweep --trials <trials> --study <study>` in the project: an Optuna study
over `sweep.space` in params.yaml (learning rate, LoRA rank/alpha/dropout, ...; any run
parameter), each trial the DVC experiment `sweep-<study>-<n>` (HEAD's params plus the trial's,
`dvc repro train`), scored on the **validation** split by the gate's primary metric, weak
trials pruned from their evaluation losses. MLflow holds one run per sweep with a child run per
trial; the study lives in `sweep.storage` (env `LLMOPS_SWEEP_STORAGE`; PostgreSQL in team mode,
so several workers can take trials of one study). **report** logs the best trial and the
params.yaml diff that would adopt it (`reports/sweep/<study>/best-params.diff`): review it,
then `dvc exp apply sweep-<study>-<n>` and commit, or open a pull request with the diff.

*Trials* is the study's budget: the finished trials it should hold. A known *study* continues
(a retried or re-triggered run picks up where the last stopped; the trial it was running is
retried); empty, each run starts its own study named after the run. One run at a time, and it
shares the workspace with `llmops_training`: a trial waits for no one, so a training run that
holds the workspace fails the sweep task, whose retry continues the study.

Schedule: Variable `llmops_sweep_schedule` (environment variable `AIRFLOW_VAR_LLMOPS_SWEEP_SCHEDULE`),
default none (on demand); e.g. `0 4 * * 6` for Saturday nights, after the nightly training run.
Docs: docs/training.md.
"""

PARAMS = {
    "trials": Param(8, type="integer", minimum=1, maximum=500, title="Trials",
                    description="The study's budget: finished (complete or pruned) trials it should hold."),
    "study": Param("", type=["null", "string"], maxLength=100, pattern="^([A-Za-z0-9][A-Za-z0-9_.-]*)?$",
                   title="Study",
                   description="A study to continue, or empty for a new one named after this run."),
}


def study_name(params: dict, run_id: str) -> str:
    """The form's study, else one named after the run (a scheduled run: its date)."""
    given = str(params.get("study") or "").strip()
    return given or ("airflow-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-."))[:100]


with DAG(
    dag_id="llmops_sweep",
    description="Hyperparameter sweep: Optuna trials as DVC experiments, scored on the validation split",
    doc_md=DOC,
    schedule=schedule("llmops_sweep_schedule", "none"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "on_failure_callback": notify_failure},
    params=PARAMS,
    tags=["llmops", "sweep"],
) as dag:

    @task(task_id="sweep", execution_timeout=timedelta(hours=24))
    def sweep(params: dict | None = None, run_id: str | None = None) -> str:
        params = params or {}
        repo, bin_dir = runtime_paths()
        name = study_name(params, run_id or "run")
        run([f"{bin_dir}/llmops", "sweep", "--trials", str(int(params.get("trials") or 8)), "--study", name], repo)
        return name

    @task(task_id="report", retries=0)
    def report(name: str) -> dict:
        repo, _ = runtime_paths()
        out = Path(repo) / "reports" / "sweep" / name
        summary = json.loads((out / "summary.json").read_text())
        best = summary.get("best")
        log.info("study %s: %s by %s on the validation split; trials %s", name, summary["direction"],
                 summary["metric"], summary["states"])
        if best is None:
            log.warning("no trial finished: see %s", out / "trials")
            return {"study": name, "best": None}
        log.info("best: trial %s (%s), %s = %s; HEAD's params: %s", best["number"], best["experiment"],
                 summary["metric"], best["value"], (summary.get("defaults") or {}).get("value"))
        diff = out / "best-params.diff"
        if diff.exists():
            log.info("params.yaml diff to adopt it (%s):\n%s", diff, diff.read_text())
        return {"study": name, "best": best["experiment"], "value": best["value"]}

    report(sweep())
