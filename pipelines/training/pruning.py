"""A sweep trial inside the `train` stage: its evaluation losses reported to the Optuna study,
and the run stopped early when the study's pruner says the trial will not win.

`llmops sweep` (pipelines/commands/sweep.py) runs each trial's stages with LLMOPS_SWEEP_TRIAL
set (a JSON object: storage URL, study name, trial id and number, the pruner's settings, the
file that marks a pruned trial). Without it, in every other run, nothing here imports Optuna or changes training.

The intermediate value is the validation loss at each `train.eval_steps`; a study that maximizes
its metric (ROUGE-L, ...) gets the negated loss, so that for Optuna's pruners higher is better
in both. A pruned trial ends the stage like any other error (no adapter, no metrics: DVC records
nothing for it) after writing the marker file, which the sweep reads to tell a pruned trial from
a failed one. Under DeepSpeed, rank 0 reports and every rank then asks the study, so all ranks
stop together.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipelines.errors import LLMOpsError
from pipelines.training import distributed

logger = logging.getLogger(__name__)

TRIAL_ENV = "LLMOPS_SWEEP_TRIAL"


class TrialPruned(LLMOpsError):
    """The sweep's pruner stopped this trial (its validation loss was behind the other trials')."""


def trial_spec(environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    environ = os.environ if environ is None else environ
    raw = environ.get(TRIAL_ENV, "").strip()
    if not raw:
        return None
    try:
        spec = json.loads(raw)
        missing = [key for key in ("storage", "study", "trial_id", "number", "pruned_file") if key not in spec]
    except (ValueError, TypeError):
        spec, missing = None, ["a JSON object"]
    if missing:
        raise LLMOpsError(f"{TRIAL_ENV} lacks {', '.join(missing)}; it is set by `llmops sweep` for its trials: "
                          f"unset it to train outside a sweep")
    return spec


def make_pruner(spec: dict[str, Any] | None) -> Any:
    """Optuna's pruner from sweep.pruner* (the study's storage does not keep it: the sweep passes
    the same settings to every trial's `train`)."""
    import optuna

    spec = spec or {}
    if spec.get("kind", "median") == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=int(spec.get("startup_trials", 2)),
                                       n_warmup_steps=int(spec.get("warmup_steps", 0)))


def pruning_callback(spec: dict[str, Any]) -> Any:
    """A transformers TrainerCallback that reports eval_loss to the trial and prunes it."""
    import optuna
    from transformers import TrainerCallback

    # No heartbeat here: the sweep process that asked for the trial keeps it alive.
    storage = optuna.storages.RDBStorage(spec["storage"])
    study = optuna.load_study(study_name=spec["study"], storage=storage, pruner=make_pruner(spec.get("pruner")))
    trial = optuna.trial.Trial(study, int(spec["trial_id"]))
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    number = int(spec["number"])

    class SweepPruning(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            step = int(state.global_step)
            if state.is_world_process_zero:
                trial.report(sign * float(loss), step)
            distributed.barrier()
            if not trial.should_prune():
                return
            message = (f"train: sweep {spec['study']} trial {number} pruned at step {step}/{state.max_steps} "
                       f"(eval_loss {float(loss):.4f} is behind the other trials at this step); no adapter was written")
            if state.is_world_process_zero:
                Path(spec["pruned_file"]).parent.mkdir(parents=True, exist_ok=True)
                Path(spec["pruned_file"]).write_text(json.dumps({"step": step, "eval_loss": float(loss)}))
                try:
                    import mlflow

                    if mlflow.active_run() is not None:
                        mlflow.set_tag("llmops.sweep.state", "pruned")
                except Exception as error:  # noqa: BLE001 - the tag is a courtesy; the marker file decides
                    logger.warning("could not tag the MLflow run as pruned: %s", error)
            raise TrialPruned(message)

    return SweepPruning()
