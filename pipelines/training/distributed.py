"""Running a stage on several processes: the DeepSpeed launch command, rank helpers, ZeRO configs.

`llmops train` with `train.deepspeed.num_processes > 1` (or a hostfile, or a ZeRO config)
re-launches itself through the `deepspeed` launcher: `launch_command` builds that command
from the params (a pure function, unit-tested), the ranks run `python -m pipelines.training.loop`.
On machines without CUDA the ranks use DeepSpeed's CPU accelerator (env DS_ACCELERATOR=cpu)
and the gloo backend, and share the cores (OMP_NUM_THREADS = cores / processes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from pipelines.config.params import DeepSpeedParams
from pipelines.errors import LLMOpsError

logger = logging.getLogger(__name__)

RANK_MODULE = "pipelines.training.loop"
_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


class LaunchError(LLMOpsError):
    """The distributed setup (ZeRO config, hostfile, launcher, hardware) is wrong or failed."""


# --- ranks -------------------------------------------------------------------------------

def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return rank() == 0


def in_launched_rank() -> bool:
    """True inside a process started by a distributed launcher (deepspeed, torchrun)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def configure_rank_logging(verbose: bool = False) -> None:
    """INFO (or DEBUG) on rank 0, WARNING elsewhere; DeepSpeed's own logger at WARNING."""
    level = (logging.DEBUG if verbose else logging.INFO) if is_rank_zero() else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s [rank {rank()}] %(name)s: %(message)s",
                        force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not is_rank_zero():
        warnings.simplefilter("ignore")  # the same warnings as rank 0's, once per rank


def init_cpu_deepspeed_state() -> None:
    """Set up accelerate's process state for DeepSpeed ranks on CPU (gloo).

    TrainingArguments does not pass `ddp_backend` to accelerate when a DeepSpeed config is
    given; on a machine without a GPU accelerate then finds no backend, counts one process
    and the Trainer fills DeepSpeed's batch size for one (DeepSpeed then fails its batch
    assertion). Configuring the state first, and passing
    `accelerator_config={"use_configured_state": True}`, fixes the count
    (transformers 5.23, accelerate 1.15).
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


# --- the launch command ------------------------------------------------------------------

def parse_hostfile(path: Path) -> dict[str, int]:
    """`host slots=N` lines (comments and blank lines ignored) -> {host: slots}."""
    if not Path(path).is_file():
        raise LaunchError(f"train.deepspeed.hostfile: {path} does not exist; give a file of 'host slots=N' lines "
                          "or set it to null for a single machine")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOSTFILE_LINE.match(line)
        if not match or int(match.group(2)) < 1:
            raise LaunchError(f"train.deepspeed.hostfile: {path} line {number} is {raw.strip()!r}; "
                              "expected 'hostname slots=N' with N >= 1")
        if match.group(1) in hosts:
            raise LaunchError(f"train.deepspeed.hostfile: {path} lists host {match.group(1)} twice; keep one line")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise LaunchError(f"train.deepspeed.hostfile: {path} lists no hosts; add 'hostname slots=N' lines")
    return hosts


def needs_launch(params: DeepSpeedParams) -> bool:
    """Whether `llmops train` must re-launch itself through the deepspeed launcher."""
    return params.num_processes > 1 or params.hostfile is not None or params.config is not None


def launch_command(params: DeepSpeedParams, rank_args: list[str], *, cuda: bool, cpu_count: int,
                   launcher: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The `deepspeed` command that starts the ranks, and the environment it needs.

    `num_processes` is per node; with a hostfile, every host listed runs that many
    processes and the master address defaults to the first host. Pure: reads the hostfile,
    touches nothing else.
    """
    launcher = launcher or default_launcher()
    command = [*launcher, "--num_accelerators", str(params.num_processes), "--master_port", str(params.master_port)]
    master_addr = params.master_addr
    if params.hostfile is not None:
        hosts = parse_hostfile(params.hostfile)
        too_few = {host: slots for host, slots in hosts.items() if slots < params.num_processes}
        if too_few:
            raise LaunchError(
                f"train.deepspeed.num_processes is {params.num_processes} per node but the hostfile "
                f"{params.hostfile} gives fewer slots on {', '.join(f'{h} ({s})' for h, s in too_few.items())}; "
                "lower num_processes or raise the slots"
            )
        command += ["--hostfile", str(params.hostfile)]
        master_addr = master_addr or next(iter(hosts))
    command += ["--master_addr", master_addr or "127.0.0.1"]
    command += ["--no_local_rank", "--module", RANK_MODULE, *rank_args]
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(max(1, cpu_count // params.num_processes))
    return command, env


def default_launcher() -> list[str]:
    """The `deepspeed` script of this interpreter's environment (or the runner module)."""
    script = Path(sys.executable).with_name("deepspeed")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]


# --- ZeRO configs ------------------------------------------------------------------------

def read_deepspeed_config(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        available = ", ".join(sorted(str(p) for p in Path("configs/deepspeed").glob("*.json"))) or "none found"
        raise LaunchError(f"train.deepspeed.config: {path} does not exist; use one of: {available}, or null")
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise LaunchError(f"train.deepspeed.config: {path} is not valid JSON ({error}); fix the file") from None
    if not isinstance(config, dict):
        raise LaunchError(f"train.deepspeed.config: {path} must hold a JSON object, got {type(config).__name__}")
    return config


def _without_auto(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _without_auto(value) for key, value in node.items() if value != "auto"}
    return node


def check_deepspeed_config(path: Path, micro_batch: int, grad_accum: int, precision: str,
                           max_grad_norm: float) -> dict[str, Any]:
    """Have DeepSpeed parse the config (its own validation) with the "auto" values filled.

    Fills what the Trainer fills (batch sizes, clipping, precision) and drops the other
    "auto" values so DeepSpeed's defaults stand in; an unknown key, a wrong type or an
    impossible ZeRO stage is reported with DeepSpeed's message.
    """
    config = read_deepspeed_config(path)
    filled = _without_auto(config)
    filled["train_micro_batch_size_per_gpu"] = micro_batch
    filled["gradient_accumulation_steps"] = grad_accum
    filled["train_batch_size"] = micro_batch * grad_accum  # validated for one process
    filled.setdefault("gradient_clipping", max_grad_norm)
    for key in ("bf16", "fp16"):
        section = filled.get(key)
        if isinstance(section, dict):
            section["enabled"] = section.get("enabled", key == precision)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_available() else "cuda")
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(filled)
    except Exception as error:  # noqa: BLE001 - DeepSpeed raises ValidationError, AssertionError, ValueError...
        message = re.sub(r"\s*For further information visit \S+", "", " ".join(str(error).split()))
        raise LaunchError(
            f"train.deepspeed.config: DeepSpeed rejects {path}: {message[:600]}; fix the file or use one of "
            "configs/deepspeed/zero{0,1,2,3}.json"
        ) from None
    return config


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
