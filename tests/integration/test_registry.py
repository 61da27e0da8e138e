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

    from pipelines.registry.lineage import lineage
    from pipelines.registry.model_registry import Registry

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


def history(registry, version):
    from pipelines.registry.model_registry import history_of

    return history_of(registry.version(version).tags)


def test_gate_pass_fail_force_rollback_and_lineage(tmp_path, tiny_base, server, model_name, monkeypatch):
    from pipelines.registry import rollback
    from pipelines.registry.model_registry import Registry
    from pipelines.stages import promote

    ws = Workspace(tmp_path, tiny_base, server.uri, model_name)
    registry = Registry(ws.params())
    decision_file = ws.root / "reports/promote/decision.json"

    v1 = register(ws, evaluation(0.02))
    assert registry.version(v1).tags["promotion.status"] == "candidate"
    promote.main(ws.params())
    assert registry.alias("champion").version == v1
    assert json.loads(decision_file.read_text())["promoted"] == 1
    assert registry.version(v1).tags["promotion.status"] == "champion"

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
    # the demoted version no longer says champion; its history says why
    assert registry.version(v1).tags["promotion.status"] == "previous-champion"
    assert history(registry, v1)[-1]["action"] == "demoted"

    # promote again with nothing new (a retry): nothing is appended, the card stays as it was
    card, events = registry.version(v3).description, len(history(registry, v3))
    promote.main(ws.params())
    assert json.loads(decision_file.read_text())["changed"] == 0
    assert registry.version(v3).description == card and len(history(registry, v3)) == events

    rollback.rollback(ws.params(), reason="canary failed")
    assert registry.alias("champion").version == v1
    assert registry.version(v3).tags["rollback.reason"] == "canary failed"
    assert registry.version(v3).tags["promotion.status"] == "rolled-back"
    assert registry.version(v1).tags["promotion.status"] == "champion"
    # the rollback is in both model cards
    assert "| rolled-back |" in registry.version(v3).description and "canary failed" in registry.version(v3).description
    assert "| restored |" in registry.version(v1).description
    events = {v: len(history(registry, v)) for v in (v1, v3)}
    rollback.rollback(ws.params(), reason="again")  # safe to run twice
    assert registry.alias("champion").version == v1
    assert {v: len(history(registry, v)) for v in (v1, v3)} == events

    # A human forces v2 through from an Airflow run they triggered, with the reason recorded.
    monkeypatch.setenv("LLMOPS_TRIGGERED_BY", "alice")
    monkeypatch.setenv("LLMOPS_AIRFLOW_RUN_ID", "manual__2026-01-01")
    ws.set_evaluation(evaluation(-0.05, champion_version=v1))
    (ws.root / "reports/register/version.json").write_text(json.dumps({"version": v2}))
    promote.main(ws.params(), force=True, reason="hotfix approved by reviewer")
    assert registry.alias("champion").version == v2
    tags = registry.version(v2).tags
    assert tags["promotion.forced_reason"] == "hotfix approved by reviewer"
    assert tags["promotion.forced_by"] == "airflow:alice"
    assert json.loads(decision_file.read_text())["decided_by"] == "airflow:alice"
    card = registry.version(v2).description
    assert "forced by airflow:alice" in card and "hotfix approved by reviewer" in card
    assert "airflow:alice (run manual__2026-01-01)" in card
    assert card.count("## Status") == 1 and card.count("## Latest gate decision") == 1

    shown = ws.cli("lineage", v2)
    assert shown.returncode == 0, shown.stderr
    assert "aliases: champion" in shown.stdout and "promotion.forced_reason" in shown.stdout
    assert "forced" in shown.stdout and "by airflow:alice" in shown.stdout

    monkeypatch.delenv("LLMOPS_TRIGGERED_BY")
    monkeypatch.delenv("LLMOPS_AIRFLOW_RUN_ID")
    back = ws.cli("rollback", "--to", v3, "--reason", "named version")
    assert back.returncode == 0, back.stderr
    assert registry.alias("champion").version == v3
    assert registry.version(v2).tags["rollback.by"].startswith("cli:")
    assert registry.version(v3).tags["promotion.status"] == "champion"
    assert "rollback.reason" not in registry.version(v3).tags  # re-promoted: no stale rollback tags
    assert registry.version(v1).tags["promotion.status"] == "retired"  # the rollback passed over it

    # forced a second time: the first forced promotion's who and why stay in the history
    promote.main(ws.params(), force=True, reason="second hotfix")
    assert registry.alias("champion").version == v2
    tags = registry.version(v2).tags
    assert tags["promotion.status"] == "champion" and tags["promotion.forced_reason"] == "second hotfix"
    assert not [k for k in tags if k.startswith("rollback.")]
    forced = [e for e in history(registry, v2) if e["action"] == "forced"]
    assert [e["reason"] for e in forced] == ["hotfix approved by reviewer", "second hotfix"]
    assert [e["by"] for e in forced][0] == "airflow:alice" and forced[1]["by"].startswith("cli:")
    assert registry.version(v3).tags["promotion.status"] == "previous-champion"

    # every status agrees with the aliases
    from pipelines.registry.lineage import lineage

    for version in (v1, v2, v3):
        assert lineage(ws.params(), version)["status_agrees_with_aliases"], version


def test_the_promotion_lock_survives_a_lost_response_and_fences_a_lapsed_holder(tmp_path, server, model_name):
    """Fault injection around a real server: the lock's create goes through, its answer is lost."""
    import time

    import requests

    from pipelines.registry.model_registry import Registry, RegistryBusy

    def ws_params(*extra):
        from pipelines.config.params import load_params

        return load_params(REPO / "params.yaml", [f"tracking.uri={server.uri}", f"registry.model_name={model_name}",
                                                  *extra])

    registry = Registry(ws_params("registry.lock_timeout_seconds=2", "registry.retry_wait_seconds=0.05"))
    real = registry.client.create_registered_model
    lost = []

    def create_then_lose_the_answer(*args, **kwargs):
        result = real(*args, **kwargs)
        if not lost:
            lost.append(True)
            raise requests.exceptions.ConnectionError("connection reset before the response arrived")
        return result

    lock_name = f"{model_name}--promotion-lock"
    registry.client.create_registered_model = create_then_lose_the_answer
    started = time.monotonic()
    with registry.lock("test"):  # before: RegistryBusy after the timeout (the lease blocked for 600 s)
        assert lost and time.monotonic() - started < 2
    assert lock_name not in [m.name for m in registry.client.search_registered_models()]

    # A holder whose lease ran out and was taken over neither writes nor deletes the new holder's lock.
    lapsing = Registry(ws_params("registry.lock_lease_seconds=0.5"))
    other = Registry(ws_params())
    first = lapsing.lock("slow promotion")
    first.__enter__()
    time.sleep(1.0)
    second = other.lock("taking over")
    second.__enter__()
    assert other.client.get_registered_model(lock_name).tags["purpose"] == "taking over"
    with pytest.raises(RegistryBusy, match="lost the registry lock"):
        lapsing.set_alias("champion", "1")
    first.__exit__(None, None, None)
    assert other.client.get_registered_model(lock_name).tags["purpose"] == "taking over"
    second.__exit__(None, None, None)
    assert lock_name not in [m.name for m in other.client.search_registered_models()]


def _git(root, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=root, check=True,
                   capture_output=True)


def test_the_registry_alone_holds_the_evidence(tmp_path, tiny_base, server, model_name, monkeypatch):
    """A clean run gives a clean version; a dirty one names its files; the Data Docs, the training run's
    own duration and the registered model's description are in the registry, not on this disk."""
    import time

    import mlflow

    from pipelines.registry import tracking

    ws = Workspace(tmp_path / "ws", tiny_base, server.uri, model_name)
    docs = ws.root / "reports" / "validate" / "data_docs"
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("<html>expectations: 27 passed</html>")
    # a finished training run, as the train stage leaves it
    train_run = tracking.start_run(ws.params().tracking, "train")
    time.sleep(0.3)
    tracking.end_run()
    client = mlflow.MlflowClient(server.uri)
    trained = client.get_run(train_run).info
    (ws.root / "reports/train/metrics.json").write_text(json.dumps({"mlflow_run_id": train_run, "eval_loss": 1.0}))

    # the checkout register runs in: committed, then what `dvc repro` (core.autostage) leaves behind
    project = tmp_path / "project"
    (project / "pipelines").mkdir(parents=True)
    (project / "pipelines" / "stage.py").write_text("print('stage')\n")
    (project / "params.yaml").write_text(ws.params_file.read_text())
    (project / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: llmops train\n    outs:\n"
                                      "    - path: reports/train/metrics.json\n      md5: a\n")
    _git(project, "init", "-q")
    _git(project, "add", "-A")
    _git(project, "commit", "-q", "-m", "init")
    (project / "dvc.lock").write_text((project / "dvc.lock").read_text().replace("md5: a", "md5: b"))
    _git(project, "add", "dvc.lock")
    monkeypatch.chdir(project)

    time.sleep(1.1)  # so that a reopened run that takes the current time shows it
    clean = register(ws, evaluation(0.02))
    found = client.get_model_version(model_name, clean)
    assert found.tags["git_dirty"] == "false", found.tags.get("git_dirty_files")
    assert "uncommitted changes: false" in found.description

    report = found.tags["validation.report"]
    assert report == f"runs:/{train_run}/validation/data_docs/index.html" and report in found.description
    downloaded = mlflow.artifacts.download_artifacts(artifact_uri=report, tracking_uri=server.uri,
                                                     dst_path=str(tmp_path / "dl"))
    assert "27 passed" in open(downloaded).read()

    again = client.get_run(train_run).info  # the model was added to it; its duration is training's
    assert (again.status, again.start_time, again.end_time) == (trained.status, trained.start_time, trained.end_time)

    model = client.get_registered_model(model_name)
    assert "llmops lineage" in model.description and model.tags["base_model.licence"] == "Apache-2.0"
    assert model.tags["latest_version"] == clean

    (project / "pipelines" / "stage.py").write_text("print('edited, not committed')\n")
    dirty = client.get_model_version(model_name, register(ws, evaluation(0.02)))
    assert dirty.tags["git_dirty"] == "true" and dirty.tags["git_dirty_files"] == "pipelines/stage.py"
    assert "uncommitted changes: true: pipelines/stage.py" in dirty.description


def test_concurrent_promotions_end_on_exactly_one_version(tmp_path, tiny_base, server, model_name):
    from pipelines.registry.model_registry import Registry

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
    from pipelines.registry.model_registry import RegistryUnavailable
    from pipelines.registry.registration import register as register_model
    from tests.support import free_port

    ws = Workspace(tmp_path, tiny_base, f"http://127.0.0.1:{free_port()}", model_name)
    ws.set_evaluation(evaluation(0.02))
    params = ws.params("registry.retries=2", "registry.retry_wait_seconds=0.1")
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        register_model(params)
    assert not (ws.root / "reports/register/version.json").exists()


def test_bad_input(tmp_path, tiny_base, server, model_name, tiny_tokenizer_dir):
    from pipelines.errors import DataError
    from pipelines.model.lm import AdapterMismatch, CausalLM
    from pipelines.registry.registration import register as register_model

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
    from pipelines.stages import evaluate, promote

    ws = Workspace(tmp_path, tiny_base, server.uri, model_name, seed=3)
    register(ws, evaluation(0.02))
    promote.main(ws.params())
    ws.adapter = build_adapter(tmp_path / "adapter2", tiny_base, seed=4)
    params = ws.params(f"train.adapter_dir={ws.adapter}", f"paths.prepared_dir={tiny_prepared_dir}",
                       "evaluate.max_examples=24", "evaluate.bootstrap_samples=60", "evaluate.min_slice_size=3",
                       "evaluate.decoding.max_new_tokens=6", "evaluate.sample_size=5",
                       "evaluate.slices=[response_length]", "evaluate.primary_metric=agreement",
                       "evaluate.min_agreement_tasks=20")
    # v1's reviews, as `llmops review collect` tags them: BERTScore agreed best over enough tasks
    # (semantic similarity's higher bound rests on 3 tasks only)
    from pipelines.registry.model_registry import Registry

    agreement = {"rouge_l": ("0.5500", "0.4000", "30"), "bertscore_f1": ("0.7000", "0.6000", "30"),
                 "semantic_similarity": ("1.0000", "0.4400", "3")}
    Registry(params).tag("1", {f"review.metric_agreement.{metric}.{field}": value
                               for metric, values in agreement.items()
                               for field, value in zip(("rate", "low", "tasks"), values)})
    import time

    started = time.time()
    evaluate.main(params)
    took = time.time() - started
    results = json.loads((ws.root / "reports/evaluate/results.json").read_text())
    assert results["champion_version"] == "1"
    assert results["primary_metric"] == "bertscore_f1" and results["primary_metric_choice"]["source_version"] == "1"
    assert "bertscore_f1 agreed most with the reviewers of v1" in results["primary_metric_choice"]["reason"]
    assert set(results["systems"]) == {"candidate", "base", "champion"}
    # the forgetting check (on by default): lm-eval-harness on the shipped task, candidate vs base
    assert results["forgetting"]["task"] == "llmops_general" and results["forgetting"]["questions"] == 87
    assert set(results["comparisons"]) == {"base", "champion"}
    for comparison in results["comparisons"].values():
        for metric in ("rouge_l", "semantic_similarity", "bertscore_f1"):  # the semantic ones: on by default
            difference = comparison[metric]
            assert difference["low"] <= difference["improvement"] <= difference["high"], (metric, difference)
    for system in results["systems"].values():
        assert -1.0 <= system["semantic_similarity"] <= 1.0 and 0.0 <= system["bertscore_f1"] <= 1.0, system
    assert any("champion" in entry for values in results["slices"].values() for entry in values.values())
    samples = pd.read_csv(ws.root / "reports/evaluate/samples.csv")
    assert list(samples.columns) == ["id", "prompt", "reference", "candidate", "base", "champion"] and len(samples) == 5
    metrics = json.loads((ws.root / "reports/evaluate/metrics.json").read_text())
    assert "vs_champion" in metrics and "vs_base" in metrics
    assert metrics["metric_agreement"]["bertscore_f1"] == {"rate": 0.7, "low": 0.6, "tasks": 30}  # dvc metrics

    import mlflow

    run = mlflow.MlflowClient(server.uri).get_run(results["mlflow_run_id"])
    assert {"candidate.rouge_l", "candidate.semantic_similarity", "champion.bertscore_f1"} <= set(run.data.metrics)
    assert run.data.tags["evaluate.champion_version"] == "1"
    artifacts = {a.path for a in mlflow.MlflowClient(server.uri).list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/samples.json" in artifacts
    # the run is evidence on its own: what it evaluated on, at which commit, and how long it took
    inputs = run.inputs.dataset_inputs
    assert [(i.dataset.name, [t.value for t in i.tags if t.key == "mlflow.data.context"]) for i in inputs] == \
        [("test", ["evaluation"])]
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40 and "git_dirty" in run.data.tags
    duration = (run.info.end_time - run.info.start_time) / 1000
    assert 0.5 * took < duration <= took + 1, (duration, took)  # before: the logging alone, ~0.1 s
