"""Stage `prepare`: dedup, leak-free deterministic splits, templates, token stats."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config.params import BundledSource, PrepareParams
from pipelines.data.preparation import check_validation, deduplicate, prepare, split
from pipelines.data.sources import ingest
from pipelines.data.splits import normalise_text, split_of
from pipelines.data.templates import render_pair, render_prompt
from pipelines.errors import DataError, ValidationFailed

REPO = Path(__file__).resolve().parents[2]


def frame_of(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"r{i:04d}" for i in range(len(pairs))],
                         "prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]})


def test_normalise_text():
    assert normalise_text("  What DOES the noun \"Bank\"  mean?! ") == "what does the noun bank mean"


def test_exact_duplicates_after_normalisation_are_removed():
    frame = frame_of([("What is a cat?", "A small feline."), ("what is a CAT", "a small feline!"),
                      ("What is a dog?", "A canine.")])
    out, stats = deduplicate(frame, threshold=0.9, seed=1)
    assert list(out["id"]) == ["r0000", "r0002"]
    assert stats == {"exact_duplicates_removed": 1, "near_duplicates_removed": 0}


def test_near_duplicates_are_removed_and_distinct_pairs_kept():
    long = "a large natural stream of water flowing in a channel to the sea or a lake or another river"
    frame = frame_of([
        ("What does the noun river mean?", long),
        ("What does the noun river mean?", long + " too"),  # one word added: near-duplicate
        ("What does the noun bank mean?", "a financial institution that accepts deposits and lends money"),
    ])
    out, stats = deduplicate(frame, threshold=0.8, seed=1)
    assert list(out["id"]) == ["r0000", "r0002"]
    assert stats["near_duplicates_removed"] == 1


def test_synonyms_sharing_a_gloss_are_not_near_duplicates():
    gloss = "having power or capacity or tendency to absorb or soak up something"
    frame = frame_of([('What does the adjective "absorbent" mean?', gloss),
                      ('What does the adjective "absorptive" mean?', gloss)])
    out, _ = deduplicate(frame, threshold=0.9, seed=1)
    assert len(out) == 2


@settings(max_examples=50, deadline=None)
@given(prompts=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=60), seed=st.integers(0, 1000))
def test_a_prompt_never_lands_in_two_splits(prompts, seed):
    frame = frame_of([(p, f"answer {i}") for i, p in enumerate(prompts + prompts[:10])])  # repeated prompts
    labels = {}
    for prompt in frame["prompt"]:
        label = split_of(prompt, 0.2, 0.2, seed)
        assert labels.setdefault(normalise_text(prompt), label) == label


def test_split_is_deterministic_seeded_and_stable_when_data_grows():
    pairs, _ = ingest([BundledSource(kind="bundled", name="wordnet")], REPO / "data" / "sample")
    params = PrepareParams(validation_fraction=0.05, test_fraction=0.1, seed=42)
    first = split(pairs, params)
    again = split(pairs.sample(frac=1.0, random_state=3), params)
    for name in first:
        assert set(first[name]["id"]) == set(again[name]["id"])
    assert abs(len(first["test"]) / len(pairs) - 0.1) < 0.02
    assert abs(len(first["validation"]) / len(pairs) - 0.05) < 0.02
    other_seed = split(pairs, params.model_copy(update={"seed": 7}))
    assert set(other_seed["test"]["id"]) != set(first["test"]["id"])
    # adding new data does not move old pairs between splits
    grown = split(pairs.head(3000), params)
    for name in first:
        assert set(grown[name]["id"]) <= set(first[name]["id"])
    # no prompt in two splits
    seen = [set(part["prompt"].map(normalise_text)) for part in first.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_empty_split_is_a_clear_error():
    with pytest.raises(DataError, match="split\\(s\\) would be empty with 2 pairs"):
        split(frame_of([("a?", "b"), ("c?", "d")]), PrepareParams(validation_fraction=0.01, test_fraction=0.01))


def test_chat_template_completion_extends_prompt(tiny_tokenizer):
    prompt_text, completion = render_pair("What is x?", "X is y.", "chat", "Be brief.", tiny_tokenizer)
    assert prompt_text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is x?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert completion == "X is y.<|im_end|>\n"
    assert render_prompt("What is x?", "chat", "Be brief.", tiny_tokenizer) == prompt_text


def test_alpaca_and_plain_templates_end_with_eos(tiny_tokenizer):
    prompt_text, completion = render_pair("Q?", "A.", "alpaca", None, tiny_tokenizer)
    assert prompt_text.endswith("### Instruction:\nQ?\n\n### Response:\n") and completion == "A.<|im_end|>"
    prompt_text, completion = render_pair("Q?", "A.", "plain", "Sys", tiny_tokenizer)
    assert prompt_text == "Sys\n\nQ?\n" and completion == "A.<|im_end|>"


def test_chat_template_missing_is_a_clear_error(tiny_tokenizer):
    from pipelines.errors import LLMOpsError

    class NoTemplate:
        chat_template = None

    with pytest.raises(LLMOpsError, match="has no chat template; set prepare.template to alpaca or plain"):
        render_prompt("Q?", "chat", None, NoTemplate())


def test_prepare_end_to_end_on_the_sample(tiny_tokenizer):
    pairs, _ = ingest([BundledSource(kind="bundled", name="wordnet", max_rows=800)], REPO / "data" / "sample")
    splits, metrics = prepare(pairs, PrepareParams(validation_fraction=0.1, test_fraction=0.1), tiny_tokenizer)
    assert metrics["rows_in"] == 800
    assert sum(metrics[name]["rows"] for name in ("train", "validation", "test")) == metrics["rows_out"]
    train = splits["train"]
    assert {"prompt_text", "completion_text", "n_prompt_tokens", "n_completion_tokens"} <= set(train.columns)
    assert (train["n_completion_tokens"] > 0).all()
    assert metrics["train"]["tokens_p50"] <= metrics["train"]["tokens_p90"] <= metrics["train"]["tokens_max"]


def test_prepare_refuses_failed_or_stale_validation(tmp_path):
    import json

    data = tmp_path / "pairs.parquet"
    data.write_bytes(b"v1")
    with pytest.raises(DataError, match="run `llmops validate` before"):
        check_validation(tmp_path / "result.json", data)
    (tmp_path / "result.json").write_text(json.dumps({"success": False, "blocking_failures": 2}))
    with pytest.raises(ValidationFailed, match="failed \\(2 blocking"):
        check_validation(tmp_path / "result.json", data)
    from pipelines.data.splits import file_md5

    (tmp_path / "result.json").write_text(json.dumps({"success": True, "data_md5": file_md5(data)}))
    check_validation(tmp_path / "result.json", data)
    data.write_bytes(b"v2")
    with pytest.raises(DataError, match="another version"):
        check_validation(tmp_path / "result.json", data)
