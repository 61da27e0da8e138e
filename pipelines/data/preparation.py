"""The work behind the stage `prepare`: deduplicate validated pairs, split them by prompt and
render them in the prompt format (pure functions over a frame), and the check that refuses data
whose validation failed or is stale.

What the stage reads and writes, and how it is run: pipelines/stages/prepare.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config.params import PrepareParams
from pipelines.data.splits import SPLITS, file_md5, normalise_text, split_of, split_settings
from pipelines.data.templates import conversation, render_pair
from pipelines.errors import DataError, ValidationFailed

if TYPE_CHECKING:
    import pandas as pd


def _shingles(text: str, size: int = 3) -> set[bytes]:
    words = text.split()
    if len(words) < size:
        return {text.encode()}
    return {" ".join(words[i: i + size]).encode() for i in range(len(words) - size + 1)}


def deduplicate(frame: pd.DataFrame, threshold: float, seed: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop exact duplicates of (prompt, response) after normalisation, then near-duplicates.

    Near-duplicates are pairs whose word-trigram Jaccard similarity is at least `threshold`,
    found with MinHash LSH (datasketch); the first pair in id order is kept.
    """
    from datasketch import MinHash, MinHashLSH

    frame = frame.sort_values("id", kind="stable").reset_index(drop=True)
    keys = [normalise_text(p) + " || " + normalise_text(r) for p, r in zip(frame["prompt"], frame["response"])]
    exact = frame.assign(_key=keys).duplicated("_key")
    unique = frame[~exact].reset_index(drop=True)
    unique_keys = [k for k, dup in zip(keys, exact) if not dup]

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    hashes = MinHash.bulk([_shingles(k) for k in unique_keys], num_perm=128, seed=seed)
    keep = []
    for index, minhash in enumerate(hashes):
        if lsh.query(minhash):
            keep.append(False)
            continue
        lsh.insert(str(index), minhash)
        keep.append(True)
    result = unique[keep].reset_index(drop=True)
    return result, {"exact_duplicates_removed": int(exact.sum()), "near_duplicates_removed": keep.count(False)}


def split(frame: pd.DataFrame, params: PrepareParams) -> dict[str, pd.DataFrame]:
    labels = [split_of(p, params.validation_fraction, params.test_fraction, params.seed) for p in frame["prompt"]]
    tagged = frame.assign(split=labels)
    splits = {name: tagged[tagged["split"] == name].drop(columns="split").reset_index(drop=True) for name in SPLITS}
    empty = [name for name, part in splits.items() if len(part) == 0]
    if empty:
        raise DataError(
            f"prepare: the {', '.join(empty)} split(s) would be empty with {len(frame)} pairs; "
            "add data or raise prepare.validation_fraction / prepare.test_fraction"
        )
    return splits


def format_split(frame: pd.DataFrame, params: PrepareParams, tokenizer: Any) -> pd.DataFrame:
    rendered = [render_pair(p, r, params.template, params.system_prompt, tokenizer)
                for p, r in zip(frame["prompt"], frame["response"])]
    out = frame.copy()
    out["prompt_text"] = [p for p, _ in rendered]
    out["completion_text"] = [c for _, c in rendered]
    if params.template == "chat":
        turns = [conversation(p, r, params.system_prompt) for p, r in zip(frame["prompt"], frame["response"])]
        out["prompt_messages"] = [p for p, _ in turns]
        out["completion_messages"] = [c for _, c in turns]
    for column, target in (("prompt_text", "n_prompt_tokens"), ("completion_text", "n_completion_tokens")):
        ids = tokenizer(list(out[column]), add_special_tokens=False)["input_ids"] if len(out) else []
        out[target] = [len(i) for i in ids]
    return out


def token_stats(frame: pd.DataFrame) -> dict[str, float]:
    total = frame["n_prompt_tokens"] + frame["n_completion_tokens"]
    stats = {f"tokens_p{q}": float(total.quantile(q / 100)) for q in (50, 90, 99)}
    stats["tokens_max"] = int(total.max())
    stats["completion_tokens_p50"] = float(frame["n_completion_tokens"].median())
    stats["tokens_total"] = int(total.sum())  # what the split holds (cost accounting, training budgets)
    return stats


def check_validation(result_path: Path, data_path: Path, params: PrepareParams | None = None) -> None:
    """Refuse to prepare data that did not pass validation, or whose result (validate's
    `paths.validation_file()`) is stale: other data, or, given `params`, other split settings
    than the conflicting-answers check assumed."""
    if not result_path.exists():
        raise DataError(f"{result_path} not found; run `llmops validate` before `llmops prepare`")
    result = json.loads(result_path.read_text())
    if not result.get("success"):
        raise ValidationFailed(
            f"prepare: validation of {data_path} failed ({result.get('blocking_failures')} blocking "
            f"expectation(s)); see {result_path.parent / 'data_docs' / 'index.html'}, fix the data and re-run validate"
        )
    if result.get("data_md5") != file_md5(data_path):
        raise DataError(f"{result_path} was computed for another version of {data_path}; re-run `llmops validate`")
    if params is not None and result.get("splits") != split_settings(params):
        raise DataError(
            f"{result_path} checked conflicting answers per split with split settings {result.get('splits')}, "
            f"not the current prepare params {split_settings(params)}; re-run `llmops validate`"
        )


def prepare(frame: pd.DataFrame, params: PrepareParams, tokenizer: Any) -> tuple[dict[str, pd.DataFrame], dict]:
    rows_in = len(frame)
    unique, dedup_stats = deduplicate(frame, params.near_duplicate_threshold, params.seed)
    splits = {name: format_split(part, params, tokenizer) for name, part in split(unique, params).items()}
    metrics: dict[str, Any] = {"rows_in": rows_in, **dedup_stats, "rows_out": len(unique)}
    for name, part in splits.items():
        metrics[name] = {"rows": len(part), **token_stats(part)}
    return splits, metrics
