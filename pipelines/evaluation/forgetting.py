"""The forgetting check: did fine-tuning cost the base model general capability?

The candidate and the base model answer the same general-capability task with lm-eval-harness
(its `simple_evaluate` on the already loaded models, HFLM), a task defined as a local YAML
file (default configs/lm_eval/llmops_general.yaml: questions outside the training domains,
written by scripts/make_general_task.py). The per-question correctness of both gives the
accuracy drop (base minus candidate) with a paired-bootstrap interval; the promote gate blocks
a candidate whose drop exceeds promote.max_forgetting.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import LLMOpsError

if TYPE_CHECKING:
    from pipelines.model.lm import CausalLM

logger = logging.getLogger(__name__)


def load_task(path: Path | str) -> dict[str, Any]:
    """The task YAML as the config dict lm-eval takes, its data files made absolute: a relative
    path is taken from the current folder (the project root, where stages run) or, failing that,
    from the YAML's own folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LLMOpsError(f"evaluate.forgetting.task: {path} does not exist; give an lm-eval task YAML (default "
                          "configs/lm_eval/llmops_general.yaml) or null to skip the forgetting check")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or "task" not in config:
        raise LLMOpsError(f"evaluate.forgetting.task: {path} is not an lm-eval task definition (no `task:` key)")
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    for split, name in list(files.items()):
        candidates = [Path(name), path.parent / Path(name).name] if not Path(name).is_absolute() else [Path(name)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise LLMOpsError(f"evaluate.forgetting.task: the {split} data of {path} ({name}) is missing")
        files[split] = str(found.resolve())
    return config


def correct_per_question(lm: CausalLM, task: dict[str, Any], *, limit: int | None, batch_size: int) -> np.ndarray:
    """1.0 / 0.0 per question (lm-eval's `acc`), in the task's document order."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size, device=str(lm.model.device))
    out = lm_eval.simple_evaluate(model=model, tasks=[task], limit=limit, log_samples=True, bootstrap_iters=0,
                                  verbosity="WARNING")
    samples = sorted(out["samples"][task["task"]], key=lambda s: s["doc_id"])
    if not samples:
        raise LLMOpsError(f"the forgetting task {task['task']} has no questions")
    return np.array([float(s["acc"]) for s in samples])


def compare(base: np.ndarray, candidate: np.ndarray, *, confidence: float, samples: int, seed: int) -> dict[str, Any]:
    """Accuracies, and the drop (base minus candidate) with a paired percentile-bootstrap interval."""
    from scipy.stats import bootstrap

    if len(base) != len(candidate):
        raise ValueError("both systems must answer the same questions")
    drop = float(base.mean() - candidate.mean())
    if len(base) < 2 or np.all(base - candidate == (base - candidate)[0]):
        low = high = drop  # no spread to resample (scipy would warn on a degenerate distribution)
    else:
        result = bootstrap((base, candidate), lambda b, c: b.mean() - c.mean(), paired=True, vectorized=False,
                           n_resamples=samples, confidence_level=confidence, method="percentile",
                           random_state=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return {"questions": int(len(base)), "base": float(base.mean()), "candidate": float(candidate.mean()),
            "drop": drop, "low": low, "high": high, "confidence": confidence}


def forgetting(systems: dict[str, CausalLM], task_path: Path | str, *, limit: int | None, batch_size: int,
               confidence: float, samples: int, seed: int) -> dict[str, Any]:
    """The check for `evaluate`: candidate vs base on the task (systems must hold both)."""
    import time

    task = load_task(task_path)
    start = time.perf_counter()
    correct = {name: correct_per_question(systems[name], task, limit=limit, batch_size=batch_size)
               for name in ("base", "candidate")}
    result = {"task": task["task"], "definition": str(task_path),
              **compare(correct["base"], correct["candidate"], confidence=confidence, samples=samples, seed=seed)}
    logger.info("evaluate: forgetting check %s: base %.3f, candidate %.3f on %d questions (%.1f s)", result["task"],
                result["base"], result["candidate"], result["questions"], time.perf_counter() - start)
    return result
