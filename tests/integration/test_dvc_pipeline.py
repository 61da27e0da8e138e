"""`dvc repro` of the data stages in a copy of the project: outputs, metrics, caching, failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support import BIN

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
DATA_OUTPUTS = ["data/ingested/pairs.parquet", "data/prepared"]


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.mark.slow
def test_repro_runs_the_data_stages_and_is_a_noop_the_second_time(project):
    first = project.dvc("repro", "prepare")
    assert ran(first.stdout) == ["ingest", "validate", "prepare"]
    root = project.root
    result = json.loads((root / "reports/validate/result.json").read_text())
    assert result["success"] is True and result["rows"] == 6400
    assert (root / "reports/validate/data_docs/index.html").exists()
    for split in ("train", "validation", "test"):
        assert (root / f"data/prepared/{split}.parquet").stat().st_size > 0

    metrics = json.loads(project.dvc("metrics", "show", "--json").stdout)
    # metrics files of later stages do not exist yet and come back as errors
    flat = {path: data["data"] for entry in metrics.values() for path, data in entry["data"].items() if "data" in data}
    assert flat["reports/validate/metrics.json"]["pass_rate"] == 1.0
    assert flat["reports/prepare/metrics.json"]["train"]["rows"] > 5000
    assert flat["reports/ingest/metrics.json"]["rows"] == 6400
    # each stage's cost record is a DVC metric too; prepare counted the tokens it wrote
    assert flat["reports/cost/prepare.json"]["tokens"]["tokenised"] == sum(
        flat["reports/prepare/metrics.json"][split]["tokens_total"] for split in ("train", "validation", "test"))
    assert flat["reports/cost/ingest.json"]["tokens_processed"] == 0 and flat["reports/cost/ingest.json"]["cost"] > 0

    mtime = (root / "data/prepared/train.parquet").stat().st_mtime_ns
    second = project.dvc("repro", "prepare")
    assert ran(second.stdout) == []
    assert "Data and pipelines are up to date" in second.stdout
    assert (root / "data/prepared/train.parquet").stat().st_mtime_ns == mtime

    # A prepare param re-runs prepare only; a split setting re-runs validate too (it checks
    # conflicting answers per split).
    project.set_params(prepare={"template": "plain"})
    third = project.dvc("repro", "prepare")
    assert ran(third.stdout) == ["prepare"]
    project.set_params(prepare={"seed": 7})
    assert ran(project.dvc("repro", "prepare").stdout) == ["validate", "prepare"]

    # The local remote works out of the box: push, lose the outputs, pull them back.
    project.dvc("push")
    shutil.rmtree(root / "data/prepared")
    project.dvc("pull", "prepare")
    assert (root / "data/prepared/train.parquet").exists()
    assert "prepare:" not in project.dvc("status", "prepare").stdout


@pytest.mark.parametrize(("fixture", "expectation"), [
    ("pii.jsonl", "response_no_email"),
    ("blank_response.jsonl", "response_not_blank"),
    ("conflicting_answers.jsonl", "conflicting_answers_test"),  # built for params.yaml's split settings
])
def test_failed_validation_stops_the_run_with_a_report(project, tiny_tokenizer_dir, fixture, expectation):
    shutil.copy2(FIXTURES / fixture, project.root / "data/raw" / fixture)
    project.set_params(
        base_model={"source": str(tiny_tokenizer_dir)},
        ingest={"sources": [{"kind": "file", "path": f"data/raw/{fixture}"}]},
        validate={"min_rows": 100},
    )
    result = project.dvc("repro", "prepare", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"- {expectation} (" in output and "blocking expectation(s) failed" in output
    assert "Traceback" not in output
    assert ran(result.stdout) == ["ingest", "validate"]
    assert not (project.root / "data/prepared").exists()
    report = json.loads((project.root / "reports/validate/result.json").read_text())
    assert report["success"] is False
    # prepare refuses this data even when called directly
    direct = project.run(str(BIN / "llmops"), "prepare", check=False)
    assert direct.returncode != 0 and "validation of data/ingested/pairs.parquet failed" in direct.stderr
    assert not (project.root / "data/prepared").exists()


def test_missing_source_fails_ingest_and_writes_nothing(project):
    project.set_params(ingest={"sources": [{"kind": "file", "path": "data/raw/missing.jsonl"}]})
    result = project.dvc("repro", "prepare", check=False)
    assert result.returncode != 0
    assert "data/raw/missing.jsonl does not exist" in result.stderr + result.stdout
    for output in DATA_OUTPUTS:
        assert not (project.root / output).exists()


def test_bad_params_fail_before_any_stage_runs(project):
    text = (project.root / "params.yaml").read_text().replace("test_fraction: 0.1", "test_fraction: 0.9")
    (project.root / "params.yaml").write_text(text)
    result = project.dvc("repro", "prepare", check=False)
    assert result.returncode != 0
    assert "prepare.test_fraction: Input should be less than 0.5 (got 0.9)" in result.stderr + result.stdout
    for output in DATA_OUTPUTS:
        assert not (project.root / output).exists()
