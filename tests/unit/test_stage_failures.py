"""A stage that fails half-way leaves no partial output (and keeps the last good one)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipelines import ingest, prepare, validate
from pipelines.params import load_params
from tests.support import REPO

FIXTURES = REPO / "tests" / "data" / "fixtures"


def params_in(tmp_path: Path, tokenizer_dir: Path, fixture: str = "good.jsonl"):
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
        prepare.main(params.model_copy(update={"prepare": params.prepare.model_copy(update={"seed": 9})}))
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
