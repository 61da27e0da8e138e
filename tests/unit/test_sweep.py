"""The sweep's parts: the search space in params.yaml, the overrides a trial writes, the trial to
beat, the params diff, the objective's metric and direction, and the pruning callback against a
real Optuna study (SQLite storage). The whole sweep: tests/integration/test_sweep.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from pipelines.commands.sweep import defaults_trial, override, params_diff
from pipelines.config.params import Params, SearchDimension, SweepParams, load_params, parse_params
from pipelines.errors import LLMOpsError, ParamsError
from pipelines.evaluation.objective import direction, objective_metric
from pipelines.training import pruning
from tests.support import REPO

BASELINE = """train:
  learning_rate: 2.0e-4   # the step size
  lora:
    r: 8
    lora_alpha: 16
"""


def params_with(**sections) -> Params:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return parse_params(data)


def test_the_shipped_space_parses_and_every_key_is_a_run_parameter():
    sweep = load_params(REPO / "params.yaml").sweep
    assert set(sweep.space) == {"train.learning_rate", "train.lora.r", "train.lora.lora_alpha",
                                "train.lora.lora_dropout"}
    assert sweep.space["train.learning_rate"].log and sweep.space["train.lora.r"].choices == [4, 8, 16]


@pytest.mark.parametrize(("space", "message"), [
    ({"validate.min_rows": {"type": "int", "low": 1, "high": 5}}, "validate.min_rows cannot be swept"),
    ({"train.lora.r": {"type": "categorical"}}, "type categorical takes choices"),
    ({"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-5}}, "is above high"),
    ({"train.learning_rate": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "log: true needs low > 0"),
    ({"train.max_steps": {"type": "int", "low": 10}}, "type int takes low and high"),
    ({"train.learning_rate": {"type": "uniform", "low": 0, "high": 1}}, "sweep.space.train.learning_rate.type"),
])
def test_a_bad_search_space_is_one_line_that_names_the_key(space, message):
    with pytest.raises(ParamsError) as error:
        params_with(sweep={"space": space})
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("key", ["train.learning_rate", "train.warmup_steps"])  # spelt out at HEAD, or not
@pytest.mark.parametrize("value", [3e-4, 16, 0.05, "cosine", True, None])
def test_an_override_reads_back_as_the_sampled_value(tmp_path, key, value):
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text(BASELINE)
    written = override(key, value, yaml.safe_load(BASELINE))
    assert written.startswith("++") == (key == "train.warmup_steps")
    apply_overrides(path, [written])
    assert yaml.safe_load(path.read_text())["train"][key.split(".")[1]] == value


def test_the_trial_to_beat_is_heads_values_that_the_space_admits():
    space = {"train.learning_rate": SearchDimension(type="float", low=1e-5, high=1e-3, log=True),
             "train.lora.r": SearchDimension(type="categorical", choices=[4, 16]),  # HEAD's 8 is not a choice
             "train.lora.lora_alpha": SearchDimension(type="int", low=8, high=32),
             "train.warmup_steps": SearchDimension(type="int", low=0, high=10)}  # not set at HEAD
    assert defaults_trial(BASELINE, space) == {"train.learning_rate": 2e-4, "train.lora.lora_alpha": 16}


def test_the_best_params_diff_changes_only_the_swept_lines_and_keeps_comments(tmp_path):
    diff = params_diff(BASELINE, [override("train.learning_rate", 0.0011), override("train.lora.r", 16)], tmp_path)
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("---", "+++"))]
    assert sorted(changed) == sorted(["-  learning_rate: 2.0e-4   # the step size",
                                      "+  learning_rate: 0.0011   # the step size", "-    r: 8", "+    r: 16"])
    assert params_diff(BASELINE, [], tmp_path) == ""


def test_the_diff_of_the_shipped_params_touches_only_the_swept_lines(tmp_path):
    """DVC's writer rewrites the whole file (null -> empty, lists re-indented); the diff must not."""
    text = (REPO / "params.yaml").read_text()
    diff = params_diff(text, [override("train.learning_rate", 0.0005), override("train.lora.lora_dropout", 0.07)],
                       tmp_path)
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("---", "+++"))]
    assert changed == ["-    lora_dropout: 0.05", "+    lora_dropout: 0.07", "-  learning_rate: 2.0e-4",
                       "+  learning_rate: 0.0005"]
    # a key the file leaves at its default cannot be one edited line: DVC's rewrite is the diff then
    added = params_diff(text, ["++train.lora.bias=\"none\""], tmp_path)
    assert "+    bias: none" in added


def test_the_objective_is_the_gates_metric_on_validation_unless_named():
    assert objective_metric(params_with()) == "rouge_l"
    agreement = params_with(evaluate={"primary_metric": "agreement", "agreement_fallback": "bleu"})
    assert objective_metric(agreement) == "bleu"  # no review of a trial exists: the fallback decides
    assert objective_metric(params_with(sweep={"metric": "eval_loss"})) == "eval_loss"
    assert [direction(m) for m in ("perplexity", "eval_loss", "rouge_l", "bertscore_f1")] == \
        ["minimize", "minimize", "maximize", "maximize"]
    assert SweepParams().storage is None  # a deployment setting: env LLMOPS_SWEEP_STORAGE, else sweeps.db


def test_no_trial_in_the_environment_means_no_callback_and_a_broken_one_is_one_line():
    assert pruning.trial_spec({}) is None
    with pytest.raises(LLMOpsError, match="LLMOPS_SWEEP_TRIAL lacks a JSON object"):
        pruning.trial_spec({pruning.TRIAL_ENV: "not json"})
    with pytest.raises(LLMOpsError, match="lacks trial_id, number, pruned_file"):
        pruning.trial_spec({pruning.TRIAL_ENV: json.dumps({"storage": "sqlite://", "study": "s"})})


@pytest.mark.parametrize("goal", ["minimize", "maximize"])
def test_the_callback_reports_eval_losses_and_prunes_a_trial_behind_the_median(tmp_path, goal):
    import optuna

    storage = f"sqlite:///{tmp_path / 'sweeps.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction=goal)
    sign = 1.0 if goal == "minimize" else -1.0
    done = study.ask()
    done.report(sign * 2.0, 10)  # the finished trial's validation loss at step 10 was 2.0
    study.tell(done, 0.5)
    for loss, pruned in ((1.5, False), (3.0, True)):
        trial = study.ask()
        marker = tmp_path / f"{trial.number}.pruned"
        callback = pruning.pruning_callback({"storage": storage, "study": "s", "trial_id": trial._trial_id,
                                             "number": trial.number, "pruned_file": str(marker),
                                             "pruner": {"kind": "median", "startup_trials": 1}})
        state = SimpleNamespace(global_step=10, max_steps=30, is_world_process_zero=True)
        if pruned:
            with pytest.raises(pruning.TrialPruned, match=f"trial {trial.number} pruned at step 10/30"):
                callback.on_evaluate(None, state, None, metrics={"eval_loss": loss})
            assert json.loads(marker.read_text()) == {"step": 10, "eval_loss": loss}
        else:
            callback.on_evaluate(None, state, None, metrics={"eval_loss": loss})
            assert not marker.exists()
        # the study holds the loss, negated when it maximizes its metric (higher is better for both)
        stored = optuna.load_study(study_name="s", storage=storage).trials[trial.number]
        assert stored.intermediate_values == {10: sign * loss}
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
                   values=None if pruned else 0.4)
    callback.on_evaluate(None, state, None, metrics={"loss": 1.0})  # a log without eval_loss: nothing to report


# --- what stops a sweep before it trains, and the workspace a killed one left ----------------


@pytest.fixture
def committed(tmp_path):
    from tests.support import commit, make_project

    project = make_project(tmp_path / "project")
    commit(project, "a project")
    return project


def sweep_params(project, **sweep) -> Params:
    data = yaml.safe_load((project.root / "params.yaml").read_text())
    data["sweep"].update(sweep)
    return parse_params(data)


def test_an_empty_space_and_bad_arguments_stop_with_one_line(committed, monkeypatch):
    from pipelines.commands.sweep import Sweep, SweepError, main

    with pytest.raises(SweepError, match="sweep.space is empty: declare the params to search"):
        Sweep(committed.root, sweep_params(committed, space={}), "s", 2).run()
    monkeypatch.chdir(committed.root)
    with pytest.raises(ParamsError, match="--trials 0: give at least 1"):
        main(sweep_params(committed), trials=0)
    with pytest.raises(ParamsError, match="--study 'a b': use letters, digits"):
        main(sweep_params(committed), study="a b")


def test_a_study_keeps_the_metric_it_was_started_with(committed):
    from pipelines.commands.sweep import Sweep, SweepError

    first = Sweep(committed.root, sweep_params(committed), "s", 2).open_study()
    assert first.user_attrs["metric"] == "rouge_l"
    # trial 0 is HEAD's values of the swept keys, queued once
    queued = [t.system_attrs["fixed_params"] for t in first.get_trials()]
    assert queued == [{"train.learning_rate": 2e-4, "train.lora.r": 8, "train.lora.lora_alpha": 16,
                       "train.lora.lora_dropout": 0.05}]
    Sweep(committed.root, sweep_params(committed), "s", 2).open_study()  # the same study again: loaded, not re-queued
    assert len(first.get_trials()) == 1
    with pytest.raises(SweepError, match="study s compares trials by rouge_l, this sweep by perplexity"):
        Sweep(committed.root, sweep_params(committed, metric="perplexity"), "s", 2).open_study()


def test_a_half_written_dvc_lock_is_put_back_to_heads(committed, caplog):
    from pipelines.registry.experiments import repair_lockfile

    lock = committed.root / "dvc.lock"
    assert repair_lockfile(committed.root) is None  # none: nothing to do
    lock.write_text("")  # what a kill during DVC's in-place rewrite leaves
    assert repair_lockfile(committed.root) and not lock.exists()  # HEAD has none
    sound = "schema: '2.0'\nstages: {}\n"
    lock.write_text(sound)
    assert repair_lockfile(committed.root) is None and lock.read_text() == sound
    committed.run("git", "add", "dvc.lock")
    committed.run("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-q", "-m", "lock")
    lock.write_text("schema: '2.0'\nstages:\n  train:\n    cmd: 'llmops tr")  # cut short, mid-string
    with caplog.at_level("WARNING"):
        assert repair_lockfile(committed.root)
    assert lock.read_text() == sound and "restored HEAD's" in caplog.text
