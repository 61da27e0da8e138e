"""Benchmark: Great Expectations suite throughput and no-op `dvc repro` wall time.

    python benchmarks/validate_throughput.py [--rows 10000 100000 1000000] [--repeats 3]

Synthetic rows are the committed WordNet sample resampled with replacement (ids made
unique), so text lengths and the regex work per row are those of real data. Token
columns are filled from character counts: the benchmark measures the GX suite (27
expectations from params.yaml), not the tokenizer. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synthetic(rows: int):
    import numpy as np

    from pipelines.config.params import BundledSource
    from pipelines.data.sources import ingest

    base, _ = ingest([BundledSource(kind="bundled", name="wordnet")], REPO / "data" / "sample")
    picks = np.random.default_rng(0).integers(0, len(base), rows)
    frame = base.iloc[picks].reset_index(drop=True)
    frame["id"] = [f"syn-{i}" for i in range(rows)]
    frame["n_prompt_tokens"] = frame["prompt"].str.len() // 4
    frame["n_response_tokens"] = frame["response"].str.len() // 4
    from pipelines.config.params import load_params
    from pipelines.data.validation import add_split_columns

    return add_split_columns(frame, load_params(REPO / "params.yaml").prepare)  # split, answers_per_prompt


def bench_suite(rows: int, repeats: int) -> tuple[float, float]:
    from pipelines.config.params import load_params
    from pipelines.data.validation import run_suite

    params = load_params(REPO / "params.yaml").validate_.model_copy(update={"warn_only": ["unique_pairs"]})
    frame = synthetic(rows)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outcomes, _ = run_suite(frame, params)
        times.append(time.perf_counter() - start)
    failed = [o.name for o in outcomes if not o.success]
    assert failed == ["unique_pairs"], failed  # resampling duplicates pairs; everything else passes
    best = min(times)
    return best, rows / best


def bench_noop_repro(repeats: int) -> float:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "repro", "-q"], cwd=REPO, env=env, check=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([dvc, "repro"], cwd=REPO, env=env, check=True, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        assert "Running stage" not in out.stdout, out.stdout
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("\n| rows | best of runs (s) | rows/s | peak RSS so far (MiB) |\n|---:|---:|---:|---:|")
    for rows in args.rows:
        seconds, rate = bench_suite(rows, args.repeats if rows < 1_000_000 else 1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {rows:,} | {seconds:.2f} | {rate:,.0f} | {peak:,.0f} |", flush=True)
    print(f"\nno-op `dvc repro` (3 stages, median of {args.repeats}): {bench_noop_repro(args.repeats):.2f} s")


if __name__ == "__main__":
    main()
