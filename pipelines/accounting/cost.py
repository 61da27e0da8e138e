"""What a stage used and what it cost: wall time, core- or GPU-hours, CPU time, tokens, money.

Every DVC stage run through `llmops <stage>` is metered (pipelines/cli.py): when it succeeds,
`reports/cost/<stage>.json` holds its record; train's and evaluate's records are also logged to
their MLflow runs (`cost.*` metrics and tags), and register puts them on the version's model card.

Billing follows how machines are rented: for the stage's wall time, every core (CPU machines)
or every GPU (GPU machines) of every node it held, at `cost.prices[<machine kind>]` per hour.
The CPU time the processes actually used (theirs and their children's: DeepSpeed ranks) is
recorded beside it, so a stage that held 16 cores and used 2 shows as such.

Written here, not taken from a library: MLflow's system metrics sample utilisation but price
nothing, and cloud billing exports arrive a day later per account, not per pipeline stage.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.config.params import CostParams, Params
from pipelines.io import atomic_write_json, remove_outputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Machine:
    kind: str  # the row of cost.prices: cpu, nvidia-h100, ...
    cores: int  # usable by this process (its CPU affinity)
    gpus: int  # visible to this process
    gpu_name: str | None = None
    nodes: int = 1

    @property
    def key(self) -> str:
        """What throughput is comparable across: the kind and the size, e.g. cpu-2c, nvidia-h100x8."""
        size = f"x{self.gpus * self.nodes}" if self.gpus else f"-{self.cores * self.nodes}c"
        return f"{self.kind}{size}"


def gpu_kind(name: str) -> str:
    """The price-table name of a GPU from its device name: "NVIDIA H100 80GB HBM3" -> nvidia-h100,
    "NVIDIA A100-SXM4-80GB" -> nvidia-a100, "NVIDIA L4" -> nvidia-l4."""
    vendor = "nvidia" if "nvidia" in name.lower() or not name else name.split()[0].lower()
    models = [word for word in re.findall(r"[A-Za-z]*\d+[A-Za-z]*", name.replace("-", " "))
              if not re.fullmatch(r"\d+GB", word, re.IGNORECASE)]
    return f"{vendor}-{models[0].lower()}" if models else vendor


def gpu_names() -> list[str]:
    """The GPUs this process may use. torch when a stage has loaded it already (it honours
    CUDA_VISIBLE_DEVICES); otherwise nvidia-smi: a stage that never touched torch is not made to
    import it (seconds) just to be priced."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            return []
        except Exception:  # noqa: BLE001 - a broken driver prices as a CPU machine, with a warning below
            logger.warning("cost: torch could not list the GPUs; priced as a CPU machine")
            return []
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    names = [line.strip() for line in out.splitlines() if line.strip()]
    if visible:
        wanted = {part.strip() for part in visible.split(",")}
        names = [name for index, name in enumerate(names) if str(index) in wanted]
    return names


def detect(params: CostParams, nodes: int = 1) -> Machine:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    names = gpu_names()
    kind = params.machine if params.machine != "auto" else (gpu_kind(names[0]) if names else "cpu")
    return Machine(kind=kind, cores=cores, gpus=len(names), gpu_name=names[0] if names else None, nodes=nodes)


def price_per_hour(machine: Machine, params: CostParams) -> float | None:
    """What the machine(s) cost per hour, or None when cost.prices has no row for its kind."""
    row = params.prices.get(machine.kind)
    if row is None:
        return None
    if row.per_gpu_hour is not None:
        return row.per_gpu_hour * machine.gpus * machine.nodes
    return row.per_core_hour * machine.cores * machine.nodes


def missing_price(machine: Machine, params: CostParams) -> str:
    unit = "gpu" if machine.gpus else "core"
    return (f"cost.prices has no row for machine kind '{machine.kind}' ({machine.key}); add "
            f"cost.prices.{machine.kind}: {{per_{unit}_hour: <price in {params.currency}>}} "
            "to params.yaml, or set cost.machine to a row it has")


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (the DeepSpeed ranks, dvc's stage)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def stage_nodes(stage: str, params: Params) -> int:
    """Nodes a stage held: train's world size over its processes per node (metrics.json, written by
    the ranks the DeepSpeed hostfile placed); every other stage runs on one."""
    if stage == "train":
        world = _read(params.paths.metrics("train")).get("world_size")
        if world:
            return max(1, int(world) // params.train.deepspeed.num_processes)
    return 1


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stage_tokens(stage: str, params: Params) -> dict[str, int]:
    """Tokens the stage processed, read from its own outputs (they are written in the ranks, so the
    parent process learns them there): prepare tokenised the splits, train read its batches,
    evaluate and quantize generated answers. Stages that tokenise nothing report none."""
    if stage == "prepare":
        metrics = _read(params.paths.metrics("prepare"))
        total = sum(int(split.get("tokens_total", 0)) for split in metrics.values() if isinstance(split, dict))
        return {"tokenised": total} if total else {}
    if stage == "train":
        metrics = _read(params.paths.metrics("train"))
        return {"trained": int(metrics["tokens_trained"])} if metrics.get("tokens_trained") else {}
    if stage == "evaluate":
        metrics = _read(params.paths.metrics("evaluate"))
        generated = sum(int(system.get("generated_tokens", 0)) for system in metrics.values()
                        if isinstance(system, dict))
        return {"generated": generated} if generated else {}
    if stage == "quantize":  # full precision and each variant answered the test examples on vLLM
        results = _read(params.paths.report("quantization_results"))
        runs = [results.get("full"), *(results.get("variants") or {}).values()]
        generated = sum(int(run["serving"]["generated_tokens"]) for run in runs if run)
        return {"generated": generated} if generated else {}
    return {}


def record(stage: str, machine: Machine, wall_seconds: float, used_cpu_seconds: float, tokens: dict[str, int],
           params: CostParams, started: float, notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cost record of one stage run: usage, and money where the price table prices the machine."""
    hourly = price_per_hour(machine, params)
    hours = wall_seconds / 3600
    processed = sum(tokens.values())
    money = None if hourly is None else hourly * hours
    return {
        "stage": stage,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "machine": asdict(machine) | {"key": machine.key},
        "wall_seconds": round(wall_seconds, 3),
        "cpu_seconds": round(used_cpu_seconds, 3),
        "core_hours": hours * machine.cores * machine.nodes,
        "gpu_hours": hours * machine.gpus * machine.nodes,
        "cpu_utilisation": round(used_cpu_seconds / (wall_seconds * machine.cores * machine.nodes), 4)
        if wall_seconds > 0 else None,
        "tokens": tokens,
        "tokens_processed": processed,
        "currency": params.currency,
        "price_per_hour": hourly,
        "cost": money,
        "cost_per_1k_tokens": money / processed * 1000 if money is not None and processed else None,
        **(notes or {}),
    }


# Fields a stage adds to its own record while it runs (train: the budget's estimate and any
# override reason), collected here by the meter of the process the stage runs in.
_NOTES: dict[str, Any] = {}


def note(**fields: Any) -> None:
    _NOTES.update(fields)


class Meter:
    """Measures one stage in this process: made before it runs, `finish` once it succeeded."""

    def __init__(self, stage: str, params: Params) -> None:
        self.stage, self.params = stage, params
        self.started = time.time()
        self._clock = time.perf_counter()
        self._cpu = cpu_seconds()
        _NOTES.clear()
        # A record of an earlier run is not this run's: gone until this one succeeds.
        remove_outputs(params.paths.cost(stage))

    def finish(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._clock
        machine = detect(self.params.cost, stage_nodes(self.stage, self.params))
        result = record(self.stage, machine, wall, cpu_seconds() - self._cpu,
                        stage_tokens(self.stage, self.params), self.params.cost, self.started, dict(_NOTES))
        if result["price_per_hour"] is None:
            logger.warning("%s: cost not priced: %s", self.stage, missing_price(machine, self.params.cost))
        atomic_write_json(self.params.paths.cost(self.stage), result)
        self._log_to_mlflow(result)
        money = "unpriced" if result["cost"] is None else f"{result['cost']:.4f} {result['currency']}"
        logger.info("%s: %.1f s on %s, %.4f core-h, %.4f GPU-h, %d tokens: %s", self.stage, wall, machine.key,
                    result["core_hours"], result["gpu_hours"], result["tokens_processed"], money)
        return result

    def _log_to_mlflow(self, result: dict[str, Any]) -> None:
        """train and evaluate have an MLflow run per stage run: the cost goes onto it."""
        if self.stage == "train":
            run_id = _read(self.params.paths.metrics("train")).get("mlflow_run_id")
        elif self.stage == "evaluate":
            run_id = _read(self.params.paths.report("evaluation_results")).get("mlflow_run_id")
        else:
            return
        if not run_id:
            return
        from pipelines.registry import tracking

        try:
            tracking.annotate_run(self.params.tracking, run_id, mlflow_metrics(result), mlflow_tags(result))
        except Exception as error:  # noqa: BLE001 - the stage's own work is done and recorded on disk
            logger.warning("%s: the cost record could not be logged to MLflow run %s (%s); it is in %s",
                           self.stage, run_id, str(error).splitlines()[0][:200], self.params.paths.cost(self.stage))


def mlflow_metrics(result: dict[str, Any]) -> dict[str, float]:
    keys = ("wall_seconds", "cpu_seconds", "core_hours", "gpu_hours", "tokens_processed", "cost", "cost_per_1k_tokens")
    return {f"cost.{key}": result[key] for key in keys if isinstance(result.get(key), (int, float))}


def mlflow_tags(result: dict[str, Any]) -> dict[str, str]:
    tags = {"cost.machine": result["machine"]["key"], "cost.currency": result["currency"]}
    for key in ("budget_estimate", "budget_override_reason"):
        if result.get(key) is not None:
            tags[f"cost.{key}"] = json.dumps(result[key]) if isinstance(result[key], dict) else str(result[key])
    return tags


def per_1k_tokens(price_per_hour: float | None, tokens_per_second: float) -> float | None:
    """What 1k generated tokens cost at this hourly price and rate (None: unpriced)."""
    return None if price_per_hour is None else price_per_hour / 3600 / tokens_per_second * 1000


class ServingCost:
    """What a generated token costs where it is served: the machine's price per hour over the
    generated tokens/s measured in the last `window` seconds (a sliding window of answered
    requests). An idle machine costs the same per hour, so low traffic shows as dear tokens: that
    is the figure to scale down by. Nothing generated in the window: not measured (None)."""

    def __init__(self, price_per_hour: float | None, window: float, now: float | None = None) -> None:
        self.price_per_hour, self.window = price_per_hour, window
        self.started = time.monotonic() if now is None else now
        self._events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int, now: float | None = None) -> None:
        if tokens > 0:
            self._events.append((time.monotonic() if now is None else now, tokens))

    def snapshot(self, now: float | None = None) -> tuple[float | None, float | None]:
        """(generated tokens/s, cost per 1k generated tokens) over the window ending now."""
        now = time.monotonic() if now is None else now
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()
        span = min(self.window, now - self.started)
        tokens = sum(count for _, count in self._events)
        if tokens == 0 or span <= 0:
            return None, None
        rate = tokens / span
        return rate, per_1k_tokens(self.price_per_hour, rate)
