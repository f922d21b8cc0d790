"""The data pipeline: read a dataset, render every row as prompt + answer, tokenize with loss masks, and report.

Sources: a ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` or ``.txt`` file, or a Hugging Face Hub dataset name
(``owner/name`` or ``owner/name:split``, default split ``train``).

Row layouts (detected from the columns, or forced with ``fmt``):

* ``alpaca``: ``instruction``, optional ``input``, ``output``
* ``messages``: ``messages`` = ``[{"role": ..., "content": ...}, ...]``
* ``sharegpt``: ``conversations`` = ``[{"from": "human" | "gpt" | "system", "value": ...}, ...]``
* ``prompt_completion``: ``prompt``, ``completion``
* ``text``: ``text`` (the whole text is trained)

A ``.txt`` file is read as format ``text``: paragraphs separated by blank lines are one example each; a file with no
blank line between its lines has one example per line.

Instruction-like rows are rendered with the tokenizer's chat template when it has one, otherwise with the Alpaca
prompt the DenseLoRA paper used, followed by the eos token. By default only answer tokens are trained (prompt tokens
get the label -100); ``train_on_inputs=True`` trains every token, as the paper did.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import datasets
import jinja2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub.errors import LocalEntryNotFoundError

from .config import SAMPLE_DATA as SAMPLE_DATA_NAME
from .config import StudioError
from .rules import DATA_FILE_TYPES, DATA_FORMATS, HubUnreachable, cached_copy_if_offline, looks_like_path

log = logging.getLogger(__name__)

FORMATS = DATA_FORMATS
FILE_TYPES = DATA_FILE_TYPES

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
SAMPLE_DATA: Path = SAMPLES_DIR / "studio_facts.jsonl"
SAMPLE_PROBES: Path = SAMPLES_DIR / "studio_facts_probes.jsonl"

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips
MAX_PROBLEMS = 10
CHECK_ROWS = 2000  # rows a pre-flight check or a preview reads and tokenizes (~0.6 s with the default tokenizer)

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


def data_source(data: str) -> str:
    """What a run's ``data`` setting reads: the shipped sample's file for ``sample:studio_facts``, else itself."""
    return str(SAMPLE_DATA) if data == SAMPLE_DATA_NAME else data


class DataError(StudioError, ValueError):
    """Bad or unusable input data. The message is for the user: it names the file (and line) and the fix."""


class RowError(DataError):
    """One row cannot be used; ``prepare_data`` drops it and counts it under ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class DataReport:
    source: str
    format: str
    rows_read: int
    rows_used: int
    dropped: dict[str, int]  # reason -> count
    problems: list[str]  # the first few problems, one human-readable line each
    token_lengths: dict[str, float]  # min, mean, median, p95, max of used rows, after truncation
    truncated: int  # used rows cut at the cutoff
    train_rows: int
    val_rows: int
    cutoff_len: int = 0
    sampled: bool = False  # only the first rows were checked (a pre-flight or a preview); training checks them all
    # Per optimizer step, on average over random batches of the training rows (see padding_per_step); 0 when the
    # batch size was not given (a pre-flight check or a preview).
    batch_size: int = 0  # rows per forward pass
    grad_accum: int = 0  # forward passes per optimizer step
    tokens_per_step: float = 0.0  # real tokens: what a packed step processes
    padded_tokens_per_step: float = 0.0  # what a step processes when each batch is padded to its longest row
    padding_fraction: float = 0.0  # the share of a padded step's tokens that are padding: what packing removes

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        read = f"first {self.rows_read} rows checked" if self.sampled else f"{self.rows_read} rows read"
        head = f"{self.source} ({self.format}): {read}, {self.rows_used} used"
        if self.dropped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in self.dropped.items())
            head += f", {sum(self.dropped.values())} dropped ({reasons})"
        lines = [head]
        if self.token_lengths:
            t = self.token_lengths
            lines.append(
                f"tokens per row: min {t['min']:.0f}, mean {t['mean']:.1f}, median {t['median']:.0f}, "
                f"p95 {t['p95']:.0f}, max {t['max']:.0f}; {self.truncated} rows truncated at {self.cutoff_len} tokens"
            )
        lines.append(f"split: {self.train_rows} train, {self.val_rows} validation")
        if self.tokens_per_step:
            lines.append(
                f"per optimizer step ({self.batch_size} x {self.grad_accum} rows): {self.tokens_per_step:,.0f} real "
                f"tokens on average; padded batches process {self.padded_tokens_per_step:,.0f}, "
                f"{100 * self.padding_fraction:.0f}% of them padding, which packing removes"
            )
        if self.problems:
            lines.append("problems:")
            lines.extend(f"  {problem}" for problem in self.problems)
        return "\n".join(lines)


@dataclass
class PreparedData:
    train: datasets.Dataset  # columns input_ids, attention_mask, labels
    eval: datasets.Dataset | None
    report: DataReport


# ----------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class _Source:
    name: str  # what problem lines call the source: the file's name or the Hub dataset
    rows: list[dict]
    where: list[str]  # "line 7", "row 3", ... for each row
    problems: list[tuple[str, str]]  # (reason, line) for records that could not be read
    complete: bool = True  # False when reading stopped at a row limit


def load_rows(source: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """Read a file or Hub dataset into rows, plus ``(reason, problem line)`` for records that could not be read.

    Raises DataError when the source itself cannot be read (missing, empty, unparsable, offline Hub).
    """
    src = read_source(source)
    return src.rows, src.problems


def read_source(source: str, limit: int | None = None) -> _Source:
    """The rows of a file or Hub dataset; with ``limit``, at most that many records (rows and unreadable ones),
    read without parsing the rest where the format allows (JSON Lines, CSV, Parquet, Hub datasets by streaming)."""
    source = str(source).strip()
    if not source:
        raise DataError("no data given - choose a data file or name a Hub dataset")
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{source} is a folder - give a data file ({', '.join(FILE_TYPES)})")
    if path.is_file():
        src = _read_file(path, limit)
    elif looks_like_path(source):
        raise DataError(f"file not found: {source} - check the path, or upload the file")
    else:
        src = _read_hub(source, limit)
    if limit is not None and len(src.rows) + len(src.problems) > limit:  # a reader that read past the limit
        kept = max(limit - len(src.problems), 0)
        src.rows, src.where, src.problems, src.complete = src.rows[:kept], src.where[:kept], src.problems[:limit], False
    if not src.rows and not src.problems:
        raise DataError(f"{src.name} is empty - it has no rows to train on")
    return src


def _read_file(path: Path, limit: int | None) -> _Source:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
               ".txt": _read_txt}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path.name}: unsupported file type '{path.suffix}' - use one of {', '.join(FILE_TYPES)}")
    return reader(path, limit)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name} is not UTF-8 text ({e.reason} at byte {e.start}) - save it as UTF-8") from e
    except OSError as e:
        raise DataError(f"cannot read {path.name}: {e.strerror or e}") from e


def _read_jsonl(path: Path, limit: int | None) -> _Source:
    text = _read_text(path)
    if text.lstrip().startswith("["):  # a JSON array saved under a .jsonl name
        try:
            return _rows_from_json(path.name, json.loads(text))
        except json.JSONDecodeError:
            pass  # not a whole-file array after all: read it line by line and report the bad lines
    return _parse_json_lines(path.name, text, limit)


def _parse_json_lines(name: str, text: str, limit: int | None = None) -> _Source:
    src = _Source(name, [], [], [])
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON allows inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if limit is not None and len(src.rows) + len(src.problems) >= limit:
            src.complete = False
            break
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            src.problems.append(
                ("bad JSON",
                 f"{name} line {lineno}: not valid JSON ({e.msg}: column {e.colno}) - fix the line or remove it")
            )
            continue
        if not isinstance(obj, dict):
            src.problems.append(
                ("not an object", f"{name} line {lineno}: expected a JSON object {{...}}, found "
                                  f"{type(obj).__name__} - write one object per line")
            )
            continue
        src.rows.append(obj)
        src.where.append(f"line {lineno}")
    return src


def _read_json(path: Path, limit: int | None) -> _Source:
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path.name} is empty - it has no rows to train on")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several objects one after another: JSON Lines under a .json name
            return _parse_json_lines(path.name, text, limit)
        raise DataError(
            f"{path.name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}) - fix it, "
            "or save one object per line as .jsonl"
        ) from e
    return _rows_from_json(path.name, data)


def _rows_from_json(name: str, data: Any) -> _Source:
    if isinstance(data, dict):
        data = next((data[key] for key in ("data", "train") if isinstance(data.get(key), list)), data)
    if not isinstance(data, list):
        raise DataError(
            f"{name}: expected a list of objects, or {{\"data\": [...]}} / {{\"train\": [...]}}, "
            f"found a {type(data).__name__} - put the examples in a list"
        )
    src = _Source(name, [], [], [])
    for n, item in enumerate(data, start=1):
        if isinstance(item, dict):
            src.rows.append(item)
            src.where.append(f"item {n}")
        else:
            src.problems.append(
                ("not an object", f"{name} item {n}: expected an object {{...}}, found {type(item).__name__} - "
                                  "make every item an object")
            )
    return src


def _read_csv(path: Path, limit: int | None) -> _Source:
    try:
        # every cell as a string, empty cells as "" (not NaN): the text is the data
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            nrows=None if limit is None else limit + 1)
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path.name} is empty - it has no rows to train on") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name} is not UTF-8 text ({e.reason} at byte {e.start}) - save it as UTF-8") from e
    except (pd.errors.ParserError, ValueError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{path.name} could not be read as CSV ({detail}) - check the quoting and that every row has as many "
            "columns as the header"
        ) from e
    frame.columns = [str(column).strip() for column in frame.columns]
    rows = frame.to_dict("records")
    return _Source(path.name, rows, [f"row {n}" for n in range(1, len(rows) + 1)], [])


def _read_parquet(path: Path, limit: int | None) -> _Source:
    try:
        # pyarrow (pandas' parquet engine) directly: to_pylist keeps nested chat turns as plain lists and dicts
        if limit is None:
            rows = pq.read_table(path).to_pylist()
        else:
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=limit + 1), None)
            rows = batch.to_pylist() if batch is not None else []
    except (pa.ArrowException, ValueError, OSError) as e:
        raise DataError(f"{path.name} could not be read as Parquet ({e}) - re-export it, or use .jsonl or .csv") from e
    return _Source(path.name, rows, [f"row {n}" for n in range(1, len(rows) + 1)], [])


def _read_txt(path: Path, limit: int | None) -> _Source:
    lines = [line.rstrip("\r") for line in _read_text(path).split("\n")]
    src = _Source(path.name, [], [], [])
    content = [i for i, line in enumerate(lines) if line.strip()]
    paragraphs = any(not lines[i].strip() for i in range(content[0], content[-1])) if content else False
    start, block = None, []
    for i, line in enumerate(lines + [""]):
        if line.strip() and paragraphs:
            start = i if start is None else start
            block.append(line)
        elif line.strip():
            src.rows.append({"text": line})
            src.where.append(f"line {i + 1}")
        elif block:
            src.rows.append({"text": "\n".join(block)})
            src.where.append(f"line {start + 1}")
            start, block = None, []
    return src


def _read_hub(source: str, limit: int | None) -> _Source:
    name, _, split = source.partition(":")
    split = split or "train"
    # Offline, datasets itself would retry for ~20 s before giving up.
    try:
        location = cached_copy_if_offline(name, repo_type="dataset") or name
    except HubUnreachable as offline:
        raise DataError(
            f"cannot download Hub dataset '{name}': the network is unreachable ({offline.reason}) and the dataset "
            f"is not in the local Hugging Face cache - upload a data file instead ({', '.join(FILE_TYPES)}), or "
            "check the path if you meant a local file"
        ) from None
    try:
        if limit is None:
            dataset = datasets.load_dataset(location, split=split)
        else:  # streamed: a pre-flight reads the first rows without downloading the whole dataset
            dataset = datasets.load_dataset(location, split=split, streaming=True).take(limit + 1)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(
            f"Hub dataset '{name}' was not found - check the name (owner/dataset), or upload a file instead"
        ) from e
    except (ConnectionError, TimeoutError, LocalEntryNotFoundError) as e:
        raise DataError(
            f"cannot download Hub dataset '{name}': the network is unreachable - upload a data file instead "
            f"({', '.join(FILE_TYPES)}), or check the path if you meant a local file"
        ) from e
    except Exception as e:  # anything else load_dataset raises (a bad split, a bad config) comes from user input
        raise DataError(f"cannot load Hub dataset '{source}': {e} - check the name and split (name:split)") from e
    try:
        rows = dataset.to_list() if limit is None else list(dataset)
    except Exception as e:  # streaming fails lazily, on the first rows
        raise DataError(f"cannot read Hub dataset '{source}': {e} - check the name and split (name:split)") from e
    return _Source(source, rows, [f"row {n}" for n in range(1, len(rows) + 1)], [])


# ----------------------------------------------------------------------------------------------------------------
# Layout detection


def _columns(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(map(str, row)))
    return list(seen)


def detect_format(rows: list[dict], *, source: str = "the data") -> str:
    """The layout that fits the most rows (ties go to the more specific layout); DataError if none fits."""
    counts = {fmt: sum(all(c in row for c in needed) for row in rows) for fmt, needed in _REQUIRED_COLUMNS.items()}
    best = max(counts, key=counts.get)  # max keeps the first of equal counts: the tie-break order above
    if counts[best] == 0:
        raise DataError(
            f"{source}: cannot tell the layout from the columns {_columns(rows)} - {_LAYOUTS_HELP}. "
            "Rename the columns, or choose the format explicitly"
        )
    return best


def _resolve_format(src: _Source, fmt: str) -> str:
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}' - use auto or one of {', '.join(FORMATS)}")
    if not src.rows:
        return fmt  # nothing was readable: the no-usable-rows error that follows says why
    if fmt == "auto":
        return detect_format(src.rows, source=src.name)
    needed = _REQUIRED_COLUMNS[fmt]
    if not any(all(c in row for c in needed) for row in src.rows):
        raise DataError(
            f"{src.name}: format '{fmt}' needs the columns {list(needed)}, but the data has {_columns(src.rows)} - "
            f"rename the columns or pick another format ({_LAYOUTS_HELP})"
        )
    return fmt


# ----------------------------------------------------------------------------------------------------------------
# Rendering: a row becomes segments of text, each either prompt (not trained) or answer (trained)

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


def _parse_turns(turns: Any, key: str) -> list[dict]:
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
    if not any(m["role"] == "assistant" for m in messages):
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


def _segments(tokenizer, row: dict, fmt: str) -> tuple[Segments, bool]:
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


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing


def _tokenize_segments(tokenizer, segments: Segments, add_special_tokens: bool) -> tuple[list[int], list[bool]]:
    """Token ids of the whole text and, per token, whether it belongs to a trained segment.

    Each segment boundary is found by tokenizing the text up to it: when those tokens are a prefix of the whole
    text's tokens, the boundary is exact. When a token merges across the boundary they are not; then the boundary
    is where the two token lists stop agreeing, which gives the straddling token to the later segment. When the
    text after a boundary is the shorter side, its tokens are tried first at the end of the whole text's tokens.
    """
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    full_text = "".join(text for text, _ in segments)
    ids = encode(full_text)

    def boundary(chars: int) -> int:
        rest = full_text[chars:]
        if len(rest) < chars:  # cheaper to tokenize what follows and find it at the end (the usual answer end)
            suffix = encode(rest)
            if suffix and ids[len(ids) - len(suffix):] == suffix:
                return len(ids) - len(suffix)
        prefix = encode(full_text[:chars])
        return len(prefix) if ids[: len(prefix)] == prefix else common_prefix_len(prefix, ids)

    trained = [False] * len(ids)
    start = chars = 0
    for index, (text, is_answer) in enumerate(segments):
        chars += len(text)
        end = len(ids) if index == len(segments) - 1 else max(boundary(chars), start)
        if is_answer:
            trained[start:end] = [True] * (end - start)
        start = end
    return ids, trained


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer, row: dict, fmt: str, cutoff_len: int, train_on_inputs: bool) -> tuple[dict, int]:
    segments, add_special_tokens = _segments(tokenizer, row, fmt)
    ids, trained = _tokenize_segments(tokenizer, segments, add_special_tokens)
    full_len = len(ids)
    if any(trained) and not any(trained[:cutoff_len]):
        raise RowError(
            "answer truncated away",
            f"the answer starts after the cutoff of {cutoff_len} tokens (the row is {full_len} tokens) - "
            "raise cutoff_len or shorten the prompt",
        )
    ids, trained = ids[:cutoff_len], trained[:cutoff_len]
    labels = list(ids) if train_on_inputs else [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, full_len


def encode_example(tokenizer, row: dict, fmt: str, *, cutoff_len: int, train_on_inputs: bool) -> dict:
    """``{"input_ids", "attention_mask", "labels"}`` for one row, truncated to ``cutoff_len`` tokens.

    Labels are -100 on prompt tokens and the token ids on answer tokens (every token with ``train_on_inputs``).
    Raises RowError (with a ``reason``) for a row that cannot be used.
    """
    example, _ = _encode(tokenizer, row, fmt, cutoff_len, train_on_inputs)
    return example


# ----------------------------------------------------------------------------------------------------------------
# The whole pipeline


@dataclass
class _Processed:
    src: _Source
    format: str
    examples: list[dict]
    report: DataReport


def _length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    values = np.asarray(lengths, dtype=float)
    return {"min": float(values.min()), "mean": round(float(values.mean()), 2), "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95)), "max": float(values.max())}


def padding_per_step(lengths: Sequence[int], batch_size: int, grad_accum: int = 1) -> dict[str, float]:
    """Tokens one optimizer step processes on average: packed (real tokens only) and padded.

    A padded batch pads each of its ``batch_size`` rows to the batch's longest row, and a step is ``grad_accum``
    batches. Rows come in shuffled order, so a batch is a uniformly random subset of the rows; the figure is the
    exact expectation over such subsets (deterministic, no sampling): with the lengths sorted, the i-th shortest
    of n rows is the longest of a k-row batch with probability C(i-1, k-1) / C(n, k). The last, partial batch of an
    epoch is treated like the others. A dataset with fewer rows than ``batch_size`` is one batch of all of them.

    Returns ``real_tokens_per_step``, ``padded_tokens_per_step`` and ``padding_fraction`` (the share of a padded
    step's tokens that are padding, which packing removes); all 0 for no rows.
    """
    if batch_size < 1 or grad_accum < 1:
        raise ValueError(f"batch_size and grad_accum must be at least 1, got {batch_size} and {grad_accum}")
    values = np.sort(np.asarray(lengths, dtype=float))
    n = len(values)
    if n == 0:
        return {"real_tokens_per_step": 0.0, "padded_tokens_per_step": 0.0, "padding_fraction": 0.0}
    k = min(batch_size, n)
    # log C(i-1, k-1) for i = k..n, from C(k-1, k-1) = 1 and C(i, k-1) / C(i-1, k-1) = i / (i-k+1); normalised
    # below, since these counts sum to C(n, k).
    i = np.arange(k, n, dtype=float)
    log_counts = np.concatenate([[0.0], np.cumsum(np.log(i) - np.log(i - k + 1))])
    weights = np.exp(log_counts - log_counts.max())
    expected_longest = float(np.dot(weights, values[k - 1:]) / weights.sum())
    real = grad_accum * k * float(values.mean())
    padded = grad_accum * k * expected_longest
    return {"real_tokens_per_step": real, "padded_tokens_per_step": padded,
            "padding_fraction": 1 - real / padded if padded else 0.0}


def _process(source: str, tokenizer, fmt: str, cutoff_len: int, train_on_inputs: bool,
             limit: int | None = None) -> _Processed:
    if cutoff_len < 1:
        raise DataError(f"cutoff_len must be at least 1 token, got {cutoff_len}")
    src = read_source(source, limit)
    fmt = _resolve_format(src, fmt)
    if not tokenizer.eos_token:
        log.warning("the tokenizer has no eos token: answers get no end marker, so the model may not learn to stop")
    dropped: dict[str, int] = {}
    problems: list[str] = []
    for reason, line in src.problems:
        dropped[reason] = dropped.get(reason, 0) + 1
        problems.append(line)
    examples, truncated = [], 0
    for row, where in zip(src.rows, src.where):
        try:
            example, full_len = _encode(tokenizer, row, fmt, cutoff_len, train_on_inputs)
        except RowError as e:
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
            problems.append(f"{src.name} {where}: {e}")
            continue
        examples.append(example)
        truncated += full_len > cutoff_len
    report = DataReport(
        source=src.name, format=fmt, rows_read=len(src.rows) + len(src.problems), rows_used=len(examples),
        dropped=dropped, problems=problems[:MAX_PROBLEMS],
        token_lengths=_length_stats([len(e["input_ids"]) for e in examples]), truncated=truncated,
        train_rows=len(examples), val_rows=0, cutoff_len=cutoff_len, sampled=not src.complete,
    )
    if not examples:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in dropped.items())
        checked = f"the first {report.rows_read} checked" if report.sampled else str(report.rows_read)
        raise DataError(
            f"{src.name}: no usable rows out of {checked} ({reasons}). First problems:\n"
            + "\n".join(problems[:5])
        )
    return _Processed(src, fmt, examples, report)


def _validation_count(val_size: float, usable: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0:
        raise DataError(f"val_size must be 0, a number of rows, or a fraction between 0 and 1; got {val_size!r}")
    if val_size == 0:
        return 0
    if val_size < 1:
        count = max(1, round(val_size * usable))
    elif float(val_size).is_integer():
        count = int(val_size)
    else:
        raise DataError(f"val_size {val_size} is neither a whole number of rows nor a fraction below 1")
    if count >= usable:
        raise DataError(
            f"val_size {val_size} asks for {count} validation rows but only {usable} rows are usable - at least one "
            "must stay for training: use a smaller val_size, or 0 for no validation"
        )
    return count


def prepare_data(
    source: str,
    tokenizer,
    *,
    fmt: str = "auto",
    cutoff_len: int = 512,
    train_on_inputs: bool = False,
    val_size: float = 0,
    seed: int = 42,
    batch_size: int | None = None,
    grad_accum: int = 1,
    limit: int | None = None,
) -> PreparedData:
    """Read, render, tokenize and split a dataset (its first ``limit`` rows, when given); the input is only read,
    never written.

    ``val_size``: 0 for no validation set, an int >= 1 for that many rows, a float in (0, 1) for a fraction of the
    usable rows; the rows are drawn with ``seed``. Raises DataError when nothing is usable or the split is impossible.
    With ``batch_size`` (rows per forward pass) the report also gives the tokens an optimizer step of ``batch_size``
    x ``grad_accum`` training rows processes, padded and packed (``padding_per_step``).
    """
    processed = _process(source, tokenizer, fmt, cutoff_len, train_on_inputs, limit)
    examples, report = processed.examples, processed.report
    count = _validation_count(val_size, len(examples))
    val_indices = set(random.Random(seed).sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in val_indices]
    val = [e for i, e in enumerate(examples) if i in val_indices]
    report.train_rows, report.val_rows = len(train), len(val)
    if batch_size:
        step = padding_per_step([len(e["input_ids"]) for e in train], batch_size, grad_accum)
        report.batch_size, report.grad_accum = batch_size, grad_accum
        report.tokens_per_step = round(step["real_tokens_per_step"], 1)
        report.padded_tokens_per_step = round(step["padded_tokens_per_step"], 1)
        report.padding_fraction = round(step["padding_fraction"], 4)
    log.info("data report\n%s", report.summary())
    return PreparedData(
        train=datasets.Dataset.from_list(train),
        eval=datasets.Dataset.from_list(val) if val else None,
        report=report,
    )


def check_data(
    source: str,
    tokenizer,
    *,
    fmt: str = "auto",
    cutoff_len: int = 512,
    train_on_inputs: bool = False,
    val_size: float = 0,
    limit: int = CHECK_ROWS,
) -> DataReport:
    """What a launch checks before a run exists: the first ``limit`` rows read, rendered and tokenized (seconds,
    even for a million-row dataset), and the validation split. Raises DataError naming the problem; training reads
    and checks every row."""
    processed = _process(source, tokenizer, fmt, cutoff_len, train_on_inputs, limit)
    # Of a sampled source only the form of val_size can be checked: the rows not read may make the split possible.
    _validation_count(val_size, sys.maxsize if processed.report.sampled else len(processed.examples))
    return processed.report


def _pieces(tokenizer, example: dict) -> list[tuple[str, bool]]:
    """The example's text in runs of trained / untrained tokens, for showing what the loss sees."""
    ids, labels = example["input_ids"], example["labels"]
    pieces: list[tuple[str, bool]] = []
    shown = ""
    start = 0
    for end in range(1, len(ids) + 1):
        if end < len(ids) and (labels[end] != IGNORE_INDEX) == (labels[start] != IGNORE_INDEX):
            continue
        # decode growing prefixes, not runs alone: a run decoded alone can lose its leading space
        text = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = text[len(shown):] if text.startswith(shown) else tokenizer.decode(ids[start:end])
        pieces.append((piece, labels[start] != IGNORE_INDEX))
        shown, start = text, end
    return pieces


def render_preview(
    source: str,
    tokenizer,
    *,
    fmt: str = "auto",
    cutoff_len: int = 512,
    train_on_inputs: bool = False,
    n: int = 3,
    limit: int | None = CHECK_ROWS,
) -> dict:
    """What the data looks like to the model, for the UI.

    Returns ``format``, ``columns``, ``rows`` (the first 5 raw rows), ``examples`` (the first ``n`` usable rows as
    ``[(text, trained), ...]``), ``lengths`` (tokens per usable row) and ``report`` (a DataReport, no split), of
    the first ``limit`` rows. Raises DataError like ``prepare_data`` when the source is unreadable or has no usable
    rows.
    """
    processed = _process(source, tokenizer, fmt, cutoff_len, train_on_inputs, limit)
    return {
        "format": processed.format,
        "columns": _columns(processed.src.rows),
        "rows": processed.src.rows[:5],
        "examples": [_pieces(tokenizer, e) for e in processed.examples[:n]],
        "lengths": [len(e["input_ids"]) for e in processed.examples],
        "report": processed.report,
    }
