"""Semantic metrics (SemScore cosine, BERTScore) with the bundled encoder, on known pairs; their
paired intervals; the params that choose them; the card's metric table."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config.params import EvaluateParams
from pipelines.errors import LLMOpsError
from pipelines.evaluation.metrics import Scores, paired_bootstrap, rouge_l
from pipelines.evaluation.semantic import SEMANTIC_METRICS, SemanticScorer
from pipelines.model.encoders import bundled_encoder_dir, encoder_dir, encoder_layers

REFERENCES = ["a small domesticated feline kept as a pet", "a large natural stream of water flowing to the sea",
              "a building where books are kept for people to read or borrow", "the season after summer"]
PARAPHRASES = ["a little tame cat that people keep at home", "a big body of flowing water that runs into the ocean",
               "a place with a collection of books that the public can borrow", "autumn, the time of year before "
               "winter"]
UNRELATED = ["a tool for tightening bolts", "a programming language keyword", "a colour between red and yellow",
             "a unit of electrical resistance"]


@pytest.fixture(scope="module")
def scorer() -> SemanticScorer:
    return SemanticScorer(bundled_encoder_dir(), SEMANTIC_METRICS)


def test_identical_answers_score_one_and_paraphrases_beat_unrelated_answers(scorer):
    same = scorer.score(REFERENCES, REFERENCES)
    for name in SEMANTIC_METRICS:
        assert np.allclose(same[name], 1.0, atol=1e-3), (name, same[name])
    close, far = scorer.score(PARAPHRASES, REFERENCES), scorer.score(UNRELATED, REFERENCES)
    for name in SEMANTIC_METRICS:
        assert (close[name] > far[name]).all(), (name, close[name], far[name])
    # what the lexical metric misses: the paraphrases share few words with their references
    assert rouge_l(PARAPHRASES, REFERENCES).mean() < 0.3 < close["semantic_similarity"].mean()


def test_an_empty_answer_scores_zero_and_the_others_are_unaffected(scorer):
    answers = ["", PARAPHRASES[1], "   "]
    scores = scorer.score(answers, REFERENCES[:3])
    alone = scorer.score([PARAPHRASES[1]], [REFERENCES[1]])
    for name in SEMANTIC_METRICS:
        assert scores[name][0] == 0.0 and scores[name][2] == 0.0
        assert scores[name][1] == pytest.approx(alone[name][0], abs=1e-4)


def test_bertscore_uses_the_encoders_last_layer_unless_told_otherwise():
    folder = bundled_encoder_dir()
    assert encoder_layers(folder) == 6
    assert SemanticScorer(folder, ["bertscore_f1"]).layer == 6
    assert SemanticScorer(folder, ["bertscore_f1"], bertscore_layer=4).layer == 4
    with pytest.raises(ValueError, match="unknown semantic metrics"):
        SemanticScorer(folder, ["cosine"])


def test_an_encoder_that_is_not_a_local_folder_is_a_clear_error(tmp_path):
    assert encoder_dir(None) == bundled_encoder_dir()
    with pytest.raises(LLMOpsError, match="evaluate.encoder: 'sentence-transformers/all-mpnet-base-v2' is not a "
                                          "local encoder folder"):
        encoder_dir("sentence-transformers/all-mpnet-base-v2")
    (tmp_path / "config.json").write_text("{}")
    assert encoder_dir(tmp_path) == tmp_path


def test_semantic_scores_get_paired_intervals_like_the_lexical_ones(scorer):
    references = REFERENCES * 5
    good = Scores(PARAPHRASES * 5, references, np.ones(20), np.ones(20, dtype=int))
    bad = Scores(UNRELATED * 5, references, np.ones(20), np.ones(20, dtype=int))
    good = Scores(good.predictions, references, good.nll_sums, good.token_counts,
                  extra=scorer.score(good.predictions, references))
    bad = Scores(bad.predictions, references, bad.nll_sums, bad.token_counts,
                 extra=scorer.score(bad.predictions, references))
    differences = paired_bootstrap(good, bad, samples=200, confidence=0.95, seed=0)
    for name in SEMANTIC_METRICS:
        assert differences[name].low > 0 and differences[name].low <= differences[name].improvement, differences[name]


def test_a_semantic_primary_metric_must_be_computed():
    assert EvaluateParams().semantic_metrics == ["semantic_similarity", "bertscore_f1"]
    assert EvaluateParams(primary_metric="bertscore_f1").primary_metric == "bertscore_f1"
    with pytest.raises(ValueError, match="primary_metric semantic_similarity is not computed"):
        EvaluateParams(primary_metric="semantic_similarity", semantic_metrics=["bertscore_f1"])
    with pytest.raises(ValueError):
        EvaluateParams(semantic_metrics=["meaning"])


def test_the_cards_metric_table_lists_semantic_metrics_when_they_were_computed():
    from pipelines.registry.registration import metrics_table

    system = {"rouge_l": 0.2, "bleu": 1.0, "exact_match": 0.0, "normalised_match": 0.0, "perplexity": 30.0,
              "tokens_per_second": 10.0}
    diff = {"improvement": 0.01, "low": 0.0, "high": 0.02}
    lexical = {"systems": {"candidate": system, "base": system},
               "comparisons": {"base": {name: diff for name in system}}}
    assert "semantic_similarity" not in metrics_table(lexical)
    semantic = {**system, "semantic_similarity": 0.61, "bertscore_f1": 0.55}
    table = metrics_table({"systems": {"candidate": semantic, "base": semantic},
                           "comparisons": {"base": {name: diff for name in semantic}}})
    assert "| semantic_similarity | 0.6100 | 0.6100 | +0.0100 [+0.0000, +0.0200] |" in table
    assert "| bertscore_f1 | 0.5500 |" in table
