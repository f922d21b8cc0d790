"""The learning-rate finder: short trials of one adapter at a spread of learning rates, from the same start.

A search is a run like any other (``launch.launch(cfg, search=plan_search(cfg))``: the same checks, device claim,
worker, Stop and states). Its folder holds lr_search.json (``runs.LrSearch``) and no checkpoints or adapter. The
worker calls ``search``, which builds what training builds (``train.prepare``), once:

* on the data's first ``steps x batch_size x grad_accum`` rows, without a validation split (trials compare
  training loss);
* every trial starts from the same adapter initialisation, data order and dropout (same seed), warms up for at most
  a quarter of its steps and then holds its rate; each step's loss goes to metrics.jsonl with its ``trial`` and
  ``lr`` as it happens;
* a trial whose loss stops being a number, or rises past ``DIVERGENCE_FACTOR`` times its first step's, has diverged
  and ends there;
* Stop ends the search after the current step: finished trials are kept, the one cut short is not counted;
* ``choose_rate`` picks the rate (``RULE``), after every trial, into lr_search.json: what the CLI and the app show.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from typing import Any

import torch
from transformers import TrainerCallback, set_seed

from denselora_app import rules
from denselora_app.config import ConfigError, RunConfig
from denselora_app.engine.data import PreparationStopped
from denselora_app.engine.train import (
    Outcome,
    make_trainer,
    metrics_line,
    peak_memory_gb,
    prepare,
    process_state,
    training_arguments,
)
from denselora_app.runs import LrSearch, LrTrial, Run, RunState, format_rate

log = logging.getLogger(__name__)

MIN_STEPS = 2  # the first step's loss is measured before any update: one step compares nothing
SCORE_STEPS = 3  # a trial's loss: the mean over its last steps, so one noisy batch does not decide
DIVERGENCE_FACTOR = 2.0
RULE = (f"the lowest mean loss over each trial's last {SCORE_STEPS} steps; diverged trials excluded, "
        "ties going to the lower rate")


def log_spaced(low: float, high: float, count: int) -> list[float]:
    """``count`` rates from ``low`` to ``high``, evenly spaced on a log scale, to two significant digits (so the
    rate shown is the rate tried)."""
    return [float(f"{low * (high / low) ** (i / (count - 1)):.2g}") for i in range(count)]


def plan_search(cfg: RunConfig, *, rates: list[float] | None = None, low: float | None = None,
                high: float | None = None, count: int | None = None, steps: int | None = None) -> LrSearch:
    """What a search of ``cfg`` tries: the ``rates`` given, else ``count`` rates from ``low`` to ``high`` (defaults
    for the method in rules.py), each for ``steps`` steps. ConfigError says what is wrong."""
    steps = rules.LR_SEARCH_STEPS if steps is None else steps
    if steps < MIN_STEPS:
        raise ConfigError(f"A trial needs at least {MIN_STEPS} steps (the first step's loss is measured before any "
                          f"update); got {steps}.")
    if rates is not None:
        if low is not None or high is not None or count is not None:
            raise ConfigError("Give either the rates to try or a range (min, max, count), not both.")
    else:
        default_low, default_high = rules.LR_SEARCH_RANGES[cfg.method]
        low = default_low if low is None else low
        high = default_high if high is None else high
        count = rules.LR_SEARCH_COUNT if count is None else count
        if not 0 < low < high or not math.isfinite(high):
            raise ConfigError(f"The range of rates must have 0 < min < max; got min {format_rate(low)}, "
                              f"max {format_rate(high)}.")
        if count < 2:
            raise ConfigError(f"A search compares at least 2 rates; got count {count}.")
        rates = log_spaced(low, high, count)
    bad = [r for r in rates if not (math.isfinite(r) and r > 0)]
    if bad:
        raise ConfigError(f"Learning rates must be positive numbers; got {', '.join(map(str, bad))}.")
    rates = sorted(set(rates))
    if len(rates) < 2:
        raise ConfigError("A search compares at least 2 different rates.")
    return LrSearch(rates=rates, steps=steps, rule=RULE)


def trial_loss(losses: list[float | None]) -> float | None:
    """A trial's loss, as trials are compared: the mean over its last SCORE_STEPS steps (None if one is not a
    number)."""
    last = losses[-SCORE_STEPS:]
    if not last or any(loss is None for loss in last):
        return None
    return sum(last) / len(last)


def divergence(losses: list[float | None]) -> str | None:
    """Why a trial has diverged at its latest step, or None while it has not."""
    first, last = losses[0], losses[-1]
    if last is None:
        return "the loss is not a number (nan or inf)"
    if first is not None and last > DIVERGENCE_FACTOR * first:
        return f"the loss rose from {first:.4g} to {last:.4g}"
    return None


def choose_rate(trials: list[LrTrial]) -> LrTrial | None:
    """The trial whose rate the search recommends (RULE): the one place this is decided."""
    candidates = [t for t in trials if not t.diverged and t.final_loss is not None]
    return min(candidates, key=lambda t: (t.final_loss, t.lr), default=None)


def search(run: Run, show_progress: bool = False) -> Outcome:
    """Run the search's trials to the end or to a stop request, recording each in lr_search.json."""
    cfg = run.config()
    plan = run.lr_search()
    if plan is None or plan.problem:
        raise ConfigError(f"Run {run.id} is not a learning-rate search that can run: "
                          f"{plan.problem if plan else 'it has no lr_search.json'}.")
    state = process_state(cfg.device)
    set_seed(cfg.seed)
    rows = plan.steps * cfg.effective_batch_size
    try:
        setup = prepare(run, dataclasses.replace(cfg, val_size=0), state, rows=rows)
    except PreparationStopped:
        return Outcome(RunState.STOPPED, note=_note([], None, len(plan.rates), stopped=True, interrupted=None))
    start = {name: p.detach().clone() for name, p in setup.model.named_parameters() if p.requires_grad}
    total = len(plan.rates) * plan.steps
    run.update_status(step=0, max_steps=total, trainable_parameters=setup.trainable,
                      total_parameters=setup.base_parameters)
    started = time.time()
    trials: list[LrTrial] = []
    interrupted: float | None = None  # the rate of a trial cut short by Stop
    with tempfile.TemporaryDirectory(prefix="denselora-lr-search-") as scratch:  # the Trainer's output_dir
        for index, rate in enumerate(plan.rates, start=1):
            if run.stop_requested():
                break
            with torch.no_grad():  # every trial starts from the same adapter weights
                for name, param in setup.model.named_parameters():
                    if name in start:
                        param.copy_(start[name])
            log.info("Trial %d/%d: learning rate %s for %d steps", index, len(plan.rates), format_rate(rate),
                     plan.steps)
            recorder = TrialRecorder(run, plan, index, started=started, echo=not show_progress)
            args = training_arguments(
                cfg, setup, output_dir=scratch, show_progress=show_progress, learning_rate=rate,
                max_steps=plan.steps, warmup_steps=min(cfg.warmup_steps, plan.steps // 4),
                lr_scheduler_type="constant_with_warmup", logging_steps=1, eval_strategy="no", eval_steps=None,
                save_strategy="no", logging_nan_inf_filter=False)  # a nan loss must be seen, not averaged away
            make_trainer(setup, args, [recorder], show_progress=show_progress).train()
            trial = recorder.trial()
            if trial is None:
                interrupted = rate
                break
            trials.append(trial)
            chosen = choose_rate(trials)
            run.write_lr_search(dataclasses.replace(plan, trials=list(trials),
                                                    chosen=chosen.lr if chosen else None))
    chosen = choose_rate(trials)
    for trial in trials:
        log.info("lr %s: %s%s", format_rate(trial.lr),
                 "diverged" if trial.diverged else f"loss {trial.final_loss:.4f}",
                 " <- chosen" if trial is chosen else "")
    stopped = run.stop_requested()
    return Outcome(RunState.STOPPED if stopped else RunState.COMPLETED,
                   note=_note(trials, chosen, len(plan.rates), stopped, interrupted))


def _note(trials: list[LrTrial], chosen: LrTrial | None, planned: int, stopped: bool,
          interrupted: float | None) -> str:
    finished = f"{len(trials)} of {planned} trials finished"
    if stopped:
        cut = f"; the trial at {format_rate(interrupted)} was cut short and is not counted" if interrupted else ""
        head = f"Stopped: {finished}{cut}."
    else:
        head = f"All {planned} trials finished."
    if chosen is not None:
        return f"{head} Best learning rate: {format_rate(chosen.lr)} (loss {chosen.final_loss:.4f})."
    if trials:
        return f"{head} Every trial diverged, so no rate was chosen: search lower rates."
    return f"{head} No rate was chosen."


class TrialRecorder(TrainerCallback):
    """One trial's steps into metrics.jsonl (``trial``, ``lr``, ``trial_step``; ``step`` counts across the search)
    and the run status; ends the trial when it diverges or Stop is asked for."""

    def __init__(self, run: Run, plan: LrSearch, index: int, started: float, echo: bool) -> None:
        self.run, self.plan, self.index, self.started, self.echo = run, plan, index, started, echo
        self.rate = plan.rates[index - 1]
        self.losses: list[float | None] = []
        self.reason: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.run.stop_requested():
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return  # the Trainer's end-of-training totals
        loss = float(logs["loss"])
        self.losses.append(loss if math.isfinite(loss) else None)
        now = time.time()
        step = (self.index - 1) * self.plan.steps + state.global_step
        total = len(self.plan.rates) * self.plan.steps
        elapsed = now - self.started
        row: dict[str, Any] = {"step": step, "trial": self.index, "lr": self.rate, "trial_step": state.global_step}
        for key in ("loss", "learning_rate", "grad_norm"):
            if key in logs and math.isfinite(float(logs[key])):
                row[key] = float(logs[key])
        row["tokens_per_second"] = (state.num_input_tokens_seen - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        self.reason = divergence(self.losses)
        if self.reason:
            row["diverged"] = self.reason
            control.should_training_stop = True
        row.update(elapsed_seconds=round(elapsed, 2), remaining_seconds=round(elapsed / step * (total - step), 2),
                   peak_memory_gb=round(peak_memory_gb(args.device), 3), time=now)
        self.run.append_metrics(row)
        if self.echo:
            log.info("trial %d/%d, lr %s: %s", self.index, len(self.plan.rates), format_rate(self.rate),
                     metrics_line({**row, "step": state.global_step}, self.plan.steps))
        if self.reason:
            log.warning("Trial %d (lr %s) diverged at step %d: %s.", self.index, format_rate(self.rate),
                        state.global_step, self.reason)
        self.run.update_status(step=step, elapsed_seconds=elapsed, remaining_seconds=row["remaining_seconds"])

    def trial(self) -> LrTrial | None:
        """The finished trial; None when Stop cut it short."""
        if self.reason is None and len(self.losses) < self.plan.steps:
            return None
        return LrTrial(lr=self.rate, losses=list(self.losses), final_loss=trial_loss(self.losses),
                       diverged=self.reason is not None, reason=self.reason)
