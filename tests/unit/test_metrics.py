"""Metrics and the paired bootstrap: known values, direction, and interval coverage."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.evaluation.metrics import (
    Scores,
    corpus_metrics,
    exact_match,
    length_bucket,
    normalise_answer,
    normalised_match,
    paired_bootstrap,
    rouge_l,
)


def scores(predictions, references, nll=1.0):
    n = len(references)
    return Scores(list(predictions), list(references), np.full(n, nll * 4), np.full(n, 4))


def test_matches_and_normalisation():
    assert normalise_answer("The Bank, of a river!") == "bank of river"
    assert list(exact_match(["A cat.", "dog"], ["A cat.", "Dog"])) == [1.0, 0.0]
    assert list(normalised_match(["a cat", "Dog!"], ["The cat.", "dog"])) == [1.0, 1.0]


def test_rouge_l_and_bleu_on_known_cases():
    assert rouge_l(["a small feline"], ["a small feline"])[0] == pytest.approx(1.0)
    assert rouge_l(["nothing alike"], ["a small feline"])[0] == 0.0
    perfect = corpus_metrics(scores(["the cat sat on the mat"] * 3, ["the cat sat on the mat"] * 3))
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["perplexity"] == pytest.approx(np.e)


def test_paired_bootstrap_sign_and_interval():
    rng = np.random.default_rng(0)
    refs = [f"definition number {i} of a word" for i in range(80)]
    good = [r if rng.random() < 0.7 else "something else" for r in refs]
    bad = [r if rng.random() < 0.3 else "something else" for r in refs]
    result = paired_bootstrap(scores(good, refs, nll=1.0), scores(bad, refs, nll=2.0),
                              samples=300, confidence=0.95, seed=1)
    rouge = result["rouge_l"]
    assert rouge.improvement > 0 and rouge.low > 0 and rouge.low <= rouge.improvement <= rouge.high
    # perplexity: lower is better, so the improvement of the better system is positive
    assert result["perplexity"].improvement == pytest.approx(np.e**2 - np.e)
    # no difference -> the interval contains zero
    same = paired_bootstrap(scores(good, refs), scores(good, refs), samples=100, confidence=0.9, seed=1)
    assert same["rouge_l"].low == same["rouge_l"].high == 0.0


def test_bootstrap_is_deterministic_for_a_seed():
    refs = [f"ref {i}" for i in range(30)]
    a, b = scores(refs[:15] + ["x"] * 15, refs), scores(["x"] * 30, refs)
    first = paired_bootstrap(a, b, samples=50, confidence=0.95, seed=3)
    second = paired_bootstrap(a, b, samples=50, confidence=0.95, seed=3)
    assert first == second


def test_bootstrap_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(scores(["a"], ["a"]), scores(["a"], ["b"]), samples=10, confidence=0.9, seed=0)


def test_length_buckets():
    assert [length_bucket(n, [5, 10]) for n in (1, 5, 6, 10, 11)] == ["<=5", "<=5", "6-10", "6-10", ">10"]
