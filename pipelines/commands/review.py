"""Command `review`: people in the loop through Label Studio (docs/review.md).

    llmops review serve                  # Label Studio on 127.0.0.1:<review.port> until Ctrl-C; prints the login
    llmops review request --version 3    # a blind A/B task set: candidate v3 vs the champion (or the base)
    llmops review collect --version 3    # win rate with its interval, agreement -> the version's tags and card
    llmops review decide                 # the review DAG: collect, then gate again a version awaiting review
    llmops review corrections            # production answers monitoring flagged -> correction tasks
    llmops review export                 # approved corrections -> data/feedback (a DVC-tracked dataset)

Reads `review` (where Label Studio is, what a task set holds) and `promote.human_review`
from params.yaml; the tool's login comes from LLMOPS_REVIEW_TOKEN, else the token file
`llmops review serve` leaves in `review.data_dir`. Label Studio runs from its own virtualenv
(`review.python`, created by `make install`): its pins clash with ours.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from pipelines.config.params import Params

# action -> (library module, function); imported only when the action runs
ACTIONS: dict[str, tuple[str, str]] = {
    "serve": ("pipelines.review.labelstudio", "serve"),
    "request": ("pipelines.review.candidate", "request"),
    "collect": ("pipelines.review.candidate", "collect"),
    "decide": ("pipelines.review.candidate", "decide"),
    "corrections": ("pipelines.review.corrections", "request"),
    "export": ("pipelines.review.corrections", "export"),
}


def main(params: Params, action: str, **options: Any) -> None:
    module, function = ACTIONS[action]
    result = getattr(importlib.import_module(module), function)(params, **options)
    if options.get("as_json"):
        print(json.dumps(result, default=str))
