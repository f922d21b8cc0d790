"""What reaches the terminal: the studio's own messages, and nothing else unless ``--debug``.

Libraries log, warn and print as they please (a new release of any of them can add a line to every command), so the
policy sits at the root of ``logging`` and ``warnings``, never in a list of logger names. While a ``Terminal`` is
active:

* the root logger has two handlers: the log file (every record) and the terminal (records of the studio's own
  loggers, ``denselora_app.*``, tracebacks left out; every record with ``debug``);
* Python warnings are log records (``logging.captureWarnings``), so they follow the same rule;
* loggers that a library gave a terminal handler of its own (transformers, huggingface_hub, ...) lose it and pass
  their records to the root instead;
* ``sys.stderr`` writes into the log file, so a handler, a progress bar or a print that a library sets up later lands
  there too.

The terminal itself is the stream that was ``sys.stderr`` when the Terminal started; the studio writes to it through
its loggers or ``stderr()``. The log file is the run's ``train.log`` during a foreground run (``log_to``), else
``studio_log_file()``, which the ``--debug`` hint names.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from denselora_app.rules import cache_dir
from denselora_app.runs import LOG_FORMAT

OWN_LOGGER = "denselora_app"
# A log record carrying this attribute is a traceback: kept in the log file, shown in a terminal only with --debug.
TRACEBACK = "denselora_traceback"
_LOG_BYTES = 5 * 1024 * 1024  # the studio's own log file rotates at this size, keeping one older file

_active: Terminal | None = None


def studio_log_file() -> Path:
    """Where the CLI and the app log outside a run: ``<cache>/logs/denselora.log``."""
    return cache_dir() / "logs" / "denselora.log"


def stderr() -> TextIO:
    """The terminal: while a Terminal is active, the stream it keeps for the studio's own messages."""
    return _active.stream if _active is not None else sys.stderr


def log_to(path: Path) -> None:
    """The active Terminal logs into ``path`` from now on (a foreground run's train.log); without one, nothing."""
    if _active is not None:
        _active.log_to(path)


def is_own(record: logging.LogRecord) -> bool:
    return record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")


class _OwnRecordsOnly(logging.Filter):
    """The terminal's filter without --debug: the studio's records, tracebacks left to the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_own(record) and not getattr(record, TRACEBACK, False)


class _IntoLogFile(io.TextIOBase):
    """What ``sys.stderr`` becomes: text written to it is appended to the Terminal's log file."""

    def __init__(self, handler: logging.StreamHandler) -> None:
        self._handler = handler

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self._handler.lock:
            stream = self._handler.stream
            if stream is not None:
                stream.write(text)
                stream.flush()
        return len(text)

    def fileno(self) -> int:
        return self._handler.stream.fileno()


def _open_handler(path: Path, rotate: bool) -> logging.FileHandler:
    """A handler appending to ``path`` in the log format; where that cannot be written (a read-only home, a full
    disk), a file in the temporary folder, so that logging never stops a command."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if rotate:
            handler = logging.handlers.RotatingFileHandler(path, maxBytes=_LOG_BYTES, backupCount=1,
                                                           encoding="utf-8")
        else:
            handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        handler = logging.FileHandler(Path(tempfile.gettempdir()) / f"denselora-{path.name}", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def _writes_to_terminal(handler: logging.Handler) -> bool:
    # A library's stream handler writes to whatever sys.stderr was when it was made (a terminal, or pytest's capture).
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


class Terminal:
    """The policy above, from ``__enter__`` to ``__exit__``, which restores what it changed."""

    def __init__(self, debug: bool = False, log_file: Path | None = None) -> None:
        self.debug = debug
        self.log_file = log_file or studio_log_file()
        self.stream: TextIO = sys.stderr
        self._file: logging.FileHandler | None = None
        self._saved: dict[str, object] = {}

    def __enter__(self) -> Terminal:
        global _active
        self.stream = sys.stderr
        root = logging.getLogger()
        shown = logging.StreamHandler(self.stream)
        shown.setFormatter(logging.Formatter(LOG_FORMAT))
        if not self.debug:
            shown.addFilter(_OwnRecordsOnly())
        self._file = _open_handler(self.log_file, rotate=True)
        self.log_file = Path(self._file.baseFilename)
        self._saved = {"handlers": list(root.handlers), "level": root.level, "stderr": sys.stderr,
                       "previous": _active, "libraries": {} if self.debug else self._take_library_handlers()}
        root.handlers[:] = [shown, self._file]
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        if not self.debug:
            sys.stderr = _IntoLogFile(self._file)
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        root = logging.getLogger()
        logging.captureWarnings(False)
        sys.stderr = self._saved["stderr"]  # type: ignore[assignment]
        root.handlers[:] = self._saved["handlers"]  # type: ignore[index]
        root.setLevel(self._saved["level"])  # type: ignore[arg-type]
        for name, (handlers, propagate) in self._saved["libraries"].items():  # type: ignore[union-attr]
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers + [h for h in logger.handlers if h not in handlers]
            logger.propagate = propagate
        if self._file is not None:
            self._file.close()
        _active = self._saved["previous"]  # type: ignore[assignment]

    def log_to(self, path: Path) -> None:
        """From now on, log into ``path`` (a foreground run's train.log) instead."""
        new = _open_handler(path, rotate=False)
        root = logging.getLogger()
        root.handlers[:] = [h if h is not self._file else new for h in root.handlers]
        if self._file is not None:
            self._file.close()
        self._file = new
        if not self.debug:
            sys.stderr = _IntoLogFile(new)
        self.log_file = Path(new.baseFilename)

    def _take_library_handlers(self) -> dict[str, tuple[list[logging.Handler], bool]]:
        """Detach the terminal handlers that libraries installed on their own loggers; returns what to restore."""
        taken: dict[str, tuple[list[logging.Handler], bool]] = {}
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if not isinstance(logger, logging.Logger) or name.startswith(OWN_LOGGER):
                continue
            own = [h for h in logger.handlers if _writes_to_terminal(h)]
            if own or not logger.propagate:
                taken[name] = (own, logger.propagate)
                logger.handlers[:] = [h for h in logger.handlers if h not in own]
                logger.propagate = True
        return taken
