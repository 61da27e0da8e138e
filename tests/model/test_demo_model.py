"""Model behaviour: the demo's fine-tune of SmolLM2 is better than the base model it started from.

Runs the real demo path (`dvc repro promote`: ingest .. prepare, the bundled SmolLM2 base
model, 30 LoRA steps on the CPU, evaluation, registry, promotion) in a copy of the project,
then closes the monitoring loop: with the FOLDOC stream (the new domain production drifted
to) added to the training sources, the retrained candidate beats that champion on the
new-domain slice of the test split.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.support import make_project

# The module fixture runs the demo pipeline (about 5 minutes on 2 idle cores).
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("demo") / "project")
    project.set_params(evaluate={"max_examples": 80, "bootstrap_samples": 300})
    result = project.dvc("repro", "promote")
    assert "Running stage 'train'" in result.stdout
    assert json.loads((project.root / "reports/promote/decision.json").read_text())["promoted"] == 1
    return project


@pytest.fixture(scope="module")
def retrained(demo):
    """The drift-triggered retrain: FOLDOC (labelled new-domain data) joins the sources."""
    first = json.loads((demo.root / "reports/evaluate/results.json").read_text())
    demo.set_params(ingest={"sources": [{"kind": "bundled", "name": "wordnet"},
                                        {"kind": "bundled", "name": "foldoc"}]})
    demo.dvc("repro", "evaluate")
    return first, json.loads((demo.root / "reports/evaluate/results.json").read_text())


def test_adapter_lowers_validation_loss_below_the_base_model(demo):
    from pipelines.lm import CausalLM

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


def test_retrained_on_the_new_domain_beats_the_champion_there(retrained):
    first, second = retrained
    assert "computing" not in first["slices"]["domain"]  # the champion never saw the new domain
    assert second["champion_version"] == "1" and "champion" in second["systems"]
    new_domain = second["slices"]["domain"]["computing"]
    assert new_domain["n"] >= 10
    # Measured (2026-11-24, 30 steps on the mixed data): perplexity 29.6 vs 30.3, ROUGE-L 0.137 vs
    # 0.123 on 24 FOLDOC examples. CPU training is deterministic here, so the margins repeat;
    # they are small because both runs are 30 steps and the champion already learnt the
    # definition style on WordNet (base: 38.2).
    assert new_domain["candidate"]["perplexity"] < new_domain["champion"]["perplexity"], new_domain
    assert new_domain["candidate"]["rouge_l"] > new_domain["champion"]["rouge_l"], new_domain
