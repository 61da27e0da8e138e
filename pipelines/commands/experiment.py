"""Command `experiment`: an orchestrated run (an Airflow DAG run) as a DVC experiment.

    llmops experiment start --name airflow-2026-11-29-abc -S train.max_steps=40
    dvc --wait-for-lock repro --single-item ingest   # ... one stage at a time (what the DAG's tasks do)
    llmops experiment save --name airflow-2026-11-29-abc
    llmops experiment end --name airflow-2026-11-29-abc   # release the workspace (idempotent)

start: params.yaml := HEAD's + the overrides (validated; run parameters only); save: `dvc exp
save` of the workspace as NAME; end: release the workspace. Reads and writes params.yaml and
`.dvc/tmp/llmops-experiment.json`. The rules (what a run may override, one run per workspace)
are in the library: pipelines/registry/experiments.py.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.config.params import Params
from pipelines.registry.experiments import end, save, start


def main(params: Params, action: str, name: str, set_params: list[str] | None = None,
         message: str | None = None) -> None:
    root = Path.cwd()
    if action == "start":
        start(root, name, set_params or [])
    elif action == "end":
        end(root, name)
    else:
        save(root, name, message)
