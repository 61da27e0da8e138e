"""Budgets: a training plan priced before any work, and stopped when it costs more than allowed.

The plan's tokens (what the Trainer will read: steps x examples per step x the mean tokens of
an example, from a sample of the prepared train split cut at train.max_length) divided by the
tokens/s that earlier training runs of the same base model, precision and world size (ranks)
measured on this machine kind (the median of the last five finished ones in MLflow: in team mode the
whole team's runs) is the training time; at cost.prices it is the plan's cost. Loading the
model, the adapter gate and the checkpoints are not in it: the estimate is of training itself.

No measurement yet (the first run of a model on a machine kind) means no estimate: the run
goes ahead with a warning and measures it. `budget.override_reason` runs a plan over budget,
and the reason is recorded with the run (reports/cost/train.json, the MLflow run's tags).
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.accounting import cost
from pipelines.config.params import Params
from pipelines.errors import LLMOpsError

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 2000  # rows whose tokens give the mean length of an example
MEASURED_RUNS = 5  # finished runs whose median throughput prices a plan
THROUGHPUT_METRIC = "train_tokens_per_second"


class OverBudget(LLMOpsError):
    """The plan costs more than budget.per_run (or a sweep's next trial more than per_sweep's rest)."""


@dataclass(frozen=True)
class Estimate:
    tokens: int
    steps: int
    tokens_per_second: float | None  # None: nothing measured yet on this machine kind
    measured_runs: int
    seconds: float | None
    cost: float | None  # None: no throughput, or no price for the machine
    currency: str
    machine: str

    def describe(self) -> str:
        if self.seconds is None:
            return (f"{self.tokens:,} tokens in {self.steps} steps on {self.machine}: not priced "
                    "(no measured throughput)")
        money = "unpriced" if self.cost is None else f"about {self.cost:.4f} {self.currency}"
        return (f"{money}: {self.tokens:,} tokens in {self.steps} steps at {self.tokens_per_second:,.0f} tokens/s "
                f"(median of {self.measured_runs} earlier run(s) on {self.machine}) = {self.seconds / 3600:.3f} h")


def examples_per_step(params: Params, nodes: int = 1) -> int:
    train = params.train
    return (train.per_device_train_batch_size * train.gradient_accumulation_steps
            * train.deepspeed.num_processes * nodes)


def planned_steps(rows: int, params: Params, nodes: int = 1) -> int:
    train = params.train
    if train.max_steps:
        return train.max_steps
    rows = min(rows, train.max_train_samples or rows)
    return math.ceil(math.ceil(rows / examples_per_step(params, nodes)) * train.num_train_epochs)


def mean_example_tokens(params: Params) -> tuple[float, int]:
    """Mean tokens of a training example (prompt + completion, cut at train.max_length), from a
    seeded sample of the prepared train split, and the split's rows. Packing fills sequences to
    max_length, so a packed example is max_length tokens."""
    import pandas as pd
    from transformers import AutoTokenizer

    path = params.paths.prepared_dir / "train.parquet"
    frame = pd.read_parquet(path, columns=["prompt_text", "completion_text"])
    if params.train.packing:
        return float(params.train.max_length), len(frame)
    sample = frame.sample(n=min(SAMPLE_ROWS, len(frame)), random_state=params.train.seed) if len(frame) else frame
    if sample.empty:
        return 0.0, 0
    tokenizer = AutoTokenizer.from_pretrained(params.base_model.output_dir)
    texts = (sample["prompt_text"] + sample["completion_text"]).tolist()
    lengths = [min(len(ids), params.train.max_length)
               for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return float(statistics.fmean(lengths)), len(frame)


def measured_throughput(params: Params, machine: cost.Machine, base_sha256: str, precision: str,
                        world_size: int) -> list[float]:
    """train_tokens_per_second of the last finished training runs like this one, newest first."""
    import mlflow

    from pipelines.registry import tracking

    tracking.client_environment()
    client = mlflow.MlflowClient(tracking.resolve_tracking_uri(params.tracking))
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        return []
    query = (f"tags.stage = 'train' and attributes.status = 'FINISHED' and tags.`cost.machine` = '{machine.key}' "
             f"and tags.base_model_sha256 = '{base_sha256}' and tags.precision = '{precision}' "
             f"and params.world_size = '{world_size}' and metrics.{THROUGHPUT_METRIC} > 0")
    runs = client.search_runs([experiment.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=MEASURED_RUNS)
    return [run.data.metrics[THROUGHPUT_METRIC] for run in runs]


def estimate_training(params: Params, base_sha256: str, precision: str, nodes: int = 1) -> Estimate:
    machine = cost.detect(params.cost, nodes)
    mean_tokens, rows = mean_example_tokens(params)
    steps = planned_steps(rows, params, nodes)
    tokens = int(round(steps * examples_per_step(params, nodes) * mean_tokens))
    try:
        measured = measured_throughput(params, machine, base_sha256, precision,
                                       params.train.deepspeed.num_processes * nodes)
    except Exception as error:  # noqa: BLE001 - MLflow down: training itself will say so clearly
        logger.warning("train: could not read earlier runs' throughput from MLflow (%s)", str(error).splitlines()[0])
        measured = []
    if not measured:
        return Estimate(tokens, steps, None, 0, None, None, params.cost.currency, machine.key)
    throughput = statistics.median(measured)
    seconds = tokens / throughput
    hourly = cost.price_per_hour(machine, params.cost)
    money = None if hourly is None else hourly * seconds / 3600
    return Estimate(tokens, steps, throughput, len(measured), seconds, money, params.cost.currency, machine.key)


def check(limit: float | None, estimate: Estimate, override_reason: str | None, what: str, fix: str) -> bool:
    """Raise OverBudget when the estimate exceeds the limit and no reason overrides it; whether
    the reason overrode it."""
    if limit is None or estimate.cost is None or estimate.cost <= limit:
        return False
    if override_reason:
        logger.warning("%s: over budget (%s > %s %s), run anyway: %s", what, f"{estimate.cost:.4f}", limit,
                       estimate.currency, override_reason)
        return True
    raise OverBudget(f"{what}: the plan costs {estimate.describe()}, over {limit} {estimate.currency}; {fix}, or "
                     "set budget.override_reason='why' to run it anyway (the reason is recorded)")


def check_training(params: Params, base_sha256: str, precision: str, nodes: int = 1) -> Estimate:
    """Price the training plan (on `nodes` machines) and stop it when over budget.per_run; the
    estimate is recorded in reports/cost/train.json, and with it the reason a plan over budget ran."""
    budget = params.budget
    estimate = estimate_training(params, base_sha256, precision, nodes)
    record: dict[str, Any] = {"budget_estimate": asdict(estimate), "budget_per_run": budget.per_run}
    if budget.per_run is not None and estimate.cost is None:
        logger.warning("train: budget.per_run is set but the plan cannot be priced yet (%s); this run measures "
                       "the throughput later runs are priced by", estimate.describe())
    else:
        logger.info("train: plan %s", estimate.describe())
    if check(budget.per_run, estimate, budget.override_reason, "train",
             "lower train.max_steps (or num_train_epochs, max_train_samples) or raise budget.per_run"):
        record["budget_override_reason"] = budget.override_reason
    cost.note(**record)
    return estimate
