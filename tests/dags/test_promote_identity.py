"""The promote task tells `llmops promote` who triggered the run, through Airflow's own template context."""

from __future__ import annotations

import os

import pytest

from tests.support import REPO


@pytest.fixture(scope="module")
def promote_task(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=str(REPO / "dags"), bundle_path=REPO / "dags")
    return bag.dags["llmops_training"].get_task("promote")


def render(task, **dag_run):
    """The task's env as Airflow renders it for a run with these DagRun fields (a real Jinja environment)."""
    from types import SimpleNamespace

    context = {"dag_run": SimpleNamespace(**dag_run), "run_id": dag_run["run_id"],
               "params": {"reason": "why", "skip_gate": True}}
    return task.render_template(task.env, context, jinja_env=task.dag.get_template_env())


def test_a_triggered_run_names_its_user(promote_task):
    env = render(promote_task, triggering_user_name="alice", run_type="manual", run_id="manual__1")
    assert env["LLMOPS_TRIGGERED_BY"] == "alice"
    assert env["LLMOPS_AIRFLOW_RUN_ID"] == "manual__1" and env["LLMOPS_AIRFLOW_RUN_TYPE"] == "manual"

    from pipelines.registry.model_registry import actor

    assert actor(env)["by"] == "airflow:alice"


def test_a_scheduled_run_names_the_scheduler(promote_task):
    env = render(promote_task, triggering_user_name=None, run_type="scheduled", run_id="scheduled__2")
    assert env["LLMOPS_TRIGGERED_BY"] == ""

    from pipelines.registry.model_registry import actor

    assert actor(env)["by"] == "airflow:scheduled"
