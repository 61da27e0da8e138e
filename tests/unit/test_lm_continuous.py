"""Continuous batching (`pipelines.lm.ContinuousBatch`) on the tiny model: every row, whenever it
joins or leaves, answers exactly what `generate` answers for its prompt alone."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipelines.lm import CausalLM, ContextTooLong, ContinuousBatch, Decoding, Sequence

# The untrained tiny model repeats one token under plain greedy decoding; a repetition penalty
# makes each answer depend on its whole context, so a wrong cache or mask changes the tokens.
GREEDY = Decoding(max_new_tokens=12, repetition_penalty=3.0)
PROMPTS = [
    'What does the noun "bank" mean?',
    "Define run.",
    'What does the adjective "quick" mean? Give the most frequent sense of the word, in one sentence '
    "that a reader of a dictionary would understand, with no examples.",
    "hi",
    'What does the verb "sleep" mean?',
    'What does the computing term "cache" mean?',
    "Say a word.",
]


def sharpen_attention(lm: CausalLM, factor: float = 8.0) -> CausalLM:
    """Scale the tiny model's queries and keys: at its random initialisation every query attends
    almost evenly to every key, so keys in the wrong cache columns would go unnoticed."""
    import torch

    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return lm


@pytest.fixture(scope="module")
def lm(tiny_base_model_dir) -> CausalLM:
    return sharpen_attention(CausalLM.load(tiny_base_model_dir, dtype="float32"))


def ids(lm: CausalLM, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def alone(lm: CausalLM, text: str, max_new_tokens: int, decoding: Decoding = GREEDY, seed: int | None = None):
    """What transformers' `generate` answers for this prompt on its own."""
    return lm.generate_ids([text], replace(decoding, max_new_tokens=max_new_tokens), seed=seed)[0]


def cache_is_tight(batch: ContinuousBatch) -> bool:
    """No leading cache column is padding in every row (the pending token is not cached yet;
    without a reused prefix, rows have no padding between their tokens)."""
    extent = max(len(row.prompt_ids) + len(row.tokens) - 1 for row in batch.rows)
    return bool(batch.mask[:, 0].any()) and (batch.prefix_tokens_reused > 0 or batch.columns == extent)


def chat(lm: CausalLM, question: str, system: str = "Answer with a short definition.") -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_rows_that_join_and_leave_mid_flight_answer_as_generate_alone(lm):
    batch = ContinuousBatch(lm, max_rows=4)
    medium, short = Sequence(ids(lm, PROMPTS[0]), 12, GREEDY), Sequence(ids(lm, PROMPTS[1]), 3, GREEDY)
    batch.add([medium, short])
    for _ in range(3):
        batch.step()
    assert short.finish_reason == "length" and len(short.tokens) == 3
    batch.step()
    assert short not in batch.rows and cache_is_tight(batch)  # evicted at the step after its last token

    # newcomers longer and shorter than the running cache: both sides get padded on the left
    long, tiny = Sequence(ids(lm, PROMPTS[2]), 4, GREEDY), Sequence(ids(lm, PROMPTS[3]), 12, GREEDY)
    assert len(long.prompt_ids) > batch.columns > len(tiny.prompt_ids)
    batch.add([long, tiny])
    assert len(batch.rows) == 3 and cache_is_tight(batch)
    stopped = Sequence(ids(lm, PROMPTS[4]), 12, GREEDY)  # finished by the caller (a stop sequence)
    batch.add([stopped])
    batch.step()
    stopped.finish("stop")
    widest = batch.columns
    while batch.rows:
        batch.step()
        assert not batch.rows or cache_is_tight(batch)
        if long.finished and long not in batch.rows:
            assert batch.columns < widest  # the long prompt's columns left with it
    assert long.finish_reason == "length" and stopped.finish_reason == "stop" and len(stopped.tokens) == 2

    for row, text in [(medium, PROMPTS[0]), (short, PROMPTS[1]), (long, PROMPTS[2]), (tiny, PROMPTS[3])]:
        assert row.tokens == alone(lm, text, row.max_new_tokens), text
    assert stopped.tokens == alone(lm, PROMPTS[4], 12)[:2]


def test_a_queue_of_prompts_through_few_rows_matches_generate_alone(lm):
    limits = [12, 2, 9, 12, 1, 7, 12]
    rows = lm.generate_continuous(PROMPTS, GREEDY, max_rows=3, max_new_tokens=limits)
    for text, limit, row in zip(PROMPTS, limits, rows):
        assert row == alone(lm, text, limit), text


def test_newcomers_that_share_the_system_prompt_prefill_only_the_rest(lm):
    texts = [chat(lm, q) for q in PROMPTS[:5]]
    other = chat(lm, PROMPTS[5], system="Reply in one word, with no punctuation at all.")
    batch = ContinuousBatch(lm, max_rows=4)
    first = Sequence(ids(lm, texts[0]), 10, GREEDY)
    batch.add([first])  # nothing remembered yet: a full prefill, remembered
    assert batch.prefix_tokens_reused == 0 and batch.prefix_ids == first.prompt_ids
    batch.step()
    joining = [Sequence(ids(lm, t), limit, GREEDY) for t, limit in ((texts[1], 4), (texts[2], 12))]
    batch.add(joining)  # both start with the template and system prompt: only the rest is prefilled
    assert batch.prefix_tokens_reused >= 2 * 8
    batch.step()
    stranger = Sequence(ids(lm, other), 6, GREEDY)  # another system prompt: full prefill, remembered instead
    reused = batch.prefix_tokens_reused
    batch.add([stranger])
    assert batch.prefix_tokens_reused == reused and batch.prefix_ids == stranger.prompt_ids
    late = []
    while batch.rows:
        batch.step()
        assert not batch.rows or cache_is_tight(batch)
        if batch.free and len(late) < 2:
            late.append(Sequence(ids(lm, texts[3 + len(late)]), 8, GREEDY))
            batch.add([late[-1]])
    assert batch.prefix_tokens_reused > reused  # the second late row reused the first one's prompt
    rows = [first, *joining, stranger, *late]
    for row, text in zip(rows, [texts[0], texts[1], texts[2], other, texts[3], texts[4]]):
        assert row.tokens == alone(lm, text, row.max_new_tokens), text
    without = ContinuousBatch(lm, max_rows=3, reuse_prefix=False)
    assert lm.generate_continuous(texts, GREEDY, max_rows=3, batch=without) == \
        lm.generate_continuous(texts, GREEDY, max_rows=3)
    assert without.prefix_tokens_reused == 0


def test_seeded_sampling_matches_generate_and_ignores_the_other_rows(lm):
    sampled = Decoding(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=5)
    rows = lm.generate_continuous(PROMPTS[:4], sampled, max_rows=2)
    for i, (text, row) in enumerate(zip(PROMPTS, rows)):
        assert row == alone(lm, text, 10, sampled, seed=sampled.seed + i), text
    assert lm.generate_continuous(PROMPTS[:4], sampled, max_rows=4) == rows


def test_greedy_and_sampled_rows_share_a_batch(lm):
    sampled = Decoding(max_new_tokens=8, do_sample=True, temperature=1.2, seed=11)
    batch = ContinuousBatch(lm, max_rows=3)
    greedy_row, sampled_row = Sequence(ids(lm, PROMPTS[0]), 8, GREEDY), Sequence(ids(lm, PROMPTS[1]), 8, sampled)
    batch.add([greedy_row, sampled_row])
    while batch.rows:
        batch.step()
    assert greedy_row.tokens == alone(lm, PROMPTS[0], 8)
    assert sampled_row.tokens == alone(lm, PROMPTS[1], 8, sampled, seed=11)


def test_a_prompt_past_the_context_is_refused_and_the_others_run(lm):
    context = lm.context_limit
    too_long = Sequence(ids(lm, "word " * context)[: context - 3], 8, GREEDY)
    ok = Sequence(ids(lm, PROMPTS[0]), 8, GREEDY)
    batch = ContinuousBatch(lm, max_rows=2)
    events = batch.add([too_long, ok])
    assert [row for row, _ in events] == [ok]
    assert isinstance(too_long.error, ContextTooLong) and too_long.finish_reason == "error"
    assert f"over the model's context of {context} tokens" in str(too_long.error)
    while batch.rows:
        batch.step()
    assert ok.tokens == alone(lm, PROMPTS[0], 8)

    with pytest.raises(ContextTooLong, match="shorten the prompt or ask for fewer tokens"):
        lm.generate_continuous(["word " * context, PROMPTS[1]], GREEDY)


def test_more_newcomers_than_free_rows_is_a_programming_error(lm):
    batch = ContinuousBatch(lm, max_rows=1)
    with pytest.raises(ValueError, match="2 newcomers for 1 free rows"):
        batch.add([Sequence(ids(lm, p), 4, GREEDY) for p in PROMPTS[:2]])
    assert batch.rows == []
