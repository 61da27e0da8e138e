"""Stage `promote`: the gate that decides whether the challenger becomes champion.

Reads   `paths.reports_dir`/evaluate/results.json, `paths.reports_dir`/register/version.json
        (the version `register` created), `paths.reports_dir`/quantize/results.json (its
        quantized variants' evidence), params `promote`.
Writes  `paths.reports_dir`/promote/decision.json (a DVC metrics file: passed, promoted,
        changed, who decided, the checks and their numbers, the weights that serve it). The
        serving choice (promote.variant: full precision or the cheapest quantized variant
        within the quality tolerances, pipelines/quantization/choice.py) goes on the version as
        tags `serving.variant*`, which the gateway reads, and on its model card. In the registry: on a pass
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
from pathlib import Path
from typing import Any

from pipelines.config.params import Params
from pipelines.errors import DataError
from pipelines.io import atomic_write_json
from pipelines.quantization.choice import choose
from pipelines.registry.promotion import apply

logger = logging.getLogger(__name__)


def quantized(path: Path, version: str) -> dict[str, Any]:
    """The stage quantize's results for `version`; without them (quantize did not run for it, e.g.
    `llmops promote` straight after `llmops register`) no variant is measured: full precision serves."""
    results = json.loads(path.read_text()) if path.exists() else {}
    if str(results.get("version")) != str(version):
        note = f"`llmops quantize` has not measured v{version} ({path} " + \
            ("is missing)" if not results else f"is about v{results.get('version')})")
        logger.warning("promote: %s; v%s serves in full precision", note, version)
        return {"variants": {}, "full": None, "note": note}
    return results


def main(params: Params, force: bool = False, reason: str | None = None) -> None:
    results_path, version_path = params.paths.report("evaluation_results"), params.paths.report("registered_version")
    variants_path = params.paths.report("quantization_results")
    for path, stage in ((results_path, "evaluate"), (version_path, "register")):
        if not path.exists():
            raise DataError(f"{path} not found; run `llmops {stage}` first")
    if force and not reason:
        raise DataError("--force needs --reason \"...\": a forced promotion is recorded with who and why")
    results = json.loads(results_path.read_text())
    version = json.loads(version_path.read_text())["version"]
    choice = choose(quantized(variants_path, version), params.promote.variant)
    decision = apply(params, results, version, force=force, reason=reason, variant=choice)
    atomic_write_json(params.paths.report("promotion_decision"), {
        **{k: v for k, v in asdict(decision).items() if k != "checks"},
        "passed": int(decision.passed), "promoted": int(decision.promoted), "forced": int(decision.forced),
        "changed": int(decision.changed),
        "checks": {c.name: {"passed": int(c.passed), "detail": c.detail} for c in decision.checks},
        "variant_candidates": choice["candidates"],
    })
    (logger.info if decision.promoted else logger.warning)("promote: %s", decision.summary())
    logger.info("promote: v%s serves as %s (%s)", version, choice["variant"], choice["reason"])
