"""The registered pyfunc model: merged weights that answer as base + adapter do, loaded in the dtype
its consumer asks for (MLflow's model_config)."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.pyfunc import PythonModelContext

from pipelines.lm import CausalLM, Decoding
from pipelines.packaging import ADAPTER_ARTIFACT, CONFIG_ARTIFACT, MERGED_ARTIFACT, LoraTextGenerator, write_merged
from tests.support import build_adapter, build_tiny_base


def test_the_registered_model_loads_in_the_dtype_the_consumer_asks_for(tmp_path, tiny_tokenizer_dir):
    base = build_tiny_base(tmp_path / "base", tiny_tokenizer_dir)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dtype": "float32", "decoding": {"max_new_tokens": 4}, "template": "plain"}))
    adapter = build_adapter(tmp_path / "adapter", base)
    artifacts = {CONFIG_ARTIFACT: str(config), MERGED_ARTIFACT: str(write_merged(base, adapter, tmp_path / "merged")),
                 ADAPTER_ARTIFACT: str(adapter)}

    def loaded(model_config):
        model = LoraTextGenerator()
        model.load_context(PythonModelContext(artifacts, model_config))
        weights = {parameter.dtype for parameter in model.lm.model.parameters()}
        inv_freq = {buffer.dtype for name, buffer in model.lm.model.named_buffers() if name.endswith("inv_freq")}
        # peft leaves merged weights frozen; frozen bfloat16 output layers run 2.2x slower on this
        # CPU (pipelines/lm.py, CausalLM.load), so the loaded model's weights require grad again
        assert all(parameter.requires_grad for parameter in model.lm.model.parameters())
        return weights, inv_freq

    assert loaded(None) == ({torch.float32}, {torch.float32})  # the registered config's dtype
    # bfloat16 weights, and the rotary frequencies stay float32 (`model.to(bfloat16)` would round them)
    assert loaded({"dtype": "bfloat16"}) == ({torch.bfloat16}, {torch.float32})


def test_merged_weights_answer_as_base_plus_adapter_and_load_without_peft(tmp_path, tiny_tokenizer_dir):
    base = build_tiny_base(tmp_path / "base", tiny_tokenizer_dir)
    adapter = build_adapter(tmp_path / "adapter", base)
    merged = write_merged(base, adapter, tmp_path / "merged")
    assert not (merged / "adapter_config.json").exists() and (merged / "config.json").exists()
    assert (merged / "tokenizer.json").exists() and not (merged / "generation_config.json").exists()
    prompts = ["What does the noun bank mean?", "Define: river"]
    greedy = Decoding(max_new_tokens=6, repetition_penalty=3.0)
    with_adapter = CausalLM.load(base, adapter, dtype="float32").generate_ids(prompts, greedy)
    assert CausalLM.load(merged, dtype="float32").generate_ids(prompts, greedy) == with_adapter
    assert CausalLM.load(base, dtype="float32").generate_ids(prompts, greedy) != with_adapter  # the adapter counts


def test_a_version_without_merged_weights_is_named_with_the_fix(tmp_path, tiny_tokenizer_dir):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dtype": "float32", "decoding": {"max_new_tokens": 4}, "template": "plain"}))
    with pytest.raises(ValueError, match="llmops register"):
        LoraTextGenerator().load_context(PythonModelContext({CONFIG_ARTIFACT: str(config)}, None))
