"""Cost accounting and budgets (pipelines/accounting): the figures, their consistency, the stops."""

from __future__ import annotations

import json
import math

import pytest

from pipelines.accounting import budget, cost
from pipelines.config.params import CostParams, ParamsError, load_params, parse_params

CPU = cost.Machine(kind="cpu", cores=4, gpus=0)
H100S = cost.Machine(kind="nvidia-h100", cores=64, gpus=8, gpu_name="NVIDIA H100 80GB HBM3", nodes=2)


def make_params(tmp_path, **sections):
    return parse_params({"paths": {"reports_dir": str(tmp_path / "reports"),
                                   "prepared_dir": str(tmp_path / "prepared")},
                         "ingest": {"sources": [{"kind": "bundled", "name": "wordnet"}]}, **sections})


@pytest.mark.parametrize(("name", "kind"), [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100"), ("NVIDIA H200", "nvidia-h200"),
    ("NVIDIA A100-SXM4-80GB", "nvidia-a100"), ("NVIDIA L4", "nvidia-l4"), ("Tesla T4", "tesla-t4"),
])
def test_gpu_device_names_become_price_table_rows(name, kind):
    assert cost.gpu_kind(name) == kind


def test_the_shipped_price_table_prices_this_machine_and_the_gpu_kinds():
    params = load_params("params.yaml")
    assert cost.price_per_hour(CPU, params.cost) == pytest.approx(4 * 0.045)
    assert cost.price_per_hour(H100S, params.cost) == pytest.approx(16 * 3.00)  # 8 GPUs x 2 nodes
    assert CPU.key == "cpu-4c" and H100S.key == "nvidia-h100x16"
    unknown = cost.Machine(kind="nvidia-b200", cores=8, gpus=1)
    assert cost.price_per_hour(unknown, params.cost) is None
    assert "cost.prices.nvidia-b200: {per_gpu_hour:" in cost.missing_price(unknown, params.cost)


@pytest.mark.parametrize("row", [{}, {"per_core_hour": 0.1, "per_gpu_hour": 2.0}])
def test_a_price_row_has_exactly_one_unit(row):
    with pytest.raises(ParamsError, match="exactly one of per_core_hour"):
        parse_params({"ingest": {"sources": [{"kind": "bundled", "name": "wordnet"}]},
                      "cost": {"prices": {"cpu": row}}})


def test_detect_honours_an_explicit_machine_and_hidden_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    machine = cost.detect(CostParams())
    assert machine.kind == "cpu" and machine.gpus == 0 and machine.cores >= 1
    assert cost.detect(CostParams(machine="cloud-c7i")).kind == "cloud-c7i"


def test_a_record_is_consistent_usage_times_price():
    params = CostParams(prices={"cpu": {"per_core_hour": 0.05}})
    record = cost.record("train", CPU, wall_seconds=1800, used_cpu_seconds=3600, tokens={"trained": 200_000},
                         params=params, started=0, notes={"budget_per_run": 1.0})
    assert record["core_hours"] == pytest.approx(2.0)  # 4 cores x 0.5 h
    assert record["gpu_hours"] == 0
    assert record["cpu_utilisation"] == pytest.approx(0.5)  # 1 of 2 core-hours used
    assert record["cost"] == pytest.approx(0.10)
    assert record["cost_per_1k_tokens"] == pytest.approx(0.10 / 200)
    assert record["tokens_processed"] == 200_000 and record["budget_per_run"] == 1.0
    assert record["started_at"] == "1970-01-01T00:00:00+00:00"
    unpriced = cost.record("train", H100S, 10, 5, {}, params, 0)
    assert unpriced["cost"] is None and unpriced["cost_per_1k_tokens"] is None
    assert unpriced["gpu_hours"] == pytest.approx(16 * 10 / 3600)


def test_tokens_are_read_from_each_stages_own_outputs(tmp_path):
    params = make_params(tmp_path)
    paths = params.paths
    for stage, data in {
        "prepare": {"rows_in": 10, "train": {"tokens_total": 700}, "test": {"tokens_total": 300}},
        "train": {"tokens_trained": 5120, "steps": 4},
        "evaluate": {"examples": 2, "candidate": {"generated_tokens": 40}, "base": {"generated_tokens": 60}},
    }.items():
        paths.metrics(stage).parent.mkdir(parents=True, exist_ok=True)
        paths.metrics(stage).write_text(json.dumps(data))
    assert cost.stage_tokens("prepare", params) == {"tokenised": 1000}
    assert cost.stage_tokens("train", params) == {"trained": 5120}
    assert cost.stage_tokens("evaluate", params) == {"generated": 100}
    assert cost.stage_tokens("ingest", params) == {}
    assert cost.stage_tokens("register", params) == {}
    assert cost.stage_tokens("quantize", params) == {}  # not run yet
    params.paths.report("quantization_results").parent.mkdir(parents=True, exist_ok=True)
    params.paths.report("quantization_results").write_text(json.dumps({
        "full": {"serving": {"generated_tokens": 700}}, "variants": {"w8a8": {"serving": {"generated_tokens": 650}}}}))
    assert cost.stage_tokens("quantize", params) == {"generated": 1350}


def test_the_meter_removes_a_stale_record_and_writes_one_only_on_success(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    params = make_params(tmp_path)
    path = params.paths.cost("ingest")
    path.parent.mkdir(parents=True)
    path.write_text('{"stage": "ingest", "cost": 99}')
    meter = cost.Meter("ingest", params)
    assert not path.exists()  # a failed run now leaves none behind
    cost.note(budget_per_run=None)
    sum(i * i for i in range(200_000))  # some CPU time
    record = meter.finish()
    assert json.loads(path.read_text()) == record
    assert record["stage"] == "ingest" and record["machine"]["kind"] == "cpu"
    assert record["wall_seconds"] > 0 and record["cpu_seconds"] > 0
    assert record["cost"] == pytest.approx(record["core_hours"] * 0.045, rel=1e-3)
    assert "budget_per_run" in record


def test_trains_nodes_are_its_world_size_over_the_processes_per_node(tmp_path):
    params = make_params(tmp_path, train={"deepspeed": {"num_processes": 8}})
    assert cost.stage_nodes("train", params) == 1  # no metrics yet: one machine
    params.paths.metrics("train").parent.mkdir(parents=True)
    params.paths.metrics("train").write_text(json.dumps({"world_size": 16}))  # 2 hosts x 8 ranks
    assert cost.stage_nodes("train", params) == 2
    assert cost.stage_nodes("evaluate", params) == 1


def test_serving_cost_is_the_hourly_price_over_the_measured_token_rate():
    meter = cost.ServingCost(price_per_hour=3.6, window=60, now=0)
    assert meter.snapshot(now=30) == (None, None)  # nothing generated yet: not measured
    meter.add(300, now=10)
    meter.add(300, now=20)
    rate, per_1k = meter.snapshot(now=30)
    assert rate == pytest.approx(600 / 30)  # up 30 s: the window is not full yet
    assert per_1k == pytest.approx(3.6 / 3600 / 20 * 1000)  # 0.05 per 1k tokens
    meter.add(1200, now=75)
    rate, _ = meter.snapshot(now=81)  # the first two fell out of the 60 s window
    assert rate == pytest.approx(1200 / 60)
    assert cost.ServingCost(None, 60, now=0).snapshot(now=1) == (None, None)


@pytest.mark.parametrize(("train", "rows", "steps"), [
    ({"max_steps": 30}, 5000, 30),
    ({"max_steps": None, "num_train_epochs": 2, "per_device_train_batch_size": 8}, 100, 26),  # ceil(100/8) x 2
    ({"max_steps": None, "max_train_samples": 40, "per_device_train_batch_size": 8,
      "gradient_accumulation_steps": 2, "deepspeed": {"num_processes": 2}}, 1000, 2),  # 40 rows / 32 per step
])
def test_planned_steps_follow_the_trainers_arithmetic(tmp_path, train, rows, steps):
    assert budget.planned_steps(rows, make_params(tmp_path, train=train)) == steps


def estimate(cost_value):
    return budget.Estimate(tokens=10_000, steps=10, tokens_per_second=100.0, measured_runs=3, seconds=100.0,
                           cost=cost_value, currency="USD", machine="cpu-2c")


def test_over_budget_stops_with_the_figures_and_both_fixes():
    with pytest.raises(budget.OverBudget) as error:
        budget.check(0.001, estimate(0.0025), None, "train", "lower train.max_steps")
    message = str(error.value)
    assert "\n" not in message
    assert "about 0.0025 USD" in message and "over 0.001 USD" in message and "100 tokens/s" in message
    assert "lower train.max_steps" in message and "budget.override_reason" in message
    assert budget.check(0.001, estimate(0.0025), "fixed-size nightly check", "train", "")  # overridden: runs
    assert not budget.check(0.01, estimate(0.0025), None, "train", "")  # within budget
    assert not budget.check(None, estimate(0.0025), None, "train", "")  # no budget
    assert not budget.check(0.001, estimate(None), None, "train", "")  # nothing measured yet: cannot stop it


def test_an_unmeasured_plan_says_so():
    unmeasured = budget.Estimate(10_000, 10, None, 0, None, None, "USD", "cpu-2c")
    assert "not priced (no measured throughput)" in unmeasured.describe()
    assert "= 0.028 h" in estimate(0.0025).describe() and "median of 3" in estimate(0.0025).describe()


def test_a_sweep_stops_before_the_trial_that_would_pass_its_budget(tmp_path):
    import optuna

    from pipelines.commands.sweep import COST_ATTR, Sweep

    study = optuna.create_study(direction="maximize")
    for number, spent in enumerate([0.02, 0.04]):
        study.add_trial(optuna.trial.create_trial(value=float(number), user_attrs={COST_ATTR: spent}))
    sweep = Sweep.__new__(Sweep)  # only the budget logic: no project, no storage
    sweep.params = make_params(tmp_path, budget={"per_sweep": 0.1})
    assert sweep.over_budget(study) is None  # 0.06 spent + 0.03 expected <= 0.1
    study.add_trial(optuna.trial.create_trial(value=2.0, user_attrs={COST_ATTR: 0.03}))
    reason = sweep.over_budget(study)  # 0.09 + 0.03 > 0.1
    assert "budget.per_sweep 0.1 USD: 3 trials cost 0.0900 USD" in reason and "about 0.0300" in reason
    sweep.params = make_params(tmp_path)
    assert sweep.over_budget(study) is None  # no budget


def test_the_model_card_shows_each_stages_cost(tmp_path):
    from pipelines.registry.registration import cost_section, cost_tags

    params = CostParams()
    train = cost.record("train", CPU, 120, 200, {"trained": 10_000}, params, 0,
                        {"budget_override_reason": "quarterly refresh"})
    train["budget_estimate"] = {"cost": 0.5}
    costs = {"train": train, "evaluate": None}
    section = cost_section(costs)
    assert "| train | 120 s on cpu-4c | 0.1333 core-h | 10,000 | 0.0060 USD | 0.000600 |" in section
    assert "| evaluate | not recorded |" in section
    assert "quarterly refresh" in section
    tags = cost_tags(costs)
    assert tags["cost.train"] == "0.006000 USD" and tags["cost.evaluate"] == "not recorded"
    assert tags["cost.train.machine"] == "cpu-4c" and tags["cost.train.tokens"] == "10000"
    assert math.isclose(float(tags["cost.train.wall_seconds"]), 120.0)
