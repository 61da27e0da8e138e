"""Register, gate, promote, rollback and lineage against a real `mlflow server` process."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pandas as pd
import pytest

from tests.support import REPO, Workspace, build_adapter, build_tiny_base, evaluation, register

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(mlflow_server):
    return mlflow_server


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_base(tmp_path_factory.mktemp("base") / "base", tiny_tokenizer_dir)


@pytest.fixture
def model_name():
    return f"test-{uuid.uuid4().hex[:8]}"


def test_register_logs_a_servable_model_with_its_evidence(tmp_path, tiny_base, server, model_name):
    import mlflow

    from pipelines.lineage import lineage
    from pipelines.registry import Registry

    ws = Workspace(tmp_path, tiny_base, server.uri, model_name)
    version = register(ws, evaluation(0.02))
    assert version == "1"
    record = lineage(ws.params(), version)
    assert record["aliases"] == ["challenger"]
    tags = record["tags"]
    assert tags["base_model.licence"] == "Apache-2.0" and tags["validation.pass_rate"] == "1.0"
    assert len(tags["git_commit"]) == 40 and len(tags["params_sha256"]) == 64
    assert "## Evidence" in record["description"] and "| rouge_l |" in record["description"]
    assert Registry(ws.params()).alias("challenger").version == "1"

    mlflow.set_tracking_uri(server.uri)
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@challenger")
    out = model.predict([{"prompt": 'What does the noun "bank" mean?'}], params={"max_new_tokens": 4})
    assert list(out.columns) == ["response"] and isinstance(out["response"][0], str)


def test_gate_pass_fail_force_rollback_and_lineage(tmp_path, tiny_base, server, model_name):
    from pipelines import promote, rollback
    from pipelines.registry import Registry

    ws = Workspace(tmp_path, tiny_base, server.uri, model_name)
    registry = Registry(ws.params())
    decision_file = ws.root / "reports/promote/decision.json"

    v1 = register(ws, evaluation(0.02))
    promote.main(ws.params())
    assert registry.alias("champion").version == v1
    assert json.loads(decision_file.read_text())["promoted"] == 1

    v2 = register(ws, evaluation(-0.05, champion_version=v1))  # gate fails: does not beat base
    promote.main(ws.params())  # a failed gate is a result, not a crash
    assert registry.alias("champion").version == v1
    decision = json.loads(decision_file.read_text())
    assert decision["promoted"] == 0 and decision["checks"]["beats_base"]["passed"] == 0
    tags = registry.version(v2).tags
    assert tags["promotion.status"] == "rejected" and "lower bound must exceed" in tags["promotion.reasons"]
    assert "NOT PROMOTED" in registry.version(v2).description

    v3 = register(ws, evaluation(0.03, champion_version=v1))
    promote.main(ws.params())
    assert registry.alias("champion").version == v3
    assert registry.alias("previous-champion").version == v1

    rollback.rollback(ws.params(), reason="canary failed")
    assert registry.alias("champion").version == v1
    assert registry.version(v3).tags["rollback.reason"] == "canary failed"
    assert registry.version(v3).tags["promotion.status"] == "rolled-back"
    rollback.rollback(ws.params(), reason="again")  # safe to run twice
    assert registry.alias("champion").version == v1

    # A human forces v2 through, with the reason recorded.
    ws.set_evaluation(evaluation(-0.05, champion_version=v1))
    (ws.root / "reports/register/version.json").write_text(json.dumps({"version": v2}))
    promote.main(ws.params(), force=True, reason="hotfix approved by reviewer")
    assert registry.alias("champion").version == v2
    tags = registry.version(v2).tags
    assert tags["promotion.forced_reason"] == "hotfix approved by reviewer" and tags["promotion.forced_by"]

    shown = ws.cli("lineage", v2)
    assert shown.returncode == 0, shown.stderr
    assert "aliases: champion" in shown.stdout and "promotion.forced_reason" in shown.stdout

    back = ws.cli("rollback", "--to", v3, "--reason", "named version")
    assert back.returncode == 0, back.stderr
    assert registry.alias("champion").version == v3


def test_concurrent_promotions_end_on_exactly_one_version(tmp_path, tiny_base, server, model_name):
    from pipelines.registry import Registry

    a = Workspace(tmp_path / "a", tiny_base, server.uri, model_name, seed=1)
    b = Workspace(tmp_path / "b", tiny_base, server.uri, model_name, seed=2)
    va, vb = register(a, evaluation(0.02)), register(b, evaluation(0.02))
    command = [sys.executable, "-m", "pipelines.cli", "promote", "--params"]
    procs = [subprocess.Popen([*command, str(ws.params_file), *[x for o in ws.overrides for x in ("--set", o)]],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for ws in (a, b)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    registry = Registry(a.params())
    champion = registry.alias("champion").version
    assert champion in {va, vb}
    loser = vb if champion == va else va
    tags = registry.version(loser).tags
    assert tags["promotion.status"] == "rejected"
    assert "champion changed from none to v" in tags["promotion.reasons"]
    assert f"{model_name}--promotion-lock" not in [m.name for m in registry.client.search_registered_models()]


def test_server_down_is_a_clear_error_and_registers_nothing(tmp_path, tiny_base, model_name):
    from pipelines.register import register as register_model
    from pipelines.registry import RegistryUnavailable
    from tests.support import free_port

    ws = Workspace(tmp_path, tiny_base, f"http://127.0.0.1:{free_port()}", model_name)
    ws.set_evaluation(evaluation(0.02))
    params = ws.params("registry.retries=2", "registry.retry_wait_seconds=0.1")
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        register_model(params)
    assert not (ws.root / "reports/register/version.json").exists()


def test_bad_input(tmp_path, tiny_base, server, model_name, tiny_tokenizer_dir):
    from pipelines.errors import DataError
    from pipelines.lm import AdapterMismatch, CausalLM
    from pipelines.register import register as register_model

    ws = Workspace(tmp_path, tiny_base, server.uri, model_name)
    ws.set_evaluation(evaluation(0.02))
    with pytest.raises(DataError, match="no trained adapter in .*; run `llmops train` first"):
        register_model(ws.params(f"train.adapter_dir={tmp_path / 'none'}"))

    other_base = build_tiny_base(tmp_path / "other", tiny_tokenizer_dir, hidden=32, intermediate=64)
    with pytest.raises(AdapterMismatch, match="does not fit the base model"):
        CausalLM.load(other_base, ws.adapter, dtype="float32")

    result = ws.cli("register", "--set", "registry.model_name=bad/name")
    assert result.returncode == 2
    assert "registry.model_name: an MLflow registered model name must not" in result.stderr


def test_evaluate_compares_with_the_champion_from_the_registry(tmp_path, tiny_base, server, model_name,
                                                               tiny_prepared_dir):
    from pipelines import evaluate, promote

    ws = Workspace(tmp_path, tiny_base, server.uri, model_name, seed=3)
    register(ws, evaluation(0.02))
    promote.main(ws.params())
    ws.adapter = build_adapter(tmp_path / "adapter2", tiny_base, seed=4)
    params = ws.params(f"train.adapter_dir={ws.adapter}", f"paths.prepared_dir={tiny_prepared_dir}",
                       "evaluate.max_examples=24", "evaluate.bootstrap_samples=60", "evaluate.min_slice_size=3",
                       "evaluate.decoding.max_new_tokens=6", "evaluate.sample_size=5",
                       "evaluate.slices=[response_length]")
    evaluate.main(params)
    results = json.loads((ws.root / "reports/evaluate/results.json").read_text())
    assert results["champion_version"] == "1"
    assert set(results["systems"]) == {"candidate", "base", "champion"}
    assert set(results["comparisons"]) == {"base", "champion"}
    for comparison in results["comparisons"].values():
        rouge = comparison["rouge_l"]
        assert rouge["low"] <= rouge["improvement"] <= rouge["high"]
    assert any("champion" in entry for values in results["slices"].values() for entry in values.values())
    samples = pd.read_csv(ws.root / "reports/evaluate/samples.csv")
    assert list(samples.columns) == ["id", "prompt", "reference", "candidate", "base", "champion"] and len(samples) == 5
    metrics = json.loads((ws.root / "reports/evaluate/metrics.json").read_text())
    assert "vs_champion" in metrics and "vs_base" in metrics

    import mlflow

    run = mlflow.MlflowClient(server.uri).get_run(results["mlflow_run_id"])
    assert "candidate.rouge_l" in run.data.metrics and run.data.tags["evaluate.champion_version"] == "1"
    artifacts = {a.path for a in mlflow.MlflowClient(server.uri).list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/samples.json" in artifacts
