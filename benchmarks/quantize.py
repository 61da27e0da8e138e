"""Benchmark: quantized variants of a fine-tuned model on vLLM against the full-precision model,
quality and cost side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quantize.py --base models/base --adapter models/adapter \
        --test data/prepared/test.parquet [--examples 100] [--clients 1,16] [--per-client 8]

1. The model: base + LoRA adapter merged (pipelines/model/packaging.write_merged: what `register`
   logs and the engine serves), kept in float32 (`--dtype` is what vLLM computes in).
2. Each variant of params.yaml `quantize.variants` that vLLM serves on this machine's device
   (pipelines/quantization/variants.py), made with llm-compressor in .venv-quantize.
3. For the full-precision model and each variant, one after the other, one vLLM engine each
   (EngineProcess with params.yaml `serve.engine`): start-up time; answers to the first
   `--examples` test-split prompts (their rendered prompt_text on /v1/completions, greedy,
   evaluate.decoding.max_new_tokens, as `evaluate` generates) scored against the references
   (ROUGE-L, BLEU, exact match) with a paired bootstrap of variant minus full precision (the
   method of `evaluate`, pipelines/evaluation/metrics.py); closed-loop throughput at each
   `--clients` (benchmarks/serve.closed_loop, chat requests); resident memory of the engine's
   processes after the load.
Prints Markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.serve import closed_loop  # noqa: E402


def answers(url: str, headers: dict, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    import requests

    def one(prompt: str) -> str:
        response = requests.post(f"{url}/v1/completions", headers=headers, timeout=600, json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        response.raise_for_status()
        return response.json()["choices"][0]["text"].strip()

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--per-client", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    import numpy as np
    import pandas as pd

    from pipelines.config.params import load_params
    from pipelines.config.settings import quantize_python
    from pipelines.evaluation.metrics import Scores, corpus_bleu, paired_bootstrap
    from pipelines.model.packaging import write_merged
    from pipelines.quantization.variants import quantize, servable
    from pipelines.serving.engine import EngineConfig, EngineProcess, resolve_device

    params = load_params(REPO / "params.yaml", [f"serve.dtype={args.dtype}"])
    config = EngineConfig.from_params(params.serve)
    device = resolve_device(params.serve.engine.device)
    frame = pd.read_parquet(args.test).head(args.examples)
    prompts, references = list(frame["prompt_text"]), list(frame["response"])
    chat_prompts = list(frame["prompt"])
    max_tokens = params.evaluate.decoding.max_new_tokens
    clients = [int(c) for c in args.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="quantize-bench-"))

    started = time.perf_counter()
    models = {"full precision": write_merged(args.base, args.adapter, tmp / "merged")}
    print(f"merged in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    made = {}
    for variant in params.quantize.variants:
        if not servable(variant, device):
            print(f"{variant.name} ({variant.scheme}): not served by vLLM on {device}; skipped", file=sys.stderr)
            continue
        made[variant.name] = quantize(str(quantize_python(params.quantize).value), models["full precision"],
                                      tmp / variant.name, variant)
        models[variant.name] = tmp / variant.name

    rows = {}
    for name, folder in models.items():
        engine = EngineProcess(config, folder, "m", name, tmp / f"{name}.log")
        engine.start()
        try:
            ready = engine.wait_ready()
            texts = answers(engine.url, engine.headers(), "m", prompts, max_tokens)
            loads = {c: closed_loop(engine.url, engine.headers(), "m", chat_prompts, c, args.per_client, max_tokens,
                                    params.prepare.system_prompt) for c in clients}
            rss = engine.rss_bytes()
        finally:
            engine.stop()
        rows[name] = {"ready": ready, "texts": texts, "loads": loads, "rss": rss,
                      "bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())}
        print(f"{name}: ready in {ready:.0f} s, {rows[name]['loads']}", file=sys.stderr)

    zeros, ones = np.zeros(len(references)), np.ones(len(references))  # no perplexity through the engine
    scores = {name: Scores(row["texts"], references, zeros, ones) for name, row in rows.items()}
    print(f"Command: `{' '.join(sys.argv)}`. Machine: {platform.processor() or platform.machine()}, "
          f"{len(__import__('os').sched_getaffinity(0))} cores, vLLM on {device}, dtype {args.dtype}; "
          f"{len(references)} test examples, greedy, max_tokens {max_tokens}; "
          f"{args.per_client} requests per client.\n")
    header = ["model", "on disk (MiB)", "start-up (s)", "RSS (MiB)",
              *[f"req/s at {c}" for c in clients], *[f"tokens/s at {c}" for c in clients],
              "ROUGE-L", "vs full precision (95% CI)", "BLEU", "exact match"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    full = scores["full precision"]
    for name, row in rows.items():
        per = scores[name].per_example()
        if name == "full precision":
            delta = "(reference)"
        else:
            diff = paired_bootstrap(scores[name], full, samples=1000, confidence=0.95, seed=0)["rouge_l"]
            delta = f"{diff.improvement:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}]"
        cells = [name, f"{row['bytes'] / 2**20:.0f}", f"{row['ready']:.0f}", f"{row['rss'] / 2**20:.0f}",
                 *[f"{row['loads'][c]['requests_per_second']:.2f}" for c in clients],
                 *[f"{row['loads'][c]['tokens_per_second']:.0f}" for c in clients],
                 f"{per['rouge_l'].mean():.4f}", delta, f"{corpus_bleu(row['texts'], references):.4f}",
                 f"{per['exact_match'].mean():.3f}"]
        print("| " + " | ".join(cells) + " |")
    failures = {name: {c: row["loads"][c]["failures"] for c in clients} for name, row in rows.items()}
    print(f"\nFailed requests: {failures}. Variants made: "
          + ", ".join(f"{n} in {r['seconds']:.0f} s (llm-compressor {r['llmcompressor']})" for n, r in made.items()))


if __name__ == "__main__":
    main()
