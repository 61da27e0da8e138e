"""The HTTP layer of `llmops serve` in-process, on the tiny model: paths that need a server in a
given state (model loading, batcher stopped, queue full) or exact outputs (stop sequences).
The served behaviour against real processes is in tests/integration/test_serve.py."""

from __future__ import annotations

import threading
import time

import pytest

from pipelines.params import load_params
from tests.support import REPO, TEST_TOKEN
from tests.unit.test_lm_continuous import sharpen_attention

PROMPT = 'What does the noun "bank" mean?'
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


class LocalSource:
    """A model source that hands out one in-memory version (the registry path is tested in integration)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.fixed_uri = None

    def current_version(self) -> str:
        return self.handle.version

    def load(self, version: str):
        return self.handle


@pytest.fixture(scope="module")
def handle(tiny_base_model_dir):
    from pipelines.lm import CausalLM, Decoding
    from pipelines.serve import ModelHandle

    lm = sharpen_attention(CausalLM.load(tiny_base_model_dir, dtype="float32"))  # cache mix-ups change answers
    return ModelHandle(name="tiny", version="7", lm=lm, template="chat", system_prompt=None,
                       default_decoding=Decoding(repetition_penalty=3.0))


def make_client(handle, *overrides: str, start: bool = True, load: bool = True):
    from fastapi.testclient import TestClient

    from pipelines.serve import Service, create_app

    limits = ["serve.limits.max_tokens=32", "serve.limits.default_max_tokens=8"]
    params = load_params(REPO / "params.yaml", [*limits, *overrides])
    service = Service(params, TEST_TOKEN, source=LocalSource(handle))
    if load:
        service.load_initial()
    if start:
        service.batcher.start()
    return service, TestClient(create_app(service))


def test_stop_sequences_cut_the_answer_and_say_so(handle):
    service, client = make_client(handle)
    try:
        full = client.post("/v1/completions", headers=AUTH, json={"prompt": PROMPT, "max_tokens": 12}).json()
        text = full["choices"][0]["text"]
        assert len(text) > 4, text
        start = next(i for i in range(1, len(text) - 1) if not text[i].isspace())  # a stop that is not blank
        stop = text[start: start + 2]
        cut = client.post("/v1/completions", headers=AUTH,
                          json={"prompt": PROMPT, "max_tokens": 12, "stop": [stop]}).json()
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert cut["choices"][0]["text"] == text[: text.index(stop)].strip()
        assert full["model_version"] == "7"
    finally:
        service.batcher.stop()


def test_a_request_that_waits_too_long_gets_504(handle):
    service, client = make_client(handle, "serve.request_timeout_seconds=0.3", start=False)
    started = time.perf_counter()
    response = client.post("/v1/completions", headers=AUTH, json={"prompt": PROMPT, "max_tokens": 4})
    assert response.status_code == 504 and "serve.request_timeout_seconds" in response.json()["error"]["message"]
    assert time.perf_counter() - started < 10


def test_a_full_queue_answers_429_with_retry_after(handle):
    service, client = make_client(handle, "serve.queue_size=2", "serve.request_timeout_seconds=3", start=False)
    waiting = [threading.Thread(target=client.post, args=("/v1/completions",),
                                kwargs={"headers": AUTH, "json": {"prompt": PROMPT}}) for _ in range(2)]
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 10
    while service.batcher.jobs.qsize() < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    response = client.post("/v1/completions", headers=AUTH, json={"prompt": PROMPT})
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert client.get("/health").status_code == 200
    for thread in waiting:
        thread.join()


def test_not_ready_while_the_model_loads(handle):
    service, client = make_client(handle, start=False, load=False)
    assert client.get("/ready").status_code == 503
    response = client.post("/v1/completions", headers=AUTH, json={"prompt": PROMPT})
    assert response.status_code == 503 and response.headers["Retry-After"]


def test_chat_with_a_one_turn_template_rejects_a_conversation(handle):
    from dataclasses import replace

    service, client = make_client(replace(handle, template="alpaca"))
    try:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": PROMPT}]
        response = client.post("/v1/chat/completions", headers=AUTH, json={"messages": messages})
        assert response.status_code == 422 and "'alpaca' prompt template" in response.json()["error"]["message"]
        ok = client.post("/v1/chat/completions", headers=AUTH,
                         json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        service.batcher.stop()


# --- continuous batching in the worker ---------------------------------------------------------


def answer_alone(handle, prompt: str, max_tokens: int) -> str:
    """What `generate` answers for this prompt on its own, as the server would return it."""
    from pipelines.lm import Decoding

    decoding = Decoding(max_new_tokens=max_tokens, repetition_penalty=handle.default_decoding.repetition_penalty)
    row = handle.lm.generate_ids([handle.render(prompt)], decoding)[0]
    # an answer cut by max_tokens inside a multi-byte character ends before that character
    return handle.lm.tokenizer.decode(row, skip_special_tokens=True).rstrip("\ufffd").strip()


def test_concurrent_requests_answer_as_each_prompt_alone(handle):
    """Requests with their own max_tokens join and leave one running batch; each answer is the
    one `generate` gives for that prompt alone."""
    service, client = make_client(handle, "serve.max_batch_size=3")
    requests = [(f"{PROMPT} ({n})", max_tokens) for n, max_tokens in enumerate([3, 12, 1, 8, 12, 5, 2])]
    answers: dict[int, dict] = {}

    def send(index: int) -> None:
        prompt, max_tokens = requests[index]
        answers[index] = client.post("/v1/completions", headers=AUTH,
                                     json={"prompt": prompt, "max_tokens": max_tokens}).json()

    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        service.batcher.stop()
    for index, (prompt, max_tokens) in enumerate(requests):
        assert answers[index]["choices"][0]["text"] == answer_alone(handle, prompt, max_tokens), prompt
        assert answers[index]["usage"]["completion_tokens"] <= max_tokens
    steps = service.metrics.registry.get_sample_value("llmops_batch_size_count")
    rows = service.metrics.registry.get_sample_value("llmops_batch_size_sum")
    assert rows > steps  # requests shared decoding steps


def test_a_bad_request_in_the_batch_does_not_take_the_others_down(handle):
    """Jobs put straight on the worker's queue: one past the model's context (the HTTP handler
    refuses those first) and one whose client's event loop is gone fail alone; the others decoding
    beside them get their normal answers."""
    import asyncio

    from pipelines.lm import Decoding
    from pipelines.serve import Job, RequestError

    service, client = make_client(handle)
    decoding = Decoding(max_new_tokens=6, repetition_penalty=handle.default_decoding.repetition_penalty)
    prompts = [PROMPT, "word " * 300, "Define run."]

    async def scenario() -> list:
        loop = asyncio.get_running_loop()
        gone = asyncio.new_event_loop()
        gone.close()
        jobs = [Job(handle.render(p), 0, decoding, 6, [], loop, loop.create_future()) for p in prompts]
        orphan = Job(handle.render(PROMPT), 0, decoding, 6, [], gone, loop.create_future(), stream=asyncio.Queue())
        for job in [jobs[0], orphan, jobs[1], jobs[2]]:
            service.batcher.submit(job)
        return await asyncio.wait_for(asyncio.gather(*(job.done for job in jobs), return_exceptions=True), 60)

    try:
        first, refused, last = asyncio.run(scenario())
        assert isinstance(refused, RequestError) and refused.status == 413, refused
        assert "over the model's context of 256 tokens" in refused.message
        assert first.text == answer_alone(handle, prompts[0], 6) and last.text == answer_alone(handle, prompts[2], 6)
        ok = client.post("/v1/completions", headers=AUTH, json={"prompt": PROMPT, "max_tokens": 4})
        assert ok.status_code == 200, ok.text
    finally:
        service.batcher.stop()


def test_a_prompt_past_the_models_context_is_a_413(handle):
    service, client = make_client(handle)
    try:
        prompt = "the " * 240
        tokens = len(handle.lm.tokenizer(handle.render(prompt), add_special_tokens=False)["input_ids"])
        assert 256 - 32 < tokens <= 512  # within serve.limits.max_prompt_tokens, past the tiny model's context
        response = client.post("/v1/completions", headers=AUTH, json={"prompt": prompt, "max_tokens": 32})
        assert response.status_code == 413, response.text
        message = response.json()["error"]["message"]
        assert f"the prompt is {tokens} tokens" in message and "context of 256 tokens" in message
    finally:
        service.batcher.stop()
