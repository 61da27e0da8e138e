"""`llmops monitor` and `llmops simulate-traffic` on the tiny model registered in a real `mlflow
server`: real Evidently reports, real embeddings (offline all-MiniLM-L6-v2), a real inference log."""

from __future__ import annotations

import json
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from pipelines.errors import LLMOpsError
from tests.support import REPO, Workspace, build_tiny_base, evaluation, free_port, register

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DAY0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """Seeded random train/test splits of the WordNet sample (prompt, response) and an
    `ingest` output holding the same rows."""
    root = tmp_path_factory.mktemp("prepared")
    rows = pd.read_json(REPO / "data/sample/wordnet.jsonl", lines=True).sample(frac=1.0, random_state=0)
    rows[["prompt", "response"]].iloc[:2000].to_parquet(root / "train.parquet")
    rows[["prompt", "response"]].iloc[2000:2400].to_parquet(root / "test.parquet")
    rows[["prompt", "response"]].iloc[:2400].to_parquet(root / "pairs.parquet")
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_tokenizer_dir, splits, mlflow_server):
    from pipelines.stages import promote

    root = tmp_path_factory.mktemp("ws")
    base = build_tiny_base(root / "base", tiny_tokenizer_dir)
    ws = Workspace(root, base, mlflow_server.uri, f"monitor-{uuid.uuid4().hex[:8]}")
    ws.overrides += [f"paths.prepared_dir={splits}", f"paths.ingested={splits / 'pairs.parquet'}",
                     "evaluate.decoding.repetition_penalty=3.0", "evaluate.decoding.max_new_tokens=12"]
    register(ws, evaluation(0.02))
    promote.main(ws.params())
    return ws


def settings(ws: Workspace, tmp_path, *extra: str):
    return ws.params(f"inference_log.url=sqlite:///{tmp_path / 'log' / 'inference.db'}",
                     f"inference_log.spool_dir={tmp_path / 'log' / 'spool'}",
                     f"monitor.reports_dir={tmp_path / 'reports'}",
                     f"monitor.embedding_cache={ws.root / 'cache' / 'embeddings.npz'}",
                     "monitor.reference_size=300", "monitor.reference_outputs=48", "monitor.min_rows=30",
                     "monitor.retrain.require_new_data=false", *extra)


def traffic(params, day: int, drift_share: float, requests: int = 80) -> None:
    from pipelines.commands import simulate_traffic

    end = DAY0 + timedelta(days=day)
    simulate_traffic.main(params, requests=requests, drift_share=drift_share, end=end.isoformat(), seed=day)


def run(params, day: int) -> dict:
    from pipelines.monitoring.monitor import monitor

    return monitor(params, DAY0 + timedelta(days=day))


def report_tests(folder) -> dict[str, str]:
    result = json.loads((folder / "result.json").read_text())
    return {t["name"]: str(t["status"]).upper() for t in result["tests"]}


def test_no_drift_traffic_requests_no_retrain_and_the_files_agree(ws, tmp_path):
    # 80 requests a window, embeddings for 60 of them: the rest have no vector
    params = settings(ws, tmp_path, "monitor.drift.embedding_sample_size=60")
    for day in (1, 2, 3):
        traffic(params, day, drift_share=0.0)
        decision = run(params, day)
        assert decision["status"] == "ok" and decision["rows"] == 80
        assert decision["drift"]["detected"] is False, decision["drift"]
        assert decision["retrain"]["requested"] is False
    folder = tmp_path / "reports" / "2026-03-04T00-00-00Z"
    for report in ("report.html", "embeddings.html"):
        assert (folder / report).stat().st_size > 10_000 and "<html" in (folder / report).read_text()[:2000]
    decision = json.loads((folder / "decision.json").read_text())
    tests = report_tests(folder)
    for signal, result in decision["drift"]["signals"].items():  # the decision says what the report says
        name = "Drift in embeddings" if signal == "prompt_embedding" else f"Value Drift for column {signal}"
        status = next(status for title, status in tests.items() if title.startswith(name))
        assert result["drifted"] == ("FAIL" in status), (signal, status)
    assert decision["model_version"] == "1" and decision["mlflow_run_id"]
    history = [json.loads(line) for line in (tmp_path / "reports" / "history.jsonl").read_text().splitlines()]
    assert [h["drifted"] for h in history] == [False, False, False]
    # direct mode answers in static batches of 16, as evaluate does: every record of a batch waited
    # for the whole batch (3 days x 80 requests: 5 batches a day); served latencies need --url
    with sqlite3.connect(tmp_path / "log" / "inference.db") as connection:
        latencies = [row[0] for row in connection.execute("SELECT latency_ms FROM inference_requests")]
    assert len(latencies) == 240 and min(latencies) > 0 and len(set(latencies)) == 15
    assert json.loads((tmp_path / "reports" / "latest.json").read_text())["window"]["end"].startswith("2026-03-04")


def test_drift_in_k_windows_requests_a_retrain_and_the_cooldown_holds_the_next(ws, tmp_path):
    import mlflow

    params = settings(ws, tmp_path)
    decisions = []
    for day in (1, 2, 3):
        traffic(params, day, drift_share=1.0)
        decisions.append(run(params, day))
    assert [d["drift"]["detected"] for d in decisions] == [True, True, True]
    assert "prompt_embedding" in decisions[0]["drift"]["drifted_signals"]
    assert [d["retrain"]["requested"] for d in decisions] == [False, True, False]
    assert "within the cooldown" in " ".join(decisions[2]["retrain"]["reasons"])
    # a re-run of a window replaces its result instead of adding a window
    again = run(params, 3)
    assert again["retrain"] == decisions[2]["retrain"]
    assert len((tmp_path / "reports" / "history.jsonl").read_text().splitlines()) == 3
    # the report sits in MLflow next to the model version
    from pipelines.registry.model_registry import Registry

    registry = Registry(params)
    tags = registry.version("1").tags
    assert tags["monitor.last_drift"] == "True" and tags["monitor.last_window"].startswith("2026-03-04")
    mlflow.set_tracking_uri(registry.uri)
    files = [f.path for f in mlflow.MlflowClient().list_artifacts(tags["monitor.last_run"], "monitor")]
    assert {"monitor/report.html", "monitor/decision.json", "monitor/result.json"} <= set(files)


def test_the_new_data_policy(ws, tmp_path):
    # a known source of labelled rows: the FOLDOC sample (3000 rows the training data lacks); the
    # reviewed rows of params.yaml's {kind: review} are tested in tests/unit/test_review_source.py
    foldoc = "monitor.retrain.new_data={kind: bundled, name: foldoc}"
    params = settings(ws, tmp_path, "monitor.retrain.require_new_data=true", "monitor.retrain.min_new_rows=100000",
                      foldoc)
    for day in (1, 2):
        traffic(params, day, drift_share=1.0)
        decision = run(params, day)
    assert decision["retrain"]["requested"] is False
    assert "not enough new labelled data: 3000 new rows" in " ".join(decision["retrain"]["reasons"])
    enough = settings(ws, tmp_path, "monitor.retrain.require_new_data=true", "monitor.retrain.min_new_rows=500",
                      foldoc)
    assert run(enough, 2)["retrain"]["requested"] is True


def test_an_empty_window_is_a_result_not_a_crash(ws, tmp_path):
    decision = run(settings(ws, tmp_path), 30)
    assert decision["status"] == "no-traffic" and decision["rows"] == 0
    assert decision["drift"]["detected"] is None and decision["retrain"]["requested"] is False


def test_too_few_rows_are_reported_as_insufficient_data(ws, tmp_path):
    params = settings(ws, tmp_path)
    traffic(params, 5, drift_share=1.0, requests=10)
    decision = run(params, 5)
    assert decision["status"] == "insufficient-data" and "monitor.min_rows" in decision["message"]
    assert not (tmp_path / "reports" / "2026-03-06T00-00-00Z" / "report.html").exists()


def test_corrupt_rows_are_skipped_and_counted(ws, tmp_path):
    params = settings(ws, tmp_path)
    traffic(params, 7, drift_share=0.0, requests=40)
    with sqlite3.connect(tmp_path / "log" / "inference.db") as connection:
        # a failed request with an empty answer is valid (and must not break a descriptor)
        connection.execute(
            "INSERT INTO inference_requests (request_id, created_at, endpoint, model_name, model_version, "
            "prompt, output, status, latency_ms, prompt_tokens, completion_tokens) "
            "VALUES ('failed', '2026-03-07 11:00:00.000000', 'completions', 'm', '1', 'What?', '', 500, 3.0, 1, 0)")
        for n, (prompt, latency) in enumerate([("", 5.0), ("What does the noun x mean?", "fast"),
                                               ("What does the noun y mean?", -3.0)]):
            connection.execute(
                "INSERT INTO inference_requests (request_id, created_at, endpoint, model_name, model_version, "
                "prompt, output, status, latency_ms, prompt_tokens, completion_tokens) "
                "VALUES (?, ?, 'completions', 'm', '1', ?, 'out', 200, ?, 1, 1)",
                (f"bad-{n}", "2026-03-07 12:00:00.000000", prompt, latency))
    decision = run(params, 7)
    assert decision["skipped_rows"] == 3 and decision["rows"] == 41 and decision["status"] == "ok"
    assert decision["operational"]["error_rate"] == pytest.approx(1 / 41)


def test_missing_reference_is_a_clear_error(ws, tmp_path):
    params = settings(ws, tmp_path, f"paths.prepared_dir={tmp_path / 'nothing'}")
    with pytest.raises(LLMOpsError, match="no reference for monitoring.*dvc repro prepare"):
        run(params, 1)


def test_mlflow_down_keeps_the_report_and_uploads_it_later(ws, tmp_path):
    params = settings(ws, tmp_path)
    traffic(params, 9, drift_share=0.0)
    down = settings(ws, tmp_path, f"tracking.uri=http://127.0.0.1:{free_port()}", "registry.retries=1")
    decision = run(down, 9)
    folder = tmp_path / "reports" / "2026-03-10T00-00-00Z"
    assert decision["status"] == "ok" and decision["mlflow_run_id"] is None
    assert (folder / "report.html").exists()
    assert json.loads((tmp_path / "reports" / "pending_uploads.json").read_text()) == [{"window": folder.name}]
    run(params, 30)  # the next run, with the server back, uploads the pending report
    assert not (tmp_path / "reports" / "pending_uploads.json").exists()
    assert json.loads((folder / "decision.json").read_text())["mlflow_run_id"]


def test_the_cli_takes_the_logical_date(ws, tmp_path):
    import subprocess
    import sys

    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO / "params.yaml").read_text())
    sets = [x for o in [*ws.overrides, f"monitor.reports_dir={tmp_path / 'reports'}",
                        f"inference_log.url=sqlite:///{tmp_path / 'log.db'}",
                        f"inference_log.spool_dir={tmp_path / 'spool'}",
                        f"monitor.embedding_cache={tmp_path / 'cache' / 'embeddings.npz'}"] for x in ("--set", o)]
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "monitor", "--params", str(params_file), *sets,
                           "--end", "2026-03-02"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no-traffic" in done.stderr
    assert (tmp_path / "reports" / "2026-03-02T00-00-00Z" / "decision.json").exists()
    bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "monitor", "--params", str(params_file), *sets,
                          "--end", "yesterday"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "is not an ISO date" in bad.stderr and "Traceback" not in bad.stderr


def test_end_to_end_through_the_service_drift_requests_a_retrain_and_no_drift_does_not(ws, tmp_path):
    """Traffic sent to a real `llmops serve`, logged by it, reported on by `llmops monitor`."""
    import time

    from pipelines.commands import simulate_traffic
    from pipelines.monitoring.monitor import monitor
    from tests.support import TEST_TOKEN, ServeProcess

    service = ServeProcess(ws, tmp_path / "serve", "serve.limits.default_max_tokens=12").start()
    try:
        import os

        os.environ["LLMOPS_API_TOKEN"] = TEST_TOKEN  # simulate-traffic reads the token as a client would
        params = settings(ws, tmp_path, *service.overrides[len(ws.overrides):], "monitor.retrain.k=1",
                          "monitor.retrain.n=1")
        start = datetime.now(UTC)
        simulate_traffic.main(params, requests=60, drift_share=0.0, url=service.url, seed=1)
        middle = datetime.now(UTC)
        time.sleep(1)
        simulate_traffic.main(params, requests=60, drift_share=1.0, url=service.url, seed=2)
        end = datetime.now(UTC) + timedelta(seconds=1)
        time.sleep(2)  # the service's log writer flushes every second
    finally:
        service.stop()
        os.environ.pop("LLMOPS_API_TOKEN", None)
    calm = monitor(params.model_copy(update={"monitor": params.monitor.model_copy(
        update={"window_hours": (middle - start).total_seconds() / 3600 + 1e-4})}), middle)
    drifted = monitor(params.model_copy(update={"monitor": params.monitor.model_copy(
        update={"window_hours": (end - middle).total_seconds() / 3600})}), end)
    assert calm["rows"] == 60 and drifted["rows"] == 60
    assert calm["drift"]["detected"] is False and calm["retrain"]["requested"] is False
    assert drifted["drift"]["detected"] is True and drifted["retrain"]["requested"] is True
    assert drifted["mlflow_run_id"]
    from pipelines.monitoring.monitor import Window

    assert (tmp_path / "reports" / Window.ending(end, 1).name / "report.html").exists()
