"""The DAGs on a real Airflow, on the tiny pipeline (a tiny Llama, 1,500 rows, 4 steps).

First `airflow dags test` in a temporary AIRFLOW_HOME (never a running scheduler's database):
the training DAG end to end, a failed validation, a run whose override is refused, and the
monitoring DAG on drifted traffic (its no-retrain branch: tests/dags). Then the real
components (`llmops airflow`: api-server, scheduler, dag-processor, triggerer on loopback):
two triggers at once through the REST API v2 with the params the UI sends, the monitoring DAG
triggering a training run, and headless Chromium filling the UI's trigger form. All in one
project and one MLflow server, in order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.support import BIN, Project, dvc_experiments, free_port, require, tiny_pipeline_project

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
STAGES = ["ingest", "validate", "prepare", "base_model", "train", "evaluate", "register", "quantize", "promote",
          "deploy"]
ARTIFACTS = Path(os.environ.get("LLMOPS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
# What the UI's trigger form sends: every param, the untouched ones with their defaults.
FORM_DEFAULTS = {"reason": "", "base_model": "", "max_steps": None, "learning_rate": None, "data_sources": [],
                 "overrides": [], "skip_gate": False, "drift_report": ""}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_dir, mlflow_server) -> Project:
    return tiny_pipeline_project(tmp_path_factory.mktemp("airflow") / "project", tiny_tokenizer_dir,
                                 mlflow_server.uri)


class AirflowCli:
    """`airflow ...` against a temporary AIRFLOW_HOME with its own SQLite database."""

    def __init__(self, project: Project, home: Path) -> None:
        self.project = project
        self.env = {**project.env, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    "AIRFLOW__CORE__DAGS_FOLDER": str(project.root / "dags"),
                    "AIRFLOW_VAR_LLMOPS_REPO": str(project.root), "AIRFLOW_VAR_LLMOPS_BIN": str(BIN)}

    def run(self, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
        result = subprocess.run([str(BIN / "airflow"), *args], env=self.env, cwd=self.project.root,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n"
                                 f"{result.stderr[-4000:]}")
        return result

    def query(self, code: str) -> object:
        """Run Python with Airflow's ORM against this database; `code` sets `out`."""
        script = ("import json\nfrom airflow.utils.session import create_session\n"
                  "from airflow.models import DagRun, TaskInstance\n"
                  f"with create_session() as session:\n    {code}\nprint(json.dumps(out, default=str))")
        result = subprocess.run([str(BIN / "python"), "-c", script], env=self.env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    def runs(self, dag_id: str) -> list[dict]:
        return self.query(
            f"out = [dict(run_id=r.run_id, state=r.state, run_type=r.run_type, conf=r.conf) for r in "
            f"session.query(DagRun).filter(DagRun.dag_id == {dag_id!r}).order_by(DagRun.id)]")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        return self.query(
            f"out = {{t.task_id: t.state for t in session.query(TaskInstance).filter("
            f"TaskInstance.dag_id == {dag_id!r}, TaskInstance.run_id == {run_id!r})}}")


@pytest.fixture(scope="module")
def cli(tiny, tmp_path_factory) -> AirflowCli:
    cli = AirflowCli(tiny, tmp_path_factory.mktemp("airflow-home"))
    cli.run("db", "migrate")
    return cli


def registered_versions(server_uri: str, name: str) -> dict[str, dict]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=server_uri)
    versions = client.search_model_versions(f"name='{name}'")
    return {v.version: dict(v.tags) for v in versions}


def model_name(project: Project) -> str:
    return project.params()["registry"]["model_name"]


def experiments(project: Project) -> dict[str, dict]:
    """DVC experiments by name: their params.yaml params."""
    return {name: data.get("params", {}).get("params.yaml", {}).get("data", {})
            for name, data in dvc_experiments(project).items()}


# --- airflow dags test ---------------------------------------------------------------------


def test_dags_test_runs_the_training_pipeline_and_records_a_dvc_experiment(tiny, cli, mlflow_server):
    conf = {"reason": "first model", "skip_gate": True}
    result = cli.run("dags", "test", "llmops_training", "-c", json.dumps(conf))
    assert "state=success" in result.stdout + result.stderr
    (run,) = cli.runs("llmops_training")
    assert run["state"] == "success"
    states = cli.task_states("llmops_training", run["run_id"])
    assert states == {task: "success" for task in ["experiment_start", *STAGES, "review_request", "experiment_save",
                                                   "push", "experiment_end"]}
    # the run's outputs are in the project's DVC remote: nothing left to push
    assert json.loads(tiny.dvc("status", "--cloud", "--json").stdout) == {}
    assert any((tiny.root / ".dvc-storage").rglob("*"))

    # the gate was skipped on request: a forced promotion, recorded with the reason
    decision = json.loads((tiny.root / "reports/promote/decision.json").read_text())
    assert decision["promoted"] and decision["forced"]
    versions = registered_versions(mlflow_server.uri, model_name(tiny))
    assert list(versions) == ["1"]
    assert "first model" in json.dumps(versions["1"])

    # every stage recorded what it used and cost; the version carries training's and evaluation's
    records = {stage: json.loads((tiny.root / f"reports/cost/{stage}.json").read_text()) for stage in STAGES}
    for stage, record in records.items():
        assert record["stage"] == stage and record["wall_seconds"] > 0 and record["cost"] > 0, record
    assert records["train"]["tokens"]["trained"] > 0 and records["evaluate"]["tokens"]["generated"] > 0
    assert records["prepare"]["tokens"]["tokenised"] > 0
    tags = versions["1"]
    assert tags["cost.train"] == f"{records['train']['cost']:.6f} USD"
    assert tags["cost.evaluate.tokens"] == str(records["evaluate"]["tokens_processed"])
    import mlflow

    card = mlflow.MlflowClient(mlflow_server.uri).get_model_version(model_name(tiny), "1").description
    assert "## Cost" in card and f"| train | {records['train']['wall_seconds']:.0f} s on " in card

    # the run is a DVC experiment with the params it trained with
    saved = experiments(tiny)
    name = "airflow-" + run["run_id"].replace(":", "-").replace("+", "-")
    assert name in saved, saved.keys()
    assert saved[name]["train"]["max_steps"] == 4


def test_failed_validation_fails_the_run_with_the_report_and_registers_nothing(tiny, cli, mlflow_server):
    shutil.copy2(FIXTURES / "pii.jsonl", tiny.root / "data/raw/pii.jsonl")
    # enough rows for validate.min_rows (a run may not lower it), 150 of them with PII
    sources = "ingest.sources=[{kind:bundled,name:wordnet,max_rows:1500},{kind:file,path:'data/raw/pii.jsonl'}]"
    conf = {"reason": "bad data", "overrides": [sources]}
    result = cli.run("dags", "test", "llmops_training", "-c", json.dumps(conf), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "DagRun failed" in output
    run = cli.runs("llmops_training")[-1]
    assert run["state"] == "failed"
    states = cli.task_states("llmops_training", run["run_id"])
    assert states["validate"] == "failed" and states["ingest"] == "success"
    assert all(states[task] == "upstream_failed" for task in ["prepare", "train", "register", "experiment_save"])
    assert states["experiment_end"] == "success"  # the teardown freed the workspace all the same
    # the task log names the failed expectation and links the Great Expectations report
    assert "response_no_email" in output
    assert f"{tiny.root}/reports/validate/data_docs/index.html" in output
    # the failure callback notified (the default channel is the log)
    assert f"llmops: task validate of llmops_training run {run['run_id']} failed" in output
    assert list(registered_versions(mlflow_server.uri, model_name(tiny))) == ["1"]
    assert not (tiny.root / "data/prepared/train.parquet").exists() or \
        json.loads((tiny.root / "reports/validate/result.json").read_text())["success"] is False


def test_a_refused_override_fails_the_run_at_experiment_start(tiny, cli, mlflow_server):
    """The trigger form cannot point the run's MLflow client (and its credentials) at another host."""
    before = (tiny.root / "params.yaml").read_text()
    conf = {"reason": "exfiltrate", "overrides": ["tracking.uri=http://attacker.invalid:5000"]}
    result = cli.run("dags", "test", "llmops_training", "-c", json.dumps(conf), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "DagRun failed" in output
    run = cli.runs("llmops_training")[-1]
    states = cli.task_states("llmops_training", run["run_id"])
    assert states["experiment_start"] == "failed"
    assert all(states[stage] == "upstream_failed" for stage in STAGES)
    assert ("tracking.uri is a deployment setting, not a run parameter: set MLFLOW_TRACKING_URI in the "
            "environment of the workers") in output
    assert (tiny.root / "params.yaml").read_text() == before
    assert list(registered_versions(mlflow_server.uri, model_name(tiny))) == ["1"]


# --- the real components -------------------------------------------------------------------


class Api:
    """The REST API v2 with a bearer token from /auth/token (what the UI does after login)."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def call(self, method: str, path: str, body: object = None) -> dict:
        request = urllib.request.Request(f"{self.url}/api/v2/{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{method} {path}: {error.code} {error.read()[:1000]!r}") from None

    def trigger(self, dag_id: str, conf: dict, logical_date: str | None = None) -> str:
        run = self.call("POST", f"dags/{dag_id}/dagRuns", {"logical_date": logical_date, "conf": conf})
        return run["dag_run_id"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.call("GET", f"dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")

    def wait(self, dag_id: str, run_id: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(dag_id, run_id)
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(2)
        raise AssertionError(f"{dag_id} {run_id} still {run['state']} after {timeout} s")

    def log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        quoted = urllib.parse.quote(run_id, safe="")
        body = self.call("GET", f"dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/logs/{try_number}")
        content = body.get("content", "")
        return "\n".join(json.dumps(c) if not isinstance(c, str) else c for c in content) \
            if isinstance(content, list) else str(content)

    def states(self, dag_id: str, run_id: str) -> dict[str, str]:
        quoted = urllib.parse.quote(run_id, safe="")
        body = self.call("GET", f"dags/{dag_id}/dagRuns/{quoted}/taskInstances")
        return {t["task_id"]: t["state"] for t in body["task_instances"]}


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory):
    """`llmops airflow` on a free loopback port, in the project (what `make airflow` starts)."""
    from pipelines.commands.airflow import LocalAirflow

    # No schedules: unpausing a scheduled DAG starts a run for its latest interval, which would
    # queue ahead of the runs these tests trigger.
    env = {**tiny.env, "AIRFLOW_VAR_LLMOPS_TRAINING_SCHEDULE": "none", "AIRFLOW_VAR_LLMOPS_MONITORING_SCHEDULE": "none"}
    airflow = LocalAirflow(tiny.root, tmp_path_factory.mktemp("airflow-live"), free_port(), base_env=env)
    airflow.start()
    try:
        airflow.wait_healthy(timeout=300)
        api = Api(airflow.url, airflow.token())
        deadline = time.monotonic() + 120  # the dag-processor's first parse
        while time.monotonic() < deadline:
            dags = {d["dag_id"] for d in api.call("GET", "dags")["dags"]}
            if {"llmops_training", "llmops_monitoring"} <= dags:
                break
            time.sleep(2)
        for dag_id in ("llmops_training", "llmops_monitoring"):
            assert api.call("GET", f"dags/{dag_id}")["is_paused"] is True  # new DAGs start paused
            api.call("PATCH", f"dags/{dag_id}", {"is_paused": False})
        yield airflow, api
    except Exception:
        print(airflow.log_tail(80))
        raise
    finally:
        airflow.stop()
        assert airflow.process.poll() is not None


def test_a_rest_trigger_and_a_drift_triggered_run_queue_one_after_the_other_and_both_finish(tiny, live,
                                                                                            mlflow_server):
    """The two ways a training run starts besides the schedule, in one pass of the real scheduler
    (one training run fewer than testing them apart): a REST trigger with form params, and the
    monitoring DAG asking for a retrain on drifted traffic while that run still trains."""
    _, api = live
    # a learning rate too small to learn anything: the candidate answers as the base model does,
    # so the gate says no (a run may not change the gate's thresholds: docs/orchestration.md)
    conf = {**FORM_DEFAULTS, "reason": "more steps", "max_steps": 5, "learning_rate": 1e-9,
            "overrides": ["train.lora.lora_dropout=0.0"]}
    first = api.trigger("llmops_training", conf)
    # simulate-traffic answers with the champion promoted by the `dags test` run above (module
    # order), from the test split this first run prepares
    deadline = time.monotonic() + 600
    while api.states("llmops_training", first).get("prepare") != "success":
        assert time.monotonic() < deadline, api.states("llmops_training", first)
        assert api.run("llmops_training", first)["state"] != "failed", api.states("llmops_training", first)
        time.sleep(2)
    tiny.run(str(BIN / "llmops"), "simulate-traffic", "--requests", "60", "--drift-share", "0.9",
             "--end", "2026-11-26T00:00:00Z", "--seed", "3")
    monitoring = api.trigger("llmops_monitoring", {}, logical_date="2026-11-26T00:00:00Z")
    watched = api.wait("llmops_monitoring", monitoring)
    assert watched["state"] == "success", api.states("llmops_monitoring", monitoring)
    assert api.states("llmops_monitoring", monitoring) == {"monitor": "success", "decide": "success",
                                                           "trigger_training": "success", "no_retrain": "skipped"}
    assert "retraining requested: drift in 1 of the last 1 windows" in api.log("llmops_monitoring", monitoring,
                                                                               "decide")
    second = "drift__20261126T000000"
    a = api.wait("llmops_training", first)
    b = api.wait("llmops_training", second)
    assert a["state"] == "success", api.states("llmops_training", first)
    assert b["state"] == "success", api.states("llmops_training", second)
    # max_active_runs=1: the drift run was queued while the first trained, and started after it
    assert b["queued_at"] < a["end_date"] <= b["start_date"], (a, b)
    assert "Unable to acquire lock" not in api.log("llmops_training", second, "train")
    assert a["run_type"] == "manual" and a["conf"]["max_steps"] == 5
    assert b["run_type"] == "operator_triggered"
    assert b["conf"]["reason"].startswith("drift in window ending 2026-11-26T00:00:00+00:00")
    assert "reports/monitor/2026-11-26T00-00-00Z" in b["conf"]["drift_report"]
    # the gate says no (no improvement over the base model): the run succeeds and says so
    assert "version 2: not promoted" in api.log("llmops_training", first, "promote")
    assert "2" in registered_versions(mlflow_server.uri, model_name(tiny))
    # each run is a DVC experiment with its own params: the second is back on HEAD's
    saved = experiments(tiny)
    ours = saved["airflow-" + first.replace(":", "-").replace("+", "-")]
    assert ours["train"]["max_steps"] == 5 and ours["train"]["learning_rate"] == 1e-9
    assert ours["train"]["lora"]["lora_dropout"] == 0.0
    assert saved["airflow-" + second.replace(":", "-").replace("+", "-")]["train"]["max_steps"] == 4


def test_browser_logs_in_fills_the_trigger_form_and_sees_the_run_succeed(tiny, live):
    require(Path("/usr/bin/chromium").exists(), "Debian chromium is not installed (scripts/install.sh installs it "
                                                "as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright is not installed (pip install -e '.[dev]')")
    airflow, api = live
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    before = {r["dag_run_id"] for r in api.call("GET", "dags/llmops_training/dagRuns")["dag_runs"]}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{airflow.url}/dags/llmops_training")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", airflow.password())
            page.click("button[type=submit]")
            page.wait_for_url("**/dags/llmops_training**", timeout=60_000)
            page.get_by_role("button", name="Trigger Dag").click()
            dialog = page.get_by_role("dialog")
            dialog.locator("input[name=element_reason]").fill("from the browser")
            # HEAD's own value: the run trains what `dags test` trained above, so DVC restores its
            # outputs from the run cache instead of training again (this test is about the form)
            dialog.locator("input[name=element_max_steps]").fill("4")
            dialog.get_by_role("button", name="Trigger", exact=True).click()
            page.wait_for_url("**/dags/llmops_training/runs/**", timeout=60_000)
            run_id = urllib.parse.unquote(page.url.split("/runs/")[1].split("/")[0].split("?")[0])
            assert run_id not in before
            run = api.wait("llmops_training", run_id)
            page.reload()
            page.get_by_text("success").first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "airflow-trigger-form-run.png"), full_page=True)
        finally:
            browser.close()
    assert run["state"] == "success" and run["conf"]["reason"] == "from the browser" and run["conf"]["max_steps"] == 4
    train_log = api.log("llmops_training", run_id, "train")
    assert "Stage 'train' is cached - skipping run" in train_log or "Stage 'train' didn't change" in train_log, \
        train_log[-2000:]
    assert (ARTIFACTS / "airflow-trigger-form-run.png").stat().st_size > 10_000  # kept as a test artifact
