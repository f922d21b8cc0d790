"""The data pipeline: rows -> tokenized examples with labels, the data report, the pre-flight check and the preview.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter

from denselora_app.engine import data_cache
from denselora_app.engine.data_cache import EXAMPLE_COLUMNS, EXAMPLE_FEATURES
from denselora_app.engine.formats import Segments, resolve_format, row_segments
from denselora_app.engine.sources import DataError, Record, RowError, SourceRows, columns_of, open_records, read_source

log = logging.getLogger(__name__)


IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips
MAX_PROBLEMS = 10
CHARS_PER_TOKEN = 64  # more than any tokenizer's longest token spells
CHECK_ROWS = 2000  # rows a pre-flight check or a preview reads and tokenizes (~0.6 s with the default tokenizer)
STOP_CHECK_ROWS = 256  # rows tokenized between two looks at a stop request (well under a second)
PROGRESS_ROWS = 100_000  # a log line (the app's log pane) every so many rows of a long preparation


class PreparationStopped(Exception):
    """A stop was asked for while the data was being prepared: nothing was trained."""


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


def _cut(segments: Segments, max_chars: int) -> Segments:
    """The segments' first ``max_chars`` characters (the later segments dropped, the last one kept shortened)."""
    kept, room = [], max_chars
    for text, is_answer in segments:
        if room <= 0:
            break
        kept.append((text[:room], is_answer))
        room -= len(text)
    return kept


def _encode(tokenizer, row: dict, fmt: str, cutoff_len: int, train_on_inputs: bool) -> tuple[dict, int]:
    segments, add_special_tokens = row_segments(tokenizer, row, fmt)
    # A row is cut to CHARS_PER_TOKEN characters a token before it is tokenized: never shorter than the cutoff
    # keeps, and a huge row (a 200 MB line) costs what a long one does instead of its size many times over.
    cut = _cut(segments, cutoff_len * CHARS_PER_TOKEN)
    ids, trained = _tokenize_segments(tokenizer, cut, add_special_tokens)
    full_len = len(ids)
    longer = "at least " if sum(map(len, (t for t, _ in cut))) < sum(map(len, (t for t, _ in segments))) else ""
    answer_cut_off = bool(longer) and not any(trained) and any(is_answer and text for text, is_answer in segments)
    if (any(trained) or answer_cut_off) and not any(trained[:cutoff_len]):
        raise RowError(
            "answer truncated away",
            f"the answer starts after the cutoff of {cutoff_len} tokens (the row is {longer}{full_len} tokens) - "
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


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """min, mean, median, p95 and max of token counts, as a data report shows them."""
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


def validation_count(val_size: float, usable: int) -> int:
    """How many of ``usable`` rows val_size asks for; DataError when the split is impossible."""
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


@dataclass
class _Tally:
    """What a pass over the records counted, for the data report."""

    rows_read: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS
    lengths: array = field(default_factory=lambda: array("l"))  # tokens of each used row, after the cutoff

    def drop(self, reason: str, line: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(line)

    def report(self, name: str, fmt: str, cutoff_len: int, sampled: bool) -> DataReport:
        if not self.lengths:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in self.dropped.items())
            checked = f"the first {self.rows_read} checked" if sampled else str(self.rows_read)
            raise DataError(f"{name}: no usable rows out of {checked} ({reasons}). First problems:\n"
                            + "\n".join(self.problems[:5]))
        return DataReport(source=name, format=fmt, rows_read=self.rows_read, rows_used=len(self.lengths),
                          dropped=self.dropped, problems=self.problems, token_lengths=length_stats(self.lengths),
                          truncated=self.truncated, train_rows=len(self.lengths), val_rows=0, cutoff_len=cutoff_len,
                          sampled=sampled)


def _encoded(name: str, records: Iterable[Record], tokenizer, fmt: str, cutoff_len: int, train_on_inputs: bool,
             tally: _Tally, should_stop: Callable[[], bool] | None) -> Iterator[dict]:
    """The usable records as examples, in order; the others counted in ``tally`` with their reason."""
    for index, record in enumerate(records):
        if should_stop is not None and index % STOP_CHECK_ROWS == 0 and should_stop():
            raise PreparationStopped
        tally.rows_read += 1
        if record.problem is not None:
            tally.drop(*record.problem)
            continue
        try:
            example, full_len = _encode(tokenizer, record.row, fmt, cutoff_len, train_on_inputs)
        except RowError as e:
            tally.drop(e.reason, f"{name} {record.where}: {e}")
            continue
        tally.truncated += full_len > cutoff_len
        tally.lengths.append(len(example["input_ids"]))
        yield example


def _checked_start(cutoff_len: int, tokenizer) -> None:
    if cutoff_len < 1:
        raise DataError(f"cutoff_len must be at least 1 token, got {cutoff_len}")
    if not tokenizer.eos_token:
        log.warning("the tokenizer has no eos token: answers get no end marker, so the model may not learn to stop")


@dataclass
class _Processed:
    src: SourceRows
    format: str
    examples: list[dict]
    report: DataReport


def _process(source: str, tokenizer, fmt: str, cutoff_len: int, train_on_inputs: bool,
             limit: int | None = None) -> _Processed:
    """The first ``limit`` rows (all without one) read, rendered and tokenized in memory: a check, a preview."""
    _checked_start(cutoff_len, tokenizer)
    src = read_source(source, limit)
    fmt = resolve_format(src, fmt)
    records = [Record(None, "", problem) for problem in src.problems] + [
        Record(row, where) for row, where in zip(src.rows, src.where)]
    tally = _Tally()
    examples = list(_encoded(src.name, records, tokenizer, fmt, cutoff_len, train_on_inputs, tally, None))
    return _Processed(src, fmt, examples, tally.report(src.name, fmt, cutoff_len, sampled=not src.complete))


def _streamed(source: str, tokenizer, fmt: str, cutoff_len: int, train_on_inputs: bool,
              should_stop: Callable[[], bool] | None) -> tuple[datasets.Dataset, DataReport]:
    """Every row, read, rendered and tokenized one at a time into an Arrow file on disk (memory stays flat however
    large the source) that the run then reads memory-mapped. A local file's preparation is kept in the cache
    (data_cache): the next run on the same file, tokenizer and settings reads it instead of tokenizing again."""
    _checked_start(cutoff_len, tokenizer)
    head = read_source(source, CHECK_ROWS)  # the format is detected from the first rows, as a check does
    fmt = resolve_format(head, fmt)
    if should_stop is not None and should_stop():
        raise PreparationStopped
    key = data_cache.key(source, tokenizer, fmt, cutoff_len, train_on_inputs)
    if key is not None and (cached := data_cache.load(key)) is not None:
        dataset, saved = cached
        report = DataReport(**saved)
        log.info("%s: prepared before with the same tokenizer and settings; read from the cache", report.source)
        return dataset, report
    name, records = open_records(source)
    tally, started = _Tally(), time.monotonic()
    with data_cache.writing(key) as (path, keep):
        writer = ArrowWriter(features=EXAMPLE_FEATURES, path=str(path))
        try:
            for example in _encoded(name, records, tokenizer, fmt, cutoff_len, train_on_inputs, tally, should_stop):
                writer.write({**example, "length": len(example["input_ids"])})
                if tally.rows_read % PROGRESS_ROWS == 0:
                    rate = tally.rows_read / max(time.monotonic() - started, 1e-9)
                    log.info("%s: %s rows prepared (%s rows/s)", name, f"{tally.rows_read:,}", f"{rate:,.0f}")
            writer.finalize()
        finally:
            writer.close()
        report = tally.report(name, fmt, cutoff_len, sampled=False)
        keep(report.to_dict())
    return datasets.Dataset.from_file(str(path if key is None else data_cache.examples_file(key))), report


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
    should_stop: Callable[[], bool] | None = None,
) -> PreparedData:
    """Read, render, tokenize and split a dataset (its first ``limit`` rows, when given); the input is only read,
    never written.

    ``val_size``: 0 for no validation set, an int >= 1 for that many rows, a float in (0, 1) for a fraction of the
    usable rows; the rows are drawn with ``seed``. Raises DataError when nothing is usable or the split is impossible.
    With ``batch_size`` (rows per forward pass) the report also gives the tokens an optimizer step of ``batch_size``
    x ``grad_accum`` training rows processes, padded and packed (``padding_per_step``). ``should_stop`` is asked
    every few hundred rows; when it says yes, PreparationStopped is raised (Stop works before training too).
    Without ``limit`` the rows are streamed to disk (``_streamed``); with it they are few and kept in memory.
    """
    if limit is None:
        dataset, report = _streamed(source, tokenizer, fmt, cutoff_len, train_on_inputs, should_stop)
        lengths = dataset.data.column("length").to_numpy()
    else:
        processed = _process(source, tokenizer, fmt, cutoff_len, train_on_inputs, limit)
        report = processed.report
        dataset = datasets.Dataset.from_list(processed.examples)
        lengths = np.asarray([len(e["input_ids"]) for e in processed.examples])
    dataset = dataset.select_columns(list(EXAMPLE_COLUMNS))
    count = validation_count(val_size, len(dataset))
    val_indices = np.sort(np.asarray(random.Random(seed).sample(range(len(dataset)), count), dtype=np.int64))
    train_indices = np.setdiff1d(np.arange(len(dataset)), val_indices, assume_unique=True)
    train = dataset.select(train_indices) if count else dataset
    report.train_rows, report.val_rows = len(train_indices), count
    if batch_size:
        step = padding_per_step(lengths[train_indices], batch_size, grad_accum)
        report.batch_size, report.grad_accum = batch_size, grad_accum
        report.tokens_per_step = round(step["real_tokens_per_step"], 1)
        report.padded_tokens_per_step = round(step["padded_tokens_per_step"], 1)
        report.padding_fraction = round(step["padding_fraction"], 4)
    log.info("data report\n%s", report.summary())
    return PreparedData(train=train, eval=dataset.select(val_indices) if count else None, report=report)


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
    validation_count(val_size, sys.maxsize if processed.report.sampled else len(processed.examples))
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
        "columns": columns_of(processed.src.rows),
        "rows": processed.src.rows[:5],
        "examples": [_pieces(tokenizer, e) for e in processed.examples[:n]],
        "lengths": [len(e["input_ids"]) for e in processed.examples],
        "report": processed.report,
    }
