"""`llmops lineage VERSION`: the evidence of a model version, read from the registry alone.

The library side of the command `llmops lineage`; what it reads and writes, and how
it is run: pipelines/commands/lineage.py.
"""

from __future__ import annotations

import json
from typing import Any

from pipelines.config.params import Params
from pipelines.registry.model_registry import HISTORY_PREFIX, STATUS_TAG, Registry, alias_status, history_of


def lineage(params: Params, version: str) -> dict[str, Any]:

    registry = Registry(params)
    found = registry.version(version)
    tags = dict(found.tags)
    status = tags.get(STATUS_TAG, "candidate")
    imposed = alias_status(found.aliases)
    consistent = imposed == status if imposed else status not in {"champion", "previous-champion"}
    return {
        "name": registry.name,
        "version": str(found.version),
        "aliases": sorted(found.aliases),
        "status": status,
        "status_agrees_with_aliases": consistent,
        "run_id": found.run_id,
        "source": found.source,
        "created": found.creation_timestamp,
        "tags": {k: v for k, v in sorted(tags.items()) if not k.startswith(HISTORY_PREFIX)},
        "history": history_of(tags),
        "description": found.description or "",
    }


def render(record: dict[str, Any]) -> str:
    lines = [f"{record['name']} version {record['version']}  aliases: {', '.join(record['aliases']) or '-'}  "
             f"status: {record['status']}",
             f"run: {record['run_id']}   source: {record['source']}", ""]
    if not record["status_agrees_with_aliases"]:
        lines += [f"WARNING: the status tag says {record['status']} but the aliases are "
                  f"{', '.join(record['aliases']) or 'none'}; re-run `llmops promote` or `llmops rollback`", ""]
    width = max((len(k) for k in record["tags"]), default=0)
    lines += [f"  {key:<{width}}  {value}" for key, value in record["tags"].items()]
    lines += ["", "history:"]
    for event in record["history"]:
        run = f" (run {event['airflow_run']})" if event.get("airflow_run") else ""
        lines.append(f"  {event['n']:>4}  {event.get('at', '?')}  {event.get('action', '?'):<12} "
                     f"{event.get('from') or '-'} -> {event.get('to') or '-'}  by {event.get('by', '?')}{run}"
                     + (f": {event['reason']}" if event.get("reason") else ""))
    return "\n".join(lines + ["", record["description"]])


def main(params: Params, version: str, as_json: bool = False) -> None:
    record = lineage(params, version)
    print(json.dumps(record, indent=2) if as_json else render(record))
