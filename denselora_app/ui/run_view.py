"""How one run looks in the app: its state line, progress bar, charts, outcome and table row.

Shared by the Train tab's live view and the Runs tab; reads only what the run folder holds (``runs.Run``).
"""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..runs import ACTIVE_STATES, Run
from . import charts

LOG_LINES = 30


def duration(seconds: float | None) -> str:
    """'1:02:03' or '4:05'; '-' when unknown."""
    if seconds is None:
        return "-"
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def header_markdown(run: Run, status: dict[str, Any]) -> str:
    cfg = run.config()
    return (f"**Run** `{run.id}` · state: **{status.get('state', 'unknown')}** · "
            f"{cfg.method} r={cfg.r} · model `{cfg.model}`")


def progress_html(status: dict[str, Any]) -> str:
    """A bar with 'step i/N', elapsed and ETA; before the first step it says what the worker is doing."""
    state = status.get("state", "unknown")
    step, total = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    percent = 100.0 * step / total if total else 0.0
    if state == "queued" or (state == "running" and not total):
        text = "Preparing: loading the data and the model (the first use of the default model converts it, ~1 min)"
    elif state == "running" and "elapsed_seconds" not in status:
        text = f"step {step}/{total} · the first step is running"
    else:
        text = f"step {step}/{total or '?'} · elapsed {duration(status.get('elapsed_seconds'))}"
        if state == "running":
            text += f" · ETA {duration(status.get('remaining_seconds'))}"
    return (
        '<div class="dl-progress">'
        f'<div class="dl-progress-bar" style="width:{percent:.1f}%"></div></div>'
        f'<div class="dl-progress-text">{html.escape(text)} · {html.escape(state)}</div>'
    )


def outcome_markdown(run: Run, status: dict[str, Any]) -> str:
    """Where the adapter is once a run ended, or why it failed and what to do; empty while it trains."""
    state = status.get("state")
    if state in ACTIVE_STATES:
        return ""
    if state == "failed":
        return (f"**Training failed** ({status.get('error_kind') or 'error'}): {status.get('error') or ''}\n\n"
                f"**Fix:** {status.get('fix') or 'read the log below.'}")
    if run.adapter_dir.is_dir():
        where = f"**Your adapter is in** `{run.adapter_dir}`"
        if state == "stopped":
            return (f"Run stopped; the adapter trained so far was saved. {where}\n\n"
                    f"Continue training with `python -m denselora_app resume {run.id}`")
        return f"Run {state}. {where}"
    return f"Run {state}; it saved no adapter."


@dataclass
class RunCharts:
    """A run's four charts, each None while it has no points (see charts.shown)."""

    loss: pd.DataFrame | None
    learning_rate: pd.DataFrame | None
    grad_norm: pd.DataFrame | None
    tokens_per_second: pd.DataFrame | None


def run_charts(rows: list[dict[str, Any]]) -> RunCharts:
    metrics = {key: charts.shown(charts.metric_frame(rows, key), key)
               for key in ("learning_rate", "grad_norm", "tokens_per_second")}
    return RunCharts(loss=charts.shown(charts.loss_frame(rows), "loss"), **metrics)


TABLE_COLUMNS = ["Run", "State", "Method", "Rank", "Trainable %", "Train loss", "Validation loss", "Steps",
                 "Duration", "Started"]


def table_row(run: Run) -> list[Any]:
    """One line of the Runs table; the final losses of a run still training are its latest ones."""
    status, summary, cfg = run.status(), run.summary(), run.config()
    rows = run.metrics()
    train = [m["loss"] for m in rows if "loss" in m]
    val = [m["eval_loss"] for m in rows if "eval_loss" in m]
    trainable, total = status.get("trainable_parameters"), status.get("total_parameters")
    percent = summary.get("trainable_percent") or (100 * trainable / total if trainable and total else None)
    seconds = summary.get("duration_seconds", status.get("elapsed_seconds"))
    created = status.get("created_at")
    return [
        run.id,
        status.get("state", "unknown"),
        cfg.method,
        cfg.r,
        f"{percent:.4f}" if percent else "-",
        f"{train[-1]:.4f}" if train else "-",
        f"{val[-1]:.4f}" if val else "-",
        f"{status.get('step', 0)}/{status.get('max_steps') or '?'}",
        duration(seconds),
        dt.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M") if created else "-",
    ]
