"""The training worker's readable step lines, written and read here (no torch: the studio reads them too).

    metrics_line(row, max_steps)   "step 40/60 | loss 1.2345 | lr 3.00e-04 | grad norm 0.512 | 1,071 tok/s"
    parse_metrics_line(text)       that line (anywhere in a log line) back into (row, max_steps), or None

The worker logs one such line per metrics row (train.log, the app's log pane). A run trained elsewhere (on Hugging
Face Jobs) is followed through its log, so these lines are its metrics: the parser reads exactly what the writer
writes, at the precision written.
"""

from __future__ import annotations

import re
from typing import Any

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
