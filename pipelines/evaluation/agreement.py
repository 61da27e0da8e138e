"""Which automatic metric agrees with the people who review the answers.

A blind A/B review task (`llmops review request`) on a test-split prompt holds two answers, the
candidate's and the opponent's, and the reference answer. People chose one (or a tie). An
automatic metric "chooses" too: the answer it scores higher against the reference. This module
counts, per metric, how often its choice is the people's, over the tasks where both choose a
side, with a Wilson score interval (scipy's binomtest): the evidence for picking the gate's
primary metric.

Perplexity is not among them: it scores the reference under a model, not an answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.evaluation.metrics import normalised_match, rouge_l

LEXICAL = ("rouge_l", "bleu", "normalised_match")
CANDIDATE, OPPONENT, TIE = "candidate", "opponent", "tie"


@dataclass(frozen=True)
class ReviewedPair:
    """One reviewed task: the two answers, the reference, and the people's majority choice."""

    item: str
    reference: str
    candidate: str
    opponent: str
    choice: str  # candidate | opponent | tie (no majority, or the people said tie)


def majority(choices: Sequence[str]) -> str:
    """The side most reviewers of one task chose; tie when they split evenly or said tie."""
    wins, losses = sum(c == CANDIDATE for c in choices), sum(c == OPPONENT for c in choices)
    return CANDIDATE if wins > losses else OPPONENT if losses > wins else TIE


def sentence_bleu(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    import sacrebleu

    return np.array([sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)])


def answer_scores(answers: Sequence[str], references: Sequence[str], metrics: Sequence[str],
                  semantic: Callable[[Sequence[str], Sequence[str]], dict[str, np.ndarray]] | None = None
                  ) -> dict[str, np.ndarray]:
    """Per-answer scores against the references for each metric (the semantic ones through `semantic`)."""
    lexical = {"rouge_l": rouge_l, "bleu": sentence_bleu, "normalised_match": normalised_match}
    out = {name: lexical[name](answers, references) for name in metrics if name in lexical}
    others = [name for name in metrics if name not in lexical]
    if others:
        if semantic is None:
            raise ValueError(f"no scorer for {others}")
        scored = semantic(answers, references)
        out.update({name: scored[name] for name in others})
    return out


def metric_agreement(pairs: Sequence[ReviewedPair], metrics: Sequence[str], confidence: float = 0.95,
                     semantic: Callable[[Sequence[str], Sequence[str]], dict[str, np.ndarray]] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """{metric: {"agree", "tasks", "rate", "low", "high", "metric_ties", "people_ties"}} over `pairs`.

    `tasks` counts the pairs where the people and the metric each chose a side; a metric that
    scores both answers the same (e.g. exact match on two wrong answers) abstains (`metric_ties`).
    """
    from scipy.stats import binomtest

    decided = [p for p in pairs if p.choice in (CANDIDATE, OPPONENT)]
    result: dict[str, dict[str, Any]] = {}
    if not decided:
        return {name: {"agree": 0, "tasks": 0, "rate": None, "low": None, "high": None, "metric_ties": 0,
                       "people_ties": len(pairs), "confidence": confidence} for name in metrics}
    references = [p.reference for p in decided]
    mine = answer_scores([p.candidate for p in decided], references, metrics, semantic)
    theirs = answer_scores([p.opponent for p in decided], references, metrics, semantic)
    people = np.array([p.choice == CANDIDATE for p in decided])
    for name in metrics:
        difference = mine[name] - theirs[name]
        decisive = np.abs(difference) > 1e-9
        agree = int(((difference > 0) == people)[decisive].sum())
        n = int(decisive.sum())
        entry: dict[str, Any] = {"agree": agree, "tasks": n, "metric_ties": int((~decisive).sum()),
                                 "people_ties": len(pairs) - len(decided), "confidence": confidence}
        if n:
            interval = binomtest(agree, n).proportion_ci(confidence_level=confidence, method="wilson")
            entry.update(rate=agree / n, low=float(interval.low), high=float(interval.high))
        else:
            entry.update(rate=None, low=None, high=None)
        result[name] = entry
    return result


def best_metric(agreement: dict[str, dict[str, Any]], min_tasks: int) -> str | None:
    """The metric whose agreement interval has the highest lower bound, over `min_tasks` tasks or more."""
    eligible = [(entry["low"], name) for name, entry in agreement.items()
                if entry.get("low") is not None and entry["tasks"] >= min_tasks]
    return max(eligible)[1] if eligible else None


def choose_primary(mode: str, fallback: str, computed: Sequence[str], agreement: dict[str, dict[str, Any]],
                   min_tasks: int, source_version: str | None) -> tuple[str, dict[str, Any]]:
    """The primary metric `evaluate` gates on, and the record of how it was chosen.

    `mode` is evaluate.primary_metric: a metric name is used as it is; `agreement` takes the
    computed metric whose agreement with the reviewers has the highest lower bound (over
    `min_tasks` tasks or more), else `fallback`."""
    if mode != "agreement":
        return mode, {"mode": "fixed"}
    usable = {name: entry for name, entry in agreement.items() if name in computed}
    best = best_metric(usable, min_tasks)
    record: dict[str, Any] = {"mode": "agreement", "source_version": source_version, "min_tasks": min_tasks,
                              "agreement": usable}
    if best is None:
        record["reason"] = (f"no metric agreement over {min_tasks}+ reviewed tasks on record"
                            f"{f' (v{source_version})' if source_version else ''}: fallback {fallback}")
        return fallback, record
    entry = usable[best]
    record["reason"] = (f"{best} agreed most with the reviewers of v{source_version}: {entry['rate']:.3f} "
                        f"(lower bound {entry['low']:.3f}) over {entry['tasks']} tasks")
    return best, record
