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
from typing import Any, TextIO

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub.errors import LocalEntryNotFoundError

from denselora_app.config import SAMPLE_DATA as SAMPLE_DATA_NAME
from denselora_app.config import StudioError
from denselora_app.hub.connection import HubUnreachable, cached_copy_if_offline
from denselora_app.rules import DATA_FILE_TYPES, looks_like_path

log = logging.getLogger(__name__)


SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"
SAMPLE_DATA: Path = SAMPLES_DIR / "studio_facts.jsonl"
SAMPLE_PROBES: Path = SAMPLES_DIR / "studio_facts_probes.jsonl"


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
class SourceRows:
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


def read_source(source: str, limit: int | None = None) -> SourceRows:
    """The rows of a file or Hub dataset; with ``limit``, at most that many records (rows and unreadable ones),
    read without parsing the rest where the format allows (JSON Lines, CSV, Parquet, Hub datasets by streaming)."""
    source = str(source).strip()
    if not source:
        raise DataError("no data given - choose a data file or name a Hub dataset")
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{source} is a folder - give a data file ({', '.join(DATA_FILE_TYPES)})")
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


def _read_file(path: Path, limit: int | None) -> SourceRows:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
               ".txt": _read_txt}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path.name}: unsupported file type '{path.suffix}' - use one of {', '.join(DATA_FILE_TYPES)}")
    return reader(path, limit)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name} is not UTF-8 text ({e.reason} at byte {e.start}) - save it as UTF-8") from e
    except OSError as e:
        raise DataError(f"cannot read {path.name}: {e.strerror or e}") from e


def _read_jsonl(path: Path, limit: int | None) -> SourceRows:
    try:
        with _opened(path) as fh:
            head = fh.read(4096)
        if head.lstrip().startswith("["):  # a JSON array saved under a .jsonl name
            text = _read_text(path)
            try:
                return _rows_from_json(path.name, json.loads(text))
            except json.JSONDecodeError:
                pass  # not a whole-file array after all: read it line by line and report the bad lines
        with _opened(path) as fh:  # streamed: a check of the first rows reads only those
            return _parse_json_lines(path.name, fh, limit)
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


def _parse_json_lines(name: str, lines: Iterable[str], limit: int | None = None) -> SourceRows:
    src = SourceRows(name, [], [], [])
    # "\n" only: str.splitlines would also split on U+2028, which JSON allows inside strings
    for lineno, line in enumerate(lines, start=1):
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


def _read_json(path: Path, limit: int | None) -> SourceRows:
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path.name} is empty - it has no rows to train on")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several objects one after another: JSON Lines under a .json name
            return _parse_json_lines(path.name, text.split("\n"), limit)
        raise DataError(
            f"{path.name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}) - fix it, "
            "or save one object per line as .jsonl"
        ) from e
    return _rows_from_json(path.name, data)


def _rows_from_json(name: str, data: Any) -> SourceRows:
    if isinstance(data, dict):
        data = next((data[key] for key in ("data", "train") if isinstance(data.get(key), list)), data)
    if not isinstance(data, list):
        raise DataError(
            f"{name}: expected a list of objects, or {{\"data\": [...]}} / {{\"train\": [...]}}, "
            f"found a {type(data).__name__} - put the examples in a list"
        )
    src = SourceRows(name, [], [], [])
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


def _read_csv(path: Path, limit: int | None) -> SourceRows:
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
    return SourceRows(path.name, rows, [f"row {n}" for n in range(1, len(rows) + 1)], [])


def _read_parquet(path: Path, limit: int | None) -> SourceRows:
    try:
        # pyarrow (pandas' parquet engine) directly: to_pylist keeps nested chat turns as plain lists and dicts
        if limit is None:
            rows = pq.read_table(path).to_pylist()
        else:
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=limit + 1), None)
            rows = batch.to_pylist() if batch is not None else []
    except (pa.ArrowException, ValueError, OSError) as e:
        raise DataError(f"{path.name} could not be read as Parquet ({e}) - re-export it, or use .jsonl or .csv") from e
    return SourceRows(path.name, rows, [f"row {n}" for n in range(1, len(rows) + 1)], [])


def _read_txt(path: Path, limit: int | None) -> SourceRows:
    lines = [line.rstrip("\r") for line in _read_text(path).split("\n")]
    src = SourceRows(path.name, [], [], [])
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


def _read_hub(source: str, limit: int | None) -> SourceRows:
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
            f"({', '.join(DATA_FILE_TYPES)}), or check the path if you meant a local file"
        ) from e
    except Exception as e:  # anything else load_dataset raises (a bad split, a bad config) comes from user input
        raise DataError(f"cannot load Hub dataset '{source}': {e} - check the name and split (name:split)") from e
    try:
        rows = dataset.to_list() if limit is None else list(dataset)
    except Exception as e:  # streaming fails lazily, on the first rows
        raise DataError(f"cannot read Hub dataset '{source}': {e} - check the name and split (name:split)") from e
    return SourceRows(source, rows, [f"row {n}" for n in range(1, len(rows) + 1)], [])


def columns_of(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(map(str, row)))
    return list(seen)
