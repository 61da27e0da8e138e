"""Quantized variants: llm-compressor in its own virtualenv makes them (pipelines/quantization/variants.py);
the stage `quantize` measures the registered candidate's int8 variant on vLLM's CPU build beside full
precision and logs it with the version; promote picks the weights that serve; the gateway serves
them and deploy verifies it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

from tests.support import REPO, TINY_ENGINE, ServeProcess, Workspace, evaluation, register

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


def test_int8_and_int4_variants_of_the_tiny_model(quantize_python, tiny_base_model_dir, tmp_path):
    from pipelines.config.params import QuantVariant
    from pipelines.quantization.variants import RECORD, quantize, servable

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


def test_the_stage_measures_the_registered_int8_variant_promote_chooses_it_and_the_gateway_serves_it(
        quantize_python, tiny_base_model_dir, tiny_prepared_dir, mlflow_server, tmp_path):
    import mlflow
    import pandas as pd

    from pipelines.evaluation.harness import select_examples

    ws = Workspace(tmp_path / "ws", tiny_base_model_dir, mlflow_server.uri, "quantize-test")
    ws.overrides += [f"paths.prepared_dir={tiny_prepared_dir}", f"quantize.output_dir={tmp_path / 'variants'}",
                     f"serve.engine.cache_dir={tmp_path / 'engine-cache'}", *TINY_ENGINE, "serve.engine.device=cpu",
                     "evaluate.max_examples=24", "evaluate.min_slice_size=5", "evaluate.slices=[response_length]",
                     "evaluate.top_up_slices=[]", "evaluate.bootstrap_samples=200",
                     "evaluate.decoding.max_new_tokens=8"]
    params = ws.params()
    examples = len(select_examples(pd.read_parquet(tiny_prepared_dir / "test.parquet"), 24, params.evaluate.seed,
                                   params.evaluate.top_up_slices, params.evaluate.min_slice_size))
    version = register(ws, {**evaluation(0.05), "examples": examples})

    done = ws.cli("quantize")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((ws.root / "reports/quantize/results.json").read_text())
    assert results["version"] == version and results["device"] == "cpu" and results["metric"] == "rouge_l"
    assert results["examples"] == examples and list(results["variants"]) == ["w8a8"]
    assert "w4a16" in results["skipped"] and "cpu" in results["skipped"]["w4a16"]  # vLLM's CPU build lacks int4
    w8, full = results["variants"]["w8a8"], results["full"]
    for entry in (w8, full):
        serving = entry["serving"]
        assert serving["tokens_per_second"] > 0 and serving["rss_bytes"] > 0 and serving["generated_tokens"] > 0
        # priced by params.yaml's cpu row: price per hour / tokens per hour
        assert serving["cost_per_1k_tokens"] == pytest.approx(
            results["price_per_hour"] / 3600 / serving["tokens_per_second"] * 1000, rel=1e-3)
    assert w8["serving"]["bytes"] < full["serving"]["bytes"]
    c = w8["comparison"]
    assert c["low"] <= c["improvement"] <= c["high"]
    assert c["improvement"] == pytest.approx(w8["metrics"]["rouge_l"] - full["metrics"]["rouge_l"], abs=1e-9)
    assert w8["slices"] and all(e["n"] >= 5 for values in w8["slices"].values() for e in values.values())
    assert (tmp_path / "variants/w8a8/llmops_variant.json").is_file()
    metrics = json.loads((ws.root / "reports/quantize/metrics.json").read_text())
    assert metrics["variants"] == 1 and metrics["w8a8"]["delta"] == round(c["improvement"], 4)
    spent = json.loads((ws.root / "reports/cost/quantize.json").read_text())
    assert spent["stage"] == "quantize"
    assert spent["tokens"] == {"generated": full["serving"]["generated_tokens"] + w8["serving"]["generated_tokens"]}

    # in the registry: the variant's weights as artifacts of the version's run, the evidence as tags and on the card
    client = mlflow.MlflowClient(mlflow_server.uri)
    model = client.get_model_version("quantize-test", version)
    assert model.tags["variant.w8a8.uri"] == f"runs:/{model.run_id}/variants/w8a8" == w8["artifact_uri"]
    logged = {f.path for f in client.list_artifacts(model.run_id, "variants/w8a8")}
    assert "variants/w8a8/config.json" in logged and "variants/w8a8/llmops_variant.json" in logged
    assert model.tags["variant.w8a8.serves_on"] == "cpu,cuda" and model.tags["variants.made"] == "w8a8"
    assert model.tags["variant.w8a8.delta"].startswith(f"{c['improvement']:+.4f}")
    assert "## Quantized variants" in model.description and "| w8a8 | w8a8-int8 |" in model.description

    # promote picks the variant (named, within wide tolerances: the tiny random model's answers are noise)
    done = ws.cli("promote", "--set", "promote.variant.choose=w8a8", "--set", "promote.variant.tolerance=1",
                  "--set", "promote.variant.slice_tolerance=1")
    assert done.returncode == 0, done.stderr[-3000:]
    decision = json.loads((ws.root / "reports/promote/decision.json").read_text())
    assert decision["promoted"] == 1 and decision["variant"] == "w8a8"
    assert decision["variant_candidates"]["w8a8"]["quality_ok"] is True
    model = client.get_model_version("quantize-test", version)
    assert model.tags["serving.variant"] == "w8a8" and "## Serving" in model.description
    assert "**Variant w8a8** serves this version" in model.description

    # the gateway serves the int8 weights on vLLM's CPU build; deploy verifies that it does
    serve = ServeProcess(ws, tmp_path / "serve").start(600)  # its own engine cache: it downloads the variant
    try:
        ready = requests.get(f"{serve.url}/ready", timeout=10).json()
        assert ready["model_version"] == version and ready["variant"] == "w8a8" and ready["variant_note"] is None
        answer = serve.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "bank"}],
                                                     "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        assert (tmp_path / "serve/models/quantize-test" / f"{version}-w8a8/w8a8/llmops_variant.json").is_file()
        engine_logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "serve/models/logs").rglob("*.log"))
        assert "quantization=compressed-tensors" in engine_logs
        env = {**os.environ, "LLMOPS_SERVICE_URL": serve.url, "LLMOPS_API_TOKEN": serve.token}
        deployed = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "deploy", "--params", str(ws.params_file),
             *[x for o in ws.overrides for x in ("--set", o)], "--set", "deploy.canary_examples=2",
             # the random tiny model's int8 answers may be blank: what is checked here is which weights serve
             "--set", "deploy.min_success_rate=0"],
            capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        report = json.loads((ws.root / "reports/deploy/deployment.json").read_text())
        assert report["status"] == "verified", report
        assert report["variant"] == "w8a8" == report["variant_chosen"]
    finally:
        serve.stop()
