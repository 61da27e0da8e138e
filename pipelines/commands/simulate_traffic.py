"""Command `simulate-traffic`: production-like requests from held-out WordNet (no drift) and FOLDOC (drift).

    llmops simulate-traffic --requests 200 --drift-share 0.5 --url http://127.0.0.1:8000
    llmops simulate-traffic --requests 200 --drift-share 0.5 --end 2026-11-24 --hours 24

With `--url` it sends chat requests to the running gateway (token from `serve.token_env` /
`serve.token_file`), which answers on its vLLM engine and logs them itself: what `make demo`
does. Without it, it answers with the registry's champion in-process, in static batches as
`evaluate` generates, and writes the records straight into the inference log, spread over the
window that ends at `--end` (so a past window can be filled for `llmops monitor`); each
record's latency is then its batch's duration, not a served request's.

Prompts: `--drift-share` of them come from the FOLDOC stream (computing terms: another
domain), the rest from the test split (held out from training: the training distribution).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import numpy as np

from pipelines.config.params import BundledSource, Params
from pipelines.config.settings import hide_password, inference_log_url
from pipelines.data.sources import read_source
from pipelines.errors import LLMOpsError
from pipelines.io import read_parquet
from pipelines.monitoring.monitor import parse_time
from pipelines.registry.model_registry import CHAMPION, Registry
from pipelines.serving.app import read_token
from pipelines.serving.inference_log import InferenceLog, InferenceRecord

logger = logging.getLogger(__name__)


def traffic_prompts(params: Params, count: int, drift_share: float, seed: int) -> list[tuple[str, str]]:
    """(prompt, source) pairs: WordNet test-split prompts and FOLDOC prompts, mixed, seeded."""

    if not 0.0 <= drift_share <= 1.0:
        raise LLMOpsError(f"--drift-share {drift_share} must be between 0 and 1")
    rng = np.random.default_rng(seed)
    held_out = read_parquet(params.paths.prepared_dir / "test.parquet", produced_by="prepare")["prompt"].tolist()
    _, foldoc = read_source(BundledSource(kind="bundled", name="foldoc"), 0, params.paths.sample_dir)
    drifted = foldoc["prompt"].tolist()
    picks = []
    for is_drift in rng.random(count) < drift_share:
        pool, source = (drifted, "foldoc") if is_drift else (held_out, "wordnet")
        picks.append((pool[int(rng.integers(len(pool)))], source))
    return picks


def send_to_service(url: str, token: str, prompts: list[str], max_tokens: int, clients: int = 4) -> dict[str, int]:
    import requests

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"

    def one(prompt: str) -> int:
        for _ in range(5):  # honour the server's back-pressure instead of failing
            try:
                response = session.post(f"{url.rstrip('/')}/v1/chat/completions", timeout=600,
                                        json={"messages": [{"role": "user", "content": prompt}],
                                              "max_tokens": max_tokens})
            except requests.RequestException as error:
                raise LLMOpsError(f"the service at {url} is unreachable ({type(error).__name__}); start "
                                  "`llmops serve` or drop --url to write into the inference log directly") from None
            if response.status_code not in (429, 503):
                return response.status_code
            time.sleep(float(response.headers.get("Retry-After", "1")))
        return response.status_code

    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(one, prompts))
    return {str(s): statuses.count(s) for s in sorted(set(statuses))}


def log_url(params: Params) -> str:
    """The inference log's URL as it may be shown (no password)."""

    return hide_password(str(inference_log_url(params.inference_log).value))


def write_directly(params: Params, prompts: list[str], start: datetime, end: datetime, seed: int) -> int:
    """Answer with the champion in-process and log the records over [start, end)."""
    from pipelines.model.packaging import load_registered  # packaging imports mlflow

    registry = Registry(params)
    champion = registry.alias(CHAMPION)
    if champion is None:
        raise LLMOpsError(f"'{registry.name}' has no champion to answer the simulated traffic; run `make demo` "
                          "or `llmops promote` first")
    generator = load_registered(registry, str(champion.version))  # the version's data only: no pickle
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.random(len(prompts))) * (end - start).total_seconds()
    log = InferenceLog.from_params(params.inference_log)
    log.start()
    try:
        texts = [generator.render(p) for p in prompts]
        tokenizer = generator.lm.tokenizer
        size = 16
        for offset in range(0, len(prompts), size):
            started = time.perf_counter()
            rows = generator.lm.generate_ids(texts[offset: offset + size], generator.decoding)
            seconds = time.perf_counter() - started  # every request of the batch waited for all of it
            for i, (prompt, text, row) in enumerate(zip(prompts[offset:], texts[offset:], rows), start=offset):
                answer = tokenizer.decode(row, skip_special_tokens=True).strip()
                log.record(InferenceRecord(
                    # deterministic ids: simulating the same window twice adds nothing (replays are ignored)
                    request_id=f"sim-{seed}-{end:%Y%m%dT%H%M%S}-{i}", endpoint="chat.completions",
                    created_at=start + timedelta(seconds=float(offsets[i])),
                    model_name=registry.name, model_version=str(champion.version), prompt=prompt, output=answer,
                    status=200, latency_ms=seconds * 1000, completion_tokens=len(row),
                    prompt_tokens=len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                    params={"simulated": True, "max_tokens": generator.decoding.max_new_tokens}))
        if not log.flush(120):
            raise LLMOpsError(f"the inference log at {log_url(params)} did not take the records; they "
                              f"wait in {params.inference_log.spool_dir}")
    finally:
        log.close()
    return len(prompts)


def main(params: Params, requests: int = 200, drift_share: float = 0.5, url: str | None = None,
         end: str | None = None, hours: float | None = None, seed: int = 0) -> None:

    picks = traffic_prompts(params, requests, drift_share, seed)
    prompts = [p for p, _ in picks]
    drifted = sum(1 for _, source in picks if source == "foldoc")
    if url:

        statuses = send_to_service(url, read_token(params.serve), prompts, params.serve.limits.default_max_tokens)
        logger.info("simulate-traffic: sent %d requests (%d FOLDOC) to %s: statuses %s", len(prompts), drifted,
                    url, statuses)
        return
    when = parse_time(end) if end else datetime.now(UTC)
    start = when - timedelta(hours=hours or params.monitor.window_hours)
    written = write_directly(params, prompts, start, when, seed)
    logger.info("simulate-traffic: wrote %d records (%d FOLDOC) to %s for %s .. %s", written, drifted,
                log_url(params), start.isoformat(), when.isoformat())

