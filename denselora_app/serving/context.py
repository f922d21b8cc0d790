"""Prompts fitted to the model's context, for the chat and the API alike: text that cannot fit is refused (or left
out) by its length in characters before any of it is tokenized, and a conversation too long for the context loses
its oldest turns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from denselora_app.engine.data import CHARS_PER_TOKEN
from denselora_app.serving.adapters import ChatError


class Fitted(NamedTuple):
    """A prompt that fits: its ids, the answer's token budget, and what was left out (None when nothing was)."""

    ids: list[int]
    budget: int
    notice: str | None


def most_characters(context: int) -> int:
    """The longest prompt text worth tokenizing for a context of ``context`` tokens: no tokenizer writes a token in
    more than CHARS_PER_TOKEN characters, so longer text cannot fit (a 5 MB message costs a comparison, instead of
    seconds and gigabytes)."""
    return context * CHARS_PER_TOKEN


def fit(messages: list[dict[str, str]], max_new_tokens: int, context: int,
        encode: Callable[[list[dict[str, str]]], list[int]]) -> Fitted:
    """The prompt's ids, the answer's token budget and a notice: a conversation longer than the model's context
    loses its oldest turns (the system prompt and the new message stay), and the answer gets at most what the
    context leaves; a new message (with the system prompt) that alone does not fit is refused, naming the limit."""
    reserve = min(max_new_tokens, context // 4)  # room kept for the answer when turns must go
    most = most_characters(context)
    system = messages[:1] if len(messages) > 1 and messages[0]["role"] == "system" else []
    kept = system + messages[-1:]  # what is never left out
    if (chars := sum(len(m["content"]) for m in kept)) > most:
        raise ChatError(f"The message is {chars:,} characters long, more than the model's context of {context} "
                        "tokens can hold (prompt and answer together): shorten it.")
    dropped = 0
    while True:
        ids = encode(messages) if sum(len(m["content"]) for m in messages) <= most else None
        if ids is not None and len(ids) <= context - reserve or len(messages) <= len(kept):
            break
        first = len(system)  # the oldest turn after the system prompt
        messages, dropped = messages[:first] + messages[first + 1:], dropped + 1
    ids = ids if ids is not None else encode(messages)
    if len(ids) >= context:
        raise ChatError(f"The message is {len(ids)} tokens long, but the model's context is {context} tokens "
                        "(prompt and answer together): shorten it.")
    notice = (f"The oldest {dropped} message{'s' if dropped > 1 else ''} of the conversation were left out: "
              f"it no longer fits the model's context of {context} tokens.") if dropped else None
    return Fitted(ids, min(max_new_tokens, context - len(ids)), notice)
