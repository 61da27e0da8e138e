"""Adapter sanity gate: a saved LoRA adapter must reload and reproduce the trained model.

ZeRO-3 with LoRA can save adapters whose tensors are empty or still at their initial
values (peft#2892, trl#4416); the stage would then publish an adapter that does nothing.
After saving, rank 0 checks the files, not the model in memory:
1. every LoRA tensor of every targeted module is present, non-empty, and has the shape
   (r, in_features) for lora_A / (out_features, r) for lora_B;
2. after training, not every lora_B is zero (they start at zero);
3. the base model with the adapter loaded from disk gives, on a fixed batch, the loss the
   trained model gave before saving, within a relative tolerance.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import LLMOpsError

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterCheckFailed(LLMOpsError):
    """The saved adapter is empty, misshapen or does not reproduce the trained model."""


@dataclass(frozen=True)
class GateResult:
    tensors: int
    reference_loss: float
    reloaded_loss: float

    @property
    def relative_difference(self) -> float:
        return abs(self.reloaded_loss - self.reference_loss) / max(abs(self.reference_loss), 1e-8)


def expected_shapes(model: Any, target_modules: list[str], r: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module name: {"lora_A": (r, in), "lora_B": (out, r)}} for every Linear that LoRA targets."""
    import torch

    shapes = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in target_modules and isinstance(module, torch.nn.Linear):
            shapes[name] = {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}
    return shapes


def adapter_tensor_problems(adapter_dir: Path, expected: dict[str, dict[str, tuple[int, ...]]],
                            trained: bool = True) -> tuple[list[str], int]:
    """Problems with the tensors in `adapter_dir` (empty list when fine), and the tensor count."""
    from safetensors import safe_open

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        return [f"{path} is missing"], 0
    found: dict[str, dict[str, Any]] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            kind = "lora_A" if ".lora_A." in key else "lora_B"
            module = key.split(f".{kind}.")[0].removeprefix("base_model.model.")
            found.setdefault(module, {})[kind] = handle.get_tensor(key)
    problems = []
    for module, kinds in expected.items():
        for kind, shape in kinds.items():
            tensor = found.get(module, {}).get(kind)
            if tensor is None:
                problems.append(f"{module}.{kind} is missing")
            elif tensor.numel() == 0:
                problems.append(f"{module}.{kind} is empty (shape {tuple(tensor.shape)})")
            elif tuple(tensor.shape) != tuple(shape):
                problems.append(f"{module}.{kind} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        problems.append(f"unexpected adapted modules: {', '.join(unexpected[:5])}")
    lora_b = [kinds["lora_B"] for kinds in found.values() if "lora_B" in kinds and kinds["lora_B"].numel()]
    if trained and lora_b and all(bool((t == 0).all()) for t in lora_b):
        problems.append("every lora_B tensor is zero: the adapter holds its initial values, not trained ones")
    return problems, sum(len(kinds) for kinds in found.values())


def batch_loss(model: Any, batch: dict[str, Any], autocast_dtype: Any = None) -> float:
    """Mean token loss of `model` on `batch`, in eval mode, without gradients."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # TRL's padding-free batches (packing) also carry plain ints (max_length_q, ...)
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    context = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
    with torch.no_grad(), context:
        # no cache: with one, transformers does not build the per-document mask of a packed
        # (padding-free) batch, and packed examples would attend to each other
        loss = model(**inputs, use_cache=False).loss
    if was_training:
        model.train()
    return float(loss.float().item())


def check_adapter(adapter_dir: Path, base_dir: Path, target_modules: list[str], r: int,
                  batch: dict[str, Any], reference_loss: float, tolerance: float,
                  autocast_dtype: Any = None, trained: bool = True) -> tuple[GateResult, Any]:
    """Run the gate; return the result and the reloaded PeftModel (reused for merging).

    Raises AdapterCheckFailed naming what is wrong and what to do.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    problems, count = adapter_tensor_problems(adapter_dir, expected_shapes(base, target_modules, r), trained)
    hint = ("with ZeRO-3 keep \"stage3_gather_16bit_weights_on_model_save\": true in the DeepSpeed config "
            "(configs/deepspeed/zero3.json), or train with configs/deepspeed/zero2.json")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise AdapterCheckFailed(f"the saved adapter in {adapter_dir} failed the sanity gate: {shown}; {hint}")
    reloaded = PeftModel.from_pretrained(base, adapter_dir)
    loss = batch_loss(reloaded, batch, autocast_dtype)
    result = GateResult(tensors=count, reference_loss=reference_loss, reloaded_loss=loss)
    if not result.relative_difference <= tolerance:
        raise AdapterCheckFailed(
            f"the adapter reloaded from {adapter_dir} gives loss {loss:.4f} on the check batch but the trained "
            f"model gave {reference_loss:.4f} (relative difference {result.relative_difference:.3%} > "
            f"train.sanity_tolerance {tolerance:.3%}): the saved weights are not the trained ones; {hint}"
        )
    logger.info("adapter gate passed: %d LoRA tensors, loss %.4f reloaded vs %.4f trained (%.3f%% apart)",
                count, loss, reference_loss, 100 * result.relative_difference)
    return result, reloaded
