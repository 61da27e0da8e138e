"""Fixtures for integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import MlflowServer, Project, make_project


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` process per test module (SQLite backend, temporary artifact root)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()
