"""`llmops sweep` end to end on the tiny pipeline: Optuna trials as DVC experiments, MLflow
parent and child runs, the best params as a diff; a pruned trial; a killed sweep resumed.

One project for the module (the data stages run once; later trials only train and score), a
real `mlflow server`, the study in the default SQLite storage (sweeps.db in the project).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.support import BIN, Project, commit, dvc_experiments, tiny_pipeline_project

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]

SPACE = {"train.learning_rate": {"type": "float", "low": 5.0e-4, "high": 5.0e-3, "log": True},
         "train.lora.r": {"type": "categorical", "choices": [4, 8]}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_dir, mlflow_server) -> Project:
    project = tiny_pipeline_project(tmp_path_factory.mktemp("sweep") / "project", tiny_tokenizer_dir,
                                    tracking_uri=mlflow_server.uri)
    # perplexity: on a tiny random model every answer metric is ~0, the loss still tells trials apart
    # no pruning but where a test asks for it (--set): which trial the median pruner stops depends
    # on the sampled params
    project.set_params(sweep={"trials": 3, "metric": "perplexity", "validation_examples": 8, "space": SPACE,
                              "pruner": "none", "heartbeat_seconds": 2})
    commit(project, "a sweep over learning rate and rank")
    return project


def study(project: Project, name: str = "default"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{project.root / 'sweeps.db'}")


def test_three_trials_are_dvc_experiments_and_mlflow_children_and_the_best_is_a_params_diff(tiny, mlflow_server):
    import mlflow
    from optuna.trial import TrialState

    result = tiny.run(str(BIN / "llmops"), "sweep", timeout=1200)
    out = tiny.root / "reports/sweep/default"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "perplexity" and summary["direction"] == "minimize" and summary["split"] == "validation"
    assert [t["state"] for t in summary["trials"]] == ["COMPLETE"] * 3, summary["trials"]
    # trial 0 trained HEAD's params (the baseline to beat): the best is at least as good
    assert summary["trials"][0]["defaults"] and summary["trials"][0]["params"] == {"train.learning_rate": 2e-3,
                                                                                   "train.lora.r": 8}
    assert summary["best"]["value"] <= summary["defaults"]["value"]
    assert f"best trial {summary['best']['number']}" in result.stdout

    # every trial is a DVC experiment with its own params, and its objective is saved with it
    experiments = dvc_experiments(tiny)
    for trial in summary["trials"]:
        name = f"sweep-default-{trial['number']}"
        assert trial["experiment"] == name and name in experiments, experiments.keys()
        train = experiments[name]["params"]["params.yaml"]["data"]["train"]
        assert train["learning_rate"] == pytest.approx(trial["params"]["train.learning_rate"])
        assert train["lora"]["r"] == trial["params"]["train.lora.r"]
        saved = json.loads(tiny.run("git", "show", f"refs/exps/{_ref(tiny, name)}:reports/sweep/objective.json")
                           .stdout)
        assert saved["value"] == pytest.approx(trial["value"]) and saved["split"] == "validation"
    values = {t["value"] for t in summary["trials"]}
    assert len(values) == 3  # three configurations, three validation perplexities

    # the reviewable diff: HEAD's params.yaml -> the best trial's (or a note that HEAD's is best)
    diff = (out / "best-params.diff").read_text()
    best = summary["best"]["params"]
    if best == summary["trials"][0]["params"]:
        assert diff.startswith("# the best trial is HEAD's params")
    else:
        assert diff.startswith("--- a/params.yaml")
        assert any(line.startswith(("+  learning_rate:", "+    r:")) for line in diff.splitlines()), diff
    assert (out / "history.png").stat().st_size > 5_000 and (out / "importance.png").stat().st_size > 5_000

    # MLflow: one sweep run, a child run per trial, the training runs nested under the trials
    mlflow.set_tracking_uri(mlflow_server.uri)
    runs = mlflow.search_runs(experiment_names=["llmops"], output_format="list")
    (parent,) = [r for r in runs if r.info.run_name == "sweep-default"]
    assert parent.data.metrics["best_validation_perplexity"] == pytest.approx(summary["best"]["value"])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {f"sweep-default-{n}" for n in range(3)}
    assert all(c.info.status == "FINISHED" for c in children.values())
    trained = [r for r in runs if r.data.tags.get("stage") == "train"
               and r.data.tags.get("mlflow.parentRunId") in {c.info.run_id for c in children.values()}]
    assert len(trained) == 3
    artifacts = {a.path for a in mlflow.MlflowClient(mlflow_server.uri).list_artifacts(parent.info.run_id)}
    assert {"summary.json", "best-params.diff", "history.png", "importance.png"} <= artifacts

    # the study is in the project's database; the budget is met, so a rerun trains nothing
    assert len(study(tiny).get_trials(states=(TrialState.COMPLETE,))) == 3
    again = tiny.run(str(BIN / "llmops"), "sweep")
    assert "3 of 3 trials finished" in again.stderr
    # budget.per_sweep: each trial's machine time is priced on the study; when the spend plus one
    # more trial's would pass the budget, no further trial starts
    spent = summary["cost"]["spent"]
    # (the summary rounds the spend to 8 decimals)
    assert spent == pytest.approx(sum(t["cost"] for t in summary["trials"]), abs=1e-8) and spent > 0
    stopped = tiny.run(str(BIN / "llmops"), "sweep", "--trials", "5", "--set", f"budget.per_sweep={spent * 1.1}")
    assert "stopped: budget.per_sweep" in stopped.stdout and "3 trials cost" in stopped.stdout
    assert len(study(tiny).get_trials()) == 3
    # the workspace is released: an Airflow run may start
    state = json.loads((tiny.root / ".dvc/tmp/llmops-experiment.json").read_text())
    assert state["status"] == "ended"


def _ref(project: Project, name: str) -> str:
    refs = project.run("git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    (ref,) = [r for r in refs if r.endswith("/" + name)]
    return ref.removeprefix("refs/exps/")


def test_a_trial_behind_the_others_is_pruned_and_leaves_no_experiment(tiny):
    from optuna.trial import TrialState

    # a learning rate far below the space's: its first validation loss is the worst at that step
    study(tiny).enqueue_trial({"train.learning_rate": 1e-7, "train.lora.r": 4}, skip_if_exists=False)
    result = tiny.run(str(BIN / "llmops"), "sweep", "--trials", "4", "--set", "sweep.pruner=median",
                      "--set", "sweep.pruner_startup_trials=1", timeout=900)
    trials = study(tiny).get_trials()
    assert len(trials) == 4 and trials[3].state == TrialState.PRUNED, [t.state for t in trials]
    assert list(trials[3].intermediate_values) == [2] and "trial 3 pruned at step 2" in result.stderr
    assert "sweep-default-3" not in dvc_experiments(tiny)
    assert not (tiny.root / ".dvc/tmp/llmops-sweep/default-3.pruned").exists()
    summary = json.loads((tiny.root / "reports/sweep/default/summary.json").read_text())
    assert summary["states"] == {"COMPLETE": 3, "PRUNED": 1}


def test_a_killed_sweep_continues_its_study_with_the_killed_trial_retried(tiny):
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    # trials long enough to be killed while they train (the earlier ones took a second or two)
    tiny.set_params(train={"max_steps": 200, "eval_steps": 50, "save_steps": 10})
    commit(tiny, "longer trials")
    command = [str(BIN / "llmops"), "sweep", "--study", "resume", "--trials", "2"]
    log = open(tiny.root / "killed-sweep.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, cwd=tiny.root, env=tiny.env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    state_file = tiny.root / ".dvc/tmp/llmops-experiment.json"
    deadline = time.monotonic() + 300
    checkpoint = tiny.root / "models/checkpoints/checkpoint-10/checkpoint-complete.json"
    while True:  # kill it while its first trial trains, after its first checkpoint
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if state.get("name") == "sweep-resume-0" and state.get("status") == "running" and checkpoint.exists():
            break
        assert process.poll() is None and time.monotonic() < deadline, (tiny.root / "killed-sweep.log").read_text()
        time.sleep(0.2)
    import os

    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    log.close()
    # DVC rewrites dvc.lock in place: a kill at that moment leaves it empty (seen in CI); the
    # resumed sweep puts back HEAD's instead of failing every trial on it
    (tiny.root / "dvc.lock").write_text("")
    killed = study(tiny, "resume").get_trials()
    assert [t.state for t in killed] == [TrialState.RUNNING]
    time.sleep(5)  # > 2 x sweep.heartbeat_seconds: the killed trial's heartbeat is stale

    resumed = tiny.run(*command, timeout=900)
    assert "dvc.lock was damaged by a killed run" in resumed.stderr
    trials = study(tiny, "resume").get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 2 and states[0] == TrialState.FAIL, states
    retried = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert len(retried) == 1 and retried[0].params == trials[0].params and retried[0].state == TrialState.COMPLETE
    assert f"sweep-resume-{retried[0].number}" in dvc_experiments(tiny)
    # the retried trial's training went on from the killed one's checkpoint (same params)
    metrics = json.loads(tiny.run("git", "show", f"refs/exps/{_ref(tiny, f'sweep-resume-{retried[0].number}')}"
                                  ":reports/train/metrics.json").stdout)
    assert metrics["resumed_from_step"] >= 10 and metrics["steps"] == 200
