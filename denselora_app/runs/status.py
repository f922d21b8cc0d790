"""A run's state as status.json records it (``Status``), and whether the process writing it is still alive.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import subprocess
from dataclasses import dataclass, field
from typing import Any

import psutil

log = logging.getLogger(__name__)


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


WRITABLE_FIELDS = {f.name for f in dataclasses.fields(Status) if not f.metadata.get("derived")}


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
    LR_SEARCH = "lr search"  # short trials at a spread of learning rates (engine/lr_finder.py); saves no adapter

    def __str__(self) -> str:
        return self.value


spawned_workers: list[subprocess.Popen] = []  # workers this process started, polled so finished ones are reaped


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def process_alive(pid: int | None, started: float | None) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``started`` (pids are recycled)."""
    if not pid:
        return False
    for child in list(spawned_workers):
        child.poll()  # reap our own finished workers, so they do not linger as zombies that look alive
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
