"""`llmops lineage VERSION`: the evidence of a model version, read from the registry alone.

Prints the version's aliases, status, run, data hashes, commit (and what was uncommitted),
params hash, validation summary and where its Data Docs are logged, base model and licence,
its history (every promotion, demotion and rollback: who, when, why) and its model card:
what a reviewer needs, without the workspace that produced it (`--json` for machines).
A status tag that disagrees with the aliases (a promotion that stopped half-way) is
reported.
"""

from pipelines.registry.lineage import main

__all__ = ["main"]
