"""The promotion gate: the checks over evaluate's results, the decision they lead to, and its
application to the registry's aliases and history under the promotion lock; the work behind the
stage `promote`.

What the stage reads and writes, and how it is run: pipelines/stages/promote.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.config.params import Params, PromoteParams
from pipelines.registry.model_registry import CHAMPION, PREVIOUS, Registry, actor, history_of, now

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    advisory: bool = False  # shown with the decision, never blocks it (promote.human_review: advisory)
    pending: bool = False  # not failed for good: waiting for people (required review before its deadline)


HUMAN_REVIEW = "human_review"


def review_state(tags: dict[str, str]) -> dict[str, Any] | None:
    """A version's human review as its `review.*` tags say (`llmops review request/collect`);
    None when it was never sent for review."""
    if "review.requested_at" not in tags:
        return None

    def number(key: str) -> float | None:
        value = tags.get(key) or ""
        return float(value) if value else None

    return {"requested_at": tags["review.requested_at"], "collected_at": tags.get("review.collected_at"),
            "judgements": int(tags.get("review.judgements") or 0), "win_rate": number("review.win_rate"),
            "low": number("review.win_rate_low"), "high": number("review.win_rate_high"),
            "confidence": number("review.confidence"), "alpha": number("review.agreement_alpha"),
            "opponent": tags.get("review.opponent") or "the opponent"}


def _parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def human_review_check(review: dict[str, Any] | None, params: PromoteParams, deadline_hours: float,
                       at: datetime) -> Check | None:
    """The gate's view of people's A/B review (promote.human_review); None when it is off.

    Passing needs at least `min_reviews` judgements and the lower bound of the candidate's win
    rate (ties half) above `min_win_rate_low`: all ties, or reviewers who cancel each other out,
    leave the bound at or below 0.5 and do not pass. In required mode, too few judgements before
    the deadline (`review.candidate.deadline_hours` after the request) is pending, not failed;
    after it the check fails for good.
    """
    mode = params.human_review
    if mode == "off":
        return None
    advisory = mode == "advisory"
    if review is None:
        return Check(HUMAN_REVIEW, False, "no human review was requested; run `llmops review request`",
                     advisory=advisory, pending=not advisory)
    n, low = review["judgements"], review["low"]
    if n < params.min_reviews or low is None:
        deadline = _parse_time(review["requested_at"]) + timedelta(hours=deadline_hours)
        waiting = at < deadline
        return Check(HUMAN_REVIEW, False,
                     f"{n} of {params.min_reviews} human judgements collected"
                     + (f"; waiting for reviewers until {deadline.isoformat(timespec='minutes')}" if waiting
                        else f"; the review deadline {deadline.isoformat(timespec='minutes')} has passed"),
                     advisory=advisory, pending=waiting and not advisory)
    alpha = f", reviewer agreement alpha {review['alpha']:+.2f}" if review["alpha"] is not None else ""
    confidence = int(round((review["confidence"] or 0.95) * 100))
    return Check(HUMAN_REVIEW, low > params.min_win_rate_low,
                 f"win rate vs {review['opponent']} {review['win_rate']:.3f}, {confidence}% CI [{low:.3f}, "
                 f"{review['high']:.3f}] from {n} judgements{alpha}; lower bound must exceed "
                 f"{params.min_win_rate_low:.3f}", advisory=advisory)


@dataclass
class Decision:
    passed: bool
    promoted: bool = False
    mode: str = "auto"
    forced: bool = False
    checks: list[Check] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    version: str | None = None
    previous_champion: str | None = None
    changed: bool = True  # False: the registry already said this (a re-run), nothing was written
    decided_by: str | None = None  # the Airflow user who triggered the run, else the command-line user
    forced_reason: str | None = None
    variant: str = "full"  # the weights that serve the version: full precision or a quantized variant
    variant_reason: str = ""

    def summary(self) -> str:
        verdict = "promoted to champion" if self.promoted else "not promoted"
        if not self.changed:
            verdict += ", unchanged"
        why = "; ".join(self.reasons) if self.reasons else "all gate checks passed"
        return f"version {self.version}: {verdict} ({why})"


def gate(results: dict[str, Any], params: PromoteParams, review: Check | None = None) -> tuple[bool, list[Check]]:
    """Pure gate logic over evaluate's results.json (and the human review check, if any);
    advisory checks are listed but do not decide."""
    primary = results["primary_metric"]
    checks = []
    vs_base = results["comparisons"]["base"][primary]
    checks.append(Check(
        "beats_base",
        vs_base["low"] > params.min_improvement,
        f"{primary} improvement over base {vs_base['improvement']:+.4f}, {int(vs_base['confidence'] * 100)}% CI "
        f"[{vs_base['low']:+.4f}, {vs_base['high']:+.4f}]; lower bound must exceed {params.min_improvement:+.4f}",
    ))
    if "champion" in results["systems"]:
        vs_champion = results["comparisons"]["champion"][primary]
        checks.append(Check(
            "not_worse_than_champion",
            vs_champion["improvement"] >= -params.champion_tolerance,
            f"{primary} change vs champion v{results.get('champion_version')} {vs_champion['improvement']:+.4f}; "
            f"must be >= {-params.champion_tolerance:+.4f}",
        ))
        worse = []
        for slice_name, values in results["slices"].items():
            for value, entry in values.items():
                if "champion" not in entry:
                    continue
                delta = entry["candidate"][primary] - entry["champion"][primary]
                if primary == "perplexity":
                    delta = -delta
                if delta < -params.slice_tolerance:
                    worse.append(f"{slice_name}={value} ({delta:+.4f}, n={entry['n']})")
        checks.append(Check(
            "no_slice_worse_than_champion",
            not worse,
            ("slices worse than champion beyond " f"{params.slice_tolerance}: {', '.join(worse)}") if worse
            else f"no slice worse than champion beyond {params.slice_tolerance}",
        ))
    if "forgetting" in results:
        f = results["forgetting"]
        limit = params.max_forgetting
        checks.append(Check(
            "no_forgetting",
            limit is None or f["drop"] <= limit,
            f"{f['task']}: accuracy {f['candidate']:.3f} vs base {f['base']:.3f} on {f['questions']} questions, drop "
            f"{f['drop']:+.3f} [{f['low']:+.3f}, {f['high']:+.3f}]; "
            + (f"must be <= {limit:.3f}" if limit is not None else "reported only (promote.max_forgetting: null)"),
            advisory=limit is None,
        ))
    if review is not None:
        checks.append(review)
    return all(c.passed for c in checks if not c.advisory), checks


def decide(results: dict[str, Any], params: PromoteParams, current_champion: str | None,
           force: bool = False, review: Check | None = None) -> Decision:
    passed, checks = gate(results, params, review)
    decision = Decision(passed=passed, mode=params.mode, forced=force, checks=checks,
                        previous_champion=current_champion)
    decision.reasons = [c.detail for c in checks if not c.passed and not c.advisory]
    evaluated_against = results.get("champion_version")
    evaluated_against = str(evaluated_against) if evaluated_against is not None else None
    if current_champion != evaluated_against and not force:
        decision.reasons.append(
            f"the champion changed from {evaluated_against or 'none'} to v{current_champion} after this candidate "
            "was evaluated; re-run `llmops evaluate` to compare against the new champion"
        )
        return decision
    if force:
        decision.promoted = True
        decision.reasons.append("forced by a human (gate bypassed)")
    elif passed and params.mode == "auto":
        decision.promoted = True
    elif passed:
        decision.reasons.append("gate passed; manual approval mode only recommends: run `llmops promote --force "
                                "--reason ...` to promote")
    return decision


def awaiting_review(decision: Decision) -> bool:
    """Only a pending human review stands between the candidate and the gate's pass."""
    failed = [c for c in decision.checks if not c.passed and not c.advisory]
    return bool(failed) and all(c.pending for c in failed)


def action_of(decision: Decision) -> str:
    """The history action a decision records on its version."""
    if decision.promoted:
        return "forced" if decision.forced else "promoted"
    if awaiting_review(decision):
        return "awaiting-review"
    return "recommended" if decision.passed and decision.mode == "manual" else "rejected"


def decision_tags(decision: Decision, at: str) -> dict[str, str]:
    """The tags that describe a version's latest gate decision (the history keeps the earlier ones)."""
    tags = {
        "promotion.gate_passed": str(decision.passed).lower(),
        "promotion.mode": decision.mode,
        "promotion.reasons": " | ".join(decision.reasons)[:4900] or "all gate checks passed",
        "promotion.decided_at": at,
        "promotion.decided_by": decision.decided_by or "",
    }
    if decision.forced:
        tags.update({"promotion.forced_by": decision.decided_by or "", "promotion.forced_reason":
                     decision.forced_reason or ""})
    return tags


def same_as_last(registry: Registry, version: str, action: str, reasons: str) -> bool:
    """Whether the version's latest gate decision already says this (then nothing is written)."""
    decisions = [e for e in history_of(registry.version(version).tags) if e.get("checks") is not None]
    return bool(decisions) and decisions[-1].get("action") == action and decisions[-1].get("reasons") == reasons


def serving_tags(choice: dict[str, Any] | None) -> dict[str, str]:
    """The serving choice (pipelines/quantization/choice.py) as the version's tags, which the gateway reads."""
    if choice is None:
        return {}
    return {"serving.variant": choice["variant"], "serving.variant_reason": choice["reason"][:4900],
            "serving.variant_measured_on": str(choice.get("measured_on") or "")}


def apply(params: Params, results: dict[str, Any], version: str, force: bool = False,
          reason: str | None = None, variant: dict[str, Any] | None = None) -> Decision:
    """Decide under the registry lock, move aliases, and record the change on every version it touches.

    `variant` is which weights serve the version (pipelines/quantization/choice.py `choose`); its
    tags are set before any alias moves, so a gateway that sees the new champion reads them.
    """
    who = actor()
    registry = Registry(params)
    version = str(version)
    with registry.lock(f"promote v{version}"):
        current = registry.alias_version(CHAMPION)
        previous = registry.alias_version(PREVIOUS)
        review = human_review_check(review_state(registry.version(version).tags), params.promote,
                                    params.review.candidate.deadline_hours, datetime.now(UTC))
        if current == version:
            # Already the champion (a re-run, a retry): judge the evaluation as it was made, change nothing.
            decision = decide(results, params.promote, results.get("champion_version"), force=force, review=review)
            decision.promoted, decision.changed = True, False
            decision.reasons.append(f"v{version} already is the champion; nothing changed")
        else:
            decision = decide(results, params.promote, current, force=force, review=review)
        decision.version, decision.previous_champion = version, current
        decision.decided_by, decision.forced_reason = who["by"], (reason if force else None)
        if variant is not None:
            decision.variant, decision.variant_reason = variant["variant"], variant["reason"]
        if not decision.changed:
            return decision
        if variant is not None:  # before any alias moves: a gateway that sees the new champion reads it
            registry.tag(version, serving_tags(variant))
        action = action_of(decision)
        reasons = " | ".join(decision.reasons)
        details = {"checks": [[c.name + (" (advisory)" if c.advisory else ""), c.passed, c.detail]
                              for c in decision.checks], "gate_passed": decision.passed,
                   "mode": decision.mode, "forced": decision.forced, "reasons": reasons,
                   **({"variant": decision.variant} if variant is not None else {}),
                   "champion_before": current, "champion_after": version if decision.promoted else current}
        if not decision.promoted and same_as_last(registry, version, action, reasons):
            decision.changed = False
            logger.info("promote: v%s was %s for the same reasons before; nothing new to record", version, action)
            return decision
        at = now()
        if decision.promoted:
            if current is not None:
                registry.set_alias(PREVIOUS, current)
            registry.set_alias(CHAMPION, version)
            if previous is not None and previous not in {current, version}:
                registry.record(previous, "retired", status="retired", by=who,
                                reason=f"v{current} became {PREVIOUS} when v{version} was promoted")
            if current is not None:
                registry.record(current, "demoted", by=who, reason=f"v{version} was promoted to {CHAMPION}")
        why = (reason or "") if decision.forced else ("; ".join(decision.reasons) or "all gate checks passed")
        registry.record(version, action, status=action, by=who, reason=why, tags=decision_tags(decision, at),
                        details=details)
        if not decision.forced:
            registry.untag(version, ["promotion.forced_by", "promotion.forced_reason"])
    return decision
