"""The training DAG: the pipeline's stages, one task each, run through DVC. See doc_md below."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param, task
from llmops_common import DEFAULT_ARGS, notify_failure, run, runtime_paths, schedule, shell

# The stages in dvc.yaml and, for each, the stages whose outputs it reads (direct edges of
# `dvc dag`). tests/dags checks this against dvc.yaml's own graph, so the two cannot drift apart.
STAGES: dict[str, list[str]] = {
    "ingest": [],
    "validate": ["ingest"],
    "prepare": ["ingest", "validate"],
    "base_model": [],
    "train": ["prepare", "base_model"],
    "evaluate": ["prepare", "base_model", "train"],
    "register": ["validate", "evaluate", "train"],
    "quantize": ["evaluate", "register", "prepare"],
    "promote": ["register", "quantize"],
    "deploy": ["promote"],
}
NO_RETRY = {"validate"}  # a failed data check fails the same way again
TIMEOUTS = {"train": timedelta(hours=12), "base_model": timedelta(hours=2), "quantize": timedelta(hours=4)}

DOC = """
### LLM fine-tuning pipeline

One task per DVC stage of `dvc.yaml` (same names as `llmops <stage>` and params.yaml's
sections), each `dvc repro --single-item <stage>` in the project checkout (Variable
`llmops_repo`): an unchanged stage is a cache hit, so a retry or a re-run is safe and cheap.

* **experiment_start** sets params.yaml to the committed version plus this run's
  overrides (the trigger form below, as `dvc exp run -S` overrides) and validates them;
  **experiment_save** records the run as the DVC experiment `airflow-<run id>`
  (`dvc exp show`, `dvc exp apply`); **push** sends its outputs to the DVC remote;
  **experiment_end** (a teardown: it runs whatever happened) frees the workspace.
* **What a run may change**: hyperparameters (`train.*`, `prepare.*`), the base model and the
  data (`ingest.sources`, files under `data/raw/`) only; anything else (service endpoints,
  credentials, paths, the gates and their thresholds) is refused at experiment_start with
  where it is set instead (docs/orchestration.md has the list). To promote a candidate the
  gate rejects, use *skip_gate* with a reason: it is recorded as forced.
* **validate** failing stops the run here: the Great Expectations report is linked in its log
  and nothing is trained or registered.
* **quantize** makes the registered version's quantized variants (`quantize.variants`, with
  llm-compressor), serves each on vLLM beside full precision on the evaluated test examples and
  logs them with the version (quality difference with its interval per slice, tokens/s, memory,
  cost per 1k tokens); promote then picks the weights that serve (`promote.variant`).
* **promote** is the gate. A candidate that does not pass is *not promoted* and the run still
  succeeds (see the promote task's log); *skip_gate* promotes anyway and records it as a
  forced promotion with the *reason*.
* **review_request** sends the new version's blind A/B review to Label Studio when
  `promote.human_review` is not `off` (docs/review.md); with `required`, promote then records
  the version as awaiting review and the `llmops_review` DAG promotes or rejects it later.
* **deploy** tells a running `llmops serve` to load the champion and checks it (rolls back
  if the checks fail); with no service running it records what should be deployed.

Schedule: nightly, from the Variable `llmops_training_schedule` (environment variable
`AIRFLOW_VAR_LLMOPS_TRAINING_SCHEDULE`, default `0 2 * * *`). One run at a time: DVC's lock
makes concurrent runs in one workspace unsafe, so further triggers queue, and
experiment_start refuses while a `dvc exp run` or another run holds the workspace. Failures
notify through `llmops_notify` (docs/orchestration.md).
"""

PARAMS = {
    "reason": Param("", type=["null", "string"], title="Reason",
                    description="Why this run (recorded on the DVC experiment; required with skip_gate)."),
    "base_model": Param("", type=["null", "string"], title="Base model",
                        description="A Hugging Face hub id, a local folder, or bundled:smollm2-135m-instruct. "
                                    "Empty: params.yaml's base_model.source."),
    "max_steps": Param(None, type=["null", "integer"], minimum=1, title="Max steps",
                       description="Optimizer steps (train.max_steps). Empty: params.yaml's."),
    "learning_rate": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1, title="Learning rate",
                           description="train.learning_rate. Empty: params.yaml's."),
    "data_sources": Param([], type=["null", "array"], items={"type": "string"}, title="Data sources",
                          description="One per line: wordnet, foldoc (bundled samples) or a JSONL/CSV/Parquet "
                                      "file under data/raw/, e.g. data/raw/new.jsonl (files elsewhere are "
                                      "refused). Empty: params.yaml's ingest.sources."),
    "overrides": Param([], type=["null", "array"], items={"type": "string"}, title="More overrides",
                       description="More run parameters, one `dvc exp run -S` override per line, e.g. "
                                   "train.lora.r=16: train.*, prepare.*, base_model.source/revision/dtype/"
                                   "licence, ingest.sources (the list: docs/orchestration.md). Service "
                                   "endpoints, credentials, paths and the gates are refused."),
    "skip_gate": Param(False, type="boolean", title="Skip the promotion gate",
                       description="Promote the new version even if the gate says no (recorded as forced, "
                                   "with the reason)."),
    "drift_report": Param("", type=["null", "string"], title="Drift report",
                          description="Set by llmops_monitoring when drift triggered this run."),
}


def quote(value: str) -> str:
    """A string value in the override grammar (Hydra's quoted string)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def overrides(params: dict) -> list[str]:
    """The trigger form's values as `dvc exp run -S` overrides."""
    out = []
    if params.get("base_model"):
        out.append(f"base_model.source={quote(params['base_model'])}")
    if params.get("max_steps") is not None:
        out.append(f"train.max_steps={int(params['max_steps'])}")
    if params.get("learning_rate") is not None:
        out.append(f"train.learning_rate={float(params['learning_rate'])!r}")
    sources = [s.strip() for s in params.get("data_sources") or [] if s.strip()]
    if sources:
        items = [f"{{kind:bundled,name:{s}}}" if s in {"wordnet", "foldoc"} else f"{{kind:file,path:{quote(s)}}}"
                 for s in sources]
        out.append(f"ingest.sources=[{','.join(items)}]")
    out += [o.strip() for o in params.get("overrides") or [] if o.strip()]
    return out


def experiment_name(run_id: str) -> str:
    return "airflow-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-.")


with DAG(
    dag_id="llmops_training",
    description="Fine-tune, evaluate, register, gate and deploy the LLM (DVC stages)",
    doc_md=DOC,
    schedule=schedule("llmops_training_schedule", "0 2 * * *"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "on_failure_callback": notify_failure},
    params=PARAMS,
    tags=["llmops", "training"],
) as dag:

    @task(task_id="experiment_start", retries=0)
    def experiment_start(params: dict | None = None, run_id: str | None = None) -> str:
        params = params or {}
        if params.get("skip_gate") and not str(params.get("reason", "")).strip():
            raise ValueError("skip_gate needs a reason: fill in 'Reason' in the trigger form (it is recorded on "
                             "the forced promotion)")
        repo, bin_dir = runtime_paths()
        name = experiment_name(run_id or "run")
        command = [f"{bin_dir}/llmops", "experiment", "start", "--name", name]
        for override in overrides(params):
            command += ["-S", override]
        run(command, repo)
        return name

    start = experiment_start()
    # BashOperator, not @task.bash: @task.bash renders its env a second time when it executes, which
    # would evaluate template syntax typed in the form's Reason (tests/dags/test_task_commands.py).
    tasks = {}
    for stage in STAGES:
        command = f"dvc --wait-for-lock repro --single-item {stage}"
        env = None
        if stage == "promote":
            # skip_gate: the forced promotion, then `dvc commit` so the lock file records it
            command = ("{% if params.skip_gate %}llmops promote --force --reason \"$LLMOPS_REASON\" && "
                       "dvc --wait-for-lock commit --force promote{% else %}" + command + "{% endif %}")
            # Who decided: the Airflow user who triggered the run (none for a scheduled one), recorded
            # by promote on the version's history and model card (pipelines/registry/model_registry.py `actor`).
            env = {"LLMOPS_REASON": "{{ params.reason or '' }} (airflow run {{ run_id }})",
                   "LLMOPS_TRIGGERED_BY": "{{ dag_run.triggering_user_name or '' }}",
                   "LLMOPS_AIRFLOW_RUN_ID": "{{ run_id }}", "LLMOPS_AIRFLOW_RUN_TYPE": "{{ dag_run.run_type }}"}
        tasks[stage] = BashOperator(
            task_id=stage, bash_command=shell(command), env=env, append_env=True,
            retries=0 if stage in NO_RETRY else DEFAULT_ARGS["retries"],
            execution_timeout=TIMEOUTS.get(stage, timedelta(hours=1)),
        )
    for stage, upstream in STAGES.items():
        for name in upstream:
            tasks[name] >> tasks[stage]
        if not upstream:
            start >> tasks[stage]
    # People's blind A/B review of the new version (promote.human_review; nothing when off): sent
    # before the gate runs, never waited for here. With `required`, promote records the version as
    # awaiting review and the llmops_review DAG decides once reviews arrive (or rejects it at the
    # deadline); with a review tool that is down, this task fails and nothing is promoted.
    review_request = BashOperator(task_id="review_request",
                                  bash_command=shell("llmops review request --when-enabled"),
                                  execution_timeout=timedelta(hours=1))
    tasks["register"] >> review_request >> tasks["promote"]

    save = BashOperator(
        task_id="experiment_save",
        bash_command=shell('llmops experiment save --name "$LLMOPS_EXPERIMENT" --message "$LLMOPS_REASON"'),
        env={"LLMOPS_EXPERIMENT": "{{ ti.xcom_pull(task_ids='experiment_start') }}",
             "LLMOPS_REASON": "{{ params.reason or dag_run.run_type }} (airflow run {{ run_id }})"},
        append_env=True,
    )
    # The run's outputs (data, adapter, reports) to the DVC remote, so that the team gets them with
    # `dvc pull` / `dvc exp apply` and the worker's disk is not their only copy.
    push = BashOperator(task_id="push", bash_command=shell("dvc --wait-for-lock push"),
                        execution_timeout=timedelta(hours=1))
    # Frees the workspace for the next run (`llmops experiment start` refuses while a run holds
    # it). Airflow's teardown: it runs once everything before it is done, failed or not, as long as
    # experiment_start (its setup) succeeded, and does not decide the run's state.
    end = BashOperator(task_id="experiment_end",
                       bash_command=shell('llmops experiment end --name "$LLMOPS_EXPERIMENT"'),
                       env={"LLMOPS_EXPERIMENT": "{{ ti.xcom_pull(task_ids='experiment_start') }}"},
                       append_env=True)
    tasks["deploy"] >> save >> push >> end.as_teardown(setups=start)
