"""Text-generation metrics and paired bootstrap confidence intervals.

ROUGE-L comes from `rouge-score`, BLEU from `sacrebleu` (corpus BLEU, as papers report
it), confidence intervals from `scipy.stats.bootstrap`. `evaluate.load` is not used: it
fetches metric code from a hub at run time, which fails offline.

Every per-example score is kept so that candidate and baseline can be compared on the
same examples: the interval is for the difference of the corpus-level metric, computed
on the same resampled example indices for both systems (a paired bootstrap).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)

# Metrics where lower is better; for these "improvement" is baseline minus candidate.
LOWER_IS_BETTER = {"perplexity"}


def normalise_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation or articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    return np.array([p.strip() == r.strip() for p, r in zip(predictions, references)], dtype=float)


def normalised_match(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    return np.array([normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)],
                    dtype=float)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-example ROUGE-L F1 (with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def perplexity(nll_sums: np.ndarray, token_counts: np.ndarray) -> float:
    """Token-weighted perplexity over a set of examples."""
    return float(np.exp(nll_sums.sum() / max(token_counts.sum(), 1)))


@dataclass(frozen=True)
class Scores:
    """What the corpus metrics of one system on a fixed list of examples are computed from."""

    predictions: list[str]
    references: list[str]
    nll_sums: np.ndarray  # summed negative log-likelihood of each reference response
    token_counts: np.ndarray  # response tokens per example
    # per-example scores computed elsewhere (the semantic metrics: pipelines/evaluation/semantic.py)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def per_example(self) -> dict[str, np.ndarray]:
        return {
            "rouge_l": rouge_l(self.predictions, self.references),
            "exact_match": exact_match(self.predictions, self.references),
            "normalised_match": normalised_match(self.predictions, self.references),
            **self.extra,
        }


def corpus_metrics(scores: Scores, indices: np.ndarray | None = None,
                   per_example: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Headline metrics over all examples, or over `indices` (a bootstrap resample)."""
    per_example = per_example if per_example is not None else scores.per_example()
    idx = np.arange(len(scores.references)) if indices is None else indices
    result = {name: float(values[idx].mean()) for name, values in per_example.items()}
    result["bleu"] = corpus_bleu([scores.predictions[i] for i in idx], [scores.references[i] for i in idx])
    result["perplexity"] = perplexity(scores.nll_sums[idx], scores.token_counts[idx])
    return result


@dataclass(frozen=True)
class Difference:
    """candidate minus baseline (or baseline minus candidate for lower-is-better metrics)."""

    metric: str
    improvement: float
    low: float
    high: float
    confidence: float


def paired_bootstrap(candidate: Scores, baseline: Scores, *, samples: int, confidence: float,
                     seed: int) -> dict[str, Difference]:
    """Improvement of the candidate over the baseline per metric, with a percentile CI.

    Both systems are scored on the same resampled example indices, so the interval
    reflects the paired design (example difficulty cancels out).
    """
    from scipy.stats import bootstrap

    if candidate.references != baseline.references:
        raise ValueError("paired bootstrap needs both systems scored on the same examples")
    cand_examples, base_examples = candidate.per_example(), baseline.per_example()
    observed_c = corpus_metrics(candidate, per_example=cand_examples)
    observed_b = corpus_metrics(baseline, per_example=base_examples)
    names = list(observed_c)

    def improvement(c: dict[str, float], b: dict[str, float], name: str) -> float:
        return (b[name] - c[name]) if name in LOWER_IS_BETTER else (c[name] - b[name])

    def statistic(indices: np.ndarray) -> np.ndarray:
        idx = indices.astype(int)
        c = corpus_metrics(candidate, idx, cand_examples)
        b = corpus_metrics(baseline, idx, base_examples)
        return np.array([improvement(c, b, name) for name in names])

    n = len(candidate.references)
    result = bootstrap((np.arange(n),), statistic, n_resamples=samples, confidence_level=confidence,
                       method="percentile", vectorized=False, random_state=np.random.default_rng(seed))
    low, high = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
    return {
        name: Difference(name, improvement(observed_c, observed_b, name), float(low[i]), float(high[i]), confidence)
        for i, name in enumerate(names)
    }


def length_bucket(n_tokens: int, edges: Sequence[int]) -> str:
    """'<=10', '11-20', '>20' style bucket names for response lengths."""
    previous = None
    for edge in edges:
        if n_tokens <= edge:
            return f"<={edge}" if previous is None else f"{previous + 1}-{edge}"
        previous = edge
    return f">{edges[-1]}"


