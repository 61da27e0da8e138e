"""MLflow tracking for the stages: where runs go, what every run records.

The tracking URI is `tracking.uri` when set, else the environment's MLFLOW_TRACKING_URI,
else the embedded default `sqlite:///mlflow.db` in the project root (artifacts then go to
./mlruns): the rule of every deployment setting, in pipelines/config/settings.py. Nothing here
runs at import; mlflow is imported inside the functions, and only on rank 0.

A store that lives in the project (the embedded default) records artifact locations
relative to the project root (`mlruns/<experiment>`), so the project folder can be moved
or copied with its tracking history (`portable_store`). A run's duration is the stage's:
`start_run(start_time=...)` back-dates a run to when its work began, and a finished run
reopened to add to it (register logs the model to the training run) keeps its own end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import subprocess
import warnings
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import settings
from pipelines.config.params import TrackingParams
from pipelines.errors import LLMOpsError
from pipelines.model.sources import file_sha256

logger = logging.getLogger(__name__)


def resolve_tracking_uri(params: TrackingParams, root: Path | None = None) -> str:
    """The MLflow tracking URI to use (config.settings.tracking_uri is the same setting with where it came from)."""
    return str(settings.tracking_uri(params, root).value)  # never None: the setting has a default


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite-backed store go to `mlruns/` beside the database file.

    (MLflow's own default is ./mlruns in the current directory, wherever that is.) For a
    tracking server, the server decides (None).
    """
    db = _sqlite_path(uri)
    return (db.parent / "mlruns").as_uri() if db is not None else None


def portable_store(uri: str, root: Path | None = None) -> int:
    """Make a project-local SQLite store record artifact locations relative to the project root.

    MLflow resolves every local artifact location to an absolute path when it creates an
    experiment (`resolve_uri_if_local`) and has no call to change it afterwards, while it
    reads the stored string as it is: a relative `mlruns/1/<run>/artifacts` is opened
    against the working directory. The stages, `mlflow ui` and `llmops serve` run in the
    project root, the folder the embedded default's mlflow.db lives in, so for that store
    the relative form is the same place and survives moving or copying the project. Only
    then (the database in `root`, default the working directory) are the stored locations
    rewritten (experiments, and runs, logged models and model versions of older stores);
    any other store, and every tracking server, is left alone. Returns how many rows changed.
    """
    db = _sqlite_path(uri)
    root = (root or Path.cwd()).resolve()
    if db is None or db.parent != root or not db.exists():
        return 0
    mlruns = root / "mlruns"
    columns = [("experiments", "artifact_location"), ("runs", "artifact_uri"),
               ("logged_models", "artifact_location"), ("model_versions", "source"),
               ("model_versions", "storage_location")]
    changed = 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as connection, connection:
        connection.execute("PRAGMA secure_delete = ON")  # the old absolute paths do not linger in free space
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, column in columns:
            if table not in tables:
                continue
            for base in (mlruns.as_uri(), str(mlruns)):
                changed += connection.execute(
                    f"UPDATE {table} SET {column} = 'mlruns' || substr({column}, ?) "  # noqa: S608 - fixed names
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (len(base) + 1, base, len(base) + 1, base + "/")).rowcount
    if changed:
        logger.info("tracking store %s: %d artifact locations made relative to %s", db, changed, root)
    return changed


def pipeline_outputs(root: Path) -> set[str]:
    """dvc.lock and every output it records (HEAD's and the work tree's): files the pipeline writes."""
    outputs = {"dvc.lock"}
    texts = []
    lock = root / "dvc.lock"
    if lock.exists():
        texts.append(lock.read_text(encoding="utf-8"))
    committed = subprocess.run(["git", "show", "HEAD:./dvc.lock"], cwd=root, capture_output=True, text=True,
                               timeout=30)
    if committed.returncode == 0:
        texts.append(committed.stdout)
    for text in texts:
        try:
            stages = (yaml.safe_load(text) or {}).get("stages") or {}
        except yaml.YAMLError:
            continue
        for stage in stages.values():
            outputs.update(str(out.get("path", "")).rstrip("/") for out in (stage or {}).get("outs") or [])
    return outputs - {""}


def dirty_files(root: Path) -> list[str]:
    """Tracked files that differ from HEAD (staged or not), except what the pipeline itself writes.

    DVC rewrites dvc.lock and the metrics files it lists after every stage (and with
    `core.autostage` stages them): they are the run's outputs, recorded by hash in the
    version's evidence, not uncommitted source. Paths are relative to `root`.
    """
    status = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=no", "--", "."], cwd=root,
                            capture_output=True, text=True, check=True, timeout=30).stdout
    prefix = subprocess.run(["git", "rev-parse", "--show-prefix"], cwd=root, capture_output=True, text=True,
                            check=True, timeout=10).stdout.strip()
    entries = status.split("\0")
    paths, i = [], 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC":  # a rename or copy: the next field is the old path
            i += 1
    outputs = pipeline_outputs(root)
    dirty = []
    for path in paths:
        path = path.removeprefix(prefix) if prefix and path.startswith(prefix) else path
        if not any(path == out or path.startswith(out + "/") for out in outputs):
            dirty.append(path)
    return sorted(set(dirty))


def git_state(root: Path | None = None) -> dict[str, str]:
    """The commit, whether tracked source differs from it, and which files (empty outside git)."""
    cwd = Path(root or Path.cwd())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = dirty_files(cwd)
    except (OSError, subprocess.SubprocessError):
        return {}
    shown = ", ".join(dirty[:30]) + (f" (+{len(dirty) - 30} more)" if len(dirty) > 30 else "")
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(dirty)).lower(), "git_dirty_files": shown}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}, for mlflow.log_params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def client_environment() -> None:
    """Bound MLflow's own HTTP retries (default: 7 with doubling backoff, minutes when a server
    is down). The stages retry registry calls themselves (pipelines/registry/model_registry.py), so one quick
    internal retry is enough; an explicit environment setting still wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


# A sweep (`llmops sweep`) runs each trial's stages with these set: the MLflow runs they start are
# children of the sweep's run (MLflow's own mlflow.parentRunId tag, which its UI nests by) and
# carry the trial's tags (a JSON object).
PARENT_RUN_ENV = "LLMOPS_MLFLOW_PARENT_RUN_ID"
RUN_TAGS_ENV = "LLMOPS_MLFLOW_RUN_TAGS"


def inherited_tags(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    tags: dict[str, str] = {}
    if environ.get(RUN_TAGS_ENV):
        try:
            tags.update({str(k): str(v) for k, v in json.loads(environ[RUN_TAGS_ENV]).items()})
        except (ValueError, AttributeError):
            logger.warning("%s is not a JSON object; its tags are ignored", RUN_TAGS_ENV)
    if environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = environ[PARENT_RUN_ENV]
    return tags


# Runs reopened with keep_end_time: run id -> (status, end time in ms) to restore when they end again.
_REOPENED: dict[str, tuple[str, int]] = {}


def start_run(params: TrackingParams, run_name: str, run_id: str | None = None,
              tags: dict[str, str] | None = None, start_time: float | None = None,
              keep_end_time: bool = False) -> str:
    """Start (or, given a known `run_id`, resume) the active MLflow run; return its id.

    `start_time` (seconds since the epoch) back-dates a new run to when the stage's work
    began, so its duration is the stage's and not the few milliseconds of logging at the
    end. `keep_end_time` reopens a finished run to add to it without changing its duration:
    `end_run` puts back its status and end time (register adds the model to the training
    run; without it the training run read as long as training plus evaluation).
    """
    import mlflow

    client_environment()
    uri = resolve_tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    if params.system_metrics:
        mlflow.set_system_metrics_sampling_interval(params.system_metrics_interval)
    if run_id is not None:
        try:
            existing = mlflow.get_run(run_id)
        except Exception:  # noqa: BLE001 - unknown in this store: start a new run instead
            logger.warning("MLflow run %s not found at %s; starting a new run", run_id, mlflow.get_tracking_uri())
            run_id = None
        else:
            if keep_end_time and existing.info.status == "FINISHED" and existing.info.end_time:
                _REOPENED[run_id] = (existing.info.status, existing.info.end_time)
    if run_id is None:
        tags = {**inherited_tags(), **(tags or {})}
        try:
            experiment = mlflow.get_experiment_by_name(params.experiment)
        except Exception as error:  # noqa: BLE001 - MlflowException or a requests error: both mean "unreachable"

            raise LLMOpsError(
                f"MLflow tracking at {mlflow.get_tracking_uri()} is unreachable ({str(error).splitlines()[0][:200]}); "
                "start the tracking server or fix tracking.uri / MLFLOW_TRACKING_URI"
            ) from None
        if experiment is None:
            mlflow.create_experiment(params.experiment, artifact_location=artifact_location(uri))
        portable_store(uri)
        experiment = mlflow.set_experiment(params.experiment)
        if start_time is not None:
            from mlflow.tracking.context.registry import resolve_tags

            created = mlflow.MlflowClient(uri).create_run(
                experiment.experiment_id, start_time=int(start_time * 1000), run_name=run_name,
                tags=resolve_tags(tags or {}))
            run_id = created.info.run_id
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                           log_system_metrics=params.system_metrics, tags=tags)
    logger.info("MLflow run %s at %s", run.info.run_id, mlflow.get_tracking_uri())
    return run.info.run_id


def end_run(status: str = "FINISHED") -> None:
    import mlflow

    active = mlflow.active_run()
    if active is None:
        return
    run_id = active.info.run_id
    mlflow.end_run(status=status)
    kept = _REOPENED.pop(run_id, None)
    if kept is not None:  # the reopened run's own outcome stands, whatever happened to what was added
        mlflow.MlflowClient(mlflow.get_tracking_uri()).set_terminated(run_id, status=kept[0], end_time=kept[1])


def log_params(params: dict[str, Any]) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.log_params({k: ("null" if v is None else v) for k, v in flatten(params).items()})
    except MlflowException as error:  # a resumed run already holds these params
        logger.debug("params not logged again: %s", error)


def log_dataset(frame: Any, source: Path, name: str, digest: str, context: str) -> None:
    """The prepared split as an MLflow dataset input (schema, row count, our content hash)."""
    import mlflow

    columns = [c for c in ("id", "prompt_text", "completion_text", "n_prompt_tokens", "n_completion_tokens")
               if c in frame.columns]
    with warnings.catch_warnings():  # mlflow's hints about its own source registry and int columns
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        dataset = mlflow.data.from_pandas(frame[columns], source=Path(source).resolve().as_uri(), name=name,
                                          targets="completion_text" if "completion_text" in columns else None,
                                          digest=digest[:32])
    mlflow.log_input(dataset, context=context, tags={"sha256": digest})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if finite:
        mlflow.log_metrics(finite, step=step)


def annotate_run(params: TrackingParams, run_id: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """Add metrics and tags to a run that has ended (a stage's cost, measured after its run closed),
    without reopening it: its status, duration and system metrics stay as they were."""
    import time

    import mlflow
    from mlflow.entities import Metric, RunTag

    client_environment()
    client = mlflow.MlflowClient(resolve_tracking_uri(params))
    now = int(time.time() * 1000)
    finite = [Metric(key, float(value), now, 0) for key, value in metrics.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
    client.log_batch(run_id, metrics=finite, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def log_artifacts(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    elif path.is_file():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_evaluation(params: Any, results: dict[str, Any], frame: Any, source: Path | None = None,
                   started: float | None = None) -> str:
    """An MLflow run for one evaluation: the commit, the test examples as a dataset input
    (`source`: the split they were drawn from), headline metrics, CIs, per-slice results,
    and the sample generations as a table; back-dated to `started`, when the evaluation
    began. Returns the run id."""
    import mlflow

    run_id = start_run(params.tracking, "evaluate", tags={"llmops.stage": "evaluate", **git_state()},
                       start_time=started)
    try:
        log_params({"evaluate": params.evaluate.model_dump()})
        if source is not None:

            log_dataset(frame, source, name="test", digest=file_sha256(Path(source)), context="evaluation")
        for system, values in results["systems"].items():
            log_metrics({f"{system}.{name}": value for name, value in values.items()})
        for baseline, differences in results["comparisons"].items():
            for name, diff in differences.items():
                prefix = f"vs_{baseline}.{name}"
                log_metrics({f"{prefix}.improvement": diff["improvement"], f"{prefix}.ci_low": diff["low"],
                             f"{prefix}.ci_high": diff["high"]})
        mlflow.log_dict({k: v for k, v in results.items() if k != "samples"}, "evaluation/results.json")
        if results["samples"]:
            import pandas as pd

            mlflow.log_table(pd.DataFrame(results["samples"]), artifact_file="evaluation/samples.json")
        mlflow.set_tags({"evaluate.champion_version": str(results.get("champion_version") or "none"),
                         "evaluate.examples": str(len(frame))})
    except Exception:
        end_run("FAILED")
        raise
    end_run()
    return run_id
