"""The gateway (`llmops serve`) and its engine launcher, in-process and without an engine: what
holds before a request reaches vLLM (auth, body checks, 503 while no engine runs, admission)
and how the engine is started. The served behaviour, against a real vLLM engine, is in
tests/integration/test_serve.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipelines.params import load_params
from tests.support import REPO, TEST_TOKEN

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
PROMPT = 'What does the noun "bank" mean?'


@pytest.fixture
def gateway(tmp_path):
    """A gateway whose engine thread never started: no version is being served."""
    from fastapi.testclient import TestClient

    from pipelines.serve import Service, create_app

    params = load_params(REPO / "params.yaml", [f"serve.engine.cache_dir={tmp_path}",
                                                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    service = Service(params, TEST_TOKEN)
    with TestClient(create_app(service)) as client:
        yield service, client


def test_without_an_engine_requests_get_503_with_retry_after_and_ready_says_why(gateway):
    service, client = gateway
    response = client.post("/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user",
                                                                                      "content": PROMPT}]})
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert "engine is starting" in response.json()["error"]["message"]
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["engine"]["state"] == "starting"
    service.engines.state, service.engines.last_error = "failed", "vLLM for v3 exited with code 1"
    assert "exited with code 1" in client.post("/v1/completions", headers=AUTH,
                                               json={"prompt": PROMPT}).json()["error"]["message"]
    assert client.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not valid json"),
    (b"\xff\xfe", "not valid json"),
    (b"42", "json object"),
    (json.dumps({"prompt": "a\u0000b"}).encode(), "NUL"),
    (b'{"prompt": "a \\udc00 b"}', "surrogate"),
    (json.dumps({"prompt": PROMPT, "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"prompt": PROMPT, "seed": 2 ** 64}).encode(), "seed"),
    (json.dumps({"prompt": PROMPT, "top_p": 0}).encode(), "top_p"),
    (json.dumps({"prompt": PROMPT, "response_format": {"type": "yaml"}}).encode(), "response_format"),
])
def test_bodies_are_checked_before_they_reach_an_engine(gateway, body, message):
    _, client = gateway
    response = client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 422, response.text
    assert message.lower() in response.json()["error"]["message"].lower()


def test_no_token_no_answer_and_no_open_api_pages(gateway):
    _, client = gateway
    assert client.post("/v1/completions", json={"prompt": PROMPT}).status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert client.get("/openapi.json").status_code == 401 and client.get("/docs").status_code == 404
    assert client.get("/openapi.json", headers=AUTH).status_code == 200


def test_admission_refuses_past_capacity_with_a_retry_after(gateway):
    from pipelines.serve import RequestError

    service, _ = gateway
    for _ in range(service.capacity):
        service.admit()
    with pytest.raises(RequestError) as refused:
        service.admit()
    assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) >= 1
    service.release(0.5)
    service.admit()  # a freed slot admits again


def test_engine_command_environment_and_core_list(tmp_path):
    from pipelines.engine import EngineConfig, _cpu_bind, engine_command, engine_environment

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    params = load_params(REPO / "params.yaml", ["serve.engine.device=cpu", "serve.engine.kv_cache_gib=0.5"])
    config = EngineConfig.from_params(params.serve)
    command = engine_command(config, tmp_path, "dictionary", 8123, "secret-key")
    joined = " ".join(command)
    # the context is the model's when the limits ask for more (512 + 256 > 256)
    assert "--max-model-len 256" in joined and "--enforce-eager" in joined and "--api-key secret-key" in joined
    assert f"--kv-cache-memory-bytes {2 ** 29}" in joined and "--served-model-name dictionary" in joined
    assert "--generation-config vllm" in joined and "--host 127.0.0.1" in joined
    env = engine_environment(config, {"MLFLOW_TRACKING_PASSWORD": "p", "LLMOPS_API_TOKEN": "t", "PATH": "/bin"})
    assert "MLFLOW_TRACKING_PASSWORD" not in env and "LLMOPS_API_TOKEN" not in env  # the engine holds no secret
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"]
    assert _cpu_bind("all", {0, 1, 2, 3, 6, 8, 9}) == "0-3,6,8-9" and _cpu_bind("all", {5}) == "5"
    assert _cpu_bind("auto") == "auto"


def test_a_missing_vllm_interpreter_is_named_with_the_fix(tmp_path):
    from pipelines.engine import EngineError, check_python

    with pytest.raises(EngineError, match="make install"):
        check_python(str(tmp_path / "no-such-python"))
    with pytest.raises(EngineError, match="has no vllm package"):
        check_python(sys.executable)  # the project's venv does not have vLLM, by design


def test_a_one_turn_template_takes_one_user_message(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from pipelines.engine import ServedVersion
    from pipelines.serve import RequestError, Served

    version = ServedVersion("tiny", "1", Path("."), {"template": "alpaca", "system_prompt": "Be brief."})
    served = Served(version, engine=None, tokenizer=AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    text = served.render_single_turn([{"role": "user", "content": PROMPT}])
    assert PROMPT in text and "Be brief." in text
    with pytest.raises(RequestError, match="one turn"):
        served.render_single_turn([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "user", "content": "c"}])
    assert served.suppressed and all(v == -100.0 for v in served.suppressed.values())
    assert str(served.tokenizer.eos_token_id) not in served.suppressed  # the answer may end
