"""Stage `train` pieces without training: data encoding, checks, launch command, checkpoints, gate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipelines.config.params import DeepSpeedParams, TrackingParams, TrainParams, parse_params
from pipelines.errors import LLMOpsError, ParamsError

REPO = Path(__file__).resolve().parents[2]


# --- TRL's encoding: loss only on the completion, as evaluation and serving render it --------

def _sft_trainer(params, frames):
    """The stage's TRL trainer over `frames` (TRL tokenizes them), as run() builds it."""
    from transformers import AutoTokenizer

    from pipelines.training import loop

    the_plan = loop.plan(params)
    tokenizer = AutoTokenizer.from_pretrained(the_plan.base_dir)
    model = loop.add_lora(loop.load_model(the_plan.base_dir, params.train, "fp32"), params.train)
    args = loop.training_arguments(params.train, False, "fp32")
    datasets = {split: loop.sft_dataset(frame) for split, frame in frames.items()}
    return loop.build_trainer(params, the_plan, model, tokenizer, frames, datasets, args, []), tokenizer


def _frames(params):
    import pandas as pd

    return {split: pd.read_parquet(params.paths.prepared_dir / f"{split}.parquet").head(24)
            for split in ("train", "validation")}


def test_trl_masks_the_prompt_and_learns_the_completion_as_serving_renders_it(tiny_train_params):
    """TRL applies the chat template to prepare's messages: the tokens equal those of the rendered
    text (what evaluation and serving send), and exactly the prompt's tokens are masked."""
    from pipelines.model.encoding import IGNORE_INDEX

    params = tiny_train_params(max_length=256)
    frames = _frames(params)
    assert "prompt_messages" in frames["train"].columns  # conversational: TRL's chat-template path
    (trainer, stats), tokenizer = _sft_trainer(params, frames)
    row = trainer.train_dataset[0]
    prompt_ids = tokenizer(frames["train"]["prompt_text"][0], add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(frames["train"]["completion_text"][0], add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt_ids + completion_ids
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert stats["train"] == {"rows": 24, "examples": 24, "dropped_no_completion": 0, "at_max_length": 0,
                              "completion_tokens": sum(
                                  sum(1 for label in labels if label != IGNORE_INDEX)
                                  for labels in trainer.train_dataset["labels"])}


def test_truncation_drops_examples_left_without_a_completion_token(tiny_train_params):
    from transformers import AutoTokenizer

    params = tiny_train_params()
    frames = _frames(params)
    tokenizer = AutoTokenizer.from_pretrained(params.base_model.output_dir)
    prompt_lengths = [len(ids) for ids in tokenizer(list(frames["train"]["prompt_text"]),
                                                      add_special_tokens=False)["input_ids"]]
    cut = sorted(prompt_lengths)[len(prompt_lengths) // 2]  # about half the prompts fill it alone
    params = tiny_train_params(max_length=cut)
    (trainer, stats), _ = _sft_trainer(params, frames)
    full_lengths = [len(ids) for ids in tokenizer([p + c for p, c in zip(frames["train"]["prompt_text"],
                                                                          frames["train"]["completion_text"])],
                                                   add_special_tokens=False)["input_ids"]]
    kept = sum(1 for n in prompt_lengths if n < cut)
    assert 0 < kept < 24
    assert stats["train"]["examples"] == kept and stats["train"]["dropped_no_completion"] == 24 - kept
    assert all(len(ids) <= cut for ids in trainer.train_dataset["input_ids"])
    assert stats["train"]["at_max_length"] == sum(1 for p, n in zip(prompt_lengths, full_lengths) if p < cut <= n)


def test_without_completion_only_loss_the_prompt_is_learned_too(tiny_train_params):
    params = tiny_train_params(completion_only_loss=False)
    (trainer, _), _ = _sft_trainer(params, _frames(params))
    row = trainer.train_dataset[0]
    assert row["labels"] == row["input_ids"]


def test_a_chat_template_that_renders_differently_from_prepare_is_refused(tiny_train_params):
    """The messages and the rendered text disagree (a template changed after prepare): no training."""
    from pipelines.training.loop import TemplateMismatch

    params = tiny_train_params()
    frames = _frames(params)
    frames["train"] = frames["train"].assign(prompt_text=frames["train"]["prompt_text"].str.replace(
        "<|im_start|>assistant\n", "<|im_start|>assistant\n\n", regex=False))
    with pytest.raises(TemplateMismatch, match=r"TRL's tokens of 24 of 24 train examples differ .* prepare.template"):
        _sft_trainer(params, frames)


def test_chat_data_prepared_without_messages_is_refused_with_the_stage_to_rerun(tiny_train_params):
    """Chat-rendered text given to TRL as plain text: TRL appends EOS after the end-of-turn newline."""
    from pipelines.training.loop import TemplateMismatch

    params = tiny_train_params()
    frames = {split: frame.drop(columns=["prompt_messages", "completion_messages"])
              for split, frame in _frames(params).items()}
    with pytest.raises(TemplateMismatch, match=r"appends EOS .* re-run `llmops prepare`"):
        _sft_trainer(params, frames)


def test_alpaca_text_goes_to_trl_as_rendered(tiny_train_params, tiny_tokenizer):
    """Without messages (alpaca, plain), TRL takes the rendered text, which already ends with EOS."""
    from pipelines.config.params import PrepareParams
    from pipelines.data.preparation import format_split

    params = tiny_train_params(max_length=256)
    frames = {split: format_split(frame[["id", "prompt", "response"]],
                                  PrepareParams(template="alpaca"), tiny_tokenizer)
              for split, frame in _frames(params).items()}
    assert "prompt_messages" not in frames["train"].columns
    (trainer, stats), tokenizer = _sft_trainer(params, frames)
    text = frames["train"]["prompt_text"][0] + frames["train"]["completion_text"][0]
    assert trainer.train_dataset[0]["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"][:256]
    assert stats["train"]["examples"] == 24


def test_packing_fills_sequences_and_keeps_the_prompt_masked(tiny_train_params):
    from pipelines.model.encoding import IGNORE_INDEX

    params = tiny_train_params(packing=True, max_length=256)
    (trainer, stats), _ = _sft_trainer(params, _frames(params))
    assert stats["train"]["packed_sequences"] < stats["train"]["examples"] == 24
    assert sum(1 for label in trainer.train_dataset[0]["labels"] if label == IGNORE_INDEX) > 0


def test_a_packed_batch_keeps_its_examples_apart(tiny_base_model_dir):
    """TRL's padding-free batch of two examples scores each as if it were alone (no attention across)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipelines.model.adapter_gate import batch_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_base_model_dir)
    a, b = list(range(5, 25)), list(range(30, 47))
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": a + b, "labels": a + b, "seq_lengths": [len(a), len(b)]}])
    alone = [batch_loss(model, {"input_ids": torch.tensor([x]), "labels": torch.tensor([x])}) for x in (a, b)]
    expected = (alone[0] * (len(a) - 1) + alone[1] * (len(b) - 1)) / (len(a) + len(b) - 2)
    assert batch_loss(model, packed) == pytest.approx(expected, rel=1e-5)


def test_model_loss_is_the_mean_over_completion_tokens_only(tiny_base_model_dir, tiny_tokenizer):
    """The loss evaluation scores (pipelines/model/lm.py) ignores prompt tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.model.encoding import collate, encode_pair

    model = AutoModelForCausalLM.from_pretrained(tiny_base_model_dir).eval()
    example = encode_pair("<|im_start|>user\nDefine dog.<|im_end|>\n<|im_start|>assistant\n",
                          "A domestic animal.<|im_end|>\n", tiny_tokenizer, max_length=128)
    batch = collate([example], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    completion = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[completion], targets[completion])
    assert completion.sum() < len(targets)  # the prompt really is masked out
    assert torch.allclose(loss, expected, atol=1e-5)


# --- params ------------------------------------------------------------------------------

def _params(train: dict) -> dict:
    return {"ingest": {"sources": [{"kind": "bundled", "name": "wordnet"}]}, "train": train}


@pytest.mark.parametrize(("train", "message"), [
    ({"lora": {"r": 0}}, "train.lora.r"),
    ({"precision": "fp8"}, "train.precision"),
    ({"warmup_steps": 2.5}, "train.warmup_steps: a whole number of steps"),
    ({"epochs": 2}, "'train.epochs' is now 'train.num_train_epochs' (the name TRL's SFTConfig"),
    ({"max_seq_length": 64}, "'train.max_seq_length' is now 'train.max_length'"),
    ({"lora": {"alpha": 8}}, "'train.lora.alpha' is now 'train.lora.lora_alpha' (the name peft's LoraConfig"),
    ({"save_total_limit": 1}, "train.save_total_limit"),
    ({"deepspeed": {"num_processes": 0}}, "train.deepspeed.num_processes"),
    ({"lora": {"target_modules": []}}, "train.lora.target_modules"),
    ({"learnig_rate": 1e-4}, "unknown key 'train.learnig_rate'"),
])
def test_bad_train_params_name_the_key(train, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params(_params(train))


def test_params_yaml_train_section_matches_the_code_defaults():
    import yaml

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert TrainParams.model_validate(data["train"]) == TrainParams()


# --- checks on the base model and the machine --------------------------------------------

def test_unknown_target_modules_list_the_modules_that_exist(tiny_base_model_dir):
    from pipelines.training.loop import ModelMismatch, check_target_modules, meta_model

    with pytest.raises(ModelMismatch) as error:
        check_target_modules(["q_proj", "c_attn"], meta_model(tiny_base_model_dir), str(tiny_base_model_dir))
    message = str(error.value)
    assert "c_attn not found in LlamaForCausalLM" in message
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message


def test_max_length_beyond_the_model_context_is_refused(tiny_base_model_dir):
    from pipelines.training.loop import ModelMismatch, check_context, meta_model

    config = meta_model(tiny_base_model_dir).config  # the tiny model has 256 positions
    check_context(256, config, "tiny")
    with pytest.raises(ModelMismatch, match=r"train.max_length is 1024 .* at most 256 positions"):
        check_context(1024, config, "tiny")


def test_qlora_and_fp16_without_cuda_fail_clearly():
    from pipelines.training.loop import HardwareError, check_hardware

    with pytest.raises(HardwareError, match="train.qlora is true but no CUDA GPU"):
        check_hardware(TrainParams(qlora=True), cuda=False)
    with pytest.raises(HardwareError, match="train.precision fp16 needs a CUDA GPU"):
        check_hardware(TrainParams(precision="fp16"), cuda=False)
    check_hardware(TrainParams(precision="bf16"), cuda=False)  # CPU autocast


def test_auto_precision_is_fp32_on_cpu_and_bf16_on_a_gpu_that_has_it():
    from pipelines.training.loop import resolve_precision

    assert resolve_precision("auto", cuda=False) == "fp32"
    assert resolve_precision("auto", cuda=True, cuda_bf16=True) == "bf16"
    assert resolve_precision("auto", cuda=True, cuda_bf16=False) == "fp16"
    assert resolve_precision("bf16", cuda=False) == "bf16"


@pytest.mark.parametrize(("change", "message"), [
    ({"lora": {"target_modules": ["query_key_value"]}}, "query_key_value not found"),
    ({"max_length": 4096}, "at most 256 positions"),
    ({"qlora": True}, "no CUDA GPU"),
    ({"deepspeed": {"config": "configs/deepspeed/zero5.json"}}, "zero5.json does not exist"),
])
def test_plan_rejects_bad_input_before_any_work(tiny_train_params, change, message, monkeypatch):
    from pipelines.training.loop import plan

    monkeypatch.chdir(REPO)  # the configs/ paths are relative to the project
    with pytest.raises(LLMOpsError, match=message):
        plan(tiny_train_params(**change))


def test_plan_names_the_stage_to_run_when_the_base_model_is_missing(tiny_train_params, tmp_path):
    from pipelines.training.loop import plan

    params = tiny_train_params()
    params = params.model_copy(update={"base_model": params.base_model.model_copy(
        update={"output_dir": tmp_path / "no-model"})})
    with pytest.raises(LLMOpsError, match=r"run `llmops base_model`"):
        plan(params)


def test_a_changed_param_changes_the_fingerprint_but_an_output_path_does_not(tiny_train_params, tmp_path):
    from pipelines.training.loop import plan

    base = plan(tiny_train_params()).fingerprint
    assert plan(tiny_train_params(learning_rate=1e-4)).fingerprint != base
    assert plan(tiny_train_params(adapter_dir=str(tmp_path / "elsewhere"))).fingerprint == base


# --- DeepSpeed configs and the launch command --------------------------------------------

@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_shipped_zero_configs_pass_deepspeed_validation(name):
    from pipelines.training.distributed import check_deepspeed_config

    config = check_deepspeed_config(REPO / "configs" / "deepspeed" / f"{name}.json", 8, 1, "fp32", 1.0)
    assert config["zero_allow_untested_optimizer"] is True  # the Trainer's torch AdamW, no CPU-Adam build
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    if name.startswith("zero3"):
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(("config", "message"), [
    ({"zero_optimization": {"stage": 2, "offload_optimiser": {"device": "cpu"}}}, "offload_optimiser"),
    ({"zero_optimization": {"stage": 4}}, "stage"),
])
def test_a_config_deepspeed_rejects_fails_with_its_reason(tmp_path, config, message):
    from pipelines.training.distributed import LaunchError, check_deepspeed_config

    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    with pytest.raises(LaunchError, match=rf"DeepSpeed rejects {path}.*{message}"):
        check_deepspeed_config(path, 8, 1, "fp32", 1.0)


def test_a_config_that_is_not_json_is_refused(tmp_path):
    from pipelines.training.distributed import LaunchError, check_deepspeed_config

    path = tmp_path / "broken.json"
    path.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(LaunchError, match="is not valid JSON"):
        check_deepspeed_config(path, 8, 1, "fp32", 1.0)


def test_launch_command_on_one_cpu_machine():
    from pipelines.training.distributed import launch_command

    command, env = launch_command(DeepSpeedParams(num_processes=2, master_port=29600), ["--params-json", "p.json"],
                                  cuda=False, cpu_count=2, launcher=["deepspeed"])
    assert command == ["deepspeed", "--num_accelerators", "2", "--master_port", "29600",
                       "--master_addr", "127.0.0.1", "--no_local_rank", "--module", "pipelines.training.loop",
                       "--params-json", "p.json"]
    assert "--bind_cores_to_rank" not in command
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1"


def test_launch_command_with_a_hostfile_uses_its_first_host_as_master(tmp_path):
    from pipelines.training.distributed import launch_command

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two CPU nodes\nnode-a slots=4\n\nnode-b slots=4\n")
    command, env = launch_command(DeepSpeedParams(num_processes=4, hostfile=hostfile), [], cuda=True,
                                  cpu_count=8, launcher=["deepspeed"])
    assert command[command.index("--hostfile") + 1] == str(hostfile)
    assert command[command.index("--master_addr") + 1] == "node-a"
    assert command[command.index("--num_accelerators") + 1] == "4"
    assert "DS_ACCELERATOR" not in env  # CUDA machines keep DeepSpeed's own detection


def test_multi_node_launch_command_on_cpu_nodes_with_an_explicit_master(tmp_path):
    from pipelines.training.distributed import launch_command

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=8  # the first host\nworker-2 slots=8\n")
    params = DeepSpeedParams(num_processes=2, hostfile=hostfile, master_addr="10.0.0.5", master_port=29700)
    command, env = launch_command(params, ["--params-json", "p.json"], cuda=False, cpu_count=16,
                                  launcher=["deepspeed"])
    assert command == ["deepspeed", "--num_accelerators", "2", "--master_port", "29700",
                       "--hostfile", str(hostfile), "--master_addr", "10.0.0.5",
                       "--no_local_rank", "--module", "pipelines.training.loop", "--params-json", "p.json"]
    assert env == {"PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "8"}


def test_the_train_stage_launches_the_ranks_on_every_host_of_the_hostfile(tmp_path, monkeypatch):
    """`llmops train` with train.deepspeed.hostfile: the command it runs, its rank arguments and environment."""
    import subprocess

    import torch

    from pipelines.training import loop as train

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-node-1 slots=4\ngpu-node-2 slots=4\n")
    params = parse_params({
        "ingest": {"sources": [{"kind": "bundled", "name": "wordnet"}]},
        "train": {"checkpoint_dir": str(tmp_path / "checkpoints"),
                  "deepspeed": {"config": "configs/deepspeed/zero2.json", "num_processes": 4,
                                "hostfile": str(hostfile)}},
        "tracking": {"uri": "http://mlflow:5000"},
    })
    seen = {}

    def fake_run(command, env, check):
        seen.update(command=command, env=env,
                    params=json.loads((tmp_path / "checkpoints" / "launch-params.json").read_text()))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    # earlier CPU tests in the same process may have set it; the launcher must not add it on GPU hosts
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    train.launch(params)
    command = seen["command"]
    assert command[command.index("--hostfile") + 1] == str(hostfile)
    assert command[command.index("--master_addr") + 1] == "gpu-node-1"
    assert command[command.index("--num_accelerators") + 1] == "4"
    assert command[command.index("--module") + 1] == "pipelines.training.loop"
    rank_args = command[command.index("pipelines.training.loop") + 1:]
    assert rank_args == ["--params-json", str(tmp_path / "checkpoints" / "launch-params.json"),
                         "--error-file", str(tmp_path / "checkpoints" / "launch-error.txt")]
    # every rank reads the same params; the launcher gets this process's environment (DeepSpeed
    # forwards MLFLOW_* and NCCL_* variables to the other hosts itself)
    assert seen["params"]["train"]["deepspeed"]["hostfile"] == str(hostfile)
    assert seen["params"]["tracking"]["uri"] == "http://mlflow:5000"
    assert seen["env"]["MLFLOW_TRACKING_USERNAME"] == "pipeline" and "DS_ACCELERATOR" not in seen["env"]
    assert not (tmp_path / "checkpoints" / "launch-params.json").exists()  # removed after the run


@pytest.mark.parametrize(("text", "message"), [
    ("node-a slots=2\nnode-b\n", "line 2 is 'node-b'"),
    ("node-a slots=2\nnode-a slots=2\n", "lists host node-a twice"),
    ("# nothing\n", "lists no hosts"),
    ("node-a slots=1\n", r"fewer slots on node-a \(1\)"),
])
def test_bad_hostfiles_are_refused(tmp_path, text, message):
    from pipelines.training.distributed import LaunchError, launch_command

    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    with pytest.raises(LaunchError, match=message):
        launch_command(DeepSpeedParams(num_processes=2, hostfile=hostfile), [], cuda=False, cpu_count=2)


def test_only_multi_process_or_deepspeed_runs_relaunch():
    from pipelines.training.distributed import needs_launch

    assert not needs_launch(DeepSpeedParams())
    assert needs_launch(DeepSpeedParams(num_processes=2))
    assert needs_launch(DeepSpeedParams(config=Path("configs/deepspeed/zero2.json")))


# --- checkpoints: only complete ones are resumed -----------------------------------------

def _checkpoint(root: Path, step: int, max_steps: int = 30, complete: bool = True) -> Path:
    from pipelines.training.checkpoints import mark_complete

    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    if complete:
        mark_complete(folder)
    return folder


def test_a_half_written_checkpoint_is_never_resumed(tmp_path):
    from pipelines.training.checkpoints import is_complete, resume_point

    good = _checkpoint(tmp_path, 10)
    unmarked = _checkpoint(tmp_path, 20, complete=False)
    truncated = _checkpoint(tmp_path, 30, max_steps=40)
    (truncated / "adapter_model.safetensors").write_bytes(b"x" * 10)  # marker says 100 bytes
    assert not is_complete(unmarked) and not is_complete(truncated)
    assert resume_point(tmp_path) == good


def test_a_checkpoint_without_trainer_state_is_not_complete(tmp_path):
    from pipelines.training.checkpoints import is_complete

    folder = _checkpoint(tmp_path, 10)
    (folder / "trainer_state.json").unlink()
    assert not is_complete(folder)


def test_the_final_checkpoint_is_not_a_resume_point(tmp_path):
    from pipelines.training.checkpoints import resume_point

    _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 30, max_steps=30)  # resuming there makes the Trainer step past max_steps
    assert resume_point(tmp_path).name == "checkpoint-20"


def test_prepare_resume_cleans_up_and_discards_checkpoints_of_another_run(tmp_path):
    from pipelines.training.checkpoints import list_checkpoints, prepare_resume, read_run

    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20, complete=False)
    assert prepare_resume(tmp_path, "run-a").name == "checkpoint-10"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10"]  # the half-written one is gone
    assert read_run(tmp_path)["fingerprint"] == "run-a"

    assert prepare_resume(tmp_path, "run-b") is None  # other params or data: start afresh
    assert list_checkpoints(tmp_path) == []


# --- adapter sanity gate -----------------------------------------------------------------

def _adapter_file(folder: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_gate_finds_empty_misshapen_missing_and_untrained_lora_tensors(tmp_path):
    import torch

    from pipelines.model.adapter_gate import adapter_tensor_problems

    prefix = "base_model.model.model.layers.0.self_attn"
    expected = {"model.layers.0.self_attn.q_proj": {"lora_A": (4, 64), "lora_B": (64, 4)},
                "model.layers.0.self_attn.v_proj": {"lora_A": (4, 64), "lora_B": (32, 4)}}
    good = {f"{prefix}.q_proj.lora_A.weight": torch.ones(4, 64), f"{prefix}.q_proj.lora_B.weight": torch.ones(64, 4),
            f"{prefix}.v_proj.lora_A.weight": torch.ones(4, 64), f"{prefix}.v_proj.lora_B.weight": torch.ones(32, 4)}
    assert adapter_tensor_problems(_adapter_file(tmp_path / "good", good), expected) == ([], 4)

    empty = {**good, f"{prefix}.q_proj.lora_A.weight": torch.empty(0)}  # what ZeRO-3 saves without gathering
    problems, _ = adapter_tensor_problems(_adapter_file(tmp_path / "empty", empty), expected)
    assert problems == ["model.layers.0.self_attn.q_proj.lora_A is empty (shape (0,))"]

    wrong = {**good, f"{prefix}.v_proj.lora_B.weight": torch.ones(64, 4)}
    problems, _ = adapter_tensor_problems(_adapter_file(tmp_path / "wrong", wrong), expected)
    assert problems == ["model.layers.0.self_attn.v_proj.lora_B has shape (64, 4), expected (32, 4)"]

    missing = {k: v for k, v in good.items() if "v_proj.lora_A" not in k}
    problems, _ = adapter_tensor_problems(_adapter_file(tmp_path / "missing", missing), expected)
    assert problems == ["model.layers.0.self_attn.v_proj.lora_A is missing"]

    untrained = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in good.items()}
    problems, _ = adapter_tensor_problems(_adapter_file(tmp_path / "untrained", untrained), expected)
    assert problems and "initial values" in problems[0]


def test_gate_fails_when_the_reloaded_adapter_does_not_reproduce_the_loss(tiny_base_model_dir, tiny_tokenizer,
                                                                          tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipelines.model.adapter_gate import AdapterCheckFailed, batch_loss, check_adapter
    from pipelines.model.encoding import collate, encode_pair

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # a "trained" adapter that changes the outputs
    model.save_pretrained(tmp_path / "adapter")
    batch = collate([encode_pair("<|im_start|>user\nDefine tree.<|im_end|>\n", "A plant.<|im_end|>\n",
                                 tiny_tokenizer, 64)], tiny_tokenizer.pad_token_id)
    trained_loss = batch_loss(model, batch)

    result, _ = check_adapter(tmp_path / "adapter", tiny_base_model_dir, ["q_proj", "v_proj"], 4, batch,
                              trained_loss, tolerance=0.001)
    assert result.tensors == 8 and result.relative_difference < 1e-5
    with pytest.raises(AdapterCheckFailed, match="not the trained ones"):
        check_adapter(tmp_path / "adapter", tiny_base_model_dir, ["q_proj", "v_proj"], 4, batch,
                      trained_loss * 1.5, tolerance=0.02)


# --- reports and tracking helpers --------------------------------------------------------

def test_log_history_becomes_per_step_csv_tables():
    from pipelines.training.loop import log_history_tables

    history = [{"loss": 2.0, "learning_rate": 1e-3, "grad_norm": 0.5, "step": 1},
               {"eval_loss": 1.9, "step": 1}, {"loss": 1.5, "learning_rate": 5e-4, "grad_norm": 0.4, "step": 2},
               {"train_runtime": 3.0, "step": 2}]
    train_csv, eval_csv = log_history_tables(history)
    assert train_csv.splitlines() == ["step,train_loss,learning_rate,grad_norm", "1,2.0,0.001,0.5",
                                      "2,1.5,0.0005,0.4"]
    assert eval_csv.splitlines() == ["step,eval_loss", "1,1.9"]


def test_tracking_uri_prefers_params_then_env_then_the_embedded_sqlite(monkeypatch, tmp_path):
    from pipelines.registry.tracking import artifact_location, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingParams(), root=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(TrackingParams()) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(TrackingParams(uri="sqlite:////x/m.db")) == "sqlite:////x/m.db"
    assert artifact_location("sqlite:////x/m.db") == "file:///x/mlruns"
    assert artifact_location("http://127.0.0.1:5000") is None


# --- a rank's error reaches `llmops train` as one line -----------------------------------

def test_a_rank_error_is_written_for_the_launcher_and_reraised(tiny_train_params, tmp_path, monkeypatch):
    import sys

    import pipelines.training.distributed as distributed
    import pipelines.training.loop as train_stage

    # a stand-in launcher: behaves like rank 0 failing with a user error
    script = ("import sys; a = sys.argv; p = a[a.index('--error-file') + 1]; "
              "open(p, 'w').write('train: the loss became nan at step 3; no adapter was written'); sys.exit(1)")
    monkeypatch.setattr(distributed, "default_launcher", lambda: [sys.executable, "-c", script])
    params = tiny_train_params(deepspeed={"num_processes": 2})
    with pytest.raises(LLMOpsError, match="^train: the loss became nan at step 3; no adapter was written$"):
        train_stage.launch(params)
    assert not list(params.train.checkpoint_dir.glob("launch-*"))  # params and error files cleaned up


def test_rank_main_writes_user_errors_to_the_error_file(tiny_train_params, tmp_path, monkeypatch, capsys):
    import pipelines.training.loop as train_stage

    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps(tiny_train_params().model_dump(mode="json", by_alias=True)))

    def fail(params):
        raise train_stage.ModelMismatch("train.max_length is too long; lower it")

    monkeypatch.setattr(train_stage, "plan", fail)
    code = train_stage._rank_main(["--params-json", str(params_file), "--error-file", str(tmp_path / "err")])
    assert code == 1
    assert (tmp_path / "err").read_text() == "train.max_length is too long; lower it"
    assert "llmops train: error: train.max_length is too long" in capsys.readouterr().err
