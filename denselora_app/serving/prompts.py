"""The conversation to answer and the prompt it renders to, exactly as training rendered it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import (
    PreTrainedTokenizerBase,
)

from denselora_app import denselora  # noqa: F401  (registers DenseLoRA with PEFT, so its adapters load)
from denselora_app.engine.formats import plain_chat_segments, render_chat
from denselora_app.engine.sources import RowError
from denselora_app.serving.adapters import ChatError

log = logging.getLogger(__name__)


_ROLES = ("system", "user", "assistant")


def build_messages(message: str, history: Sequence[Mapping[str, Any]] | None = None,
                   system_prompt: str = "") -> list[dict[str, str]]:
    """The conversation to answer: the system prompt (if any), the history, then the new user message.

    History entries are ``{"role", "content"}`` dicts (Gradio's "messages" format: content may also be a list of
    ``{"type": "text", "text": ...}`` parts).
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for n, turn in enumerate(history or [], start=1):
        role = turn.get("role") if isinstance(turn, Mapping) else None
        if role not in _ROLES:
            raise ChatError(f"History message {n} has role {role!r}: use user, assistant or system.")
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


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """The text the model continues, and whether tokenizing it should add special tokens.

    Rendered as training renders it (engine/formats.py): the chat template with its generation prompt, or, for a
    tokenizer without one, the Alpaca prompt ending in '### Response:'.
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            return render_chat(tokenizer, messages, generation_prompt=True), False  # the template writes its tokens
        except RowError as err:
            raise ChatError(f"This model's chat template refused the conversation: {err}") from None
    # An empty answer turn makes engine/formats.py emit the '### Response:' header; dropping that empty answer (and
    # its eos) leaves exactly the prompt training used.
    segments = plain_chat_segments(messages + [{"role": "assistant", "content": ""}], tokenizer.eos_token or "")
    return "".join(text for text, _ in segments[:-1]), True
