"""`llmops lineage VERSION`: the evidence of a model version, read from the registry alone.

Prints the version's aliases, status, run, data hashes, commit, params hash, validation
summary, base model and licence, and its model card: what a reviewer needs, without the
workspace that produced it (`--json` for machines).
"""

from __future__ import annotations

import json
from typing import Any

from pipelines.params import Params


def lineage(params: Params, version: str) -> dict[str, Any]:
    from pipelines.registry import Registry

    registry = Registry(params)
    found = registry.version(version)
    return {
        "name": registry.name,
        "version": str(found.version),
        "aliases": sorted(found.aliases),
        "run_id": found.run_id,
        "source": found.source,
        "created": found.creation_timestamp,
        "tags": dict(sorted(found.tags.items())),
        "description": found.description or "",
    }


def render(record: dict[str, Any]) -> str:
    lines = [f"{record['name']} version {record['version']}  aliases: {', '.join(record['aliases']) or '-'}",
             f"run: {record['run_id']}   source: {record['source']}", ""]
    width = max((len(k) for k in record["tags"]), default=0)
    lines += [f"  {key:<{width}}  {value}" for key, value in record["tags"].items()]
    return "\n".join(lines + ["", record["description"]])


def main(params: Params, version: str, as_json: bool = False) -> None:
    record = lineage(params, version)
    print(json.dumps(record, indent=2) if as_json else render(record))
