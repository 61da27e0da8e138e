"""The review DAG: people's blind A/B judgements of a candidate decide its promotion. See doc_md."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from airflow.providers.standard.operators.bash import BashOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, task
from llmops_common import DEFAULT_ARGS, notify_failure, schedule, shell

log = logging.getLogger("llmops.dags")

DOC = """
### Human review of the candidate (promote.human_review: required)

With `promote.human_review: required` the training DAG never waits for people: after
**register** its **review_request** task sends the candidate's blind A/B task set to Label
Studio (`llmops review request`), and **promote** records the version as *awaiting-review*
(its model card says so) instead of promoting it. This DAG then takes over, on its own
schedule:

* **decide** runs `llmops review decide`: when the challenger is awaiting review it collects
  the judgements (`llmops review collect`: win rate with its interval, reviewer agreement, on
  the version's tags and card) and runs the promotion gate again with the evaluation the
  version was registered with. With at least `promote.min_reviews` judgements the gate decides
  (the lower bound of the win rate must exceed `promote.min_win_rate_low`); with fewer, the
  version keeps waiting until `review.candidate.deadline_hours` after the request, and after
  that deadline the gate **rejects** it (recorded in its history with the count it had).
  Anything else (no candidate awaiting review) ends the run quietly.
* **deploy** runs `llmops deploy` when decide promoted the version, to roll it out to the
  running `llmops serve` and verify it (rolling back on failed canaries).

With `advisory` the review is shown on the version and never blocks; with `off` nothing is
sent. Schedule: Variable `llmops_review_schedule` (environment variable
`AIRFLOW_VAR_LLMOPS_REVIEW_SCHEDULE`, default `@hourly`). Docs: docs/review.md.
"""

with DAG(
    dag_id="llmops_review",
    description="Collect people's A/B reviews of the candidate; promote or reject it at the deadline",
    doc_md=DOC,
    schedule=schedule("llmops_review_schedule", "@hourly"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "on_failure_callback": notify_failure},
    tags=["llmops", "review"],
) as dag:
    # The result is `llmops review decide --json`'s only stdout line, the last line of the output.
    @task.bash
    def decide() -> str:
        return shell("llmops review decide --json | tail -n 1")

    @task.branch(retries=0)
    def promoted(output: str) -> str:
        result = json.loads(output)
        log.info("v%s: status %s%s", result.get("version"), result.get("status"),
                 "; " + "; ".join(result["reasons"]) if result.get("reasons") else "")
        return "deploy" if result.get("promoted") and result.get("changed") else "nothing_to_deploy"

    deploy = BashOperator(task_id="deploy", bash_command=shell("llmops deploy"))
    promoted(decide()) >> [deploy, EmptyOperator(task_id="nothing_to_deploy")]
