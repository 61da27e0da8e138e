"""Model behaviour: the demo's fine-tune of SmolLM2 is better than the base model it started from.

Runs the real demo path (`dvc repro promote`: ingest .. prepare, the bundled SmolLM2 base
model, 30 LoRA steps on the CPU, evaluation, registry, promotion) in a copy of the project,
then serves the champion as a user would after `make demo`. The retrain on the new domain
that monitoring asks for: tests/model/test_retrain_new_domain.py (on the tiny model).
"""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from tests.support import BIN, TEST_TOKEN, free_port, make_project, stop_process_group, wait_http

# The module fixture runs the demo pipeline (about 5 minutes on 2 idle cores).
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("demo") / "project")
    project.set_params(evaluate={"max_examples": 80, "bootstrap_samples": 300})
    # The in-training evaluations and the adapter gate's two loss checks score 32 validation rows
    # instead of 64: they do not change the adapter, and each pass of 64 costs ~10 s here.
    project.set_params(train={"max_eval_samples": 32})
    # No quantized variants (the stage is then a no-op): making and measuring the int8 one adds ~3 min
    # here; `make demo` makes it, tests/integration/test_quantize.py runs the stage on the tiny model.
    project.set_params(quantize={"variants": []})
    result = project.dvc("repro", "promote")
    assert "Running stage 'train'" in result.stdout
    assert json.loads((project.root / "reports/promote/decision.json").read_text())["promoted"] == 1
    return project


def test_the_bundled_smollm2_became_a_plain_transformers_folder_with_the_ggufs_logits(demo):
    """The demo's base_model stage converted the bundled GGUF (once: this reads its output)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.model.sources import resolve

    out = demo.root / "models/base"
    record = json.loads((out / "source.json").read_text())
    assert record["licence"] == "Apache-2.0" and record["upstream"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert record["source_sha256"] and record["parameters"] > 100_000_000
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    source = resolve("bundled:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("<|im_start|>user\nWhat does cat mean?<|im_end|>\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        gguf = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file).eval()(ids).logits
    assert torch.equal(plain, gguf)


def test_adapter_lowers_validation_loss_below_the_base_model(demo):
    from pipelines.model.lm import CausalLM

    root = demo.root
    validation = pd.read_parquet(root / "data/prepared/validation.parquet").head(64)
    prompts, completions = list(validation["prompt_text"]), list(validation["completion_text"])
    losses = {}
    for name, adapter in (("base", None), ("tuned", root / "models/adapter")):
        lm = CausalLM.load(root / "models/base", adapter, dtype="float32", name=name)
        nll, tokens = lm.score(prompts, completions)
        losses[name] = float(nll.sum() / tokens.sum())
    assert losses["tuned"] < losses["base"] * 0.9, losses
    trained = json.loads((root / "reports/train/metrics.json").read_text())
    assert trained["steps"] == 30 and np.isfinite(trained["eval_loss"])


def test_candidate_beats_the_base_model_on_the_test_split(demo):
    results = json.loads((demo.root / "reports/evaluate/results.json").read_text())
    assert results["examples"] == 80
    candidate, base = results["systems"]["candidate"], results["systems"]["base"]
    assert candidate["perplexity"] < base["perplexity"]
    assert results["comparisons"]["base"]["perplexity"]["low"] > 0  # the whole CI is an improvement
    assert candidate["rouge_l"] > base["rouge_l"]
    # the semantic metrics (on by default) are scored and compared like the others; no direction is
    # asserted: on 20 samples of a 30-step run they rated base and candidate about equal (0.42 vs 0.40)
    for metric in ("semantic_similarity", "bertscore_f1"):
        assert 0 < candidate[metric] <= 1 and 0 < base[metric] <= 1
        difference = results["comparisons"]["base"][metric]
        assert difference["low"] <= difference["improvement"] <= difference["high"]


def test_the_forgetting_check_ran_and_the_gate_weighed_it(demo):
    """lm-eval-harness on the shipped general-capability task, the fine-tune vs the base model."""
    results = json.loads((demo.root / "reports/evaluate/results.json").read_text())
    forgetting = results["forgetting"]
    assert forgetting["task"] == "llmops_general" and forgetting["questions"] == 87
    assert 0.0 <= forgetting["candidate"] <= 1.0 and forgetting["low"] <= forgetting["drop"] <= forgetting["high"]
    decision = json.loads((demo.root / "reports/promote/decision.json").read_text())
    assert decision["checks"]["no_forgetting"]["passed"] == 1, decision["checks"]


def test_llmops_serve_answers_with_the_demo_champion_as_evaluated_and_logs_the_request(demo):
    """What a user does after `make demo`: `llmops serve` with the project's own settings (the
    SQLite registry, the default inference log, a vLLM engine on the registered merged weights)
    answers with the champion and logs the request. The served greedy answers are the ones
    `evaluate` scored (transformers' generate on the same weights): the gate judged what is served."""
    import requests

    from pipelines.config.params import load_params
    from pipelines.serving.inference_log import read_records

    url = f"http://127.0.0.1:{free_port()}"
    body = {"messages": [{"role": "user", "content": 'What does the noun "harbour" mean?'}], "max_tokens": 32}
    with open(demo.root / "serve.log", "wb") as output:
        process = subprocess.Popen([str(BIN / "llmops"), "serve", "--set", f"serve.port={url.rsplit(':', 1)[1]}"],
                                   cwd=demo.root, env={**demo.env, "LLMOPS_API_TOKEN": TEST_TOKEN},
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"{url}/ready", 300, process)
            assert requests.get(f"{url}/ready", timeout=10).json()["model_version"] == "1"
            assert requests.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 401
            response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120,
                                     headers={"Authorization": f"Bearer {TEST_TOKEN}"})
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["model_version"] == "1" and answer["id"] == response.headers["X-Request-Id"]
            assert len(answer["choices"][0]["message"]["content"].split()) >= 2, answer
            deadline = time.monotonic() + 30
            while True:  # the log writer is asynchronous: the record arrives shortly after the answer
                frame = read_records(f"sqlite:///{demo.root / 'data/inference/inference.db'}")
                logged = frame[frame["request_id"] == answer["id"]]
                if len(logged) or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert len(logged) == 1 and logged.iloc[0]["status"] == 200
            assert logged.iloc[0]["model_version"] == "1" and "harbour" in logged.iloc[0]["prompt"]

            samples = pd.read_csv(demo.root / "reports/evaluate/samples.csv")
            max_tokens = load_params(demo.root / "params.yaml").evaluate.decoding.max_new_tokens
            same = 0
            for prompt, evaluated in zip(samples["prompt"], samples["candidate"]):
                served = requests.post(f"{url}/v1/chat/completions", timeout=120,
                                       headers={"Authorization": f"Bearer {TEST_TOKEN}"},
                                       json={"messages": [{"role": "user", "content": prompt}],
                                             "max_tokens": max_tokens, "temperature": 0})
                same += served.json()["choices"][0]["message"]["content"].strip() == str(evaluated).strip()
            # float32 on both sides; measured here: every sample answer identical
            assert same == len(samples), f"{same} of {len(samples)} served answers are the evaluated ones"
        finally:
            stop_process_group(process, 30)
