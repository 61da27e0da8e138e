"""Agreement of automatic metrics with reviewers' A/B choices: counts, abstentions, Wilson
intervals, the pick of the best metric, the pairs read from Label Studio tasks, the card."""

from __future__ import annotations

import pytest

from pipelines.evaluation.agreement import (
    CANDIDATE,
    LEXICAL,
    OPPONENT,
    TIE,
    ReviewedPair,
    best_metric,
    choose_primary,
    majority,
    metric_agreement,
)
from pipelines.registry.model_registry import render_review
from pipelines.review.candidate import Judgement, reviewed_pairs

RIVER = "a large natural stream of water"


def pair(n: int, candidate: str, opponent: str, choice: str, reference: str = RIVER) -> ReviewedPair:
    return ReviewedPair(item=f"test:{n}", reference=reference, candidate=candidate, opponent=opponent, choice=choice)


def test_majority_of_a_tasks_reviewers():
    assert majority([CANDIDATE, CANDIDATE, OPPONENT]) == CANDIDATE
    assert majority([OPPONENT, TIE]) == OPPONENT
    assert majority([CANDIDATE, OPPONENT]) == TIE and majority([TIE, TIE]) == TIE and majority([]) == TIE


def test_counts_abstentions_and_the_wilson_interval():
    pairs = [pair(1, RIVER, "a tool for cutting", CANDIDATE),  # every lexical metric sides with the people
             pair(2, RIVER, "a tool for cutting", OPPONENT),   # ... and against them
             pair(3, "a tool", "a tool", CANDIDATE),           # two identical answers: every metric abstains
             pair(4, RIVER, "a tool", TIE)]                    # the people did not choose
    result = metric_agreement(pairs, LEXICAL, confidence=0.95)
    for name in LEXICAL:
        entry = result[name]
        assert (entry["agree"], entry["tasks"], entry["metric_ties"], entry["people_ties"]) == (1, 2, 1, 1), entry
        assert entry["rate"] == 0.5
        # Wilson score interval for 1 of 2 at 95%: 0.5 -+ 0.4056
        assert entry["low"] == pytest.approx(0.0945, abs=1e-3) and entry["high"] == pytest.approx(0.9055, abs=1e-3)


def test_no_decided_task_gives_no_rate():
    result = metric_agreement([pair(1, RIVER, "a tool", TIE)], ["rouge_l"])
    assert result["rouge_l"]["rate"] is None and result["rouge_l"]["tasks"] == 0
    assert best_metric(result, min_tasks=1) is None


def test_a_semantic_metric_follows_people_who_prefer_the_right_meaning_in_other_words():
    from pipelines.evaluation.semantic import SemanticScorer
    from pipelines.model.encoders import bundled_encoder_dir

    references = ["a small domesticated feline kept as a pet", "the season after summer",
                  "a building where books are kept for people to borrow", "a large natural stream of water"]
    right = ["a little tame cat that people keep at home", "the time of year between summer and winter",
             "a place with a collection of books that the public can borrow", "a big river"]
    wrong = ["a small domesticated machine kept as a tool", "a summer drink served after the meal",
             "a building where cars are kept for people to drive", "a large artificial container of oil"]
    # the right answer is the candidate's in odd tasks, the opponent's in even ones; people chose it
    pairs = [pair(n, r, w, CANDIDATE, ref) if n % 2 else pair(n, w, r, OPPONENT, ref)
             for n, (ref, r, w) in enumerate(zip(references, right, wrong))]
    scorer = SemanticScorer(bundled_encoder_dir(), ["semantic_similarity"])
    result = metric_agreement(pairs, ["rouge_l", "semantic_similarity"], semantic=scorer.score)
    # people always chose the right meaning; the wrong answers copy the reference's words
    assert result["semantic_similarity"]["agree"] == result["semantic_similarity"]["tasks"] == 4
    assert result["rouge_l"]["agree"] < result["rouge_l"]["tasks"]
    assert best_metric(result, min_tasks=4) == "semantic_similarity"
    assert best_metric(result, min_tasks=5) is None


def test_pairs_from_label_studio_tasks_follow_the_recorded_order_and_need_a_reference():
    tasks = [
        {"id": 1, "data": {"answer_a": "mine", "answer_b": "theirs"},
         "meta": {"item": "test:1", "source": "test", "reference": "ref one", "a": CANDIDATE}},
        {"id": 2, "data": {"answer_a": "theirs", "answer_b": "mine"},
         "meta": {"item": "test:2", "source": "test", "reference": "ref two", "a": OPPONENT}},
        {"id": 3, "data": {"answer_a": "mine", "answer_b": "theirs"},  # production: no reference
         "meta": {"item": "req-1", "source": "production", "a": CANDIDATE}},
        {"id": 4, "data": {"answer_a": "mine", "answer_b": "theirs"},  # nobody judged it
         "meta": {"item": "test:4", "source": "test", "reference": "ref four", "a": CANDIDATE}},
    ]
    judgements = [Judgement(1, "test:1", "test", "ann", CANDIDATE), Judgement(1, "test:1", "test", "bob", OPPONENT),
                  Judgement(1, "test:1", "test", "cy", CANDIDATE), Judgement(2, "test:2", "test", "ann", OPPONENT),
                  Judgement(3, "req-1", "production", "ann", CANDIDATE)]
    pairs = reviewed_pairs(tasks, judgements)
    assert pairs == [ReviewedPair("test:1", "ref one", "mine", "theirs", CANDIDATE),
                     ReviewedPair("test:2", "ref two", "mine", "theirs", OPPONENT)]


def test_the_card_lists_each_metrics_agreement():
    tags = {"review.requested_at": "2026-12-07T10:00:00Z", "review.collected_at": "2026-12-07T11:00:00Z",
            "review.win_rate": "0.6000", "review.confidence": "0.95",
            "review.metric_agreement.rouge_l.rate": "0.5500", "review.metric_agreement.rouge_l.low": "0.3400",
            "review.metric_agreement.rouge_l.high": "0.7400", "review.metric_agreement.rouge_l.tasks": "20",
            "review.metric_agreement.bertscore_f1.rate": "0.7000",
            "review.metric_agreement.bertscore_f1.low": "0.4800",
            "review.metric_agreement.bertscore_f1.high": "0.8500", "review.metric_agreement.bertscore_f1.tasks": "20"}
    card = "\n".join(render_review(tags))
    assert "| metric | agrees with people | interval | tasks |" in card
    assert "| bertscore_f1 | 0.7000 | [0.4800, 0.8500] | 20 |" in card
    assert "| rouge_l | 0.5500 | [0.3400, 0.7400] | 20 |" in card


def test_the_primary_metric_by_agreement_or_the_fallback():
    agreement = {"rouge_l": {"rate": 0.55, "low": 0.40, "high": 0.7, "tasks": 30},
                 "bertscore_f1": {"rate": 0.70, "low": 0.60, "high": 0.8, "tasks": 30},
                 "semantic_similarity": {"rate": 1.0, "low": 0.44, "high": 1.0, "tasks": 3}}
    computed = [*LEXICAL, "semantic_similarity", "bertscore_f1"]
    assert choose_primary("rouge_l", "bleu", computed, agreement, 20, "4") == ("rouge_l", {"mode": "fixed"})
    primary, record = choose_primary("agreement", "rouge_l", computed, agreement, 20, "4")
    assert primary == "bertscore_f1" and record["source_version"] == "4"
    assert record["reason"] == ("bertscore_f1 agreed most with the reviewers of v4: 0.700 (lower bound 0.600) "
                                "over 30 tasks")
    # a metric evaluate does not compute cannot be chosen; too few tasks: the fallback
    primary, _ = choose_primary("agreement", "rouge_l", list(LEXICAL), agreement, 20, "4")
    assert primary == "rouge_l"
    primary, record = choose_primary("agreement", "bleu", computed, agreement, 31, "4")
    assert primary == "bleu" and "no metric agreement over 31+ reviewed tasks on record (v4)" in record["reason"]
    assert choose_primary("agreement", "rouge_l", computed, {}, 20, None)[0] == "rouge_l"


def test_agreement_params():
    from pipelines.config.params import EvaluateParams

    assert EvaluateParams(primary_metric="agreement").agreement_fallback == "rouge_l"
    with pytest.raises(ValueError, match="agreement_fallback bertscore_f1 is not computed"):
        EvaluateParams(primary_metric="agreement", agreement_fallback="bertscore_f1", semantic_metrics=[])


def test_tags_round_trip_through_the_registrys_parser():
    from pipelines.registry.model_registry import parse_metric_agreement
    from pipelines.review.candidate import review_tags

    summary = {"overall": {"judgements": 4, "tasks": 2, "wins": 3, "losses": 1, "ties": 0, "win_rate": 0.75,
                           "low": 0.5, "high": 1.0, "confidence": 0.95},
               "agreement": {"alpha": None, "tasks_with_several_reviewers": 0}, "reviewers": ["a"], "by_source": {},
               "metric_agreement": {"rouge_l": {"agree": 3, "tasks": 4, "rate": 0.75, "low": 0.3, "high": 0.95},
                                    "bleu": {"agree": 0, "tasks": 0, "rate": None, "low": None, "high": None}}}
    parsed = parse_metric_agreement(review_tags(summary, "2026-12-07T11:00:00Z"))
    assert parsed == {"rouge_l": {"rate": 0.75, "low": 0.3, "high": 0.95, "tasks": 4},
                      "bleu": {"rate": None, "low": None, "high": None, "tasks": 0}}
