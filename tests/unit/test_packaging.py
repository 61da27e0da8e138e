"""The registered pyfunc model: merged weights that answer as base + adapter do, loaded in the dtype
its consumer asks for (MLflow's model_config); logged from code with no pickle, and loaded by the
project from its data alone (a pickled version's pickle is never read). The registry is a SQLite
file here (no server)."""

from __future__ import annotations

import ast
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.pyfunc import PythonModelContext

from pipelines.model.lm import CausalLM, Decoding
from pipelines.model.packaging import (
    ADAPTER_ARTIFACT,
    CONFIG_ARTIFACT,
    MERGED_ARTIFACT,
    PICKLE_SUFFIXES,
    LoraTextGenerator,
    UnsafeModel,
    write_merged,
)
from tests.support import REPO, Workspace, build_adapter, build_tiny_base, evaluation, register


def test_the_registered_model_loads_in_the_dtype_the_consumer_asks_for(tmp_path, tiny_tokenizer_dir):
    base = build_tiny_base(tmp_path / "base", tiny_tokenizer_dir)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dtype": "float32", "decoding": {"max_new_tokens": 4}, "template": "plain"}))
    adapter = build_adapter(tmp_path / "adapter", base)
    artifacts = {CONFIG_ARTIFACT: str(config), MERGED_ARTIFACT: str(write_merged(base, adapter, tmp_path / "merged")),
                 ADAPTER_ARTIFACT: str(adapter)}

    def loaded(model_config):
        model = LoraTextGenerator()
        model.load_context(PythonModelContext(artifacts, model_config))
        weights = {parameter.dtype for parameter in model.lm.model.parameters()}
        inv_freq = {buffer.dtype for name, buffer in model.lm.model.named_buffers() if name.endswith("inv_freq")}
        # peft leaves merged weights frozen; frozen bfloat16 output layers run 2.2x slower on this
        # CPU (pipelines/model/lm.py, CausalLM.load), so the loaded model's weights require grad again
        assert all(parameter.requires_grad for parameter in model.lm.model.parameters())
        return weights, inv_freq

    assert loaded(None) == ({torch.float32}, {torch.float32})  # the registered config's dtype
    # bfloat16 weights, and the rotary frequencies stay float32 (`model.to(bfloat16)` would round them)
    assert loaded({"dtype": "bfloat16"}) == ({torch.bfloat16}, {torch.float32})


def test_merged_weights_answer_as_base_plus_adapter_and_load_without_peft(tmp_path, tiny_tokenizer_dir):
    base = build_tiny_base(tmp_path / "base", tiny_tokenizer_dir)
    adapter = build_adapter(tmp_path / "adapter", base)
    merged = write_merged(base, adapter, tmp_path / "merged")
    assert not (merged / "adapter_config.json").exists() and (merged / "config.json").exists()
    assert (merged / "tokenizer.json").exists() and not (merged / "generation_config.json").exists()
    prompts = ["What does the noun bank mean?", "Define: river"]
    greedy = Decoding(max_new_tokens=6, repetition_penalty=3.0)
    with_adapter = CausalLM.load(base, adapter, dtype="float32").generate_ids(prompts, greedy)
    assert CausalLM.load(merged, dtype="float32").generate_ids(prompts, greedy) == with_adapter
    assert CausalLM.load(base, dtype="float32").generate_ids(prompts, greedy) != with_adapter  # the adapter counts


def test_a_version_without_merged_weights_is_named_with_the_fix(tmp_path, tiny_tokenizer_dir):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dtype": "float32", "decoding": {"max_new_tokens": 4}, "template": "plain"}))
    with pytest.raises(ValueError, match="llmops register"):
        LoraTextGenerator().load_context(PythonModelContext({CONFIG_ARTIFACT: str(config)}, None))


# --- the registered format: no pickle, and the project's loaders read data only ----------------------

PICKLE_MAGIC = re.compile(rb"\A\x80[\x02-\x05]")  # pickle protocols 2-5 start with PROTO n


def pickle_files(folder: Path) -> list[str]:
    """Files in `folder` that are pickles: by name, or by the first bytes of their content."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and (path.suffix in PICKLE_SUFFIXES or PICKLE_MAGIC.match(path.read_bytes()[:2])):
            found.append(str(path.relative_to(folder)))
    return found


@pytest.fixture
def workspace(tmp_path, tiny_tokenizer_dir):
    base = build_tiny_base(tmp_path / "base", tiny_tokenizer_dir)
    return Workspace(tmp_path / "ws", base, f"sqlite:///{tmp_path / 'mlflow.db'}", "format-test")


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every pickle loader raises, and MLflow's own switch forbids unpickling models."""
    import cloudpickle

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    for module in (pickle, cloudpickle):
        monkeypatch.setattr(module, "load", forbidden)
        monkeypatch.setattr(module, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")


def test_a_registered_version_holds_no_pickle_and_mlflow_loads_it_with_unpickling_forbidden(
        workspace, tmp_path, no_unpickling):
    import mlflow

    from pipelines.model.packaging import load_registered
    from pipelines.registry.model_registry import Registry

    version = register(workspace, evaluation(0.02))
    registry = Registry(workspace.params())
    mlflow.set_tracking_uri(registry.uri)
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/format-test/{version}", dst_path=str(tmp_path / "dl")))
    assert pickle_files(folder) == []
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor and flavor["model_code_path"].endswith("registered_model.py")
    # the version carries the whole pipelines package its model code imports, not one subfolder
    code = folder / flavor["code"]
    assert (code / "pipelines" / "model" / "packaging.py").is_file() and (code / "pipelines" / "cli.py").is_file()
    # MLflow's own loader (models from code) and the project's (data only) both answer
    model = mlflow.pyfunc.load_model(str(folder))
    out = model.predict([{"prompt": 'What does the noun "bank" mean?'}], params={"max_new_tokens": 3})
    assert list(out.columns) == ["response"] and isinstance(out["response"][0], str)
    generator = load_registered(registry, version)
    assert generator.lm.generate([generator.render("Define: river")], generator.decoding).texts[0] is not None


def log_version(workspace, python_model, merged: Path, config: Path) -> str:
    """A version logged as an older release (or an attacker with write access) would have logged it."""
    import mlflow

    from pipelines.registry.model_registry import Registry

    registry = Registry(workspace.params())
    mlflow.set_tracking_uri(registry.uri)
    mlflow.set_experiment("format-test")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=python_model,
                                       artifacts={MERGED_ARTIFACT: str(merged), CONFIG_ARTIFACT: str(config),
                                                  ADAPTER_ARTIFACT: str(workspace.adapter)})
    version = str(mlflow.register_model(info.model_uri, "format-test").version)
    registry.set_alias("champion", version)
    return version


def prompt_format(tmp_path: Path) -> Path:
    config = tmp_path / "llmops_config.json"
    config.write_text(json.dumps({"dtype": "float32", "decoding": {"max_new_tokens": 4}, "template": "plain"}))
    return config


class Tampered(LoraTextGenerator):
    """A pickled PythonModel whose unpickling runs code: it writes `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def test_a_pickled_version_is_loaded_by_the_project_without_its_pickle_being_read(
        workspace, tmp_path, tiny_tokenizer_dir):
    from pipelines.registry.model_registry import champion_model

    merged = write_merged(workspace.params().base_model.output_dir, workspace.adapter, tmp_path / "merged")
    marker = tmp_path / "unpickled"
    log_version(workspace, Tampered(marker), merged, prompt_format(tmp_path))
    marker.unlink(missing_ok=True)  # in case MLflow read the model back while logging it
    lm = champion_model(workspace.params(), "float32")  # evaluate's champion
    assert not marker.exists(), "loading the champion ran code from its pickle"
    assert lm is not None and lm.registry_version == "1"
    assert lm.generate(["Define: river"], Decoding(max_new_tokens=3)).texts[0] is not None


def test_served_weights_in_a_pickle_format_are_refused_with_the_fix(workspace, tmp_path):
    from pipelines.serving.engine import fetch_version

    merged = write_merged(workspace.params().base_model.output_dir, workspace.adapter, tmp_path / "merged")
    for weights in merged.glob("*.safetensors"):
        weights.unlink()
    (merged / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": 1}))  # torch.load would unpickle it
    version = log_version(workspace, LoraTextGenerator(), merged, prompt_format(tmp_path))
    params = workspace.params(f"serve.engine.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(UnsafeModel, match=r"pickle-format files \(pytorch_model.bin\).*`llmops register`"):
        fetch_version(params, version)


def test_no_project_module_loads_a_version_through_mlflows_pickle_capable_loader():
    """`mlflow.pyfunc.load_model` unpickles a pickled version (MLflow's default); the project's modules
    load versions with pipelines.model.packaging.load_registered instead (the docs may name it)."""
    def uses_pyfunc_loader(path: Path) -> bool:
        return any(isinstance(node, ast.Attribute) and node.attr == "load_model"
                   and isinstance(node.value, ast.Attribute) and node.value.attr == "pyfunc"
                   for node in ast.walk(ast.parse(path.read_text())))

    assert [path.name for path in sorted((REPO / "pipelines").glob("*.py")) if uses_pyfunc_loader(path)] == []
