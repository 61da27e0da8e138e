"""Team mode without Docker: the stack's services as real processes on loopback.

A throw-away PostgreSQL cluster (Debian's postgresql; as the `postgres` user when the tests run
as root, which initdb refuses) with the databases docker/postgres/init-databases.sh creates; an
`mlflow server` started by the MLflow image's entry point (docker/mlflow/entrypoint.sh: basic
auth, nothing readable without a grant) on PostgreSQL, its users made by the image's set-up
script (docker/mlflow/init_users.py, the stack's mlflow-init); then the tiny pipeline trains and
registers in it as the pipeline's user, `llmops serve` answers with the champion as the read-only
serving user and logs the requests into the PostgreSQL inference log. Every service location and
credential reaches the pipeline through the environment only, as in docker/compose.yaml
(pipelines/config/settings.py): params.yaml names none of them.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.support import BIN, REPO, commit, free_port, require, stop_process_group, tiny_pipeline_project, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

PASSWORDS = {name: secrets.token_hex(12) for name in
             ("POSTGRES_PASSWORD", "AIRFLOW_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "INFERENCE_DB_PASSWORD")}
TOKEN = secrets.token_hex(16)
ADMIN_PASSWORD = secrets.token_hex(12)
# the stack's service accounts (docker/.env: MLFLOW_PIPELINE_USER, MLFLOW_SERVE_USER)
PIPELINE = ("llmops-pipeline", secrets.token_hex(12))
SERVING = ("llmops-serve", secrets.token_hex(12))


def postgres_bin(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))  # Debian keeps them off PATH
    return candidates[-1] if candidates else None


class PostgresCluster:
    """initdb in a temporary folder, pg_ctl on a free loopback port, password auth over TCP."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="llmops-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            require(shutil.which("runuser") is not None, "runuser (util-linux) is needed to run PostgreSQL as root")
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, *command], capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> PostgresCluster:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORDS["POSTGRES_PASSWORD"])
        if self.as_user:
            shutil.chown(pwfile, "postgres", "postgres")
        init = self.run(postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        assert init.returncode == 0, init.stderr
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c shared_buffers=32MB")
        started = self.run(postgres_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                           str(self.root / "postgres.log"), "-w", "-t", "60", "start")
        if started.returncode != 0:
            log = (self.root / "postgres.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"pg_ctl start failed: {started.stderr}\n{log}")
        return self

    def url(self, role: str, password: str, database: str) -> str:
        return f"postgresql+psycopg2://{role}:{password}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        self.run(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    require(postgres_bin("initdb") is not None and postgres_bin("pg_ctl") is not None,
            "PostgreSQL server binaries (Debian package postgresql) are not installed")
    require(shutil.which("psql") is not None, "psql (Debian package postgresql-client) is not installed")
    cluster = PostgresCluster().start()
    try:
        # the stack's own script creates the roles and databases, over TCP with the superuser's password
        env = {**os.environ, **PASSWORDS, "PGHOST": "127.0.0.1", "PGPORT": str(cluster.port),
               "PGPASSWORD": PASSWORDS["POSTGRES_PASSWORD"], "POSTGRES_USER": "postgres"}
        for _ in range(2):  # twice: it must be safe to run again
            result = subprocess.run(["bash", str(REPO / "docker" / "postgres" / "init-databases.sh")], env=env,
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres, tmp_path_factory):
    """`mlflow server` with basic auth, its runs, registry and users in PostgreSQL."""
    root = tmp_path_factory.mktemp("mlflow-pg")
    port = free_port()
    password = PASSWORDS["MLFLOW_DB_PASSWORD"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_AUTH_DATABASE_URI": postgres.url("mlflow", password, "mlflow_auth"),
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16), "MLFLOW_AUTH_CACHE_TTL_SECONDS": "60"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        ["sh", str(REPO / "docker" / "mlflow" / "entrypoint.sh"),
         "--backend-store-uri", postgres.url("mlflow", password, "mlflow"),
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 240, process)
        users = subprocess.run(
            [sys.executable, str(REPO / "docker" / "mlflow" / "init_users.py")], capture_output=True, text=True,
            timeout=120, env={"PATH": os.environ["PATH"], "MLFLOW_TRACKING_URI": uri, "MLFLOW_ADMIN_USER": "admin",
                              "MLFLOW_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_PIPELINE_USER": PIPELINE[0],
                              "MLFLOW_PIPELINE_PASSWORD": PIPELINE[1], "MLFLOW_SERVE_USER": SERVING[0],
                              "MLFLOW_SERVE_PASSWORD": SERVING[1], "LLMOPS_EXPERIMENT": "llmops",
                              "LLMOPS_MODEL_NAME": "llmops-dictionary"})
        assert users.returncode == 0, users.stdout + users.stderr
        yield uri
    except Exception:
        raise RuntimeError("mlflow server did not start:\n" +
                           (root / "server.log").read_text(errors="replace")[-3000:]) from None
    finally:
        stop_process_group(process, 20)
        log.close()


def test_train_register_and_serve_with_postgresql_behind_mlflow_and_the_inference_log(
        postgres, mlflow_on_postgres, tmp_path, tiny_tokenizer_dir):
    started = time.monotonic()
    inference_url = postgres.url("llmops", PASSWORDS["INFERENCE_DB_PASSWORD"], "inference")
    project = tiny_pipeline_project(tmp_path / "project", tiny_tokenizer_dir, tracking_uri="unused")
    # As in the stack: params.yaml names no service (tracking.uri null); the environment does.
    project.set_params(tracking={"uri": None, "system_metrics": False})
    commit(project, "services from the environment")
    # the pipeline runs as the stack's pipeline user, not as MLflow's admin
    project.env.update({"MLFLOW_TRACKING_URI": mlflow_on_postgres, "MLFLOW_TRACKING_USERNAME": PIPELINE[0],
                        "MLFLOW_TRACKING_PASSWORD": PIPELINE[1], "LLMOPS_INFERENCE_LOG_URL": inference_url,
                        "LLMOPS_API_TOKEN": TOKEN})

    # Auth is on: without credentials the server refuses.
    anonymous = requests.get(f"{mlflow_on_postgres}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert anonymous.status_code == 401

    shown = project.run(str(BIN / "llmops"), "settings").stdout
    assert f"{mlflow_on_postgres}  " in shown and "env: MLFLOW_TRACKING_URI" in shown
    assert PASSWORDS["INFERENCE_DB_PASSWORD"] not in shown and "env: LLMOPS_INFERENCE_LOG_URL" in shown

    project.dvc("repro", "register")
    project.run(str(BIN / "llmops"), "promote", "--force", "--reason", "team-mode test")
    trained = time.monotonic()

    # The run, the version and the champion are in PostgreSQL (MLflow's own tables).
    import sqlalchemy as sa

    engine = sa.create_engine(postgres.url("mlflow", PASSWORDS["MLFLOW_DB_PASSWORD"], "mlflow"))
    try:
        with engine.connect() as connection:
            runs = connection.execute(sa.text("SELECT count(*) FROM runs")).scalar()
            versions = connection.execute(sa.text("SELECT name, version FROM model_versions")).all()
            aliases = connection.execute(sa.text("SELECT alias, version FROM registered_model_aliases")).all()
    finally:
        engine.dispose()
    assert runs >= 2  # train and evaluate
    assert versions == [("llmops-dictionary", 1)]
    assert ("champion", 1) in aliases

    # A sweep's study in PostgreSQL (the stack's `sweeps` database, LLMOPS_SWEEP_STORAGE as in
    # docker/compose.yaml), where workers on several machines share its trials: one trial, HEAD's
    # params (the baseline trial), which DVC restores from its run cache instead of training again.
    import optuna

    sweeps_url = postgres.url("llmops", PASSWORDS["INFERENCE_DB_PASSWORD"], "sweeps")
    project.env["LLMOPS_SWEEP_STORAGE"] = sweeps_url
    swept = project.run(str(BIN / "llmops"), "sweep", "--trials", "1", "--set", "sweep.metric=eval_loss")
    assert "best trial 0 (sweep-default-0)" in swept.stdout, swept.stdout + swept.stderr
    (trial,) = optuna.load_study(study_name="default", storage=sweeps_url).get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["dvc_experiment"] == "sweep-default-0"
    assert "sweep-default-0" in project.dvc("exp", "list", "--name-only").stdout
    assert PASSWORDS["INFERENCE_DB_PASSWORD"] not in (project.root / "reports/sweep/default/summary.json").read_text()

    # The serving user may read the champion but not move it (docker/mlflow/init_users.py).
    serving_auth = requests.auth.HTTPBasicAuth(*SERVING)
    alias = requests.get(f"{mlflow_on_postgres}/api/2.0/mlflow/registered-models/alias",
                         params={"name": "llmops-dictionary", "alias": "champion"}, auth=serving_auth, timeout=10)
    assert alias.status_code == 200 and alias.json()["model_version"]["version"] == "1", alias.text
    moved = requests.post(f"{mlflow_on_postgres}/api/2.0/mlflow/registered-models/alias", auth=serving_auth,
                          json={"name": "llmops-dictionary", "alias": "champion", "version": "1"}, timeout=10)
    assert moved.status_code == 403, moved.text

    # `llmops serve` from the registry as the read-only serving user, logging into PostgreSQL.
    port = free_port()
    log_path = tmp_path / "serve.log"
    serve_env = {**project.env, "MLFLOW_TRACKING_USERNAME": SERVING[0], "MLFLOW_TRACKING_PASSWORD": SERVING[1],
                 "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    with open(log_path, "wb") as output:
        serve = subprocess.Popen(
            [str(BIN / "llmops"), "serve", "--set", f"serve.port={port}", "--set", "serve.engine.kv_cache_gib=0.25",
             "--set", "serve.engine.multiprocessing=false",
             "--set", "inference_log.flush_interval_seconds=0.2"],
            cwd=project.root, env=serve_env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/ready", 180, serve)
            headers = {"Authorization": f"Bearer {TOKEN}"}
            prompts = ['What does the noun "bank" mean?', 'What does the verb "run" mean?',
                       "Mail me at someone@example.com: what does the adjective \"quick\" mean?"]
            ids = []
            for prompt in prompts:
                response = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=headers, timeout=60,
                                         json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 8})
                assert response.status_code == 200, response.text
                assert response.json()["model_version"] == "1"
                ids.append(response.json()["id"])
            from pipelines.serving.inference_log import read_records

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                rows = read_records(inference_url)
                if len(rows) >= len(prompts):
                    break
                time.sleep(0.3)
        finally:
            stop_process_group(serve, 30)
    assert sorted(rows["request_id"]) == sorted(ids), log_path.read_text(errors="replace")[-2000:]
    assert set(rows["model_version"]) == {"1"} and set(rows["status"]) == {200}
    assert not any("someone@example.com" in p for p in rows["prompt"])  # PII masked before it is stored
    print(f"team mode: pipeline to champion {trained - started:.0f} s, whole test {time.monotonic() - started:.0f} s")
