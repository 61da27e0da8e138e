"""`llmops serve`: the gateway in front of the vLLM engine that serves the registry's champion.

The library side of the command `llmops serve`; what it reads and writes, and how
it is run: pipelines/commands/serve.py.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time,
# and `Request` is imported inside create_app.

import asyncio
import contextlib
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipelines.accounting import cost
from pipelines.config.params import Params, ServeParams
from pipelines.config.settings import api_token, vllm_url
from pipelines.data.templates import ControlTokenInContent, guard_content, render_prompt
from pipelines.errors import LLMOpsError
from pipelines.model.lm import suppressed_tokens
from pipelines.registry.model_registry import Registry
from pipelines.serving.engine import (
    EngineConfig,
    EngineProcess,
    ServedVersion,
    check_python,
    external_engine,
    fetch_version,
)
from pipelines.serving.inference_log import Feedback, InferenceLog, InferenceRecord

if TYPE_CHECKING:
    from concurrent.futures import Future

    from fastapi import FastAPI, Request


logger = logging.getLogger(__name__)

INFERENCE_PATHS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}
ROLES = {"system", "user", "assistant"}
MAX_MESSAGES = 256


class RequestError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
            422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
            503: "service_unavailable", 504: "timeout"}.get(status, "server_error" if status >= 500
                                                             else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- what is served --------------------------------------------------------------------------


@dataclass
class Served:
    """One model version on one running engine, with the prompt format it was trained with."""

    version: ServedVersion
    engine: EngineProcess
    tokenizer: Any
    ready_at: float = field(default_factory=time.time)
    suppressed: dict[str, float] = field(init=False)  # logit_bias that keeps control tokens out

    def __post_init__(self) -> None:

        # what evaluation's generate does (suppress_tokens): the served answers are the evaluated ones
        self.suppressed = {str(token): -100.0 for token in suppressed_tokens(self.tokenizer)}

    @property
    def template(self) -> str:
        return self.version.config.get("template", "chat")

    @property
    def system_prompt(self) -> str | None:
        return self.version.config.get("system_prompt")

    @property
    def decoding(self) -> dict[str, Any]:
        return self.version.config.get("decoding") or {}

    def chat_messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages as the engine's chat template gets them: the configured system prompt
        first when the client sends none (as in training)."""
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def render_single_turn(self, messages: list[dict[str, str]]) -> str:
        """A one-turn chat for a model trained with the plain or alpaca template."""

        users = [m for m in messages if m["role"] == "user"]
        systems = [m["content"] for m in messages if m["role"] == "system"]
        if len(users) != 1 or any(m["role"] == "assistant" for m in messages) or len(systems) > 1:
            raise RequestError(422, f"this model was trained with the '{self.template}' prompt template, which has "
                                    "one turn: send exactly one user message (and at most one system message)",
                               param="messages")
        return render_prompt(users[0]["content"], self.template, systems[0] if systems else self.system_prompt,
                             self.tokenizer)

    def render_prompt(self, prompt: str) -> str:

        return render_prompt(prompt, self.template, self.system_prompt, self.tokenizer)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _load_tokenizer(model_dir: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class EngineManager:
    """Starts, supervises and swaps the engines, all on one thread of its own.

    One thread because every engine process is started from it: the engines ask the kernel to
    stop them when the thread that started them ends (pipelines/serving/engine.py), which must be the
    gateway's lifetime, not a short-lived worker's. Requests read `current` (one reference,
    swapped atomically) and count themselves in `engine.inflight`."""

    def __init__(self, params: Params, metrics: "Metrics", *, wait_for_model: bool = False) -> None:

        self.params = params
        self.settings: ServeParams = params.serve
        self.metrics = metrics
        self.registry = Registry(params)
        self.config = EngineConfig.from_params(params.serve)
        self.external_url = vllm_url(params.serve).value
        self.wait_for_model = wait_for_model
        self.current: Served | None = None
        self.state = "starting"
        self.last_error: str | None = None
        self.last_check: dict[str, Any] = {}
        self.restarts = 0
        self.swaps: list[dict[str, Any]] = []  # how long each swap took (start of the new engine to switch)
        self.reload_now = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llmops-engines", daemon=True)
        self._initial: ServedVersion | None = None
        self._log_dir = params.serve.engine.cache_dir / "logs"

    # --- called by the entry point and the app ------------------------------------------------

    def prepare(self) -> None:
        """Everything that can fail clearly before the port opens: the registry, the alias, the
        version's merged weights, vLLM's interpreter."""

        if self.external_url is None:
            check_python(self.config.python)
        version = self.alias_version()
        if version is None:
            if not self.wait_for_model:
                raise LLMOpsError(f"no version of '{self.registry.name}' has the alias '{self.settings.alias}' in "
                                  f"{self.registry.uri}; run the pipeline (`make demo`) or `llmops promote` first, "
                                  "set serve.model_uri, or start with --wait")
            self.state = "waiting-for-model"
            logger.info("no version has the alias '%s' yet; serving it once one does", self.settings.alias)
            return
        self._initial = self._fetch(version)

    def _fetch(self, version: str) -> ServedVersion:
        """The version to serve; with an engine run elsewhere, which weights it loaded is not the
        gateway's choice: the merged folder gives the prompt format, the variant is unknown here."""
        if not self.external_url:
            return fetch_version(self.params, version)
        return replace(fetch_version(self.params, version, variant="full"), variant="unknown",
                       variant_note=f"the engine at {self.external_url} (serve.engine.url) serves the weights it "
                                    "was started with")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.reload_now.set()
        self.thread.join(timeout=60)
        served, self.current = self.current, None
        if served is not None:
            served.engine.stop()
        self.state = "stopped"

    @property
    def swap_mode(self) -> str:
        """blue_green needs room for two engines: on a CPU both would be bound to the same cores,
        and measured on 2 cores the new one did not finish starting in 10 minutes beside an engine
        under load (unbinding costs 30% throughput instead), so auto means stop_first there."""
        mode = self.settings.engine.swap
        if self.external_url:
            return "stop_first"  # nothing to start beside it
        if mode == "auto":
            return "blue_green" if self.config.device == "cuda" else "stop_first"
        return mode

    def alias_version(self) -> str | None:
        if self.settings.model_uri:
            return self.settings.model_uri.rstrip("/").rsplit("/", 1)[-1]
        version = self.registry.alias(self.settings.alias)
        return None if version is None else str(version.version)

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        if self._initial is not None:
            self._bring_up(self._initial)
        next_check = time.monotonic() + self.settings.poll_interval_seconds
        while not self.stopping.is_set():
            woken = self.reload_now.wait(1.0)
            self.reload_now.clear()
            if self.stopping.is_set():
                break
            served = self.current
            if served is not None and not served.engine.alive():
                self._restart(served)
                continue
            if (woken or time.monotonic() >= next_check) and not self.settings.model_uri:
                self._check_alias()
                next_check = time.monotonic() + self.settings.poll_interval_seconds

    def _new_engine(self, version: ServedVersion) -> EngineProcess:

        if self.external_url:
            return external_engine(self.config, self.external_url, version.name, version.version)
        log = self._log_dir / f"engine-v{version.version}-{datetime.now(UTC):%Y%m%dT%H%M%S}.log"
        return EngineProcess(self.config, version.model_dir, version.name, version.version, log)

    def _launch(self, version: ServedVersion) -> "Served":
        """Start an engine for `version` and wait until it answers (EngineError if it does not)."""
        engine = self._new_engine(version)
        try:
            if not engine.external:
                engine.start()
                engine.wait_ready(cancelled=self.stopping.is_set)
            tokenizer = _load_tokenizer(version.model_dir)
        except BaseException:
            engine.stop()
            raise
        if engine.ready_seconds is not None:
            self.metrics.engine_start_seconds.observe(engine.ready_seconds)
        return Served(version, engine, tokenizer)

    def _install(self, served: Served) -> None:
        self.current = served  # one reference assignment: atomic for the request handlers
        self.state, self.last_error = "ready", None
        self.metrics.model.info({"name": served.version.name, "version": served.version.version,
                                 "variant": served.version.variant})

    def _bring_up(self, version: ServedVersion) -> None:
        """Start the first engine, retrying with backoff until it runs or the gateway stops."""
        backoff = self.settings.engine.restart_backoff_seconds
        attempt = 0
        while not self.stopping.is_set():
            try:
                self._install(self._launch(version))
                return
            except Exception as error:  # noqa: BLE001 - the gateway keeps trying; /ready says why
                self.last_error = str(error).splitlines()[0][:500]
                self.state = "failed"
                wait = backoff[min(attempt, len(backoff) - 1)]
                logger.error("the engine for v%s did not start (%s); retrying in %g s", version.version,
                             self.last_error, wait)
                attempt += 1
                if self.stopping.wait(wait):
                    return

    def _restart(self, served: Served) -> None:
        code = served.engine.process.returncode if served.engine.process else None
        self.last_error = f"the engine for v{served.version.version} exited (code {code}): {served.engine.last_error()}"
        logger.error("%s; restarting it", self.last_error)
        self.current, self.state = None, "restarting"
        self.restarts += 1
        self.metrics.engine_restarts.inc()
        served.engine.stop(grace=5)  # its worker processes may outlive the server
        self._bring_up(served.version)

    def _check_alias(self) -> None:
        """Swap to the alias's version if it moved; keep serving the old one on any failure."""
        try:
            version = self.alias_version()
            self.last_check = {"at": time.time(), "version": version, "error": None}
            current = self.current.version.version if self.current else None
            if version is None or version == current:
                return
            logger.info("alias '%s' moved to v%s (serving v%s); fetching it", self.settings.alias, version, current)
            fetched = self._fetch(version)
            if self.current is None:  # waiting for a first champion
                self._bring_up(fetched)
            elif self.swap_mode == "stop_first":
                self._swap_stop_first(fetched)
            else:
                self._swap_blue_green(fetched)
        except Exception as error:  # noqa: BLE001 - the old version keeps serving whatever went wrong
            self.metrics.swap_failures.inc()
            self.last_check = {"at": time.time(), "version": None, "error": str(error).splitlines()[0][:300]}
            logger.warning("hot swap failed, still serving v%s: %s",
                           self.current.version.version if self.current else "-", self.last_check["error"])

    def _swap_blue_green(self, version: ServedVersion) -> None:
        started = time.monotonic()
        new = self._launch(version)  # beside the old engine, which keeps serving
        old = self.current
        self._install(new)
        switched = time.monotonic()
        self.metrics.swaps.inc()
        logger.info("now serving v%s (was v%s); draining the old engine", version.version,
                    old.version.version if old else "-")
        record = {"version": version.version, "mode": "blue_green",
                  "engine_start_seconds": round(switched - started, 2), "drain_seconds": None}
        self.swaps.append(record)
        if old is not None:
            self._drain(old)
            old.engine.stop()
        record["drain_seconds"] = round(time.monotonic() - switched, 2)

    def _swap_stop_first(self, version: ServedVersion) -> None:
        """For a machine too small for two engines: stop the old one (draining what it is
        answering), then start the new one; requests that arrive meanwhile wait in the gateway
        (at most serve.request_timeout_seconds) and go to the new engine."""
        started = time.monotonic()
        old, self.current, self.state = self.current, None, "swapping"
        if old is not None:
            self._drain(old)
            old.engine.stop()
        try:
            self._install(self._launch(version))
        except Exception:
            logger.exception("the new version did not start; going back to v%s",
                             old.version.version if old else "-")
            if old is not None:
                self._bring_up(old.version)
            raise
        self.metrics.swaps.inc()
        self.swaps.append({"version": version.version, "mode": "stop_first",
                           "unavailable_seconds": round(time.monotonic() - started, 2)})

    def _drain(self, served: Served) -> None:
        deadline = time.monotonic() + self.settings.request_timeout_seconds + 5
        while served.engine.inflight > 0 and time.monotonic() < deadline and not self.stopping.is_set():
            time.sleep(0.1)


# --- metrics -------------------------------------------------------------------------------


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own (tests run several apps); the
    engine's own (`vllm:*`) are appended to /metrics."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry()
        self.requests = Counter("llmops_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("llmops_request_latency_seconds", "Request latency through the gateway",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
        self.tokens = Counter("llmops_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("llmops_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.outstanding = Gauge("llmops_requests_in_flight", "Requests admitted and not answered yet",
                                 registry=self.registry)
        self.model = Info("llmops_model", "The model version being served", registry=self.registry)
        self.swaps = Counter("llmops_model_swaps", "Hot swaps to a new model version", registry=self.registry)
        self.swap_failures = Counter("llmops_model_swap_failures", "Failed checks, fetches or engine starts of a "
                                     "new version", registry=self.registry)
        self.engine_restarts = Counter("llmops_engine_restarts", "Engines restarted after they died",
                                       registry=self.registry)
        self.engine_start_seconds = Histogram("llmops_engine_start_seconds", "Engine start-up time",
                                              registry=self.registry, buckets=(5, 10, 20, 30, 60, 90, 120, 300, 600))
        self.log_pending = Gauge("llmops_inference_log_pending", "Log records not yet in the store",
                                 registry=self.registry)
        self.log_durable_seconds = Histogram("llmops_inference_log_durable_seconds", "Time an answer waited for "
                                             "its log record to be on disk", registry=self.registry,
                                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
        self.log_late = Counter("llmops_inference_log_late", "Answers sent before their log record was on disk "
                                "(inference_log.durable_wait_seconds passed)", registry=self.registry)
        # cost of a served token (pipelines/accounting/cost.py ServingCost), set at each scrape
        self.price_per_hour = Gauge("llmops_cost_price_per_hour", "What this machine costs per hour (params.yaml "
                                    "cost.prices; NaN: no row for its kind)", ["machine", "currency"],
                                    registry=self.registry)
        self.generated_rate = Gauge("llmops_generated_tokens_per_second", "Generated tokens/s over the last "
                                    "cost.throughput_window_seconds (NaN: none generated)", registry=self.registry)
        self.cost_per_1k = Gauge("llmops_cost_per_1k_generated_tokens", "The machine's cost per 1k generated tokens "
                                 "at the measured throughput (NaN: none generated, or unpriced)", ["currency"],
                                 registry=self.registry)


# --- the service -------------------------------------------------------------------------------


class Service:
    """Engines, admission, the HTTP client to the engine and the inference log."""

    def __init__(self, params: Params, token: str, inference_log: "InferenceLog | None" = None, *,
                 wait_for_model: bool = False) -> None:
        self.params = params
        self.settings: ServeParams = params.serve
        self.token = token
        self.metrics = Metrics()
        machine = cost.detect(params.cost)
        self.serving_cost = cost.ServingCost(cost.price_per_hour(machine, params.cost),
                                             params.cost.throughput_window_seconds)
        self.metrics.price_per_hour.labels(machine.key, params.cost.currency).set(
            math.nan if self.serving_cost.price_per_hour is None else self.serving_cost.price_per_hour)
        self.engines = EngineManager(params, self.metrics, wait_for_model=wait_for_model)
        self.inference_log = inference_log
        self.outstanding = 0  # admitted requests not answered yet (the event loop's thread only)
        self.capacity = self.settings.engine.max_num_seqs + self.settings.queue_size
        self.request_seconds = 1.0  # running mean of an answered request's time (Retry-After)
        self.recent_ids: OrderedDict[str, None] = OrderedDict()  # for /v1/feedback before the log is flushed
        self.client: Any = None  # httpx.AsyncClient, made on the app's event loop
        self._last_late_warning = -1e9

    def start(self) -> None:
        self.engines.start()

    def stop(self) -> None:
        self.engines.stop()
        if self.inference_log is not None:
            self.inference_log.close()

    def remember(self, request_id: str) -> None:
        self.recent_ids[request_id] = None
        while len(self.recent_ids) > 100_000:
            self.recent_ids.popitem(last=False)

    def log(self, **record: Any) -> "Future[bool] | None":
        """Hand the record to the inference log; the future turns True once it is on disk."""
        if self.inference_log is None:
            return None

        durable = self.inference_log.record(InferenceRecord(**record))
        self.metrics.log_pending.set(self.inference_log.pending)
        return durable

    async def durable(self, future: "Future[bool] | None") -> None:
        """Wait until the record is on disk (the log's journal fsyncs in batches: one fsync, shared
        by the answers that finish meanwhile, is the latency this adds), at most
        inference_log.durable_wait_seconds: past that (a disk that hangs) the answer goes out
        anyway and the record, still held, is written when it can; counted in
        llmops_inference_log_late_total and said in a WARNING, at most one a minute."""
        if future is None:
            return
        started = time.perf_counter()
        try:
            written = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                             self.params.inference_log.durable_wait_seconds)
        except TimeoutError:
            written = False
        self.metrics.log_durable_seconds.observe(time.perf_counter() - started)
        if not written:
            self.metrics.log_late.inc()
            if time.monotonic() - self._last_late_warning > 60:
                self._last_late_warning = time.monotonic()
                logger.warning("inference log: an answer went out before its record was on disk (the spool %s did "
                               "not take it within inference_log.durable_wait_seconds=%g s); see the log's errors",
                               self.params.inference_log.spool_dir, self.params.inference_log.durable_wait_seconds)

    def admit(self) -> None:
        if self.outstanding >= self.capacity:
            seqs = self.settings.engine.max_num_seqs
            rounds = max(1.0, (self.outstanding - seqs) / seqs)  # answers ahead of a newcomer, in batches
            retry_after = max(1, math.ceil(rounds * self.request_seconds))
            raise RequestError(429, f"the server is at capacity ({self.outstanding} requests in flight, "
                                    f"serve.engine.max_num_seqs + serve.queue_size = {self.capacity}); retry after "
                                    f"{retry_after} s", code="overloaded", headers={"Retry-After": str(retry_after)})
        self.outstanding += 1
        self.metrics.outstanding.set(self.outstanding)

    def release(self, seconds: float | None) -> None:
        self.outstanding -= 1
        self.metrics.outstanding.set(self.outstanding)
        if seconds is not None:
            self.request_seconds = 0.9 * self.request_seconds + 0.1 * seconds


# --- request bodies --------------------------------------------------------------------------


def _bad_text(value: Any) -> bool:
    """A string a tokenizer or a store would refuse: NUL, or a lone UTF-16 surrogate."""
    if isinstance(value, str):
        if "\x00" in value:
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_bad_text(k) or _bad_text(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_bad_text(v) for v in value)
    return False


def _body_models() -> dict[str, Any]:
    """The fields the gateway reads or passes on, validated (pydantic): anything else a client
    sends is ignored, so the engine only ever gets values checked here."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="ignore")
        type: Literal["text"]
        text: str = Field(max_length=1_000_000)

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: str
        content: str | list[TextPart] | None = None
        name: str | None = Field(None, max_length=64)

    class JsonSchema(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field("response", min_length=1, max_length=64)
        schema_: dict[str, Any] = Field(alias="schema")
        strict: bool | None = None
        description: str | None = Field(None, max_length=1000)

    class ResponseFormat(BaseModel):
        model_config = ConfigDict(extra="forbid")
        type: Literal["text", "json_object", "json_schema"]
        json_schema: JsonSchema | None = None

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore")
        include_usage: bool = False

    class Body(BaseModel):
        model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
        model: str | None = Field(None, max_length=256)
        max_tokens: int | None = Field(None, ge=1, le=2 ** 31)
        max_completion_tokens: int | None = Field(None, ge=1, le=2 ** 31)
        temperature: float | None = Field(None, ge=0.0, le=1e6)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        top_k: int | None = Field(None, ge=-1, le=100_000)
        min_p: float | None = Field(None, ge=0.0, le=1.0)
        presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
        frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
        repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
        n: int = Field(1, ge=1, le=2 ** 31)
        stream: bool = False
        stream_options: StreamOptions | None = None
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
        ignore_eos: bool | None = None
        min_tokens: int | None = Field(None, ge=0, le=2 ** 31)
        response_format: ResponseFormat | None = None

    class ChatBody(Body):
        messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
        logprobs: bool | None = None
        top_logprobs: int | None = Field(None, ge=0, le=20)

    class CompletionBody(Body):
        prompt: str | list[str]
        logprobs: int | None = Field(None, ge=0, le=5)

    class FeedbackBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        request_id: str = Field(min_length=1, max_length=100)
        thumbs: Literal["up", "down"] | None = None
        score: float | None = Field(None, ge=-1e6, le=1e6)
        comment: str | None = Field(None, max_length=4000)

    return {"chat.completions": ChatBody, "completions": CompletionBody, "feedback": FeedbackBody}


def _validation_message(error: Any) -> str:
    problems = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"] if p != "body")
        problems.append(f"{where or 'body'}: {item['msg']}")
    return "invalid request: " + "; ".join(problems)


# --- the HTTP app --------------------------------------------------------------------------------


class CountRequests:
    """ASGI middleware: llmops_requests_total by endpoint and status. A plain ASGI wrapper rather
    than Starlette's BaseHTTPMiddleware, which runs every request in a task group of its own: the
    gateway's event loop used 4.7 ms of CPU per request with it and 3.1 ms without (16 clients,
    one run each), CPU that the engine lacks on a small machine (benchmarks/RESULTS.md)."""

    def __init__(self, app: Any, counter: Any, known_paths: set[str]) -> None:
        self.app, self.counter, self.known_paths = app, counter, known_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # no answer started: ServerErrorMiddleware, outside, answers 500

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope["path"] if scope["path"] in self.known_paths else "other"  # bounded label values
            self.counter.labels(path, str(status)).inc()


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over the limit, counted as they arrive (Content-Length can
    be absent or lie, e.g. chunked bodies). Starlette and uvicorn have no such setting."""

    def __init__(self, app: Any, max_bytes: int, on_refused: Any = None) -> None:
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, send, f"request body of {int(declared)} bytes is over the limit of "
                                                   f"{self.max_bytes} bytes (serve.limits.max_body_bytes)")
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge()
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(scope, send, f"request body is over the limit of {self.max_bytes} bytes "
                                                "(serve.limits.max_body_bytes)")

    async def _refuse(self, scope: dict, send: Any, message: str) -> None:
        if self.on_refused is not None:
            await self.on_refused(scope, 413, message)  # logged (on disk) before the answer
        body = json.dumps(_error_body(413, message)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


async def _wait_for_disconnect(request: "Request") -> None:
    """Returns when the client goes away (the body has been read: the next ASGI message is the
    disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@dataclass
class Exchange:
    """One inference request as the log records it."""

    endpoint: str
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex}")
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.perf_counter)
    prompt: str = ""
    output: str = ""
    version: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    params: dict[str, Any] | None = None
    stream: bool = False
    include_usage: bool = False  # the client asked for OpenAI's usage chunk
    logged: bool = False
    durable: Any = None  # the log's future: True once the record is on disk


def create_app(service: Service) -> "FastAPI":
    """The HTTP API around a Service (which the caller has prepared and started)."""
    import httpx
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    bodies = _body_models()
    settings, limits = service.settings, service.settings.limits
    name = service.engines.registry.name

    @contextlib.asynccontextmanager
    async def lifespan(app: "FastAPI") -> Any:
        pool = service.capacity + 16
        service.client = httpx.AsyncClient(timeout=httpx.Timeout(settings.request_timeout_seconds + 10, connect=10),
                                           limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool))
        yield
        await service.client.aclose()

    # The OpenAPI pages are served behind the token (GET /openapi.json), not open to anyone.
    app = FastAPI(title="llmops serve", version="2", summary="OpenAI-compatible gateway for the registry champion",
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def finish(exchange: Exchange, status: int, error: str | None = None) -> "Future[bool] | None":
        """Log the exchange once (metrics, inference log); the log's future (see `finished`)."""
        if exchange.logged:
            return exchange.durable
        exchange.logged = True
        latency = time.perf_counter() - exchange.started
        service.metrics.latency.labels(exchange.endpoint).observe(latency)
        service.metrics.tokens.inc(exchange.completion_tokens)
        service.serving_cost.add(exchange.completion_tokens)
        service.metrics.prompt_tokens.inc(exchange.prompt_tokens)
        served = service.engines.current
        exchange.durable = service.log(
            request_id=exchange.request_id, created_at=exchange.created, endpoint=exchange.endpoint, model_name=name,
            model_version=exchange.version or (served.version.version if served else ""), prompt=exchange.prompt,
            output=exchange.output, status=status, latency_ms=latency * 1000, prompt_tokens=exchange.prompt_tokens,
            completion_tokens=exchange.completion_tokens, error=error[:1000] if error else None,
            params=exchange.params)
        return exchange.durable

    async def finished(exchange: Exchange, status: int, error: str | None = None) -> None:
        """Log the exchange and wait until its record is on disk: called before every answer, so a
        gateway killed right after answering has lost no answered record (docs/monitoring.md)."""
        await service.durable(finish(exchange, status, error))

    async def refused(scope: dict, status: int, message: str) -> None:
        endpoint = INFERENCE_PATHS.get(scope.get("path", ""))
        if endpoint is not None and scope.get("method") == "POST":
            await finished(Exchange(endpoint), status, message)

    def error_response(error: RequestError, exchange: Exchange | None = None) -> JSONResponse:
        headers = dict(error.headers or {})
        if exchange is not None:
            headers["X-Request-Id"] = exchange.request_id
        return JSONResponse(_error_body(error.status, error.message, error.param, error.code),
                            status_code=error.status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(_error_body(422, _validation_message(error)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                     str(error.detail))
        return JSONResponse(_error_body(error.status_code, message), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    def check_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        matches = secrets.compare_digest(given.strip().encode(), service.token.encode())
        if scheme.lower() != "bearer" or not given or not matches:
            raise RequestError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the "
                                    f"token the server was started with (env {settings.token_env})",
                               headers={"WWW-Authenticate": "Bearer"})

    def authorised(request: Request) -> None:
        check_token(request)

    async def current() -> Served:
        served = service.engines.current
        if served is None and service.engines.state == "swapping":
            # a stop-first swap: wait for the new engine instead of failing the request
            deadline = time.monotonic() + settings.request_timeout_seconds
            while service.engines.current is None and service.engines.state == "swapping" \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            served = service.engines.current
        if served is None:
            state = service.engines.state
            why = {"waiting-for-model": f"no version has the alias '{settings.alias}' yet",
                   "restarting": "the engine is restarting", "swapping": "a new version is starting",
                   "failed": f"the engine is not running ({service.engines.last_error})"}.get(state, "the engine "
                                                                                              "is starting")
            raise RequestError(503, f"{why}; retry shortly", headers={"Retry-After": "5"})
        return served

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        engines = service.engines
        served = engines.current
        engine = {"state": engines.state, "restarts": engines.restarts, "last_error": engines.last_error,
                  "swaps": engines.swaps[-5:]}
        if served is None:
            return JSONResponse({"status": engines.state, "engine": engine, "last_check": engines.last_check},
                                status_code=503, headers={"Retry-After": "5"})
        engine.update(start_seconds=served.engine.ready_seconds, external=served.engine.external,
                      pid=served.engine.process.pid if served.engine.process else None)
        return JSONResponse({"status": "ready", "model": name, "model_version": served.version.version,
                             # the weights: full precision or the quantized variant promote chose
                             "variant": served.version.variant, "variant_note": served.version.variant_note,
                             "loaded_at": datetime.fromtimestamp(served.ready_at, UTC).isoformat(),
                             "engine": engine, "last_check": engines.last_check})

    @app.get("/openapi.json", dependencies=[Depends(authorised)], include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/metrics", dependencies=[Depends(authorised)])
    async def metrics() -> Response:
        if service.inference_log is not None:
            service.metrics.log_pending.set(service.inference_log.pending)
        rate, per_1k = service.serving_cost.snapshot()
        service.metrics.generated_rate.set(math.nan if rate is None else rate)
        service.metrics.cost_per_1k.labels(service.params.cost.currency).set(math.nan if per_1k is None else per_1k)
        text = generate_latest(service.metrics.registry).decode()
        served = service.engines.current
        if served is not None:
            with contextlib.suppress(httpx.HTTPError):
                engine = await service.client.get(f"{served.engine.url}/metrics", headers=served.engine.headers(),
                                                  timeout=5)
                if engine.status_code == 200:
                    text += engine.text
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", dependencies=[Depends(authorised)], status_code=202)
    def reload() -> dict:
        service.engines.reload_now.set()
        served = service.engines.current
        return {"status": "checking", "model_version": served.version.version if served else None}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(await current())]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorised)])
    async def get_model(model_id: str) -> dict:
        if model_id != name:
            raise RequestError(404, f"model '{model_id}' is not served here; this server serves '{name}'",
                               param="model", code="model_not_found")
        return model_card(await current())

    def model_card(served: Served) -> dict:
        return {"id": name, "object": "model", "created": int(served.ready_at), "owned_by": "llmops",
                "model_version": served.version.version}

    # --- inference ------------------------------------------------------------------------------

    async def read_body(request: Request, kind: str) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RequestError(422, "the body is not valid JSON (UTF-8); send a JSON object") from None
        if not isinstance(data, dict):
            raise RequestError(422, f"the body must be a JSON object, got {type(data).__name__}")
        if _bad_text(data):
            raise RequestError(422, "the request holds text with a NUL character or an unpaired UTF-16 surrogate; "
                                    "send valid Unicode text")
        try:
            return bodies[kind].model_validate(data)
        except ValidationError as error:
            raise RequestError(422, _validation_message(error)) from None

    def decoding(body: Any, served: Served, exchange: Exchange) -> dict[str, Any]:
        """The sampling fields sent to the engine: the client's, checked against the limits, over
        the registered decoding defaults (greedy unless temperature > 0)."""
        if body.n != 1:
            raise RequestError(422, f"n={body.n}: this server returns one choice per request; send n=1", param="n")
        if body.model is not None and body.model != name:
            raise RequestError(404, f"model '{body.model}' is not served here; use '{name}' (GET /v1/models)",
                               param="model", code="model_not_found")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = asked if asked is not None else limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise RequestError(422, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens} "
                                    "(serve.limits.max_tokens)", param="max_tokens")
        if body.min_tokens is not None and body.min_tokens > max_tokens:
            raise RequestError(422, f"min_tokens={body.min_tokens} is over max_tokens={max_tokens}",
                               param="min_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s or len(s) > 200 for s in stops):
            raise RequestError(422, "stop: give at most 4 non-empty stop sequences of at most 200 characters",
                               param="stop")
        temperature = min(body.temperature, limits.max_temperature) if body.temperature is not None else 0.0
        defaults = served.decoding
        fields: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature,
                                  "repetition_penalty": body.repetition_penalty
                                  or defaults.get("repetition_penalty", 1.0)}
        if temperature > 0:
            fields["top_p"] = body.top_p if body.top_p is not None else defaults.get("top_p", 1.0)
        if stops:
            fields["stop"] = stops
        for key in ("top_k", "min_p", "presence_penalty", "frequency_penalty", "seed", "ignore_eos", "min_tokens"):
            value = getattr(body, key)
            if value is not None:
                fields[key] = value
        if served.suppressed:
            fields["logit_bias"] = served.suppressed
        if body.response_format is not None:
            fields["response_format"] = body.response_format.model_dump(by_alias=True, exclude_none=True)
        exchange.stream = bool(body.stream)
        exchange.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        exchange.params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": fields.get("top_p", 1.0),
                           "stop": stops, "stream": exchange.stream}
        return fields

    def check_length(served: Served, text: str, max_tokens: int, exchange: Exchange) -> None:
        exchange.prompt_tokens = served.count_tokens(text)
        if exchange.prompt_tokens > limits.max_prompt_tokens:
            raise RequestError(413, f"the prompt is {exchange.prompt_tokens} tokens long, over this server's limit "
                                    f"of {limits.max_prompt_tokens} (serve.limits.max_prompt_tokens); shorten it",
                               param="prompt")
        context = service.engines.config.max_model_len
        if context and exchange.prompt_tokens + max_tokens > context:
            raise RequestError(413, f"the prompt is {exchange.prompt_tokens} tokens and {max_tokens} new tokens "
                                    f"were asked for: {exchange.prompt_tokens + max_tokens} in all, over the "
                                    f"engine's context of {context} tokens; shorten the prompt or ask for fewer "
                                    "tokens", param="prompt")

    def guarded(served: Served, text: str, where: str, param: str) -> str:
        """Client text under serve.special_tokens_in_content (pipelines/data/templates.py)."""

        try:
            return guard_content(text, served.tokenizer, settings.special_tokens_in_content, where)
        except ControlTokenInContent as error:
            raise RequestError(422, str(error), param=param, code="control_token_in_content") from None

    async def accepted(request: Request, kind: str) -> tuple[Any, Served]:
        """The token, then the body, then an engine to answer: in that order, so nothing about the
        service is told to a client without the token."""
        check_token(request)
        body = await read_body(request, kind)
        return body, await current()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        exchange = Exchange("chat.completions")

        async def prepare() -> tuple[Served, str, dict[str, Any], bool]:
            body, served = await accepted(request, "chat.completions")
            messages = []
            for index, message in enumerate(body.messages):
                if message.role not in ROLES:
                    raise RequestError(422, f"messages[{index}].role={message.role!r}: this model takes system, user "
                                            "and assistant messages", param="messages")
                content = message.content
                if isinstance(content, list):
                    content = "\n".join(part.text for part in content)
                messages.append({"role": message.role, "content": content or ""})
            if messages[-1]["role"] != "user":
                raise RequestError(422, "messages: the last message must come from the user", param="messages")
            exchange.prompt = messages[-1]["content"]  # the log keeps what the client wrote
            if not exchange.prompt.strip():
                raise RequestError(422, "messages: the user message must not be blank", param="messages")
            for index, message in enumerate(messages):
                if message["role"] == "system" and settings.client_system_prompt == "configured":
                    raise RequestError(422, f"messages[{index}]: this server sets the system prompt itself "
                                            "(serve.client_system_prompt: configured) and takes none from clients; "
                                            "put your instructions in the user message", param="messages",
                                       code="system_prompt_not_allowed")
                message["content"] = guarded(served, message["content"], f"messages[{index}].content", "messages")
            fields = decoding(body, served, exchange)
            if served.template == "chat":
                messages = served.chat_messages(messages)
                check_length(served, served.chat_text(messages), fields["max_tokens"], exchange)
                payload = {"messages": messages, **fields}
                if body.logprobs:
                    payload.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
                return served, "/v1/chat/completions", payload, False
            if body.logprobs:
                raise RequestError(422, f"logprobs: not offered for a model trained with the '{served.template}' "
                                        "template on /v1/chat/completions; use /v1/completions", param="logprobs")
            text = served.render_single_turn(messages)
            check_length(served, text, fields["max_tokens"], exchange)
            return served, "/v1/completions", {"prompt": text, "add_special_tokens": False, **fields}, True

        return await run(request, exchange, prepare)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        exchange = Exchange("completions")

        async def prepare() -> tuple[Served, str, dict[str, Any], bool]:
            body, served = await accepted(request, "completions")
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise RequestError(422, f"prompt: got {len(prompts)} prompts; send one prompt per request "
                                        "(concurrent requests are batched by the engine)", param="prompt")
            exchange.prompt = prompts[0]
            if not exchange.prompt.strip():
                raise RequestError(422, "prompt: must not be blank", param="prompt")
            fields = decoding(body, served, exchange)
            text = served.render_prompt(guarded(served, exchange.prompt, "prompt", "prompt"))  # as evaluation does
            check_length(served, text, fields["max_tokens"], exchange)
            payload = {"prompt": text, "add_special_tokens": False, **fields}
            if body.logprobs is not None:
                payload["logprobs"] = body.logprobs
            return served, "/v1/completions", payload, False

        return await run(request, exchange, prepare)

    async def run(request: Request, exchange: Exchange, prepare: Any) -> Any:
        """Validate, admit, forward; log the outcome whatever it is."""
        try:
            served, path, payload, as_chat = await prepare()
            exchange.version = served.version.version
            service.admit()
        except RequestError as error:
            await finished(exchange, error.status, error.message)
            return error_response(error, exchange)
        payload["model"] = served.version.name
        if exchange.stream:  # the engine always reports usage: the log needs the token counts
            payload.update(stream=True, stream_options={"include_usage": True})
        engine = served.engine
        engine.inflight += 1
        service.remember(exchange.request_id)
        headers = {"X-Request-Id": exchange.request_id, "X-Model-Version": served.version.version}
        if not exchange.stream:
            try:
                return await forward(request, exchange, engine, path, payload, as_chat, headers)
            finally:
                engine.inflight -= 1
                service.release(time.perf_counter() - exchange.started)
        try:
            response = await open_stream(engine, path, payload)
        except RequestError as error:
            engine.inflight -= 1
            service.release(None)
            await finished(exchange, error.status, error.message)
            return error_response(error, exchange)
        return StreamingResponse(relay(exchange, engine, response, as_chat),
                                 media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})

    def timed_out() -> RequestError:
        return RequestError(504, f"no answer within {settings.request_timeout_seconds:g} s "
                                 "(serve.request_timeout_seconds); the server is busy, retry later",
                            headers={"Retry-After": "5"})

    def engine_failure(error: Exception) -> RequestError:
        if isinstance(error, httpx.TimeoutException):
            return timed_out()
        service.engines.reload_now.set()  # the engine thread looks at the engine now
        return RequestError(503, f"the engine did not answer ({type(error).__name__}); retry shortly",
                            headers={"Retry-After": "5"})

    def relayed_error(status: int, text: str) -> RequestError:
        """An engine's error answer, in this server's shape (5xx: the engine failed, not the client)."""
        try:
            detail = json.loads(text).get("error") or {}
            message, param = str(detail.get("message") or text)[:2000], detail.get("param")
        except (ValueError, AttributeError):
            message, param = text[:2000], None
        if status >= 500:
            return RequestError(502, f"the engine failed to answer: {message}")
        return RequestError(status if status in (400, 404, 413, 422) else 400, message,
                            param=param if isinstance(param, str) else None)

    async def forward(request: Request, exchange: Exchange, engine: EngineProcess, path: str,
                      payload: dict[str, Any], as_chat: bool, headers: dict[str, str]) -> Any:
        upstream = asyncio.ensure_future(service.client.post(f"{engine.url}{path}", json=payload,
                                                             headers=engine.headers()))
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({upstream, gone}, timeout=settings.request_timeout_seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if upstream not in done:
            upstream.cancel()  # closes the engine connection: vLLM aborts the request
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await upstream
            if gone in done:
                await finished(exchange, 499, "client disconnected")
                return Response(status_code=499)
            error = timed_out()
            await finished(exchange, error.status, error.message)
            return error_response(error, exchange)
        try:
            response = upstream.result()
        except httpx.HTTPError as failure:
            error = engine_failure(failure)
            await finished(exchange, error.status, error.message)
            return error_response(error, exchange)
        if response.status_code != 200:
            error = relayed_error(response.status_code, response.text)
            await finished(exchange, error.status, error.message)
            return error_response(error, exchange)
        answer = response.json()
        choice = (answer.get("choices") or [{}])[0]
        text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
        exchange.output = text or ""
        usage = answer.get("usage") or {}
        exchange.completion_tokens = int(usage.get("completion_tokens") or 0)
        exchange.prompt_tokens = int(usage.get("prompt_tokens") or exchange.prompt_tokens)
        if as_chat:
            answer = {"object": "chat.completion", "created": answer.get("created", int(time.time())),
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": exchange.output},
                                   "finish_reason": choice.get("finish_reason"), "logprobs": None}],
                      "usage": usage}
        answer.update(id=exchange.request_id, model=name, model_version=exchange.version)
        await finished(exchange, 200)
        return JSONResponse(answer, headers=headers)

    async def open_stream(engine: EngineProcess, path: str, payload: dict[str, Any]) -> Any:
        try:
            response = await service.client.send(
                service.client.build_request("POST", f"{engine.url}{path}", json=payload, headers=engine.headers()),
                stream=True)
        except httpx.HTTPError as failure:
            raise engine_failure(failure) from None
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            await response.aclose()
            raise relayed_error(response.status_code, text)
        return response

    async def relay(exchange: Exchange, engine: EngineProcess, response: Any, as_chat: bool) -> Any:
        """The engine's server-sent events, re-labelled (request id, model, version); the usage
        chunk goes to the log (and to the client when it asked for it). The record is on disk
        before the closing `[DONE]`: a stream the client saw complete is never lost."""
        status, error_text = 200, None
        deadline = time.monotonic() + settings.request_timeout_seconds
        pieces: list[str] = []
        settled = False

        def wrap_up() -> "Future[bool] | None":
            """The bookkeeping, once: the engine's and the admission's counts, then the log."""
            nonlocal settled
            if not settled:
                settled = True
                exchange.output = "".join(pieces)
                engine.inflight -= 1
                service.release(time.perf_counter() - exchange.started if status == 200 else None)
            return finish(exchange, status, error_text)

        try:
            async for line in response.aiter_lines():
                if time.monotonic() > deadline:
                    status, error_text = 504, "timeout"
                    yield _event(_error_body(504, f"no answer within {settings.request_timeout_seconds:g} s"))
                    break
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data.strip() == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    status, error_text = 502, str(chunk["error"].get("message", chunk["error"]))[:500]
                    yield _event(_error_body(502, f"the engine failed while answering: {error_text}"))
                    break
                usage = chunk.get("usage")
                if usage:
                    exchange.completion_tokens = int(usage.get("completion_tokens") or 0)
                    exchange.prompt_tokens = int(usage.get("prompt_tokens") or exchange.prompt_tokens)
                if not chunk.get("choices"):
                    if exchange.include_usage:
                        yield _event({**chunk, "id": exchange.request_id, "model": name,
                                      "model_version": exchange.version})
                    continue
                choice = chunk["choices"][0]
                piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                pieces.append(piece or "")
                if as_chat:
                    delta = {"content": piece} if piece else {}
                    chunk = {"object": "chat.completion.chunk", "created": chunk.get("created"),
                             "choices": [{"index": 0, "delta": delta, "finish_reason": choice.get("finish_reason"),
                                          "logprobs": None}]}
                if not exchange.include_usage:
                    chunk.pop("usage", None)
                yield _event({**chunk, "id": exchange.request_id, "model": name, "model_version": exchange.version})
            await service.durable(wrap_up())
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status, error_text = 499, "client disconnected"
            raise
        except httpx.HTTPError as failure:
            status, error_text = 502, f"the engine connection failed ({type(failure).__name__})"
            yield _event(_error_body(502, error_text))
            await service.durable(wrap_up())
            yield "data: [DONE]\n\n"
        except GeneratorExit:
            status, error_text = 499, "client disconnected"
            raise
        finally:
            # the bookkeeping first: the close below may be interrupted by the task's cancellation
            wrap_up()
            await _close_quietly(response)  # an unfinished stream: vLLM aborts the request

    @app.post("/v1/feedback", dependencies=[Depends(authorised)], status_code=202)
    async def feedback(request: Request) -> dict:
        body = await read_body(request, "feedback")
        if body.thumbs is None and body.score is None:
            raise RequestError(422, "give 'thumbs' ('up' or 'down') or a numeric 'score'", param="thumbs")
        known = body.request_id in service.recent_ids
        if not known and service.inference_log is not None:
            known = service.inference_log.known_request(body.request_id) is not False  # None: store down, accept
        if not known:
            raise RequestError(404, f"no request with id '{body.request_id}' was served here", param="request_id")
        score = body.score if body.score is not None else (1.0 if body.thumbs == "up" else 0.0)
        if service.inference_log is not None:

            await service.durable(service.inference_log.feedback(Feedback(
                request_id=body.request_id, created_at=datetime.now(UTC), score=score, comment=body.comment)))
        return {"status": "accepted", "request_id": body.request_id, "score": score}

    known_paths = {getattr(route, "path", "") for route in app.routes}
    app.add_middleware(CountRequests, counter=service.metrics.requests, known_paths=known_paths)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes, on_refused=refused)
    return app


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _close_quietly(response: Any) -> None:
    """Close the engine's stream; if this task is being cancelled, the close goes on without it."""
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.shield(response.aclose())


# --- entry point -------------------------------------------------------------------------------


def read_token(settings: ServeParams) -> str:
    """The bearer token as pipelines/config/settings.py resolves it (serve.token_file, else the variable
    serve.token_env names); refuses one too short to be a secret."""

    token = (api_token(settings).value or "").strip()
    if len(token) < 16:
        raise LLMOpsError(f"no bearer token of at least 16 characters: set the environment variable "
                          f"{settings.token_env} (e.g. `export {settings.token_env}=$(openssl rand -hex 32)`) "
                          "or serve.token_file; the server does not run without authentication")
    return token


def build_service(params: Params, wait_for_model: bool = False) -> Service:

    token = read_token(params.serve)
    log = InferenceLog.from_params(params.inference_log)
    service = Service(params, token, inference_log=log, wait_for_model=wait_for_model)
    service.engines.prepare()  # fails clearly (registry down, no champion, no vLLM) before the port opens
    log.start()
    service.start()
    return service


def main(params: Params, wait: bool = False) -> None:
    import uvicorn

    service = build_service(params, wait_for_model=wait)
    app = create_app(service)
    logger.info("gateway on http://%s:%d for %s (%s)", params.serve.host, params.serve.port,
                service.engines.registry.name, service.engines.state)
    config = uvicorn.Config(app, host=params.serve.host, port=params.serve.port, log_level="info",
                            timeout_graceful_shutdown=int(params.serve.request_timeout_seconds))
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        with contextlib.suppress(Exception):
            service.stop()
    if not server.started:
        raise LLMOpsError(f"could not listen on {params.serve.host}:{params.serve.port} (see the error above; "
                          "is the port in use?); choose another with --set serve.port=PORT")
