"""Stage `base_model`: materialise the base model as a plain transformers folder.

Reads   params `base_model` (source: `bundled:smollm2-135m-instruct`, a local folder or a
        hub id; revision, dtype, licence).
Writes  `base_model.output_dir` (default models/base/): config.json, generation_config.json,
        model.safetensors, tokenizer files, and source.json recording where the model came
        from, its licence and a content hash of the folder. The folder is built aside and
        swapped in whole.
Run     `llmops base_model` or `dvc repro base_model`.

A GGUF source (the bundled default is SmolLM2-135M-Instruct Q4_1) is dequantized by
transformers (`gguf_file=`); the weights are then loaded into a model built from the
config alone, so the saved folder carries no quantization settings and later stages load
it with a plain `from_pretrained(folder)`.
"""

from pipelines.config.params import Params
from pipelines.model.materialise import materialise


def main(params: Params) -> None:
    materialise(params.base_model, params.base_model.output_dir)
