"""How one run looks in the app: its state line, progress bar, charts, outcome and table row.

Shared by the Train tab's live view and the Runs tab; everything comes from ``Run.facts()``.
"""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass
from typing import Any

import pandas as pd

from denselora_app import rules
from denselora_app.hub import access, jobs
from denselora_app.hub.access import Action, Caller
from denselora_app.runs import JobRecord, Run, RunFacts, RunKind, RunState, Status, format_rate
from denselora_app.ui import charts

LOG_LINES = 30


def duration(seconds: float | None) -> str:
    """'1:02:03' or '4:05'; '-' when unknown."""
    if seconds is None:
        return "-"
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def follow_job(run: Run, who: Caller, token: str | None) -> str | None:
    """Bring a run on Hugging Face Jobs up to date (``jobs.refresh``) with the caller's token, if the caller is who
    may train here: the job is the owner's, so a visitor's token could not read it, and visitors see what the
    owner's last look saved. Returns why the job could not be followed, else None."""
    if not access.allowed(who, Action.TRAIN):
        return None
    return jobs.refresh(run, token)


def header_markdown(facts: RunFacts) -> str:
    if facts.problem:
        return f"**Run** `{facts.run_id}` · state: **damaged** · {facts.problem}"
    cfg = facts.config
    where = f" · on Jobs: {facts.job.flavor} · [the job]({facts.job.url})" if facts.job else ""
    what = "Learning-rate search" if facts.kind is RunKind.LR_SEARCH else "Run"
    return (f"**{what}** `{facts.run_id}` · state: **{facts.label}** · "
            f"{cfg.method} r={cfg.r} · model `{cfg.model}`{where}")


def progress_html(status: Status, job: JobRecord | None = None) -> str:
    """A bar with 'step i/N', elapsed and ETA; before the first step it says what the worker (or the ``job`` on
    Hugging Face Jobs) is doing."""
    state = status.state
    step, total = status.step, status.max_steps or 0
    percent = 100.0 * step / total if total else 0.0
    if status.stopping:
        text = ("Stopping: the step under way finishes, then a checkpoint and the adapter are saved" if total
                else "Stopping: it ends before its first step, at once while the data is being prepared or as "
                     "soon as the model has loaded")
    elif job is not None and state is RunState.QUEUED:
        text = f"Waiting for Hugging Face Jobs to start the job on {job.flavor}"
    elif job is not None and state is RunState.RUNNING and not total:
        text = "Preparing on Hugging Face Jobs: installing DenseLoRA Studio, then loading the data and the model"
    elif state is RunState.QUEUED or (state is RunState.RUNNING and not total):
        text = "Preparing: loading the data and the model (the first use of the default model converts it, ~1 min)"
    elif state is RunState.RUNNING and status.elapsed_seconds is None:
        text = f"step {step}/{total} · the first step is running"
    else:
        text = f"step {step}/{total or '?'} · elapsed {duration(status.elapsed_seconds)}"
        if state is RunState.RUNNING:
            text += f" · ETA {duration(status.remaining_seconds)}"
    return (
        '<div class="dl-progress">'
        f'<div class="dl-progress-bar" style="width:{percent:.1f}%"></div></div>'
        f'<div class="dl-progress-text">{html.escape(text)} · {html.escape(status.label)}</div>'
    )


def outcome_markdown(run: Run, facts: RunFacts, *, paths: bool = True) -> str:
    """Where the adapter is once a run ended, or why it failed and what to do; empty while it trains. Without
    ``paths`` (what a Space's visitor sees) no folder of the server is named."""
    state, status = facts.state, facts.status
    if state.active:
        return ""
    if state is RunState.DAMAGED:
        return (f"**This run folder is damaged:** {facts.problem}.\n\n**Fix:** delete it in the Runs tab "
                f"(or `python -m denselora_app delete {run.id}`); other runs are not affected.")
    if state is RunState.FAILED:
        return (f"**Training failed** ({status.error_kind or 'error'}): {status.error or ''}\n\n"
                f"**Fix:** {status.fix or 'read the log below.'}")
    if facts.kind is RunKind.LR_SEARCH:
        return search_outcome_markdown(run, status, paths=paths)
    note = f"\n\n{status.note}" if status.note else ""
    if facts.has_adapter:
        where = f"**Your adapter is in** `{run.adapter_dir}`" if paths else "Chat with its adapter in the Chat tab."
        if state is RunState.STOPPED:
            return (f"Run stopped; the adapter trained so far was saved. {where}\n\n"
                    f"Continue training with **Resume** in the Runs tab, or `python -m denselora_app resume "
                    f"{run.id}`{note}")
        return f"Run {state}. {where}{note}"
    if facts.job is not None and state is RunState.COMPLETED:
        return (f"Run completed on Hugging Face Jobs. Its adapter is in `{facts.job.repo_id}` (private) and comes "
                f"into `{run.adapter_dir}` when the studio next reads the job.{note}")
    return f"Run {state}; it saved no adapter.{note}"


def search_outcome_markdown(run: Run, status: Status, *, paths: bool = True) -> str:
    """An ended search: its chosen rate and how to use it, and each finished trial."""
    search = run.lr_search()
    table = "| rate | loss (last steps) | diverged |\n|---:|---:|---|\n" + "".join(
        f"| {'**' + format_rate(t.lr) + '**' if t.lr == search.chosen else format_rate(t.lr)} "
        f"| {'-' if t.final_loss is None else f'{t.final_loss:.4f}'} | {t.reason or 'no'} |\n"
        for t in search.trials)
    note = status.note or ""
    if search.chosen is None:
        return f"{note}\n\n{table}" if search.trials else note
    rate = format_rate(search.chosen)
    command = (f"; from the command line: `python -m denselora_app train {run.path / 'config.yaml'} --set "
               f"learning_rate={rate}`" if paths else "")
    return (f"**Best learning rate: {rate}**: {search.rule}. **Use this rate** puts it in the form{command}\n\n"
            f"{rules.LR_SEARCH_LONG_RUNS}\n\n{table}\n{note}")


@dataclass
class SearchCharts:
    """A learning-rate search as the live view draws it."""

    trials: pd.DataFrame | None  # one loss curve per rate (x: the step within the trial); None before any point
    colors: dict[str, str]  # each rate's curve color, lowest rate blue to highest red
    chosen: pd.DataFrame | None  # the chosen trial's recorded losses; None until a rate is chosen


def search_charts(run: Run) -> SearchCharts | None:
    """The search's charts; None for a training run (or a search whose lr_search.json cannot be read)."""
    search = run.lr_search()
    if search is None or search.problem:
        return None
    chosen = search.chosen_trial
    return SearchCharts(trials=charts.shown(charts.trial_frame(run.metrics(), search.rates), "loss"),
                        colors=charts.rate_colors(search.rates),
                        chosen=charts.shown(charts.curve_frame(chosen.losses), "loss") if chosen else None)


@dataclass
class RunCharts:
    """A run's charts, each None while it has no points (see charts.shown); the last two only a dpo run has."""

    loss: pd.DataFrame | None
    learning_rate: pd.DataFrame | None
    grad_norm: pd.DataFrame | None
    tokens_per_second: pd.DataFrame | None
    rewards: pd.DataFrame | None = None  # of the chosen and rejected answers, and their margin
    preference_accuracy: pd.DataFrame | None = None


def run_charts(rows: list[dict[str, Any]]) -> RunCharts:
    metrics = {key: charts.shown(charts.metric_frame(rows, key), key)
               for key in ("learning_rate", "grad_norm", "tokens_per_second")}
    accuracy = charts.PREFERENCE_ACCURACY
    return RunCharts(loss=charts.shown(charts.loss_frame(rows), "loss"), **metrics,
                     rewards=charts.shown(charts.rewards_frame(rows), "reward"),
                     preference_accuracy=charts.shown(charts.metric_frame(rows, accuracy), accuracy))


TABLE_COLUMNS = ["Run", "State", "Stage", "Method", "Rank", "Trainable %", "Train loss", "Validation loss", "Steps",
                 "Duration", "Started", "Trained on"]


def table_row(facts: RunFacts) -> list[Any]:
    """One line of the Runs table; the final losses of a run still training are its latest ones."""
    status, cfg = facts.status, facts.config
    created = status.created_at
    return [
        facts.run_id,
        facts.label,
        cfg.stage if cfg else "-",
        (f"{cfg.method} · lr search" if facts.kind is RunKind.LR_SEARCH else cfg.method) if cfg else "-",
        cfg.r if cfg else "-",
        f"{facts.trainable_percent:.4f}" if facts.trainable_percent else "-",
        f"{facts.final_train_loss:.4f}" if facts.final_train_loss is not None else "-",
        f"{facts.final_eval_loss:.4f}" if facts.final_eval_loss is not None else "-",
        f"{facts.steps}/{status.max_steps or '?'}",
        duration(facts.duration_seconds),
        dt.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M") if created else "-",
        f"Jobs {facts.job.flavor}" if facts.job else "this machine",
    ]
