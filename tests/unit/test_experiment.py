"""`llmops experiment start`: a run's params as DVC overrides on the committed params.yaml.

`experiment save` needs the outputs of a whole run: tests/integration/test_airflow.py checks it."""

from __future__ import annotations

import json

import pytest
import yaml

from pipelines.errors import ParamsError
from pipelines.experiment import STATE, ExperimentError, start
from tests.support import commit, make_project


@pytest.fixture
def repo(tmp_path):
    project = make_project(tmp_path / "project")
    commit(project, "init")
    return project


def params(project) -> dict:
    return yaml.safe_load((project.root / "params.yaml").read_text())


def test_start_applies_overrides_to_head_and_validates(repo):
    head = (repo.root / "params.yaml").read_text()
    start(repo.root, "run-1", ["train.max_steps=7", "base_model.source='org/model'"])
    assert params(repo)["train"]["max_steps"] == 7 and params(repo)["base_model"]["source"] == "org/model"
    assert "# Every tunable value" in (repo.root / "params.yaml").read_text()  # DVC's writer keeps comments
    # the next run starts from HEAD again, not from the last run's overrides
    start(repo.root, "run-2", ["train.learning_rate=0.001"])
    assert params(repo)["train"]["max_steps"] == yaml.safe_load(head)["train"]["max_steps"]
    assert params(repo)["train"]["learning_rate"] == 0.001
    start(repo.root, "run-3", [])
    assert (repo.root / "params.yaml").read_text() == head
    assert json.loads((repo.root / STATE).read_text())["name"] == "run-3"


@pytest.mark.parametrize(("override", "message"), [
    ("train.max_steps=0", "train.max_steps: Input should be greater than 0 (got 0)"),
    ("train.max_steps=[1", "is not valid `dvc exp run -S` syntax"),
    ("train.no_such_key=1", "no_such_key"),
])
def test_a_bad_override_fails_before_anything_changes(repo, override, message):
    before = (repo.root / "params.yaml").read_text()
    with pytest.raises(ParamsError) as caught:
        start(repo.root, "bad", [override])
    assert message in str(caught.value)
    assert str(repo.root / ".dvc" / "tmp") not in str(caught.value)  # names params.yaml, not a temp file
    assert (repo.root / "params.yaml").read_text() == before
    assert not list((repo.root / ".dvc" / "tmp").glob("tmp*"))


def test_uncommitted_edits_are_never_overwritten(repo):
    path = repo.root / "params.yaml"
    path.write_text(path.read_text() + "\n# my edit\n")
    with pytest.raises(ExperimentError, match="edits that are not committed") as caught:
        start(repo.root, "run", ["train.max_steps=7"])
    assert "git stash" in str(caught.value)
    assert path.read_text().endswith("# my edit\n")
    # what an earlier run wrote is not a user's edit
    path.write_text(path.read_text().replace("\n# my edit\n", ""))
    start(repo.root, "run", ["train.max_steps=7"])
    start(repo.root, "run-2", ["train.max_steps=8"])
    assert params(repo)["train"]["max_steps"] == 8


def test_start_needs_a_commit(tmp_path):
    project = make_project(tmp_path / "project")  # git init, nothing committed
    with pytest.raises(ExperimentError, match="is not committed to git.*git commit"):
        start(project.root, "run", [])
