"""People's A/B review of a candidate: judgements from Label Studio's task records, the win rate and
its interval, reviewer agreement, the gate's human-review check in its three modes, the model card."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from pipelines.config.params import PromoteParams
from pipelines.registry.model_registry import render_state
from pipelines.registry.promotion import action_of, decide, human_review_check, review_state
from pipelines.review.candidate import (
    agreement,
    build_tasks,
    judgements_from,
    review_tags,
    summarise,
    win_rate,
)

from .test_promote_gate import results

NOON = datetime(2026, 12, 7, 12, tzinfo=UTC)


def annotation(choice, reviewer="ann@example.org", better="", cancelled=False, at="2026-12-07T10:00:00Z"):
    result = [{"from_name": "preference", "to_name": "prompt", "type": "choices", "value": {"choices": [choice]}}]
    if better:
        result.append({"from_name": "better_answer", "to_name": "prompt", "type": "textarea",
                       "value": {"text": [better]}})
    return {"id": hash((choice, reviewer, at)) % 10_000, "completed_by": {"id": 1, "email": reviewer},
            "result": result, "was_cancelled": cancelled, "created_at": at, "updated_at": at}


def task(task_id, a_side, *annotations, source="test"):
    return {"id": task_id, "data": {"prompt": "p", "answer_a": "x", "answer_b": "y"},
            "meta": {"item": f"{source}:{task_id}", "source": source, "a": a_side}, "annotations": list(annotations)}


def test_a_and_b_map_back_through_the_recorded_order():
    tasks = [task(1, "candidate", annotation("A")), task(2, "opponent", annotation("A")),
             task(3, "opponent", annotation("B")), task(4, "candidate", annotation("Tie"))]
    choices = {j.task_id: j.choice for j in judgements_from(tasks)}
    assert choices == {1: "candidate", 2: "opponent", 3: "candidate", 4: "tie"}


def test_skipped_choiceless_and_foreign_tasks_count_for_nothing_and_a_second_answer_replaces_the_first():
    tasks = [
        task(1, "candidate", annotation("A", cancelled=True)),
        task(2, "candidate", {"id": 9, "completed_by": 1, "result": [], "was_cancelled": False}),
        {"id": 3, "data": {}, "meta": {}, "annotations": [annotation("A")]},  # not made by `review request`
        task(4, "candidate", annotation("B", at="2026-12-07T09:00:00Z"), annotation("A", at="2026-12-07T11:00:00Z")),
    ]
    judgements = judgements_from(tasks)
    assert [(j.task_id, j.choice) for j in judgements] == [(4, "candidate")]


def test_better_answers_are_kept_with_the_judgement():
    [j] = judgements_from([task(1, "opponent", annotation("Tie", better=" A word that means x. "))])
    assert j.choice == "tie" and j.better_answer == "A word that means x." and j.reviewer == "ann@example.org"


def test_all_ties_sit_at_even_and_do_not_pass_a_bound_that_must_exceed_it():
    rate = win_rate(judgements_from([task(i, "candidate", annotation("Tie")) for i in range(20)]), 0.95)
    assert rate["win_rate"] == rate["low"] == rate["high"] == 0.5
    check = human_review_check({"requested_at": "2026-12-07T00:00:00Z", "judgements": 20, "win_rate": 0.5,
                                "low": 0.5, "high": 0.5, "confidence": 0.95, "alpha": None, "opponent": "base"},
                               PromoteParams(human_review="required", min_reviews=20), 48, NOON)
    assert not check.passed


def test_win_rate_counts_ties_half_and_its_interval_covers_it():
    tasks = [task(i, "candidate", annotation("A")) for i in range(12)]
    tasks += [task(100 + i, "candidate", annotation("B")) for i in range(4)]
    tasks += [task(200 + i, "candidate", annotation("Tie")) for i in range(4)]
    rate = win_rate(judgements_from(tasks), confidence=0.95)
    assert (rate["wins"], rate["losses"], rate["ties"], rate["judgements"]) == (12, 4, 4, 20)
    assert rate["win_rate"] == pytest.approx((12 + 2) / 20)
    assert rate["low"] < rate["win_rate"] < rate["high"]
    assert 0.5 < rate["low"]  # 14 of 20 is clearly better than even


def test_reviewers_who_disagree_completely_get_a_wide_interval_and_no_pass():
    tasks = [task(i, "candidate", annotation("A", "ann@x"), annotation("B", "bob@x")) for i in range(20)]
    judgements = judgements_from(tasks)
    rate = win_rate(judgements, confidence=0.95)
    assert rate["win_rate"] == 0.5 and rate["low"] < 0.4 and rate["high"] > 0.6
    agree = agreement(judgements)
    assert agree["tasks_with_several_reviewers"] == 20 and agree["alpha"] < -0.9
    params = PromoteParams(human_review="required", min_reviews=20, min_win_rate_low=0.5)
    check = human_review_check(review_state(review_tags(summarise(judgements, 0.95), "2026-12-07T12:00:00Z")
                                            | {"review.requested_at": "2026-12-07T00:00:00Z"}),
                               params, 48, datetime(2026, 12, 7, 12, tzinfo=UTC))
    assert not check.passed and not check.pending and "agreement alpha -0.9" in check.detail


def test_agreement_is_high_when_reviewers_agree_and_undefined_without_shared_tasks():
    tasks = [task(i, "candidate", annotation(c, "ann@x"), annotation(c, "bob@x"))
             for i, c in enumerate(["A", "B", "Tie", "A", "B", "A"])]
    assert agreement(judgements_from(tasks))["alpha"] == pytest.approx(1.0)
    lone = agreement(judgements_from([task(1, "candidate", annotation("A"))]))
    assert lone["alpha"] is None and lone["tasks_with_several_reviewers"] == 0


def test_one_task_says_nothing_about_the_spread():
    rate = win_rate(judgements_from([task(1, "candidate", annotation("A"))]), confidence=0.95)
    assert rate["win_rate"] == 1.0 and (rate["low"], rate["high"]) == (0.0, 1.0)


def test_tasks_hide_which_answer_is_the_candidate_and_record_it():
    items = [{"item": f"test:{i}", "source": "test", "prompt": f"p{i}"} for i in range(40)]
    tasks = build_tasks(items, [f"mine{i}" for i in range(40)], [f"theirs{i}" for i in range(40)], "7",
                        "champion v6", seed=0)
    sides = [t["meta"]["a"] for t in tasks]
    assert 10 < sides.count("candidate") < 30  # both orders occur
    for t, i in zip(tasks, range(40)):
        shown = t["data"]["answer_a"] if t["meta"]["a"] == "candidate" else t["data"]["answer_b"]
        assert shown == f"mine{i}" and set(t["data"]) == {"prompt", "answer_a", "answer_b"}
    again = build_tasks(items, [f"mine{i}" for i in range(40)], [f"theirs{i}" for i in range(40)], "7",
                        "champion v6", seed=0)
    assert again == tasks  # the order is reproducible


REQUESTED = {"review.requested_at": "2026-12-07T00:00:00Z", "review.project_id": "4", "review.tasks": "32",
             "review.opponent": "champion v2"}


def collected(wins, losses, ties):
    tasks = [task(i, "candidate", annotation(c)) for i, c in enumerate(["A"] * wins + ["B"] * losses
                                                                        + ["Tie"] * ties)]
    return REQUESTED | review_tags(summarise(judgements_from(tasks), 0.95), "2026-12-07T06:00:00Z")


def test_off_is_not_consulted_and_advisory_never_blocks():
    assert human_review_check(review_state(collected(0, 20, 0)), PromoteParams(human_review="off"), 48, NOON) is None
    check = human_review_check(review_state(collected(0, 20, 0)), PromoteParams(human_review="advisory"), 48, NOON)
    assert check.advisory and not check.passed
    decision = decide(results(), PromoteParams(human_review="advisory"), current_champion=None, review=check)
    assert decision.passed and decision.promoted and decision.reasons == []


def test_required_passes_on_a_clear_preference_and_fails_on_a_clear_rejection():
    params = PromoteParams(human_review="required", min_reviews=20)
    good = human_review_check(review_state(collected(16, 2, 2)), params, 48, NOON)
    assert good.passed and "from 20 judgements" in good.detail
    assert decide(results(), params, current_champion=None, review=good).promoted
    bad = human_review_check(review_state(collected(4, 14, 2)), params, 48, NOON)
    decision = decide(results(), params, current_champion=None, review=bad)
    assert not decision.promoted and action_of(decision) == "rejected"


def test_required_with_too_few_reviews_waits_until_the_deadline_then_rejects():
    params = PromoteParams(human_review="required", min_reviews=20)
    few = review_state(collected(5, 0, 0))
    waiting = human_review_check(few, params, 48, NOON)
    assert waiting.pending and "5 of 20 human judgements" in waiting.detail
    decision = decide(results(), params, current_champion=None, review=waiting)
    assert not decision.promoted and action_of(decision) == "awaiting-review"
    late = human_review_check(few, params, 48, datetime(2026, 12, 7, tzinfo=UTC) + timedelta(hours=49))
    assert not late.pending and "deadline" in late.detail
    assert action_of(decide(results(), params, current_champion=None, review=late)) == "rejected"
    # a metric failure is final whatever the reviewers do
    failing = decide(results(vs_base=(-0.1, -0.2, 0.0)), params, current_champion=None, review=waiting)
    assert action_of(failing) == "rejected"


def test_required_without_a_request_is_pending_and_says_what_to_run():
    check = human_review_check(None, PromoteParams(human_review="required"), 48, NOON)
    assert check.pending and "llmops review request" in check.detail


def test_the_model_card_shows_the_human_review():
    card = render_state(["challenger"], collected(12, 4, 4))
    assert "## Human review" in card and "win rate 0.7000" in card and "against champion v2" in card
    assert "| all | 20 | 12 | 4 | 4 | 0.7000 |" in card and "| test prompts | 20 |" in card
    pending = render_state(["challenger"], REQUESTED)
    assert "No judgements collected yet" in pending
    assert "Human review" not in render_state(["challenger"], {})


def test_an_advisory_check_that_did_not_pass_is_a_note_on_the_card_not_a_failure():
    event = {"at": "2026-12-07T00:00:00Z", "action": "promoted", "by": "ci", "from": "candidate", "to": "champion",
             "gate_passed": True, "mode": "auto",
             "checks": [["beats_base", True, "lower bound +0.02"],
                        ["human_review (advisory)", False, "no human review was requested"]]}
    card = render_state(["champion"], {"history.0001": json.dumps(event)})
    assert "- note `human_review (advisory)`: no human review was requested" in card
    assert "FAIL" not in card and "**PROMOTED**" in card

