"""Stage `evaluate`: the candidate against the base model and the current champion.

Reads   `paths.prepared_dir`/test.parquet, the base model folder, the trained adapter, the
        registry's `champion` (when one exists and `evaluate.compare_champion` is on), and
        params `evaluate`.
Writes  `paths.reports_dir`/evaluate/: metrics.json (headline numbers for `dvc metrics`),
        results.json (all systems, per-slice results, paired bootstrap CIs of the
        candidate's improvement over base and champion), samples.csv (prompt, reference,
        base, candidate, champion); all logged to an MLflow run, the samples as a table.
Run     `llmops evaluate` or `dvc repro evaluate`.

Every system is scored on the same examples: perplexity of the reference responses,
ROUGE-L, BLEU, exact and normalised match of the generated answers (batched generation
with the params' decoding config: greedy by default, so deterministic), and tokens/s.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipelines.config.params import EvaluateParams, Params, Paths
from pipelines.evaluation.agreement import LEXICAL, choose_primary
from pipelines.evaluation.harness import evaluate, headline, select_examples
from pipelines.io import atomic_path, atomic_write_json, atomic_write_text, read_parquet
from pipelines.model.lm import CausalLM
from pipelines.registry import model_registry as registry
from pipelines.registry import tracking

logger = logging.getLogger(__name__)


def write_outputs(results: dict[str, Any], paths: Paths) -> None:
    import pandas as pd

    # One file at a time, each whole (the folder also holds DVC's .gitignore).
    with atomic_path(paths.report("evaluation_samples")) as tmp:
        pd.DataFrame(results["samples"]).to_csv(tmp, index=False)
    atomic_write_text(paths.report("evaluation_results"),
                      json.dumps(results, indent=2, sort_keys=True, default=float) + "\n")
    atomic_write_json(paths.metrics("evaluate"), headline(results))


def load_systems(params: Params) -> dict[str, CausalLM]:
    dtype = params.evaluate.dtype
    base_dir, adapter_dir = params.base_model.output_dir, params.train.adapter_dir
    systems = {
        "candidate": CausalLM.load(base_dir, adapter_dir, dtype=dtype, name="candidate"),
        "base": CausalLM.load(base_dir, dtype=dtype, name="base"),
    }
    if params.evaluate.compare_champion:
        champion = registry.champion_model(params, dtype=dtype)
        if champion is not None:
            systems["champion"] = champion
    return systems


def primary_metric_settings(params: Params) -> tuple[EvaluateParams, dict[str, Any]]:
    """params.evaluate with the primary metric resolved (evaluate.primary_metric: agreement reads the
    reviewers' metric agreement from the registry), and the record of the choice."""
    evaluate_params = params.evaluate
    agreement: dict[str, Any] = {}
    source = None
    if evaluate_params.primary_metric == "agreement":
        source, agreement = registry.latest_metric_agreement(params)
    computed = [*LEXICAL, *evaluate_params.semantic_metrics]
    primary, choice = choose_primary(evaluate_params.primary_metric, evaluate_params.agreement_fallback, computed,
                                     agreement, evaluate_params.min_agreement_tasks, source)
    if choice["mode"] == "agreement":
        logger.info("evaluate: primary metric %s (%s)", primary, choice["reason"])
    return evaluate_params.model_copy(update={"primary_metric": primary}), choice


def main(params: Params) -> None:
    import time

    started = time.time()  # the MLflow run covers the whole evaluation, not just its logging
    test_path = params.paths.prepared_dir / "test.parquet"
    frame = read_parquet(test_path, produced_by="prepare")
    frame = select_examples(frame, params.evaluate.max_examples, params.evaluate.seed,
                            params.evaluate.top_up_slices, params.evaluate.min_slice_size)
    settings, choice = primary_metric_settings(params)
    systems = load_systems(params)
    results = evaluate(frame, systems, settings)
    results["primary_metric_choice"] = choice
    champion = getattr(systems.get("champion"), "registry_version", None)
    results["champion_version"] = champion
    run_id = tracking.log_evaluation(params, results, frame, source=test_path, started=started)
    results["mlflow_run_id"] = run_id
    write_outputs(results, params.paths)
    primary = results["primary_metric"]
    logger.info("evaluate: %s candidate=%.4f base=%.4f%s", primary, results["systems"]["candidate"][primary],
                results["systems"]["base"][primary],
                f" champion(v{champion})={results['systems']['champion'][primary]:.4f}" if champion else "")
