"""Metrics rows (a run's metrics.jsonl) and token lengths turned into the pandas DataFrames gradio plots draw.

gr.LinePlot / gr.BarPlot take long-form frames: one row per point, and a text column whose values become the
colored series. Every frame here has fixed column dtypes even when empty, so a plot with no points yet still
knows which axis is numeric.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from ..runs import finite_number

TRAIN = "train"
VALIDATION = "validation"
LOSS_COLORS = {TRAIN: "#2563eb", VALIDATION: "#f97316"}

FITS = "fits in cutoff"
TRUNCATED = "truncated at cutoff"
LENGTH_COLORS = {FITS: "#2563eb", TRUNCATED: "#dc2626"}
HISTOGRAM_BINS = 16


def _frame(columns: dict[str, list], dtypes: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(values, dtype=dtypes[name]) for name, values in columns.items()})


def loss_frame(rows: Iterable[Mapping[str, Any]], label: str = "") -> pd.DataFrame:
    """Columns step, loss, series: the train loss and the validation loss as two series of one chart.

    Both series are always there, a series without points as one row with no loss: gradio's plot fixes its
    colors on the first draw, so a series that appeared later (the first validation pass) would get no line.
    ``label`` is appended to the series names, so several runs can share one chart (see ``overlay_frame``); it
    comes last because legends cut long names short.
    """
    suffix = f" · {label}" if label else ""
    steps, losses, series = [], [], []
    for row in rows:
        for key, name in (("loss", TRAIN), ("eval_loss", VALIDATION)):
            if finite_number(row.get(key)) and "step" in row:
                steps.append(int(row["step"]))
                losses.append(float(row[key]))
                series.append(name + suffix)
    first = min(steps, default=0)
    for name in (TRAIN + suffix, VALIDATION + suffix):
        if name not in series:
            steps.append(first)
            losses.append(math.nan)
            series.append(name)
    return _frame({"step": steps, "loss": losses, "series": series},
                  {"step": "int64", "loss": "float64", "series": "str"})


def overlay_frame(runs: Mapping[str, Iterable[Mapping[str, Any]]]) -> pd.DataFrame:
    """The loss curves of several runs (label -> metrics rows) in one frame, one series per run and split."""
    frames = [loss_frame(rows, label) for label, rows in runs.items()]
    return pd.concat(frames, ignore_index=True) if frames else loss_frame([]).iloc[:0]


def metric_frame(rows: Iterable[Mapping[str, Any]], key: str) -> pd.DataFrame:
    """Columns step, ``key``: one training metric (learning_rate, grad_norm, tokens_per_second) over steps."""
    points = [(int(row["step"]), float(row[key])) for row in rows if "step" in row and finite_number(row.get(key))]
    return _frame({"step": [p[0] for p in points], key: [p[1] for p in points]},
                  {"step": "int64", key: "float64"})


def length_histogram(lengths: Iterable[int], cutoff: int, bins: int = HISTOGRAM_BINS) -> pd.DataFrame:
    """Columns tokens (a bin label like '0-31'), rows, fit: how many rows fall in each token-length bin.

    The bins always span 0..cutoff, so the chart shows how much of the cutoff the data uses. Lengths are counted
    after truncation, so a row at the cutoff was (almost always) cut: those are a second, red series.
    """
    cutoff = max(int(cutoff), 1)
    width = max(1, math.ceil((cutoff + 1) / bins))
    starts = list(range(0, cutoff + 1, width))
    fits, truncated = [0] * len(starts), 0
    for length in lengths:
        if length >= cutoff:
            truncated += 1
        else:
            fits[min(int(length) // width, len(starts) - 1)] += 1
    labels = [f"{start}-{min(start + width - 1, cutoff)}" for start in starts]
    return _frame(
        {"tokens": labels + [labels[-1]], "rows": fits + [truncated], "fit": [FITS] * len(labels) + [TRUNCATED]},
        {"tokens": "str", "rows": "int64", "fit": "str"},
    )


def shown(frame: pd.DataFrame, y: str) -> pd.DataFrame | None:
    """What a plot is given: None while it has no point to draw.

    Gradio's plots draw no lines for good once they were first given a frame without points, so such a chart must
    be None, not an empty frame.
    """
    return frame if frame[y].notna().any() else None

