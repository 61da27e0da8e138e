"""The forgetting check: the shipped lm-eval task, a real lm-eval-harness run on a tiny model, the
paired interval, and the promote gate passing, blocking, or only reporting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.config.params import PromoteParams
from pipelines.errors import LLMOpsError
from pipelines.evaluation.forgetting import compare, correct_per_question, forgetting, load_task
from pipelines.registry.promotion import gate
from tests.support import evaluation

REPO = Path(__file__).resolve().parents[2]
TASK = REPO / "configs/lm_eval/llmops_general.yaml"


def test_the_shipped_task_is_well_formed_and_its_answers_are_right():
    task = load_task(TASK)
    assert task["task"] == "llmops_general" and task["output_type"] == "multiple_choice"
    rows = [json.loads(line) for line in Path(task["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    assert len(rows) == 87 and {r["kind"] for r in rows} == {"sum", "larger", "letter", "day", "month"}
    for row in rows:
        right = row["choices"][row["answer"]]
        assert len(set(row["choices"])) == len(row["choices"])
        if row["kind"] == "sum":
            a, b = (int(w.rstrip("?")) for w in row["question"].split() if w.rstrip("?").isdigit())
            assert int(right) == a + b
        elif row["kind"] == "larger":
            assert int(right) == max(int(c) for c in row["choices"])
        elif row["kind"] == "letter":
            assert ord(right) == ord(row["question"].split("after ")[1][0]) + 1
    # the file is what the generator writes (deterministic)
    import subprocess
    import sys

    before = Path(task["dataset_kwargs"]["data_files"]["test"]).read_bytes()
    subprocess.run([sys.executable, str(REPO / "scripts/make_general_task.py")], check=True, capture_output=True)
    assert Path(task["dataset_kwargs"]["data_files"]["test"]).read_bytes() == before


def test_a_missing_task_or_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(LLMOpsError, match="evaluate.forgetting.task: .*nope.yaml does not exist"):
        load_task(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("just: text\n")
    with pytest.raises(LLMOpsError, match="is not an lm-eval task definition"):
        load_task(tmp_path / "bad.yaml")
    (tmp_path / "t.yaml").write_text("task: t\ndataset_kwargs:\n  data_files:\n    test: gone.jsonl\n")
    with pytest.raises(LLMOpsError, match=r"the test data of .*t.yaml \(gone.jsonl\) is missing"):
        load_task(tmp_path / "t.yaml")


def test_the_drop_and_its_paired_interval():
    base = np.array([1.0] * 8 + [0.0] * 2)
    same = compare(base, base.copy(), confidence=0.95, samples=200, seed=0)
    assert same["drop"] == 0.0 and same["low"] == same["high"] == 0.0
    worse = compare(base, np.array([1.0] * 4 + [0.0] * 6), confidence=0.95, samples=500, seed=0)
    assert worse["drop"] == pytest.approx(0.4) and 0.0 < worse["low"] <= 0.4 <= worse["high"]
    assert (worse["base"], worse["candidate"], worse["questions"]) == (0.8, 0.4, 10)


def test_lm_eval_harness_scores_a_tiny_model_on_the_task(tiny_base_model_dir):
    from pipelines.model.lm import CausalLM

    lm = CausalLM.load(tiny_base_model_dir, dtype="float32", name="base")
    correct = correct_per_question(lm, load_task(TASK), limit=12, batch_size=8)
    assert correct.shape == (12,) and set(correct.tolist()) <= {0.0, 1.0}
    # the same weights twice: no drop, and the result has what the card and the gate read
    result = forgetting({"base": lm, "candidate": lm}, TASK, limit=12, batch_size=8, confidence=0.95, samples=100,
                        seed=0)
    assert result["task"] == "llmops_general" and result["questions"] == 12 and result["drop"] == 0.0
    assert result["base"] == pytest.approx(correct.mean())


def with_forgetting(drop: float) -> dict:
    results = evaluation(0.02)
    results["forgetting"] = {"task": "llmops_general", "definition": str(TASK), "questions": 87, "base": 0.6,
                             "candidate": 0.6 - drop, "drop": drop, "low": drop - 0.05, "high": drop + 0.05,
                             "confidence": 0.95}
    return results


def test_the_gate_blocks_a_candidate_that_forgot_more_than_the_tolerance():
    passed, checks = gate(with_forgetting(0.02), PromoteParams(max_forgetting=0.05))
    check = next(c for c in checks if c.name == "no_forgetting")
    assert passed and check.passed and "must be <= 0.050" in check.detail
    passed, checks = gate(with_forgetting(0.12), PromoteParams(max_forgetting=0.05))
    check = next(c for c in checks if c.name == "no_forgetting")
    assert not passed and not check.passed
    assert "accuracy 0.480 vs base 0.600 on 87 questions, drop +0.120" in check.detail
    # null tolerance: reported, never blocks
    passed, checks = gate(with_forgetting(0.12), PromoteParams(max_forgetting=None))
    check = next(c for c in checks if c.name == "no_forgetting")
    assert passed and check.advisory and "reported only" in check.detail
    # results without the check (evaluate.forgetting.task: null): no such check
    assert "no_forgetting" not in {c.name for c in gate(evaluation(0.02), PromoteParams())[1]}


def test_the_card_shows_the_forgetting_check():
    from pipelines.registry.registration import forgetting_section

    section = forgetting_section(with_forgetting(0.02))
    assert "## General capability (forgetting check)" in section
    assert "accuracy **0.5800** vs the base model's 0.6000; drop +0.0200 (95% CI [-0.0300, +0.0700])" in section
    assert forgetting_section(evaluation(0.02)) == ""
