"""Command `sweep`: an Optuna study over run params, each trial a DVC experiment scored on validation.

    llmops sweep                       # run the study in params.yaml `sweep` until it holds sweep.trials
    llmops sweep --trials 12           # a larger budget (a finished or killed sweep continues its study)
    llmops sweep --study lr-search     # another study (its own trials, sampler state and plots)
    llmops sweep --apply               # then `dvc exp apply` the best trial: its params and outputs, to commit

The search space is `sweep.space` (dotted run params, e.g. train.learning_rate, train.lora.r,
with Optuna's distributions). Each trial is the DVC experiment `sweep-<study>-<number>`: params.yaml
is HEAD's plus the trial's values (`llmops experiment start`, the same validation and the same
run-parameter rule as an Airflow run), `dvc repro train` trains it (DVC's run cache makes a
repeated configuration free), and the adapter is scored on the **validation** split by the gate's
primary metric (pipelines/evaluation/objective.py; never the test split, which stays the gate's),
then `dvc exp save` records params, dvc.lock, metrics and the objective (reports/sweep/objective.json):
`dvc exp show` lists every trial. In MLflow, the sweep is one run (experiment tracking.experiment,
named `sweep-<study>`) with a child run per trial, under which the trial's training run nests.

Pruning: the `train` stage reports each evaluation loss to the trial and stops when the study's
pruner (median of the other trials at the same step) says it cannot win
(pipelines/training/pruning.py); the trial is PRUNED in the study and leaves no DVC experiment.

The study lives in sweep.storage (a deployment setting: env LLMOPS_SWEEP_STORAGE, else
sqlite:///sweeps.db in the project). Several workers (clones of the project on other machines)
pointed at one PostgreSQL database run trials of one study at once: Optuna's RDB storage is the
distributed engine. A killed sweep continues where it stopped: the trial it was running goes
stale after 2 x sweep.heartbeat_seconds without a heartbeat, is failed and queued again with the
same params (up to sweep.max_retries), and the budget counts finished trials only.

Writes reports/sweep/<study>/: summary.json (every trial: params, state, value, DVC experiment),
best-params.diff (HEAD's params.yaml -> the best trial's, to review and commit), history.png and
importance.png (Optuna's plots), also logged to the MLflow sweep run. Trials start from HEAD, so
commit params.yaml first; the workspace ends holding the last trial's outputs, as after `dvc exp run`.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from pipelines.accounting import cost
from pipelines.config import settings
from pipelines.config.params import Params, SearchDimension
from pipelines.errors import LLMOpsError, ParamsError
from pipelines.evaluation.objective import direction, objective_metric
from pipelines.io import atomic_write_json, atomic_write_text
from pipelines.registry import experiments, tracking
from pipelines.training.pruning import TRIAL_ENV, make_pruner

logger = logging.getLogger(__name__)

OBJECTIVE_FILE = Path("reports/sweep/objective.json")  # the trial's score, saved with its DVC experiment
MARKERS = Path(".dvc/tmp/llmops-sweep")  # pruned-trial marker files
TARGET = "train"
COST_ATTR = "llmops.cost"  # a trial's machine time at cost.prices (budget.per_sweep)
_ABSENT = object()


class SweepError(LLMOpsError):
    """The sweep cannot start or go on (empty space, another study's metric, repeated failures)."""


class TrialFailed(LLMOpsError):
    """One trial's stages failed (not pruned): recorded as FAIL, the sweep goes on."""


def experiment_name(study: str, number: int) -> str:
    return f"sweep-{study}-{number}"


def override(key: str, value: Any, baseline: dict | None = None) -> str:
    """A `dvc exp run -S` override; JSON spells numbers, booleans, null and quoted strings as the
    Hydra grammar reads them. A key the baseline params.yaml does not spell out (its value is the
    default) is added: Hydra's `++key=value`."""
    add = baseline is not None and dotted_get(baseline, key, _ABSENT) is _ABSENT
    return f"{'++' if add else ''}{key}={json.dumps(value)}"


def suggest(trial: Any, key: str, dimension: SearchDimension) -> Any:
    if dimension.type == "categorical":
        return trial.suggest_categorical(key, list(dimension.choices or []))
    if dimension.type == "int":
        return trial.suggest_int(key, int(dimension.low), int(dimension.high), step=int(dimension.step or 1),
                                 log=dimension.log)
    return trial.suggest_float(key, float(dimension.low), float(dimension.high), step=dimension.step,
                               log=dimension.log)


def dotted_get(data: dict, key: str, default: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def defaults_trial(baseline_text: str, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """HEAD's values of the swept keys (those it sets and the space admits): the trial to beat."""
    baseline = yaml.safe_load(baseline_text) or {}
    values = {}
    for key, dimension in space.items():
        value = dotted_get(baseline, key)
        if value is None:
            continue
        if dimension.type == "categorical":
            if value in (dimension.choices or []):
                values[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and \
                float(dimension.low) <= float(value) <= float(dimension.high):
            values[key] = value
    return values


def _find_key(lines: list[str], start: int, parent_indent: int, name: str) -> tuple[int, int] | None:
    """The line of mapping key `name` in the block after `start` indented deeper than its parent."""
    block_indent = None
    for index in range(start, len(lines)):
        line = lines[index]
        content = line.strip()
        if not content or content.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent <= parent_indent:
            return None
        block_indent = indent if block_indent is None else block_indent
        if indent == block_indent and re.match(rf"{re.escape(name)}\s*:(\s|$)", line.lstrip(" ")):
            return index, indent
    return None


def edit_scalar(text: str, key: str, value: Any) -> str | None:
    """`text` (a YAML file) with the scalar at dotted `key` replaced on its own line, every other
    line as written; None when the key is not a scalar line of its own.

    Written here because the YAML writers round-trip the whole file: DVC's (ruamel) turns `null`
    into an empty value and re-indents lists, so a diff made with it shows dozens of lines the
    sweep did not change; this changes one line per swept key."""
    lines = text.splitlines(keepends=True)
    start, parent = 0, -1
    found = None
    for part in key.split("."):
        found = _find_key(lines, start, parent, part)
        if found is None:
            return None
        start, parent = found[0] + 1, found[1]
    index = found[0]
    match = re.match(r"^(\s*[^:#]+:[ \t]*)([^#\n]*?)([ \t]*)(#.*)?(\r?\n)?$", lines[index])
    if match is None or not match.group(2):
        return None  # a block (mapping or list) follows: not a one-line scalar
    head, old, gap, comment, newline = match.groups()
    written = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    if comment:
        gap = " " * max(1, len(old) + len(gap) - len(written))
    lines[index] = f"{head}{written}{gap if comment else ''}{comment or ''}{newline or ''}"
    return "".join(lines)


def params_diff(baseline_text: str, overrides: list[str], root: Path) -> str:
    """A unified diff of params.yaml: HEAD's -> HEAD's with the overrides, one line per swept key
    (checked against what DVC's own override writer makes of the same overrides)."""
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        draft = Path(tmp) / "params.yaml"
        draft.write_text(baseline_text, encoding="utf-8")
        if overrides:
            apply_overrides(draft, list(overrides))
        dvc_written = draft.read_text(encoding="utf-8")
    best = baseline_text
    for item in overrides:
        key, _, raw = item.lstrip("+").partition("=")
        edited = edit_scalar(best, key, yaml.safe_load(raw))
        if edited is None:
            best = dvc_written  # a key HEAD does not spell out as one line: DVC's rewrite of the file
            break
        best = edited
    if yaml.safe_load(best) != yaml.safe_load(dvc_written):
        best = dvc_written
    return "".join(difflib.unified_diff(baseline_text.splitlines(keepends=True), best.splitlines(keepends=True),
                                        fromfile="a/params.yaml", tofile="b/params.yaml"))


def release_dead_trial(root: Path, study: str) -> None:
    """A killed sweep left its trial holding the workspace (and maybe a half-written dvc.lock):
    release it, its process being gone."""
    state = experiments.read_state(root)
    name = str(state.get("name") or "")
    if state.get("status") == "running" and name.startswith(f"sweep-{study}-"):
        pid = state.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and experiments.pid_alive(pid):
            raise SweepError(f"sweep {study} is already running here (pid {pid}, trial {name}); one sweep per "
                             "workspace: run other workers in other clones against the same sweep.storage")
        logger.info("sweep %s: releasing the workspace from %s, whose sweep was killed", study, name)
        experiments.end(root, name)
        experiments.repair_lockfile(root)


def _last_error(log: str) -> str:
    for line in reversed(log.strip().splitlines()):
        if "error" in line.lower() or "Error" in line:
            return line.strip()[-400:]
    return (log.strip().splitlines() or ["(no output)"])[-1][-400:]


class Sweep:
    def __init__(self, root: Path, params: Params, study_name: str, budget: int) -> None:
        self.root, self.params, self.study_name, self.budget = root, params, study_name, budget
        self.metric = objective_metric(params)
        self.direction = direction(self.metric)
        self.space = params.sweep.space
        self.out = root / params.paths.reports_dir / "sweep" / study_name
        self.storage_url = settings.sweep_storage(params.sweep, root).value or ""
        self.baseline = experiments.committed_params(root)
        self.baseline_data = yaml.safe_load(self.baseline) or {}
        self.failures = 0
        self.client: Any = None
        self.parent_run: str | None = None
        # budget.per_sweep: each trial's machine time at cost.prices, kept on the trial in the study
        self.hourly = cost.price_per_hour(cost.detect(params.cost), params.cost)
        self.stopped_by_budget: str | None = None

    # --- the study -------------------------------------------------------------------------

    def open_study(self) -> Any:
        import optuna

        sweep = self.params.sweep
        storage = optuna.storages.RDBStorage(
            self.storage_url, heartbeat_interval=sweep.heartbeat_seconds, grace_period=2 * sweep.heartbeat_seconds,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=sweep.max_retries),
            engine_kwargs={"connect_args": {"timeout": 60}} if self.storage_url.startswith("sqlite") else None)
        sampler = (optuna.samplers.TPESampler(seed=sweep.seed) if sweep.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=sweep.seed))
        pruner = make_pruner(self.pruner_spec())
        study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction=self.direction, load_if_exists=True)
        recorded = study.user_attrs.get("metric")
        if recorded is not None and recorded != self.metric:
            raise SweepError(f"study {self.study_name} compares trials by {recorded}, this sweep by {self.metric} "
                             f"(sweep.metric / evaluate.primary_metric): name another study (--study) or set "
                             f"sweep.metric: {recorded}")
        if recorded is None:
            study.set_user_attr("metric", self.metric)
            study.set_user_attr("space", {k: v.model_dump(exclude_none=True) for k, v in self.space.items()})
            if sweep.enqueue_defaults and not study.trials:
                defaults = defaults_trial(self.baseline, self.space)
                if defaults:
                    study.enqueue_trial(defaults, user_attrs={"llmops.defaults": True})
        return study

    def pruner_spec(self) -> dict[str, Any]:
        """The pruner's settings, which the trial's `train` process needs too (a study's storage
        does not keep its pruner)."""
        sweep = self.params.sweep
        return {"kind": sweep.pruner, "startup_trials": sweep.pruner_startup_trials,
                "warmup_steps": sweep.pruner_warmup_steps}

    def finished(self, study: Any) -> int:
        from optuna.trial import TrialState

        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    # --- MLflow ----------------------------------------------------------------------------

    def start_tracking(self, study: Any) -> None:
        import mlflow

        run_id = study.user_attrs.get("mlflow_run_id")
        self.parent_run = tracking.start_run(self.params.tracking, f"sweep-{self.study_name}", run_id=run_id,
                                             tags={"llmops.sweep.study": self.study_name,
                                                   "llmops.sweep.metric": self.metric})
        if run_id != self.parent_run:
            study.set_user_attr("mlflow_run_id", self.parent_run)
            tracking.log_params({"sweep": {"study": self.study_name, "metric": self.metric,
                                           "direction": self.direction, "sampler": self.params.sweep.sampler,
                                           "pruner": self.params.sweep.pruner},
                                 "space": {k: json.dumps(v.model_dump(exclude_none=True)) for k, v in
                                           self.space.items()}})
        self.client = mlflow.MlflowClient(mlflow.get_tracking_uri())
        self.experiment_id = mlflow.get_run(self.parent_run).info.experiment_id

    def child_run(self, trial: Any, overrides: list[str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=experiment_name(self.study_name, trial.number),
                                     tags={"mlflow.parentRunId": self.parent_run,
                                           "llmops.sweep.study": self.study_name,
                                           "llmops.sweep.trial": str(trial.number),
                                           "llmops.dvc_experiment": experiment_name(self.study_name, trial.number)})
        for key, value in trial.params.items():
            self.client.log_param(run.info.run_id, key, value)
        self.client.set_tag(run.info.run_id, "llmops.sweep.overrides", " ".join(overrides))
        return run.info.run_id

    # --- one trial -------------------------------------------------------------------------

    def objective(self, trial: Any) -> float:
        import optuna

        from pipelines.evaluation.objective import validation_score

        name = experiment_name(self.study_name, trial.number)
        trial_started = time.monotonic()
        values = {key: suggest(trial, key, dimension) for key, dimension in self.space.items()}
        overrides = [override(key, value, self.baseline_data) for key, value in values.items()]
        logger.info("sweep %s: trial %d: %s", self.study_name, trial.number, " ".join(overrides) or "(HEAD)")
        child = self.child_run(trial, overrides)
        status = "FAILED"
        try:
            trial_params = experiments.start(self.root, name, overrides)
            marker = self.root / MARKERS / f"{self.study_name}-{trial.number}.pruned"
            marker.unlink(missing_ok=True)
            env = {**os.environ,
                   TRIAL_ENV: json.dumps({"storage": self.storage_url, "study": self.study_name,
                                          "trial_id": trial._trial_id, "number": trial.number,  # noqa: SLF001
                                          "pruned_file": str(marker), "pruner": self.pruner_spec()}),
                   tracking.PARENT_RUN_ENV: child,
                   tracking.RUN_TAGS_ENV: json.dumps({"llmops.sweep.study": self.study_name,
                                                      "llmops.sweep.trial": str(trial.number)})}
            started = time.monotonic()
            result = self.repro(env, trial.number)
            if result.returncode != 0:
                if marker.exists():
                    status = "KILLED"
                    self.client.set_tag(child, "llmops.sweep.state", "pruned")
                    detail = json.loads(marker.read_text())
                    marker.unlink(missing_ok=True)
                    logger.info("sweep %s: trial %d pruned at step %s (eval_loss %.4f behind the other trials)",
                                self.study_name, trial.number, detail.get("step"), detail.get("eval_loss"))
                    raise optuna.TrialPruned(f"pruned at step {detail.get('step')}")
                raise TrialFailed(f"trial {trial.number} ({' '.join(overrides)}): `dvc repro {TARGET}` failed: "
                                  f"{_last_error(result.stdout + result.stderr)}")
            score = validation_score(trial_params, self.metric)
            record = {"study": self.study_name, "trial": trial.number, "experiment": name, "overrides": overrides,
                      **score, "train_seconds": round(time.monotonic() - started, 1)}
            atomic_write_json(self.root / OBJECTIVE_FILE, record)
            experiments.save(self.root, name, message=f"sweep {self.study_name} trial {trial.number}: "
                                                      f"{self.metric} {score['value']:.4f} on validation",
                             include=[str(OBJECTIVE_FILE)], targets=[TARGET])
            self.client.log_metric(child, f"validation_{self.metric}", score["value"])
            self.client.log_metric(self.parent_run, f"trial_validation_{self.metric}", score["value"],
                                   step=trial.number)
            trial.set_user_attr("dvc_experiment", name)
            status = "FINISHED"
            self.failures = 0
            logger.info("sweep %s: trial %d: %s = %.4f on %s validation examples", self.study_name, trial.number,
                        self.metric, score["value"], score["examples"] or "the training's")
            return float(score["value"])
        except TrialFailed as error:
            self.failures += 1
            trial.set_user_attr("error", str(error))
            logger.warning("sweep %s: %s", self.study_name, error)
            raise
        finally:
            self.client.set_terminated(child, status=status)
            experiments.end(self.root, name)
            # the machine time is spent whether the trial completed, was pruned or failed
            seconds = time.monotonic() - trial_started
            trial.set_user_attr(COST_ATTR, None if self.hourly is None else self.hourly * seconds / 3600)

    def repro(self, env: dict[str, str], number: int) -> subprocess.CompletedProcess:
        beside = Path(sys.executable).parent / "dvc"
        command = [str(beside) if beside.exists() else "dvc", "repro", TARGET]
        log_path = self.out / "trials" / f"{number}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(command, cwd=self.root, env=env, capture_output=True, text=True)
        log_path.write_text(result.stdout + result.stderr, encoding="utf-8")
        return result

    def spent(self, study: Any) -> list[float]:
        """What each priced trial of the study cost (all invocations: the budget is the study's)."""
        return [t.user_attrs[COST_ATTR] for t in study.get_trials(deepcopy=False)
                if isinstance(t.user_attrs.get(COST_ATTR), (int, float))]

    def over_budget(self, study: Any) -> str | None:
        """Why no further trial may start under budget.per_sweep (the spend so far plus the mean
        trial's cost would pass it), or None."""
        limit = self.params.budget.per_sweep
        costs = self.spent(study)
        if limit is None or not costs:
            return None
        spent, expected = sum(costs), sum(costs) / len(costs)
        if spent + expected <= limit:
            return None
        currency = self.params.cost.currency
        return (f"budget.per_sweep {limit} {currency}: {len(costs)} trials cost {spent:.4f} {currency}, and one more "
                f"(about {expected:.4f}) would pass it; raise budget.per_sweep to continue the study")

    def stop_on_budget(self, study: Any, _trial: Any) -> None:
        reason = self.over_budget(study)
        if reason:
            self.stopped_by_budget = reason
            study.stop()

    def stop_on_repeated_failures(self, study: Any, _trial: Any) -> None:
        if self.failures >= self.params.sweep.max_consecutive_failures:
            study.stop()

    # --- the result ------------------------------------------------------------------------

    def summarize(self, study: Any) -> dict[str, Any]:
        from optuna.trial import TrialState

        trials = []
        for t in study.get_trials(deepcopy=False):
            # a pruned trial's value in Optuna is its last intermediate value (a loss), not the objective
            value = t.value if t.state == TrialState.COMPLETE else None
            trials.append({"number": t.number, "state": t.state.name, "value": value, "params": t.params,
                           "experiment": t.user_attrs.get("dvc_experiment"),
                           "defaults": bool(t.user_attrs.get("llmops.defaults")),
                           "seconds": round(t.duration.total_seconds(), 1) if t.duration else None,
                           "cost": t.user_attrs.get(COST_ATTR)})
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        summary: dict[str, Any] = {
            "study": self.study_name, "metric": self.metric, "direction": self.direction, "split": "validation",
            "storage": settings.hide_password(self.storage_url), "budget": self.budget,
            "states": dict(Counter(t["state"] for t in trials)), "trials": trials, "best": None,
            "cost": {"spent": round(sum(self.spent(study)), 8) if self.hourly is not None else None,
                     "currency": self.params.cost.currency, "per_sweep": self.params.budget.per_sweep,
                     "stopped_by_budget": self.stopped_by_budget}}
        if complete:
            best = study.best_trial
            overrides = [override(k, v, self.baseline_data) for k, v in best.params.items()]
            defaults = [t for t in complete if t.user_attrs.get("llmops.defaults")]
            summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                               "overrides": overrides, "experiment": best.user_attrs.get("dvc_experiment")}
            if defaults:
                summary["defaults"] = {"number": defaults[0].number, "value": defaults[0].value}
            diff = params_diff(self.baseline, overrides, self.root)
            atomic_write_text(self.out / "best-params.diff", diff or "# the best trial is HEAD's params\n")
        atomic_write_json(self.out / "summary.json", summary)
        return summary

    def plots(self, study: Any) -> list[Path]:
        """Optuna's optimization history and hyperparameter importances (fANOVA), as PNGs."""
        import matplotlib

        matplotlib.use("Agg")
        import optuna
        from optuna.visualization import matplotlib as plots

        made = []
        jobs = [("history.png", plots.plot_optimization_history)]
        if len(self.space) > 1:
            jobs.append(("importance.png", plots.plot_param_importances))
        for filename, plot in jobs:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    axes = plot(study)
                figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
                figure.set_size_inches(8, 5)
                figure.tight_layout()
                path = self.out / filename
                figure.savefig(path, dpi=100)
                made.append(path)
            except (ValueError, RuntimeError) as error:  # e.g. too few complete trials for importances
                logger.info("sweep %s: no %s (%s)", self.study_name, filename, str(error).splitlines()[0])
        return made

    def finish_tracking(self, study: Any, summary: dict[str, Any]) -> None:
        best = summary.get("best")
        if best is not None:
            tracking.log_metrics({f"best_validation_{self.metric}": best["value"], "best_trial": best["number"]})
        tracking.log_metrics({f"trials_{state.lower()}": n for state, n in summary["states"].items()})
        for path in [self.out / "summary.json", self.out / "best-params.diff", *self.plots(study)]:
            if path.exists():
                tracking.log_artifacts(path)
        tracking.end_run("FINISHED")

    # --- the whole sweep -------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        import optuna
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        if not self.space:
            raise SweepError("sweep.space is empty: declare the params to search, e.g. train.learning_rate: "
                             "{type: float, low: 1.0e-5, high: 1.0e-3, log: true} (docs/training.md)")
        release_dead_trial(self.root, self.study_name)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = self.open_study()
        self.start_tracking(study)
        status = "FAILED"
        try:
            remaining = self.budget - self.finished(study)
            logger.info("sweep %s: %d of %d trials finished; %s by %s on the validation split (%s)",
                        self.study_name, self.budget - max(remaining, 0), self.budget, self.direction, self.metric,
                        settings.hide_password(self.storage_url))
            if self.params.budget.per_sweep is not None and self.hourly is None:
                logger.warning("sweep %s: budget.per_sweep is set but trials cannot be priced: %s", self.study_name,
                               cost.missing_price(cost.detect(self.params.cost), self.params.cost))
            self.stopped_by_budget = self.over_budget(study)
            if self.stopped_by_budget:
                logger.warning("sweep %s: no trial started: %s", self.study_name, self.stopped_by_budget)
            elif remaining > 0:
                study.optimize(self.objective, catch=(TrialFailed,),
                               callbacks=[MaxTrialsCallback(self.budget, states=(TrialState.COMPLETE,
                                                                                 TrialState.PRUNED)),
                                          self.stop_on_repeated_failures, self.stop_on_budget])
            if self.failures >= self.params.sweep.max_consecutive_failures:
                last = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))[-1]
                raise SweepError(f"sweep {self.study_name} stopped after {self.failures} failed trials in a row: "
                                 f"{last.user_attrs.get('error') or 'see ' + str(self.out / 'trials')}")
            summary = self.summarize(study)
            self.finish_tracking(study, summary)
            status = "FINISHED"
            return summary
        finally:
            if status != "FINISHED":
                tracking.end_run("FAILED")


def main(params: Params, trials: int | None = None, study: str | None = None, apply: bool = False) -> None:
    root = Path.cwd()
    if trials is not None and trials < 1:
        raise ParamsError(f"--trials {trials}: give at least 1")
    if study is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", study):
        raise ParamsError(f"--study {study!r}: use letters, digits, '_', '.' and '-' (it names DVC experiments)")
    sweep = Sweep(root, params, study or params.sweep.study, trials or params.sweep.trials)
    summary = sweep.run()
    best = summary.get("best")
    if sweep.stopped_by_budget:
        print(f"sweep {sweep.study_name}: stopped: {sweep.stopped_by_budget}")
    if best is None:
        print(f"sweep {sweep.study_name}: no trial finished; see {sweep.out / 'trials'}")
        return
    defaults = summary.get("defaults")
    print(f"sweep {sweep.study_name}: best trial {best['number']} ({best['experiment']}): {sweep.metric} "
          f"{best['value']:.4f} on validation" + (f" (HEAD's params: {defaults['value']:.4f}, trial "
                                                 f"{defaults['number']})" if defaults else ""))
    diff = (sweep.out / "best-params.diff").read_text(encoding="utf-8")
    print(diff, end="" if diff.endswith("\n") else "\n")
    if apply and best.get("experiment"):
        beside = Path(sys.executable).parent / "dvc"
        result = subprocess.run([str(beside) if beside.exists() else "dvc", "exp", "apply", best["experiment"]],
                                cwd=root, capture_output=True, text=True)
        if result.returncode != 0:
            raise SweepError(f"`dvc exp apply {best['experiment']}` failed: {_last_error(result.stderr)}")
        print(f"applied {best['experiment']}: params.yaml, dvc.lock and outputs are the best trial's; review "
              "`git diff` and commit")
