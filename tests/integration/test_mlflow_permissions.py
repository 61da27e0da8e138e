"""The stack's MLflow users against a real `mlflow server --app-name basic-auth` (SQLite here; the
PostgreSQL variant runs in test_team_mode.py).

The server is started by the MLflow image's own entry point (docker/mlflow/entrypoint.sh) and its
users are made by the image's own set-up script (docker/mlflow/init_users.py), as mlflow-init does
in docker/compose.yaml. The pipeline's user registers and promotes a version; the serving user
fetches the champion's merged weights exactly as `llmops serve` does (pipelines/serving/engine.py,
fetch_version) and is refused every write, the promotion lock, and every other experiment.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest
import requests

from tests.support import (
    BIN,
    REPO,
    Workspace,
    build_tiny_base,
    evaluation,
    free_port,
    register,
    stop_process_group,
    wait_http,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "llmops-dictionary"
USERS = {role: (f"llmops-{role}", secrets.token_hex(12)) for role in ("admin", "pipeline", "serve")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{root / 'auth.db'}",
           "MLFLOW_AUTH_ADMIN_USERNAME": USERS["admin"][0], "MLFLOW_AUTH_ADMIN_PASSWORD": USERS["admin"][1],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16), "MLFLOW_AUTH_CACHE_TTL_SECONDS": "60"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_AUTH_DEFAULT_PERMISSION"):
        env.pop(name, None)
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        ["sh", str(REPO / "docker" / "mlflow" / "entrypoint.sh"),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 240, process)
        yield uri
    except Exception:
        raise RuntimeError("mlflow server did not start:\n" +
                           (root / "server.log").read_text(errors="replace")[-3000:]) from None
    finally:
        stop_process_group(process, 20)
        log.close()


def init_users(uri: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "MLFLOW_TRACKING_URI": uri,
           "MLFLOW_ADMIN_USER": USERS["admin"][0], "MLFLOW_ADMIN_PASSWORD": USERS["admin"][1],
           "MLFLOW_PIPELINE_USER": USERS["pipeline"][0], "MLFLOW_PIPELINE_PASSWORD": USERS["pipeline"][1],
           "MLFLOW_SERVE_USER": USERS["serve"][0], "MLFLOW_SERVE_PASSWORD": USERS["serve"][1],
           "LLMOPS_EXPERIMENT": "llmops", "LLMOPS_MODEL_NAME": MODEL}
    return subprocess.run([sys.executable, str(REPO / "docker" / "mlflow" / "init_users.py")], env=env,
                          capture_output=True, text=True, timeout=120)


def as_user(monkeypatch, role: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USERS[role][0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USERS[role][1])


def denied(call, *args, **kwargs) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as raised:
        call(*args, **kwargs)
    assert "PERMISSION_DENIED" in str(raised.value) or "403" in str(raised.value), str(raised.value)


def test_the_serving_user_fetches_the_champion_and_can_change_nothing(server, tmp_path, tiny_tokenizer_dir,
                                                                      monkeypatch):
    from mlflow import MlflowClient

    from pipelines.registry.model_registry import Registry
    from pipelines.serving.engine import fetch_version

    for _ in range(2):  # the set-up is safe to run again (mlflow-init after a restart)
        result = init_users(server)
        assert result.returncode == 0, result.stdout + result.stderr

    # The pipeline's user trains (a run), registers and promotes, and makes a second experiment.
    base = build_tiny_base(tmp_path / "base", tiny_tokenizer_dir)
    ws = Workspace(tmp_path / "ws", base, server, MODEL)
    as_user(monkeypatch, "pipeline")
    version = register(ws, evaluation(0.02))
    Registry(ws.params()).set_alias("champion", version)
    pipeline = MlflowClient(tracking_uri=server, registry_uri=server)
    other_experiment = pipeline.create_experiment("llmops-monitoring")
    experiment = pipeline.get_experiment_by_name("llmops").experiment_id
    run = pipeline.create_run(experiment)

    # The serving user: the champion's alias and merged weights, as `llmops serve` fetches them.
    as_user(monkeypatch, "serve")
    params = ws.params(f"serve.engine.cache_dir={tmp_path / 'cache'}")
    assert Registry(params).alias("champion").version == version
    served = fetch_version(params, version)
    assert (served.model_dir / "config.json").exists() and served.config["template"]

    client = MlflowClient(tracking_uri=server, registry_uri=server)
    model_version = client.get_model_version(MODEL, version)
    denied(client.set_registered_model_alias, MODEL, "champion", "7")
    denied(client.delete_registered_model_alias, MODEL, "champion")
    denied(client.set_model_version_tag, MODEL, version, "promotion.status", "champion")
    denied(client.update_registered_model, MODEL, description="changed by serving")
    denied(client.create_model_version, MODEL, model_version.source, run_id=model_version.run_id)
    denied(client.delete_model_version, MODEL, version)
    denied(client.create_registered_model, f"{MODEL}--promotion-lock")  # cannot block promotions
    denied(client.create_run, experiment)
    denied(client.log_metric, run.info.run_id, "loss", 0.0)
    denied(client.get_experiment, other_experiment)  # nothing it was not granted, not even to read
    upload = requests.put(f"{server}/api/2.0/mlflow-artifacts/artifacts/{experiment}/{run.info.run_id}/artifacts/x.txt",
                          data=b"written by serving", auth=USERS["serve"], timeout=30)
    assert upload.status_code == 403, upload.text
    # and without credentials, nothing at all
    assert requests.get(f"{server}/api/2.0/mlflow/registered-models/get", params={"name": MODEL},
                        timeout=30).status_code == 401
    # the pipeline's user still may (the grants are the serving user's, not the server's default)
    as_user(monkeypatch, "pipeline")
    pipeline.set_model_version_tag(MODEL, version, "checked", "yes")
