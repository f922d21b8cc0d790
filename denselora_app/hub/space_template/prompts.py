"""The prompt the demo Space's model continues: rendered exactly as DenseLoRA Studio renders it for generation.

The Space does not install the studio, so this is a copy of ``denselora_app.serving.prompts.build_messages`` and
``render_prompt`` (which render as training did, in ``denselora_app.engine.formats``): a model with a chat template
gets its template with the generation prompt; one without gets the DenseLoRA paper's Alpaca prompt, where a system
prompt replaces the header. tests/test_space_prompts.py checks that both copies give the same token ids, so change
them together. Only the tokenizer is needed here (no torch, no gradio), so the check can import this file alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jinja2

ROLES = ("system", "user", "assistant")

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


class PromptError(ValueError):
    """A conversation that cannot be rendered; the message says why."""


def build_messages(message: str, history: Sequence[Mapping[str, Any]] | None = None,
                   system_prompt: str = "") -> list[dict[str, str]]:
    """The conversation to answer: the system prompt (if any), the history, then the new user message.

    History entries are Gradio's ``{"role", "content"}`` dicts; content may be a string or a list of
    ``{"type": "text", "text": ...}`` parts.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for n, turn in enumerate(history or [], start=1):
        role = turn.get("role") if isinstance(turn, Mapping) else None
        if role not in ROLES:
            raise PromptError(f"History message {n} has role {role!r}: use user, assistant or system.")
        messages.append({"role": role, "content": _text_of(turn.get("content"))})
    messages.append({"role": "user", "content": message})
    return messages


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        content = [content]
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return "" if content is None else str(content)


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """The text the model continues, and whether tokenizing it should add special tokens (a template writes its
    own)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as error:
            raise PromptError(f"This model's chat template refused the conversation: {error}") from None
    # The Alpaca prompt, as training rendered a chat: system messages (joined) replace the header, every past
    # answer ends with the eos token it was trained with, and the prompt ends where the answer begins.
    eos = tokenizer.eos_token or ""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    parts = [(system or ALPACA_HEADER) + "\n\n"]
    after_answer = False
    for m in messages:
        if m["role"] == "user":
            parts.append(("\n\n" if after_answer else "") + f"### Instruction:\n{m['content']}\n\n")
            after_answer = False
        elif m["role"] == "assistant":
            parts.append(f"### Response:\n{m['content']}{eos}")
            after_answer = True
    parts.append("### Response:\n")
    return "".join(parts), True


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids generation starts from."""
    text, add_special_tokens = render_prompt(tokenizer, messages)
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
