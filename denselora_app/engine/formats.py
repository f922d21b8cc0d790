"""Row layouts (alpaca, messages, sharegpt, prompt_completion, text) and how a row renders into the text a model
trains on: the one renderer, also used by chat and evaluation.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jinja2

from denselora_app.engine.sources import DataError, RowError, SourceRows, columns_of
from denselora_app.rules import DATA_FORMATS

log = logging.getLogger(__name__)




# Columns that identify each layout. Listed in tie-break order: when two layouts fit equally many rows, the
# earlier wins (a chat column is the most specific signal, a bare "text" the least).
_REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


_LAYOUTS_HELP = (
    "accepted layouts: alpaca (instruction, input, output), messages ([{role, content}, ...]), "
    "sharegpt (conversations: [{from, value}, ...]), prompt_completion (prompt, completion), text (text)"
)


_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
          "system": "system"}


_ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


_ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


PAIR_COLUMNS = ("chosen", "rejected")  # what makes a row a preference pair (stage dpo)
LABEL_COLUMN = "label"  # with prompt and completion: an answer labelled desirable or not (stage kto)


def parse_turns(turns: Any, key: str, *, need_answer: bool = True) -> list[dict]:
    """A conversation (messages or ShareGPT turns, or JSON text of them) as ``[{role, content}, ...]``; RowError
    naming what is wrong. ``need_answer=False`` accepts a prompt without an assistant turn."""
    return _parse_turns(turns, key, need_answer=need_answer)


def sft_layout(rows: list[dict]) -> str | None:
    """The sft layout most rows fit (ties go to the more specific layout), or None when none fits."""
    counts = {fmt: sum(all(c in row for c in needed) for row in rows) for fmt, needed in _REQUIRED_COLUMNS.items()}
    best = max(counts, key=counts.get)  # max keeps the first of equal counts: the tie-break order above
    return best if counts[best] else None


def detect_format(rows: list[dict], *, source: str = "the data") -> str:
    """The layout that fits the most rows (ties go to the more specific layout); DataError if none fits."""
    best = sft_layout(rows)
    if 2 * sum(all(c in row for c in PAIR_COLUMNS) for row in rows) > len(rows):  # ShareGPT pairs have conversations
        raise DataError(f"{source}: the rows are preference pairs (columns {columns_of(rows)}): they serve "
                        f"stage dpo, not sft - set stage to dpo, or give sft data ({_LAYOUTS_HELP})")
    if best == "prompt_completion" and 2 * sum(LABEL_COLUMN in row for row in rows) > len(rows):
        # sft would imitate the undesirable answers too
        raise DataError(f"{source}: the rows are completions labelled desirable or not (columns {columns_of(rows)}): "
                        f"they serve stage kto, not sft - set stage to kto, or drop the label column to imitate "
                        "every completion")
    if best is None:
        raise DataError(
            f"{source}: cannot tell the layout from the columns {columns_of(rows)} - {_LAYOUTS_HELP}. "
            "Rename the columns, or choose the format explicitly"
        )
    return best


def resolve_format(src: SourceRows, fmt: str) -> str:
    if fmt != "auto" and fmt not in DATA_FORMATS:
        raise DataError(f"unknown format '{fmt}' - use auto or one of {', '.join(DATA_FORMATS)}")
    if not src.rows:
        return fmt  # nothing was readable: the no-usable-rows error that follows says why
    if fmt == "auto":
        return detect_format(src.rows, source=src.name)
    needed = _REQUIRED_COLUMNS[fmt]
    if not any(all(c in row for c in needed) for row in src.rows):
        raise DataError(
            f"{src.name}: format '{fmt}' needs the columns {list(needed)}, but the data has {columns_of(src.rows)} - "
            f"rename the columns or pick another format ({_LAYOUTS_HELP})"
        )
    return fmt


Segments = list[tuple[str, bool]]


def _text_field(row: dict, key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise RowError("missing field", f"no '{key}' field - add it or remove the row")
        return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise RowError("bad field", f"'{key}' is a {type(value).__name__}, not text - make it a string")


def _answer(row: dict, key: str) -> str:
    value = _text_field(row, key)
    if not value.strip():
        raise RowError("empty answer", f"the answer ('{key}') is empty - write the answer or remove the row")
    return value


def _turn_content(content: Any, n: int) -> str:
    if isinstance(content, list):  # content given as parts: [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if isinstance(content, str):
        return content
    raise RowError("bad turn", f"turn {n} has no text content - give every turn a string 'content'")


def _parse_turns(turns: Any, key: str, *, need_answer: bool = True) -> list[dict]:
    if isinstance(turns, str) and turns.lstrip().startswith("["):  # a chat stored as JSON text in a CSV cell
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise RowError("bad JSON", f"'{key}' is not valid JSON ({e.msg}: column {e.colno}) - fix it") from e
    if turns is None:
        raise RowError("missing field", f"no '{key}' field - add it or remove the row")
    if not isinstance(turns, list) or not turns:
        raise RowError("missing field", f"'{key}' is not a non-empty list of turns - give it the conversation")
    messages = []
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowError("bad turn", f"turn {n} of '{key}' is not an object - write {{role: ..., content: ...}}")
        raw_role = turn.get("role", turn.get("from"))
        role = _ROLES.get(str(raw_role).lower())
        if role is None:
            raise RowError("bad turn", f"turn {n} has role {raw_role!r} - use user, assistant or system "
                                       "(ShareGPT: human, gpt, system)")
        content = turn.get("content", turn.get("value"))
        if content is None:
            raise RowError("missing field", f"turn {n} has no content - add its 'content' (ShareGPT: 'value')")
        messages.append({"role": role, "content": _turn_content(content, n)})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise RowError("no assistant turn",
                       "the conversation has no assistant turn - add the answer as an assistant turn")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise RowError("empty answer", "an assistant turn is empty - write the answer or remove the turn")
    return messages


def _to_messages(row: dict, fmt: str) -> list[dict]:
    if fmt == "messages":
        return _parse_turns(row.get("messages"), "messages")
    if fmt == "sharegpt":
        return _parse_turns(row.get("conversations"), "conversations")
    if fmt == "alpaca":
        instruction, extra, output = _alpaca_fields(row)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    # prompt_completion: plain strings, or chat turns in each column (TRL's conversational prompt-completion)
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        if not isinstance(completion, list):
            completion = [{"role": "assistant", "content": _answer(row, "completion")}]
        prompt_turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": _text_field(row, "prompt")}]
        return _parse_turns(prompt_turns + completion, "prompt + completion")
    return [{"role": "user", "content": _text_field(row, "prompt")},
            {"role": "assistant", "content": _answer(row, "completion")}]


def _eos(tokenizer) -> str:
    return tokenizer.eos_token or ""


def _alpaca_fields(row: dict) -> tuple[str, str, str]:
    instruction, extra = _text_field(row, "instruction"), _text_field(row, "input", required=False)
    if not instruction.strip():
        raise RowError("missing field", "'instruction' is empty - write the instruction or remove the row")
    return instruction, extra, _answer(row, "output")


def _alpaca_segments(row: dict, eos: str) -> Segments:
    instruction, extra, output = _alpaca_fields(row)
    if extra.strip():
        prompt = (f"{_ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n"
                  "### Response:\n")
    else:
        prompt = f"{_ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    return [(prompt, False), (output + eos, True)]


def plain_chat_segments(messages: list[dict], eos: str) -> Segments:
    """A chat in the Alpaca prompt, for tokenizers without a chat template; one user + assistant turn renders
    exactly as an Alpaca row without input, and a system message replaces the Alpaca header."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    segments: Segments = [((system or _ALPACA_HEADER) + "\n\n", False)]
    after_answer = False
    for m in messages:
        if m["role"] == "user":
            segments.append((("\n\n" if after_answer else "") + f"### Instruction:\n{m['content']}\n\n", False))
            after_answer = False
        elif m["role"] == "assistant":
            segments.append(("### Response:\n", False))
            segments.append((m["content"] + eos, True))
            after_answer = True
    return segments


def render_chat(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
        raise RowError("template error", f"the chat template refused this conversation ({e}) - check the turn order "
                                          "and roles this model accepts") from e


def _template_segments(tokenizer, messages: list[dict]) -> Segments:
    """Split the template's rendering into prompt and answer text.

    Each answer runs from the end of the rendered prefix with a generation prompt to the end of the rendered prefix
    that includes the answer turn. A template that rewrites earlier turns or adds text only at the end is not
    prefix-stable; then the answer's own text is looked up in the rendering instead.
    """
    full = render_chat(tokenizer, messages)
    eos = _eos(tokenizer)
    segments: Segments = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render_chat(tokenizer, messages[:i], generation_prompt=True) if i else None
        end = render_chat(tokenizer, messages[: i + 1])
        if start is not None and cursor <= len(start) < len(end) and full.startswith(start) and full.startswith(end):
            a, b = len(start), len(end)
        else:
            content = message["content"].strip()  # templates often trim the content
            a = full.find(content, cursor)
            if a < 0:
                raise RowError("template error", f"the chat template does not show assistant turn {i + 1} - "
                                                  "use a tokenizer whose template keeps every answer")
            b = a + len(content)
            if eos and full.startswith(eos, b):  # keep the turn's closing token with the answer
                b += len(eos)
        # The closing token ends the answer: what the template adds after it ("\n") is layout, not answer.
        cut = full.rfind(eos, a, b) if eos else -1
        answer_end = cut + len(eos) if cut >= 0 else b
        segments += [(full[cursor:a], False), (full[a:answer_end], True), (full[answer_end:b], False)]
        cursor = b
    segments.append((full[cursor:], False))
    return [(text, trained) for text, trained in segments if text]


def row_segments(tokenizer, row: dict, fmt: str) -> tuple[Segments, bool]:
    """The row's segments, and whether the tokenizer should add its special tokens (templates write their own)."""
    eos = _eos(tokenizer)
    if fmt == "text":
        text = _text_field(row, "text")
        if not text.strip():
            raise RowError("empty text", "the 'text' is empty - write the text or remove the row")
        return [(text + eos, True)], True
    messages = _to_messages(row, fmt)
    if getattr(tokenizer, "chat_template", None):
        return _template_segments(tokenizer, messages), False
    if fmt == "alpaca":
        return _alpaca_segments(row, eos), True
    return plain_chat_segments(messages, eos), True
