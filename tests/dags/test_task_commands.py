"""What each bash task hands to bash: the command and environment a run gets, whichever way the
task is written (BashOperator or @task.bash), and trigger-form text passed on as typed."""

from __future__ import annotations

import copy
import os
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
import yaml

from tests.support import REPO

PREFIX = 'set -euo pipefail; export PATH="<llmops_bin>:$PATH"; cd "<llmops_repo>"; '
WINDOW_END, RUN_AFTER = datetime(2026, 11, 24, tzinfo=UTC), datetime(2026, 11, 24, 7, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def dags(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))
    from airflow.dag_processing.dagbag import BundleDagBag

    return BundleDagBag(dag_folder=str(REPO / "dags"), bundle_path=REPO / "dags").dags


class TaskInstanceStandIn:
    def xcom_pull(self, task_ids: str, key: str | None = None) -> str:
        assert task_ids == "experiment_start" and key is None, (task_ids, key)
        return "airflow-manual__1"

    def xcom_push(self, key: str, value: object) -> None:
        pass


def execute(task, params: dict, **values: object) -> tuple[str, dict]:
    """Run the task as Airflow's task runner does (render its templates, then execute it), with the
    subprocess replaced: the bash command and the environment it gets."""
    from unittest import mock

    from airflow.providers.standard.hooks.subprocess import SubprocessHook, SubprocessResult

    task = copy.deepcopy(task)
    ti = TaskInstanceStandIn()
    dag_run = SimpleNamespace(run_id="manual__1", run_type="manual", triggering_user_name="alice",
                              run_after=RUN_AFTER, logical_date=None)
    var = SimpleNamespace(value=SimpleNamespace(get=lambda name, default=None: f"<{name}>"))
    context = {"params": params, "run_id": "manual__1", "dag_run": dag_run, "ti": ti, "task_instance": ti,
               "task": task, "var": var, "data_interval_end": WINDOW_END, **values}
    task.render_template_fields(context)
    with mock.patch.object(SubprocessHook, "run_command", return_value=SubprocessResult(0, "last line")) as bash:
        assert task.execute(context) == "last line"  # the output's last line is the task's XCom
    (call,) = bash.call_args_list
    _, flag, command = call.kwargs["command"]
    assert flag == "-c" and call.kwargs["cwd"] is None, call.kwargs  # the command cds into the project itself
    return command, call.kwargs["env"]


STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
COMMANDS = {
    **{stage: f"dvc --wait-for-lock repro --single-item {stage}" for stage in STAGES},
    "experiment_save": 'llmops experiment save --name "$LLMOPS_EXPERIMENT" --message "$LLMOPS_REASON"',
    "push": "dvc --wait-for-lock push",
    "experiment_end": 'llmops experiment end --name "$LLMOPS_EXPERIMENT"',
}


@pytest.mark.parametrize("task_id", list(COMMANDS))
def test_each_training_task_runs_its_command_in_the_project(dags, task_id):
    command, env = execute(dags["llmops_training"].get_task(task_id), {"reason": "", "skip_gate": False})
    assert command == PREFIX + COMMANDS[task_id]
    assert env["HOME"] == os.environ["HOME"]  # the worker's environment, plus the task's own variables


def test_skip_gate_promotes_by_force_and_commits_the_lock_file(dags):
    command, env = execute(dags["llmops_training"].get_task("promote"), {"reason": "why", "skip_gate": True})
    assert command == PREFIX + ('llmops promote --force --reason "$LLMOPS_REASON" && '
                                "dvc --wait-for-lock commit --force promote")
    assert env["LLMOPS_REASON"] == "why (airflow run manual__1)"
    assert {k: env[k] for k in ("LLMOPS_TRIGGERED_BY", "LLMOPS_AIRFLOW_RUN_ID", "LLMOPS_AIRFLOW_RUN_TYPE")} == {
        "LLMOPS_TRIGGERED_BY": "alice", "LLMOPS_AIRFLOW_RUN_ID": "manual__1", "LLMOPS_AIRFLOW_RUN_TYPE": "manual"}


def test_the_experiment_tasks_get_the_experiment_started_and_the_reason(dags):
    _, env = execute(dags["llmops_training"].get_task("experiment_save"), {"reason": "why"})
    assert env["LLMOPS_EXPERIMENT"] == "airflow-manual__1" and env["LLMOPS_REASON"] == "why (airflow run manual__1)"
    _, env = execute(dags["llmops_training"].get_task("experiment_end"), {"reason": "why"})
    assert env["LLMOPS_EXPERIMENT"] == "airflow-manual__1"


@pytest.mark.parametrize("task_id", ["promote", "experiment_save"])
def test_the_trigger_forms_reason_reaches_bash_as_typed_never_as_a_template(dags, task_id):
    """The reason is rendered into the environment once, as a value: braces in it stay text (a
    second rendering, as @task.bash does to its env, would evaluate `{{ var.value.<secret> }}`)."""
    reason = "{{ 6 * 7 }} {% if true %}x{% endif %}"
    _, env = execute(dags["llmops_training"].get_task(task_id), {"reason": reason, "skip_gate": True})
    assert env["LLMOPS_REASON"] == reason + " (airflow run manual__1)"


@pytest.mark.parametrize(("interval_end", "end"), [(WINDOW_END, "2026-11-24T00:00:00+00:00"),
                                                   (None, "2026-11-24T07:30:00+00:00")])  # no interval: run_after
def test_monitor_reports_the_runs_window_and_hands_its_decision_to_decide(dags, interval_end, end):
    dag = dags["llmops_monitoring"]
    command, _ = execute(dag.get_task("monitor"), {}, data_interval_end=interval_end)
    assert command == PREFIX + f'llmops monitor --end "{end}" --json | tail -n 1'
    (argument,) = dag.get_task("decide").op_args  # the decision: monitor's XCom, its output's last line
    assert argument.operator.task_id == "monitor" and argument.key == "return_value"
