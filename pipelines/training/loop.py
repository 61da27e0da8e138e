"""Stage `train`: LoRA fine-tuning of the base model on the prepared splits.

The library side of the stage `train`; what it reads and writes, and how
it is run: pipelines/stages/train.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.accounting import budget
from pipelines.config.params import Params, TrainParams, parse_params
from pipelines.errors import LLMOpsError
from pipelines.io import atomic_path, atomic_write_json, atomic_write_text, read_parquet, remove_outputs
from pipelines.model.adapter_gate import batch_loss, check_adapter
from pipelines.model.encoding import IGNORE_INDEX
from pipelines.model.sources import file_sha256, read_source_record
from pipelines.registry import tracking
from pipelines.training import checkpoints, distributed, preference, pruning
from pipelines.training.distributed import (
    LaunchError,
    check_deepspeed_config,
    configure_rank_logging,
    in_launched_rank,
    init_cpu_deepspeed_state,
    is_rank_zero,
    launch_command,
    needs_launch,
    parse_hostfile,
)

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

GATE_BATCH = 8  # validation examples in the fixed batch of the adapter sanity gate
DPO_METRIC_PREFIXES = ("rewards/", "logps/")  # TRL's DPO metrics that go to MLflow
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class ModelMismatch(LLMOpsError):
    """The train params do not fit the base model (target modules, context length)."""


class HardwareError(LLMOpsError):
    """The requested precision or quantization needs hardware this machine lacks."""


class TrainingDiverged(LLMOpsError):
    """The loss became NaN or infinite."""


class TemplateMismatch(LLMOpsError):
    """TRL's tokens of an example are not those of the text evaluation and serving render."""


# --- data ----------------------------------------------------------------------------------
#
# TRL does the encoding: it applies the chat template to the messages prepare stored (or
# takes the rendered text of the alpaca/plain templates), masks the prompt out of the loss
# (completion_only_loss), cuts at max_length, drops examples left without a completion token,
# and packs when asked. What TRL cannot know is that evaluation and serving render prompts
# with prepare's function (pipelines/data/templates.py): `check_rendering` holds the two
# equal, token for token, so the model is trained on exactly what it will be sent.

def sft_dataset(frame: pd.DataFrame) -> Any:
    """TRL's prompt-completion dataset of one prepared split, plus the rendered text to check.

    Conversational (TRL applies the tokenizer's chat template) where prepare stored messages;
    the rendered prompt and completion text otherwise (they end with EOS, so TRL adds none)."""
    from datasets import Dataset

    rendered = [p + c for p, c in zip(frame["prompt_text"], frame["completion_text"])]
    if "prompt_messages" in frame.columns:
        prompt = [[dict(turn) for turn in turns] for turns in frame["prompt_messages"]]
        completion = [[dict(turn) for turn in turns] for turns in frame["completion_messages"]]
    else:
        prompt, completion = list(frame["prompt_text"]), list(frame["completion_text"])
    return Dataset.from_dict({"prompt": prompt, "completion": completion, "rendered": rendered,
                              "rendered_prompt": list(frame["prompt_text"])})


def check_rendering(dataset: Any, tokenizer: Any, max_length: int, completion_only_loss: bool, split: str) -> None:
    """Refuse to train when TRL's tokens differ from those of prepare's rendered text.

    For every example TRL kept: input_ids must be the tokens of prompt_text + completion_text
    (cut at max_length), and with completion_only_loss exactly the prompt's tokens masked."""
    if "rendered" not in dataset.column_names:  # packed: TRL keeps only the token columns
        return
    rendered, rendered_prompt = list(dataset["rendered"]), list(dataset["rendered_prompt"])
    full = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    prompts = tokenizer(rendered_prompt, add_special_tokens=False)["input_ids"]
    bad = []
    for row, (ids, labels, want, prompt) in enumerate(zip(dataset["input_ids"], dataset["labels"], full, prompts)):
        masked = sum(1 for label in labels if label == IGNORE_INDEX)
        want_masked = min(len(prompt), max_length) if completion_only_loss else 0
        if ids != want[:max_length] or masked != want_masked:
            bad.append(row)
    if bad:
        if isinstance(dataset[0]["prompt"], list):  # conversational: TRL applied the chat template
            cause = ("the tokenizer's chat template renders the stored messages differently from prepare's "
                     "rendering; set prepare.template: alpaca or plain, or give the base model a chat template "
                     "that renders the generation prompt as a prefix of the answered conversation")
        else:
            cause = ("TRL tokenizes the rendered text differently (it appends EOS to a completion that does not end "
                     "with it); with prepare.template: chat, prepare stores messages for TRL: re-run `llmops "
                     "prepare` (`dvc repro prepare`) to write them")
        raise TemplateMismatch(
            f"train: TRL's tokens of {len(bad)} of {len(full)} {split} examples differ from the tokens of the text "
            f"that evaluation and serving send (first: row {bad[0]}, {rendered_prompt[bad[0]][:60]!r}): {cause}"
        )


def dataset_stats(rows: int, dataset: Any, max_length: int, packing: bool) -> dict[str, Any]:
    """What TRL made of a split: examples kept, cut at max_length, completion tokens."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    stats = {
        "rows": rows,
        "examples": rows if packing else len(dataset),
        "dropped_no_completion": 0 if packing else rows - len(dataset),
        "at_max_length": sum(1 for n in lengths if n == max_length),
        "completion_tokens": sum(sum(1 for label in labels if label != IGNORE_INDEX) for labels in dataset["labels"]),
    }
    if packing:
        stats["packed_sequences"] = len(dataset)
    return stats


def sample_rows(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """At most `limit` rows, a seeded sample kept in the original order (all rows if None)."""
    if limit is None or limit >= len(frame):
        return frame
    return frame.sample(n=limit, random_state=seed).sort_index()


# --- checks on the base model and the machine ----------------------------------------------

def adaptable_module_names(model: Any) -> list[str]:
    """Last name parts of the Linear layers of `model` (what lora.target_modules can name)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def check_target_modules(targets: list[str], model: Any, where: str) -> None:
    available = adaptable_module_names(model)
    missing = [name for name in targets if name not in available]
    if missing:
        raise ModelMismatch(
            f"train.lora.target_modules: {', '.join(missing)} not found in {type(model).__name__} ({where}); "
            f"its Linear layers are: {', '.join(available)}; set train.lora.target_modules to some of these"
        )


def model_context(config: Any) -> tuple[int, str] | None:
    """The model's context length and the config key it comes from."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def check_context(max_length: int, config: Any, where: str) -> None:
    found = model_context(config)
    if found is not None and max_length > found[0]:
        raise ModelMismatch(
            f"train.max_length is {max_length} but the base model in {where} handles at most "
            f"{found[0]} positions ({config.model_type} {found[1]}); set train.max_length <= {found[0]}"
        )


def resolve_precision(precision: str, cuda: bool, cuda_bf16: bool = True) -> str:
    """`auto` -> bf16 on a GPU with bf16 (else fp16), fp32 on CPU; other values unchanged.

    On CPU, LoRA steps of SmolLM2-135M under bf16 autocast measured ~1.7x slower than fp32
    (2 cores, torch 2.13): the skinny matmuls and attention backward lose to fp32.
    """
    if precision != "auto":
        return precision
    if cuda:
        return "bf16" if cuda_bf16 else "fp16"
    return "fp32"


def check_hardware(params: TrainParams, cuda: bool) -> None:
    if params.qlora:
        if not cuda:
            raise HardwareError(
                "train.qlora is true but no CUDA GPU is available: 4-bit QLoRA (bitsandbytes) runs on CUDA only; "
                "set train.qlora: false to train LoRA on the unquantized base model, or run on a CUDA machine"
            )
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise HardwareError("train.qlora is true but bitsandbytes is not installed; "
                                "pip install bitsandbytes, or set train.qlora: false")
    if params.precision == "fp16" and not cuda:
        raise HardwareError("train.precision fp16 needs a CUDA GPU (fp16 mixed precision is GPU-only); "
                            "use train.precision: bf16 or fp32 on CPU")
    if params.precision == "bf16" and cuda:
        import torch

        if not torch.cuda.is_bf16_supported():
            raise HardwareError("train.precision bf16 is not supported by this GPU; use fp16 or fp32")


def meta_model(base_dir: Path) -> Any:
    """The base model's architecture without weights (for checks, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# --- the plan: every check before any work -------------------------------------------------

@dataclass(frozen=True)
class Plan:
    base_dir: Path
    base_sha256: str
    data_sha256: str
    fingerprint: str
    cuda: bool
    precision: str  # resolved: fp32 | bf16 | fp16


def data_files(params: Params) -> dict[str, Path]:
    return {split: params.paths.prepared_dir / f"{split}.parquet" for split in ("train", "validation")}


def plan(params: Params) -> Plan:
    """Check everything a user can get wrong, before loading weights or starting ranks."""
    import torch


    train = params.train
    cuda = torch.cuda.is_available()
    check_hardware(train, cuda)
    precision = resolve_precision(train.precision, cuda, cuda and torch.cuda.is_bf16_supported())
    base_dir = params.base_model.output_dir
    source = read_source_record(base_dir)
    model = meta_model(base_dir)
    check_context(train.max_length, model.config, str(base_dir))
    check_target_modules(train.lora.target_modules, model, str(base_dir))
    if train.deepspeed.config is not None:
        check_deepspeed_config(train.deepspeed.config, train.per_device_train_batch_size,
                               train.gradient_accumulation_steps, precision, train.max_grad_norm)
    if train.deepspeed.hostfile is not None:

        parse_hostfile(train.deepspeed.hostfile)
    hashes = {}
    for split, path in data_files(params).items():
        if not path.is_file():
            raise LLMOpsError(f"{path} not found; run `llmops prepare` (or `dvc repro prepare`) first")
        hashes[split] = file_sha256(path)
    if train.objective == "dpo":
        path = data_files(params)["train"]
        preference.check_enough_pairs(preference.count_pairs(path), path, train.dpo.min_pairs,
                                      train.max_train_samples)
    data_sha256 = checkpoints.fingerprint(hashes)
    result_params = train.model_dump(mode="json", exclude={
        "adapter_dir": True, "merged_dir": True, "checkpoint_dir": True, "merge": True, "sanity_tolerance": True,
        "save_total_limit": True, "dpo": True if train.objective == "sft" else {"min_pairs"}})
    result_params["deepspeed"].pop("master_port", None)
    result_params["deepspeed"].pop("master_addr", None)
    fingerprint = checkpoints.fingerprint(
        {"train": result_params, "base": source["content_sha256"], "data": data_sha256})
    return Plan(base_dir=base_dir, base_sha256=source["content_sha256"], data_sha256=data_sha256,
                fingerprint=fingerprint, cuda=cuda, precision=precision)


# --- training (runs in every rank) ---------------------------------------------------------

def _callbacks(params: TrainParams) -> list[Any]:
    """Callbacks: NaN guard, checkpoint marker, progress log and MLflow (rank 0)."""
    from transformers import TrainerCallback



    class LossGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            for key in ("loss", "eval_loss"):
                value = (logs or {}).get(key)
                if value is not None and not math.isfinite(value):
                    raise TrainingDiverged(
                        f"train: the {key.replace('_', ' ')} became {value} at step {state.global_step}; "
                        f"no adapter was written. Lower train.learning_rate (now {params.learning_rate}), "
                        "keep train.max_grad_norm set, or use train.precision: fp32"
                    )

    class CheckpointMarker(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            distributed.barrier()  # every rank has written its shards
            if state.is_world_process_zero:
                checkpoints.mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
            distributed.barrier()

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if not state.is_world_process_zero or not logs:
                return
            metrics = {}
            if "loss" in logs:
                metrics.update(train_loss=logs["loss"], learning_rate=logs.get("learning_rate", 0.0))
                if "grad_norm" in logs:
                    metrics["grad_norm"] = logs["grad_norm"]
                logger.info("step %d/%d loss=%.4f lr=%.3g", state.global_step, state.max_steps,
                            logs["loss"], logs.get("learning_rate", 0.0))
            if "eval_loss" in logs:
                metrics["eval_loss"] = logs["eval_loss"]
                logger.info("step %d/%d eval_loss=%.4f", state.global_step, state.max_steps, logs["eval_loss"])
            # DPO: TRL's reward and log-prob metrics, under TRL's names (eval_ before those of the validation pairs)
            metrics.update({key: value for key, value in logs.items()
                            if key.removeprefix("eval_").startswith(DPO_METRIC_PREFIXES)})
            if "rewards/margins" in logs:
                logger.info("step %d/%d rewards/margins=%.4f rewards/accuracies=%.2f", state.global_step,
                            state.max_steps, logs["rewards/margins"], logs.get("rewards/accuracies", math.nan))
            if metrics:
                tracking.log_metrics(metrics, step=state.global_step)

    callbacks = [LossGuard(), CheckpointMarker(), Progress()]
    sweep_trial = pruning.trial_spec()  # a trial of `llmops sweep`: report eval losses, stop when pruned
    if sweep_trial is not None:
        callbacks.append(pruning.pruning_callback(sweep_trial))
    return callbacks


def _trainer_class(objective: str = "sft") -> Any:
    """TRL's SFTTrainer (or DPOTrainer for objective dpo), with two CPU adjustments.

    - bf16 on CPU: TrainingArguments(bf16=True) needs use_cpu=True, which turns DeepSpeed off in
      accelerate; so on CPU the stage keeps bf16 out of the Trainer and DeepSpeed (fp32
      weights, gradients and optimizer) and runs forward passes under torch.autocast(bf16).
    - The loss on CPU (`model_loss`): TRL computes it with a fused LM head that scores the
      vocabulary in chunks and recomputes them in the backward pass. On GPUs it scores only
      the completion positions (Triton) and saves the memory of the logits; on CPU it scores
      every position, and a LoRA step of SmolLM2-135M took ~1.5x as long as with the model's
      own loss (2 cores; benchmarks/RESULTS.md). The model's own loss is the same quantity:
      the mean negative log-likelihood of the completion tokens (labels -100 elsewhere),
      so on CPU the stage asks the model for it, as transformers' Trainer does (SFT only:
      DPO needs TRL's per-token log-probabilities of the answers, so it keeps TRL's loss).
    """
    import contextlib

    import torch
    from transformers import Trainer
    from trl import DPOTrainer, SFTTrainer

    class StageTrainer(DPOTrainer if objective == "dpo" else SFTTrainer):
        autocast_dtype: Any = None
        model_loss: bool = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            context = (torch.autocast("cpu", dtype=self.autocast_dtype) if self.autocast_dtype is not None
                       else contextlib.nullcontext())
            with context:
                if self.model_loss and objective == "sft":
                    return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return StageTrainer


def training_arguments(params: TrainParams, cuda: bool, precision: str, evaluate: bool = True) -> Any:
    """TRL's SFTConfig (DPOConfig for objective dpo): train params of the same names go through as they are.

    `evaluate` false: no eval loss (DPO when the validation split holds no pairs)."""
    from trl import DPOConfig, SFTConfig

    config = params.deepspeed.config
    configured_state = config is not None and not cuda and in_launched_rank()
    if configured_state:
        init_cpu_deepspeed_state()
    warmup = params.warmup_steps
    if params.objective == "dpo":
        dpo = params.dpo
        # DPOConfig's own defaults (disable_dropout, truncation keep_start, ...) stand
        trainer_config, specific = DPOConfig, {
            "beta": dpo.beta, "loss_type": list(dpo.loss_type), "label_smoothing": dpo.label_smoothing,
            "loss_weights": list(dpo.loss_weights) if dpo.loss_weights is not None else None}
    else:
        trainer_config, specific = SFTConfig, {
            "packing": params.packing, "completion_only_loss": params.completion_only_loss}
    return trainer_config(
        **specific,
        output_dir=str(params.checkpoint_dir),
        per_device_train_batch_size=params.per_device_train_batch_size,
        per_device_eval_batch_size=params.per_device_eval_batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler_type,
        warmup_steps=int(warmup) if warmup >= 1 else warmup,
        num_train_epochs=params.num_train_epochs,
        max_steps=params.max_steps or -1,
        max_length=params.max_length,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        seed=params.seed,
        data_seed=params.seed,
        logging_steps=params.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach the guard, not be averaged away
        eval_strategy="steps" if evaluate else "no",
        eval_steps=params.eval_steps,
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=params.save_total_limit,
        bf16=cuda and precision == "bf16",
        fp16=cuda and precision == "fp16",
        use_cpu=not cuda and config is None,
        # On CPU, DeepSpeed ranks need the backend named: without it accelerate sees no
        # device backend, counts one process and fills DeepSpeed's batch size for one.
        ddp_backend="gloo" if not cuda and in_launched_rank() else None,
        accelerator_config={"use_configured_state": True} if configured_state else None,
        activation_checkpointing=params.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if params.activation_checkpointing else None,
        deepspeed=str(config) if config else None,
        report_to="none",
        # tokens read (non-padding): the cost record's tokens and the throughput budgets price plans
        # by. DPO's batches hold chosen_/rejected_ inputs the Trainer cannot count.
        include_num_input_tokens_seen="non_padding" if params.objective == "sft" else "no",
        # Progress bars in a terminal; in logs (DVC under Airflow, CI) the per-step INFO lines
        # are enough and a bar only adds carriage-return noise.
        disable_tqdm=not sys.stderr.isatty(),
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False,
        log_level="warning",
        log_level_replica="error",
    )


def load_model(base_dir: Path, params: TrainParams, precision: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if params.qlora:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision == "bf16" else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **kwargs)
    if params.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.activation_checkpointing)
    model.config.use_cache = False
    return model


def lora_config(params: TrainParams) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=params.lora.r, lora_alpha=params.lora.lora_alpha, lora_dropout=params.lora.lora_dropout,
                      target_modules=list(params.lora.target_modules), bias="none", task_type="CAUSAL_LM")


def add_lora(model: Any, params: TrainParams) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(params))


def log_history_tables(history: list[dict[str, Any]]) -> tuple[str, str]:
    """CSV text of the per-step train loss (with lr, grad norm) and of the eval loss."""
    train_rows, eval_rows = {}, {}
    for entry in history:
        step = entry.get("step")
        if step is None:
            continue
        if "loss" in entry:
            train_rows[step] = (entry["loss"], entry.get("learning_rate", ""), entry.get("grad_norm", ""))
        if "eval_loss" in entry:
            eval_rows[step] = entry["eval_loss"]
    train_csv = "step,train_loss,learning_rate,grad_norm\n" + "".join(
        f"{step},{loss},{lr},{norm}\n" for step, (loss, lr, norm) in sorted(train_rows.items()))
    eval_csv = "step,eval_loss\n" + "".join(f"{step},{loss}\n" for step, loss in sorted(eval_rows.items()))
    return train_csv, eval_csv


def _leave_zero3() -> None:
    """Let rank 0 load plain models again after a ZeRO-3 run.

    While the Trainer's DeepSpeed config is registered, transformers builds every model
    under deepspeed.zero.Init, a collective the other ranks (done by then) never join.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _staging_dir(adapter_dir: Path) -> Path:
    return adapter_dir.parent / f".{adapter_dir.name}.staging"


def load_splits(params: Params, eos_token: str | None = None) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The (sampled) prepared splits, and TRL's datasets of them (not yet tokenized).

    DPO: the splits' preference pairs only, sampled after selecting them; a validation split
    without pairs gives no frame and no dataset (no evaluation)."""
    train = params.train
    limits = {"train": train.max_train_samples, "validation": train.max_eval_samples}
    frames = {}
    for split, path in data_files(params).items():
        frame = read_parquet(path, produced_by="prepare")
        if train.objective == "dpo":
            frame = preference.preference_rows(frame)
            if len(frame) == 0 and split == "validation":
                continue
        frames[split] = sample_rows(frame, limits[split], train.seed)
    if train.objective == "dpo":
        return frames, {split: preference.dpo_dataset(frame, eos_token) for split, frame in frames.items()}
    return frames, {split: sft_dataset(frame) for split, frame in frames.items()}


def has_validation_pairs(params: Params) -> bool:
    return preference.count_pairs(data_files(params)["validation"]) > 0


def build_trainer(params: Params, the_plan: Plan, model: Any, tokenizer: Any, frames: dict[str, pd.DataFrame],
                  datasets: dict[str, Any], args: Any, callbacks: list[Any],
                  trainer_class: Any = None) -> tuple[Any, dict]:
    """TRL's trainer over the splits (TRL tokenizes them here), checked against prepare's rendering;
    and what TRL made of each split."""
    from datasets.utils.logging import disable_progress_bar
    from transformers import PrinterCallback

    if not sys.stderr.isatty():  # TRL's map/filter bars: noise in logs, as the Trainer's are
        disable_progress_bar()
    train = params.train
    trainer_class = trainer_class or _trainer_class(train.objective)
    if train.objective == "dpo":
        # A plain model and the LoRA config: TRL wraps it, and the reference is the same model with
        # the adapter disabled (the base). Given a model peft already wrapped, TRL 1.16 would copy
        # the adapter into a second one named "ref" instead (saved beside ours).
        trainer = trainer_class(model=model, args=args, train_dataset=datasets["train"],
                                eval_dataset=datasets.get("validation"), processing_class=tokenizer,
                                callbacks=callbacks, peft_config=lora_config(train))
        trainer.remove_callback(PrinterCallback)
        return trainer, _preference_stats(trainer, tokenizer, frames, train.max_length)
    trainer = trainer_class(model=model, args=args, train_dataset=datasets["train"],
                            eval_dataset=datasets["validation"], processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # progress is logged by the Progress callback
    stats = {}
    for split, dataset in (("train", trainer.train_dataset), ("validation", trainer.eval_dataset)):
        if len(dataset) == 0:
            raise LLMOpsError(f"train: no {split} example keeps a completion token within train.max_length="
                              f"{train.max_length}; raise train.max_length")
        check_rendering(dataset, tokenizer, train.max_length, trainer.completion_only_loss, split)
        stats[split] = dataset_stats(len(frames[split]), dataset, train.max_length, train.packing)
    return trainer, stats


def _preference_stats(trainer: Any, tokenizer: Any, frames: dict[str, pd.DataFrame],
                      max_length: int) -> dict[str, dict]:
    """DPO: check TRL's tokens against prepare's rendering; what TRL made of each split's pairs."""
    stats = {"validation": {"pairs": 0, "examples": 0}}
    for split, dataset in (("train", trainer.train_dataset), ("validation", trainer.eval_dataset)):
        if dataset is None:
            continue
        if len(dataset) == 0:
            raise LLMOpsError(f"train: no {split} preference pair keeps an answer token within train.max_length="
                              f"{max_length} (every prompt fills it); raise train.max_length")
        bad = preference.rendering_problems(dataset, tokenizer)
        if bad:
            raise TemplateMismatch(
                f"train: TRL's tokens of {len(bad)} of {len(dataset)} {split} preference pairs differ from the tokens "
                f"of the text that evaluation and serving send (first: row {bad[0]}, "
                f"{dataset[bad[0]]['rendered_prompt'][:60]!r}): the tokenizer's chat template renders the stored "
                "messages differently from prepare's rendering; set prepare.template: alpaca or plain, or give the "
                "base model a chat template that renders the generation prompt as a prefix of the answered "
                "conversation")
        stats[split] = preference.pair_stats(len(frames[split]), dataset, max_length)
    return stats


def gate_batch(trainer: Any) -> dict[str, Any]:
    """The adapter gate's fixed batch: the first validation examples, through TRL's collator."""
    if "prompt_ids" in trainer.train_dataset.column_names:  # DPO's preference pairs
        return preference.gate_batch(trainer, GATE_BATCH)
    dataset = trainer.eval_dataset
    columns = [c for c in ("input_ids", "labels", "seq_lengths") if c in dataset.column_names]
    rows = dataset.select(range(min(GATE_BATCH, len(dataset)))).select_columns(columns)
    return trainer.data_collator(list(rows))


def start_tracking(params: Params, the_plan: Plan, resume: Path | None, frames: dict[str, pd.DataFrame],
                   stats: dict[str, dict]) -> str:
    """Start the MLflow run (or reopen the interrupted one when resuming); log inputs."""

    train = params.train
    previous = checkpoints.read_run(train.checkpoint_dir).get("mlflow_run_id") if resume else None
    run_id = tracking.start_run(
        params.tracking, run_name=f"train-{time.strftime('%Y%m%d-%H%M%S')}", run_id=previous,
        tags={**tracking.git_state(), "stage": "train", "base_model": params.base_model.source,
              "base_model_sha256": the_plan.base_sha256, "data_sha256": the_plan.data_sha256,
              "resumed_from": str(resume) if resume else "", "objective": train.objective,
              "precision": the_plan.precision})
    checkpoints.update_run(train.checkpoint_dir, mlflow_run_id=run_id)
    tracking.log_params({"train": train.model_dump(mode="json"), "base_model": params.base_model.source,
                         "train_examples": stats["train"]["examples"],
                         "eval_examples": stats["validation"]["examples"],
                         "world_size": distributed.world_size(), "precision_resolved": the_plan.precision})
    for split, context in (("train", "training"), ("validation", "evaluation")):
        if split not in frames:  # DPO without validation pairs
            continue
        path = data_files(params)[split]
        tracking.log_dataset(frames[split], path, name=split, digest=file_sha256(path), context=context)
    return run_id


def run(params: Params, the_plan: Plan) -> dict[str, Any] | None:
    """Train in this process (one rank of many, or alone); rank 0 publishes and returns the metrics."""
    import torch
    from transformers import AutoTokenizer, set_seed

    train = params.train
    started = time.time()
    rank_zero = distributed.is_rank_zero()
    if not the_plan.cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed, when imported, need not probe for GPUs
    autocast_dtype = torch.bfloat16 if (the_plan.precision == "bf16" and not the_plan.cuda) else None
    dpo = train.objective == "dpo"
    # starts the process group in a rank
    args = training_arguments(train, the_plan.cuda, the_plan.precision,
                              evaluate=not dpo or has_validation_pairs(params))
    resume = checkpoints.resume_point(train.checkpoint_dir)

    tokenizer = AutoTokenizer.from_pretrained(the_plan.base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    frames, datasets = load_splits(params, tokenizer.eos_token)
    run_id = None
    try:
        set_seed(train.seed)
        model = load_model(the_plan.base_dir, train, the_plan.precision)
        if not dpo:  # DPO: TRL adds the adapter (build_trainer)
            model = add_lora(model, train)
        trainer_class = _trainer_class(train.objective)
        trainer_class.autocast_dtype = autocast_dtype
        trainer_class.model_loss = not the_plan.cuda
        trainer, stats = build_trainer(params, the_plan, model, tokenizer, frames, datasets, args,
                                       _callbacks(train), trainer_class)
        trainable, total = trainer.model.get_nb_trainable_parameters()
        if rank_zero:
            logger.info("train: %s, %d train / %d validation examples (%s)", train.objective,
                        stats["train"]["examples"], stats["validation"]["examples"], json.dumps(stats))
            logger.info("train: LoRA r=%d on %s: %s trainable of %s parameters", train.lora.r,
                        ",".join(train.lora.target_modules), f"{trainable:,}", f"{total:,}")
            run_id = start_tracking(params, the_plan, resume, frames, stats)
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if trainer.eval_dataset is not None and not any(
                e.get("step") == trainer.state.global_step for e in trainer.state.log_history if "eval_loss" in e):
            trainer.evaluate()

        # The gate's reference: the trained model's loss on a fixed batch (every rank takes part
        # under ZeRO-3), then the adapter is saved beside its final place.
        batch = gate_batch(trainer)
        reference = batch_loss(trainer.model, batch, autocast_dtype)
        staging = _staging_dir(train.adapter_dir)
        if rank_zero:
            shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier()
        trainer.save_model(str(staging))  # collective under ZeRO-3; rank 0 writes
        distributed.barrier()
        if not rank_zero:
            return None
        metrics = publish(params, the_plan, trainer, tokenizer, staging, batch, reference, autocast_dtype)
        metrics.update(objective=train.objective, trainable_parameters=trainable,
                       train_examples=stats["train"]["examples"],
                       eval_examples=stats["validation"]["examples"], mlflow_run_id=run_id,
                       resumed_from_step=checkpoints.checkpoint_step(resume) if resume else 0,
                       runtime_seconds=round(time.time() - started, 1),
                       **throughput(trainer.state.num_input_tokens_seen, output.metrics.get("train_runtime"),
                                    resumed=resume is not None))
        write_reports(params, trainer.state.log_history, metrics)
        tracking.end_run("FINISHED")
        checkpoints.clear(train.checkpoint_dir)
        logger.info("train: done in %.0f s: train_loss=%.4f eval_loss=%s -> %s", metrics["runtime_seconds"],
                    metrics["train_loss"], "none" if metrics["eval_loss"] is None else f"{metrics['eval_loss']:.4f}",
                    train.adapter_dir)
        return metrics
    except BaseException as error:
        if rank_zero:
            if isinstance(error, LLMOpsError):  # a stale adapter must not pass for this run's result
                remove_outputs(train.adapter_dir, train.merged_dir, params.paths.metrics("train"))
            shutil.rmtree(_staging_dir(train.adapter_dir), ignore_errors=True)
            tracking.end_run("KILLED" if isinstance(error, (KeyboardInterrupt, pruning.TrialPruned)) else "FAILED")
        raise


def throughput(tokens: int, runtime: float | None, resumed: bool) -> dict[str, Any]:
    """Tokens the run trained on and its training throughput (the Trainer's own train_runtime:
    the optimisation loop, not loading or saving). A resumed run's count includes the killed
    run's tokens but its runtime does not, so it gives no throughput for budgets to price by."""
    if not tokens:
        return {"tokens_trained": None, "train_tokens_per_second": None}
    rate = tokens / runtime if runtime and not resumed else None
    return {"tokens_trained": int(tokens), "train_tokens_per_second": None if rate is None else round(rate, 3)}


def publish(params: Params, the_plan: Plan, trainer: Any, tokenizer: Any, staging: Path, batch: dict,
            reference: float, autocast_dtype: Any) -> dict[str, Any]:
    """Rank 0: gate the saved adapter, move it into place, merge if asked; the final metrics."""

    train = params.train
    history = trainer.state.log_history
    evals = [e for e in history if "eval_loss" in e]
    final_eval = evals[-1]["eval_loss"] if evals else None  # None: DPO without validation pairs
    if final_eval is not None and not math.isfinite(final_eval):
        raise TrainingDiverged(f"train: the final eval loss is {final_eval}; no adapter was written. "
                               "Lower train.learning_rate or use train.precision: fp32")
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the params are in MLflow
    _leave_zero3()
    gate, reloaded = check_adapter(staging, the_plan.base_dir, train.lora.target_modules, train.lora.r,
                                   batch, reference, train.sanity_tolerance, autocast_dtype,
                                   trained=trainer.state.global_step > 0)
    with atomic_path(train.adapter_dir) as tmp:
        os.replace(staging, tmp)
    if train.merge:
        with atomic_path(train.merged_dir) as tmp:
            reloaded.merge_and_unload().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    else:
        remove_outputs(train.merged_dir)  # a merged model of an earlier run is not this run's
    train_losses = [e["loss"] for e in history if "loss" in e]
    return {
        "train_loss": train_losses[-1] if train_losses else math.nan,
        "eval_loss": final_eval,
        **final_dpo_metrics(history),
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "world_size": trainer.args.world_size,
        "precision": the_plan.precision,
        "gate_reference_loss": gate.reference_loss,
        "gate_reloaded_loss": gate.reloaded_loss,
    }


def final_dpo_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """DPO: the last logged value of each of TRL's reward and log-prob metrics (train and eval)."""
    final: dict[str, float] = {}
    for entry in history:
        final.update({key: value for key, value in entry.items()
                      if key.removeprefix("eval_").startswith(DPO_METRIC_PREFIXES)})
    return final


def write_reports(params: Params, history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """DVC metrics and plots files, and the same files plus the adapter as MLflow artifacts."""

    reports = params.paths.reports_dir / "train"
    train_csv, eval_csv = log_history_tables(history)
    atomic_write_text(reports / "train_loss.csv", train_csv)
    atomic_write_text(reports / "eval_loss.csv", eval_csv)
    atomic_write_json(params.paths.metrics("train"), metrics)
    tracking.log_metrics({"final_train_loss": metrics["train_loss"], "final_eval_loss": metrics["eval_loss"],
                          "gate_reloaded_loss": metrics["gate_reloaded_loss"],
                          # budgets price later plans by this (pipelines/accounting/budget.py)
                          budget.THROUGHPUT_METRIC: metrics.get("train_tokens_per_second")})
    tracking.log_artifacts(params.train.adapter_dir, "adapter")
    for path in (params.paths.metrics("train"), reports / "train_loss.csv", reports / "eval_loss.csv"):
        tracking.log_artifacts(path, "reports")


# --- entry points --------------------------------------------------------------------------

def launch(params: Params) -> None:
    """Start the ranks through the deepspeed launcher and wait; re-raise a rank's error."""
    import subprocess

    import torch


    workdir = params.train.checkpoint_dir
    workdir.mkdir(parents=True, exist_ok=True)
    params_file = workdir / "launch-params.json"
    error_file = workdir / "launch-error.txt"
    error_file.unlink(missing_ok=True)
    params_file.write_text(json.dumps(params.model_dump(mode="json", by_alias=True)), encoding="utf-8")
    command, env = launch_command(params.train.deepspeed,
                                  ["--params-json", str(params_file), "--error-file", str(error_file)],
                                  cuda=torch.cuda.is_available(), cpu_count=os.cpu_count() or 1)
    logger.info("train: launching %d process(es) per node: %s", params.train.deepspeed.num_processes,
                " ".join(command))
    try:
        result = subprocess.run(command, env={**os.environ, **env}, check=False)
    finally:
        params_file.unlink(missing_ok=True)
    if error_file.is_file():
        message = error_file.read_text(encoding="utf-8").strip()
        error_file.unlink(missing_ok=True)
        raise LLMOpsError(message)
    if result.returncode != 0:
        raise LaunchError(f"train: the deepspeed launcher exited with code {result.returncode}; the ranks' "
                          "output above shows why (run with train.deepspeed.num_processes: 1 to debug in one process)")


def main(params: Params) -> None:

    the_plan = plan(params)
    # priced before any weights load; over budget.per_run stops here (pipelines/accounting/budget.py)
    hostfile = params.train.deepspeed.hostfile
    budget.check_training(params, the_plan.base_sha256, the_plan.precision,
                          nodes=len(parse_hostfile(hostfile)) if hostfile is not None else 1)
    checkpoints.prepare_resume(params.train.checkpoint_dir, the_plan.fingerprint)
    if needs_launch(params.train.deepspeed) and not _in_rank():
        launch(params)
    else:
        run(params, the_plan)


def _in_rank() -> bool:

    return in_launched_rank()


def _rank_main(argv: list[str]) -> int:
    """Entry of each rank started by the deepspeed launcher (`python -m pipelines.training.loop`)."""

    parser = argparse.ArgumentParser(prog="python -m pipelines.training.loop")
    parser.add_argument("--params-json", required=True, type=Path)
    parser.add_argument("--error-file", type=Path)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_rank_logging(args.verbose)
    try:
        params = parse_params(json.loads(args.params_json.read_text(encoding="utf-8")), str(args.params_json))
        run(params, plan(params))
    except LLMOpsError as error:
        if is_rank_zero() and args.error_file is not None:
            args.error_file.write_text(str(error), encoding="utf-8")
        print(f"llmops train: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    # Run the imported module's entry, not this `__main__` copy, so the classes and the
    # logger name are those of `pipelines.training.loop`.
    from pipelines.training.loop import _rank_main as rank_main

    sys.exit(rank_main(sys.argv[1:]))
