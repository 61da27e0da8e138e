"""A stage that fails half-way leaves no partial output (and keeps the last good one)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipelines.config.params import load_params
from pipelines.data import sources as ingest
from pipelines.stages import prepare, validate
from tests.support import REPO

FIXTURES = REPO / "tests" / "data" / "fixtures"


def params_in(tmp_path: Path, tokenizer_dir: Path, fixture: str | Path = "good.jsonl"):
    overrides = [
        f"paths.ingested={tmp_path}/ingested/pairs.parquet",
        f"paths.validate_dir={tmp_path}/validate",
        f"paths.prepared_dir={tmp_path}/prepared",
        f"paths.reports_dir={tmp_path}/reports",
        f"base_model.source={tokenizer_dir}",
        f"ingest.sources=[{{kind: file, path: {FIXTURES / fixture}}}]",
        "validate.min_rows=100",
        "prepare.test_fraction=0.2",
        "prepare.validation_fraction=0.2",
    ]
    return load_params(REPO / "params.yaml", overrides)


def test_prepare_crash_while_writing_splits_leaves_nothing(tmp_path, tiny_tokenizer_dir, monkeypatch):
    params = params_in(tmp_path, tiny_tokenizer_dir)
    ingest.main(params)
    validate.main(params)

    original = pd.DataFrame.to_parquet

    def crash_on_test_split(self, path, *args, **kwargs):
        if Path(path).name == "test.parquet":
            raise OSError("disk full")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash_on_test_split)
    with pytest.raises(OSError, match="disk full"):
        prepare.main(params)
    assert not params.paths.prepared_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingested", "reports", "validate"]
    assert not params.paths.metrics("prepare").exists()

    # The next run succeeds; a later crash keeps that good output whole.
    monkeypatch.setattr(pd.DataFrame, "to_parquet", original)
    prepare.main(params)
    before = {p.name: p.read_bytes() for p in params.paths.prepared_dir.iterdir()}
    assert set(before) == {"train.parquet", "validation.parquet", "test.parquet"}
    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash_on_test_split)
    with pytest.raises(OSError):
        prepare.main(params.model_copy(update={"prepare": params.prepare.model_copy(update={"template": "plain"})}))
    assert {p.name: p.read_bytes() for p in params.paths.prepared_dir.iterdir()} == before


def test_validation_failure_writes_the_report_but_no_data(tmp_path, tiny_tokenizer_dir):
    from pipelines.errors import ValidationFailed

    params = params_in(tmp_path, tiny_tokenizer_dir, "blank_response.jsonl")
    ingest.main(params)
    with pytest.raises(ValidationFailed, match="response_not_blank"):
        validate.main(params)
    assert (tmp_path / "validate" / "data_docs" / "index.html").exists()
    assert (tmp_path / "validate" / "metrics.json").exists()
    with pytest.raises(ValidationFailed):
        prepare.main(params)
    assert not (tmp_path / "prepared").exists()


def _with_conflict_in(split_name: str, tmp_path: Path, params) -> Path:
    """good.jsonl plus a second, different answer to a prompt that `prepare` puts in `split_name`."""
    import json

    from pipelines.data.splits import split_of

    rows = [json.loads(line) for line in (FIXTURES / "good.jsonl").read_text().splitlines()]
    settings = params.prepare
    index = next(i for i, r in enumerate(rows) if split_of(
        r["prompt"], settings.validation_fraction, settings.test_fraction, settings.seed) == split_name)
    rows.append({**rows[index], "id": "conflict", "response": "A contradictory answer, not the definition."})
    path = tmp_path / "conflicting.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_prompt_with_two_answers_in_the_test_split_stops_validate_with_the_gx_report(tmp_path, tiny_tokenizer_dir):
    from pipelines.errors import ValidationFailed

    params = params_in(tmp_path, tiny_tokenizer_dir)
    params = params_in(tmp_path, tiny_tokenizer_dir, _with_conflict_in("test", tmp_path, params))
    ingest.main(params)
    with pytest.raises(ValidationFailed) as error:
        validate.main(params)
    report = str(error.value)
    assert "1 blocking expectation(s) failed" in report
    assert "conflicting_answers_test (expect_column_values_to_be_between on 'answers_per_prompt'): 2 row(s)" in report
    assert "A contradictory answer, not the definition." in report
    assert str((tmp_path / "validate" / "data_docs" / "index.html").resolve()) in report
    pages = list((tmp_path / "validate" / "data_docs" / "validations").rglob("*.html"))
    assert pages and "answers_per_prompt" in pages[0].read_text()
    with pytest.raises(ValidationFailed):
        prepare.main(params)
    assert not (tmp_path / "prepared").exists()


def test_a_prompt_with_two_answers_in_the_train_split_is_a_warning(tmp_path, tiny_tokenizer_dir, caplog):
    params = params_in(tmp_path, tiny_tokenizer_dir)
    params = params_in(tmp_path, tiny_tokenizer_dir, _with_conflict_in("train", tmp_path, params))
    ingest.main(params)
    validate.main(params)
    assert "warning only: conflicting_answers_train" in caplog.text
    prepare.main(params)
    assert (tmp_path / "prepared" / "train.parquet").exists()


def test_prepare_refuses_a_validation_run_made_with_other_split_settings(tmp_path, tiny_tokenizer_dir):
    """The conflicting-answers check is per split: a new seed moves prompts, so validate must run again."""
    from pipelines.errors import DataError

    params = params_in(tmp_path, tiny_tokenizer_dir)
    ingest.main(params)
    validate.main(params)
    moved = params.model_copy(update={"prepare": params.prepare.model_copy(update={"seed": 7})})
    with pytest.raises(DataError, match=r"split settings .*'seed': 42.*'seed': 7.*re-run `llmops validate`"):
        prepare.main(moved)
    assert not (tmp_path / "prepared").exists()
