"""The HTTP layer of `llmops serve` in-process, on the tiny model: paths that need a server in a
given state (model loading, batcher stopped, queue full) or exact outputs (stop sequences).
The served behaviour against real processes is in tests/integration/test_serve.py."""

from __future__ import annotations

import threading
import time

import pytest

from pipelines.params import load_params
from tests.support import REPO, TEST_TOKEN

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

    lm = CausalLM.load(tiny_base_model_dir, dtype="float32")
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
