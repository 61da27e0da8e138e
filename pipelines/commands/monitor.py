"""Command `monitor`: an Evidently drift report of one window of production traffic, and whether to retrain.

    llmops monitor --end 2026-11-24T00:00:00Z       # the window [end - monitor.window_hours, end)

Reads the inference log (`inference_log.url`) for the window, the prepared train split as the
reference (with the champion's answers on a sample of it, cached per version), and `monitor`
from params.yaml. Writes `monitor.reports_dir`/<window end>/ `report.html` and
`embeddings.html` (Evidently),
`result.json` (the report's metrics and tests) and `decision.json`, appends the window to
`history.jsonl`, copies the decision to `latest.json`, and logs the report to MLflow as a run
tagged with the champion's model version (and tags the version with it).

The window comes from the caller (Airflow passes its data interval end); the logic never reads
the clock. Reports are plain files, not DVC outputs: each window is a new, immutable record
of what production looked like, not something `dvc repro` should rebuild. Re-running a window
replaces its files and its history line, so a re-run task gives the same result.

The decision: the window is drifted when at least `drift.min_drifted_signals` signals drift
(text descriptors by a K-S test, prompt embeddings by a classifier's ROC AUC). A retrain is
requested when k of the last n windows drifted, no request was made within the cooldown,
and (unless the policy says otherwise) enough new labelled rows exist. The command exits 0
either way: the decision is data for the orchestrator.
"""

from pipelines.monitoring.monitor import main

__all__ = ["main"]
