"""Stage `promote`: the gate that decides whether the challenger becomes champion.

Reads   `paths.reports_dir`/evaluate/results.json, `paths.reports_dir`/register/version.json
        (the version `register` created), params `promote`.
Writes  `paths.reports_dir`/promote/decision.json (a DVC metrics file: passed, promoted,
        the checks and their numbers). In the registry: on a pass (and `promote.mode:
        auto`) the alias `champion` moves to this version and the version that held it gets
        `previous-champion`; in every case the decision and its reasons go into the
        version's tags and description. A failed gate is a result: the stage succeeds.
Run     `llmops promote`; `llmops promote --force --reason "..."` promotes whatever the gate
        says and records who forced it and why.

The gate (params `promote`): the candidate must beat the base model on the primary metric
with the lower bound of the paired-bootstrap CI above `min_improvement`; and, when a
champion exists, must not be worse than it by more than `champion_tolerance` on the
primary metric, nor by more than `slice_tolerance` on any slice. If the champion changed
since the candidate was evaluated, the evaluation is stale and the candidate is not
promoted (this is also how the loser of two concurrent promotions is told why).
"""

from __future__ import annotations

import getpass
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipelines.errors import DataError
from pipelines.io import atomic_write_json
from pipelines.params import Params, PromoteParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


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

    def summary(self) -> str:
        verdict = "promoted to champion" if self.promoted else "not promoted"
        why = "; ".join(self.reasons) if self.reasons else "all gate checks passed"
        return f"version {self.version}: {verdict} ({why})"


def gate(results: dict[str, Any], params: PromoteParams) -> tuple[bool, list[Check]]:
    """Pure gate logic over evaluate's results.json."""
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
    return all(c.passed for c in checks), checks


def decide(results: dict[str, Any], params: PromoteParams, current_champion: str | None,
           force: bool = False) -> Decision:
    passed, checks = gate(results, params)
    decision = Decision(passed=passed, mode=params.mode, forced=force, checks=checks,
                        previous_champion=current_champion)
    decision.reasons = [c.detail for c in checks if not c.passed]
    evaluated_against = results.get("champion_version")
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


def model_card_section(decision: Decision) -> str:
    verdict = "PROMOTED" if decision.promoted else "NOT PROMOTED"
    gate_state = "passed" if decision.passed else "failed"
    lines = [f"## Promotion decision ({datetime.now(UTC):%Y-%m-%d %H:%M UTC})", "",
             f"**{verdict}** (gate {gate_state}, mode {decision.mode}{', forced' if decision.forced else ''})", ""]
    lines += [f"- {'pass' if c.passed else 'FAIL'} `{c.name}`: {c.detail}" for c in decision.checks]
    lines += [f"- note: {r}" for r in decision.reasons if not any(r == c.detail for c in decision.checks)]
    return "\n".join(lines) + "\n"


def apply(params: Params, results: dict[str, Any], version: str, force: bool = False,
          reason: str | None = None) -> Decision:
    """Decide under the registry lock and move aliases; record the decision on the version."""
    from pipelines.registry import CHAMPION, PREVIOUS, Registry

    registry = Registry(params)
    with registry.lock(f"promote v{version}"):
        current = registry.alias(CHAMPION)
        current_version = str(current.version) if current is not None else None
        decision = decide(results, params.promote, current_version, force=force)
        decision.version = str(version)
        if decision.promoted and current_version != str(version):
            if current_version is not None:
                registry.set_alias(PREVIOUS, current_version)
            registry.set_alias(CHAMPION, version)
        tags = {
            "promotion.status": "champion" if decision.promoted else "rejected",
            "promotion.gate_passed": str(decision.passed).lower(),
            "promotion.mode": decision.mode,
            "promotion.reasons": " | ".join(decision.reasons)[:4900] or "all gate checks passed",
            "promotion.decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if force:
            tags.update({"promotion.forced_by": getpass.getuser(), "promotion.forced_reason": reason or ""})
        registry.tag(version, tags)
        description = registry.version(version).description or ""
        registry.describe(version, description.rstrip() + "\n\n" + model_card_section(decision))
    return decision


def main(params: Params, force: bool = False, reason: str | None = None) -> None:
    reports = params.paths.reports_dir
    results_path, version_path = reports / "evaluate" / "results.json", reports / "register" / "version.json"
    for path, stage in ((results_path, "evaluate"), (version_path, "register")):
        if not path.exists():
            raise DataError(f"{path} not found; run `llmops {stage}` first")
    if force and not reason:
        raise DataError("--force needs --reason \"...\": a forced promotion is recorded with who and why")
    results = json.loads(results_path.read_text())
    version = json.loads(version_path.read_text())["version"]
    decision = apply(params, results, version, force=force, reason=reason)
    atomic_write_json(reports / "promote" / "decision.json", {
        **{k: v for k, v in asdict(decision).items() if k != "checks"},
        "passed": int(decision.passed), "promoted": int(decision.promoted), "forced": int(decision.forced),
        "checks": {c.name: {"passed": int(c.passed), "detail": c.detail} for c in decision.checks},
    })
    (logger.info if decision.promoted else logger.warning)("promote: %s", decision.summary())

