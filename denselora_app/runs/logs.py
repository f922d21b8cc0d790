"""What a run's log says: the log line format, the run's own lines, the metrics line the worker prints, and why a
training process failed.
"""

from __future__ import annotations

import enum
import logging
import re
from typing import Any, NamedTuple

log = logging.getLogger(__name__)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the worker's train.log; see own_log_lines
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) (?P<name>[\w.]+): ")


def own_log_lines(text: str) -> list[str]:
    """The lines of a train.log that belong to the run: records of the studio's loggers and any warning or error,
    with their continuation lines (multi-line messages, tracebacks); plus a traceback printed outside logging."""
    kept: list[str] = []
    keep = False
    for line in text.replace("\r", "\n").splitlines():
        match = _RECORD.match(line)
        if match:
            keep = match["name"].startswith("denselora_app") or match["level"] in ("WARNING", "ERROR", "CRITICAL")
            if keep and match["name"] == "py.warnings":
                keep = False  # library deprecation notices: not the run's business
        elif line.startswith("Traceback (most recent call last)"):
            keep = True
        if keep and line.strip():
            kept.append(line)
    return kept


class FailureKind(str, enum.Enum):
    """Why a run failed, as status.json's ``error_kind`` records it."""

    OUT_OF_MEMORY = "out of memory"
    DISK_FULL = "disk full"
    DATA = "data error"
    MODEL_LOAD = "model load error"
    CONFIGURATION = "configuration error"
    KILLED = "killed"  # ended without reporting an error
    INTERRUPTED = "interrupted"  # Ctrl-C in a foreground run
    NEVER_STARTED = "never started"  # created, but its training process never began
    REFUSED_IN_JOB = "refused in the job"  # the studio's own check refused the config inside a Jobs job
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


class Failure(NamedTuple):
    """A failed run explained: what kind of failure, one line saying what happened, and what to do."""

    kind: FailureKind
    summary: str
    fix: str

    def status_fields(self) -> dict[str, str]:
        """The fields of status.json that record it."""
        return {"error": self.summary, "error_kind": self.kind.value, "fix": self.fix}


_FAILURES = [
    (FailureKind.OUT_OF_MEMORY, re.compile(r"out of memory|OutOfMemoryError|MemoryError|Cannot allocate memory", re.I),
     "Ran out of memory.",
     "Lower batch_size (raise grad_accum to keep the effective batch), lower cutoff_len, turn on "
     "gradient_checkpointing, or pick a smaller model."),
    (FailureKind.DISK_FULL, re.compile(r"No space left on device|Disk quota exceeded|\[Errno 28\]"),
     "The disk is full.",
     "Free space on the disk that holds the runs folder (old runs' checkpoints are the largest files: python -m "
     "denselora_app delete RUN_ID), then resume from the last checkpoint."),
    (FailureKind.DATA, re.compile(r"DataError"),
     "The training data could not be used.",
     "Check the data report: fix or remove the rows it names, or choose the right data format."),
    (FailureKind.MODEL_LOAD, re.compile(r"ModelLoadError|OSError: .*(config\.json|does not appear to have)", re.I),
     "The base model could not be loaded.",
     "Check the model name or folder; offline, use the embedded default or a local folder."),
    (FailureKind.CONFIGURATION, re.compile(r"ConfigError"),
     "The run configuration is invalid.",
     "Fix the value named in the message and start again."),
]


def classify_failure(log_text: str) -> Failure:
    """Kind, one-line summary and suggested fix for a failed run, from what it logged."""
    error_lines = [line for line in log_text.splitlines() if re.search(r"Error|Exception|Killed", line)]
    detail = error_lines[-1].strip() if error_lines else ""
    for kind, pattern, summary, fix in _FAILURES:
        if pattern.search(log_text):
            return Failure(kind, f"{summary} {detail}".strip(), fix)
    if not detail:
        return Failure(
            FailureKind.KILLED,
            "The training process ended without reporting an error: it was killed (by a signal, by a restart of the "
            "machine or Space, or by the system when memory ran out).",
            "Resume from the last checkpoint (Resume in the app's Runs tab, or python -m denselora_app resume "
            "RUN_ID). If it happens again without a restart, reduce memory use (batch_size, cutoff_len, "
            "gradient_checkpointing).",
        )
    return Failure(FailureKind.OTHER, detail, "Read the end of train.log for the full error.")


# How each metrics field reads in a line, in this order.
LINE_FORMATS: tuple[tuple[str, str], ...] = (
    ("eval_loss", "validation loss {:.4f}"),
    ("loss", "loss {:.4f}"),
    ("learning_rate", "lr {:.2e}"),
    ("grad_norm", "grad norm {:.3g}"),
    ("tokens_per_second", "{:,.0f} tok/s"),
)


_SEPARATOR = " | "
_NUMBER = r"([-+]?(?:nan|inf|[\d,]*\.?\d+(?:e[-+]?\d+)?))"


def _pattern(fmt: str) -> re.Pattern[str]:
    """A line part's pattern: its format with each ``{...}`` field read back as a number."""
    pieces = re.split(r"\{[^}]*\}", fmt)
    return re.compile(_NUMBER.join(re.escape(piece) for piece in pieces), re.IGNORECASE)


_PARTS = [(key, _pattern(fmt)) for key, fmt in LINE_FORMATS]
_STEP = re.compile(r"\bstep (\d+)/(\d+)((?: \| [^|]+)+)$")


def metrics_line(row: dict[str, Any], max_steps: int) -> str:
    """One metrics row as a log line: ``step 40/60 | loss 1.2345 | lr 3.00e-04 | grad norm 0.512 | 1,071 tok/s``."""
    parts = [f"step {row['step']}/{max_steps}"]
    parts += [fmt.format(row[key]) for key, fmt in LINE_FORMATS if key in row]
    return _SEPARATOR.join(parts)


def parse_metrics_line(text: str) -> tuple[dict[str, Any], int] | None:
    """The metrics row and max steps of a step line (after any log-record prefix), or None when ``text`` is not
    one: every part after the step must be a field metrics_line writes."""
    match = _STEP.search(text.rstrip())
    if not match:
        return None
    row: dict[str, Any] = {"step": int(match[1])}
    for part in match[3].split(_SEPARATOR)[1:]:
        for key, pattern in _PARTS:
            if found := pattern.fullmatch(part.strip()):
                row[key] = float(found[1].replace(",", ""))
                break
        else:
            return None
    return row, int(match[2])
