"""Stage `deploy`: roll the registry's champion out to the running service and verify it.

    llmops deploy                        # service from deploy.service_url or LLMOPS_SERVICE_URL
    llmops deploy --strict               # exit non-zero when verification fails (after the rollback)

Reads `deploy`, `serve` (token), `registry`, `tracking` and the test split in
`paths.prepared_dir`; writes `reports/deploy/deployment.json` (status, versions, canary
figures) and tags the version with `deploy.*`.

Steps: ask the service to check its alias now (`POST /admin/reload`), wait until `/ready`
reports the champion's version, send canary prompts from the test split, and compare
success rate, ROUGE-L and p95 latency with the thresholds in params. When verification
fails, the champion is rolled back in the registry (`llmops rollback`), the service is
asked to switch back, and the report says why. Where no service is configured or reachable
(`dvc repro` on a workstation), the intent is recorded and the stage succeeds.
"""

from pipelines.serving.deploy import main

__all__ = ["main"]
