"""MLflow tracking for the stages: where runs go, what every run records.

The tracking URI is `tracking.uri` when set, else the environment's MLFLOW_TRACKING_URI,
else the embedded default `sqlite:///mlflow.db` in the project root (artifacts then go to
./mlruns): the rule of every deployment setting, in pipelines/settings.py. Nothing here
runs at import; mlflow is imported inside the functions, and only on rank 0.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

from pipelines.params import TrackingParams

logger = logging.getLogger(__name__)


def tracking_uri(params: TrackingParams, root: Path | None = None) -> str:
    from pipelines import settings

    return str(settings.tracking_uri(params, root).value)  # never None: the setting has a default


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite-backed store go to `mlruns/` beside the database file.

    (MLflow's own default is ./mlruns in the current directory, wherever that is.) For a
    tracking server, the server decides (None).
    """
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return None


def git_state(root: Path | None = None) -> dict[str, str]:
    """The commit and whether the work tree has uncommitted changes (empty outside git)."""
    cwd = str(root or Path.cwd())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(dirty)).lower()}


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
    is down). The stages retry registry calls themselves (pipelines/registry.py), so one quick
    internal retry is enough; an explicit environment setting still wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def start_run(params: TrackingParams, run_name: str, run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    """Start (or, given a known `run_id`, resume) the active MLflow run; return its id."""
    import mlflow

    client_environment()
    mlflow.set_tracking_uri(tracking_uri(params))
    if params.system_metrics:
        mlflow.set_system_metrics_sampling_interval(params.system_metrics_interval)
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except Exception:  # noqa: BLE001 - unknown in this store: start a new run instead
            logger.warning("MLflow run %s not found at %s; starting a new run", run_id, mlflow.get_tracking_uri())
            run_id = None
    if run_id is None:
        try:
            experiment = mlflow.get_experiment_by_name(params.experiment)
        except Exception as error:  # noqa: BLE001 - MlflowException or a requests error: both mean "unreachable"
            from pipelines.errors import LLMOpsError

            raise LLMOpsError(
                f"MLflow tracking at {mlflow.get_tracking_uri()} is unreachable ({str(error).splitlines()[0][:200]}); "
                "start the tracking server or fix tracking.uri / MLFLOW_TRACKING_URI"
            ) from None
        if experiment is None:
            mlflow.create_experiment(params.experiment, artifact_location=artifact_location(mlflow.get_tracking_uri()))
        mlflow.set_experiment(params.experiment)
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                           log_system_metrics=params.system_metrics, tags=tags)
    logger.info("MLflow run %s at %s", run.info.run_id, mlflow.get_tracking_uri())
    return run.info.run_id


def end_run(status: str = "FINISHED") -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run(status=status)


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


def log_artifacts(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    elif path.is_file():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_evaluation(params: Any, results: dict[str, Any], frame: Any) -> str:
    """An MLflow run for one evaluation: headline metrics, CIs, per-slice results, and
    the sample generations as a table. Returns the run id."""
    import mlflow

    run_id = start_run(params.tracking, "evaluate", tags={"llmops.stage": "evaluate"})
    try:
        log_params({"evaluate": params.evaluate.model_dump()})
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
