"""The embedded tracking store (SQLite in the project root) travels with the project folder."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

pytestmark = pytest.mark.integration

MODEL_CODE = """
import mlflow
from mlflow.pyfunc import PythonModel


class Echo(PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return [f"echo {text}" for text in model_input]


mlflow.models.set_model(Echo())
"""


def stored_locations(db) -> list[str]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute(
            "SELECT artifact_location FROM experiments UNION ALL SELECT artifact_uri FROM runs UNION ALL "
            "SELECT artifact_location FROM logged_models UNION ALL SELECT storage_location FROM model_versions")
        return [row[0] for row in rows]


@pytest.fixture
def fresh_tracking(monkeypatch):
    """No tracking URI from an earlier test, in this process's MLflow or its environment; none left behind."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset-by-this-test")  # so that teardown restores the old value
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(None)
    yield
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_the_project_can_be_moved_with_its_runs_and_models(tmp_path, monkeypatch, fresh_tracking):
    import mlflow

    from pipelines.config.params import TrackingParams
    from pipelines.registry import tracking

    # the embedded default: no tracking.uri, no MLFLOW_TRACKING_URI, the project root as working directory
    original = tmp_path / "original"
    original.mkdir()
    monkeypatch.chdir(original)
    (original / "model_code.py").write_text(MODEL_CODE)
    (original / "report.html").write_text("<html>data docs</html>")
    params = TrackingParams(experiment="portable", system_metrics=False)
    run_id = tracking.start_run(params, "train")
    tracking.log_artifacts(original / "report.html", "validation")
    info = mlflow.pyfunc.log_model(name="model", python_model=str(original / "model_code.py"))
    mlflow.register_model(info.model_uri, "portable-model")
    tracking.end_run()
    locations = stored_locations(original / "mlflow.db")
    assert locations and all(not loc.startswith(("/", "file:")) for loc in locations), locations
    with open(original / "mlflow.db", "rb") as handle:
        assert str(original).encode() not in handle.read()

    # copy the project elsewhere and remove the original: everything still reads from the copy
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, moved)
    shutil.rmtree(original)
    monkeypatch.chdir(moved)
    mlflow.set_tracking_uri(tracking.resolve_tracking_uri(params))
    report = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="validation/report.html",
                                                 dst_path=str(tmp_path / "download"))
    assert open(report).read() == "<html>data docs</html>"
    model = mlflow.pyfunc.load_model("models:/portable-model/1")
    assert list(model.predict(["hello"])) == ["echo hello"]


def test_a_store_elsewhere_is_left_as_mlflow_wrote_it(tmp_path, monkeypatch, fresh_tracking):
    from pipelines.config.params import TrackingParams
    from pipelines.registry import tracking

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "other" / "mlflow.db"
    db.parent.mkdir()
    params = TrackingParams(uri=f"sqlite:///{db}", experiment="elsewhere", system_metrics=False)
    tracking.start_run(params, "run")
    tracking.end_run()
    # the store is not in the working directory: relative paths would point at the wrong place
    locations = stored_locations(db)
    assert locations and all(loc.startswith(("/", "file:")) for loc in locations), locations
    assert tracking.portable_store(params.uri) == 0
