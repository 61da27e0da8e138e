"""Benchmark: evaluation generation throughput, batched vs one prompt at a time.

    python benchmarks/eval_throughput.py [--examples 48] [--batch-size 16] [--rounds 2]

Uses the evaluate stage's own generation code (pipelines.model.lm.CausalLM.generate) on the
base model folder plus the trained adapter (models/base, models/adapter: run `dvc repro
train` first) and the first N prompts of the test split, greedy decoding with the params'
max_new_tokens. The two modes alternate for `--rounds` rounds; medians are reported, and
the ratio is measured side by side in one run. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base", type=Path, default=REPO / "models/base")
    parser.add_argument("--adapter", type=Path, default=REPO / "models/adapter")
    args = parser.parse_args()

    import pandas as pd
    import torch

    from pipelines.config.params import load_params
    from pipelines.model.lm import CausalLM, Decoding

    params = load_params(REPO / "params.yaml")
    decoding = Decoding(**params.evaluate.decoding.model_dump())
    prompts = list(pd.read_parquet(REPO / "data/prepared/test.parquet")["prompt_text"].head(args.examples))
    lm = CausalLM.load(args.base, args.adapter, dtype=params.evaluate.dtype)
    lm.generate(prompts[:2], decoding, batch_size=2)  # warm-up
    runs: dict[str, list] = {"batched": [], "one at a time": []}
    for _ in range(args.rounds):
        runs["batched"].append(lm.generate(prompts, decoding, batch_size=args.batch_size))
        runs["one at a time"].append(lm.generate(prompts, decoding, batch_size=1))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.examples} prompts, max_new_tokens={decoding.max_new_tokens}, "
          f"dtype={params.evaluate.dtype}, load average {os.getloadavg()[0]:.2f}")
    print("\n| mode | batch | examples/s | generated tokens/s | seconds |\n|---|---:|---:|---:|---:|")
    medians = {}
    for mode, generations in runs.items():
        seconds = statistics.median(g.seconds for g in generations)
        tokens = statistics.median(sum(g.new_tokens) for g in generations)
        medians[mode] = args.examples / seconds
        batch = args.batch_size if mode == "batched" else 1
        print(f"| {mode} | {batch} | {args.examples / seconds:.2f} | {tokens / seconds:.1f} | {seconds:.1f} |")
    same = runs["batched"][0].texts == runs["one at a time"][0].texts
    print(f"\nbatched / one at a time: {medians['batched'] / medians['one at a time']:.2f}x examples/s; "
          f"identical answers in both modes: {same}")


if __name__ == "__main__":
    main()
