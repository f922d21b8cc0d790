"""Prepared data on disk: a run's tokenized rows as an Arrow file, read memory-mapped, and kept between runs.

A local data file's preparation is kept under the studio's cache (``rules.cache_dir()/prepared/<key>/``), keyed by
what decides its rows: the file (path, size, modification time), the tokenizer (its vocabulary and chat template),
the format, the cutoff and ``train_on_inputs``. The next run on the same file with the same settings reads it
instead of tokenizing again; the validation split, the seed and the batch size are applied afterwards, so they
can change freely. A folder appears only once complete (written under a temporary name, then renamed), so a
preparation that was stopped or killed is never reused. The most recently used few are kept.

A Hub dataset has no such identity (its rows may change upstream): its preparation is written for this process only
and removed by a later prune once the process has ended.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets

from denselora_app.engine.sources import source_identity
from denselora_app.rules import cache_dir

log = logging.getLogger(__name__)

EXAMPLE_COLUMNS = ("input_ids", "attention_mask", "labels")  # what the collators and the model take
EXAMPLE_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "attention_mask": datasets.List(datasets.Value("int8")),
    "labels": datasets.List(datasets.Value("int32")),
    "length": datasets.Value("int32"),  # tokens of the row: the data report's lengths, read without the rows
})
VERSION = 1  # raised whenever what a prepared row holds changes: older preparations are then not reused
KEPT = 4  # complete preparations kept, most recently used first
EXAMPLES_FILE = "examples.arrow"
REPORT_FILE = "report.json"
_TEMPORARY = "tmp-"


def root() -> Path:
    return cache_dir() / "prepared"


def key(source: str, tokenizer: Any, fmt: str, cutoff_len: int, train_on_inputs: bool) -> str | None:
    """The cache key of a preparation, or None when the source cannot be identified (a Hub dataset)."""
    identity = source_identity(source)
    if identity is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [VERSION, *identity, fmt, cutoff_len, train_on_inputs, len(tokenizer), tokenizer.eos_token,
             getattr(tokenizer, "chat_template", None), hashlib.sha256(vocabulary.encode()).hexdigest()]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def examples_file(key: str) -> Path:
    return root() / key / EXAMPLES_FILE


def load(key: str) -> tuple[datasets.Dataset, dict[str, Any]] | None:
    """The kept preparation of ``key`` (its rows and its data report), or None when there is none usable."""
    folder = root() / key
    try:
        report = json.loads((folder / REPORT_FILE).read_text())
        dataset = datasets.Dataset.from_file(str(folder / EXAMPLES_FILE))
        os.utime(folder)  # most recently used: the last to be pruned
    except (OSError, ValueError) as err:
        if folder.exists():
            log.warning("The cached preparation %s cannot be read (%s); preparing again.", folder, err)
        return None
    return dataset, report


@contextlib.contextmanager
def writing(key: str | None) -> Iterator[tuple[Path, Callable[[dict[str, Any]], None]]]:
    """A path to write a preparation's Arrow file to, and ``keep(report)`` to call once it is complete: with a
    ``key``, the folder then becomes the cached one; without, it stays this process's own."""
    folder = root() / f"{_TEMPORARY}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    kept = False

    def keep(report: dict[str, Any]) -> None:
        nonlocal kept
        (folder / REPORT_FILE).write_text(json.dumps(report))
        if key is not None:
            final = root() / key
            shutil.rmtree(final, ignore_errors=True)
            folder.rename(final)
        kept = True

    try:
        yield folder / EXAMPLES_FILE, keep
    finally:
        if not kept:
            shutil.rmtree(folder, ignore_errors=True)
        _prune()


def _prune() -> None:
    """Keep the KEPT most recently used preparations, and the temporary folders of processes still running."""
    try:
        entries = [path for path in root().iterdir() if path.is_dir()]
    except OSError:
        return
    complete = sorted((p for p in entries if not p.name.startswith(_TEMPORARY)), key=_used, reverse=True)
    for folder in complete[KEPT:]:
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (p for p in entries if p.name.startswith(_TEMPORARY)):
        pid = folder.name[len(_TEMPORARY):].split("-")[0]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def _used(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:
        return time.time()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
