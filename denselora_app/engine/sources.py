"""Reading training data: a local file (.jsonl, .json, .csv, .parquet, .txt), a Hugging Face dataset, or a bundled
sample, into rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub.errors import LocalEntryNotFoundError

from denselora_app.config import SAMPLE_DATA as SAMPLE_DATA_NAME
from denselora_app.config import SAMPLE_PAIRS as SAMPLE_PAIRS_NAME
from denselora_app.config import StudioError
from denselora_app.hub.connection import HubUnreachable, cached_copy_if_offline
from denselora_app.rules import DATA_FILE_TYPES, hub_id_problem, looks_like_path, on_disk

log = logging.getLogger(__name__)


STREAM_BATCH = 1000  # rows a CSV or Parquet file is read in at a time
# Formats that cannot be read a row at a time (a JSON array, plain text) are read whole up to this size.
MAX_WHOLE_FILE_BYTES = 512 * 2**20

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"
SAMPLE_DATA: Path = SAMPLES_DIR / "studio_facts.jsonl"
SAMPLE_PROBES: Path = SAMPLES_DIR / "studio_facts_probes.jsonl"
# Stage dpo's sample: short answers with and without an "Ahoy!" greeting (a preference SmolLM2 does not have), and
# held-out pairs of other prompts to score it on.
SAMPLE_PAIRS: Path = SAMPLES_DIR / "ahoy_pairs.jsonl"
SAMPLE_PAIRS_HELDOUT: Path = SAMPLES_DIR / "ahoy_pairs_heldout.jsonl"


def data_source(data: str) -> str:
    """What a run's ``data`` setting reads: the shipped samples' files for ``sample:studio_facts`` and
    ``sample:ahoy_pairs``, else itself."""
    return {SAMPLE_DATA_NAME: str(SAMPLE_DATA), SAMPLE_PAIRS_NAME: str(SAMPLE_PAIRS)}.get(data, data)


class DataError(StudioError, ValueError):
    """Bad or unusable input data. The message is for the user: it names the file (and line) and the fix."""


class RowError(DataError):
    """One row cannot be used; ``prepare_data`` drops it and counts it under ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class SourceRows:
    name: str  # what problem lines call the source: the file's name or the Hub dataset
    rows: list[dict]
    where: list[str]  # "line 7", "row 3", ... for each row
    problems: list[tuple[str, str]]  # (reason, line) for records that could not be read
    complete: bool = True  # False when reading stopped at a row limit


class Record(NamedTuple):
    """One record of a source: a row and where it is ("line 7"), or why it could not be read."""

    row: dict | None
    where: str
    problem: tuple[str, str] | None = None  # (reason, the problem line) when ``row`` is None


def load_rows(source: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """Read a file or Hub dataset into rows, plus ``(reason, problem line)`` for records that could not be read.

    Raises DataError when the source itself cannot be read (missing, empty, unparsable, offline Hub).
    """
    src = read_source(source)
    return src.rows, src.problems


def read_source(source: str, limit: int | None = None) -> SourceRows:
    """The rows of a file or Hub dataset; with ``limit``, at most that many records (rows and unreadable ones),
    read without parsing the rest where the format allows (JSON Lines, CSV, Parquet, Hub datasets by streaming)."""
    name, records = open_records(source)
    src = SourceRows(name, [], [], [])
    for record in records:
        if limit is not None and len(src.rows) + len(src.problems) >= limit:
            src.complete = False
            break
        if record.problem is not None:
            src.problems.append(record.problem)
        else:
            src.rows.append(record.row)
            src.where.append(record.where)
    if not src.rows and not src.problems:
        raise DataError(f"{src.name} is empty - it has no rows to train on")
    return src


def open_records(source: str) -> tuple[str, Iterator[Record]]:
    """The source's name (as problem lines call it) and its records, one at a time: JSON Lines, CSV, Parquet and
    Hub datasets are streamed, so memory stays bounded however large the file is. DataError at once when the source
    itself cannot be opened; while reading, when it cannot be parsed."""
    source = str(source).strip()
    if not source:
        raise DataError("no data given - choose a data file or name a Hub dataset")
    shown = source if len(source) <= 200 else source[:200] + "..."
    path = Path(source).expanduser() if on_disk(source) else None
    if path is not None and path.is_dir():
        raise DataError(f"{shown} is a folder - give a data file ({', '.join(DATA_FILE_TYPES)})")
    if path is not None:
        readers = {".jsonl": _jsonl_records, ".json": _json_records, ".csv": _csv_records,
                   ".parquet": _parquet_records, ".txt": _txt_records}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path.name}: unsupported file type '{path.suffix}' - use one of "
                            f"{', '.join(DATA_FILE_TYPES)}")
        return path.name, reader(path)
    if looks_like_path(source):
        raise DataError(f"file not found: {shown} - check the path, or upload the file")
    if problem := hub_id_problem(source.partition(":")[0]):
        raise DataError(f"{shown!r} is neither a data file here nor a Hugging Face Hub dataset name ({problem}) - "
                        "upload the file, or name a dataset as owner/name")
    return source, _hub_records(source)


def source_identity(source: str) -> tuple[str, int, int] | None:
    """A local file's absolute path, size and modification time (what a cache of its preparation is keyed by);
    None for a Hub dataset."""
    path = Path(str(source).strip()).expanduser()
    try:
        stat = path.stat()
    except (OSError, ValueError):
        return None
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns) if path.is_file() else None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name} is not UTF-8 text ({e.reason} at byte {e.start}) - save it as UTF-8") from e
    except OSError as e:
        raise DataError(f"cannot read {path.name}: {e.strerror or e}") from e


def _whole_file_text(path: Path) -> str:
    """A file read whole (formats that cannot be streamed), refused above MAX_WHOLE_FILE_BYTES."""
    size = path.stat().st_size
    if size > MAX_WHOLE_FILE_BYTES:
        raise DataError(f"{path.name} is {size / 2**20:,.0f} MB, too large to read whole (at most "
                        f"{MAX_WHOLE_FILE_BYTES // 2**20:,} MB for {path.suffix} files) - save it as JSON Lines "
                        "(.jsonl, one object per line) or Parquet, which are read a row at a time")
    return _read_text(path)


def _jsonl_records(path: Path) -> Iterator[Record]:
    try:
        with _opened(path) as fh:
            head = fh.read(4096)
        if head.lstrip().startswith("["):  # a JSON array saved under a .jsonl name
            text = _whole_file_text(path)
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = None  # not a whole-file array after all: read it line by line and report the bad lines
            if data is not None:
                yield from _json_value_records(path.name, data)
                return
        with _opened(path) as fh:
            yield from _json_line_records(path.name, fh)
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name} is not UTF-8 text ({e.reason}) - save it as UTF-8") from e


@contextmanager
def _opened(path: Path) -> Iterator[TextIO]:
    # -sig: tolerate the BOM some editors write; newline="\n": lines end at "\n" only, as JSON Lines says.
    try:
        with open(path, encoding="utf-8-sig", newline="\n") as fh:
            yield fh
    except OSError as e:
        raise DataError(f"cannot read {path.name}: {e.strerror or e}") from e


def _json_line_records(name: str, lines: Iterable[str]) -> Iterator[Record]:
    # "\n" only: str.splitlines would also split on U+2028, which JSON allows inside strings
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Record(None, where, ("bad JSON", f"{name} line {lineno}: not valid JSON ({e.msg}: column "
                                                   f"{e.colno}) - fix the line or remove it"))
            continue
        if not isinstance(obj, dict):
            yield Record(None, where, ("not an object", f"{name} line {lineno}: expected a JSON object {{...}}, "
                                                        f"found {type(obj).__name__} - write one object per line"))
            continue
        yield Record(obj, where)


def _json_records(path: Path) -> Iterator[Record]:
    text = _whole_file_text(path)
    if not text.strip():
        raise DataError(f"{path.name} is empty - it has no rows to train on")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several objects one after another: JSON Lines under a .json name
            yield from _json_line_records(path.name, text.split("\n"))
            return
        raise DataError(
            f"{path.name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}) - fix it, "
            "or save one object per line as .jsonl"
        ) from e
    yield from _json_value_records(path.name, data)


def _json_value_records(name: str, data: Any) -> Iterator[Record]:
    if isinstance(data, dict):
        data = next((data[key] for key in ("data", "train") if isinstance(data.get(key), list)), data)
    if not isinstance(data, list):
        raise DataError(
            f"{name}: expected a list of objects, or {{\"data\": [...]}} / {{\"train\": [...]}}, "
            f"found a {type(data).__name__} - put the examples in a list"
        )
    for n, item in enumerate(data, start=1):
        if isinstance(item, dict):
            yield Record(item, f"item {n}")
        else:
            yield Record(None, f"item {n}", ("not an object", f"{name} item {n}: expected an object {{...}}, found "
                                                              f"{type(item).__name__} - make every item an object"))


def _csv_records(path: Path) -> Iterator[Record]:
    def unreadable(e: Exception) -> DataError:
        if isinstance(e, pd.errors.EmptyDataError):
            return DataError(f"{path.name} is empty - it has no rows to train on")
        if isinstance(e, UnicodeDecodeError):
            return DataError(f"{path.name} is not UTF-8 text ({e.reason} at byte {e.start}) - save it as UTF-8")
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return DataError(f"{path.name} could not be read as CSV ({detail}) - check the quoting and that every row "
                         "has as many columns as the header")

    n = 0
    try:
        # every cell as a string, empty cells as "" (not NaN): the text is the data; in chunks, so a large file
        # streams and a check of its first rows reads only those
        with pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", chunksize=STREAM_BATCH) as it:
            for frame in it:
                frame.columns = [str(column).strip() for column in frame.columns]
                for row in frame.to_dict("records"):
                    n += 1
                    yield Record(row, f"row {n}")
    except (pd.errors.EmptyDataError, UnicodeDecodeError, pd.errors.ParserError, ValueError, OSError) as e:
        raise unreadable(e) from e


def _parquet_records(path: Path) -> Iterator[Record]:
    n = 0
    try:
        # pyarrow (pandas' parquet engine) directly: to_pylist keeps nested chat turns as plain lists and dicts
        for batch in pq.ParquetFile(path).iter_batches(batch_size=STREAM_BATCH):
            for row in batch.to_pylist():
                n += 1
                yield Record(row, f"row {n}")
    except (pa.ArrowException, ValueError, OSError) as e:
        raise DataError(f"{path.name} could not be read as Parquet ({e}) - re-export it, or use .jsonl or .csv") from e


def _txt_records(path: Path) -> Iterator[Record]:
    lines = [line.rstrip("\r") for line in _whole_file_text(path).split("\n")]
    content = [i for i, line in enumerate(lines) if line.strip()]
    paragraphs = any(not lines[i].strip() for i in range(content[0], content[-1])) if content else False
    start, block = None, []
    for i, line in enumerate(lines + [""]):
        if line.strip() and paragraphs:
            start = i if start is None else start
            block.append(line)
        elif line.strip():
            yield Record({"text": line}, f"line {i + 1}")
        elif block:
            yield Record({"text": "\n".join(block)}, f"line {start + 1}")
            start, block = None, []


def _hub_records(source: str) -> Iterator[Record]:
    name, _, split = source.partition(":")
    split = split or "train"
    # Offline, datasets itself would retry for ~20 s before giving up.
    try:
        location = cached_copy_if_offline(name, repo_type="dataset") or name
    except HubUnreachable as offline:
        raise DataError(
            f"cannot download Hub dataset '{name}': the network is unreachable ({offline.reason}) and the dataset "
            f"is not in the local Hugging Face cache - upload a data file instead ({', '.join(DATA_FILE_TYPES)}), or "
            "check the path if you meant a local file"
        ) from None
    try:  # streamed: a check reads the first rows without downloading the whole dataset
        dataset = datasets.load_dataset(location, split=split, streaming=True)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(
            f"Hub dataset '{name}' was not found - check the name (owner/dataset), or upload a file instead"
        ) from e
    except (ConnectionError, TimeoutError, LocalEntryNotFoundError) as e:
        raise DataError(
            f"cannot download Hub dataset '{name}': the network is unreachable - upload a data file instead "
            f"({', '.join(DATA_FILE_TYPES)}), or check the path if you meant a local file"
        ) from e
    except Exception as e:  # anything else load_dataset raises (a bad split, a bad config) comes from user input
        raise DataError(f"cannot load Hub dataset '{source}': {e} - check the name and split (name:split)") from e
    rows = iter(dataset)
    n = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # streaming fails lazily, on the first rows
            raise DataError(f"cannot read Hub dataset '{source}': {e} - check the name and split (name:split)") from e
        n += 1
        yield Record(row, f"row {n}")


def columns_of(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(map(str, row)))
    return list(seen)
