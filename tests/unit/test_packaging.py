"""The registered pyfunc model loads in the dtype its consumer asks for (MLflow's model_config)."""

from __future__ import annotations

import json

import torch
from mlflow.pyfunc import PythonModelContext

from pipelines.packaging import ADAPTER_ARTIFACT, BASE_ARTIFACT, CONFIG_ARTIFACT, LoraTextGenerator
from tests.support import build_adapter, build_tiny_base


def test_the_registered_model_loads_in_the_dtype_the_consumer_asks_for(tmp_path, tiny_tokenizer_dir):
    base = build_tiny_base(tmp_path / "base", tiny_tokenizer_dir)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dtype": "float32", "decoding": {"max_new_tokens": 4}, "template": "plain"}))
    artifacts = {CONFIG_ARTIFACT: str(config), BASE_ARTIFACT: str(base),
                 ADAPTER_ARTIFACT: str(build_adapter(tmp_path / "adapter", base))}

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
