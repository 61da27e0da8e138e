"""Benchmark: serving the champion on vLLM, directly and through the `llmops serve` gateway, at 1, 4
and 16 concurrent clients, against sequential in-process generation, in one run.

    make demo        # once: a registered champion in mlflow.db
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve.py [--dtypes float32,bfloat16] [--max-tokens 48]

For each dtype:
1. In-process, sequential: the champion loaded with MLflow's pyfunc loader (transformers on the
   merged weights, what `evaluate` generates with), each test-split prompt answered alone by
   `generate_ids`, one after another: what a caller without a server gets.
2. vLLM direct: one engine (`pipelines.serving.engine.EngineProcess`, the gateway's own launcher and
   settings from params.yaml `serve.engine`) on the version's merged weights; c client threads
   each send chat requests (greedy, `max_tokens` fixed, the configured system prompt) and wait
   for each answer before sending the next. Start-up time and resident memory are reported.
3. The gateway in front of the same engine: `llmops serve` as a process with `serve.engine.url`
   pointing at it (so both rows measure one engine), the same clients and prompts; it adds
   auth, validation, token counting, admission and the inference log (a temporary SQLite).

Every request carries a distinct test-split prompt, and the engine's prefix cache is emptied
before each measured run (its hit rate is reported): only the system prompt is shared, as in
production. Requests/s are the ratio that matters: the same prompts, model and machine, measured one after
the other in one run; `--variant KEY=VALUE[,...]` adds another engine (e.g. without the CPU
preloads, or with the engine core in the API server's process) measured directly in the same
run, so that engine settings are compared side by side. Prints Markdown for
benchmarks/RESULTS.md. On a GPU machine with the CUDA build of vLLM in .venv-vllm (`make install`
there), the same command measures the GPU engine.
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


def steal_seconds() -> float:
    """Seconds the hypervisor has given to other guests since boot (/proc/stat)."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8]) / os.sysconf("SC_CLK_TCK")


def sequential(params, version: str, prompts: list[str], max_tokens: int, dtype: str) -> dict:
    from pipelines.model.lm import Decoding
    from pipelines.model.packaging import load_registered
    from pipelines.registry.model_registry import Registry

    # the project's loader (data only, no pickle), in the dtype asked for
    generator = load_registered(Registry(params), version, dtype)
    lm, config = generator.lm, generator.config
    texts = [lm.tokenizer.apply_chat_template([{"role": "system", "content": config["system_prompt"]},
                                               {"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    decoding = Decoding(max_new_tokens=max_tokens)
    lm.generate_ids(texts[:1], decoding)  # warm-up
    started, tokens = time.perf_counter(), 0
    for text in texts:
        tokens += len(lm.generate_ids([text], decoding)[0])
    seconds = time.perf_counter() - started
    return {"requests_per_second": len(texts) / seconds, "tokens_per_second": tokens / seconds}


def closed_loop(url: str, headers: dict, model: str, prompts: list[str], clients: int, per_client: int,
                max_tokens: int, system: str | None) -> dict:
    import requests

    latencies: list[float] = []
    tokens = [0]
    failures = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        session = requests.Session()
        for i in range(per_client):
            prompt = prompts[(k * per_client + i) % len(prompts)]
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            t = time.perf_counter()
            response = session.post(f"{url}/v1/chat/completions", headers=headers, timeout=600,
                                    json={"model": model, "messages": messages, "max_tokens": max_tokens,
                                          "temperature": 0})
            took = time.perf_counter() - t
            with lock:
                if response.status_code != 200:
                    failures[0] += 1
                    continue
                latencies.append(took)
                tokens[0] += response.json()["usage"]["completion_tokens"]

    closed_loop_warm(url, headers, model, "warm-up", max_tokens, system)
    before = steal_seconds()
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    steal = steal_seconds() - before
    return {"requests_per_second": len(latencies) / seconds, "tokens_per_second": tokens[0] / seconds,
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p95": sorted(latencies)[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
            "failures": failures[0], "steal_seconds": steal, "seconds": seconds}


def reset_prefix_cache(engine) -> None:
    """Empty the engine's prefix cache (a dev endpoint, enabled for the benchmark's own engines by
    VLLM_SERVER_DEV_MODE), so that no run finds the prompts of the run before it in the cache."""
    import requests

    for _ in range(50):
        response = requests.post(f"{engine.url}/reset_prefix_cache", headers=engine.headers(), timeout=30)
        response.raise_for_status()
        if response.json().get("success"):
            return
        time.sleep(0.2)  # blocks still held by requests finishing
    raise RuntimeError("the engine would not empty its prefix cache")


def prefix_cache(engine, before: tuple[float, float] | None = None):
    """vLLM's prefix-cache counters (prompt tokens looked up, found), from the engine's /metrics;
    with `before`, the share of prompt tokens found since then."""
    import requests

    text = requests.get(f"{engine.url}/metrics", headers=engine.headers(), timeout=30).text
    totals = {"queries": 0.0, "hits": 0.0}
    for line in text.splitlines():
        for name in totals:
            if line.startswith(f"vllm:prefix_cache_{name}_total"):
                totals[name] += float(line.rsplit(" ", 1)[1])
    now = (totals["queries"], totals["hits"])
    if before is None:
        return now
    queries = now[0] - before[0]
    return (now[1] - before[1]) / queries if queries else float("nan")


def closed_loop_warm(url: str, headers: dict, model: str, prompt: str, max_tokens: int, system: str | None) -> None:
    import requests

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    requests.post(f"{url}/v1/chat/completions", headers=headers, timeout=600,
                  json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})


def gateway_process(params_file: Path, overrides: list[str], engine_url: str, engine_key: str, tmp: Path,
                    port: int) -> subprocess.Popen:
    from tests.support import wait_http

    sets = [*overrides, f"serve.port={port}", f"serve.engine.url={engine_url}",
            f"inference_log.url=sqlite:///{tmp / 'inference.db'}", f"inference_log.spool_dir={tmp / 'spool'}",
            f"serve.engine.cache_dir={tmp / 'models'}", "serve.queue_size=256"]
    command = [sys.executable, "-m", "pipelines.cli", "serve", "--params", str(params_file),
               *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "LLMOPS_API_TOKEN": TOKEN, "LLMOPS_VLLM_API_KEY": engine_key}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=open(tmp / "gateway.log", "wb"),  # noqa: SIM115
                               stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/ready", 300, process)
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompts", type=int, default=32, help="test-split prompts (default 32)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests-at-one", type=int, default=16, help="requests of the single client")
    # 64 requests at 16 clients (4 each) measured mostly the run's ragged end, where a few clients
    # finish alone (benchmarks/RESULTS.md, serving run 5)
    parser.add_argument("--requests", type=int, default=256,
                        help="requests in all at each concurrency above 1 (default 256)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params override (e.g. serve.engine.enforce_eager=false)")
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="another engine measured directly in the same run, right after the default one "
                             "(e.g. serve.engine.cpu_preload=false)")
    args = parser.parse_args()

    import pandas as pd

    from pipelines.config.params import load_params
    from pipelines.registry.model_registry import CHAMPION, Registry
    from pipelines.serving.engine import EngineConfig, EngineProcess, fetch_version
    from tests.support import free_port, stop_process_group

    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # the engines started here: /reset_prefix_cache between runs
    params = load_params(REPO / "params.yaml", args.overrides)
    champion = Registry(params).alias(CHAMPION)
    if champion is None:
        sys.exit("no champion registered: run `make demo` first")
    version = str(champion.version)
    # Every request carries a distinct test-split prompt (while the split lasts), as production
    # traffic does: a prompt repeated by the benchmark would be answered from vLLM's prefix cache,
    # which the in-process row has no equivalent of. Only the configured system prompt, the same
    # in every request, is a prefix shared for real. The in-process row answers an evenly spaced
    # sample of the same prompts.
    pool = pd.read_parquet(REPO / params.paths.prepared_dir / "test.parquet")["prompt"].tolist()
    used = min(len(pool), max(args.requests, args.requests_at_one))
    prompts = pool[:used][:: max(1, used // args.prompts)][: args.prompts]
    levels = [int(c) for c in args.concurrency.split(",")]
    served = fetch_version(params, version, variant="full")  # the dtypes' rows: full precision, as in-process
    system = served.config.get("system_prompt")
    print(f"# serve benchmark: {params.registry.model_name} v{version}, {used} test-split prompts "
          f"({len(prompts)} of them in-process), "
          f"max_tokens {args.max_tokens}, greedy; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; engine: eager {params.serve.engine.enforce_eager}, "
          f"kv cache {params.serve.engine.kv_cache_gib} GiB, max_num_seqs {params.serve.engine.max_num_seqs}, "
          f"block size {params.serve.engine.block_size or 'vLLM default'}\n")
    rows = []
    for dtype in args.dtypes.split(","):
        dtype_params = load_params(REPO / "params.yaml", [*args.overrides, f"serve.dtype={dtype}"])
        seq = sequential(dtype_params, version, prompts, args.max_tokens, dtype)
        rows.append({"dtype": dtype, "server": "in-process sequential (transformers)", "clients": 1, **seq})
        print(f"{dtype} sequential: {seq['requests_per_second']:.2f} req/s", flush=True)
        # the configured engine (measured direct and through the gateway), then each --variant (direct)
        for variant in [None, *args.variants]:
            sets = [*args.overrides, f"serve.dtype={dtype}", *(variant.split(",") if variant else [])]
            server = f"vLLM direct ({variant})" if variant else "vLLM direct"
            with tempfile.TemporaryDirectory() as tmp_name:
                tmp = Path(tmp_name)
                config = EngineConfig.from_params(load_params(REPO / "params.yaml", sets).serve)
                engine = EngineProcess(config, served.model_dir, served.name, version, tmp / "engine.log")
                engine.start()
                gateway = None
                try:
                    start_seconds = engine.wait_ready()
                    rss = engine.rss_bytes() / 2 ** 30
                    print(f"{dtype} {server} ready in {start_seconds:.1f} s, RSS {rss:.2f} GiB", flush=True)
                    gateway_port = free_port()
                    for clients in levels:
                        per_client = args.requests_at_one if clients == 1 else max(2, args.requests // clients)
                        reset_prefix_cache(engine)
                        before = prefix_cache(engine)
                        direct = closed_loop(engine.url, engine.headers(), served.name, pool[:used], clients,
                                             per_client, args.max_tokens, system)
                        direct["prefix_hit"] = prefix_cache(engine, before)
                        rows.append({"dtype": dtype, "server": server, "clients": clients, **direct,
                                     "start_seconds": start_seconds, "rss_gib": engine.rss_bytes() / 2 ** 30})
                        print(f"{dtype} {server} c={clients}: {direct['requests_per_second']:.2f} req/s", flush=True)
                        if variant:
                            continue
                        if gateway is None:
                            gateway = gateway_process(REPO / "params.yaml", sets, engine.url, engine.api_key, tmp,
                                                      gateway_port)
                        reset_prefix_cache(engine)
                        before = prefix_cache(engine)
                        through = closed_loop(f"http://127.0.0.1:{gateway_port}",
                                              {"Authorization": f"Bearer {TOKEN}"}, served.name, pool[:used],
                                              clients, per_client, args.max_tokens, None)
                        through["prefix_hit"] = prefix_cache(engine, before)
                        rows.append({"dtype": dtype, "server": "gateway -> vLLM", "clients": clients, **through})
                        print(f"{dtype} gateway c={clients}: {through['requests_per_second']:.2f} req/s", flush=True)
                finally:
                    if gateway is not None:
                        stop_process_group(gateway, 30)
                    engine.stop()
    frame = pd.DataFrame(rows)
    print("\n| dtype | server | clients | requests/s | tokens/s | p50 s | p95 s | prefix cache hits | vs sequential "
          "| gateway/direct |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for _, row in frame.iterrows():
        same = frame["dtype"] == row["dtype"]
        base = frame[same & (frame.clients == 1)
                     & (frame.server.str.startswith("in-process"))].requests_per_second.iloc[0]
        direct = frame[same & (frame.clients == row.clients) & (frame.server == "vLLM direct")]
        ratio = (f"{row.requests_per_second / direct.requests_per_second.iloc[0]:.2f}"
                 if row.server.startswith("gateway") and len(direct) else "")
        p50 = f"{row.p50:.2f}" if "p50" in row and row.p50 == row.p50 else ""
        p95 = f"{row.p95:.2f}" if "p95" in row and row.p95 == row.p95 else ""
        hit = f"{row.prefix_hit:.0%}" if "prefix_hit" in row and row.prefix_hit == row.prefix_hit else ""
        print(f"| {row['dtype']} | {row.server} | {row.clients} | {row.requests_per_second:.2f} | "
              f"{row.tokens_per_second:.0f} | {p50} | {p95} | {hit} | {row.requests_per_second / base:.2f}x | "
              f"{ratio} |")
    engines = frame[frame.server.str.startswith("vLLM direct")].groupby(["dtype", "server"], sort=False)[
        ["start_seconds", "rss_gib"]].first()
    print("\n| dtype | engine | start-up s | RSS GiB (after the first load) |\n|---|---|---:|---:|")
    for (dtype, server), row in engines.iterrows():
        print(f"| {dtype} | {server} | {row.start_seconds:.1f} | {row.rss_gib:.2f} |")
    failed = int(frame.get("failures", pd.Series([0])).fillna(0).sum())
    print(f"\nfailed requests: {failed}; hypervisor steal during the runs: "
          f"{frame.get('steal_seconds', pd.Series([0])).fillna(0).sum():.1f} s")


if __name__ == "__main__":
    main()
