"""`llmops serve`: the registry's champion behind an OpenAI-compatible HTTP API.

    LLMOPS_API_TOKEN=... llmops serve                       # models:/<registry.model_name>@champion
    llmops serve --set serve.port=8080 --set serve.max_batch_size=8

Reads `serve`, `registry`, `tracking` and `inference_log` from params.yaml; writes every
request and response to the inference log (`pipelines/inference_log.py`).

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `"stream": true`
as server-sent events), `POST /v1/feedback`, `GET /health` (liveness), `GET /ready` (model
loaded, and which version), `GET /metrics` (Prometheus), `POST /admin/reload` (check the
alias now; used by `llmops deploy`). Every endpoint but `/health` and `/ready` needs
`Authorization: Bearer <token>`; the two probes stay open because orchestrators' liveness
and readiness probes do not carry credentials, and they reveal nothing but the version.

How a request flows: the handler validates and clamps the decoding parameters, puts a job
on a bounded queue (full: 429 with Retry-After), and awaits it. One worker thread runs a
continuous batch (`pipelines.lm.ContinuousBatch`): up to `max_batch_size` requests decode
together, a new request joins at the next decoding step (its prompt prefilled with the other
newcomers) and a finished one leaves at the step after its last token, whatever the sampling
settings of its neighbours. A hot swap replaces the model reference atomically; requests
already decoding finish on the version they started with, and newcomers join the new version
once those are done. Docs: docs/serving.md.

No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at
run time, and the request models are local to `create_app`.
"""

import asyncio
import contextlib
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pipelines.errors import LLMOpsError
from pipelines.params import Params, ServeParams

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pipelines.inference_log import InferenceLog
    from pipelines.lm import CausalLM, Decoding

logger = logging.getLogger(__name__)


# --- the model being served --------------------------------------------------------------


@dataclass
class ModelHandle:
    """One loaded model version: the LM and the prompt format it was trained with."""

    name: str
    version: str
    lm: "CausalLM"
    template: str
    system_prompt: str | None
    default_decoding: "Decoding"
    loaded_at: float = field(default_factory=time.time)

    def render(self, prompt: str) -> str:
        from pipelines.templates import render_prompt

        return render_prompt(prompt, self.template, self.system_prompt, self.lm.tokenizer)  # type: ignore[arg-type]

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Chat messages as model text: the tokenizer's chat template when the model was trained
        with it, else the single user turn in the training template."""
        tokenizer = self.lm.tokenizer
        if self.template == "chat":
            if self.system_prompt and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": self.system_prompt}, *messages]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        users = [m for m in messages if m["role"] == "user"]
        systems = [m["content"] for m in messages if m["role"] == "system"]
        if len(users) != 1 or any(m["role"] == "assistant" for m in messages):
            raise RequestError(422, f"this model was trained with the '{self.template}' prompt template, which has "
                                    "one turn: send exactly one user message (and at most one system message)",
                               param="messages")
        from pipelines.templates import render_prompt

        system = systems[0] if systems else self.system_prompt
        return render_prompt(users[0]["content"], self.template, system, tokenizer)  # type: ignore[arg-type]


class ModelSource:
    """Where versions come from: an alias in the registry (hot-swappable) or a fixed MLflow URI."""

    def __init__(self, params: Params) -> None:
        from pipelines.registry import Registry

        self.params = params
        self.registry = Registry(params)
        self.fixed_uri = params.serve.model_uri

    def current_version(self) -> str:
        """The version the alias points at now (RegistryUnavailable when the server is down)."""
        if self.fixed_uri:
            return self.fixed_uri
        version = self.registry.alias(self.params.serve.alias)
        if version is None:
            raise LLMOpsError(f"no version of '{self.registry.name}' has the alias '{self.params.serve.alias}' in "
                              f"{self.registry.uri}; run the pipeline (`make demo`) or `llmops promote` first, "
                              "or set serve.model_uri")
        return str(version.version)

    def load(self, version: str) -> "ModelHandle":
        import mlflow
        import torch

        from pipelines.lm import Decoding

        uri = self.fixed_uri or f"models:/{self.registry.name}/{version}"
        mlflow.set_tracking_uri(self.registry.uri)
        started = time.perf_counter()
        dtype = self.params.serve.dtype
        model = self.registry.call(mlflow.pyfunc.load_model, uri, model_config={"dtype": dtype})
        generator = model.unwrap_python_model()
        lm = generator.lm
        if str(lm.model.dtype).removeprefix("torch.") != dtype:
            # A model whose loader ignores model_config: convert the weights only. `model.to(dtype)`
            # would also round the rotary embedding's float32 inv_freq buffer to bfloat16 (less
            # precise positions). (The 2x slower bfloat16 forwards were frozen weights: CausalLM.load.)
            for parameter in lm.model.parameters():
                parameter.data = parameter.data.to(getattr(torch, dtype))
        config = generator.config
        logger.info("loaded %s (v%s) in %.1f s", uri, version, time.perf_counter() - started)
        return ModelHandle(name=self.registry.name, version=version, lm=lm, template=config["template"],
                           system_prompt=config.get("system_prompt"), default_decoding=Decoding(**config["decoding"]))


# --- requests, errors and jobs -----------------------------------------------------------


class RequestError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


@dataclass
class Job:
    """One request waiting for, or inside, the batch. Written by the worker thread, read by the
    request's event loop through thread-safe callbacks."""

    prompt_text: str
    prompt_tokens: int
    decoding: "Decoding"
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    stream: asyncio.Queue | None = None
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    version: str | None = None
    batcher: Any = None  # set when queued; told when the job is answered


class Batcher:
    """Continuous batching on one worker thread (a decoding step is compute- and memory-bound;
    torch already uses every core inside one forward, so more threads would only contend).

    The loop, step by step: admit waiting requests into free rows (prefilled together, then
    merged into the running KV cache), run one decoding step for every row, hand each row its
    token (streaming, stop sequences, per-request `max_tokens`, cancellation), and answer the
    rows that finished; they leave the cache at the next step. The model side is
    `pipelines.lm.ContinuousBatch` (why it is a loop of our own is written there).

    Written here because no maintained library batches an in-process transformers model on a
    CPU with per-request limits and streaming; vLLM and TGI do it, but as separate GPU-first
    servers (docs/serving.md shows how to put one in front).
    """

    def __init__(self, service: "Service") -> None:
        self.service = service
        self.settings = service.settings
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=self.settings.queue_size)
        self.waiting: list[Job] = []  # taken off the queue, not admitted yet (a hot swap is draining the batch)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llmops-batcher", daemon=True)
        self.request_seconds = 0.5  # running mean of a request's time in the batch (Retry-After, wait window)
        self.outstanding = 0  # requests submitted and not answered yet
        self.count_lock = threading.Lock()
        self.load_samples: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, outstanding) at each arrival
        self.batch: Any = None  # the ContinuousBatch of the version in `handle`
        self.handle: ModelHandle | None = None  # the version the rows in the batch decode on

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)

    @property
    def depth(self) -> int:
        return self.jobs.qsize() + len(self.waiting)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
            with self.count_lock:
                self.outstanding += 1
                self.load_samples.append((time.monotonic(), self.outstanding))
            job.batcher = self
        except queue.Full:
            # a row frees every request_seconds / max_batch_size on average
            rounds_ahead = self.depth / self.settings.max_batch_size + 1
            retry_after = max(1, round(rounds_ahead * self.request_seconds))
            raise RequestError(429, f"the server is at capacity ({self.settings.queue_size} requests waiting); "
                                    f"retry after {retry_after} s", code="overloaded",
                               headers={"Retry-After": str(retry_after)}) from None
        self.service.metrics.queue_depth.set(self.depth)

    def finished(self) -> None:
        with self.count_lock:
            self.outstanding -= 1

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._admit()
                self._step()
            except Exception as error:  # noqa: BLE001 - the worker must outlive any one failure
                logger.exception("the batch failed; answering its requests with an error")
                self._fail_rows(RequestError(500, f"generation failed: {str(error).splitlines()[0][:200]}"))
            self.service.metrics.queue_depth.set(self.depth)
        shutting = RequestError(503, "the server is shutting down; retry on another replica or later",
                                headers={"Retry-After": "5"})
        self._fail_rows(shutting)
        for job in [*self.waiting, *self._drain_queue()]:
            _resolve(job, shutting)
        self.waiting = []

    def _admit(self) -> None:
        """Move waiting requests into free rows of the batch (prefill + merge)."""
        from pipelines.lm import ContinuousBatch, Sequence

        running = self.batch is not None and self.batch.free < self.batch.max_rows
        if not running:
            handle = self.service.handle
            if handle is None:
                time.sleep(0.2)
                return
            if self.batch is None or self.batch.lm is not handle.lm:
                self.batch = ContinuousBatch(handle.lm, self.settings.max_batch_size)
            self.handle = handle
        elif self.service.handle is not self.handle:
            return  # a new version: newcomers wait until the rows on the old one have finished
        newcomers = self._take(self.batch.free, idle=not running)
        if not newcomers:
            return
        tokenizer = self.handle.lm.tokenizer
        rows = []
        try:
            for job in newcomers:
                job.version, job.admitted_at = self.handle.version, time.perf_counter()
                ids = tokenizer(job.prompt_text, add_special_tokens=False)["input_ids"]
                rows.append(Sequence(ids, job.max_tokens, job.decoding, tag=job))
            started, reused = time.perf_counter(), self.batch.prefix_tokens_reused
            events = self.batch.add(rows)
            self.service.metrics.prefill_seconds.observe(time.perf_counter() - started)
            self.service.metrics.prefix_reused.inc(self.batch.prefix_tokens_reused - reused)
        except Exception as error:  # noqa: BLE001 - the newcomers fail, the running rows go on
            logger.exception("prefill failed for %d new requests", len(rows))
            for job in newcomers:
                _resolve(job, RequestError(500, f"generation failed: {str(error).splitlines()[0][:200]}"))
            return
        for row in rows:
            if row.error is not None:  # refused by the batch (prompt + max_tokens past the context)
                _resolve(row.tag, RequestError(413, str(row.error), param="prompt"))
        self._deliver(events)

    def _take(self, free: int, idle: bool) -> list[Job]:
        """Up to `free` waiting jobs, or none yet. The wait for more adapts to the load: newcomers
        are held back until the batch would hold as many requests as were in the server at once
        in the last few seconds (clients whose answers just went out are sending their next ones),
        or until the oldest has waited max_wait_ms. Newcomers then share one prefill, whose cost
        is mostly reading the weights once, instead of each paying a forward pass of its own; a
        lone request at low load is not held back. When the batch is idle the worker blocks here
        for the first request."""
        if idle and not self.waiting:
            try:
                self.waiting.append(self.jobs.get(timeout=0.2))
            except queue.Empty:
                return []
        target = self._expected_batch()
        running = self.settings.max_batch_size - free
        deadline = self.waiting[0].enqueued_at + self.settings.max_wait_ms / 1000 if self.waiting else 0.0
        while len(self.waiting) < free:
            if self.waiting and running + len(self.waiting) >= target:
                break
            # idle: block until the deadline (the decoding rows are not held up); else take what is here
            remaining = deadline - time.perf_counter() if idle else 0.0
            try:
                job = self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            self.waiting.append(job)
            deadline = deadline or job.enqueued_at + self.settings.max_wait_ms / 1000
        ready = (len(self.waiting) >= free or running + len(self.waiting) >= target
                 or time.perf_counter() >= deadline)
        if not self.waiting or not ready:
            return []
        jobs, self.waiting = self.waiting[:free], self.waiting[free:]
        for job in [j for j in jobs if j.cancelled]:  # timed out or disconnected while waiting: answer nobody
            _resolve(job, RequestError(499, "cancelled before generation"))
        return [job for job in jobs if not job.cancelled]

    def _expected_batch(self) -> int:
        now = time.monotonic()
        window = max(10.0, 3 * self.request_seconds)
        recent = [count for at, count in self.load_samples if now - at <= window]
        return max(1, min(self.settings.max_batch_size, max(recent, default=1)))

    def _step(self) -> None:
        if self.batch is None or not self.batch.rows:
            return
        started = time.perf_counter()
        events = self.batch.step()
        if events:
            self.service.metrics.step_seconds.observe(time.perf_counter() - started)
            self.service.metrics.batch_size.observe(len(events))
        self._deliver(events)

    def _deliver(self, events: list) -> None:
        """Hand each row its new token; answer the rows that finished. A failure while handling one
        row (decoding its text, reaching its client) ends that row only."""
        for row, token in events:
            job: Job = row.tag
            try:
                self._on_token(job, row, token)
            except Exception as error:  # noqa: BLE001 - one request's failure must not end the others
                logger.exception("answering a request failed")
                row.finish("error")
                _resolve(job, RequestError(500, f"generation failed: {str(error).splitlines()[0][:200]}"))
                continue
            if row.finished:
                job.finish_reason = job.finish_reason or ("length" if row.finish_reason == "length" else "stop")
                job.text = job.text.strip() if job.stream is None else job.text
                if job.admitted_at is not None:
                    elapsed = time.perf_counter() - job.admitted_at
                    self.request_seconds = 0.8 * self.request_seconds + 0.2 * elapsed
                _resolve(job, None)

    def _on_token(self, job: Job, row: Any, token: int) -> None:
        if job.cancelled:  # the client went away or timed out: free the row at the next step
            row.finish("cancelled")
            return
        if token == self.batch.eos:
            job.finish_reason = "stop"
            return
        job.token_ids.append(token)
        text = self.handle.lm.tokenizer.decode(job.token_ids, skip_special_tokens=True)
        stopped = False
        for stop in job.stop:
            at = text.find(stop)
            if at >= 0:
                text, job.finish_reason, stopped = text[:at], "stop", True
                row.finish("stop")
        if text.endswith("\ufffd") and not stopped:
            return  # half of a multi-byte character: wait for the rest
        if job.stream is not None and len(text) > len(job.text):
            job.loop.call_soon_threadsafe(job.stream.put_nowait, text[len(job.text):])
        job.text = text

    def _fail_rows(self, error: RequestError) -> None:
        """Answer every request decoding in the batch with `error`; the next ones start afresh."""
        if self.batch is not None:
            for row in self.batch.rows:
                if not row.finished:
                    row.finish("error")
                    _resolve(row.tag, error)
        self.batch = None

    def _drain_queue(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self.jobs.get_nowait())
            except queue.Empty:
                return jobs


def _resolve(job: Job, error: RequestError | None) -> None:
    if job.batcher is not None:
        job.batcher.finished()
        job.batcher = None

    def finish() -> None:
        if job.stream is not None:
            job.stream.put_nowait(error if error is not None else None)  # None ends the stream
        if not job.done.done():
            if error is not None:
                job.done.set_exception(error)
            else:
                job.done.set_result(job)

    try:
        job.loop.call_soon_threadsafe(finish)
    except RuntimeError:  # the request's event loop is closed: nobody is left to answer
        logger.warning("request answered after its event loop closed; dropped")


# --- metrics -------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics in a registry of this service's own (tests run several apps)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry()
        self.requests = Counter("llmops_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("llmops_request_latency_seconds", "Request latency (queue + generation)",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
        self.tokens = Counter("llmops_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("llmops_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.queue_depth = Gauge("llmops_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.batch_size = Histogram("llmops_batch_size", "Requests in each decoding step", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.step_seconds = Histogram("llmops_decode_step_seconds", "Duration of one decoding step of the batch",
                                      registry=self.registry, buckets=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2))
        self.prefix_reused = Counter("llmops_prefix_tokens_reused", "Prompt tokens whose keys/values came from the "
                                     "remembered prompt prefix instead of a prefill", registry=self.registry)
        self.prefill_seconds = Histogram("llmops_prefill_seconds", "Duration of one prefill of joining requests",
                                         registry=self.registry, buckets=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2))
        self.model = Info("llmops_model", "The model version being served", registry=self.registry)
        self.swaps = Counter("llmops_model_swaps", "Hot swaps to a new model version", registry=self.registry)
        self.swap_failures = Counter("llmops_model_swap_failures", "Failed checks or loads of a new version",
                                     registry=self.registry)
        self.log_pending = Gauge("llmops_inference_log_pending", "Log records not yet in the store",
                                 registry=self.registry)


# --- the service -----------------------------------------------------------------------------


class Service:
    """Model, batcher, hot swap and inference log; the FastAPI app is built around one."""

    def __init__(self, params: Params, token: str, source: "ModelSource | None" = None,
                 inference_log: "InferenceLog | None" = None) -> None:
        self.params = params
        self.settings: ServeParams = params.serve
        self.token = token
        self.source = source or ModelSource(params)
        self.metrics = Metrics()
        self.inference_log = inference_log
        self.batcher = Batcher(self)
        self.handle: ModelHandle | None = None
        self.reload_now = threading.Event()
        self.stopping = threading.Event()
        self.swap_thread = threading.Thread(target=self._watch, name="llmops-hot-swap", daemon=True)
        self.recent_ids: OrderedDict[str, None] = OrderedDict()  # for /v1/feedback before the log is flushed
        self.last_check: dict[str, Any] = {}

    def load_initial(self) -> None:
        version = self.source.current_version()
        self._install(_load_on_own_thread(self.source, version))

    def _install(self, handle: ModelHandle) -> None:
        self.handle = handle  # one reference assignment: atomic for the batcher thread
        self.metrics.model.info({"name": handle.name, "version": handle.version})

    def start(self) -> None:
        self.batcher.start()
        if not self.settings.model_uri:
            self.swap_thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.reload_now.set()
        self.batcher.stop()
        if self.inference_log is not None:
            self.inference_log.close()

    def check_for_new_version(self) -> bool:
        """Load and switch to the alias's version if it changed; keep serving on any failure."""
        try:
            version = self.source.current_version()
            self.last_check = {"at": time.time(), "version": version, "error": None}
            if self.handle is not None and version == self.handle.version:
                return False
            logger.info("alias '%s' moved to v%s; loading it in the background", self.settings.alias, version)
            handle = _load_on_own_thread(self.source, version)
        except Exception as error:  # noqa: BLE001 - the old version keeps serving whatever went wrong
            self.metrics.swap_failures.inc()
            self.last_check = {"at": time.time(), "version": None, "error": str(error).splitlines()[0][:300]}
            logger.warning("hot swap check failed, still serving v%s: %s",
                           self.handle.version if self.handle else "?", self.last_check["error"])
            return False
        old = self.handle.version if self.handle else None
        self._install(handle)
        self.metrics.swaps.inc()
        logger.info("now serving v%s (was v%s)", handle.version, old)
        return True

    def _watch(self) -> None:
        while not self.stopping.is_set():
            self.reload_now.wait(self.settings.poll_interval_seconds)
            self.reload_now.clear()
            if not self.stopping.is_set():
                self.check_for_new_version()

    def remember(self, request_id: str) -> None:
        self.recent_ids[request_id] = None
        while len(self.recent_ids) > 100_000:
            self.recent_ids.popitem(last=False)

    def log(self, **record: Any) -> None:
        if self.inference_log is None:
            return
        from pipelines.inference_log import InferenceRecord

        self.inference_log.record(InferenceRecord(**record))
        self.metrics.log_pending.set(self.inference_log.pending)


def _load_on_own_thread(source: ModelSource, version: str) -> ModelHandle:
    """Load a version on a thread that ends with the load, so that only the batcher thread keeps
    torch's OpenMP workers. libgomp keeps a pool of workers for every thread that ran parallel
    work; with more pooled threads than cores it stops spinning between parallel regions and
    puts them to sleep, and each decoding step then pays tens of thousands of wake-ups (measured
    on 2 cores: 116 instead of 96 ms per step when the model had been loaded on the main thread).
    A thread that ends releases its pool: the executor's one worker ends when the `with` exits."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmops-model-load") as pool:
        return pool.submit(source.load, version).result()


def _pydantic_models() -> dict[str, Any]:
    """Request bodies (built lazily: pydantic models for FastAPI's validation and docs)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Body(BaseModel):
        # OpenAI clients send fields this server does not use (user, logprobs=None, ...): ignore them.
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0.0)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        n: int = Field(1, ge=1)
        stream: bool = False
        stop: str | list[str] | None = None
        seed: int | None = None

    class CompletionBody(Body):
        prompt: str | list[str] = Field(min_length=1)

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str

    class ChatBody(Body):
        messages: list[Message] = Field(min_length=1)

    class FeedbackBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        request_id: str = Field(min_length=1, max_length=100)
        thumbs: Literal["up", "down"] | None = None
        score: float | None = Field(None, ge=-1e6, le=1e6)
        comment: str | None = Field(None, max_length=4000)

    return {"completion": CompletionBody, "chat": ChatBody, "feedback": FeedbackBody}


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over the limit, counted as they arrive (Content-Length
    can be absent or lie). Starlette and uvicorn have no such setting, hence this."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, f"request body of {int(declared)} bytes is over the limit of "
                                                f"{self.max_bytes} bytes (serve.limits.max_body_bytes)")
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _send_error(send, 413, f"request body is over the limit of {self.max_bytes} bytes "
                                         "(serve.limits.max_body_bytes)")


class _BodyTooLarge(Exception):
    pass


async def _send_error(send: Any, status: int, message: str) -> None:
    body = json.dumps(_error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
            504: "timeout"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(service: Service) -> "FastAPI":
    """The HTTP API around a Service (which the caller has loaded and started)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.sse import EventSourceResponse, format_sse_event
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from pipelines.lm import ContextTooLong, Decoding

    models = _pydantic_models()
    CompletionBody, ChatBody, FeedbackBody = models["completion"], models["chat"], models["feedback"]
    settings, limits = service.settings, service.settings.limits
    app = FastAPI(title="llmops serve", version="1", summary="OpenAI-compatible API for the registry champion")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(_error_body(error.status, error.message, error.param, error.code),
                            status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"] if p != "body")
            problems.append(f"{where or 'body'}: {item['msg']}")
        return JSONResponse(_error_body(422, "invalid request: " + "; ".join(problems)), status_code=422)

    def authorised(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        matches = secrets.compare_digest(given.encode(), service.token.encode())
        if scheme.lower() != "bearer" or not given or not matches:
            raise RequestError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the "
                                    f"token the server was started with (env {settings.token_env})",
                               headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        handle = service.handle
        if handle is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready", "model": handle.name, "model_version": handle.version,
                             "loaded_at": datetime.fromtimestamp(handle.loaded_at, UTC).isoformat(),
                             "last_check": service.last_check})

    @app.get("/metrics", dependencies=[Depends(authorised)])
    def metrics() -> Response:
        if service.inference_log is not None:
            service.metrics.log_pending.set(service.inference_log.pending)
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", dependencies=[Depends(authorised)], status_code=202)
    def reload() -> dict:
        service.reload_now.set()
        return {"status": "checking", "model_version": service.handle.version if service.handle else None}

    def decoding_for(body: Any, handle: ModelHandle) -> tuple["Decoding", int, list[str]]:
        if body.n != 1:
            raise RequestError(422, f"n={body.n}: this server returns one choice per request; send n=1",
                               param="n")
        max_tokens = body.max_tokens if body.max_tokens is not None else limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise RequestError(422, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens} "
                                    "(serve.limits.max_tokens)", param="max_tokens")
        base = handle.default_decoding
        temperature = min(body.temperature, limits.max_temperature) if body.temperature is not None else None
        sample = temperature is not None and temperature > 0
        decoding = Decoding(max_new_tokens=max_tokens, do_sample=sample,
                            temperature=temperature if sample else 1.0,
                            top_p=body.top_p if (sample and body.top_p is not None) else 1.0,
                            repetition_penalty=base.repetition_penalty,
                            seed=body.seed if body.seed is not None else base.seed)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise RequestError(422, "stop: give at most 4 non-empty stop sequences", param="stop")
        return decoding, max_tokens, stops

    async def run(endpoint: str, prompt: str, prompt_text: str, body: Any, handle: ModelHandle) -> Any:
        request_id = f"req-{uuid.uuid4().hex}"
        started = time.perf_counter()
        created = datetime.now(UTC)
        decoding, max_tokens, stops = decoding_for(body, handle)
        prompt_tokens = len(handle.lm.tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        if prompt_tokens > limits.max_prompt_tokens:
            raise RequestError(413, f"the prompt is {prompt_tokens} tokens long, over this server's limit of "
                                    f"{limits.max_prompt_tokens} (serve.limits.max_prompt_tokens); shorten it",
                               param="prompt")
        try:
            handle.lm.check_fits(prompt_tokens, max_tokens)
        except ContextTooLong as error:
            raise RequestError(413, str(error), param="prompt") from None
        loop = asyncio.get_running_loop()
        job = Job(prompt_text, prompt_tokens, decoding, max_tokens, stops, loop, loop.create_future(),
                  stream=asyncio.Queue() if body.stream else None)
        service.batcher.submit(job)
        service.remember(request_id)
        kind = "chat.completion" if endpoint == "chat.completions" else "text_completion"
        headers = {"X-Request-Id": request_id}

        def finish(status: int, error: str | None = None) -> None:
            latency = time.perf_counter() - started
            service.metrics.latency.labels(endpoint).observe(latency)
            service.metrics.tokens.inc(len(job.token_ids))
            service.metrics.prompt_tokens.inc(prompt_tokens)
            service.log(request_id=request_id, created_at=created, endpoint=endpoint, model_name=handle.name,
                        model_version=job.version or handle.version, prompt=prompt, output=job.text, status=status,
                        latency_ms=latency * 1000, prompt_tokens=prompt_tokens,
                        completion_tokens=len(job.token_ids), error=error,
                        params={"max_tokens": max_tokens, "temperature": decoding.temperature if decoding.do_sample
                                else 0.0, "top_p": decoding.top_p, "stop": stops, "stream": bool(body.stream)})

        def usage() -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": len(job.token_ids),
                    "total_tokens": prompt_tokens + len(job.token_ids)}

        def choice(text: str, finish_reason: str | None, delta: bool = False) -> dict:
            if endpoint == "completions":
                return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            key = "delta" if delta else "message"
            content = {"role": "assistant", "content": text} if not delta or text else {}
            return {"index": 0, key: content, "finish_reason": finish_reason}

        def envelope(choices: list[dict], chunk: bool = False) -> dict:
            return {"id": request_id, "object": kind + (".chunk" if chunk and endpoint != "completions" else ""),
                    "created": int(created.timestamp()), "model": handle.name,
                    "model_version": job.version or handle.version, "choices": choices}

        if not body.stream:
            try:
                await asyncio.wait_for(asyncio.shield(job.done), settings.request_timeout_seconds)
            except TimeoutError:
                job.cancelled = True
                finish(504, "timeout")
                raise RequestError(504, f"no answer within {settings.request_timeout_seconds:g} s "
                                        "(serve.request_timeout_seconds); the server is busy, retry later",
                                   headers={"Retry-After": "5"}) from None
            except RequestError as error:
                finish(error.status, error.message)
                raise
            except asyncio.CancelledError:  # the client went away
                job.cancelled = True
                finish(499, "client disconnected")
                raise
            finish(200)
            payload = envelope([choice(job.text, job.finish_reason)])
            payload["usage"] = usage()
            return JSONResponse(payload, headers={**headers, "X-Model-Version": str(job.version)})

        async def events() -> Any:
            deadline = loop.time() + settings.request_timeout_seconds
            status, error_text = 200, None
            try:
                while True:
                    try:
                        piece = await asyncio.wait_for(job.stream.get(), max(0.0, deadline - loop.time()))
                    except TimeoutError:
                        job.cancelled = True
                        status, error_text = 504, "timeout"
                        yield format_sse_event(data_str=json.dumps(_error_body(504, "timed out")))
                        break
                    if piece is None:
                        final = envelope([choice("", job.finish_reason, delta=True)], chunk=True)
                        final["usage"] = usage()
                        yield format_sse_event(data_str=json.dumps(final))
                        break
                    if isinstance(piece, RequestError):
                        status, error_text = piece.status, piece.message
                        yield format_sse_event(data_str=json.dumps(_error_body(piece.status, piece.message)))
                        break
                    yield format_sse_event(data_str=json.dumps(envelope([choice(piece, None, delta=True)],
                                                                        chunk=True)))
                yield format_sse_event(data_str="[DONE]")
            except asyncio.CancelledError:
                job.cancelled = True
                status, error_text = 499, "client disconnected"
                raise
            finally:
                finish(status, error_text)

        return EventSourceResponse(events(), headers={**headers, "X-Model-Version": str(handle.version)})

    def current_handle() -> ModelHandle:
        if service.handle is None:
            raise RequestError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
        return service.handle

    @app.post("/v1/completions", dependencies=[Depends(authorised)])
    async def completions(body: CompletionBody) -> Any:  # type: ignore[valid-type]
        handle = current_handle()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise RequestError(422, f"prompt: got {len(prompts)} prompts; send one prompt per request "
                                    "(concurrent requests are batched by the server)", param="prompt")
        prompt = prompts[0]
        if not prompt.strip():
            raise RequestError(422, "prompt: must not be blank", param="prompt")
        return await run("completions", prompt, handle.render(prompt), body, handle)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat_completions(body: ChatBody) -> Any:  # type: ignore[valid-type]
        handle = current_handle()
        messages = [m.model_dump() for m in body.messages]
        if messages[-1]["role"] != "user":
            raise RequestError(422, "messages: the last message must come from the user", param="messages")
        prompt = messages[-1]["content"]
        if not prompt.strip():
            raise RequestError(422, "messages: the user message must not be blank", param="messages")
        return await run("chat.completions", prompt, handle.render_chat(messages), body, handle)

    @app.post("/v1/feedback", dependencies=[Depends(authorised)], status_code=202)
    def feedback(body: FeedbackBody) -> dict:  # type: ignore[valid-type]
        if body.thumbs is None and body.score is None:
            raise RequestError(422, "give 'thumbs' ('up' or 'down') or a numeric 'score'", param="thumbs")
        known = body.request_id in service.recent_ids
        if not known and service.inference_log is not None:
            known = service.inference_log.known_request(body.request_id) is not False  # None: store down, accept
        if not known:
            raise RequestError(404, f"no request with id '{body.request_id}' was served here", param="request_id")
        score = body.score if body.score is not None else (1.0 if body.thumbs == "up" else 0.0)
        if service.inference_log is not None:
            from pipelines.inference_log import Feedback

            service.inference_log.feedback(Feedback(request_id=body.request_id, created_at=datetime.now(UTC),
                                                    score=score, comment=body.comment))
        return {"status": "accepted", "request_id": body.request_id, "score": score}

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        path = request.url.path if request.url.path in known_paths else "other"  # bounded label values
        service.metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    known_paths = {route.path for route in app.routes}

    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    return app


# --- entry point -----------------------------------------------------------------------------


def read_token(settings: ServeParams) -> str:
    """The bearer token as pipelines/settings.py resolves it (serve.token_file, else the variable
    serve.token_env names); refuses one too short to be a secret."""
    from pipelines.settings import api_token

    token = (api_token(settings).value or "").strip()
    if len(token) < 16:
        raise LLMOpsError(f"no bearer token of at least 16 characters: set the environment variable "
                          f"{settings.token_env} (e.g. `export {settings.token_env}=$(openssl rand -hex 32)`) "
                          "or serve.token_file; the server does not run without authentication")
    return token


def build_service(params: Params) -> Service:
    from pipelines.inference_log import InferenceLog

    token = read_token(params.serve)
    log = InferenceLog.from_params(params.inference_log)
    service = Service(params, token, inference_log=log)
    service.load_initial()  # fails clearly (registry down, no champion) before the port opens
    log.start()
    service.start()
    return service


def main(params: Params) -> None:
    import uvicorn
    service = build_service(params)
    app = create_app(service)
    logger.info("serving %s v%s on http://%s:%d", service.handle.name, service.handle.version,
                params.serve.host, params.serve.port)
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
