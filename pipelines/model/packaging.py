"""The registered model: an MLflow pyfunc that packs the merged model, the LoRA adapter and the
prompt format.

Why pyfunc rather than the transformers flavor: MLflow's transformers flavor stores a
PEFT model as the adapter alone and reloads the base model by its hub id at load time.
That fails offline, and for a base model materialised from a local folder or a GGUF file
there is no hub id to reload. The pyfunc model carries the merged weights (base + adapter in
one plain transformers folder, `merged/`), the adapter it was merged from and the prompt
template as artifacts, so `mlflow.pyfunc.load_model("models:/name@champion")` and `mlflow
models serve` work on a machine without hub access, and every consumer formats prompts
exactly as training did. The serving engine (vLLM, `pipelines/serving/engine.py`) loads `merged/`
from the registry alone: no project code runs to read it.

Input: a DataFrame (or list of dicts) with a `prompt` column. Output: a DataFrame with a
`response` column. Optional params: max_new_tokens, temperature, top_p (sampling when
temperature > 0).

**No pickle in a registered version.** A pyfunc logged with a `PythonModel` instance is a
cloudpickle (`python_model.pkl`): whoever can write a model version can make every loader run
arbitrary code, and the file cannot be reviewed or diffed. Versions are logged as MLflow
"models from code" instead (`model_format`): `python_model` is the source file
`pipelines/model/registered_model.py`, which MLflow copies into the version and runs at load
(`mlflow.models.set_model(LoraTextGenerator())`), next to the project's source (`code/`) it
imports; weights are safetensors, the prompt format JSON, signature and example YAML/JSON.

**The project's own consumers run no code from the registry.** `load_registered` (evaluate's
champion, monitor's reference answers, simulate-traffic) and the serving engine
(`pipelines/serving/engine.py`, `fetch_version`) download the version's artifacts and read `merged/`
(safetensors only: `check_weights`) and `llmops_config` (JSON) with the code installed here;
MLflow's pyfunc loader is not called. So a version registered by an older project release in the
pickled format still loads, safely: its `python_model.pkl` is never read (a warning says to
register it again so that `mlflow.pyfunc.load_model` users load it without pickle too). Why not
refuse such versions: their weights and prompt format are plain data, and refusing would block a
rollback to a known-good champion for a file nobody reads.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

# This module is imported only where a model is saved or loaded (register, serve, MLflow's
# own loader), so importing mlflow at its top costs nothing on the CLI's start-up path.
from mlflow.pyfunc import PythonModel

from pipelines.data.templates import render_prompt
from pipelines.errors import LLMOpsError
from pipelines.model.lm import CausalLM, Decoding

logger = logging.getLogger(__name__)

CONFIG_ARTIFACT = "llmops_config"
MERGED_ARTIFACT = "merged"
ADAPTER_ARTIFACT = "adapter"
# The models-from-code file MLflow copies into each version (see the module docstring).
MODEL_CODE = Path(__file__).with_name("registered_model.py")
# Weight and object formats that are read with pickle (torch.load, joblib, cloudpickle): never loaded here.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


class UnsafeModel(LLMOpsError):
    """A registered version that cannot be loaded without running code stored in it."""


class LoraTextGenerator(PythonModel):
    """Answers prompts with the merged model, using the training prompt template."""

    def load_context(self, context) -> None:  # noqa: ANN001

        config = json.loads(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        self.config = config
        # A consumer may ask for another dtype (`llmops serve`: serve.dtype) with
        # `mlflow.pyfunc.load_model(uri, model_config={"dtype": ...})`: loading in that dtype keeps
        # the rotary embedding's inv_freq in float32, which converting a loaded model does not.
        dtype = (getattr(context, "model_config", None) or {}).get("dtype") or config.get("dtype", "float32")
        if MERGED_ARTIFACT not in context.artifacts:
            raise ValueError("this model version has no merged weights (registered by an older version of the "
                             "project): register the candidate again with `llmops register`")
        self.lm = CausalLM.load(context.artifacts[MERGED_ARTIFACT], dtype=dtype, name="registered")
        self.decoding = Decoding(**config["decoding"])

    def render(self, prompt: str) -> str:

        return render_prompt(prompt, self.config["template"], self.config.get("system_prompt"), self.lm.tokenizer)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads type hints as a schema
        import dataclasses

        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in frame.columns:
            raise ValueError(f"input needs a 'prompt' column, got {list(frame.columns)}")
        decoding = self.decoding
        params = params or {}
        overrides = {k: params[k] for k in ("max_new_tokens", "temperature", "top_p") if params.get(k) is not None}
        if overrides.get("temperature", 0) > 0:
            overrides["do_sample"] = True
        if overrides:
            decoding = dataclasses.replace(decoding, **overrides)
        generation = self.lm.generate([self.render(str(p)) for p in frame["prompt"]], decoding)
        return pd.DataFrame({"response": generation.texts})


def model_format(merged_dir: Path, adapter_dir: Path, config_path: Path) -> dict[str, Any]:
    """The arguments of `mlflow.pyfunc.log_model` / `save_model` that make a registered version:
    models from code (no pickle), the merged weights, the adapter and the prompt format as artifacts,
    the project's source as its code, a signature and an input example."""
    signature, example = signature_and_example()
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": {MERGED_ARTIFACT: str(merged_dir), ADAPTER_ARTIFACT: str(adapter_dir),
                      CONFIG_ARTIFACT: str(config_path)},
        "code_paths": [str(Path(__file__).parents[1])],  # the whole pipelines package
        "signature": signature,
        "input_example": example,
    }


def model_artifacts(folder: Path) -> dict[str, Path]:
    """The pyfunc artifacts of a downloaded model folder (name -> path), read from its MLmodel file
    (YAML, parsed safely: nothing in it is executed)."""
    mlmodel = Path(folder) / "MLmodel"
    if not mlmodel.exists():
        raise UnsafeModel(f"{folder} is not an MLflow model (no MLmodel file); register the candidate again "
                          "with `llmops register`")
    flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    return {key: Path(folder) / value["path"] for key, value in (flavor.get("artifacts") or {}).items()}


def is_pickled(folder: Path) -> bool:
    """Whether the version was logged in the older format, its PythonModel a cloudpickle."""
    flavor = (yaml.safe_load((Path(folder) / "MLmodel").read_text()).get("flavors") or {}).get("python_function")
    return bool(flavor) and "model_code_path" not in flavor


def check_weights(merged: Path, source: str) -> None:
    """The merged folder must hold safetensors weights and nothing that loads through pickle
    (a `pytorch_model.bin` would be read with torch.load by transformers and by vLLM)."""
    pickled = sorted(p.name for p in Path(merged).rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise UnsafeModel(f"{source}: the merged weights include pickle-format files ({', '.join(pickled[:3])}), "
                          "which are not loaded; register the candidate again with `llmops register` "
                          "(it writes safetensors)")
    if not any(Path(merged).glob("*.safetensors")):
        raise UnsafeModel(f"{source}: no safetensors weights in {Path(merged).name}/; register the candidate "
                          "again with `llmops register`")


def load_folder(folder: Path, source: str, dtype: str | None = None) -> LoraTextGenerator:
    """A downloaded version as a ready LoraTextGenerator, built by the code installed here from the
    version's data alone (MLmodel YAML, llmops_config JSON, safetensors): no code stored in the
    version runs and no pickle is read, whatever format the version was logged in."""
    from mlflow.pyfunc import PythonModelContext

    artifacts = model_artifacts(folder)
    if MERGED_ARTIFACT not in artifacts or not (artifacts[MERGED_ARTIFACT] / "config.json").exists():
        raise UnsafeModel(f"{source} has no merged weights (registered by an older version of the project); "
                          "register the candidate again with `llmops register` and promote it")
    if CONFIG_ARTIFACT not in artifacts:
        raise UnsafeModel(f"{source} has no prompt format ({CONFIG_ARTIFACT}); register the candidate again "
                          "with `llmops register`")
    check_weights(artifacts[MERGED_ARTIFACT], source)
    if is_pickled(folder):
        logger.warning("%s was registered in the older pickled format; its pickle is not read here, but "
                       "`mlflow.pyfunc.load_model` would unpickle it: register it again with `llmops register`",
                       source)
    generator = LoraTextGenerator()
    generator.load_context(PythonModelContext({k: str(v) for k, v in artifacts.items()},
                                              {"dtype": dtype} if dtype else None))
    return generator


def load_registered(registry: Any, version: str, dtype: str | None = None) -> LoraTextGenerator:
    """Version `version` of `registry` (a pipelines.registry.model_registry.Registry) as a LoraTextGenerator,
    downloaded into a temporary folder and loaded by `load_folder` (not by MLflow's pyfunc loader)."""
    import mlflow

    uri = f"models:/{registry.name}/{version}"
    mlflow.set_tracking_uri(registry.uri)
    with tempfile.TemporaryDirectory(prefix="llmops-model-") as tmp:
        folder = registry.call(mlflow.artifacts.download_artifacts, artifact_uri=uri, dst_path=tmp)
        # the weights are read into memory here; the folder can go when the with-block ends
        return load_folder(Path(folder), uri, dtype)


def signature_and_example() -> tuple[Any, Any]:
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "response")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", 64),
            ParamSpec("temperature", "double", 0.0),
            ParamSpec("top_p", "double", 1.0),
        ]),
    )
    example = pd.DataFrame({"prompt": ['What does the noun "bank" mean?']})
    return signature, example


def write_merged(base_dir: Path, adapter_dir: Path, target: Path) -> Path:
    """Base model + LoRA adapter merged into one plain transformers folder (weights, config,
    tokenizer and chat template) that any engine loads without peft: what is registered and
    served. The weights keep the base model's dtype; the engine casts them (serve.dtype)."""

    config = json.loads((Path(base_dir) / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    lm = CausalLM.load(base_dir, adapter_dir, dtype=dtype if dtype in ("float32", "bfloat16", "float16")
                       else "float32", name="merged")
    lm.model.save_pretrained(target)
    lm.tokenizer.save_pretrained(target)
    # the engine's own generation defaults stay off: decoding comes from the request and the
    # registered config (the gateway), as in evaluation
    for name in ("generation_config.json",):
        (Path(target) / name).unlink(missing_ok=True)
    return Path(target)
