"""`llmops rollback`: move the `champion` alias back, and record who did it and why.

    llmops rollback --reason "canary answers wrong"            # back to previous-champion
    llmops rollback --to 3 --reason "v5 and v4 both bad"       # to a named version

Safe to run twice: when the champion already is the target, nothing changes. The version
rolled back from gets `rollback.*` tags (who, when, why); `previous-champion` is left on
the restored version, so a second rollback is a no-op rather than a swap back.
"""

from __future__ import annotations

import getpass
import logging
from datetime import UTC, datetime

from pipelines.errors import LLMOpsError
from pipelines.params import Params

logger = logging.getLogger(__name__)


def rollback(params: Params, to: str | None = None, reason: str | None = None) -> dict[str, str | None]:
    from pipelines.registry import CHAMPION, PREVIOUS, Registry

    registry = Registry(params)
    with registry.lock("rollback"):
        current = registry.alias(CHAMPION)
        if to is None:
            previous = registry.alias(PREVIOUS)
            if previous is None:
                raise LLMOpsError(f"'{registry.name}' has no {PREVIOUS} to roll back to; "
                                  "name a version with --to VERSION")
            target = str(previous.version)
        else:
            target = str(registry.version(to).version)
        current_version = str(current.version) if current is not None else None
        if current_version == target:
            logger.info("rollback: v%s already is the champion of '%s'; nothing to do", target, registry.name)
            return {"champion": target, "rolled_back_from": None}
        registry.set_alias(CHAMPION, target)
        registry.set_alias(PREVIOUS, target)
        stamp = {"rollback.by": getpass.getuser(), "rollback.at": datetime.now(UTC).isoformat(timespec="seconds"),
                 "rollback.reason": reason or "(no reason given)"}
        if current_version is not None:
            registry.tag(current_version, {**stamp, "promotion.status": "rolled-back", "rollback.to": target})
        registry.tag(target, {"promotion.status": "champion", "rollback.restored_at": stamp["rollback.at"],
                              "rollback.restored_from": current_version or "none"})
    logger.info("rollback: champion of '%s' is now v%s (was v%s): %s", registry.name, target, current_version,
                stamp["rollback.reason"])
    return {"champion": target, "rolled_back_from": current_version}


def main(params: Params, to: str | None = None, reason: str | None = None) -> None:
    rollback(params, to, reason)
