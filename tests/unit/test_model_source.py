"""Resolving base_model.source: bundled GGUF, local folder, hub id, and clear errors."""

from __future__ import annotations

import pytest

from pipelines.errors import LLMOpsError
from pipelines.model.sources import load_tokenizer, resolve


def test_bundled_default_is_found_through_package_metadata():
    source = resolve("bundled:smollm2-135m-instruct")
    assert source.kind == "bundled" and source.licence == "Apache-2.0"
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.from_pretrained_kwargs() == {"gguf_file": source.gguf_file}


def test_unknown_bundled_name():
    with pytest.raises(LLMOpsError, match="unknown bundled model 'bundled:gpt-9'; available: bundled:smollm2"):
        resolve("bundled:gpt-9")


def test_local_folder(tiny_tokenizer_dir):
    source = resolve(str(tiny_tokenizer_dir))
    assert source.kind == "local"
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    assert tokenizer.pad_token is not None


@pytest.mark.parametrize("path", ["./models/nope", "/no/such/model", "models/base/nope"])
def test_missing_local_folder(path):
    with pytest.raises(LLMOpsError, match=f"local model folder '{path}' does not exist"):
        resolve(path)


def test_hub_id_is_passed_through_and_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve("HuggingFaceTB/SmolLM2-135M-Instruct", revision="main")
    assert source.kind == "hub" and source.from_pretrained_kwargs() == {"revision": "main"}
    with pytest.raises(LLMOpsError, match="could not load a tokenizer from 'no-org/no-model'.*no network"):
        load_tokenizer("no-org/no-model")
