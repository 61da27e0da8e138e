"""`llmops rollback`: move the `champion` alias back, and record who did it and why.

    llmops rollback --reason "canary answers wrong"            # back to previous-champion
    llmops rollback --to 3 --reason "v5 and v4 both bad"       # to a named version

Safe to run twice: when the champion already is the target, nothing changes and nothing is
recorded. `previous-champion` is left on the restored version, so a second rollback is a
no-op rather than a swap back. Each version the rollback touches gets a history event (who:
the Airflow user who triggered the run, else the command-line user; when; why) and a
re-rendered model card: the version rolled back from becomes `rolled-back` (its
`rollback.*` tags say by whom, when, why and to which version, until its status changes
again), the restored one `champion`, and a `previous-champion` the rollback passed over
`retired` (pipelines/registry/model_registry.py).
"""

from pipelines.registry.rollback import main

__all__ = ["main"]
