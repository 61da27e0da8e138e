"""Stage `train` end to end on the tiny model: one process, DeepSpeed CPU ranks, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _mlflow_run(uri: str, run_id: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    return client, client.get_run(run_id)


def test_train_writes_adapter_reports_merged_model_and_an_mlflow_run(tiny_train_params):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.training.loop import main

    params = tiny_train_params(merge=True)
    main(params)

    train = params.train
    assert (train.adapter_dir / "adapter_model.safetensors").is_file()
    assert not (train.adapter_dir / "training_args.bin").exists()
    assert not list(train.checkpoint_dir.glob("checkpoint-*"))  # cleared after success
    metrics = json.loads(params.paths.metrics("train").read_text())
    assert metrics["steps"] == 12 and metrics["world_size"] == 1 and metrics["precision"] == "fp32"
    assert metrics["gate_reloaded_loss"] == pytest.approx(metrics["gate_reference_loss"], rel=1e-4)
    reports = params.paths.reports_dir / "train"
    assert len((reports / "train_loss.csv").read_text().splitlines()) == 1 + 12
    assert (reports / "eval_loss.csv").read_text().splitlines()[1:] != []

    # the merged model is base + adapter in one
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    base = AutoModelForCausalLM.from_pretrained(params.base_model.output_dir)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, train.adapter_dir).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(train.merged_dir).eval()(ids).logits
    assert torch.allclose(adapted, merged, atol=1e-4)

    client, run = _mlflow_run(params.tracking.uri, metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lora.r"] == "8" and run.data.params["precision_resolved"] == "fp32"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 12
    assert {m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")} == {6, 12}
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    assert run.data.tags["mlflow.source.git.commit"]
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation"}
    assert {t.key: t.value for t in inputs["train"].tags}["mlflow.data.context"] == "training"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "adapter")]
    assert "adapter/adapter_model.safetensors" in artifacts


def test_bf16_on_cpu_trains_under_autocast_and_passes_the_gate(tiny_train_params):
    from pipelines.training.loop import main

    params = tiny_train_params(precision="bf16", max_steps=4, eval_steps=4, save_steps=4)
    main(params)
    metrics = json.loads(params.paths.metrics("train").read_text())
    assert metrics["precision"] == "bf16" and metrics["steps"] == 4
    assert metrics["gate_reloaded_loss"] == pytest.approx(metrics["gate_reference_loss"], rel=0.02)


def test_packed_training_passes_the_adapter_gate(tiny_train_params):
    """train.packing: TRL packs examples into max_length sequences (padding-free batches)."""
    from pipelines.training.loop import main

    params = tiny_train_params(packing=True, max_length=256, max_steps=4, eval_steps=4, save_steps=4)
    main(params)
    metrics = json.loads(params.paths.metrics("train").read_text())
    assert metrics["steps"] == 4 and metrics["train_examples"] == 400
    assert metrics["gate_reloaded_loss"] == pytest.approx(metrics["gate_reference_loss"], rel=1e-4)


def test_nan_loss_stops_the_run_without_an_adapter(tiny_train_params, monkeypatch):
    import torch

    import pipelines.training.loop as train_stage

    load = train_stage.load_model

    def poisoned(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.get_input_embeddings().weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(train_stage, "load_model", poisoned)
    params = tiny_train_params()
    with pytest.raises(train_stage.TrainingDiverged, match=r"loss became nan at step 1; no adapter was written"):
        train_stage.main(params)
    assert not params.train.adapter_dir.exists()
    assert not params.paths.metrics("train").exists()
    assert not list(params.train.adapter_dir.parent.glob(".adapter*"))  # no staging leftovers
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("llmops").experiment_id],
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_deepspeed_cpu_ranks_train_and_pass_the_adapter_gate(tiny_train_params, zero):
    from pipelines.model.adapter_gate import adapter_tensor_problems
    from pipelines.training.loop import main

    params = tiny_train_params(deepspeed={"config": str(REPO / "configs" / "deepspeed" / f"{zero}.json"),
                                          "num_processes": 2, "master_port": free_port()})
    main(params)

    metrics = json.loads(params.paths.metrics("train").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 12
    assert metrics["gate_reloaded_loss"] == pytest.approx(metrics["gate_reference_loss"], rel=0.02)
    from pipelines.model.adapter_gate import expected_shapes
    from pipelines.training.loop import meta_model

    expected = expected_shapes(meta_model(params.base_model.output_dir), params.train.lora.target_modules, 8)
    assert adapter_tensor_problems(params.train.adapter_dir, expected) == ([], 16)


def _write_params(params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    return path


def _llmops(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_complete_checkpoint_and_ends_like_an_uninterrupted_one(
        tiny_train_params, tmp_path):
    from pipelines.training.checkpoints import MARKER, read_run, resume_point
    from pipelines.training.loop import main

    common = {"max_steps": 80, "save_steps": 10, "eval_steps": 40, "per_device_train_batch_size": 8}

    reference = tiny_train_params(**common, adapter_dir=str(tmp_path / "ref" / "adapter"),
                                  checkpoint_dir=str(tmp_path / "ref" / "checkpoints"))
    reference = reference.model_copy(update={"paths": reference.paths.model_copy(
        update={"reports_dir": tmp_path / "ref" / "reports"})})
    main(reference)
    uninterrupted = json.loads(reference.paths.metrics("train").read_text())

    params = tiny_train_params(**common)
    params_file = _write_params(params, tmp_path / "params.yaml")
    checkpoints = params.train.checkpoint_dir
    first = _llmops("train", "--params", str(params_file))
    deadline = time.monotonic() + 300
    while not (checkpoints / "checkpoint-20" / MARKER).exists():
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "no complete checkpoint-20 within 300 s"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not params.train.adapter_dir.exists()
    killed_at = resume_point(checkpoints)
    assert killed_at is not None and killed_at.name != "checkpoint-80"
    run_id = read_run(checkpoints)["mlflow_run_id"]

    # a checkpoint half-written when the process died must be ignored and removed
    half = checkpoints / "checkpoint-70"
    half.mkdir(exist_ok=True)
    (half / "adapter_model.safetensors").write_bytes(b"partial")
    (half / "trainer_state.json").write_text('{"global_step": 70, "max_steps": 80}')

    second = _llmops("train", "--params", str(params_file))
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    assert f"resuming from {killed_at}" in output
    assert "removing checkpoint" in output and "checkpoint-70" in output

    resumed = json.loads(params.paths.metrics("train").read_text())
    assert resumed["resumed_from_step"] == int(killed_at.name.split("-")[1])
    assert resumed["steps"] == uninterrupted["steps"] == 80
    assert resumed["mlflow_run_id"] == run_id  # the same MLflow run continues
    assert resumed["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], rel=1e-4)
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_training_is_metered_and_a_plan_over_budget_stops_unless_a_reason_is_given(tiny_train_params, tmp_path):
    """Through `llmops train` (what DVC and Airflow run): the first run records its cost and the
    throughput it measured; the next plan is priced by it, stopped over budget, run with a reason."""
    params = tiny_train_params()
    params_file = _write_params(params, tmp_path / "params.yaml")
    record_path = params.paths.cost("train")

    first = _llmops("train", "--params", str(params_file))
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    record = json.loads(record_path.read_text())
    metrics = json.loads(params.paths.metrics("train").read_text())
    assert record["stage"] == "train" and record["machine"]["kind"] == "cpu"
    assert metrics["tokens_trained"] > 12 * 4  # 12 steps x 4 examples, several tokens each
    assert record["tokens"] == {"trained": metrics["tokens_trained"]}
    assert record["wall_seconds"] >= metrics["runtime_seconds"] > 0  # the stage includes the rank's work
    assert record["core_hours"] == pytest.approx(record["wall_seconds"] / 3600 * record["machine"]["cores"], rel=1e-4)
    assert record["cost"] == pytest.approx(record["core_hours"] * params.cost.prices["cpu"].per_core_hour)
    assert record["budget_estimate"]["tokens"] == pytest.approx(metrics["tokens_trained"], rel=0.35)
    client, run = _mlflow_run(params.tracking.uri, metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_tokens_per_second"] == pytest.approx(metrics["train_tokens_per_second"])
    assert run.data.metrics["cost.cost"] == pytest.approx(record["cost"])
    assert run.data.tags["cost.machine"] == record["machine"]["key"] and run.data.tags["precision"] == "fp32"

    # priced by the measured throughput: over a tiny budget, one line and no training
    stopped = _llmops("train", "--params", str(params_file), "--set", "budget.per_run=0.0000001")
    output, _ = stopped.communicate(timeout=600)
    assert stopped.returncode != 0
    error = [line for line in output.splitlines() if line.startswith("llmops train: error:")]
    assert len(error) == 1 and "Traceback" not in output, output
    assert "over 1e-07 USD" in error[0] and "tokens/s (median of" in error[0] and "budget.override_reason" in error[0]
    assert not record_path.exists()  # the stopped run has no cost record
    assert "Running" not in output and "train: LoRA r=" not in output  # stopped before the weights loaded

    reason = "a fixed-size nightly check"
    forced = _llmops("train", "--params", str(params_file), "--set", "budget.per_run=0.0000001",
                     "--set", f"budget.override_reason={reason}")
    output, _ = forced.communicate(timeout=600)
    assert forced.returncode == 0, output
    record = json.loads(record_path.read_text())
    assert record["budget_override_reason"] == reason and record["budget_per_run"] == 1e-07
    assert record["budget_estimate"]["cost"] > 1e-07 and record["budget_estimate"]["measured_runs"] >= 1
    run_id = json.loads(params.paths.metrics("train").read_text())["mlflow_run_id"]
    _, run = _mlflow_run(params.tracking.uri, run_id)
    assert run.data.tags["cost.budget_override_reason"] == reason
