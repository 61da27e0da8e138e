"""`llmops airflow` refuses clearly instead of half-starting (the running case: tests/integration/test_airflow.py)."""

from __future__ import annotations

import socket

import pytest

from pipelines.commands.airflow import AirflowError, LocalAirflow


def test_a_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "dags").mkdir()
        airflow = LocalAirflow(tmp_path, tmp_path / "home", port)
        with pytest.raises(AirflowError, match=f"port {port} on 127.0.0.1 is in use"):
            airflow.start()
    assert airflow.process is None and not (tmp_path / "home").exists()


def test_outside_the_project_is_a_clear_error(tmp_path):
    with pytest.raises(AirflowError, match="dags not found: run from the project root"):
        LocalAirflow(tmp_path, tmp_path / "home", 1).start()


def test_the_components_get_loopback_sqlite_and_the_project(tmp_path):
    env = LocalAirflow(tmp_path, tmp_path / "home", 18111, base_env={"PATH": "/usr/bin"}).env()
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__API__PORT"] == "18111"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18111/execution/"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path / 'home' / 'airflow.db'}"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW_VAR_LLMOPS_REPO"] == str(tmp_path)
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(tmp_path / "dags")
