"""The Great Expectations suite against good and deliberately broken fixture files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.ingest import ingest
from pipelines.params import FileSource, ValidateParams, load_params
from pipelines.validate import count_tokens, describe_failure, format_report, run_suite, summarise

FIXTURES = Path(__file__).parent / "fixtures"
# The repo's own validate params, with a row minimum that fits 150-row fixtures.
PARAMS = load_params(Path(__file__).resolve().parents[2] / "params.yaml").validate_.model_copy(
    update={"min_rows": 100}
)


def validate_file(name: str, tokenizer, params: ValidateParams = PARAMS):
    frame, _ = ingest([FileSource(kind="file", path=FIXTURES / name)], Path("unused"))
    outcomes, gx_result = run_suite(count_tokens(frame, tokenizer), params)
    return frame, {o.name: o for o in outcomes}, gx_result


def failed(outcomes) -> set[str]:
    return {name for name, o in outcomes.items() if not o.success}


def test_good_fixture_passes_every_expectation(tiny_tokenizer):
    _, outcomes, gx_result = validate_file("good.jsonl", tiny_tokenizer)
    assert failed(outcomes) == set()
    assert gx_result["success"] is True
    assert summarise(list(outcomes.values()))["pass_rate"] == 1.0
    # The suite really has the checks the issue asks for.
    for name in ("columns_match", "row_count", "unique_pairs", "prompt_not_blank", "response_chars",
                 "response_tokens", "pos_allowed", "response_no_email", "prompt_no_phone",
                 "response_no_credit_card", "response_no_api_key", "response_is_text"):
        assert name in outcomes


def test_blank_responses_fail_with_count_and_examples(tiny_tokenizer):
    _, outcomes, _ = validate_file("blank_response.jsonl", tiny_tokenizer)
    assert failed(outcomes) == {"response_not_blank", "response_chars", "response_tokens"}
    blank = outcomes["response_not_blank"]
    assert blank.blocking and blank.unexpected_count == 3
    assert {e["row"] for e in blank.examples} == {3, 50, 99}
    text = describe_failure(blank)
    assert "response_not_blank" in text and "'response'" in text and "3 row(s)" in text


def test_pii_rows_fail_each_pattern(tiny_tokenizer):
    _, outcomes, _ = validate_file("pii.jsonl", tiny_tokenizer)
    expected = {"response_no_email", "prompt_no_phone", "response_no_credit_card", "response_no_api_key"}
    assert expected <= failed(outcomes)
    assert outcomes["response_no_email"].unexpected_count == 1
    assert outcomes["response_no_email"].examples[0]["row"] == 5


def test_disallowed_category_value(tiny_tokenizer):
    _, outcomes, _ = validate_file("wrong_pos.jsonl", tiny_tokenizer)
    assert failed(outcomes) == {"pos_allowed"}
    assert outcomes["pos_allowed"].examples[0]["pos"] == "pronoun"


def test_length_bounds_in_chars_and_tokens(tiny_tokenizer):
    _, outcomes, _ = validate_file("too_long.jsonl", tiny_tokenizer)
    assert failed(outcomes) == {"response_chars", "response_tokens"}


def test_duplicates_are_a_warning_by_default_and_blocking_on_request(tiny_tokenizer):
    _, outcomes, _ = validate_file("duplicates.jsonl", tiny_tokenizer)
    assert failed(outcomes) == {"unique_pairs"}
    assert not outcomes["unique_pairs"].blocking
    assert summarise(list(outcomes.values()))["success"] is True

    strict = PARAMS.model_copy(update={"warn_only": []})
    _, outcomes, _ = validate_file("duplicates.jsonl", tiny_tokenizer, strict)
    assert outcomes["unique_pairs"].blocking
    assert summarise(list(outcomes.values()))["success"] is False


def test_minimum_row_count(tiny_tokenizer):
    _, outcomes, _ = validate_file("good.jsonl", tiny_tokenizer, PARAMS.model_copy(update={"min_rows": 1000}))
    assert failed(outcomes) == {"row_count"}
    assert outcomes["row_count"].observed_value == 150


def test_wrong_types_fail_the_type_expectation(tiny_tokenizer):
    """Data that bypasses ingest (e.g. a hand-edited Parquet file) still meets the type check."""
    frame, _ = ingest([FileSource(kind="file", path=FIXTURES / "good.jsonl")], Path("unused"))
    frame.loc[4, "response"] = 42
    frame = count_tokens(frame, tiny_tokenizer)
    outcomes = {o.name: o for o in run_suite(frame, PARAMS)[0]}
    assert "response_is_text" in failed(outcomes)


def test_failure_report_names_expectation_column_count_and_rows(tiny_tokenizer):
    frame, outcomes, _ = validate_file("pii.jsonl", tiny_tokenizer)
    report = format_report(list(outcomes.values()), len(frame), Path("data/x.parquet"), Path("reports/validate"))
    assert "blocking expectation(s) failed on data/x.parquet (150 rows)" in report
    assert "response_no_email (expect_column_values_to_not_match_regex on 'response'): 1 row(s)" in report
    assert "jane.doe@example.com" in report
    assert "reports/validate/data_docs/index.html" in report


def test_data_docs_are_rendered(tiny_tokenizer, tmp_path):
    frame, _ = ingest([FileSource(kind="file", path=FIXTURES / "good.jsonl")], Path("unused"))
    run_suite(count_tokens(frame, tiny_tokenizer), PARAMS, docs_dir=tmp_path / "docs")
    index = tmp_path / "docs" / "index.html"
    assert index.exists()
    pages = list((tmp_path / "docs" / "validations").rglob("*.html"))
    assert len(pages) == 1
    html = pages[0].read_text()
    assert "not match this regular expression" in html and "instruction_pairs" in html


@pytest.mark.parametrize("name", ["response_not_blank", "row_count"])
def test_warn_only_accepts_known_names(name):
    from pipelines.validate import build_checks

    checks = build_checks(PARAMS.model_copy(update={"warn_only": [name]}))
    assert name in {c.name for c in checks}


def test_warn_only_rejects_unknown_names():
    from pipelines.errors import ParamsError
    from pipelines.validate import build_checks

    with pytest.raises(ParamsError, match="unknown expectation.*no_such_check"):
        build_checks(PARAMS.model_copy(update={"warn_only": ["no_such_check"]}))
