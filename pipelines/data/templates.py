"""Prompt templates: how an instruction pair becomes model text.

One function for training data (`prepare`), evaluation and serving, so the model always
sees prompts in the format it was trained on. `completion` is what the model must learn
to produce after `prompt`, end-of-turn or EOS token included.

Control tokens in content: a tokenizer turns the written-out text of its special and added
tokens (`<|im_start|>`, `<|endoftext|>`, ...) into the real control tokens wherever they stand,
so a user who writes `<|im_end|><|im_start|>system ...` in a message ends their turn and opens
a system turn of their own. vLLM renders a chat to text and tokenizes it that way too, with no
option to split special tokens inside messages. `guard_content` applies the serving policy
(`serve.special_tokens_in_content`: reject | escape | allow) to client text before it is
rendered; `render_prompt(..., content_policy=...)` does the same for one prompt, so evaluation
can render exactly what serving sends. Training renders with "allow" (the default): its data
is unchanged.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pipelines.errors import LLMOpsError

Template = Literal["chat", "alpaca", "plain"]
ContentPolicy = Literal["reject", "escape", "allow"]
# What `escape` puts after the first character of a written-out control token: the text reads
# the same, and the tokenizer no longer finds the token in it.
ZERO_WIDTH_SPACE = "\u200b"
_MARKUP = set("<>[]|")


class ControlTokenInContent(LLMOpsError):
    """Client text holds the written-out form of a control token, and the policy refuses it."""

    def __init__(self, token: str, where: str) -> None:
        super().__init__(f"{where} holds {token!r}, the written-out form of one of this model's control tokens, "
                         "which would act as one (end a turn, open a system turn); remove it "
                         "(serve.special_tokens_in_content: reject)")
        self.token = token

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def render_prompt(prompt: str, template: Template, system_prompt: str | None, tokenizer: Any, *,
                  content_policy: ContentPolicy = "allow") -> str:
    """The text the model is given, up to where its answer starts. `content_policy` applies
    to `prompt` (the user's text, not the configured system prompt): see `guard_content`."""
    prompt = guard_content(prompt, tokenizer, content_policy, "prompt")
    if template == "chat":
        _require_chat_template(tokenizer)
        return tokenizer.apply_chat_template(_messages(prompt, system_prompt), tokenize=False,
                                             add_generation_prompt=True)
    if template == "alpaca":
        return f"{system_prompt or ALPACA_PREAMBLE}\n\n### Instruction:\n{prompt}\n\n### Response:\n"
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{prefix}{prompt}\n"


def render_pair(prompt: str, response: str, template: Template, system_prompt: str | None,
                tokenizer: Any) -> tuple[str, str]:
    """(prompt text, completion text) for training; their concatenation is the full example."""
    prompt_text = render_prompt(prompt, template, system_prompt, tokenizer)
    if template == "chat":
        messages = _messages(prompt, system_prompt) + [{"role": "assistant", "content": response}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt_text):
            raise LLMOpsError(
                "the tokenizer's chat template renders the assistant turn in a way that does not extend "
                "the generation prompt, so prompt tokens cannot be masked; use prepare.template: alpaca or plain"
            )
        return prompt_text, full[len(prompt_text):]
    return prompt_text, response + (tokenizer.eos_token or "")


def conversation(prompt: str, response: str, system_prompt: str | None) -> tuple[list[dict], list[dict]]:
    """The chat template's input as messages: (system + user turns, the assistant turn).

    `prepare` stores them beside the rendered text for TRL, which applies the tokenizer's chat
    template to them itself; the train stage checks that this gives the tokens of the rendered
    text that evaluation and serving use."""
    return _messages(prompt, system_prompt), [{"role": "assistant", "content": response}]


def _messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def _require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise LLMOpsError(
            "prepare.template is 'chat' but the tokenizer of base_model.source has no chat template; "
            "set prepare.template to alpaca or plain"
        )


# --- control tokens in client text ----------------------------------------------------------


def control_tokens(tokenizer: Any) -> list[str]:
    """The strings this tokenizer turns into control tokens wherever they appear, longest first:
    its special tokens, and the added tokens that look like markup (`<think>`, `[INST]`; not
    added plain words or runs of spaces, which some tokenizers also add)."""
    found = {str(token) for token in getattr(tokenizer, "all_special_tokens", []) or []}
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        content = str(getattr(added, "content", added))
        if getattr(added, "special", False) or (not any(c.isspace() for c in content) and _MARKUP & set(content)):
            found.add(content)
    return sorted((token for token in found if token), key=lambda token: (-len(token), token))


def _pattern(tokenizer: Any) -> re.Pattern[str] | None:
    tokens = control_tokens(tokenizer)  # a few dozen at most; `re` caches the compiled pattern
    return re.compile("|".join(re.escape(token) for token in tokens)) if tokens else None


def find_control_token(text: str, tokenizer: Any) -> str | None:
    """The first written-out control token in `text`, or None."""
    pattern = _pattern(tokenizer)
    match = pattern.search(text) if pattern is not None and text else None
    return match.group(0) if match else None


def guard_content(text: str, tokenizer: Any, policy: ContentPolicy, where: str = "content") -> str:
    """Client `text` under the policy: `allow` returns it as it is; `reject` raises
    ControlTokenInContent when it holds a written-out control token; `escape` breaks each such
    token with a zero-width space after its first character, so it is read as plain text (and
    refuses the text if the tokenizer would still find a control token in it, e.g. one whose
    normaliser drops the zero-width space)."""
    if policy == "allow" or not text:
        return text
    token = find_control_token(text, tokenizer)
    if token is None:
        return text
    if policy == "reject":
        raise ControlTokenInContent(token, where)
    escaped = _pattern(tokenizer).sub(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], text)
    controls = set(getattr(tokenizer, "all_special_ids", []) or []) | {
        int(i) for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
        if str(getattr(added, "content", added)) in control_tokens(tokenizer)}
    if controls & set(tokenizer(escaped, add_special_tokens=False)["input_ids"]):
        raise ControlTokenInContent(token, where)
    return escaped
