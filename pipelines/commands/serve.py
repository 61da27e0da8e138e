"""`llmops serve`: the gateway in front of the vLLM engine that serves the registry's champion.

    LLMOPS_API_TOKEN=... llmops serve                      # models:/<registry.model_name>@champion
    llmops serve --set serve.port=8080 --set serve.engine.max_num_seqs=32
    llmops serve --wait                                    # no champion yet: serve it once there is one

Reads `serve`, `registry`, `tracking` and `inference_log` from params.yaml; writes every
request, the refused ones included, to the inference log (`pipelines/serving/inference_log.py`).

The engine is vLLM (pipelines/serving/engine.py): one OpenAI-compatible server process per served
version, on loopback, behind an API key only the gateway knows. The gateway is what users and
`llmops deploy` talk to, and what vLLM does not do:
- bearer auth, body / prompt / max_tokens limits, bounded admission (429 + Retry-After);
- the prompt format the version was trained with (the registered config: chat template or a
  plain/alpaca template, the system prompt when the client sends none) and its decoding defaults;
- the inference log, `/v1/feedback`, `/metrics` (its own and the engine's), `/health`, `/ready`;
- the engine's life: started before serving, restarted with backoff when it dies (503 meanwhile),
  swapped blue/green when the alias moves (the new version's engine starts beside the old one,
  traffic switches once it is ready, the old one drains and stops), `POST /admin/reload`;
- a client that goes away cancels its engine request (streaming or not).
Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with `"stream": true`),
`GET /v1/models`, `POST /v1/feedback`, `GET /health`, `GET /ready`, `GET /metrics`,
`POST /admin/reload`, `GET /openapi.json`. Every endpoint but the two probes needs
`Authorization: Bearer <token>`. Docs: docs/serving.md.
"""

from pipelines.serving.app import main

__all__ = ["main"]
