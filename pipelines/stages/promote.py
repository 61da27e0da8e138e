"""Stage `promote`: the gate that decides whether the challenger becomes champion.

Reads   `paths.reports_dir`/evaluate/results.json, `paths.reports_dir`/register/version.json
        (the version `register` created), params `promote`.
Writes  `paths.reports_dir`/promote/decision.json (a DVC metrics file: passed, promoted,
        changed, who decided, the checks and their numbers). In the registry: on a pass
        (and `promote.mode: auto`) the alias `champion` moves to this version and the
        version that held it gets `previous-champion` (the one before that is `retired`);
        every version whose status changed gets a history event and a re-rendered model
        card (pipelines/registry/model_registry.py). A failed gate is a result: the stage succeeds.
        Re-running promote with the same outcome (an Airflow retry, a forced DVC run)
        changes nothing and appends nothing.
Run     `llmops promote`; `llmops promote --force --reason "..."` promotes whatever the gate
        says and records who forced it (the Airflow user who triggered the run, else the
        command-line user) and why, on the version and in its card.

The gate (params `promote`): the candidate must beat the base model on the primary metric
with the lower bound of the paired-bootstrap CI above `min_improvement`; and, when a
champion exists, must not be worse than it by more than `champion_tolerance` on the
primary metric, nor by more than `slice_tolerance` on any slice. If the champion changed
since the candidate was evaluated, the evaluation is stale and the candidate is not
promoted (this is also how the loser of two concurrent promotions is told why).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from pipelines.config.params import Params
from pipelines.errors import DataError
from pipelines.io import atomic_write_json
from pipelines.registry.promotion import apply

logger = logging.getLogger(__name__)


def main(params: Params, force: bool = False, reason: str | None = None) -> None:
    results_path, version_path = params.paths.report("evaluation_results"), params.paths.report("registered_version")
    for path, stage in ((results_path, "evaluate"), (version_path, "register")):
        if not path.exists():
            raise DataError(f"{path} not found; run `llmops {stage}` first")
    if force and not reason:
        raise DataError("--force needs --reason \"...\": a forced promotion is recorded with who and why")
    results = json.loads(results_path.read_text())
    version = json.loads(version_path.read_text())["version"]
    decision = apply(params, results, version, force=force, reason=reason)
    atomic_write_json(params.paths.report("promotion_decision"), {
        **{k: v for k, v in asdict(decision).items() if k != "checks"},
        "passed": int(decision.passed), "promoted": int(decision.promoted), "forced": int(decision.forced),
        "changed": int(decision.changed),
        "checks": {c.name: {"passed": int(c.passed), "detail": c.detail} for c in decision.checks},
    })
    (logger.info if decision.promoted else logger.warning)("promote: %s", decision.summary())
