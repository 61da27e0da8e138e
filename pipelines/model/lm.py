"""A causal LM ready for evaluation: base model (+ LoRA adapter), batched greedy/sampled
generation, and per-example likelihood of reference completions.

One class serves the `evaluate` stage, the MLflow pyfunc model (`pipelines/model/packaging.py`) and
monitoring's reference answers, so they generate with the same code and decoding rules:
`CausalLM.generate_ids` runs one static batch through transformers' `generate`. Serving is
vLLM's (pipelines/serving/engine.py): tests/integration/test_serve.py and tests/model check that its
greedy answers are these.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import LLMOpsError
from pipelines.model.encoding import IGNORE_INDEX, collate, encode_pair

logger = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class Decoding:
    """Generation settings (greedy by default, so runs are deterministic)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # silence transformers' warnings about sampling knobs under greedy decoding
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class Generation:
    texts: list[str]
    new_tokens: list[int]
    seconds: float
    batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else 0.0


class AdapterMismatch(LLMOpsError):
    """The adapter was trained for another base model or does not load onto it."""


class CausalLM:
    """A tokenizer and a causal LM (optionally with a LoRA adapter merged in)."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "model") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.tokenizer.padding_side = "left"  # batched generation continues every prompt at the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def load(cls, base_dir: Path | str, adapter_dir: Path | str | None = None, *, dtype: str = "bfloat16",
             name: str = "model") -> CausalLM:
        """Load a transformers folder, and a peft adapter onto it (merged for faster inference)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base_dir = Path(base_dir)
        if not (base_dir / "config.json").exists():
            raise LLMOpsError(f"{base_dir} is not a model folder (no config.json); run `llmops base_model` first")
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir if adapter_dir and _has_tokenizer(adapter_dir)
                                                  else base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, DTYPES[dtype]))
        if adapter_dir is not None:
            model = _attach_adapter(model, Path(adapter_dir), base_dir)
        model.eval()
        # Measured with torch 2.13 on this CPU: in bfloat16, a forward whose output layer's weight
        # does not require grad (peft leaves the merged model frozen) runs that layer as a bmm over
        # a copy of the weight (49k x 576 for SmolLM2, every forward): 96 vs 43 ms for a 14-token
        # prefill (benchmarks/RESULTS.md, Serving). Every forward here runs under
        # torch.inference_mode, where a weight that requires grad records nothing.
        model.requires_grad_(True)
        return cls(model, tokenizer, name)

    def generate(self, prompt_texts: list[str], decoding: Decoding, batch_size: int = 16) -> Generation:
        """Continue each already-formatted prompt; returns the new text (special tokens removed)."""
        texts: list[str] = []
        counts: list[int] = []
        start = time.perf_counter()
        batches = 0
        for offset in range(0, len(prompt_texts), batch_size):
            chunk = prompt_texts[offset: offset + batch_size]
            for row in self.generate_ids(chunk, decoding, seed=decoding.seed + offset):
                counts.append(len(row))
                texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
            batches += 1
        return Generation(texts, counts, time.perf_counter() - start, batches)

    def generate_ids(self, prompt_texts: list[str], decoding: Decoding, *, seed: int | None = None) -> list[list[int]]:
        """One batched `generate` call; the new token ids of each row (up to and including EOS)."""
        import torch

        eos = self.tokenizer.eos_token_id
        encoded = self.tokenizer(prompt_texts, return_tensors="pt", padding=True, add_special_tokens=False)
        prompt_length = encoded["input_ids"].shape[1]
        kwargs = decoding.generate_kwargs()
        # Control tokens other than EOS (a chat template's <|im_start|>, padding, ...) are never
        # part of an answer: a model that emits one would break the template it is served in.
        # (The serving gateway sends the same set to vLLM as logit_bias -100: suppressed_tokens.)
        suppressed = suppressed_tokens(self.tokenizer)
        if suppressed:
            kwargs["suppress_tokens"] = suppressed
        if decoding.do_sample:
            torch.manual_seed(decoding.seed if seed is None else seed)
        with torch.inference_mode():
            output = self.model.generate(**encoded, **kwargs, eos_token_id=eos,
                                         pad_token_id=self.tokenizer.pad_token_id)
        rows = []
        for row in output[:, prompt_length:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            rows.append(row)
        return rows

    def score(self, prompt_texts: list[str], completion_texts: list[str], max_length: int = 512,
              batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Summed NLL of each completion given its prompt, and its token count (prompt masked)."""
        import torch


        nll = np.zeros(len(prompt_texts))
        counts = np.zeros(len(prompt_texts), dtype=int)
        pad = self.tokenizer.pad_token_id
        for offset in range(0, len(prompt_texts), batch_size):
            examples = []
            for prompt, completion in zip(prompt_texts[offset: offset + batch_size],
                                          completion_texts[offset: offset + batch_size]):
                example = encode_pair(prompt, completion, self.tokenizer, max_length)
                if example is None:
                    raise LLMOpsError(f"an example leaves no completion token within {max_length} tokens; "
                                      "raise evaluate.max_length")
                examples.append(example)
            batch = collate(examples, pad)
            with torch.inference_mode():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            mask = labels != IGNORE_INDEX
            picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll[offset: offset + len(examples)] = (-(picked * mask)).sum(-1).numpy()
            counts[offset: offset + len(examples)] = mask.sum(-1).numpy()
        return nll, counts


def suppressed_tokens(tokenizer: Any) -> list[int]:
    """The special tokens an answer never contains: all but EOS."""
    return sorted(set(tokenizer.all_special_ids) - {tokenizer.eos_token_id})


def _has_tokenizer(folder: Path | str) -> bool:
    return any((Path(folder) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))


def _attach_adapter(model: Any, adapter_dir: Path, base_dir: Path) -> Any:
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").exists():
        raise LLMOpsError(f"no trained adapter in {adapter_dir} (adapter_config.json missing); "
                          "run `llmops train` first")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as error:
        raise AdapterMismatch(
            f"the adapter in {adapter_dir} does not fit the base model in {base_dir}: "
            f"{str(error).splitlines()[0][:300]}; train the adapter on this base model or point "
            "base_model.source at the model it was trained on"
        ) from None
    return peft_model.merge_and_unload()
