"""Quantize one merged model with llm-compressor: run by pipelines/quantization/variants.py as

    <quantize.python> pipelines/quantization/worker.py '<spec as JSON>'

in llm-compressor's own virtualenv (.venv-quantize: its pins clash with vLLM's and ours), so it
imports nothing of the project. The spec: source (a transformers model folder), output (a new
folder), scheme (w8a8-int8 | w4a16), group_size, ignore. It writes the compressed-tensors model
and the tokenizer to `output` and prints one JSON line: what it made and how long it took.
"""

import json
import sys
import time


def modifier(scheme: str, group_size, ignore: list):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if scheme == "w8a8-int8":
        # llm-compressor's W8A8 preset: int8 weights per output channel, int8 activations per
        # token computed as they come (dynamic), so no calibration data is needed
        return QuantizationModifier(targets="Linear", scheme="W8A8", ignore=ignore)
    if scheme == "w4a16":
        # int4 weights by round-to-nearest, per group of input columns (its preset's 128 does not
        # divide e.g. SmolLM2-135M's 576 columns, hence the group size from params) or per channel
        weights = {"num_bits": 4, "type": "int", "symmetric": True,
                   "strategy": "group" if group_size else "channel", "group_size": group_size}
        return QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                    ignore=ignore)
    raise SystemExit(f"unknown scheme {scheme!r}")


def main() -> None:
    spec = json.loads(sys.argv[1])
    started = time.time()
    import llmcompressor
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec["source"], dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(spec["source"])
    oneshot(model=model, recipe=modifier(spec["scheme"], spec.get("group_size"), spec.get("ignore") or []))
    model.save_pretrained(spec["output"], save_compressed=True)
    tokenizer.save_pretrained(spec["output"])
    from importlib.metadata import version

    print(json.dumps({"seconds": round(time.time() - started, 1), "llmcompressor": llmcompressor.__version__
                      if hasattr(llmcompressor, "__version__") else version("llmcompressor"),
                      "compressed_tensors": version("compressed-tensors")}))


if __name__ == "__main__":
    main()
