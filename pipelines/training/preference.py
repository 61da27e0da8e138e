"""Preference pairs for `train.objective: dpo`: the prepared rows that have a `rejected` answer.

The library side of the stage `train` (pipelines/stages/train.py) for DPO. Reviewed rows reach
the prepared splits like every other row; `response` is the chosen answer (the preferred one,
or the reviewer's correction) and the nullable `rejected` column holds the other answer. A
split without the column (prepared before reviews existed) has no pairs.

TRL's DPOTrainer gets them in its conversational preference format (prompt = the system and
user turns prepare stored, chosen / rejected = one assistant turn each), or as rendered text
for the alpaca and plain templates, and does the tokenizing itself; `rendering_problems` holds
its tokens of prompt + chosen to those of the text evaluation and serving send, as the SFT
path's check does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import LLMOpsError

if TYPE_CHECKING:
    import pandas as pd

REJECTED = "rejected"


class TooFewPairs(LLMOpsError):
    """train.objective is dpo but the train split holds fewer preference pairs than train.dpo.min_pairs."""


def pair_mask(frame: pd.DataFrame) -> Any:
    """Rows with a rejected answer that is non-blank and differs from the chosen one."""
    import pandas as pd

    if REJECTED not in frame.columns:
        return pd.Series(False, index=frame.index)
    rejected = frame[REJECTED].astype("string").str.strip()
    chosen = frame["response"].astype("string").str.strip()
    return (rejected.notna() & (rejected != "") & (rejected != chosen)).fillna(False).astype(bool)


def preference_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[pair_mask(frame)]


def count_pairs(path: Path) -> int:
    """Preference pairs in one prepared split file (0 when it has no `rejected` column)."""
    import pyarrow.parquet as pq

    if REJECTED not in pq.read_schema(path).names:
        return 0
    return int(pair_mask(pq.read_table(path, columns=["response", REJECTED]).to_pandas()).sum())


def check_enough_pairs(pairs: int, path: Path, min_pairs: int, max_train_samples: int | None) -> None:
    usable = pairs if max_train_samples is None else min(pairs, max_train_samples)
    if usable < min_pairs:
        capped = f" (train.max_train_samples caps them at {max_train_samples})" if usable < pairs else ""
        raise TooFewPairs(
            f"train: train.objective is dpo but {path} holds {pairs} preference pair(s){capped} (rows with a "
            f"`rejected` answer), fewer than train.dpo.min_pairs={min_pairs}; collect more reviews "
            "(`llmops review`, docs/review.md) and re-run ingest and prepare, or set train.objective: sft"
        )


def dpo_dataset(frame: pd.DataFrame, eos_token: str | None) -> Any:
    """TRL's preference dataset of the pair rows of one prepared split, plus the rendered text to check.

    Conversational where prepare stored messages: TRL applies the tokenizer's chat template to
    prompt + chosen and prompt + rejected. Otherwise the rendered prompt and completion text;
    the rejected answer is rendered as prepare renders a completion for the alpaca and plain
    templates (the answer, then EOS: pipelines/data/templates.py render_pair)."""
    from datasets import Dataset

    rejected = [str(text) for text in frame[REJECTED]]
    if "prompt_messages" in frame.columns:
        prompt = [[dict(turn) for turn in turns] for turns in frame["prompt_messages"]]
        chosen = [[dict(turn) for turn in turns] for turns in frame["completion_messages"]]
        rejected_turns = [[{"role": "assistant", "content": text}] for text in rejected]
    else:
        prompt, chosen = list(frame["prompt_text"]), list(frame["completion_text"])
        rejected_turns = [text + (eos_token or "") for text in rejected]
    rendered = [p + c for p, c in zip(frame["prompt_text"], frame["completion_text"])]
    return Dataset.from_dict({"prompt": prompt, "chosen": chosen, "rejected": rejected_turns, "rendered": rendered,
                              "rendered_prompt": list(frame["prompt_text"])})


def rendering_problems(dataset: Any, tokenizer: Any) -> list[int]:
    """Rows whose TRL tokens (prompt_ids + chosen_ids) are not the tokens of prompt_text + completion_text,
    or whose prompt part is not the tokens of prompt_text."""
    full = tokenizer(list(dataset["rendered"]), add_special_tokens=False)["input_ids"]
    prompts = tokenizer(list(dataset["rendered_prompt"]), add_special_tokens=False)["input_ids"]
    return [row for row, (prompt_ids, chosen_ids, want, want_prompt)
            in enumerate(zip(dataset["prompt_ids"], dataset["chosen_ids"], full, prompts))
            if prompt_ids + chosen_ids != want or prompt_ids != want_prompt]


def pair_stats(pairs: int, dataset: Any, max_length: int) -> dict[str, Any]:
    """What TRL made of a split's pairs: kept, dropped (the prompt alone fills max_length), cut."""
    prompt_lengths = [len(ids) for ids in dataset["prompt_ids"]]
    return {
        "pairs": pairs,
        "examples": len(dataset),
        "dropped_prompt_too_long": pairs - len(dataset),
        "cut_at_max_length": sum(
            1 for p, c, r in zip(prompt_lengths, dataset["chosen_ids"], dataset["rejected_ids"])
            if p + max(len(c), len(r)) > max_length),
    }


def gate_batch(trainer: Any, size: int) -> dict[str, Any]:
    """The adapter gate's fixed batch for DPO: the first pairs (validation, else train) through
    TRL's preference collator, as a language-model batch: the loss is the mean negative
    log-likelihood of the chosen and rejected answer tokens (labels -100 elsewhere)."""
    from pipelines.model.encoding import IGNORE_INDEX

    dataset = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
    rows = dataset.select(range(min(size, len(dataset)))).select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    batch = trainer.data_collator(list(rows))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
