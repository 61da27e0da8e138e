"""Stage `train` with `train.objective: dpo` end to end on the tiny model (TRL's DPOTrainer, LoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TRAIN_PAIRS = 8
VALIDATION_PAIRS = 4


def with_pairs(tiny_prepared_dir: Path, directory: Path, train_pairs: int = TRAIN_PAIRS,
               validation_pairs: int = VALIDATION_PAIRS) -> Path:
    """The tiny prepared splits with a `rejected` answer on the first rows of train and validation
    (the definition of a word from further down the split: fluent, and wrong for this word, and
    never a chosen answer of another pair); null on every other row."""
    import pandas as pd

    directory.mkdir(parents=True, exist_ok=True)
    for split, pairs in (("train", train_pairs), ("validation", validation_pairs), ("test", 0)):
        frame = pd.read_parquet(tiny_prepared_dir / f"{split}.parquet")
        others = list(frame["response"].iloc[len(frame) // 2:len(frame) // 2 + pairs])
        frame["rejected"] = pd.Series(others + [None] * (len(frame) - len(others)), dtype="object")
        frame.to_parquet(directory / f"{split}.parquet", index=False)
    return directory


def dpo_params(tiny_train_params, prepared: Path, **train):
    section = {"objective": "dpo", "dpo": {"min_pairs": 4}, "learning_rate": 1e-2, "max_steps": 16,
               "eval_steps": 4, "save_steps": 4, "per_device_train_batch_size": 4, **train}
    params = tiny_train_params(**section)
    return params.model_copy(update={"paths": params.paths.model_copy(update={"prepared_dir": prepared})})


def answer_logps(model, tokenizer, frame) -> tuple[list[float], list[float]]:
    """Sum of the log-probabilities of each pair's chosen and rejected answer tokens after its prompt,
    rendered with the tokenizer's chat template as evaluation and serving render them."""
    import torch

    def score(prompt_messages, answer):
        prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt_messages + [{"role": "assistant", "content": answer}],
                                             tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert ids[:len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        logps = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        return float(logps[len(prompt_ids) - 1:].sum())

    chosen, rejected = [], []
    for messages, answer, other in zip(frame["prompt_messages"], frame["response"], frame["rejected"]):
        messages = [dict(turn) for turn in messages]
        chosen.append(score(messages, answer))
        rejected.append(score(messages, other))
    return chosen, rejected


def test_dpo_run_trains_on_the_pairs_and_the_model_prefers_the_chosen_answers_more(tiny_train_params,
                                                                                   tiny_prepared_dir, tmp_path):
    import mlflow
    import pandas as pd
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.stages.train import main

    prepared = with_pairs(tiny_prepared_dir, tmp_path / "prepared")
    params = dpo_params(tiny_train_params, prepared, merge=True)
    main(params)

    train = params.train
    assert (train.adapter_dir / "adapter_model.safetensors").is_file()
    assert not (train.adapter_dir / "ref").exists()  # no second ("ref") adapter saved beside ours
    assert not list(train.checkpoint_dir.glob("checkpoint-*"))
    metrics = json.loads(params.paths.metrics("train").read_text())
    assert metrics["objective"] == "dpo" and metrics["steps"] == 16
    assert metrics["train_examples"] == TRAIN_PAIRS and metrics["eval_examples"] == VALIDATION_PAIRS
    assert metrics["gate_reloaded_loss"] == pytest.approx(metrics["gate_reference_loss"], rel=1e-4)
    assert metrics["eval_loss"] is not None
    assert metrics["rewards/margins"] > 0 and metrics["logps/chosen"] < 0  # TRL's last logged values

    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["objective"] == "dpo"
    assert run.data.params["train.objective"] == "dpo" and run.data.params["train.dpo.beta"] == "0.1"
    for key in ("rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "eval_rewards/margins", "eval_logps/chosen"):
        assert key in run.data.metrics, (key, sorted(run.data.metrics))
    assert len(client.get_metric_history(run.info.run_id, "rewards/margins")) == 16
    assert {m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")} == {4, 8, 12, 16}
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"train", "validation"}

    # The honest check, outside TRL: on the training pairs, the trained model's log-probability
    # margin (chosen - rejected answer) grows over the base model's, pair by pair on average.
    tokenizer = AutoTokenizer.from_pretrained(params.base_model.output_dir)
    frame = pd.read_parquet(prepared / "train.parquet").head(TRAIN_PAIRS)
    base = AutoModelForCausalLM.from_pretrained(params.base_model.output_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(train.merged_dir).eval()
    base_chosen, base_rejected = answer_logps(base, tokenizer, frame)
    chosen, rejected = answer_logps(merged, tokenizer, frame)
    before = [c - r for c, r in zip(base_chosen, base_rejected)]
    after = [c - r for c, r in zip(chosen, rejected)]
    gains = [a - b for a, b in zip(after, before)]
    assert sum(gains) / len(gains) > 2.0, (before, after)  # nats; 3.8 when written, 0 untrained
    assert all(gain > 0 for gain in gains), (before, after)

    # the merged model is the reloaded adapter on the base, and the adapter is what DPO trained
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, train.adapter_dir).eval()(ids).logits
        assert torch.allclose(adapted, merged(ids).logits, atol=1e-4)


def test_without_validation_pairs_dpo_trains_without_evaluation_and_gates_on_train_pairs(tiny_train_params,
                                                                                       tiny_prepared_dir, tmp_path):
    import mlflow

    from pipelines.stages.train import main

    prepared = with_pairs(tiny_prepared_dir, tmp_path / "prepared", validation_pairs=0)
    params = dpo_params(tiny_train_params, prepared, max_steps=4, save_steps=4)
    main(params)
    metrics = json.loads(params.paths.metrics("train").read_text())
    assert metrics["steps"] == 4 and metrics["eval_examples"] == 0 and metrics["eval_loss"] is None
    assert metrics["gate_reloaded_loss"] == pytest.approx(metrics["gate_reference_loss"], rel=1e-4)
    assert "rewards/margins" in metrics and not any(key.startswith("eval_rewards") for key in metrics)
    run = mlflow.MlflowClient(tracking_uri=params.tracking.uri).get_run(metrics["mlflow_run_id"])
    assert "eval_loss" not in run.data.metrics
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"train"}


def test_an_interrupted_dpo_run_resumes_from_its_last_complete_checkpoint(tiny_train_params, tiny_prepared_dir,
                                                                          tmp_path, monkeypatch):
    """Stopped after step 6 (checkpoint-4 complete), started again: it resumes at step 4, continues the
    same MLflow run and ends where an uninterrupted run ends."""
    from transformers import TrainerCallback

    from pipelines.stages.train import main
    from pipelines.training import loop
    from pipelines.training.checkpoints import read_run, resume_point

    prepared = with_pairs(tiny_prepared_dir, tmp_path / "prepared")
    common = {"max_steps": 8, "save_steps": 4, "eval_steps": 8}
    reference = dpo_params(tiny_train_params, prepared, **common, adapter_dir=str(tmp_path / "ref" / "adapter"),
                           checkpoint_dir=str(tmp_path / "ref" / "checkpoints"))
    reference = reference.model_copy(update={"paths": reference.paths.model_copy(
        update={"reports_dir": tmp_path / "ref" / "reports"})})
    main(reference)
    uninterrupted = json.loads(reference.paths.metrics("train").read_text())

    class Stopped(Exception):
        pass

    class StopAtSix(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step == 6:
                raise Stopped

    callbacks = loop._callbacks
    monkeypatch.setattr(loop, "_callbacks", lambda train: [*callbacks(train), StopAtSix()])
    params = dpo_params(tiny_train_params, prepared, **common)
    with pytest.raises(Stopped):
        main(params)
    assert not params.train.adapter_dir.exists() and not params.paths.metrics("train").exists()
    assert resume_point(params.train.checkpoint_dir).name == "checkpoint-4"
    run_id = read_run(params.train.checkpoint_dir)["mlflow_run_id"]

    monkeypatch.setattr(loop, "_callbacks", callbacks)
    main(params)
    resumed = json.loads(params.paths.metrics("train").read_text())
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == uninterrupted["steps"] == 8
    assert resumed["mlflow_run_id"] == run_id
    for key in ("train_loss", "eval_loss", "rewards/margins", "eval_rewards/margins"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-4), key


def test_too_few_pairs_stop_the_run_with_one_line_and_leave_nothing(tiny_train_params, tiny_prepared_dir, tmp_path):
    import mlflow

    from pipelines.stages.train import main
    from pipelines.training.preference import TooFewPairs

    prepared = with_pairs(tiny_prepared_dir, tmp_path / "prepared", train_pairs=3)
    params = dpo_params(tiny_train_params, prepared, dpo={"min_pairs": 5})
    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    runs_before = len(client.search_runs([experiment.experiment_id])) if experiment else 0

    with pytest.raises(TooFewPairs) as error:
        main(params)
    message = str(error.value)
    assert "\n" not in message
    assert f"{prepared / 'train.parquet'} holds 3 preference pair(s)" in message
    assert "train.dpo.min_pairs=5" in message
    assert "collect more reviews" in message and "train.objective: sft" in message
    for path in (params.train.adapter_dir, params.train.merged_dir, params.train.checkpoint_dir,
                 params.paths.metrics("train"), params.paths.reports_dir / "train"):
        assert not path.exists(), path
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    assert (len(client.search_runs([experiment.experiment_id])) if experiment else 0) == runs_before


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_deepspeed_cpu_ranks_train_dpo_and_pass_the_adapter_gate(tiny_train_params, tiny_prepared_dir, tmp_path,
                                                                     zero):
    from pipelines.stages.train import main
    from tests.support import free_port

    prepared = with_pairs(tiny_prepared_dir, tmp_path / "prepared")
    params = dpo_params(tiny_train_params, prepared, max_steps=4, eval_steps=4, save_steps=4,
                        per_device_train_batch_size=2,
                        deepspeed={"config": str(REPO / "configs" / "deepspeed" / f"{zero}.json"),
                                   "num_processes": 2, "master_port": free_port()})
    main(params)
    metrics = json.loads(params.paths.metrics("train").read_text())
    assert metrics["objective"] == "dpo" and metrics["world_size"] == 2 and metrics["steps"] == 4
    assert metrics["gate_reloaded_loss"] == pytest.approx(metrics["gate_reference_loss"], rel=0.02)
    assert "rewards/margins" in metrics
