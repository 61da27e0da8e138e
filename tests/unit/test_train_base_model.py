"""Stage `base_model`: a plain transformers folder with its licence and content hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config.params import BaseModelParams
from pipelines.errors import LLMOpsError


@pytest.fixture(scope="module")
def raw_tiny_model(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("raw") / "tiny", tiny_tokenizer_dir)


def test_licence_is_read_from_the_model_card_front_matter():
    from pipelines.model.materialise import licence_from_card

    assert licence_from_card("---\nlanguage: en\nlicense: apache-2.0\n---\n# Model") == "apache-2.0"
    assert licence_from_card("---\nlicense: 'mit'\n---\n") == "mit"
    assert licence_from_card("# no front matter\nlicense: mit") is None


def test_local_model_becomes_a_plain_folder_with_source_record(raw_tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.model.materialise import content_hash, folder_hashes, materialise

    out = tmp_path / "base"
    record = materialise(BaseModelParams(source=str(raw_tiny_model), output_dir=out), out)

    assert {"config.json", "model.safetensors", "tokenizer.json", "source.json"} <= {p.name for p in out.iterdir()}
    source = json.loads((out / "source.json").read_text())
    assert source == record
    assert source["kind"] == "local" and source["licence"] == "apache-2.0"
    assert source["files"] == folder_hashes(out) and source["content_sha256"] == content_hash(folder_hashes(out))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(raw_tiny_model)(ids).logits
        after = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.equal(before, after)


def test_declared_licence_wins(raw_tiny_model, tmp_path):
    from pipelines.model.materialise import materialise

    record = materialise(BaseModelParams(source=str(raw_tiny_model), licence="MIT"), tmp_path / "base")
    assert record["licence"] == "MIT"


def test_unknown_local_path_says_what_to_give(tmp_path):
    from pipelines.model.materialise import materialise

    with pytest.raises(LLMOpsError, match=r"local model folder '.*/nope' does not exist.*bundled:smollm2"):
        materialise(BaseModelParams(source=str(tmp_path / "nope")), tmp_path / "base")


def test_a_folder_without_config_is_refused(tmp_path):
    from pipelines.model.materialise import materialise

    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMOpsError, match="has no config.json"):
        materialise(BaseModelParams(source=str(tmp_path / "empty")), tmp_path / "base")


def test_a_hub_id_offline_fails_with_a_hint(tmp_path, monkeypatch):
    from pipelines.model.materialise import materialise

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LLMOpsError, match=r"cannot load a causal LM from 'no-such-org/no-such-model'.*HF_HUB_OFFLINE"):
        materialise(BaseModelParams(source="no-such-org/no-such-model"), tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_a_failure_while_writing_keeps_the_previous_folder(raw_tiny_model, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from pipelines.model.materialise import materialise

    out = tmp_path / "base"
    materialise(BaseModelParams(source=str(raw_tiny_model)), out)
    before = (out / "source.json").read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        materialise(BaseModelParams(source=str(raw_tiny_model), licence="changed"), out)
    assert (out / "source.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no temporary folder left behind
