"""Quantized variants: llm-compressor in its own virtualenv makes them, vLLM's CPU build serves the
int8 one (pipelines/quantization/variants.py)."""

from __future__ import annotations

import json
import os

import pytest
import requests

from tests.support import TINY_ENGINE

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def quantize_python() -> str:
    from pipelines.config.settings import DEFAULT_QUANTIZE_PYTHON

    if not DEFAULT_QUANTIZE_PYTHON.is_file():
        message = f"no llm-compressor virtualenv at {DEFAULT_QUANTIZE_PYTHON.parents[1]}: run `make install`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return str(DEFAULT_QUANTIZE_PYTHON)


def test_int8_and_int4_variants_of_the_tiny_model_and_vllm_on_cpu_serves_the_int8_one(
        quantize_python, tiny_base_model_dir, tmp_path):
    from pipelines.config.params import QuantVariant, load_params
    from pipelines.quantization.variants import RECORD, quantize, servable
    from pipelines.serving.engine import EngineConfig, EngineProcess

    w8 = QuantVariant(name="w8a8", scheme="w8a8-int8")
    w4 = QuantVariant(name="w4a16", scheme="w4a16", group_size=32)  # the tiny model's 64 and 128 columns divide
    records = {v.name: quantize(quantize_python, tiny_base_model_dir, tmp_path / v.name, v) for v in (w8, w4)}
    groups = {}
    for name, record in records.items():
        folder = tmp_path / name
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
        groups[name] = config["config_groups"]["group_0"]
        assert json.loads((folder / RECORD).read_text()) == record
        assert (folder / "tokenizer.json").is_file()
        assert 0 < record["bytes"] < record["source_bytes"] and record["seconds"] > 0
        assert not list(tmp_path.glob(f".{name}.*"))  # no temporary folder left beside it
    assert groups["w8a8"]["weights"]["num_bits"] == 8 and groups["w8a8"]["weights"]["strategy"] == "channel"
    assert groups["w8a8"]["input_activations"]["num_bits"] == 8 and groups["w8a8"]["input_activations"]["dynamic"]
    assert groups["w4a16"]["weights"]["num_bits"] == 4 and groups["w4a16"]["weights"]["group_size"] == 32
    assert groups["w4a16"]["input_activations"] is None
    assert servable(w8, "cpu") and not servable(w4, "cpu") and servable(w4, "cuda")

    # vLLM's CPU build loads the int8 variant and answers (greedy) with it
    params = load_params("params.yaml", [*TINY_ENGINE, "serve.engine.device=cpu"])
    engine = EngineProcess(EngineConfig.from_params(params.serve), tmp_path / "w8a8", "w8a8", "w8a8",
                           tmp_path / "engine.log")
    engine.start()
    try:
        engine.wait_ready(timeout=600)
        answer = requests.post(f"{engine.url}/v1/completions", headers=engine.headers(), timeout=300, json={
            "model": "w8a8", "prompt": "What does the noun bank mean?", "max_tokens": 8, "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] > 0
        log = (tmp_path / "engine.log").read_text(errors="replace")
        assert "quantization=compressed-tensors" in log
    finally:
        engine.stop()


def test_a_variant_that_cannot_be_made_fails_in_one_line_and_leaves_nothing(quantize_python, tmp_path):
    from pipelines.config.params import QuantVariant
    from pipelines.quantization.variants import QuantizationError, quantize

    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(QuantizationError) as error:
        quantize(quantize_python, tmp_path / "not-a-model", tmp_path / "out", QuantVariant(name="w8a8",
                                                                                            scheme="w8a8-int8"))
    assert "could not make variant w8a8 (w8a8-int8)" in str(error.value) and "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-model"]


def test_a_missing_quantizer_says_how_to_install_it(tmp_path):
    from pipelines.config.params import QuantVariant
    from pipelines.quantization.variants import QuantizationError, quantize

    with pytest.raises(QuantizationError, match="run `make install`.*LLMOPS_QUANTIZE_PYTHON"):
        quantize(str(tmp_path / "nowhere" / "python"), tmp_path, tmp_path / "out",
                 QuantVariant(name="w8a8", scheme="w8a8-int8"))
    assert not (tmp_path / "out").exists()
