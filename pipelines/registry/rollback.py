"""`llmops rollback`: move the `champion` alias back, and record who did it and why.

The library side of the command `llmops rollback`; what it reads and writes, and how
it is run: pipelines/commands/rollback.py.
"""

from __future__ import annotations

import logging

from pipelines.config.params import Params
from pipelines.errors import LLMOpsError
from pipelines.registry.model_registry import CHAMPION, PREVIOUS, Registry, actor, now

logger = logging.getLogger(__name__)


def rollback(params: Params, to: str | None = None, reason: str | None = None) -> dict[str, str | None]:

    who = actor()
    why = reason or "(no reason given)"
    registry = Registry(params)
    with registry.lock("rollback"):
        current = registry.alias_version(CHAMPION)
        previous = registry.alias_version(PREVIOUS)
        if to is None:
            if previous is None:
                raise LLMOpsError(f"'{registry.name}' has no {PREVIOUS} to roll back to; "
                                  "name a version with --to VERSION")
            target = previous
        else:
            target = str(registry.version(to).version)
        if current == target:
            logger.info("rollback: v%s already is the champion of '%s'; nothing to do", target, registry.name)
            return {"champion": target, "rolled_back_from": None}
        registry.set_alias(CHAMPION, target)
        registry.set_alias(PREVIOUS, target)
        at = now()
        moved = {"champion_before": current, "champion_after": target}
        if current is not None:
            registry.record(current, "rolled-back", status="rolled-back", by=who, reason=why, details=moved,
                            tags={"rollback.by": who["by"], "rollback.at": at, "rollback.reason": why,
                                  "rollback.to": target})
        if previous is not None and previous not in {current, target}:
            registry.record(previous, "retired", status="retired", by=who,
                            reason=f"rollback from v{current} to v{target} passed over it")
        registry.record(target, "restored", by=who, reason=why,
                        tags={"rollback.restored_at": at, "rollback.restored_from": current or "none"},
                        details=moved)
    logger.info("rollback: champion of '%s' is now v%s (was v%s) by %s: %s", registry.name, target, current,
                who["by"], why)
    return {"champion": target, "rolled_back_from": current}


def main(params: Params, to: str | None = None, reason: str | None = None) -> None:
    rollback(params, to, reason)
