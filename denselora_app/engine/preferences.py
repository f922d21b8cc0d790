"""The data of stages dpo and kto: preference pairs and labelled completions, their layouts, rendered through the
one renderer (formats.py), checked before Start and handed to TRL's DPOTrainer as prompt / chosen / rejected text
or to its KTOTrainer as prompt / completion / label text.

Layouts (detected from the columns):

* ``prompt_chosen_rejected``: ``prompt`` (text, or turns) with ``chosen`` and ``rejected`` (text, one assistant
  turn, or a list holding it) - TRL's explicit-prompt preference format, plain or conversational;
* ``conversations_chosen_rejected``: ``conversations`` (ShareGPT turns or messages) with ``chosen`` and
  ``rejected`` (text or one ``{from, value}`` / ``{role, content}`` turn) - LLaMA-Factory's ShareGPT pairs;
* ``chosen_rejected``: ``chosen`` and ``rejected`` as whole conversations sharing their first turns, the prompt -
  TRL's implicit-prompt format;
* ``prompt_completion_label`` (kto only): ``prompt``, ``completion`` and ``label`` (true: desirable) - TRL's
  unpaired preference format. kto also takes pairs: the chosen answer desirable, the rejected one not.

A pair (or completion) is dropped, counted by reason with its file and line, when a side is empty, the two sides are
equal, or prompt and answer are longer than ``cutoff_len`` (a side cut short would compare unfairly: fewer tokens, a higher
summed log-probability).
"""

from __future__ import annotations

import logging
import random
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import datasets

from denselora_app.engine.data import MAX_PROBLEMS, DataReport, length_stats, validation_count
from denselora_app.engine.formats import PAIR_COLUMNS, parse_turns, row_segments, sft_layout
from denselora_app.engine.sources import DataError, RowError, SourceRows, columns_of, read_source

log = logging.getLogger(__name__)

CHECK_PAIRS = 2000  # pairs a pre-flight check or a preview reads and renders

# Columns that identify each layout, in tie-break order (the most specific first).
PAIR_LAYOUTS: dict[str, tuple[str, ...]] = {
    "prompt_chosen_rejected": ("prompt", *PAIR_COLUMNS),
    "conversations_chosen_rejected": ("conversations", *PAIR_COLUMNS),
    "chosen_rejected": PAIR_COLUMNS,
}
# kto's own layout (TRL's unpaired preference format): one answer per row, labelled desirable (true) or not.
UNPAIRED_LAYOUT: dict[str, tuple[str, ...]] = {"prompt_completion_label": ("prompt", "completion", "label")}
_UNPAIRED_HELP = "labelled completions are prompt + completion + label (true: desirable, false: undesirable)"
_PAIR_HELP = ("preference pairs are prompt + chosen + rejected (text or chat turns), conversations + chosen + "
              "rejected (ShareGPT), or chosen + rejected as whole conversations")


class Completion(NamedTuple):
    """One answer to a prompt for kto, rendered as for a pair, and whether it is desirable."""

    prompt: str
    completion: str
    label: bool


class Pair(NamedTuple):
    """One pair as the model reads it: the rendered prompt (up to where the answer starts) and each answer with
    its closing token."""

    prompt: str
    chosen: str
    rejected: str


@dataclass
class PreparedPairs:
    train: datasets.Dataset  # columns prompt, chosen, rejected (dpo) or prompt, completion, label (kto): rendered text
    eval: datasets.Dataset | None
    report: DataReport


def pair_layout(src: SourceRows, stage: str = "dpo") -> str:
    """The layout most rows fit for ``stage`` (kto also takes pairs, unpaired); DataError saying what the rows look
    like (and which stage they would serve) when none does."""
    layouts = {**PAIR_LAYOUTS, **(UNPAIRED_LAYOUT if stage == "kto" else {})}
    counts = {name: sum(all(c in row for c in needed) for row in src.rows) for name, needed in layouts.items()}
    best = max(counts, key=counts.get)
    if counts[best] or not src.rows:  # no readable row: the no-usable-rows error that follows says why
        return best
    unpaired = any(all(c in row for c in UNPAIRED_LAYOUT["prompt_completion_label"]) for row in src.rows)
    sft = sft_layout(src.rows)
    looks = ("labelled completions, which serve stage kto (set stage to kto)" if unpaired
             else f"{sft} rows, which serve stage sft (set stage to sft)" if sft else "no layout the studio knows")
    wanted = "preference pairs" if stage == "dpo" else "labelled completions or preference pairs"
    raise DataError(f"{src.name}: stage {stage} needs {wanted}, but the columns {columns_of(src.rows)} look like "
                    f"{looks} - {_PAIR_HELP}" + (f"; {_UNPAIRED_HELP}" if stage == "kto" else ""))


def _answer_text(value: Any, key: str) -> str:
    """One side of a pair as text: a string, a turn, or a list holding one assistant turn."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        turns = parse_turns(value, key, need_answer=False)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise RowError("bad turn", f"'{key}' must be one assistant turn, got {len(turns)} turn(s) - give the "
                                       "answer alone")
        value = turns[0]["content"]
    if value is None:
        raise RowError("missing field", f"no '{key}' field - add it or remove the pair")
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise RowError("bad field", f"'{key}' is a {type(value).__name__}, not text - make it a string")
    text = str(value)
    if not text.strip():
        raise RowError(f"empty {key}", f"the {key} answer is empty - write it or remove the pair")
    return text


def _prompt_turns(value: Any, key: str) -> list[dict]:
    if isinstance(value, (list, dict)) or (isinstance(value, str) and value.lstrip().startswith("[")):
        turns = parse_turns([value] if isinstance(value, dict) else value, key, need_answer=False)
    elif isinstance(value, str):
        turns = [{"role": "user", "content": value}]
    else:
        raise RowError("missing field" if value is None else "bad field",
                       f"'{key}' is missing or not text - give the prompt")
    if not any(t["role"] == "user" and t["content"].strip() for t in turns):
        raise RowError("empty prompt", f"'{key}' has no user text - write the prompt or remove the pair")
    if turns[-1]["role"] == "assistant":
        raise RowError("bad turn", f"'{key}' ends with an assistant turn - the prompt ends where the answer starts")
    return turns


def _implicit(row: dict) -> tuple[list[dict], str, str]:
    chosen = parse_turns(row.get("chosen"), "chosen")
    rejected = parse_turns(row.get("rejected"), "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise RowError("chosen equals rejected", "chosen and rejected are the same conversation - drop the pair")
    if shared == 0 or len(chosen) != shared + 1 or len(rejected) != shared + 1:
        raise RowError("bad turn", "chosen and rejected must share every turn but the last answer (the prompt) - "
                                   "or give the prompt in a 'prompt' column")
    return chosen[:shared], _answer_text(chosen[-1], "chosen"), _answer_text(rejected[-1], "rejected")


def pair_messages(row: dict, layout: str) -> tuple[list[dict], str, str]:
    """The row as (prompt turns, chosen answer, rejected answer); RowError with a reason when it is unusable."""
    if layout == "chosen_rejected":
        prompt, chosen, rejected = _implicit(row)
    else:
        key = "prompt" if layout == "prompt_chosen_rejected" else "conversations"
        prompt = _prompt_turns(row.get(key), key)
        chosen, rejected = _answer_text(row.get("chosen"), "chosen"), _answer_text(row.get("rejected"), "rejected")
    if chosen.strip() == rejected.strip():
        raise RowError("chosen equals rejected", "chosen and rejected are the same answer - nothing to prefer; "
                                                 "drop the pair or write a worse rejected answer")
    return prompt, chosen, rejected


def _rendered(tokenizer: Any, prompt: list[dict], answer: str) -> tuple[str, str]:
    """(prompt text, answer text with its closing token), as the one renderer lays out the conversation."""
    segments, add_special = row_segments(tokenizer, {"messages": [*prompt, {"role": "assistant", "content": answer}]},
                                         "messages")
    last = max(i for i, (_, trained) in enumerate(segments) if trained)
    before = "".join(text for text, _ in segments[:last])
    bos = tokenizer.bos_token or ""
    if add_special and bos and before.startswith(bos):  # the tokenizer adds it again when TRL tokenizes the text
        before = before[len(bos):]
    return before, segments[last][0]


def render_pair(tokenizer: Any, row: dict, layout: str) -> Pair:
    """The row as the text the model reads (the same template and closing token as sft and chat)."""
    prompt, chosen, rejected = pair_messages(row, layout)
    prompt_text, chosen_text = _rendered(tokenizer, prompt, chosen)
    rejected_prompt, rejected_text = _rendered(tokenizer, prompt, rejected)
    if rejected_prompt != prompt_text:
        raise RowError("template error", "the chat template renders the prompt differently before each answer - "
                                         "use a tokenizer whose template keeps earlier turns as they are")
    return Pair(prompt_text, chosen_text, rejected_text)


def _tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # a CSV cell
        return value.strip().lower() == "true"
    raise RowError("bad label", f"'label' is {value!r} - write true (a desirable answer) or false (an undesirable one)")


def render_completion(tokenizer: Any, row: dict) -> Completion:
    """A row of the ``prompt_completion_label`` layout as the text the model reads."""
    prompt = _prompt_turns(row.get("prompt"), "prompt")
    label = _label(row.get("label"))
    prompt_text, completion = _rendered(tokenizer, prompt, _answer_text(row.get("completion"), "completion"))
    return Completion(prompt_text, completion, label)


def _examples(tokenizer: Any, row: dict, layout: str, stage: str) -> list[Pair | Completion]:
    """What one row trains: a pair (dpo), or for kto its completions (a pair's chosen one desirable, its rejected
    one undesirable)."""
    if layout == "prompt_completion_label":
        return [render_completion(tokenizer, row)]
    pair = render_pair(tokenizer, row, layout)
    if stage == "dpo":
        return [pair]
    return [Completion(pair.prompt, pair.chosen, True), Completion(pair.prompt, pair.rejected, False)]


def _length(tokenizer: Any, example: Pair | Completion) -> int:
    """Tokens of the prompt and its (longer) answer."""
    if isinstance(example, Completion):
        return _tokens(tokenizer, example.prompt + example.completion)
    return max(_tokens(tokenizer, example.prompt + example.chosen),
               _tokens(tokenizer, example.prompt + example.rejected))


@dataclass
class _Checked:
    src: SourceRows
    layout: str
    examples: list[Pair | Completion]
    lengths: list[int]  # tokens of prompt + the longer answer, per example
    report: DataReport


def _check(source: str, tokenizer: Any, cutoff_len: int, limit: int | None, stage: str) -> _Checked:
    src = read_source(source, limit)
    layout = pair_layout(src, stage)
    dropped: dict[str, int] = {}
    problems: list[str] = []
    for reason, line in src.problems:
        dropped[reason] = dropped.get(reason, 0) + 1
        problems.append(line)
    examples, lengths = [], []
    for row, where in zip(src.rows, src.where):
        try:
            made = _examples(tokenizer, row, layout, stage)
            sizes = [_length(tokenizer, example) for example in made]
            if max(sizes) > cutoff_len:
                raise RowError("longer than cutoff_len", f"prompt and answer take {max(sizes)} tokens, more than "
                                                         f"cutoff_len {cutoff_len} - raise cutoff_len or shorten it")
        except RowError as e:
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
            problems.append(f"{src.name} {where}: {e}")
            continue
        examples += made
        lengths += sizes
    kind = "pairs" if stage == "dpo" else "completions"
    report = DataReport(
        source=src.name, format=layout, rows_read=len(src.rows) + len(src.problems), rows_used=len(examples),
        dropped=dropped, problems=problems[:MAX_PROBLEMS], token_lengths=length_stats(lengths), truncated=0,
        train_rows=len(examples), val_rows=0, cutoff_len=cutoff_len, sampled=not src.complete,
    )
    if not examples:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in dropped.items())
        raise DataError(f"{src.name}: no usable {kind} out of {report.rows_read} rows ({reasons}). First "
                        "problems:\n" + "\n".join(problems[:5]))
    if stage == "kto" and len({example.label for example in examples}) < 2:
        which = "desirable" if examples[0].label else "undesirable"
        raise DataError(f"{src.name}: every completion is {which}; kto learns from both - add completions labelled "
                        f"{'false' if examples[0].label else 'true'}")
    return _Checked(src, layout, examples, lengths, report)


def _dataset(examples: list[Pair | Completion]) -> datasets.Dataset:
    return datasets.Dataset.from_list([example._asdict() for example in examples])


def prepare_pairs(source: str, tokenizer: Any, *, cutoff_len: int = 512, val_size: float = 0, seed: int = 42,
                  limit: int | None = None, stage: str = "dpo") -> PreparedPairs:
    """Read, check, render and split a stage's data (the input is only read); DataError when none is usable.

    For kto the completions come shuffled with ``seed``: TRL's KTOTrainer reads them in order (its KL estimate
    pairs each completion with its batch neighbours' prompts), so desirable and undesirable ones must be mixed."""
    checked = _check(source, tokenizer, cutoff_len, limit, stage)
    examples = checked.examples
    if stage == "kto":
        random.Random(seed).shuffle(examples)
    count = validation_count(val_size, len(examples))
    held_out = set(random.Random(seed).sample(range(len(examples)), count))
    train = [p for i, p in enumerate(examples) if i not in held_out]
    val = [p for i, p in enumerate(examples) if i in held_out]
    report = checked.report
    report.train_rows, report.val_rows = len(train), len(val)
    log.info("data report\n%s", report.summary())
    return PreparedPairs(_dataset(train), _dataset(val) if val else None, report)


def check_pairs(source: str, tokenizer: Any, *, cutoff_len: int = 512, val_size: float = 0,
                limit: int = CHECK_PAIRS, stage: str = "dpo") -> DataReport:
    """What a launch checks before a dpo or kto run exists: the first ``limit`` rows and the validation split."""
    checked = _check(source, tokenizer, cutoff_len, limit, stage)
    validation_count(val_size, sys.maxsize if checked.report.sampled else len(checked.examples))
    return checked.report


def preview_pairs(source: str, tokenizer: Any, *, cutoff_len: int = 512, n: int = 3, limit: int = CHECK_PAIRS,
                  stage: str = "dpo") -> dict[str, Any]:
    """What the data looks like to the model, for the data preview: ``format`` (the layout), ``columns``, ``rows``
    (the first 5 raw rows), ``examples`` (the first ``n`` usable pairs or completions, rendered), ``lengths`` and
    ``report``."""
    checked = _check(source, tokenizer, cutoff_len, limit, stage)
    return {"format": checked.layout, "columns": columns_of(checked.src.rows), "rows": checked.src.rows[:5],
            "examples": checked.examples[:n], "lengths": checked.lengths, "report": checked.report}
