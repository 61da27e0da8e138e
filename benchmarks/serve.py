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


def busy_seconds() -> tuple[float, float, float]:
    """(CPU seconds every process has used since boot, CPU seconds of this process and its
    waited-for children, seconds the hypervisor gave to other guests): the first minus the
    second over a run is what other processes took."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    times = os.times()
    return ((user + nice + system + irq + softirq) / tick,
            times.user + times.system + times.children_user + times.children_system, steal / tick)


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
    def mode(rows: list[list[int]], took: float, loop: ContinuousBatch | None = None) -> dict:
        result = {"seconds": took, "tokens": sum(map(len, rows)), "rows_per_step": size,
                  "same": sum(a == b for a, b in zip(rows, answers))}
        if loop is not None:
            result.update(rows_per_step=loop.rows_stepped / max(1, loop.steps), steps=loop.steps,
                          step_seconds=loop.step_seconds, prefills=loop.prefills, prompts=loop.prompts_prefilled,
                          prefill_seconds=loop.prefill_seconds, reused=loop.prefix_tokens_reused)
        return result

    result = {"version": handle.version, "requests": len(texts), "seconds": seconds,
              "tokens": sum(map(len, answers)), "latencies": latencies, "batched": mode(batched, batched_seconds)}
    # the loop with and without reusing the prompts' shared start (template + system prompt)
    for key, reuse in (("continuous_no_reuse", False), ("continuous", True)):
        loop = ContinuousBatch(handle.lm, size, reuse_prefix=reuse)
        started = time.perf_counter()
        rows = handle.lm.generate_continuous(texts, decoding, max_rows=size, batch=loop)
        result[key] = mode(rows, time.perf_counter() - started, loop)
    return result


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


COUNTERS = ("llmops_batch_size_count", "llmops_batch_size_sum", "llmops_decode_step_seconds_sum",
            "llmops_prefill_seconds_count", "llmops_prefill_seconds_sum")


def batch_counts(url: str) -> dict[str, float]:
    """Decoding steps, requests in them, seconds in steps and in prefills so far, from /metrics."""
    import requests

    text = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(COUNTERS)}
    return {name: values.get(name, 0.0) for name in COUNTERS}


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

    started, (busy_before, own_before, steal_before) = time.perf_counter(), busy_seconds()
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
                    delta = {name: after[name] - before[name] for name in COUNTERS}
                    steps = max(1.0, delta["llmops_batch_size_count"])
                    results[c]["mean_batch"] = delta["llmops_batch_size_sum"] / steps
                    results[c]["worker"] = delta
            finally:
                server.terminate()
                server.wait(timeout=60)

    busy_after, own_after, steal_after = busy_seconds()
    others = (busy_after - busy_before) - (own_after - own_before)
    print(f"\nCPU time other processes used during the run: {others:.1f} s in {time.perf_counter() - started:.0f} s, "
          f"stolen by the hypervisor: {steal_after - steal_before:.1f} s (near 0: the figures are undisturbed)")
    print(f"\nmodel: champion v{sequential['version']}\n")
    print("| mode | clients | requests | errors | requests/s | tokens/s | p50 latency (s) | p95 latency (s) |"
          " rows per step | vs sequential |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lat = sequential["latencies"]
    print(f"| in-process, sequential | 1 | {sequential['requests']} | 0 | {seq_rps:.2f} | "
          f"{sequential['tokens'] / sequential['seconds']:.1f} | {percentile(lat, 50):.2f} | "
          f"{percentile(lat, 95):.2f} | 1 | 1.00x |")
    modes = (("batched", "static batches"), ("continuous_no_reuse", "continuous batching, no prefix reuse"),
             ("continuous", "continuous batching"))
    for key, label in modes:
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
    print("\nwhere the continuous loop spent its time (the server's from /metrics):\n")
    print("| run | wall (s) | decoding steps | in steps (s) | ms per step | prefills | prompts per prefill |"
          " in prefills (s) | elsewhere (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, label in (("continuous_no_reuse", "in-process, no prefix reuse"), ("continuous", "in-process")):
        if key in sequential:
            loop = sequential[key]
            took = loop["seconds"]
            print(f"| {label} | {took:.1f} | {loop['steps']} | {loop['step_seconds']:.1f} | "
                  f"{1000 * loop['step_seconds'] / max(1, loop['steps']):.0f} | {loop['prefills']} | "
                  f"{loop['prompts'] / max(1, loop['prefills']):.1f} | {loop['prefill_seconds']:.1f} | "
                  f"{took - loop['step_seconds'] - loop['prefill_seconds']:.1f} |")
    for clients, r in results.items():
        w = r["worker"]
        steps, prefills = w["llmops_batch_size_count"], w["llmops_prefill_seconds_count"]
        in_steps, in_prefills = w["llmops_decode_step_seconds_sum"], w["llmops_prefill_seconds_sum"]
        print(f"| serve, {clients} clients | {r['seconds']:.1f} | {steps:.0f} | {in_steps:.1f} | "
              f"{1000 * in_steps / max(1, steps):.0f} | "
              f"{prefills:.0f} | {r['requests'] / max(1, prefills):.1f} | {in_prefills:.1f} | "
              f"{r['seconds'] - in_steps - in_prefills:.1f} |")
    for key, label in modes:
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
