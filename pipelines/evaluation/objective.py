"""What a sweep trial is judged by: the trained adapter's score on the validation split.

The gate's primary metric (evaluate.primary_metric; `agreement` resolves to its fallback here,
before any review of this model exists) computed exactly as `evaluate` computes it on the test
split (the same generation settings and metric code), but on a seeded sample of the
**validation** split: choosing among trials by the test split would make the test split part of
training, and the gate's numbers optimistic. `eval_loss` instead takes training's own validation
loss (reports/train/metrics.json), which costs no generation.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pipelines.config.params import Params
from pipelines.errors import LLMOpsError
from pipelines.io import read_parquet

logger = logging.getLogger(__name__)

MINIMIZE = frozenset({"perplexity", "eval_loss"})  # lower is better; every other metric: higher
SEMANTIC = ("semantic_similarity", "bertscore_f1")


def objective_metric(params: Params) -> str:
    """sweep.metric, else the gate's primary metric (agreement: its fallback)."""
    if params.sweep.metric is not None:
        return params.sweep.metric
    primary = params.evaluate.primary_metric
    return params.evaluate.agreement_fallback if primary == "agreement" else primary


def direction(metric: str) -> str:
    return "minimize" if metric in MINIMIZE else "maximize"


def validation_score(params: Params, metric: str | None = None) -> dict[str, Any]:
    """The candidate in train.adapter_dir (on base_model.output_dir) scored by `metric` on
    sweep.validation_examples rows of the validation split (seeded by sweep.seed)."""
    metric = metric or objective_metric(params)
    started = time.perf_counter()
    if metric == "eval_loss":
        path = params.paths.metrics("train")
        try:
            value = json.loads(path.read_text())["eval_loss"]
        except (OSError, ValueError, KeyError) as error:
            raise LLMOpsError(f"sweep: {path} has no eval_loss ({error}); run `dvc repro train` first, with "
                              "validation rows (train.max_eval_samples > 0)") from None
        if value is None:
            raise LLMOpsError("sweep: training recorded no eval_loss (no validation rows): choose another "
                              "sweep.metric")
        return {"metric": metric, "value": float(value), "direction": direction(metric), "split": "validation",
                "examples": None, "seconds": round(time.perf_counter() - started, 2)}

    from pipelines.evaluation.harness import add_semantic_scores, score_system, select_examples
    from pipelines.evaluation.metrics import corpus_metrics
    from pipelines.model.lm import CausalLM

    frame = read_parquet(params.paths.prepared_dir / "validation.parquet", produced_by="prepare")
    if len(frame) == 0:
        raise LLMOpsError("sweep: the validation split is empty; raise prepare.validation_fraction")
    frame = select_examples(frame, params.sweep.validation_examples, params.sweep.seed)
    semantic = [metric] if metric in SEMANTIC else []
    settings = params.evaluate.model_copy(update={"primary_metric": metric, "semantic_metrics": semantic})
    candidate = CausalLM.load(params.base_model.output_dir, params.train.adapter_dir, dtype=settings.dtype,
                              name="candidate")
    scores, _ = score_system(candidate, frame, settings)
    if semantic:
        scores = add_semantic_scores({"candidate": scores}, settings)["candidate"]
    values = corpus_metrics(scores)
    logger.info("sweep: %s on %d validation examples = %.4f", metric, len(frame), values[metric])
    return {"metric": metric, "value": float(values[metric]), "direction": direction(metric), "split": "validation",
            "examples": len(frame), "metrics": {k: round(float(v), 6) for k, v in values.items()},
            "seconds": round(time.perf_counter() - started, 2)}
