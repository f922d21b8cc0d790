"""Runs on disk: one folder per run, a worker process per training, and the state a reader can trust.

    runs/<run-id>/
        config.yaml      the resolved RunConfig
        status.json      a Status: state, the training process, the device it holds, progress, how it ended
        metrics.jsonl    one JSON object per logged step (loss, eval_loss, learning_rate, grad_norm, tokens/s, ...)
        data_report.json what the data pipeline read, used and dropped
        train.log        everything the training process printed
        checkpoints/     resume points (Trainer checkpoints); one counts only once its completeness marker is written
        adapter/         the final adapter (PEFT format)
        summary.json     RunFacts at the end of training, for tools outside the studio
        eval.json        evaluation results (written by evaluate.py)
        lr_search.json   only in a learning-rate search (lr_finder.py): the rates, its finished trials, the chosen
                         rate; such a run trains no adapter and keeps no checkpoints
        PUBLIC           present when the owner made the run public on a Space (visitors see it, chat with it)
        job.json         a JobRecord, for a run that trains on Hugging Face Jobs (jobs.py keeps the rest in step)

This module is the only reader of that folder: everything else asks a ``Run`` for its ``status()``, ``facts()``,
``checkpoints()`` or ``evaluation()``. What a user types to name a run (its id, ``runs/<id>``, a folder's path)
becomes a ``Run`` only through ``resolve_run``, for every command and the app alike. Reading is tolerant and never
writes: a damaged file makes that one run 'damaged' (with the reason) and nothing else; a read-only runs folder can
be listed. Status and metrics are written atomically (write a temp file, then rename), so readers never see half a
file. The worker runs in its own session with its output in train.log, so the app can die or reload without
stopping (or blocking) training.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .config import ConfigError, RunConfig, StudioError

log = logging.getLogger(__name__)

STOP_FILE = "STOP"
PUBLIC_FILE = "PUBLIC"
EVAL_FILE = "eval.json"
JOB_FILE = "job.json"
LR_SEARCH_FILE = "lr_search.json"
CHECKPOINT_MARKER = "denselora_checkpoint.json"  # written last into a checkpoint: it lists the files and sizes
ADAPTER_CONFIG = "adapter_config.json"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the worker's train.log; see own_log_lines


class RunError(StudioError, RuntimeError):
    """A run cannot be created, found, started or stopped; the message says why and what to do."""


class RunState(str, enum.Enum):
    QUEUED = "queued"  # created; its training process is being started
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    DAMAGED = "damaged"  # only ever read, never written: the run folder cannot be understood

    def __str__(self) -> str:
        return self.value

    @property
    def active(self) -> bool:
        return self in ACTIVE_STATES


ACTIVE_STATES = (RunState.QUEUED, RunState.RUNNING)
FINAL_STATES = (RunState.COMPLETED, RunState.FAILED, RunState.STOPPED)


@dataclass
class Status:
    """What status.json says, read tolerantly; ``Run.status()`` adds what only a reader can tell (a dead worker)."""

    state: RunState
    run_id: str | None = None
    created_at: float | None = None
    launcher_pid: int | None = None  # the process that created the run and is starting its training
    launcher_started: float | None = None
    pid: int | None = None  # the training process (the worker, or the foreground CLI)
    pid_started: float | None = None
    device: str | None = None  # the device the run holds, resolved: 'cpu', 'cuda:0', 'mps'
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    max_steps: int | None = None
    elapsed_seconds: float | None = None
    remaining_seconds: float | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    error: str | None = None  # why it failed, one line
    error_kind: str | None = None  # 'out of memory', 'data error', 'killed', 'never started', ...
    fix: str | None = None  # what to do about it
    note: str | None = None  # what an outcome means when it is not obvious (e.g. stopped before the first step)
    problem: str | None = field(default=None, metadata={"derived": True})  # why the run is damaged; never written
    # Asked to stop, still training or preparing (it ends after the step under way); never written.
    stopping: bool = field(default=False, metadata={"derived": True})

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def label(self) -> str:
        """The state as the Runs table, the run header and ``runs`` show it: 'stopping' once a stop was asked."""
        return "stopping" if self.stopping else str(self.state)

    @classmethod
    def from_json(cls, data: Any) -> Status:
        """A Status from status.json's content; a shape that is not one gives a DAMAGED status saying why."""
        if not isinstance(data, dict):
            return cls(RunState.DAMAGED, problem=f"status.json holds {_kind(data)}, not an object")
        try:
            state = RunState(data.get("state"))
        except ValueError:
            return cls(RunState.DAMAGED, problem=f"status.json has no valid state (found {data.get('state')!r})")
        if state is RunState.DAMAGED:
            return cls(RunState.DAMAGED, problem="status.json says 'damaged', which is never written")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("derived") or f.name == "state" or f.name not in data:
                continue
            value = _typed(data[f.name], f.type)
            if value is not None:
                values[f.name] = value
        return cls(state, **values)

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("derived")}
        values["state"] = self.state.value
        return values


_WRITABLE = {f.name for f in dataclasses.fields(Status) if not f.metadata.get("derived")}


def _kind(value: Any) -> str:
    return {list: "a list", str: "text", type(None): "null", bool: "true/false"}.get(type(value), "a number")


def _typed(value: Any, annotation: str) -> Any:
    """``value`` if it fits the field's type (ints for floats are fine), else None: one bad field is ignored."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation.startswith("int"):
        return int(value) if number and float(value).is_integer() else None
    if annotation.startswith("float"):
        return float(value) if number else None
    if annotation.startswith("str"):
        return value if isinstance(value, str) else None
    return value


class RunKind(str, enum.Enum):
    TRAINING = "training"  # trains one adapter
    LR_SEARCH = "lr search"  # short trials at a spread of learning rates (lr_finder.py); saves no adapter

    def __str__(self) -> str:
        return self.value


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


def runs_dir() -> Path:
    """Where runs live: $DENSELORA_RUNS, else ./runs."""
    return Path(os.environ.get("DENSELORA_RUNS", "runs")).resolve()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    """The file's JSON, or ``default`` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return default


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _alive(pid: int | None, started: float | None) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``started`` (pids are recycled)."""
    if not pid:
        return False
    for child in list(_children):
        child.poll()  # reap our own finished workers, so they do not linger as zombies that look alive
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


# ---- checkpoints ---------------------------------------------------------------------------------------------------


def mark_checkpoint_complete(folder: Path) -> None:
    """Record that ``folder`` is a whole checkpoint: its files and their sizes, written last and atomically."""
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != CHECKPOINT_MARKER}
    write_json_atomic(folder / CHECKPOINT_MARKER, {"files": files})


def checkpoint_complete(folder: Path) -> bool:
    """A checkpoint counts only when its marker lists files that are all still there, with their sizes: a kill
    while it was written (no marker) or while it was deleted (files missing) leaves a partial one."""
    marker = read_json(folder / CHECKPOINT_MARKER)
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or ADAPTER_CONFIG not in files:
        return False
    try:
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except OSError:
        return False


def checkpoint_step(folder: Path) -> int | None:
    """The step a checkpoint folder was saved at, or None for a folder that is not one."""
    step = folder.name.removeprefix("checkpoint-")
    return int(step) if folder.name.startswith("checkpoint-") and step.isdigit() else None


# ---- one run ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRecord:
    """The Hugging Face Jobs job a run trains in (job.json, written once when the job is submitted). There is no
    local training process: jobs.py writes the run's status, metrics and log from the job's."""

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
            "method": cfg.method if cfg else None, "r": cfg.r if cfg else None,
            "trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
            "trainable_percent": self.trainable_percent, "final_train_loss": self.final_train_loss,
            "final_eval_loss": self.final_eval_loss, "steps": self.steps,
            "duration_seconds": self.duration_seconds, "checkpoints": self.checkpoints,
        }


@dataclass(frozen=True)
class Run:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    # ---- files
    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    def has_adapter(self) -> bool:
        return (self.adapter_dir / ADAPTER_CONFIG).is_file()

    @property
    def kind(self) -> RunKind:
        return RunKind.LR_SEARCH if (self.path / LR_SEARCH_FILE).exists() else RunKind.TRAINING

    def lr_search(self) -> LrSearch | None:
        """A learning-rate search's plan and results (None for a training run)."""
        if self.kind is not RunKind.LR_SEARCH:
            return None
        return LrSearch.from_json(read_json(self.path / LR_SEARCH_FILE))

    def write_lr_search(self, search: LrSearch) -> None:
        write_json_atomic(self.path / LR_SEARCH_FILE, search.to_json())

    def config(self) -> RunConfig:
        return RunConfig.from_yaml(self.path / "config.yaml")

    # ---- status
    def raw_status(self) -> Status:
        """status.json as written (no liveness check); DAMAGED when it is missing or not a status."""
        path = self.path / "status.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Status(RunState.DAMAGED, problem="status.json is missing")
        except (OSError, UnicodeDecodeError) as err:
            return Status(RunState.DAMAGED, problem=f"status.json cannot be read ({err})")
        try:
            return Status.from_json(json.loads(text))
        except json.JSONDecodeError as err:
            return Status(RunState.DAMAGED, problem=f"status.json is not valid JSON ({err.msg})")

    def status(self) -> Status:
        """The status as a reader should see it: a training process that died is a failure (explained from its
        log), a run whose start never happened is one too. Never writes."""
        status = self.raw_status()
        if (self.path / JOB_FILE).exists():  # no local process to check: jobs.sync writes what the job reports
            if self.job() is None and status.state is not RunState.DAMAGED:
                return dataclasses.replace(status, state=RunState.DAMAGED, problem="job.json is not a job record")
            return status
        if status.state is RunState.RUNNING or (status.state is RunState.QUEUED and status.pid):
            if not _alive(status.pid, status.pid_started):
                failure = classify_failure(self.log_tail(200))
                if self.kind is RunKind.LR_SEARCH and failure["kind"] == "killed":  # a search is never resumed
                    failure["fix"] = "Start the search again (its finished trials are in lr_search.json)."
                return dataclasses.replace(status, state=RunState.FAILED, error=failure["summary"],
                                           error_kind=failure["kind"], fix=failure["fix"])
        elif status.state is RunState.QUEUED and not _alive(status.launcher_pid, status.launcher_started):
            return dataclasses.replace(
                status, state=RunState.FAILED, error_kind="never started",
                error="The run was created, but its training process never started (what was starting it ended "
                      "first). Nothing was trained.",
                fix=f"Delete it (python -m denselora_app delete {self.id}) and start a new run.",
            )
        if status.active and self.stop_requested():
            return dataclasses.replace(status, stopping=True)
        return status

    def update_status(self, **changes: Any) -> Status:
        """Merge ``changes`` into status.json (the training process and the launcher are its only writers)."""
        unknown = set(changes) - _WRITABLE
        if unknown:
            raise ValueError(f"Not status fields: {', '.join(sorted(unknown))}")
        current = read_json(self.path / "status.json")
        values = {**(current if isinstance(current, dict) else {}), **changes}
        if isinstance(values.get("state"), RunState):
            values["state"] = values["state"].value
        write_json_atomic(self.path / "status.json", values)
        return Status.from_json(values)

    # ---- on Hugging Face Jobs
    def job(self) -> JobRecord | None:
        """The Jobs job this run trains in, or None (a run on this machine, or a damaged job.json)."""
        return JobRecord.from_json(read_json(self.path / JOB_FILE))

    def record_job(self, record: JobRecord) -> None:
        write_json_atomic(self.path / JOB_FILE, record.to_json())

    # ---- metrics and logs
    def metrics(self) -> list[dict[str, Any]]:
        """The logged rows, oldest first; a line that is not a JSON object with a step is skipped."""
        rows = []
        try:
            with open(self.path / "metrics.jsonl", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line being appended right now, or a damaged one
                    if isinstance(row, dict) and isinstance(row.get("step"), int):
                        rows.append(row)
        except OSError:
            pass
        return rows

    def append_metrics(self, row: dict[str, Any]) -> None:
        # One write() of one line with O_APPEND is atomic for readers of whole lines.
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines logged after a checkpoint, before resuming from it, so the curve continues without repeats."""
        self.replace_metrics([r for r in self.metrics() if r["step"] <= after_step])

    def replace_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Write metrics.jsonl anew with ``rows`` (atomically)."""
        tmp = self.path / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, self.path / "metrics.jsonl")

    def data_report(self) -> dict[str, Any]:
        report = read_json(self.path / "data_report.json", default={})
        return report if isinstance(report, dict) else {}

    def evaluation(self) -> dict[str, list[dict[str, Any]]]:
        """eval.json: ``{"results": [...], "base": [...]}``, empty lists when there is none or it is damaged."""
        saved = read_json(self.path / EVAL_FILE, default={})
        saved = saved if isinstance(saved, dict) else {}
        return {key: [r for r in saved.get(key, []) if isinstance(r, dict)] if isinstance(saved.get(key), list)
                else [] for key in ("results", "base")}

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of train.log, everything the training process printed."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 400 * lines))
                text = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def own_log_tail(self, lines: int = 30) -> str:
        """The run's own lines of train.log (the studio's messages, warnings and errors from anywhere, tracebacks),
        without libraries' informational chatter and progress bars: what the app's log pane shows."""
        return "\n".join(own_log_lines(self.log_tail(lines * 20))[-lines:])

    # ---- checkpoints and stopping
    def checkpoints(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        try:
            folders = list(self.checkpoints_dir.iterdir())
        except OSError:
            return []
        return sorted(step for p in folders if (step := checkpoint_step(p)) is not None and checkpoint_complete(p))

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"checkpoint-{step}"

    def last_checkpoint(self) -> Path | None:
        steps = self.checkpoints()
        return self.checkpoint_dir(steps[-1]) if steps else None

    def remove_partial_checkpoints(self) -> list[str]:
        """Delete checkpoint folders that are not complete (left by a kill); the training process calls this."""
        removed = []
        complete = set(self.checkpoints())
        for folder in self.checkpoints_dir.glob("checkpoint-*"):
            if folder.is_dir() and checkpoint_step(folder) not in complete:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def stop_requested(self) -> bool:
        return (self.path / STOP_FILE).exists()

    def ask_to_stop(self) -> None:
        """Write the stop request the training loop polls for after every step (tiny: a signal handler calls it)."""
        (self.path / STOP_FILE).touch()

    def clear_stop_request(self) -> None:
        """Forget an earlier stop request: when training ends, and before a resume reads 'queued' (so a stop asked
        from then on is honoured)."""
        (self.path / STOP_FILE).unlink(missing_ok=True)

    # ---- who may see it on a Space (access.py decides what the mark allows)
    def is_public(self) -> bool:
        return (self.path / PUBLIC_FILE).is_file()

    def set_public(self, public: bool) -> None:
        """Mark the run public on a Space (visitors may see it and chat with its final adapter), or take it back."""
        marker = self.path / PUBLIC_FILE
        if public:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    # ---- everything at once
    def facts(self) -> RunFacts:
        status = self.status()
        problem = status.problem
        cfg = None
        try:
            cfg = self.config()
        except ConfigError as err:
            problem = problem or f"config.yaml cannot be used: {err}"
        metrics = self.metrics()
        train = [m["loss"] for m in metrics if finite_number(m.get("loss"))]
        search = self.lr_search()
        if search is not None:  # what a search produced is its chosen trial, not the last step it ran
            problem = problem or search.problem
            chosen = search.chosen_trial
            train = [chosen.final_loss] if chosen and chosen.final_loss is not None else []
        evals = [m["eval_loss"] for m in metrics if finite_number(m.get("eval_loss"))]
        elapsed = metrics[-1].get("elapsed_seconds") if metrics else None
        return RunFacts(
            run_id=self.id,
            status=status,
            config=cfg,
            problem=problem,
            final_train_loss=train[-1] if train else None,
            final_eval_loss=evals[-1] if evals else None,
            trainable_parameters=status.trainable_parameters,
            total_parameters=status.total_parameters,
            steps=status.step or (metrics[-1]["step"] if metrics else 0),
            checkpoints=self.checkpoints(),
            has_adapter=self.has_adapter(),
            duration_seconds=status.elapsed_seconds if status.elapsed_seconds is not None
            else (elapsed if finite_number(elapsed) else None),
            kind=self.kind,
            job=self.job(),
        )


def finite_number(value: Any) -> bool:
    """Whether a metrics value is a real number to show or compute with (not text, not a flag, not NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- the log, as the user wants to read it ---------------------------------------------------------------------------

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


# ---- creating, finding, listing ----------------------------------------------------------------------------------


def create_run(cfg: RunConfig, root: Path | None = None, device: str | None = None,
               search: LrSearch | None = None) -> Run:
    """A new run folder in state 'queued', recorded as being started by this process (on ``device``); with
    ``search``, a learning-rate search with that plan."""
    root = root or runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = safe_name(cfg.run_name) if cfg.run_name else f"{cfg.method}-r{cfg.r}"
    name = f"lr-search-{name}" if search is not None else name
    run_id, n = f"{stamp}-{name}", 1
    while (root / run_id).exists():
        n += 1
        run_id = f"{stamp}-{name}-{n}"
    path = root / run_id
    path.mkdir()
    cfg.to_yaml(path / "config.yaml")
    run = Run(path)
    if search is not None:  # before status.json: a run that has a status is already of its kind
        run.write_lr_search(search)
    run.update_status(state=RunState.QUEUED, created_at=time.time(), run_id=run_id, device=device,
                      launcher_pid=os.getpid(), launcher_started=process_start_time(os.getpid()))
    return run


def safe_name(text: str) -> str:
    """A run name that can only ever be one folder name: no separators, no '..', no leading dot."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-.")
    return name[:64] or "run"


RUN_FILES = ("config.yaml", "status.json")  # a folder holding either is a run (a damaged one, maybe)


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a run folder: the one rule for listing runs, finding one, and what may be deleted."""
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def list_runs(root: Path | None = None) -> list[Run]:
    """Every run folder in the runs folder, newest first. Reads only."""
    root = root or runs_dir()
    try:
        folders = [p for p in root.iterdir() if _is_run_id(p.name)]
    except OSError:
        return []
    runs = [Run(p) for p in folders if is_run_folder(p)]
    return sorted(runs, key=lambda r: (r.raw_status().created_at or 0.0, r.id), reverse=True)


def resolve_run(ref: str, root: Path | None = None, *, outside_root: bool = False) -> Run:
    """The run that ``ref``, as a user typed it, names: a run id in the runs folder ``root``, or the path of a run
    folder (relative to the current directory, ``~`` expanded; ``runs/<id>`` also names run <id> of ``root``). The
    one place every command and the app's pickers find a run; anything else is a RunError saying what was typed and
    what a run reference looks like.

    Only with ``outside_root`` (the CLI: a local user's own disk) may the folder be elsewhere, e.g. copied from
    another machine. Without it (the app, whose callers may be anonymous visitors of a Space) only the runs in
    ``root`` are reached, and a path outside it is refused without being looked at, so the answer tells nothing
    about the server's disk.
    """
    text = str(ref).strip()
    root = (root or runs_dir()).resolve()
    path = _typed_folder(text) if text else None
    inside = path is not None and path.parent == root and _is_run_id(path.name)  # where list_runs looks
    by_id = [root / run_id for run_id in dict.fromkeys((text, runs_folder_form(text, root)))
             if run_id and _is_run_id(run_id)]
    typed = [path] if path is not None and path not in by_id and (inside or outside_root) else []
    candidates = by_id + typed
    try:
        if (found := next((folder for folder in candidates if is_run_folder(folder)), None)) is not None:
            return Run(found)
        seen = next((folder for folder in candidates if folder.exists()), None)
    except OSError as err:  # a path the system will not look up: a name too long, a folder it may not enter
        raise RunError(_not_a_run(text, f"it cannot be looked up ({err.strerror or err})")) from None
    if not text:
        why = "nothing was given"
    elif seen is not None:
        why = (f"the folder {seen} holds no run files ({' or '.join(RUN_FILES)})" if seen.is_dir()
               else f"{seen} is a file, not a run folder")
    elif path is None and outside_root:
        why = "it cannot be a path on this system"
    elif not candidates:  # a path outside the runs folder, without outside_root: never looked at
        why = f"here only the runs in the runs folder {root} can be used"
    else:
        missing = ([f"no run of that id in {root}"] if by_id else []) + ([f"no folder {path}"] if typed else [])
        why = "there is " + ", and ".join(missing)
    raise RunError(_not_a_run(text, why))


def runs_folder_form(text: str, root: Path | None = None) -> str | None:
    """The run id in ``runs/<id>`` (or ``<name of root>/<id>``): a run of the runs folder written as its path from
    the folder above it, as the docs and messages write it, whatever the current directory. None for other text."""
    parts = Path(str(text).strip()).parts
    names = {"runs", (root or runs_dir()).resolve().name}
    return parts[1] if len(parts) == 2 and parts[0] in names and _is_run_id(parts[1]) else None


def _is_run_id(text: str) -> bool:
    # Never a separator or '..': a run id is only ever one folder name inside the runs folder.
    return bool(RUN_ID_PATTERN.match(text)) and ".." not in text


def _typed_folder(text: str) -> Path | None:
    """The absolute folder a typed path names; None when it cannot be one here (a control character, '~user' with
    no such user, a link loop). Everything above its last part is resolved (links, '..'), the last part is not: a
    run folder that is a symbolic link stays one, so deleting it can refuse to follow it."""
    if not text.isprintable():  # NUL, newlines: no folder a user means, and a message must stay one line
        return None
    try:
        path = Path(text).expanduser().absolute()
        return path.resolve() if path.name in ("", "..") else path.parent.resolve() / path.name
    except (OSError, ValueError, RuntimeError):
        return None


def _not_a_run(text: str, why: str) -> str:
    typed = repr(text[:80]) + ("..." if len(text) > 80 else "")  # one line, however long or odd the input
    return (f"{typed} is not a run: {why}. A run is given by its run id or by the path of its folder "
            "(e.g. runs/<id>); list the runs with: python -m denselora_app runs")


def check_deletable(run: Run) -> None:
    """Raise RunError, saying what to do, unless ``run.path`` is a run folder of its own that is not training;
    damaged and never-started runs may go."""
    if run.path.is_symlink():
        # Deleting through the link would delete its target, wherever that is; rmtree refuses links anyway.
        target = run.path.resolve()
        raise RunError(f"{run.path} is a symbolic link to {target}, not a run folder of its own: nothing was "
                       f"deleted. Remove the link alone with: rm {shlex.quote(str(run.path))} (its target stays), "
                       f"or delete the run itself: python -m denselora_app delete {shlex.quote(str(target))}")
    if not is_run_folder(run.path):
        raise RunError(f"{run.path} holds no run files ({' or '.join(RUN_FILES)}), so it is not a run folder: "
                       "nothing was deleted.")
    status = run.status()
    if status.stopping:
        raise RunError(f"Run {run.id} is stopping: it ends once the step under way and its checkpoint are done. "
                       "Delete it then.")
    if status.active:
        raise RunError(f"Run {run.id} is still {status.state}: stop it first (python -m denselora_app stop "
                       f"{run.id}), then delete it.")


def delete_run(run: Run) -> None:
    """Delete the run folder (check_deletable first). Links inside it are removed, never followed: rmtree does not
    leave the folder."""
    check_deletable(run)
    try:
        shutil.rmtree(run.path)
    except OSError as err:
        raise RunError(f"Could not delete {run.path}: {err.strerror or err}.") from None


# ---- which device is taken ---------------------------------------------------------------------------------------


def run_holding(device: str, root: Path | None = None, exclude: Run | None = None) -> Run | None:
    """The run that is training (or starting) on ``device`` (a resolved name: 'cpu', 'cuda:0', 'mps'), if any."""
    for run in list_runs(root):
        if exclude is not None and run.path == exclude.path:
            continue
        status = run.status()
        if status.active and status.device == device:
            return run
    return None


# ---- the worker process ----------------------------------------------------------------------------------------


def start_worker(run: Run, resume: bool = False) -> int:
    """Launch ``python -m denselora_app.worker`` for this run in its own session; returns its pid.

    Called by launch.py, which has checked the run and its device first.
    """
    cmd = [sys.executable, "-m", "denselora_app.worker", str(run.path)] + (["--resume"] if resume else [])
    with open(run.log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the app and its process group; never writes to a pipe
            cwd=os.getcwd(),
        )
    run.update_status(state=RunState.QUEUED, pid=proc.pid, pid_started=process_start_time(proc.pid),
                      error=None, error_kind=None, fix=None, note=None, finished_at=None)
    _children.append(proc)
    return proc.pid


_children: list[subprocess.Popen] = []  # our workers, polled so finished ones are reaped


def request_stop(run: Run) -> str:
    """Graceful stop: the worker finishes its step, saves a checkpoint and the adapter, and ends as 'stopped'.

    Returns what the user should expect, which depends on whether training has begun."""
    status = run.status()
    if not status.active:
        how = {RunState.DAMAGED: f"it is damaged ({status.problem}); delete it",
               RunState.FAILED: "resume it, or delete it"}.get(status.state, "resume or delete it")
        raise RunError(f"Run {run.id} is not training (state: {status.state}); nothing to stop. You can {how}.")
    # The file alone is the request: a signal could reach a worker still starting up, before it can handle one.
    run.ask_to_stop()
    if run.kind is RunKind.LR_SEARCH:
        return (f"Asked the learning-rate search {run.id} to stop after the current step: the trials finished so "
                "far are kept, and the best rate is chosen from them.")
    if status.state is RunState.RUNNING and status.max_steps:  # the Trainer has begun: a step is under way
        return (f"Asked run {run.id} to stop: it saves a checkpoint and its adapter after the current step "
                f"(resume later with: python -m denselora_app resume {run.id}).")
    return (f"Asked run {run.id} to stop. It was still preparing (loading the data and the model), so it ends "
            "before its first training step, without a checkpoint or adapter: nothing was trained.")


def check_resumable(run: Run) -> Path:
    """The checkpoint a resume continues from; RunError saying why when there is none to continue."""
    facts = run.facts()
    if facts.problem:
        raise RunError(f"Run {run.id} is damaged ({facts.problem}); it cannot be resumed. Delete it.")
    state = facts.state
    if state.active:
        raise RunError(f"Run {run.id} is already {state}.")
    if run.kind is RunKind.LR_SEARCH:
        raise RunError(f"Run {run.id} is a learning-rate search, which is not resumed: start a new search.")
    if state is RunState.COMPLETED:
        raise RunError(f"Run {run.id} already completed; start a new run to train more.")
    checkpoint = run.last_checkpoint()
    if checkpoint is None:
        raise RunError(f"Run {run.id} has no complete checkpoint to resume from; start a new run instead "
                       f"(and delete this one: python -m denselora_app delete {run.id}).")
    return checkpoint


# ---- failures, explained -----------------------------------------------------------------------------------------

_FAILURES = [
    ("out of memory", re.compile(r"out of memory|OutOfMemoryError|MemoryError|Cannot allocate memory", re.I),
     "Ran out of memory.",
     "Lower batch_size (raise grad_accum to keep the effective batch), lower cutoff_len, turn on "
     "gradient_checkpointing, or pick a smaller model."),
    ("data error", re.compile(r"DataError"),
     "The training data could not be used.",
     "Check the data report: fix or remove the rows it names, or choose the right data format."),
    ("model load error", re.compile(r"ModelLoadError|OSError: .*(config\.json|does not appear to have)", re.I),
     "The base model could not be loaded.",
     "Check the model name or folder; offline, use the embedded default or a local folder."),
    ("configuration error", re.compile(r"ConfigError"),
     "The run configuration is invalid.",
     "Fix the value named in the message and start again."),
]


def classify_failure(log_text: str) -> dict[str, str]:
    """Kind, one-line summary and suggested fix for a failed run, from what it logged."""
    error_lines = [line for line in log_text.splitlines() if re.search(r"Error|Exception|Killed", line)]
    detail = error_lines[-1].strip() if error_lines else ""
    for kind, pattern, summary, fix in _FAILURES:
        if pattern.search(log_text):
            return {"kind": kind, "summary": f"{summary} {detail}".strip(), "fix": fix}
    if not detail:
        return {
            "kind": "killed",
            "summary": "The training process ended without reporting an error: it was killed (by a signal, by a "
                       "restart of the machine or Space, or by the system when memory ran out).",
            "fix": "Resume from the last checkpoint (Resume in the app's Runs tab, or python -m denselora_app resume "
                   "RUN_ID). If it happens again without a restart, reduce memory use (batch_size, cutoff_len, "
                   "gradient_checkpointing).",
        }
    return {"kind": "other", "summary": detail, "fix": "Read the end of train.log for the full error."}
