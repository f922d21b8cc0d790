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

from denselora_app.runs import finite_number, format_rate

TRAIN = "train"
VALIDATION = "validation"
LOSS_COLORS = {TRAIN: "#2563eb", VALIDATION: "#f97316"}

FITS = "fits in cutoff"
TRUNCATED = "truncated at cutoff"
LENGTH_COLORS = {FITS: "#2563eb", TRUNCATED: "#dc2626"}
HISTOGRAM_BINS = 16
# Stage dpo's rewards, as TRL logs them (beta times the log-ratio of adapter to reference), by series name.
REWARD_SERIES = {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margins": "margin"}
REWARD_COLORS = {"chosen": "#16a34a", "rejected": "#dc2626", "margin": "#2563eb"}
PREFERENCE_ACCURACY = "rewards/accuracies"  # the share of a batch's pairs whose chosen reward is the higher
LOW_RATE_COLOR, HIGH_RATE_COLOR = "#2563eb", "#dc2626"  # a search's curves run from blue (lowest) to red (highest)


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


def rewards_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Columns step, reward, series: a dpo run's rewards of the chosen and the rejected answers and their margin,
    every series there from the first draw (see ``loss_frame``)."""
    steps, rewards, series = [], [], []
    for row in rows:
        for key, name in REWARD_SERIES.items():
            if finite_number(row.get(key)) and "step" in row:
                steps.append(int(row["step"]))
                rewards.append(float(row[key]))
                series.append(name)
    for name in REWARD_SERIES.values():
        if name not in series:
            steps.append(min(steps, default=0))
            rewards.append(math.nan)
            series.append(name)
    return _frame({"step": steps, "reward": rewards, "series": series},
                  {"step": "int64", "reward": "float64", "series": "str"})


def overlay_frame(runs: Mapping[str, Iterable[Mapping[str, Any]]]) -> pd.DataFrame:
    """The loss curves of several runs (label -> metrics rows) in one frame, one series per run and split."""
    frames = [loss_frame(rows, label) for label, rows in runs.items()]
    return pd.concat(frames, ignore_index=True) if frames else loss_frame([]).iloc[:0]


def rate_label(rate: float) -> str:
    return f"lr {format_rate(rate)}"


def trial_frame(rows: Iterable[Mapping[str, Any]], rates: list[float]) -> pd.DataFrame:
    """Columns step (the step within its trial), loss, rate (the trial's label): a learning-rate search's metrics
    rows as one loss curve per rate. Every rate of ``rates`` is a series from the first draw, one without points as
    a row with no loss (see ``loss_frame``)."""
    steps, losses, labels = [], [], []
    for row in rows:
        if finite_number(row.get("lr")) and isinstance(row.get("trial_step"), int) and finite_number(row.get("loss")):
            steps.append(row["trial_step"])
            losses.append(float(row["loss"]))
            labels.append(rate_label(row["lr"]))
    for rate in rates:
        if rate_label(rate) not in labels:
            steps.append(1)
            losses.append(math.nan)
            labels.append(rate_label(rate))
    return _frame({"step": steps, "loss": losses, "rate": labels}, {"step": "int64", "loss": "float64", "rate": "str"})


def rate_colors(rates: list[float]) -> dict[str, str]:
    """Each rate's curve color, graded by rank from the lowest rate (blue) to the highest (red)."""
    low, high = (tuple(int(color[i:i + 2], 16) for i in (1, 3, 5)) for color in (LOW_RATE_COLOR, HIGH_RATE_COLOR))
    ordered = sorted(set(rates))
    colors = {}
    for rank, rate in enumerate(ordered):
        t = rank / max(len(ordered) - 1, 1)
        colors[rate_label(rate)] = "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(low, high))
    return colors


def curve_frame(losses: list[float | None]) -> pd.DataFrame:
    """Columns step, loss: one trial's recorded losses (a step whose loss was not a number has no point)."""
    return _frame({"step": list(range(1, len(losses) + 1)),
                   "loss": [math.nan if loss is None else loss for loss in losses]},
                  {"step": "int64", "loss": "float64"})


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

