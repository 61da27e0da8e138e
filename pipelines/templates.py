"""Prompt templates: how an instruction pair becomes model text.

One function for training data (`prepare`), evaluation and serving, so the model always
sees prompts in the format it was trained on. `completion` is what the model must learn
to produce after `prompt`, end-of-turn or EOS token included.
"""

from __future__ import annotations

from typing import Any, Literal

from pipelines.errors import LLMOpsError

Template = Literal["chat", "alpaca", "plain"]

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def render_prompt(prompt: str, template: Template, system_prompt: str | None, tokenizer: Any) -> str:
    """The text the model is given, up to where its answer starts."""
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


def _messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def _require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise LLMOpsError(
            "prepare.template is 'chat' but the tokenizer of base_model.source has no chat template; "
            "set prepare.template to alpaca or plain"
        )
