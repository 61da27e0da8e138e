"""Every system scored on the same examples, and the candidate compared with the others
(paired bootstrap), per slice too; the work behind the stage `evaluate`.

What the stage reads and writes, and how it is run: pipelines/stages/evaluate.py.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.config.params import EvaluateParams
from pipelines.errors import LLMOpsError
from pipelines.evaluation.forgetting import forgetting
from pipelines.evaluation.metrics import Scores, corpus_metrics, length_bucket, paired_bootstrap
from pipelines.evaluation.semantic import SemanticScorer
from pipelines.model.encoders import encoder_dir
from pipelines.model.lm import CausalLM, Decoding

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

SYSTEMS = ("candidate", "base", "champion")
LENGTH_SLICE = "response_length"


def select_examples(frame: pd.DataFrame, limit: int | None, seed: int, top_up: list[str] | None = None,
                    min_size: int = 0) -> pd.DataFrame:
    """A seeded subset of the test split (all of it when `limit` is None), in id order.

    Each value of a `top_up` column that the test split holds at least `min_size` times but the
    sample holds fewer is topped up to `min_size` from the rows left out (seeded): a small new
    domain is then reported and gated as a slice. The sample can exceed `limit` by those rows.
    """
    import pandas as pd

    if limit is not None and limit < len(frame):
        chosen = frame.sample(n=limit, random_state=seed)
        rest = frame.drop(chosen.index).sample(frac=1.0, random_state=seed)
        extra = []
        for column in top_up or []:
            if column not in frame.columns:
                continue
            have = chosen[column].astype(str).value_counts()
            for value, available in frame[column].astype(str).value_counts().items():
                need = min_size - int(have.get(value, 0))
                if available >= min_size and need > 0:
                    picks = rest[rest[column].astype(str) == value].head(need)
                    extra.append(picks)
                    rest = rest.drop(picks.index)
        if extra:
            logger.info("evaluate: %d row(s) added to the sample so that every value of %s has %d",
                        sum(len(e) for e in extra), ", ".join(top_up or []), min_size)
        frame = pd.concat([chosen, *extra])
    return frame.sort_values("id").reset_index(drop=True)


def score_system(lm: CausalLM, frame: pd.DataFrame, params: EvaluateParams) -> tuple[Scores, dict[str, float]]:
    """Generate answers and score references for one system; returns scores and speed."""

    decoding = Decoding(**params.decoding.model_dump())
    generation = lm.generate(list(frame["prompt_text"]), decoding, batch_size=params.batch_size)
    nll, counts = lm.score(list(frame["prompt_text"]), list(frame["completion_text"]),
                           max_length=params.max_length, batch_size=params.batch_size)
    scores = Scores(generation.texts, list(frame["response"]), nll, counts)
    speed = {"tokens_per_second": generation.tokens_per_second, "generation_seconds": generation.seconds,
             "generated_tokens": int(sum(generation.new_tokens))}
    logger.info("evaluate: %s generated %d tokens at %.1f tokens/s", lm.name, speed["generated_tokens"],
                speed["tokens_per_second"])
    return scores, speed


def slice_labels(frame: pd.DataFrame, params: EvaluateParams) -> dict[str, list[str]]:
    labels = {}
    for name in params.slices:
        if name == LENGTH_SLICE:
            labels[name] = [length_bucket(len(r.split()), params.length_buckets) for r in frame["response"]]
        elif name in frame.columns:
            labels[name] = [str(v) for v in frame[name]]
        else:
            raise LLMOpsError(f"evaluate.slices names '{name}', which is not a column of the test split; "
                              f"use {LENGTH_SLICE} or one of: {', '.join(map(str, frame.columns))}")
    return labels


def per_slice(all_scores: dict[str, Scores], labels: dict[str, list[str]], min_size: int) -> dict[str, Any]:
    """{slice: {value: {"n": .., system: metrics}}} for slice values with at least `min_size` examples."""
    result: dict[str, Any] = {}
    for name, values in labels.items():
        result[name] = {}
        for value in sorted(set(values)):
            idx = np.array([i for i, v in enumerate(values) if v == value])
            if len(idx) < min_size:
                continue
            entry: dict[str, Any] = {"n": int(len(idx))}
            for system, scores in all_scores.items():
                entry[system] = corpus_metrics(scores, idx)
            result[name][value] = entry
    return result


def evaluate(frame: pd.DataFrame, systems: dict[str, CausalLM], params: EvaluateParams) -> dict[str, Any]:
    """Score every system on `frame`; compare the candidate with the others."""
    all_scores, speeds = {}, {}
    for name, lm in systems.items():
        all_scores[name], speeds[name] = score_system(lm, frame, params)
    all_scores = add_semantic_scores(all_scores, params)
    results: dict[str, Any] = {
        "examples": len(frame),
        "primary_metric": params.primary_metric,
        "systems": {name: {**corpus_metrics(s), **speeds[name]} for name, s in all_scores.items()},
        "comparisons": {},
        "slices": per_slice(all_scores, slice_labels(frame, params), params.min_slice_size),
    }
    for baseline in ("base", "champion"):
        if baseline in all_scores:
            differences = paired_bootstrap(all_scores["candidate"], all_scores[baseline],
                                           samples=params.bootstrap_samples, confidence=params.confidence,
                                           seed=params.seed)
            results["comparisons"][baseline] = {name: asdict(d) for name, d in differences.items()}
    if params.forgetting.task is not None and {"base", "candidate"} <= set(systems):
        results["forgetting"] = forgetting(systems, params.forgetting.task, limit=params.forgetting.limit,
                                           batch_size=params.forgetting.batch_size, confidence=params.confidence,
                                           samples=params.bootstrap_samples, seed=params.seed)
    results["samples"] = sample_table(frame, all_scores, params.sample_size)
    return results


def add_semantic_scores(all_scores: dict[str, Scores], params: EvaluateParams) -> dict[str, Scores]:
    """Every system's answers scored by meaning against the references (evaluate.semantic_metrics)."""
    if not params.semantic_metrics:
        return all_scores
    import time

    start = time.perf_counter()
    scorer = SemanticScorer(encoder_dir(params.encoder), params.semantic_metrics,
                            bertscore_layer=params.bertscore_layer)
    scored = {name: replace(s, extra={**s.extra, **scorer.score(s.predictions, s.references)})
              for name, s in all_scores.items()}
    logger.info("evaluate: %s for %d system(s) in %.1f s", ", ".join(params.semantic_metrics), len(scored),
                time.perf_counter() - start)
    return scored


def sample_table(frame: pd.DataFrame, all_scores: dict[str, Scores], size: int) -> list[dict[str, str]]:
    rows = []
    for i in range(min(size, len(frame))):
        row = {"id": str(frame.loc[i, "id"]), "prompt": frame.loc[i, "prompt"], "reference": frame.loc[i, "response"]}
        for system in SYSTEMS:
            row[system] = all_scores[system].predictions[i] if system in all_scores else ""
        rows.append(row)
    return rows


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers `dvc metrics show` lists: every system's metrics and the improvements."""
    metrics: dict[str, Any] = {"examples": results["examples"]}
    for system, values in results["systems"].items():
        metrics[system] = {k: round(v, 4) for k, v in values.items() if k != "generation_seconds"}
    choice = results.get("primary_metric_choice") or {}
    for name, entry in (choice.get("agreement") or {}).items():  # the reviewers' agreement it was chosen by
        metrics.setdefault("metric_agreement", {})[name] = {k: entry[k] for k in ("rate", "low", "tasks")
                                                            if entry.get(k) is not None}
    if "forgetting" in results:
        f = results["forgetting"]
        metrics["forgetting"] = {k: round(f[k], 4) for k in ("base", "candidate", "drop", "low", "high")}
    for baseline, differences in results["comparisons"].items():
        metrics[f"vs_{baseline}"] = {
            name: {"improvement": round(d["improvement"], 4), "ci_low": round(d["low"], 4),
                   "ci_high": round(d["high"], 4)}
            for name, d in differences.items()
        }
    return metrics
