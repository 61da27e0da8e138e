"""Prompt/completion pairs as token ids with the prompt masked out of the loss, and batches of them.

Used by training and by the language model's loss scoring alike."""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def encode_pair(prompt_text: str, completion_text: str, tokenizer: Any, max_length: int) -> dict[str, list[int]] | None:
    """Token ids and labels of one example; prompt tokens get label -100 (no loss).

    The prompt and the completion are tokenized separately (the prompt text is the full
    model input, so no special tokens are added) and truncated together from the right.
    Returns None when truncation leaves no completion token to learn from.
    """
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch: input_ids with the pad token, labels with -100, attention mask 0."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
