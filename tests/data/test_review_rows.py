"""The same Great Expectations suite on reviewed rows (`{kind: review}`, docs/review.md): the
`rejected` answer and the provenance columns are checked where the rows come from a review."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.config.params import FileSource, ReviewSource
from pipelines.data.sources import ingest
from pipelines.data.validation import annotate, run_suite, summarise
from tests.data.test_suite import FIXTURES, PARAMS, PREPARE, failed


def review_rows(n: int = 6) -> pd.DataFrame:
    """Rows as `llmops review export` writes them (pipelines/review/corrections.py COLUMNS)."""
    return pd.DataFrame([{
        "id": f"review-req-{i}", "prompt": f"What does the computing term \"widget{i}\" mean?",
        "response": f"A small reusable user-interface element number {i}.",
        "rejected": f"A kind of small gadget {i}." if i % 2 else None, "source": "review", "domain": "production",
        "request_id": f"req-{i}", "task_id": i + 1, "reviewer": "ana@example.org",
        "reviewed_at": "2026-12-06T10:00:00Z", "window": "2026-12-06T00:00:00+00:00"} for i in range(n)])


def validate(folder: Path, tokenizer):
    frame, _ = ingest([FileSource(kind="file", path=FIXTURES / "good.jsonl"), ReviewSource(kind="review")],
                      Path("unused"), folder)
    outcomes, _ = run_suite(annotate(frame, tokenizer, PREPARE), PARAMS)
    return frame, {o.name: o for o in outcomes}


def test_reviewed_rows_pass_the_suite_beside_base_rows(tmp_path, tiny_tokenizer):
    review_rows().to_parquet(tmp_path / "corrections.parquet", index=False)
    frame, outcomes = validate(tmp_path, tiny_tokenizer)
    assert len(frame) == 156 and failed(outcomes) == set()
    for name in ("rejected_is_text", "rejected_not_blank", "rejected_no_email", "review_request_id_not_null",
                 "review_task_id_not_null", "review_reviewer_not_null", "review_reviewed_at_not_null"):
        assert name in outcomes


def test_broken_review_rows_fail_with_the_row(tmp_path, tiny_tokenizer):
    rows = review_rows()
    rows.loc[1, "rejected"] = "  "
    rows.loc[3, "rejected"] = "Mail jane.doe@example.com"
    rows.loc[2, "reviewer"] = None
    rows.loc[4, "request_id"] = None
    rows.loc[5, "domain"] = "elsewhere"
    rows.to_parquet(tmp_path / "corrections.parquet", index=False)
    _, outcomes = validate(tmp_path, tiny_tokenizer)
    assert failed(outcomes) == {"rejected_not_blank", "rejected_no_email", "review_reviewer_not_null",
                                "review_request_id_not_null", "domain_allowed"}
    assert outcomes["review_reviewer_not_null"].examples[0]["id"] == "review-req-2"
    assert outcomes["rejected_no_email"].blocking
    assert summarise(list(outcomes.values()))["success"] is False
