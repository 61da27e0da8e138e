"""Benchmark: `llmops serve` throughput and latency at 1, 4 and 16 concurrent clients, against
sequential in-process generation on the same model in the same run.

    make demo        # once: a registered champion in mlflow.db
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve.py [--requests-per-client 8] [--max-tokens 48]

1. In-process, sequential: the champion loaded with the server's own loader
   (`pipelines.serve.ModelSource`), each prompt answered alone by `generate_ids` (one
   `generate` call), one after another. This is what a caller without a server gets. Then the
   same prompts in static batches of `serve.max_batch_size` (`generate_ids` on each slice), and
   through the continuous batching loop the server's worker runs
   (`CausalLM.generate_continuous`, up to `serve.max_batch_size` rows, all prompts queued at
   the start), both in-process; their answers are checked against the sequential ones.
2. The real service: `llmops serve` started as a process on a free loopback port (its own
   temporary inference log), then for each concurrency c, c client threads each send
   `--requests-per-client` chat requests (prompts from the test split, greedy,
   `max_tokens` fixed) and wait for each answer before sending the next.
3. Per-request server overhead: at c=1, the median over the same prompts of the server's
   latency minus the in-process latency (HTTP, JSON, auth, queueing, logging).

Requests/s are the ratio that matters: the same prompts, the same model, the same machine,
measured one after the other in one run. Prints Markdown tables for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKEN = "benchmark-token-0123456789abcdef"


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def in_process(params, prompts: list[str], max_tokens: int) -> dict:
    from pipelines.lm import ContinuousBatch, Decoding
    from pipelines.serve import ModelSource

    source = ModelSource(params)
    handle = source.load(source.current_version())
    texts = [handle.render_chat([{"role": "user", "content": p}]) for p in prompts]
    decoding = Decoding(max_new_tokens=max_tokens)
    handle.lm.generate_ids(texts[:1], decoding)  # warm-up
    latencies, answers = [], []
    started = time.perf_counter()
    for text in texts:
        t = time.perf_counter()
        answers.append(handle.lm.generate_ids([text], decoding)[0])
        latencies.append(time.perf_counter() - t)
    seconds = time.perf_counter() - started
    size = params.serve.max_batch_size
    # static batches of max_batch_size: a batch runs until its longest answer ends
    batched_started = time.perf_counter()
    batched = [row for offset in range(0, len(texts), size)
               for row in handle.lm.generate_ids(texts[offset: offset + size], decoding)]
    batched_seconds = time.perf_counter() - batched_started
    # the server worker's loop without the server: finished rows are refilled at the next step
    loop = ContinuousBatch(handle.lm, size)
    continuous_started = time.perf_counter()
    continuous = handle.lm.generate_continuous(texts, decoding, max_rows=size, batch=loop)
    continuous_seconds = time.perf_counter() - continuous_started

    def mode(rows: list[list[int]], took: float, rows_per_step: float) -> dict:
        return {"seconds": took, "tokens": sum(map(len, rows)), "rows_per_step": rows_per_step,
                "same": sum(a == b for a, b in zip(rows, answers))}

    return {"version": handle.version, "requests": len(texts), "seconds": seconds, "tokens": sum(map(len, answers)),
            "latencies": latencies, "batched": mode(batched, batched_seconds, size),
            "continuous": mode(continuous, continuous_seconds, loop.rows_stepped / max(1, loop.steps))}


def load(url: str, prompts: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    import requests

    latencies: list[float] = []
    statuses: list[int] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(k: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        barrier.wait()
        for i in range(per_client):
            prompt = prompts[(k * per_client + i) % len(prompts)]
            t = time.perf_counter()
            response = session.post(f"{url}/v1/chat/completions", timeout=600,
                                    json={"messages": [{"role": "user", "content": prompt}],
                                          "max_tokens": max_tokens, "temperature": 0})
            elapsed = time.perf_counter() - t
            with lock:
                latencies.append(elapsed)
                statuses.append(response.status_code)
                if response.ok:
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"requests": len(statuses), "errors": sum(s != 200 for s in statuses), "seconds": seconds,
            "tokens": tokens[0], "latencies": latencies}


def batch_counts(url: str) -> tuple[float, float]:
    """(decoding steps, requests in them) so far, from the server's /metrics."""
    import requests

    text = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("llmops_batch_size_count", "llmops_batch_size_sum"))}
    return values.get("llmops_batch_size_count", 0.0), values.get("llmops_batch_size_sum", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--sequential", type=int, default=32,
                        help="prompts answered in-process, one at a time (and in static batches)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params override for both the server and the in-process run, e.g. serve.dtype=bfloat16")
    parser.add_argument("--skip-sequential", action="store_true")
    args = parser.parse_args()

    import pandas as pd
    import torch

    from pipelines.params import load_params
    from tests.support import free_port, wait_http

    os.chdir(REPO)
    params = load_params(REPO / "params.yaml", args.overrides)
    prompts = list(pd.read_parquet(REPO / params.paths.prepared_dir / "test.parquet")["prompt"].head(256))
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); load average at start "
          f"{os.getloadavg()[0]:.2f}; max_tokens {args.max_tokens}, greedy, dtype {params.serve.dtype}, "
          f"max_batch_size {params.serve.max_batch_size}, max_wait_ms {params.serve.max_wait_ms:g}")

    sequential = (in_process(params, prompts[: args.sequential], args.max_tokens) if not args.skip_sequential
                  else {"version": "?", "requests": 1, "seconds": 1.0, "tokens": 0, "latencies": [0.0]})
    seq_rps = sequential["requests"] / sequential["seconds"]

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        command = [str(REPO / ".venv/bin/llmops"), "serve", "--set", f"serve.port={port}",
                   "--set", f"inference_log.url=sqlite:///{tmp}/inference.db",
                   "--set", f"inference_log.spool_dir={tmp}/spool", "--set", "serve.queue_size=256",
                   *[x for o in args.overrides for x in ("--set", o)]]
        env = {**os.environ, "LLMOPS_API_TOKEN": TOKEN}
        with open(Path(tmp) / "serve.log", "wb") as log:
            server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_http(f"http://127.0.0.1:{port}/ready", 300, server)
                url = f"http://127.0.0.1:{port}"
                load(url, prompts, 1, 1, args.max_tokens)  # warm-up
                results = {}
                for c in levels:
                    before = batch_counts(url)
                    results[c] = load(url, prompts, c, args.requests_per_client, args.max_tokens)
                    after = batch_counts(url)
                    results[c]["mean_batch"] = (after[1] - before[1]) / max(1.0, after[0] - before[0])
            finally:
                server.terminate()
                server.wait(timeout=60)

    print(f"\nmodel: champion v{sequential['version']}\n")
    print("| mode | clients | requests | errors | requests/s | tokens/s | p50 latency (s) | p95 latency (s) |"
          " rows per step | vs sequential |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lat = sequential["latencies"]
    print(f"| in-process, sequential | 1 | {sequential['requests']} | 0 | {seq_rps:.2f} | "
          f"{sequential['tokens'] / sequential['seconds']:.1f} | {percentile(lat, 50):.2f} | "
          f"{percentile(lat, 95):.2f} | 1 | 1.00x |")
    for key, label in (("batched", "static batches"), ("continuous", "continuous batching")):
        if key in sequential:
            b = sequential[key]
            rps = sequential["requests"] / b["seconds"]
            print(f"| in-process, {label} (no server) | - | {sequential['requests']} | 0 | {rps:.2f} | "
                  f"{b['tokens'] / b['seconds']:.1f} | - | - | {b['rows_per_step']:.1f} | {rps / seq_rps:.2f}x |")
    for clients, r in results.items():
        rps = r["requests"] / r["seconds"]
        print(f"| llmops serve | {clients} | {r['requests']} | {r['errors']} | {rps:.2f} | "
              f"{r['tokens'] / r['seconds']:.1f} | {percentile(r['latencies'], 50):.2f} | "
              f"{percentile(r['latencies'], 95):.2f} | {r['mean_batch']:.1f} | {rps / seq_rps:.2f}x |")
    for key, label in (("batched", "static batches"), ("continuous", "continuous batching")):
        if key in sequential:
            print(f"\n{label}: {sequential[key]['same']} of {sequential['requests']} answers identical to the "
                  "sequential ones", end="")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if 1 in results:  # client 0 sent prompts 0..n-1, the first n the sequential run answered
        pairs = list(zip(results[1]["latencies"], lat))
        overhead = statistics.median(server - alone for server, alone in pairs)
        print(f"\nper-request server overhead at 1 client (median over {len(pairs)} same-prompt pairs of server "
              f"latency minus in-process latency): {overhead * 1000:.0f} ms")


if __name__ == "__main__":
    main()
