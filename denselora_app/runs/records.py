"""The records a run keeps besides its status: a learning-rate search, a Jobs job, and the facts of a finished run.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from denselora_app.config import RunConfig
from denselora_app.runs.files import LR_SEARCH_FILE, finite_number
from denselora_app.runs.status import RunKind, RunState, Status

log = logging.getLogger(__name__)


def format_rate(rate: float) -> str:
    """A learning rate as the CLI and the app show it, and as ``--set learning_rate=`` takes it back: 0.003, 3e-05."""
    return f"{rate:g}"


@dataclass
class LrTrial:
    """One finished trial of a learning-rate search: its rate trained for the search's steps, or until it diverged."""

    lr: float
    losses: list[float | None]  # per step; None where the loss was not a finite number
    final_loss: float | None  # what trials are compared by (lr_finder.trial_loss); None when not a number
    diverged: bool = False
    reason: str | None = None  # why it counts as diverged

    @classmethod
    def from_json(cls, data: Any) -> LrTrial | None:
        if not isinstance(data, dict) or not finite_number(data.get("lr")) or not isinstance(data.get("losses"), list):
            return None
        return cls(lr=float(data["lr"]), losses=[float(x) if finite_number(x) else None for x in data["losses"]],
                   final_loss=float(data["final_loss"]) if finite_number(data.get("final_loss")) else None,
                   diverged=data.get("diverged") is True,
                   reason=data["reason"] if isinstance(data.get("reason"), str) else None)


@dataclass
class LrSearch:
    """lr_search.json: the rates a search tries and its steps per trial (written when the run is created), the trials
    finished so far and the rate chosen from them by ``rule`` (both written by the worker after each trial)."""

    rates: list[float]
    steps: int
    trials: list[LrTrial] = field(default_factory=list)
    chosen: float | None = None
    rule: str = ""  # how ``chosen`` was picked, in words (lr_finder.RULE)
    problem: str | None = field(default=None, metadata={"derived": True})  # why the file cannot be used

    @property
    def chosen_trial(self) -> LrTrial | None:
        return next((t for t in self.trials if t.lr == self.chosen), None)

    @classmethod
    def from_json(cls, data: Any) -> LrSearch:
        """The search lr_search.json describes; one whose plan is unreadable carries the ``problem``."""
        rates = data.get("rates") if isinstance(data, dict) else None
        steps = data.get("steps") if isinstance(data, dict) else None
        if (not isinstance(rates, list) or not rates or not all(finite_number(r) and r > 0 for r in rates)
                or not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            return cls(rates=[], steps=0, problem=f"{LR_SEARCH_FILE} has no valid rates and steps")
        trials = [t for t in map(LrTrial.from_json, data.get("trials") or []) if t is not None]
        chosen = data.get("chosen")
        return cls(rates=[float(r) for r in rates], steps=steps, trials=trials,
                   chosen=float(chosen) if finite_number(chosen) else None,
                   rule=data["rule"] if isinstance(data.get("rule"), str) else "")

    def to_json(self) -> dict[str, Any]:
        return {"rates": self.rates, "steps": self.steps, "trials": [dataclasses.asdict(t) for t in self.trials],
                "chosen": self.chosen, "rule": self.rule}


@dataclass(frozen=True)
class JobRecord:
    """The Hugging Face Jobs job a run trains in (job.json, written once when the job is submitted). There is no
    local training process: hub/jobs.py writes the run's status, metrics and log from the job's."""

    job_id: str
    namespace: str  # the account the job runs under
    flavor: str  # rules.JOBS_GPU_FLAVORS
    url: str  # the job's page on the Hub
    repo_id: str  # the private model repository the job uploads the run's files to
    source: str  # where the job installed the studio from
    submitted_at: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> JobRecord | None:
        """The record in job.json's content, or None when it is not one."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "submitted_at"]
        if not isinstance(data, dict) or not all(isinstance(data.get(name), str) and data[name] for name in names):
            return None
        submitted = data.get("submitted_at")
        return cls(**{name: data[name] for name in names},
                   submitted_at=float(submitted) if finite_number(submitted) else None)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunFacts:
    """What a run is and what it produced, computed once here for the CLI, the app, publishing and summary.json."""

    run_id: str
    status: Status
    config: RunConfig | None  # None when config.yaml cannot be read (then ``problem`` says why)
    problem: str | None  # why the run is damaged, or None
    final_train_loss: float | None
    final_eval_loss: float | None
    trainable_parameters: int | None
    total_parameters: int | None
    steps: int  # optimizer steps trained
    checkpoints: list[int]  # steps of the complete checkpoints
    has_adapter: bool
    duration_seconds: float | None
    kind: RunKind = RunKind.TRAINING
    job: JobRecord | None = None  # the Hugging Face Jobs job it trains in; None for a run on this machine

    @property
    def state(self) -> RunState:
        return RunState.DAMAGED if self.problem else self.status.state

    @property
    def label(self) -> str:
        return "damaged" if self.problem else self.status.label

    @property
    def trainable_percent(self) -> float | None:
        if not self.trainable_parameters or not self.total_parameters:
            return None
        return 100.0 * self.trainable_parameters / self.total_parameters

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "stage": cfg.stage if cfg else None, "method": cfg.method if cfg else None, "r": cfg.r if cfg else None,
            "trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
            "trainable_percent": self.trainable_percent, "final_train_loss": self.final_train_loss,
            "final_eval_loss": self.final_eval_loss, "steps": self.steps,
            "duration_seconds": self.duration_seconds, "checkpoints": self.checkpoints,
        }
