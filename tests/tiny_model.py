"""A tiny randomly initialised Llama for tests and smoke runs (no downloads).

    build_tiny_model(folder, tokenizer_dir)   # 2 layers, hidden 64: trains in seconds on CPU

Two attention heads of 32: the smallest head size vLLM's CPU attention kernels take, so the
serving tests run a real engine on it.

The folder is a plain transformers model (config, safetensors, tokenizer, a model card
with a licence), usable as `base_model.source` (a local folder).
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(directory: Path, tokenizer_dir: Path, *, layers: int = 2, hidden: int = 64, heads: int = 2,
                     kv_heads: int = 1, intermediate: int = 128, max_positions: int = 256, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny random Llama for tests\n",
                                         encoding="utf-8")
    return directory


def write_prepared_sample(directory: Path, tokenizer_dir: Path, rows: int = 400, validation: int = 48,
                          test: int = 48, system_prompt: str = "Answer with a short definition.") -> Path:
    """train/validation/test.parquet in the `prepare` stage's format, from the WordNet sample.

    Formatted by the prepare stage's own `format_split` with the tokenizer's chat template, so
    the columns (rendered text, messages, token counts) are what prepare writes for this tokenizer.
    """
    import json

    import pandas as pd
    from transformers import AutoTokenizer

    from pipelines.config.params import PrepareParams
    from pipelines.data.preparation import format_split

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sample = Path(__file__).resolve().parents[1] / "data" / "sample" / "wordnet.jsonl"
    records = []
    with open(sample, encoding="utf-8") as handle:
        for line, _ in zip(handle, range(rows + validation + test)):
            row = json.loads(line)
            records.append({"id": row["id"], "prompt": row["prompt"], "response": row["response"]})
    frame = format_split(pd.DataFrame(records), PrepareParams(template="chat", system_prompt=system_prompt), tokenizer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bounds = {"train": (0, rows), "validation": (rows, rows + validation), "test": (rows + validation, None)}
    for split, (start, stop) in bounds.items():
        frame.iloc[start:stop].reset_index(drop=True).to_parquet(directory / f"{split}.parquet", index=False)
    return directory
