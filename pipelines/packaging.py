"""The registered model: an MLflow pyfunc that packs the merged model, the LoRA adapter and the
prompt format.

Why pyfunc rather than the transformers flavor: MLflow's transformers flavor stores a
PEFT model as the adapter alone and reloads the base model by its hub id at load time.
That fails offline, and for a base model materialised from a local folder or a GGUF file
there is no hub id to reload. The pyfunc model carries the merged weights (base + adapter in
one plain transformers folder, `merged/`), the adapter it was merged from and the prompt
template as artifacts, so `mlflow.pyfunc.load_model("models:/name@champion")` and `mlflow
models serve` work on a machine without hub access, and every consumer formats prompts
exactly as training did. The serving engine (vLLM, `pipelines/engine.py`) loads `merged/`
from the registry alone: no project code runs to read it.

Input: a DataFrame (or list of dicts) with a `prompt` column. Output: a DataFrame with a
`response` column. Optional params: max_new_tokens, temperature, top_p (sampling when
temperature > 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# This module is imported only where a model is saved or loaded (register, serve, MLflow's
# own loader), so importing mlflow at its top costs nothing on the CLI's start-up path.
from mlflow.pyfunc import PythonModel

CONFIG_ARTIFACT = "llmops_config"
MERGED_ARTIFACT = "merged"
ADAPTER_ARTIFACT = "adapter"


class LoraTextGenerator(PythonModel):
    """Answers prompts with the merged model, using the training prompt template."""

    def load_context(self, context) -> None:  # noqa: ANN001
        from pipelines.lm import CausalLM, Decoding

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
        from pipelines.templates import render_prompt

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
    from pipelines.lm import CausalLM

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
