"""`train.objective: dpo` without training: params, pairs, TRL's preference format, the reference model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.config.params import DpoParams, TrainParams, parse_params
from pipelines.errors import ParamsError


def _params(train: dict):
    return parse_params({"ingest": {"sources": [{"kind": "bundled", "name": "wordnet"}]}, "train": train})


# --- params ------------------------------------------------------------------------------

def test_the_default_objective_is_sft_and_the_dpo_knobs_are_trls():
    from trl import DPOConfig

    assert TrainParams().objective == "sft"
    defaults = DPOConfig(output_dir="unused", use_cpu=True)
    ours = DpoParams()
    assert (ours.beta, ours.loss_type, ours.loss_weights, ours.label_smoothing) == (
        defaults.beta, defaults.loss_type, defaults.loss_weights, defaults.label_smoothing)
    assert _params({"objective": "dpo", "dpo": {"loss_type": "ipo"}}).train.dpo.loss_type == ["ipo"]


@pytest.mark.parametrize(("train", "message"), [
    ({"objective": "ppo"}, "train.objective"),
    ({"objective": "dpo", "packing": True}, "train.packing is SFT only"),
    ({"objective": "dpo", "completion_only_loss": False}, "train.completion_only_loss: false is SFT only"),
    ({"dpo": {"beta": 0}}, "train.dpo.beta"),
    ({"dpo": {"loss_type": "dpo"}}, "train.dpo.loss_type"),
    ({"dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}}, "has 1 weight(s) for 2 loss_type(s)"),
    ({"dpo": {"loss_type": "exo_pair"}}, "needs train.dpo.label_smoothing > 0"),
    ({"dpo": {"min_pairs": 0}}, "train.dpo.min_pairs"),
    ({"dpo": {"rpo_alpha": 1.0}}, "unknown key 'train.dpo.rpo_alpha'"),
])
def test_bad_dpo_params_name_the_key(train, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        _params(train)


def test_a_run_may_choose_the_objective_and_the_dpo_knobs():
    from pipelines.config.params import run_overridable

    assert run_overridable("train.objective") and run_overridable("train.dpo.beta")


# --- which rows are pairs ----------------------------------------------------------------

def test_pairs_are_rows_with_a_rejected_answer_that_differs_from_the_chosen_one(tmp_path):
    import pandas as pd

    from pipelines.training.preference import count_pairs, pair_mask

    frame = pd.DataFrame({"response": ["a", "b", "c", "d", "e"],
                          "rejected": ["x", None, "  ", " d ", "y"]})
    assert list(pair_mask(frame)) == [True, False, False, False, True]
    frame.to_parquet(tmp_path / "with.parquet")
    assert count_pairs(tmp_path / "with.parquet") == 2
    # prepared before reviews existed: no `rejected` column, no pairs
    frame.drop(columns="rejected").to_parquet(tmp_path / "without.parquet")
    assert count_pairs(tmp_path / "without.parquet") == 0
    assert not pair_mask(frame.drop(columns="rejected")).any()


def test_too_few_pairs_are_refused_before_any_work_with_the_count_and_the_fix(tiny_train_params, tmp_path):
    from pipelines.training.loop import plan
    from pipelines.training.preference import TooFewPairs

    params = tiny_train_params(objective="dpo")  # the tiny splits have no `rejected` column
    with pytest.raises(TooFewPairs, match=re.escape(
            f"{params.paths.prepared_dir / 'train.parquet'} holds 0 preference pair(s) (rows with a `rejected` "
            "answer), fewer than train.dpo.min_pairs=16; collect more reviews")):
        plan(params)
    assert not params.train.checkpoint_dir.exists()
    plan(tiny_train_params())  # sft trains on every row


def test_a_sample_cap_below_min_pairs_is_named_in_the_error(tmp_path):
    from pipelines.training.preference import TooFewPairs, check_enough_pairs

    check_enough_pairs(20, Path("train.parquet"), 16, None)
    with pytest.raises(TooFewPairs, match=r"holds 20 preference pair\(s\) \(train.max_train_samples caps them at 8\)"):
        check_enough_pairs(20, Path("train.parquet"), 16, 8)


# --- TRL's preference format and the reference model -------------------------------------

def _pair_frames(params, pairs: int = 6):
    import pandas as pd

    frames = {}
    for split in ("train", "validation"):
        frame = pd.read_parquet(params.paths.prepared_dir / f"{split}.parquet").head(pairs)
        frames[split] = frame.assign(rejected=list(frame["response"].iloc[1:]) + [frame["response"].iloc[0]])
    return frames


def _dpo_trainer(params, frames):
    from transformers import AutoTokenizer

    from pipelines.training import loop, preference

    the_plan = loop.plan(params.model_copy(update={"train": params.train.model_copy(
        update={"dpo": params.train.dpo.model_copy(update={"min_pairs": 1})})}))
    tokenizer = AutoTokenizer.from_pretrained(the_plan.base_dir)
    model = loop.load_model(the_plan.base_dir, params.train, "fp32")
    args = loop.training_arguments(params.train, False, "fp32")
    datasets = {split: preference.dpo_dataset(frame, tokenizer.eos_token) for split, frame in frames.items()}
    return loop.build_trainer(params, the_plan, model, tokenizer, frames, datasets, args, []), tokenizer


def test_pairs_go_to_trl_as_conversations_and_tokenize_as_serving_renders_them(tiny_train_params, monkeypatch):
    from pipelines.training import preference

    monkeypatch.setattr(preference, "count_pairs", lambda path: 6)
    params = tiny_train_params(objective="dpo")
    frames = _pair_frames(params)
    dataset = preference.dpo_dataset(frames["train"], "<|im_end|>")
    row = dataset[0]
    assert [turn["role"] for turn in row["prompt"]] == ["system", "user"]
    assert row["chosen"] == [{"role": "assistant", "content": frames["train"]["response"][0]}]
    assert row["rejected"] == [{"role": "assistant", "content": frames["train"]["response"][1]}]

    (trainer, stats), tokenizer = _dpo_trainer(params, frames)
    tokenized = trainer.train_dataset[0]
    prompt_ids = tokenizer(frames["train"]["prompt_text"][0], add_special_tokens=False)["input_ids"]
    assert tokenized["prompt_ids"] == prompt_ids
    text = frames["train"]["prompt_text"][0] + frames["train"]["completion_text"][0]
    assert tokenized["prompt_ids"] + tokenized["chosen_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokenized["rejected_ids"]).startswith(frames["train"]["response"][1])
    assert stats["train"]["examples"] == stats["validation"]["examples"] == 6


def test_a_chat_template_that_renders_pairs_differently_from_prepare_is_refused(tiny_train_params, monkeypatch):
    from pipelines.training import preference
    from pipelines.training.loop import TemplateMismatch

    monkeypatch.setattr(preference, "count_pairs", lambda path: 6)
    params = tiny_train_params(objective="dpo")
    frames = _pair_frames(params)
    frames["train"] = frames["train"].assign(prompt_text=frames["train"]["prompt_text"].str.replace(
        "<|im_start|>assistant\n", "<|im_start|>assistant\n\n", regex=False))
    with pytest.raises(TemplateMismatch, match=r"TRL's tokens of 6 of 6 train preference pairs differ"):
        _dpo_trainer(params, frames)


def test_the_reference_is_the_base_model_with_the_adapter_disabled(tiny_train_params, monkeypatch):
    """TRL, given the plain model and the LoRA config, wraps it itself and scores the reference with
    the adapter disabled: no reference copy in memory, no second adapter; after the adapter moved,
    the reference log-probabilities are still the base model's."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.training import preference

    monkeypatch.setattr(preference, "count_pairs", lambda path: 6)
    params = tiny_train_params(objective="dpo")
    (trainer, _), _ = _dpo_trainer(params, _pair_frames(params))
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]  # no "ref" copy of the adapter

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))  # as if trained
    trainer.model.eval()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    base = AutoModelForCausalLM.from_pretrained(params.base_model.output_dir).eval()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logits = base(**inputs).logits[:, :-1]
        policy_logits = trainer.model(**inputs).logits[:, :-1]
    target = labels[:, 1:]
    mask = target != -100

    def sequence_logps(scores):
        logps = torch.log_softmax(scores.float(), -1).gather(2, target.clamp(min=0)[..., None])[..., 0]
        return (logps * mask).sum(1)

    expected = sequence_logps(logits)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), expected, atol=1e-4)
    assert not torch.allclose(sequence_logps(policy_logits), expected, atol=1e-2)  # the adapter does act
