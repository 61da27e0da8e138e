"""Stage `validate`: a Great Expectations 1.x suite over the ingested pairs.

Reads   `paths.ingested`, params `validate` (bounds, allowed values, which expectations only
        warn), `base_model` (its tokenizer counts tokens) and `prepare`'s split fractions
        and seed (which split each prompt will land in).
Writes  `paths.validate_dir`: result.json (the verdict per expectation plus GX's own
        validation result), data_docs/index.html (GX Data Docs) and metrics.json (pass rate
        and counts for `dvc metrics show`). The report is written whether the data passes or
        not: it is what a reviewer reads.
Exits   non-zero when a blocking expectation fails, after printing a short report that
        names each failed expectation, its column, the count and a few example rows;
        `prepare` refuses to run on data whose validation did not pass.
Run     `llmops validate` or `dvc repro validate`; `llmops validate --list` lists the
        expectation names that `validate.warn_only` may hold.

The suite is code (`build_checks`) rather than a JSON file because its bounds, allowed
values and PII columns come from params.yaml; `llmops validate --list` prints it.

Conflicting answers (one prompt, two different answers) are checked per split, because a
contradictory reference in the test split makes every evaluation metric wrong while in the
train split it is only noise: `validate.conflicting_answers` says, per split, whether they
block the run (default for test) or warn. The check is a GX expectation on two derived
columns, as the token counts are: `split` (the split `prepare` will assign, from the same
seeded hash) and `answers_per_prompt` (how many different answers, compared after
`prepare`'s normalisation, the same prompt has in the data); each split's expectation is
`answers_per_prompt <= 1` under a GX row condition on `split`.
"""

from __future__ import annotations

import json
import logging

from pipelines.config.params import Params
from pipelines.data.splits import file_md5, split_settings
from pipelines.data.validation import (
    annotate,
    describe_failure,
    format_report,
    list_checks,
    run_suite,
    summarise,
    without_run_details,
)
from pipelines.errors import DataError, ValidationFailed
from pipelines.io import atomic_path, atomic_write_json, atomic_write_text, read_parquet
from pipelines.model.sources import load_tokenizer

logger = logging.getLogger(__name__)


def main(params: Params, list_only: bool = False) -> None:
    if list_only:
        print(list_checks(params.validate_))
        return

    data_path = params.paths.ingested
    frame = read_parquet(data_path, produced_by="ingest")
    missing = [c for c in ("prompt", "response") if c not in frame.columns]
    if missing:
        raise DataError(f"{data_path} lacks column(s) {', '.join(missing)}; re-run `llmops ingest`")
    tokenizer = load_tokenizer(params.base_model.source, params.base_model.revision)
    frame = annotate(frame, tokenizer, params.prepare)

    # Each output is replaced whole on its own (not the folder: DVC keeps a .gitignore in it).
    report_dir = params.paths.validate_dir
    with atomic_path(report_dir / "data_docs") as docs_dir:
        outcomes, gx_result = run_suite(frame, params.validate_, docs_dir=docs_dir)
    summary = summarise(outcomes)
    result = {
        **summary,
        "data": str(data_path),
        "data_md5": file_md5(data_path),
        "rows": len(frame),
        "splits": split_settings(params.prepare),
        "expectations": [o.__dict__ for o in outcomes],
        "gx_validation_result": without_run_details(gx_result),
    }
    atomic_write_text(params.paths.validation_file(), json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    metrics = {"rows": len(frame), **{k: v for k, v in summary.items() if k != "success"},
               "success": int(summary["success"])}
    atomic_write_json(report_dir / "metrics.json", metrics)
    for outcome in outcomes:
        if not outcome.success and not outcome.blocking:
            logger.warning("validate: warning only: %s", describe_failure(outcome))
    if not summary["success"]:
        raise ValidationFailed(format_report(outcomes, len(frame), data_path, params.paths))
    logger.info("validate: %d/%d expectations passed on %d rows; report in %s",
                summary["passed"], summary["evaluated"], len(frame), report_dir / "data_docs" / "index.html")
